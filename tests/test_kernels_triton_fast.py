"""v4 Triton int kernels (kernels/triton_fast.py) against the float64 reference.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set in conftest / below); tiny shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_kernels_triton import CASES, DEV, DTYPE, make_layer, ref_out, rel_err

from leanq.kernels import triton_fast as tf
from leanq.kernels import triton_int as ti


@pytest.mark.parametrize("bits,group,sym,in_f", CASES)
def test_gemv4_matches_reference(bits, group, sym, in_f):
    m = make_layer(24, in_f, bits, group, sym, bias=bits == 4, seed=bits * 101 + in_f)
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(11)).to(DEV, DTYPE)
    ref = ref_out(m, x)
    bias = m.bias.to(DTYPE) if m.bias is not None else None
    for bm in (1, 2, 4) if (bits, sym) == (4, False) else (4,):
        out = tf.run_gemv4(x, ti.packed_for(m), bias, cfg=dict(BM=bm, BN=8, BK=64, num_warps=4, num_stages=1))
        assert out.shape == (3, 24) and out.dtype == DTYPE
        assert rel_err(out, ref) <= 1e-4 if DTYPE == torch.float32 else 1e-2, bm
    # batch 1 with split-K (arrival-counter fixup in the kernel)
    out = tf.run_gemv4(x[:1], ti.packed_for(m), bias, cfg=dict(BM=1, BN=8, BK=32, num_warps=4, num_stages=1,
                                                                 SPLIT=2))
    assert rel_err(out, ref[:1]) <= 1e-4 if DTYPE == torch.float32 else 1e-2


# split-K (SPLIT=2: fp32 partials summed after the launch) on two cases; the interpreter is slow
@pytest.mark.parametrize("bits,group,sym,in_f,split", [c + (2 if c[:3] in ((4, 32, False), (3, 32, True)) else 1,)
                                                       for c in CASES if c[0] in (2, 3, 4, 8)])
def test_wdot_matches_reference(bits, group, sym, in_f, split):
    m = make_layer(40, in_f, bits, group, sym, bias=sym, seed=bits * 13 + in_f)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(12)).to(DEV, DTYPE)
    bias = m.bias.to(DTYPE) if m.bias is not None else None
    out = tf.run_wdot(x, ti.packed_for(m), bias, cfg=dict(BMX=16, BN=16, BK=32, SPLIT=split, num_warps=4,
                                                             num_stages=1))
    assert out.shape == (5, 40) and out.dtype == DTYPE
    assert rel_err(out, ref_out(m, x)) <= 1e-2


def test_split_rule():
    cfg = dict(BMX=16, BN=64, BK=128, SPLIT=0)
    assert tf.split_for(16, 4096, 4096, cfg, 132) == 8  # 64 tiles x 8 splits of 4 K-tiles each
    assert tf.split_for(16, 14336, 4096, cfg, 132) == 2  # 224 tiles: one doubling reaches 2 waves
    assert tf.split_for(16, 4096, 4096, dict(cfg, SPLIT=3), 132) == 3  # an explicit split wins
    assert tf.split_for(16, 4096, 512, cfg, 132) == 1  # 4 K-tiles: too short to split


def test_dispatch_prefers_v4():
    m = make_layer(16, 64, 4, 32, False, bias=False, seed=6)
    one = torch.empty(1, 64, device="meta", dtype=torch.float16)
    many = torch.empty(3, 7, 64, device="meta", dtype=torch.float16)
    assert tf._supports_gemv4(m, one) and not tf._supports_wdot(m, one)
    assert tf._supports_wdot(m, many) and not tf._supports_gemv4(m, many)
    assert not tf._supports_wdot(m, many.float())  # fp32 activations: tensor-core path declines


def test_compile_op_matches_direct_call():
    m = make_layer(16, 64, 4, 32, True, bias=False, seed=8)
    pk = ti.packed_for(m)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)).to(DEV, DTYPE)
    args = (pk["planes"], pk["scales"], pk["zeros"], None, pk["bits"], pk["sym"], pk["K"], pk["N"], pk["Kw"],
            pk["group"], pk["gt"])
    assert torch.equal(torch.ops.leanq.triton_fast_linear(x, *args, "gemv4"), tf.run_gemv4(x, pk, None))


@pytest.mark.parametrize("bits,group,sym,in_f", [(4, 32, False, 96), (4, 32, True, 80), (2, 32, False, 64),
                                                 (2, 32, True, 88), (4, None, False, 64)])
def test_gemv_h2_matches_reference(bits, group, sym, in_f):
    from leanq.kernels import triton_half2 as th

    m = make_layer(24, in_f, bits, group, sym, bias=sym, seed=bits * 17 + in_f)
    x = torch.randn(1, in_f, generator=torch.Generator().manual_seed(13)).to(DEV, DTYPE)
    pk = ti.packed_for(m)
    assert th.supported(pk) and not th.supported(ti.packed_for(make_layer(8, 32, 8, 32, False, False, 1)))
    bias = m.bias.to(DTYPE) if m.bias is not None else None
    tight = 2e-3 if DTYPE == torch.float32 else 5e-3  # bf16 outputs alone round by up to ~2e-3 (H100: 2.09e-3)
    for center, tol, split in ((True, tight, 1), (False, 1e-2, 1), (True, tight, 2)):
        out = th.run_gemv_h2(x, pk, bias, cfg=dict(BN=8, BK=32, num_warps=4, num_stages=1, CENTER=center,
                                                   SPLIT=split))
        assert out.shape == (1, 24) and out.dtype == DTYPE
        # fp16 products and per-word fp16 sums: looser than fp32, inside the 1e-2 acceptance bound
        assert rel_err(out, ref_out(m, x)) <= tol, (center, split)
    if DEV == "cpu":
        assert int(th._COUNTERS[torch.device("cpu")].abs().sum()) == 0  # the last program reset them


def test_h2_split_rule():
    from leanq.kernels import triton_half2 as th

    cfg = dict(BN=16, BK=2048, num_warps=4)
    assert th.split_for(4096, 4096, cfg, 132) == 2  # K allows one doubling only (2 tiles)
    assert th.split_for(4096, 14336, cfg, 132) == 4  # 1024 warps -> 4096 (then K runs short)
    assert th.split_for(14336, 4096, cfg, 132) == 2
    assert th.split_for(4096, 4096, dict(cfg, SPLIT=3), 132) == 3


def test_h2_dispatch_and_op():
    from leanq.kernels import triton_half2 as th

    m4 = make_layer(16, 64, 4, 32, False, bias=False, seed=21)
    m8 = make_layer(16, 64, 8, 32, False, bias=False, seed=22)
    one = torch.empty(1, 64, device="meta", dtype=torch.bfloat16)
    assert th._supports(m4, one) and not th._supports(m8, one)
    assert not th._supports(m4, torch.empty(2, 64, device="meta", dtype=torch.bfloat16))
    assert not th._supports(m4, torch.empty(1, 64, device="meta", dtype=torch.float32))
    pk = ti.packed_for(m4)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(5)).to(DEV, DTYPE)
    args = (pk["planes"], pk["scales"], pk["zeros"], None, pk["bits"], pk["sym"], pk["K"], pk["N"], pk["Kw"],
            pk["group"], pk["gt"])
    assert torch.equal(torch.ops.leanq.triton_fast_linear(x, *args, "h2"), th.run_gemv_h2(x, pk, None))
