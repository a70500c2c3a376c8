"""Vector-quantized kernels: the pure-torch reference and the Triton LUT kernels against it.

The Triton kernels run on a GPU when there is one, else on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported);
shapes stay tiny so the interpreter finishes quickly.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from leanq.config import QuantSpec  # noqa: E402
from leanq.formats.vq import geometry, pack_vq_weight  # noqa: E402
from leanq.kernels import select  # noqa: E402
from leanq.modules import QuantLinear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_vq_layer(out_f: int, in_f: int, spec: QuantSpec, bias: bool, seed: int) -> QuantLinear:
    """A QuantLinear with random indices (every codeword reachable), codebooks and scales."""
    g = torch.Generator().manual_seed(seed)
    geo = geometry(spec, out_f, in_f)
    idx = torch.randint(0, geo["K"], (out_f, spec.vq_books, geo["nvec"]), generator=g)
    books = torch.randn(geo["nrt"] * geo["nct"], spec.vq_books, geo["K"], spec.vq_dim, generator=g)
    scales = torch.rand(out_f, geo["nsg"], generator=g) + 0.5
    vw = pack_vq_weight(idx, books, scales, spec, in_f)
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_int_weight(vw, b)


def oracle(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    from leanq.formats.layouts import container

    y = x.double().cpu() @ container(m).dequantize(torch.float64).cpu().t()
    return y + m.bias.double().cpu() if m.bias is not None else y


SPECS = [  # (vq_dim, index bits, books, rows, cols, scale group, in_features)
    (4, 8, 1, None, None, None, 64),
    (4, 8, 1, None, 32, None, 72),     # column tiles, a shorter last one
    (2, 6, 1, None, 16, 32, 48),       # 6-bit indices straddle bytes; per-group scales
    (2, 4, 2, 8, None, None, 40),      # residual books, row tiles
    (3, 5, 1, None, None, None, 44),   # d does not divide in: a padded last vector
    (8, 8, 2, None, None, None, 64),
]


@pytest.mark.parametrize("d,ib,nb,rows,cols,group,in_f", SPECS)
def test_reference_kernel_runs_the_decoded_weight(d, ib, nb, rows, cols, group, in_f):
    spec = QuantSpec(fmt="vq", bits=ib, vq_dim=d, vq_books=nb, vq_rows=rows, vq_cols=cols, group_size=group)
    m = random_vq_layer(20, in_f, spec, bias=True, seed=d * 10 + ib)
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(0))
    assert select(m, x).name == "reference-vq"
    torch.testing.assert_close(m(x).double(), oracle(m, x), rtol=1e-5, atol=1e-4)


triton = pytest.importorskip("triton")


@pytest.mark.parametrize("d,ib,nb,rows,cols,group,in_f", SPECS)
def test_triton_kernels_match_reference(d, ib, nb, rows, cols, group, in_f):
    from leanq.kernels import triton_vq as tv

    spec = QuantSpec(fmt="vq", bits=ib, vq_dim=d, vq_books=nb, vq_rows=rows, vq_cols=cols, group_size=group)
    m = random_vq_layer(12, in_f, spec, bias=ib == 8, seed=d * 10 + ib).to(DEV)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = torch.randn(2, in_f, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    ref = oracle(m, x)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    # small blocks: several programs per row and a partly masked last chunk
    # word lookups (d = 2, 4) everywhere; the per-value lookups once (the interpreter is slow)
    for pack in (True, False) if (d, ib) == (4, 8) else (True,):
        torch.testing.assert_close(tv.vq_gemv(m, x, bn=8, bv=8, pack=pack).double().cpu(), ref, **tol)
    torch.testing.assert_close(tv.vq_dequant_linear(m, x).double().cpu(), ref, **tol)
    from leanq.formats.layouts import container

    torch.testing.assert_close(tv.vq_dequantize(m, torch.float32, bn=16, bv=8).cpu(),
                               container(m).dequantize(torch.float32).cpu())


# --- batch-1 GEMV on the K-major index layout (kernels.triton_vq_kn) ---

@pytest.mark.parametrize("d,ib,nb,rows,cols,group,in_f", SPECS)
def test_vq_kn_layout_decodes_to_the_stored_weight(d, ib, nb, rows, cols, group, in_f):
    from leanq.formats.layouts import container
    from leanq.kernels import triton_vq_kn as vk

    spec = QuantSpec(fmt="vq", bits=ib, vq_dim=d, vq_books=nb, vq_rows=rows, vq_cols=cols, group_size=group)
    m = random_vq_layer(20, in_f, spec, bias=False, seed=d * 10 + ib)
    pk = vk.repack_vq_kn(m.qweight, m.codebooks, m.scales, spec, in_f)
    assert pk["idx"].shape == (nb, geometry(spec, 20, in_f)["nvec"], 20) and pk["idx"].dtype == torch.uint8
    torch.testing.assert_close(vk.reference_vq_kn(pk), container(m).dequantize(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("d,ib,nb,rows,cols,group,in_f", SPECS)
def test_vq_kn_gemv_matches_reference(d, ib, nb, rows, cols, group, in_f):
    from leanq.kernels import triton_vq_kn as vk

    spec = QuantSpec(fmt="vq", bits=ib, vq_dim=d, vq_books=nb, vq_rows=rows, vq_cols=cols, group_size=group)
    m = random_vq_layer(24, in_f, spec, bias=ib == 8, seed=d * 10 + ib + 1).to(DEV)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = torch.randn(1, in_f, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
    ref = oracle(m, x)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    pk = vk.packed_vq_kn(m)
    bias = m.bias.to(dtype) if m.bias is not None else None
    # uneven N (24 over 16-wide blocks) and several vector blocks; the table variant where it applies
    for cfg in (dict(BN=16, BV=4, num_warps=1), dict(BN=16, BV=4, num_warps=1, lut=True)):
        if cfg.get("lut") and not vk.lut_ok(pk):
            continue
        torch.testing.assert_close(vk.run_vq_kn(x, pk, bias, cfg).double().cpu(), ref, **tol)
        torch.testing.assert_close(vk.run_vq_kn(x, pk, bias, cfg).double().cpu(), ref, **tol)  # scratch left at 0


def test_vq_kn_is_chosen_at_batch_1_only_and_rebuilt_when_weights_change():
    from leanq.kernels import triton_vq_kn as vk

    spec = QuantSpec(fmt="vq", bits=8, vq_dim=4, vq_books=1, vq_rows=None, vq_cols=32, group_size=None)
    m = random_vq_layer(16, 64, spec, bias=False, seed=3)
    x1, x2 = torch.randn(1, 64), torch.randn(2, 64)
    assert vk._supports(m, x1) and not vk._supports(m, x2)
    pk = vk.packed_vq_kn(m)
    assert vk.packed_vq_kn(m) is pk  # cached
    with torch.no_grad():
        m.codebooks.mul_(2)  # in-place change of a stored tensor: the layout is rebuilt
    assert vk.packed_vq_kn(m) is not pk


# --- batch-1 CUDA C++ table kernel (kernels.cuda_vq): needs a GPU and NVRTC; the Triton kernel is its fallback ---

CUDA_SPECS = [  # layouts the CUDA kernel takes: one book, no row tiles
    (4, 8, 1, None, 192, None, 768),   # the 2-bit preset, 4 column tiles
    (2, 6, 1, None, 192, None, 400),   # the 3-bit preset, a shorter last tile
    (4, 8, 1, None, 32, 128, 256),     # per-group scales spanning whole blocks
    (3, 5, 1, None, None, None, 44),   # a padded last vector, a block past the last vector
]


def test_cuda_vq_declines_layouts_it_does_not_compute():
    from leanq.kernels import cuda_vq as cv

    base = dict(NB=1, nrt=1, IB=8, N=64, nsg=1, group=256, D=4)
    assert cv.outputs_per_block(4096, 1024, 64, dict(bps=2), 132) == 1024  # 64 vector blocks: split N in 4
    assert cv.outputs_per_block(4096, 1024, 512, dict(bps=2), 132) == 4096  # enough blocks: one split
    assert cv.outputs_per_block(4096, 1024, 64, dict(nr=3), 132) == 3072
    cfg = dict(threads=128, npt=8, vc=16)
    assert cv.layout_ok(base, cfg)
    for bad in (dict(NB=2), dict(nrt=2), dict(N=60), dict(nsg=2, group=32)):  # books, row tiles, N % npt, groups
        assert not cv.layout_ok({**base, **bad}, cfg), bad
    assert cv.layout_ok({**base, "nsg": 2, "group": 128}, cfg)  # a scale group of two whole blocks
    assert "#define KK 256" in cv.source(4, 256, 2, 128, 8, 16, False)
    if not torch.cuda.is_available():
        m = random_vq_layer(16, 64, QuantSpec(fmt="vq", bits=8, vq_dim=4, vq_books=1, vq_cols=32), False, 1)
        assert not cv._supports(m, torch.randn(1, 64))  # no GPU: never chosen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU (NVRTC)")
@pytest.mark.parametrize("d,ib,nb,rows,cols,group,in_f", CUDA_SPECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_vq_matches_reference(d, ib, nb, rows, cols, group, in_f, dtype):
    from leanq.kernels import cuda_vq as cv
    from leanq.kernels import triton_vq_kn as vk

    spec = QuantSpec(fmt="vq", bits=ib, vq_dim=d, vq_books=nb, vq_rows=rows, vq_cols=cols, group_size=group)
    m = random_vq_layer(2048 + 64, in_f, spec, bias=ib == 8, seed=d * 10 + ib + 5).to("cuda")
    x = torch.randn(1, in_f, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)
    ref = oracle(m, x)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-3)
    pk = vk.packed_vq_kn(m)
    bias = m.bias.to(dtype) if m.bias is not None else None
    # "tile" and "stationary" kernels; blocks past the last output, a last step with fewer live threads,
    # several steps per block
    for cfg in (dict(threads=128, npt=8, vc=16), dict(threads=64, npt=16, vc=8, fuse=True), dict(threads=256, npt=4, vc=16),
                dict(threads=256, npt=8, vc=8, mode="stationary", nr=2), dict(threads=128, npt=4, vc=16, mode="stationary"),
                dict(threads=64, npt=16, vc=8, mode="stationary", bps=1), *(() if dtype != torch.bfloat16 else (
                    # (bf16 only: each config is a compile) ec: codewords read before the wait (several per
                    # thread, one per thread, with gd); cpw: codewords per thread in the table build (2, 4, 8)
                    dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1, ec=1),
                    dict(threads=256, npt=4, vc=16, gd=1, ec=1), dict(threads=64, npt=16, vc=8, fuse=True, ec=1),
                    dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1, ec=1, cpw=4),
                    dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, cpw=8),
                    dict(threads=256, npt=4, vc=16, gd=1, ec=1, cpw=2),
                    dict(threads=64, npt=16, vc=8, fuse=True, cpw=4),
                    # th: the fp16 table (16-bit activations; fp32 activations keep the fp32 table)
                    dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1, ec=1, cpw=4, th=1),
                    dict(threads=256, npt=4, vc=16, gd=1, ec=1, th=1))),
                *((dict(threads=128, npt=8, vc=16, th=1),) if dtype == torch.float16 else ())):
        if not cv.layout_ok(pk, cfg):
            continue
        for _ in range(2):  # the second launch checks the scratch was left at zero
            torch.testing.assert_close(cv.run_vq_cuda(x, pk, bias, cfg).double().cpu(), ref, **tol)
    assert select(m, x).name == "cuda-vq-lut-gemv"
    torch.testing.assert_close(m(x).double().cpu(), ref, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU (NVRTC)")
@pytest.mark.parametrize("mag", [1e-7, 1.0, 3e3])
def test_cuda_vq_fp16_table_scales_activations_of_any_size(mag):
    """th: entries past fp16's range (|x| in the thousands times 4-dim codewords) or in its subnormals (|x| ~ 1e-7)
    must not overflow or flush: the block's power-of-two scaling keeps the result within the bf16 tolerance."""
    from leanq.kernels import cuda_vq as cv
    from leanq.kernels import triton_vq_kn as vk

    spec = QuantSpec(fmt="vq", bits=8, vq_dim=4, vq_books=1, vq_cols=192)
    m = random_vq_layer(1024, 768, spec, bias=False, seed=11).to("cuda")
    x = (torch.randn(1, 768, generator=torch.Generator().manual_seed(5)) * mag)
    x[0, 100] = 40 * mag  # one outlier per layer, as activations have
    x = x.to("cuda", torch.bfloat16)
    ref = oracle(m, x)
    pk = vk.packed_vq_kn(m)
    for cfg in (dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1, ec=1, cpw=4, th=1),
                dict(threads=256, npt=4, vc=16, th=1)):
        y = cv.run_vq_cuda(x, pk, None, cfg).double().cpu()
        assert torch.isfinite(y).all()
        # bf16 outputs round at ~2e-3; unscaled fp16 entries would be off by ~5% at 1e-7 (subnormals), inf at 3e3
        assert ((y - ref).norm() / ref.norm()).item() < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU (NVRTC)")
