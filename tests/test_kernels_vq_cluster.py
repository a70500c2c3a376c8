"""The cluster codebook kernel (leanq.kernels.cuda_vq_cluster): its layout and partition on the CPU, the kernel on a
GPU (NVRTC). Both codebook shapes: d2 with 16 codewords ("p4") and d4 with 256 (the 2-bit preset, "b8")."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from leanq.config import QuantSpec  # noqa: E402
from leanq.kernels import cuda_vq_cluster as vc  # noqa: E402
from test_kernels_vq import check_pdl_chain, oracle, random_vq_layer  # noqa: E402

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU (NVRTC)")


def spec(cols=192, group=None, d=2, ib=4, books=1, rows=None):
    return QuantSpec(fmt="vq", bits=ib, vq_dim=d, vq_books=books, vq_rows=rows, vq_cols=cols, group_size=group)


SHAPES = [  # (d, out, in, cols, rows): tiles of 192 columns with a short last one; an odd vector count; one tile;
    # row tiles (a short last one); d4 with a padded last vector
    (2, 64, 400, 192, None),
    (2, 32, 98, 192, None),
    (2, 16, 64, None, None),
    (2, 48, 200, 64, None),
    (2, 256, 400, 64, 128),
    (2, 192, 200, 32, 128),
    (4, 64, 400, 192, None),
    (4, 32, 98, 192, None),
    (4, 192, 200, 32, 128),
]


def dspec(d, cols, rows=None):
    return spec(cols, rows=rows) if d == 2 else spec(cols, d=4, ib=8, rows=rows)


@pytest.mark.parametrize("d,out_f,in_f,cols,rows", SHAPES)
def test_vq_cl_layout_decodes_to_the_stored_weight(d, out_f, in_f, cols, rows):
    from leanq.formats.layouts import container

    m = random_vq_layer(out_f, in_f, dspec(d, cols, rows), bias=False, seed=out_f + in_f)
    pk = vc.packed_vq_cl(m)
    torch.testing.assert_close(vc.reference_vq_cl(pk), container(m).dequantize(torch.float32), rtol=0, atol=0)


CFGS = [  # the default; one block per cluster; fixed groups and outputs per block (several steps); 2-block clusters;
    # two steps per block; clusters of 16
    vc.DEFAULT_CFG,
    dict(threads=64, cs=1, ppt_max=64, gd=0),
    dict(threads=128, cs=4, tv=2, nr=192, gd=1),
    dict(threads=64, cs=2, tv=2, nr=8, gd=0),
    dict(threads=256, cs=8, tv=8, steps=2, gd=1),
    dict(threads=256, cs=16, gd=1),  # 16 blocks: a non-portable cluster size
]


@pytest.mark.parametrize("d,out_f,in_f,cols,rows", SHAPES)
@pytest.mark.parametrize("cfg", CFGS)
def test_vq_cluster_partition_covers_each_unit_and_output_once(d, out_f, in_f, cols, rows, cfg):
    """emulate() walks the kernel's blocks, groups, pairs and output steps (and fails if a (pair, output) is missed
    or counted twice); its sums must be the layer's."""
    m = random_vq_layer(out_f, in_f, dspec(d, cols, rows), bias=False, seed=3 * out_f + in_f)
    pk = vc.packed_vq_cl(m)
    x = torch.randn(1, in_f, generator=torch.Generator().manual_seed(1))
    if not vc.layout_ok(pk, cfg):
        pytest.skip("config has no geometry for this layer")
    torch.testing.assert_close(vc.emulate(pk, x, cfg), oracle(m, x), rtol=1e-10, atol=1e-10)


def test_vq_cluster_plan_fits_the_llama_shapes():
    """On 132 SMs the default config takes every Llama-2/3 shape in one kernel for d2 (even units per thread, shared
    memory within bounds), and d4's 256-entry rows where K is 4096."""
    for d, n, k in ((2, 4096, 4096), (2, 11008, 4096), (2, 4096, 11008), (2, 14336, 4096), (2, 4096, 14336),
                    (2, 12288, 4096), (4, 4096, 4096), (4, 11008, 4096), (4, 14336, 4096)):
        f = vc.layout_fields(dspec(d, 192), n, k)
        assert f is not None and vc.layout_ok(f, vc.DEFAULT_CFG), (d, n, k)
        g = vc.plan(f, vc.DEFAULT_CFG)
        assert g["cs"] * g["ub"] >= f["NU"] and (d == 4 or g["ppt"] % 2 == 0) and g["chunks"] * g["nr"] >= n, g
    assert not vc.layout_ok(vc.layout_fields(dspec(4, 192), 4096, 14336), vc.DEFAULT_CFG)  # rows too large


