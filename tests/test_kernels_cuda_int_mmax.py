"""The x kernel (kernels.cuda_int_mmax): its launch geometry on any machine, the kernel itself on a GPU."""

from __future__ import annotations

import pytest
import torch

from leanq.kernels import cuda_int as ci
from leanq.kernels import cuda_int_mmax as cx

from test_kernels_cuda_int import GPU, _gpu_case


@pytest.mark.parametrize("n,k,sms", [(4096, 4096, 132), (14336, 4096, 132), (4096, 14336, 132), (4096, 11008, 132),
                                     (11008, 4096, 132), (40, 256, 132), (16, 128, 8), (100000, 256, 4)])
@pytest.mark.parametrize("nw,sp", [(8, 2), (8, 1), (16, 1), (4, 2)])
def test_x_launch_covers_every_tile_and_step_within_a_wave(n, k, sms, nw, sp):
    """The grid holds every row tile once and every super-step once; with rb chosen, no more blocks than SMs
    where the row tiles allow it, and the fewest tiles per band that do."""
    c, (gx, gy) = cx.x_launch(16, n, k, dict(nw=nw, sp=sp), sms)
    tiles, ns = -(-n // 16), k // 128
    assert gx * c["rb"] >= tiles > (gx - 1) * c["rb"]  # every tile, no empty band
    assert gy * nw * sp >= ns > (gy - 1) * nw * sp     # every super-step, no empty K block
    if tiles * gy > sms and gy <= sms:
        assert gx * gy <= sms
        smaller = c["rb"] - 1
        assert smaller == 0 or -(-tiles // smaller) * gy > sms


def test_x_launch_refuses_configs_it_cannot_run():
    for bad in (dict(nw=3), dict(sp=5), dict(pf=0), dict(rb=-1), dict(nw=32), dict(rg=1), dict(rg=9),
                dict(rg=4, sp=2), dict(pb=2)):
        with pytest.raises(ValueError, match="cuda-int-mma-x"):
            cx.x_launch(16, 4096, 4096, bad, 132)
    c, grid = cx.x_launch(16, 4096, 4096, dict(rb=7), 132)
    assert c["rb"] == 7 and grid == (-(-256 // 7), 2)


def test_x_source_names_its_options():
    src = cx.source_x(2, 8, 2, 2, 2, 128, True, gd=1)
    for define in ("#define NW 8", "#define SP 2", "#define PF 2", "#define NT 2", "#define GD 1"):
        assert define in src
    assert "#define RG" not in src and "#define RG 4" in cx.source_x(2, 16, 1, 2, 2, 128, True, rg=4)
    assert src.index("gdc_wait();") < src.index("uint2 xv[SP][8][NT];")  # x read only after the previous grid
    with pytest.raises(AssertionError):
        cx.source_x(2, 16, 2, 2, 2, 128, True, rg=4)  # the ring holds one super-step a tile


@GPU
@pytest.mark.parametrize("group,n,k,m,sdtype", [(128, 96, 512, 16, torch.float16), (128, 333, 4224, 3, torch.bfloat16),
                                                (256, 40, 1024, 9, torch.float16), (128, 1000, 256, 8, torch.float16),
                                                (128, 17, 128, 2, torch.bfloat16), (128, 200, 2944, 16, torch.bfloat16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_mma_x_matches_reference(group, n, k, m, sdtype, dtype):
    """The x kernel on the GPU against the float32 reference: one K block (direct writes) and K split over blocks
    (slots + last-block sum), warps past K, bias, partial row tiles and batches; the same bytes on every launch,
    with and without programmatic dependent launch, and the arrival counters back at zero after each."""
    layer, pk, x, ref = _gpu_case(n, k, 4, group, m, dtype, sdtype, seed=5)
    assert cx.supports_x(pk, x)
    for cfg in (None, dict(nw=1, sp=1, pf=1, rb=1), dict(nw=2, sp=3, pf=2, rb=3), dict(nw=8, sp=1, pf=3),
                dict(nw=16, sp=1, pf=2, rb=2), dict(nw=4, sp=2, pf=1, gd=0), dict(nw=8, sp=2, pf=2, gd=2),
                dict(nw=4, sp=4, pf=1, rb=5), dict(nw=2, sp=1, pf=3, rb=3), dict(rg=4), dict(nw=4, sp=1, rg=2, rb=5),
                dict(nw=2, sp=1, rg=8, rb=3, gd=0), dict(nw=16, sp=1, rg=6, gd=2), dict(pb=1),
                dict(nw=2, sp=3, pf=2, pb=1, rb=3), dict(nw=4, sp=1, rg=4, pb=1, rb=5)):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        cx.run_int_mma_x(x, pk, layer.bias.to(dtype), cfg, out=out)
        assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, cfg
        again = cx.run_int_mma_x(x, pk, layer.bias.to(dtype), cfg)
        assert torch.equal(again, out), cfg  # deterministic
        assert torch.equal(again, cx.run_int_mma_x(x, pk, layer.bias.to(dtype), dict(cfg or {}, gd=0))), cfg
        if cfg and cfg.get("rg"):  # the same words through shared memory: the same products and sums
            assert torch.equal(again, cx.run_int_mma_x(x, pk, layer.bias.to(dtype), dict(cfg, rg=0))), cfg
        if cfg and cfg.get("pb"):  # the same rows, addressed by increments
            assert torch.equal(again, cx.run_int_mma_x(x, pk, layer.bias.to(dtype), dict(cfg, pb=0))), cfg
    from leanq.kernels import cuda_int_mma as cm

    for _, cnt in cm._WSCRATCH.values():
        assert int(cnt.abs().sum()) == 0


@GPU
def test_int_mma_x_agrees_with_the_w_kernel():
    """Both tensor-core kernels multiply the same exact (q - z) x products in fp32: their outputs agree closely."""
    from leanq.kernels import cuda_int_mma as cm

    layer, pk, x, ref = _gpu_case(256, 1024, 4, 128, 16, torch.bfloat16, torch.bfloat16, seed=9)
    a = cx.run_int_mma_x(x, pk, None)
    b = cm.run_int_mma_w(x, pk, None)
    assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    assert ci.packed_rk(layer) is not None


def test_x_kernel_is_chosen_only_on_the_gpu():
    pk = dict(N=4096, K=4096, bits=4, group=128)
    assert not cx.chosen(pk, torch.empty(16, 4096, dtype=torch.bfloat16))  # a CPU tensor: never
    assert (4096, 4096) in cx.X_SHAPES


@GPU
def test_layers_of_the_shape_table_take_the_x_kernel_at_batches_9_to_16(monkeypatch):
    """Batches 9-16 of a 4096 x 4096 4-bit layer on a 132-SM part go to the x kernel (its bytes, exactly), batch 8
    and LEANQ_MMA_X off to the w kernel; a CUDA graph of the layer replays the same bytes (its split's scratch
    reserved beforehand)."""
    from leanq.kernels import cuda_int_mma as cm

    if torch.cuda.get_device_properties(0).multi_processor_count != 132:
        pytest.skip("the shape table applies on 132-SM parts")
    layer, pk, x, ref = _gpu_case(4096, 4096, 4, 128, 16, torch.bfloat16, torch.bfloat16, seed=11)
    bias = layer.bias.to(torch.bfloat16)
    y = ci._run(x, pk, bias)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(y, cx.run_int_mma_x(x, pk, bias))
    assert torch.equal(ci._run(x[:8], pk, bias), cm.run_int_mma_w(x[:8], pk, bias))
    monkeypatch.setattr(cx, "X_ON", False)
    assert torch.equal(ci._run(x, pk, bias), cm.run_int_mma_w(x, pk, bias))
    monkeypatch.setattr(cx, "X_ON", True)
    cm.reserve_w(4096, 4096, x.device)
    graph, xs = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(graph):
        ys = ci._run(xs, pk, bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(ys, y)