@pytest.mark.parametrize("cfg", [dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1),
                                 dict(threads=256, npt=4, vc=16, gd=1), dict(threads=64, npt=16, vc=8, fuse=True, gd=1),
                                 dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=2),
                                 dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1, ec=1),
                                 dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1, ec=1, cpw=4),
                                 dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1, ec=1, cpw=4, th=1)])
def test_cuda_vq_pdl_chain_in_a_cuda_graph_reads_each_input_after_it_is_written(cfg):
    """Programmatic dependent launch (gd): in a captured chain of vq layers (the GEMV, its finishing kernel, an
    elementwise op between layers; the scratch sums shared), every replay matches the chain launched without it, for
    a new input each time (the chain's buffers still hold the last replay's values, so an early read would show)."""
    from leanq.kernels import cuda_vq as cv
    from leanq.kernels import triton_vq_kn as vk

    spec = QuantSpec(fmt="vq", bits=8, vq_dim=4, vq_books=1, vq_rows=None, vq_cols=192, group_size=None)
    pks = [vk.packed_vq_kn(random_vq_layer(1536, 1536, spec, bias=False, seed=20 + i).to("cuda")) for i in range(2)]
    check_pdl_chain(lambda x, pk, c: cv.run_vq_cuda(x, pk, None, c), pks, cfg, {k: v for k, v in cfg.items() if k != "gd"},
                    exact=False)  # fp32 atomics: any order


