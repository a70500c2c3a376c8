"""The x kernel (kernels.cuda_int_mmax): its launch geometry on any machine, the kernel itself on a GPU."""

from __future__ import annotations

import pytest
import torch

from leanq.kernels import cuda_int as ci
from leanq.kernels import cuda_int_mmax as cx

from test_kernels_cuda_int import GPU, _gpu_case, _layer


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


def _x_out_index(i: int, lane: int, tile: int) -> tuple[int, int]:
    """The x kernel's (row, batch column) of value i of a lane's C fragments in row tile ``tile`` (its formula)."""
    return 16 * tile + (lane >> 2) + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (lane & 3) + (i & 1)


def _emulate_int_mma_x(x: torch.Tensor, pk: dict, nw: int, sp: int, rb: int, out_index=_x_out_index) -> torch.Tensor:
    """The x kernel's structure in float64 on the CPU: blocks (row band, K block), warps owning super-steps (past K:
    zero x), rows past N clamped, each warp's tile product placed in the mma C-fragment layout (value 4n + i' of lane
    (g, t): row g + 8 (i' // 2), batch column 8n + 2t + i' % 2), the warps' values added in warp order per output o =
    32 i + lane, the K blocks' slots added in slot order, and the outputs placed by ``out_index`` (the kernel's
    formula unless a test passes another). The products of one super-step are taken in natural input order: their
    order inside the super-step is the w kernel's (tile_wstep), checked by that kernel's emulation."""
    M, K, N, G = x.shape[0], pk["K"], pk["N"], pk["group"]
    w = ci.reference_rk(pk).double()  # (q - z) * scale, [N, K]
    nt = 1 if M <= 8 else 2
    ns, tiles = K // 128, -(-N // 16)
    ksl = nw * sp
    gx, gy = -(-tiles // rb), -(-ns // ksl)
    xd = x.double()
    part = torch.zeros(gy, tiles, 128 * nt, dtype=torch.float64)
    for by in range(gy):
        for bx in range(gx):
            for tile in range(bx * rb, min(bx * rb + rb, tiles)):
                rows = [min(16 * tile + r, N - 1) for r in range(16)]
                vals = torch.zeros(nw, 4 * nt, 32, dtype=torch.float64)
                for wp in range(nw):
                    c = torch.zeros(16, 8 * nt, dtype=torch.float64)
                    for s in range(sp):
                        step = by * ksl + wp * sp + s
                        if step >= ns:
                            continue  # zero x: nothing added
                        ks = slice(128 * step, 128 * step + 128)
                        xb = torch.stack([xd[min(b, M - 1), ks] for b in range(8 * nt)])
                        c += w[rows, ks] @ xb.t()
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        for n in range(nt):
                            for ii in range(4):
                                vals[wp, 4 * n + ii, lane] = c[g + 8 * (ii >> 1), 8 * n + 2 * t + (ii & 1)]
                y = torch.zeros(4 * nt, 32, dtype=torch.float64)
                for wp in range(nw):  # warp order
                    y += vals[wp]
                part[by, tile] = y.reshape(-1)
    out = torch.full((M, N), float("nan"), dtype=torch.float64)
    total = part.sum(0) if gy > 1 else part[0]
    for tile in range(tiles):
        for o in range(128 * nt):
            r, b = out_index(o >> 5, o & 31, tile)
            if r < N and b < M:
                out[b, r] = total[tile, o]
    return out


@pytest.mark.parametrize("n,k,m,cfg", [(40, 384, 16, (2, 1, 2)), (17, 256, 11, (1, 2, 1)), (33, 512, 5, (4, 1, 1)),
                                       (24, 384, 3, (1, 1, 2))])
def test_int_mma_x_structure_reproduces_the_product(n, k, m, cfg):
    """The x kernel's index formulas emulated on the CPU rebuild x @ W^T: K blocks and warps past K, partial row
    tiles, batches below 16; an output formula with row and batch halves swapped must fail the same check."""
    layer = _layer(n, k, 4, 128, seed=3)
    pk = ci.repack_rk(layer.qweight, layer.scales, layer.zeros, 4, False, k, 128)
    x = torch.randn(m, k).to(torch.bfloat16)
    ref = x.double() @ ci.reference_rk(pk).double().t()
    got = _emulate_int_mma_x(x, pk, *cfg)
    assert not got.isnan().any() and ((got - ref).norm() / ref.norm()).item() < 1e-9

    def swapped(i, lane, tile):  # row half from bit 0, batch column's low bit from bit 1: a plausible slip
        return 16 * tile + (lane >> 2) + 8 * (i & 1), 8 * (i >> 2) + 2 * (lane & 3) + ((i >> 1) & 1)

    bad = _emulate_int_mma_x(x, pk, *cfg, out_index=swapped)
    assert bad.isnan().any() or ((bad - ref).norm() / ref.norm()).item() > 1e-2
    # the emulated formula is the kernel's, in both places it places outputs (a tile's sum and the split's)
    formula = "+ (l >> 2) + 8 * ((i >> 1) & 1), b = 8 * (i >> 2) + 2 * (l & 3) + (i & 1);"
    assert cx._SRC_X.count(formula) == 2


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
