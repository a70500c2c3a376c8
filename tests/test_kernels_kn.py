"""The kn-layout kernels (kernels/triton_kn.py) against the stored format's dequantization.

GPU when present, else Triton's interpreter on the CPU (TRITON_INTERPRET=1 set before triton loads).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from leanq.kernels import triton_kn as kn  # noqa: E402

from test_kernels_triton import DEV, DTYPE, make_layer, ref_out, rel_err  # noqa: E402

CASES = [  # bits, group, sym, out_features, in_features
    (4, 32, False, 24, 96), (4, 64, True, 40, 128), (4, 32, False, 24, 80),  # 80: last group short
    (2, 32, False, 24, 64), (2, 64, True, 16, 128),
    (8, 32, False, 24, 96), (8, 32, True, 20, 40),
]


@pytest.mark.parametrize("bits,group,sym,out_f,in_f", CASES)
def test_repack_holds_the_stored_weight(bits, group, sym, out_f, in_f):
    m = make_layer(out_f, in_f, bits, group, sym, bias=False, seed=bits + in_f)
    pk = kn.packed_kn(m)
    assert pk["words"].dtype == torch.int32 and pk["words"].shape[1] == out_f
    assert torch.equal(kn.reference_kn(pk).cpu(), m.int_weight().dequantize(torch.float32).cpu())


@pytest.mark.parametrize("bits,group,sym,out_f,in_f", CASES)
def test_gemv_kn_matches_reference(bits, group, sym, out_f, in_f):
    m = make_layer(out_f, in_f, bits, group, sym, bias=bits == 4, seed=bits * 31 + in_f)
    x = torch.randn(1, in_f, generator=torch.Generator().manual_seed(1)).to(DEV, DTYPE)
    ref = ref_out(m, x)
    bias = m.bias.to(DTYPE) if m.bias is not None else None
    pk = kn.packed_kn(m)
    # BN 16 with 24 or 20 columns leaves the last block partly empty; BK 32 vs 64 changes the span count
    # h2: the paired-fp16 arithmetic (emulated with fp16 tensor ops on the interpreter)
    for cfg in (dict(BN=16, BK=32, num_warps=1), dict(BN=32, BK=64, num_warps=2),
                dict(BN=16, BK=32, num_warps=1, h2=True), dict(BN=32, BK=64, num_warps=2, h2=True),
                dict(BN=16, BK=32, num_warps=1, SPK=2), dict(BN=32, BK=32, num_warps=2, SPK=4, h2=True),
                dict(BN=16, BK=32, num_warps=1, tail="counter")):  # one launch: last-arrival tail
        out = kn.run_gemv_kn(x, pk, bias, cfg)
        assert out.shape == (1, out_f) and out.dtype == DTYPE
        assert rel_err(out, ref) <= 1e-2, cfg
        again = kn.run_gemv_kn(x, pk, bias, cfg)  # the scratch sums and counters were left at zero
        assert torch.equal(again, out), cfg
    acc, cnt = kn._scratch(x.device, 1)
    assert not acc.any() and not cnt.any()


@pytest.mark.parametrize("bits,group,sym,out_f,in_f", CASES)
def test_dot_kn_matches_reference(bits, group, sym, out_f, in_f):
    """The tensor-core path for batches above 1: one split (direct store) and split spans (atomics + finish)."""
    m = make_layer(out_f, in_f, bits, group, sym, bias=bits != 2, seed=bits * 7 + in_f)
    pk = kn.packed_kn(m)
    bias = m.bias.to(DTYPE) if m.bias is not None else None
    for rows in (2, 17):  # 17: a partly empty row block
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(DEV, DTYPE)
        ref = ref_out(m, x)
        for cfg in (dict(BM=16, BN=16, SPS=64, num_warps=1, num_stages=1),  # one split: direct
                    dict(BM=16, BN=16, SPS=1, num_warps=1, num_stages=1),  # a split per span
                    dict(BM=16, BN=16, SPS=64, num_warps=1, num_stages=1, trans=True),  # codes as operand A
                    dict(BM=16, BN=16, SPS=1, num_warps=1, num_stages=1, trans=True)):
            out = kn.run_dot_kn(x, pk, bias, cfg)
            assert out.shape == (rows, out_f) and out.dtype == DTYPE
            assert rel_err(out, ref) <= 1e-2, (rows, cfg)
            assert torch.equal(kn.run_dot_kn(x, pk, bias, cfg), out), cfg  # the scratch was left at zero
    assert not kn._scratch(x.device, 1)[0].any()


# Triton's interpreter computes bf16 dots wrongly (numpy has no bf16): bf16 is checked on a GPU only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] if DEV == "cuda" else [torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dot_kn_magic_codes_in_16_bit_activations(bits, dtype):
    """16-bit activations: codes read as MAGIC + q through the float bits (8-bit codes in bf16 fall back)."""
    m = make_layer(24, 96, bits, 32, False, bias=True, seed=bits)
    pk = kn.packed_kn(m)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)).to(DEV, dtype)
    ref = ref_out(m, x)
    cfg = dict(BM=16, BN=16, SPS=1, num_warps=1, num_stages=1)
    out = kn.run_dot_kn(x, pk, m.bias.to(dtype), cfg)
    assert out.dtype == dtype and rel_err(out, ref) <= 1e-2
    plain = kn.run_dot_kn(x, pk, m.bias.to(dtype), dict(cfg, magic=False))
    assert rel_err(plain, ref) <= 1e-2
    assert rel_err(kn.run_dot_kn(x, pk, m.bias.to(dtype), dict(cfg, trans=True)), ref) <= 1e-2


def test_dot_cfg_fills_the_machine():
    c = kn.dot_cfg(16, 4096, 4096, 128, {})
    assert c["BM"] == 16 and (4096 // c["BN"]) * -(-32 // c["SPS"]) >= 264
    big = kn.dot_cfg(256, 14336, 4096, 128, {})
    assert big["BM"] == 128 and big["SPS"] == 32  # 224 x 2 tiles already fill the machine: one split
    assert kn.dot_cfg(4, 4096, 4096, 128, dict(BM=16, BN=256, target=528))["SPS"] == 1


@pytest.mark.parametrize("bits,sym", [(4, False), (2, True), (8, False)])
def test_dequantize_kn_exact(bits, sym):
    m = make_layer(20, 96, bits, 32, sym, bias=False, seed=5)
    w = kn.dequantize_kn(kn.packed_kn(m), torch.float32, BN=16, R=4)
    assert torch.equal(w.cpu(), m.int_weight().dequantize(torch.float32).cpu())


def test_dispatch_rules():
    m = make_layer(16, 64, 4, 32, False, bias=False, seed=6)
    one = torch.empty(1, 64, device="meta", dtype=torch.bfloat16)
    many = torch.empty(3, 64, device="meta", dtype=torch.bfloat16)
    assert kn._supports_gemv(m, one) and not kn._supports_gemv(m, many)
    assert not kn._supports_dequant(m, many)  # only once the kn layout is the layer's only copy
    assert kn._supports_dot(m, many) and not kn._supports_dot(m, one)
    assert not kn._supports_dot(m, torch.empty(65, 64, device="meta", dtype=torch.bfloat16))  # above 64: cuBLAS
    assert not kn._supports_dot(make_layer(16, 64, 8, 32, False, bias=False, seed=6), many)  # 8-bit: wdot
    three = make_layer(16, 64, 3, 32, False, bias=False, seed=7)
    assert not kn._supports_gemv(three, one)  # 3 bits: not a divisor of 32, other kernels
    released = make_layer(16, 64, 4, 32, False, bias=False, seed=6)
    released._cache["triton_int_only"] = True  # what triton_int.release_stored leaves: no stored codes to repack
    assert not kn._supports_gemv(released, one) and not kn._supports_dot(released, many)
    odd = make_layer(8, 48, 4, 24, False, bias=False, seed=8)  # group 24: largest 2-power divisor 8 = one word
    assert kn.k_span(24, 4, 128) == 8


def test_compile_op_matches_direct_call():
    m = make_layer(16, 64, 4, 32, True, bias=False, seed=9)
    pk = kn.packed_kn(m)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)).to(DEV, DTYPE)
    args = (pk["words"], pk["scales"], pk["zeros"], None, pk["bits"], pk["sym"], pk["K"], pk["N"], pk["group"])
    y = torch.ops.leanq.triton_kn_linear(x, *args, "gemv")
    assert torch.equal(y, kn.run_gemv_kn(x, pk, None))
    assert rel_err(torch.ops.leanq.triton_kn_linear(x.repeat(3, 1), *args, "dequant"), ref_out(m, x.repeat(3, 1))) <= 1e-2


@pytest.mark.skipif(DEV != "cuda", reason="release_stored_kn acts on CUDA layers only")
def test_release_stored_kn_keeps_outputs():
    m = make_layer(16, 64, 4, 32, False, bias=True, seed=10)
    x1 = torch.randn(1, 64, device="cuda", dtype=DTYPE)
    x4 = torch.randn(4, 64, device="cuda", dtype=DTYPE)
    before1, before4 = m(x1), m(x4)
    assert kn.release_stored_kn(torch.nn.Sequential(m)) > 0 and m.qweight.numel() == 0
    # batch 1 ran on the highest-priority GPU kernel before (cuda_int where NVRTC works); the kn GEMV after
    from leanq.kernels import select

    assert select(m, x1).name == "triton-kn-gemv"
    assert rel_err(m(x1), before1) <= 1e-2
    assert rel_err(m(x4), before4) <= 1e-2