def check_pdl_chain(run, pks: list, cfg: dict, plain: dict, exact: bool) -> None:
    """A chain of 8 layers (``run(x, pk, cfg)``, alternating ``pks``, an elementwise op between them) captured in a
    CUDA graph with launch config ``cfg``: every replay equals the chain launched eagerly with ``plain`` (no PDL), for
    a new input each time (the chain's buffers still hold the last replay's values, so an early read would show).
    ``exact``: bit for bit, else within fp32 rounding."""
    x0 = torch.randn(1, 1536, device="cuda")

    def chain(c):
        x = x0
        for i in range(8):
            x = run(x, pks[i % 2], c) * 0.025  # about unit scale again
        return x

    chain(cfg)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = chain(cfg)
    for _ in range(4):
        x0.copy_(torch.randn(1, 1536, device="cuda"))
        g.replay()
        ref = chain(plain)
        torch.cuda.synchronize()
        assert ref.abs().max() > 0
        if exact:
            assert torch.equal(y, ref)
        else:
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_cuda_vq_pdl_source_orders_the_wait():
    """gd: the index loads (volatile, coherent) come before the wait, x only after it, the early trigger with gd 1."""
    from leanq.kernels import cuda_vq as cv

    for gd in (0, 1, 2):
        src = cv.source(4, 256, 2, 128, 4, 16, False, 0, gd)
        assert f"#define GD {gd}\n" in src
        for entry in ("vq_lut_gemv(", "vq_lut_gemv_s("):
            body = src[src.index(entry):]
            assert body.index("load_idx<GD != 0>(") < body.index("gdc_step();") < body.index("build_table(")
            # ec: the codewords (layer data) go out with the indices, before the wait
            assert body.index("load_idx<GD != 0>(") < body.index("load_cb(") < body.index("gdc_step();")
        body = src[src.index("vq_finish("):]
        assert body.index("gdc_step();") < body.index("acc[n]")
    with pytest.raises(AssertionError):
        cv.source(4, 256, 2, 128, 4, 16, False, 0, 3)