def test_vq_cluster_takes_the_2bit_setting_of_issue_6_on_every_llama_shape():
    """`--vq dim=2,index=4,rows=512` (a codebook per 512 x 192 tile; the 2-bit setting whose fine-tuned quality and
    kernel speed docs/RESULTS.md and docs/PERFORMANCE.md report) is dispatched to this kernel on the five Llama
    shapes and on SmolLM2's, with each block's outputs inside one row tile."""
    s = spec(192, rows=512)
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (576, 576), (1536, 576),
                 (576, 1536), (192, 576)):
        assert vc.takes(s, n, k), (n, k)
        f = vc.layout_fields(s, n, k)
        g = vc.plan(f, vc.DEFAULT_CFG)
        assert f["nrt"] == 1 or 512 % g["nr"] == 0, (n, k, g["nr"])


def test_vq_cluster_declines_what_it_does_not_compute():
    assert vc.layout_fields(spec(d=4, ib=6), 64, 256) is None  # other codebook shapes: cuda_vq
    assert vc.layout_fields(spec(d=2, ib=6), 64, 256) is None
    assert vc.layout_fields(spec(group=64), 64, 256) is None  # group scales
    assert vc.layout_fields(spec(rows=30), 64, 256) is None  # row tiles that split a thread's 4 outputs
    f = vc.layout_fields(spec(rows=128), 256, 256)
    assert f is not None and vc.layout_ok(f, dict(threads=128, cs=2, tv=4))  # 4 x 32 outputs per block
    assert not vc.layout_ok(f, dict(threads=128, cs=2, tv=1))  # 512 outputs per block: 8 row tiles
    assert vc.layout_fields(spec(books=2), 64, 256) is None  # residual books
    assert vc.layout_fields(spec(), 66, 256) is None  # outputs not a multiple of 4
    assert vc.layout_fields(spec(), 64, 256) is not None
    if not torch.cuda.is_available():
        m = random_vq_layer(16, 64, spec(), bias=False, seed=2)
        assert not vc._supports(m, torch.randn(1, 64))  # no GPU: never chosen
    assert vc.takes(spec(), 4096, 4096)
    assert vc.layout_fields(spec(d=4, ib=8), 4096, 4096) is not None  # d4 runs (benchmarks, tests), but is not
    assert not vc.takes(spec(d=4, ib=8), 4096, 4096)  # dispatched: cuda_vq's split-K kernel serves it


def test_vq_cluster_source_waits_before_it_reads_x():
    """Under programmatic dependent launch the index and codeword loads go before the wait (volatile PTX), and
    everything the previous kernel wrote (x) is read after it."""
    src = vc.source(2, 2, 256, 4, 32, 8, 1, gd=1)
    body = src[src.index("vq_cluster_gemv("):]
    assert body.index("load_q<GD != 0>") < body.index("gdc_step();") < body.index("ldx(x, col)")
    assert body.index("ld_ordered(w, cbt") < body.index("gdc_step();")


@GPU
@pytest.mark.parametrize("d,out_f,in_f,rows", [(2, 1024, 4096, None), (2, 2048 + 64, 1000, None), (2, 512, 2048 + 7, None),
                                              (2, 1024 + 128, 1024, 128), (4, 1024, 4096, None), (4, 2048 + 64, 1002, None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_vq_cluster_matches_reference(d, out_f, in_f, rows, dtype):
    from leanq.kernels import select

    m = random_vq_layer(out_f, in_f, dspec(d, 64 if rows else 192, rows), bias=out_f == 1024,
                        seed=out_f + 7).to("cuda")
    x = torch.randn(1, in_f, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)
    ref = oracle(m, x)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-3)
    pk = vc.packed_vq_cl(m)
    bias = m.bias.to(dtype) if m.bias is not None else None
    cfgs = [c for c in CFGS if dtype == torch.bfloat16 or c is vc.DEFAULT_CFG]
    for cfg in cfgs:
        if not vc.layout_ok(pk, cfg):
            continue
        y1 = vc.run_vq_cluster(x, pk, bias, cfg)
        torch.testing.assert_close(y1.double().cpu(), ref, **tol)
        assert torch.equal(vc.run_vq_cluster(x, pk, bias, cfg), y1)  # no atomics: the same bits every launch
    # dispatch: d2 layers here; d4 layers stay with cuda_vq's split-K kernel (faster on every shape measured)
    assert select(m, x).name == ("cuda-vq-cluster-gemv" if d == 2 else "cuda-vq-lut-gemv")
    torch.testing.assert_close(m(x).double().cpu(), ref, **tol)


@GPU
@pytest.mark.parametrize("d,cfg", [(2, dict(vc.DEFAULT_CFG)), (2, dict(vc.DEFAULT_CFG, gd=2)), (4, dict(vc.DEFAULT_CFG)),
                                   (2, dict(threads=128, cs=4, tv=2, nr=192, gd=1)), (2, dict(threads=256, cs=8, gd=1))])
def test_vq_cluster_pdl_chain_in_a_cuda_graph_reads_each_input_after_it_is_written(d, cfg):
    """Programmatic dependent launch: in a captured chain of layers, every replay equals the chain launched without it,
    bit for bit, for a new input each time (the buffers still hold the last replay's values, so an early read
    would show)."""
    pks = [vc.packed_vq_cl(random_vq_layer(1536, 1536, dspec(d, 192), bias=False, seed=30 + i).to("cuda"))
           for i in range(2)]
    check_pdl_chain(lambda x, pk, c: vc.run_vq_cluster(x, pk, None, c), pks, cfg, dict(cfg, gd=0), exact=True)


@GPU
def test_vq_cluster_runs_under_torch_compile():
    """torch.compile takes the kernel whole as the custom op leanq::cuda_vq_cluster_linear (the same bits as eager)."""
    m = random_vq_layer(1024, 2048, spec(), bias=True, seed=9).to("cuda")
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    eager = m(x)  # builds the layout
    f = torch.compile(lambda t: m(t) * 2, fullgraph=True)
    assert torch.equal(f(x), eager * 2)
    assert vc._op is not None


def test_vq_cluster_falls_back_to_clusters_of_8_where_16_are_refused(monkeypatch):
    """Clusters of 16 blocks are a non-portable size: a GPU that refuses them (the driver's error at launch) gets
    clusters of 8 from then on, with the same layer and config otherwise; a refusal of 8 is raised."""
    calls = []

    class Refuses16:
        def allow_large_clusters(self):
            pass

        def __call__(self, grid, block, args, smem=0, pdl=False):
            calls.append(grid[0])
            if grid[0] > limit[0]:
                raise RuntimeError("cuda-vq-cluster: cuLaunchKernel failed with CUDA error 912")

    limit = [8]
    monkeypatch.setattr(vc, "_compiled", lambda *a: Refuses16())
    monkeypatch.setattr(vc, "device_index", lambda x: 0)
    monkeypatch.setattr(vc, "sm90", lambda d: True)
    monkeypatch.setattr(vc, "_SMALL_CLUSTERS", set())
    m = random_vq_layer(256, 1024, spec(), bias=False, seed=5)
    pk = vc.packed_vq_cl(m)
    x = torch.randn(1, 1024)
    vc.run_vq_cluster(x, pk, None)
    vc.run_vq_cluster(x, pk, None)
    assert calls == [16, 8, 8]  # refused once, then straight to 8
    limit[0] = 4
    with pytest.raises(RuntimeError):
        vc.run_vq_cluster(x, pk, None)


def test_vq_cuda_kernel_failure_falls_back_to_triton_and_says_so():
    """Where a vq CUDA kernel fails eagerly (NVRTC missing, a launch refused), the layer gets the Triton kernel's
    result, one warning, and the Triton kernel from then on (its id in the kernel's broken set)."""
    from leanq.kernels.cuda_vq import batch1_operands, run_op

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernel: on the GPU, else its interpreter
    m = random_vq_layer(16, 64, spec(), bias=True, seed=6).to(dev)
    x = torch.randn(1, 64, device=dev)

    def refused(*args):
        raise RuntimeError("cuda-vq-cluster: cuLaunchKernel failed with CUDA error 912")

    broken: set = set()
    x2, b = batch1_operands(m, x)
    with pytest.warns(UserWarning, match="cuda-vq-cluster-gemv unavailable"):
        y = run_op(m, x, (x2, None, None, None, b), refused, None, "cuda-vq-cluster-gemv", broken)
    assert broken == {id(m)}
    torch.testing.assert_close(y.double().cpu(), oracle(m, x), rtol=1e-4, atol=1e-4)