def test_cuda_vq_halves_the_vectors_per_block_only_where_a_block_would_get_one_step():
    """launch_vc: the 2-bit preset's vc1 serves layers where each stationary block would own a single step of
    outputs (4096x4096 on 132 SMs), never the large Llama shapes, the tile kernel, or a config without vc1."""
    from leanq.kernels import cuda_vq as cv

    cfg = cv.TUNED[(4, 8)]
    assert cfg.get("vc1") == 8 and cfg["mode"] == "stationary"
    pk = lambda n, k: dict(N=n, nvec=k // 4)  # noqa: E731
    assert cv.launch_vc(pk(4096, 4096), cfg, 132) == 8
    for n, k in [(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]:
        assert cv.launch_vc(pk(n, k), cfg, 132) == 16, (n, k)
    bn = cfg["threads"] * cfg["npt"]
    assert cv.outputs_per_block(4096, bn, 4096 // 4 // 16, cfg, 132) == bn  # why: one step per block at vc 16
    assert cv.outputs_per_block(4096, bn, 4096 // 4 // 8, cfg, 132) == 2 * bn  # two at vc 8
    assert cv.launch_vc(pk(4096, 4096), {k: v for k, v in cfg.items() if k != "vc1"}, 132) == 16
    assert cv.launch_vc(pk(4096, 4096), dict(cfg, mode="tile"), 132) == 16
    assert cv.cpw_ok(256, cfg["threads"], cfg["vc1"], cfg["cpw"])  # the build mapping holds at vc1 too


def test_cuda_vq_build_mapping_covers_the_table():
    """cpw: kk / cpw codeword groups times vector groups must tile (codewords x vectors) exactly, or the launcher
    keeps the old mapping (source refuses a mapping that leaves entries out)."""
    from leanq.kernels import cuda_vq as cv

    for kk, threads, vc, cpw in [(256, 128, 16, 4), (256, 128, 16, 8), (64, 256, 16, 4), (64, 256, 16, 2),
                                 (256, 64, 8, 4), (32, 64, 8, 4)]:
        assert cv.cpw_ok(kk, threads, vc, cpw)
        groups, vgroups = kk // cpw, threads // (kk // cpw)
        cover = {(g * cpw + i, vg + k * vgroups) for g in range(groups) for vg in range(vgroups)
                 for k in range(vc // vgroups) for i in range(cpw)}
        assert cover == {(c, v) for c in range(kk) for v in range(vc)}, (kk, threads, vc, cpw)
        assert f"#define CPW {cpw}\n" in cv.source(4, kk, 2, threads, 4, vc, False, 0, 1, 1, cpw)
    for kk, threads, vc, cpw in [(256, 128, 16, 3), (256, 128, 16, 1), (64, 256, 8, 4), (256, 64, 16, 1),
                                 (256, 128, 16, 0)]:
        assert not cv.cpw_ok(kk, threads, vc, cpw), (kk, threads, vc, cpw)
    with pytest.raises(AssertionError):
        cv.source(4, 256, 2, 128, 4, 16, False, 0, 1, 1, 3)
    assert "#define TH 1\n" in cv.source(4, 256, 2, 128, 4, 16, False, 0, 1, 1, 4, 1)
    with pytest.raises(AssertionError):  # fp32 activations keep the fp32 table
        cv.source(4, 256, 0, 128, 4, 16, False, 0, 1, 1, 4, 1)
    assert cv.TUNED[(4, 8)].get("cpw") and cv.cpw_ok(256, cv.TUNED[(4, 8)]["threads"], cv.TUNED[(4, 8)]["vc"],
                                                     cv.TUNED[(4, 8)]["cpw"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU (NVRTC)")
def test_cuda_vq_runs_under_torch_compile():
    """torch.compile takes the kernel whole as the custom op leanq::cuda_vq_linear (same result as eager)."""
    from leanq.kernels import cuda_vq as cv
    from leanq.kernels import triton_vq_kn as vk

    spec = QuantSpec(fmt="vq", bits=8, vq_dim=4, vq_books=1, vq_rows=None, vq_cols=192, group_size=None)
    m = random_vq_layer(512, 768, spec, bias=True, seed=9).to("cuda")
    x = torch.randn(1, 768, generator=torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)
    eager = m(x)
    pk = vk.packed_vq_kn(m)
    direct = torch.ops.leanq.cuda_vq_linear(x, pk["idx"], pk["cb"], pk["scales"], m.bias.to(x.dtype), pk["N"], pk["K"],
                                             pk["D"], pk["IB"], pk["nvec"], pk["cols"], pk["group"], pk["nsg"],
                                             pk["packed"])
    tol = dict(rtol=1e-2, atol=1e-2)  # fp32 atomics add in any order: equal up to the last bf16 bit
    torch.testing.assert_close(direct, eager, **tol)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, **tol)
    assert cv._op is not None


# --- whole-row codebook kernel (kernels.cuda_vq_rows): its layout on any machine; the kernel on a GPU ---
ROWS_SPECS = [  # (vq_dim, index bits, cols, scale group, out, in): the presets' shapes and edge cases
    (4, 8, 192, None, 40, 576),   # vq2 preset
    (2, 6, 192, None, 33, 500),   # vq3 preset, a partial last tile
    (2, 8, 192, 384, 16, 768),    # vq4 preset with per-group scales over two tiles
    (4, 6, 64, None, 8, 200),     # 6-bit indices of 4-vectors, padded tile chunks
    (2, 4, 32, None, 8, 100),     # 4-bit indices
]


def _rows_spec(d, ib, cols, group):
    return QuantSpec(fmt="vq", bits=ib, vq_dim=d, vq_books=1, vq_rows=None, vq_cols=cols, group_size=group)


@pytest.mark.parametrize("d,ib,cols,group,out_f,in_f", ROWS_SPECS)
def test_vq_rows_layout_decodes_to_the_stored_weight(d, ib, cols, group, out_f, in_f):
    from leanq.formats.layouts import container
    from leanq.kernels import cuda_vq_rows as vr

    m = random_vq_layer(out_f, in_f, _rows_spec(d, ib, cols, group), False, seed=ib + d)
    pk = vr.repack_vq_rk(m.qweight, m.codebooks, m.scales, m.spec, in_f)
    assert pk["words"].shape[1] == pk["NCT"] * pk["CPT"] * 4
    torch.testing.assert_close(vr.reference_vq_rk(pk), container(m).dequantize(torch.float32), rtol=0, atol=0)


def test_vq_rows_declines_what_it_does_not_compute():
    from leanq.kernels import cuda_vq_rows as vr

    assert vr.layout_fields(_rows_spec(3, 5, 192, None), 8, 64) is None  # D = 3
    assert vr.layout_fields(QuantSpec(fmt="vq", bits=8, vq_dim=4, vq_books=2, vq_cols=192), 8, 192) is None  # 2 books
    assert vr.layout_fields(QuantSpec(fmt="vq", bits=8, vq_dim=4, vq_rows=4, vq_cols=192), 8, 192) is None  # row tiles
    assert vr.layout_fields(_rows_spec(4, 8, 192, 96), 8, 384) is None  # scale groups inside a tile
    assert vr.layout_fields(_rows_spec(4, 8, 192, None), 8, 4096)["smem"] < vr.SMEM_LIMIT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU (NVRTC)")
@pytest.mark.parametrize("d,ib,cols,group,out_f,in_f", ROWS_SPECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_vq_rows_matches_reference(d, ib, cols, group, out_f, in_f, dtype):
    from leanq.kernels import cuda_vq_rows as vr

    m = random_vq_layer(out_f, in_f, _rows_spec(d, ib, cols, group), True, seed=3).to("cuda")
    pk = vr.repack_vq_rk(m.qweight, m.codebooks, m.scales, m.spec, in_f)
    w = vr.reference_vq_rk(pk)
    for trial in range(2):
        x = torch.randn(1, in_f, device="cuda").to(dtype)
        if trial:
            x[0, in_f // 2] = 3000.0
        out = torch.full((1, out_f), float("nan"), device="cuda", dtype=dtype)
        vr.run_vq_rows(x, pk, m.bias.to(dtype), out=out)
        ref = x.float() @ w.t() + m.bias.float()
        assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def _emulate_vq_rows(pk: dict, x: torch.Tensor) -> torch.Tensor:
    """kernels.cuda_vq_rows's arithmetic in torch, with the kernel's own index formulas: staged units (a unit of 8
    values per 16 bytes, zeros past the tile or K), x * 2**-e in fp16, codewords by index, fp16x2 sums per chunk."""
    import math

    d, ib, ipc, vpt, cpt, nct, s_units = (pk[k] for k in ("D", "IB", "IPC", "VPT", "CPT", "NCT", "S"))
    ipw, kc = 32 // ib, nct * cpt
    e = math.frexp(x.abs().max().item())[1] if x.abs().max() > 0 else 0
    staged = torch.zeros(kc, 8 * s_units)
    for u in range(kc * s_units):
        c, j = divmod(u, s_units)
        t = c // cpt
        k0 = t * vpt * d + (c % cpt) * ipc * d + 8 * j
        kend = min(min(t * vpt + vpt, pk["nvec"]) * d, pk["K"])
        for i in range(8):
            staged[c, 8 * j + i] = x[k0 + i] * 2.0 ** -e if k0 + i < kend else 0.0
    staged = staged.half()
    cb = pk["cb"].view(nct, pk["KK"], d)
    words = pk["words"].to(torch.int64) & 0xFFFFFFFF
    tpg = max(1, pk["group"] // pk["cols"])
    out = torch.zeros(pk["N"])
    for row in range(pk["N"]):
        for c in range(kc):
            t = c // cpt
            a = torch.zeros(2, dtype=torch.float16)
            for i in range(ipc):
                k = (int(words[row, 4 * c + i // ipw]) >> (ib * (i % ipw))) & ((1 << ib) - 1)
                for h in range(d // 2):
                    p = i * (d // 2) + h
                    a = (cb[t, k, 2 * h:2 * h + 2].double() * staged[c, 2 * p:2 * p + 2].double() + a.double()).half()
            y = 2.0 ** e * a.float().sum().item()
            out[row] += y * (pk["scales"][row, min(t // tpg, pk["nsg"] - 1)].item() if pk["nsg"] > 1 else 1.0)
        if pk["nsg"] == 1:
            out[row] *= pk["scales"][row, 0].item()
    return out


@pytest.mark.parametrize("d,ib,cols,group,out_f,in_f", ROWS_SPECS[1:3])
def test_vq_rows_emulated_kernel_matches_reference(d, ib, cols, group, out_f, in_f):
    """cuda_vq_rows has not run on a GPU yet: its indexing and fp16 arithmetic, emulated here, must give x @ W^T."""
    from leanq.kernels import cuda_vq_rows as vr

    m = random_vq_layer(min(out_f, 8), in_f, _rows_spec(d, ib, cols, group), False, seed=5)
    pk = vr.repack_vq_rk(m.qweight, m.codebooks, m.scales, m.spec, in_f)
    x = torch.randn(in_f)
    x[in_f // 3] = 3000.0
    ref = vr.reference_vq_rk(pk) @ x
    assert ((_emulate_vq_rows(pk, x) - ref).norm() / ref.norm()).item() < 3e-3
