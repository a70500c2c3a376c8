"""The wgmma kernel for batches of 64 and more (kernels.cuda_int_wgmma): Hopper GPUs only (sm_90a)."""

from __future__ import annotations

import pytest
import torch

from leanq.kernels import cuda_int as ci

from test_kernels_cuda_int import _gpu_case, _layer, check_pdl_chain

HOPPER = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="wgmma needs a Hopper GPU (sm_90a)")


@HOPPER
@pytest.mark.parametrize("n,k,m,group,sdtype", [(128, 64, 64, 64, torch.float16), (200, 512, 64, 128, torch.bfloat16),
                                                 (96, 1024, 300, 128, torch.float16), (384, 2048, 256, 256, torch.bfloat16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_wgmma_matches_reference(n, k, m, group, sdtype, dtype):
    """Against the float32 reference: partial row and batch tiles, bias, both scale formats, one stage and many,
    K split over blocks (deterministic: the same bytes every launch, counters back at zero), and the warp-specialized
    form (ws: 2 or 4 producer warps, mbarriers)."""
    from leanq.kernels import cuda_int_wgmma as cw

    layer, pk, x, ref = _gpu_case(n, k, 4, group, m, dtype, sdtype, seed=7)
    assert cw.supports(pk, x)
    for cfg in (None, dict(wg=2, bm=128, nst=4, split=1), dict(wg=1, bm=64, nst=3, split=3),
                dict(wg=2, bm=256, nst=2, split=2), dict(wg=1, bm=128, nst=4, split=1),
                dict(wg=2, bm=128, nst=4, split=2, ws=4), dict(wg=3, bm=64, nst=3, split=1, ws=2),
                dict(wg=2, bm=256, nst=4, split=2, ws=4), dict(wg=2, bm=256, nst=5, split=0, ws=4),
                dict(wg=2, bm=128, nst=6, split=4, ws=4), dict(wg=2, bm=256, nst=4, split=1, ws=4, sk=1),
                dict(wg=2, bm=128, nst=6, split=1, ws=4, sk=1), dict(wg=3, bm=128, nst=3, split=1, ws=4, sk=1),
                dict(wg=2, bm=256, nst=4, split=2, ws=4, gd=1), dict(wg=2, bm=128, nst=6, split=1, ws=4, sk=1, gd=1)):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        cw.run_int_wgmma(x, pk, layer.bias.to(dtype), cfg, out=out)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all() and err < 1e-2, (cfg, err)
        assert torch.equal(cw.run_int_wgmma(x, pk, layer.bias.to(dtype), cfg),
                           cw.run_int_wgmma(x, pk, layer.bias.to(dtype), cfg)), cfg
    for _, cnt in cw._SCRATCH.values():
        assert int(cnt.abs().sum()) == 0


def test_int_wgmma_pdl_wait_precedes_every_read_of_x_and_the_ticket():
    """With ``gd`` (warp-specialized forms): the producers' first weight copies may go out before
    griddepcontrol.wait, x's copies only after it; the consumers wait too; stream-K waits before it takes its ticket
    (the counter the grid before resets); the early trigger sits under ``#if GD == 1``; the barrier form (ws 0) has
    no GD."""
    from leanq.kernels import cuda_int_wgmma as cw

    for gd in (1, 2):
        src = cw.source(2, True, 2, 256, 4, 1, 1, 4, 0, 0, 1, gd)
        assert f"#define GD {gd}\n" in src
        body = src[src.index("int_wgmma("):]
        prod = body[body.index("if (warp >= 4 * WG)"):body.index("} else {", body.index("if (warp >= 4 * WG)"))]
        pre = prod[prod.index("#if GD && !SK"):]
        assert pre.index("W_ISSUE(it, it, 8 * it,") < pre.index("gdc_wait();") < pre.index("cp16(xs0")
        cons = body[body.index("} else {", body.index("if (warp >= 4 * WG)")):]
        assert cons.index("gdc_wait();") < cons.index("mbar_wait(")
        sk = body[body.index("#if SK"):body.index("atomicAdd(cnt + gridDim.x")]
        assert "gdc_wait();" in sk
        for part in (prod, sk):
            lines = [ln.strip() for ln in part.splitlines()]
            i = next(j for j, ln in enumerate(lines) if ln.startswith("gdc_launch();"))
            assert lines[i - 1] == "#if GD == 1" and lines[i + 1] == "#endif"
    assert "#define GD 0\n" in cw.source(2, True, 2, 64, 4, 1, 2, 0, 0, 0, 0, 1)


@HOPPER
@pytest.mark.parametrize("cfg", [dict(wg=2, bm=256, nst=4, split=2, ws=4), dict(wg=2, bm=128, nst=6, split=4, ws=4),
                                 dict(wg=2, bm=256, nst=4, split=1, ws=4, sk=1)])
@pytest.mark.parametrize("gd", [1, 2])
def test_int_wgmma_pdl_chain_in_a_cuda_graph_reads_each_input_after_it_is_written(cfg, gd):
    """Programmatic dependent launch of the warp-specialized forms (K split over blocks with its slots and counters;
    stream-K with its ticket counter): in a captured chain where each layer reads what the kernel before it wrote,
    every replay gives the bytes of the chain launched without it, for a new input each time."""
    from leanq.kernels import cuda_int_wgmma as cw

    pks = [ci.packed_rk(_layer(2048, 2048, 4, 128, device="cuda", seed=i)) for i in range(2)]
    x0 = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    check_pdl_chain(lambda x, pk, c: cw.run_int_wgmma(x, pk, None, c), pks, x0, cfg, gd)
    for _, cnt in cw._SCRATCH.values():
        assert int(cnt.abs().sum()) == 0


@HOPPER
@pytest.mark.parametrize("n,k,m", [(4096, 4096, 256), (1000, 4096, 256), (11008, 1024, 200), (256, 256, 512)])
def test_int_wgmma_stream_k_matches_reference(n, k, m):
    """Stream-K (``sk``) at shapes whose tiles span one block or many (4096 x 4096: about four blocks a tile;
    256 x 256 at 512 rows: one stage a block), against the reference and the same bytes every launch; and with
    three times as many blocks as SMs, so that most wait their turn to start (the waits must still end)."""
    from leanq.kernels import cuda_int_wgmma as cw

    layer, pk, x, ref = _gpu_case(n, k, 4, 128, m, torch.bfloat16, torch.bfloat16, seed=11)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for cfg in (dict(wg=2, bm=256, nst=4, split=1, ws=4, sk=1), dict(wg=2, bm=128, nst=6, split=1, ws=4, sk=1),
                dict(wg=2, bm=256, nst=4, split=1, ws=4, sk=1, blocks=3 * sms)):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        cw.run_int_wgmma(x, pk, layer.bias.to(torch.bfloat16), cfg, out=out)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all() and err < 1e-2, (cfg, err)
        assert torch.equal(out, cw.run_int_wgmma(x, pk, layer.bias.to(torch.bfloat16), cfg)), cfg
    for _, cnt in cw._SCRATCH.values():
        assert int(cnt.abs().sum()) == 0


@pytest.mark.parametrize("tiles,stages,blocks", [(32, 64, 132), (112, 64, 132), (86, 64, 132), (3, 5, 15), (7, 3, 4),
                                                 (1, 1, 1), (2, 8, 16), (5, 64, 5)])
def test_int_wgmma_stream_k_schedule(tiles, stages, blocks):
    """On any machine, the stream-K schedule: every (tile, stage) unit exactly once; only a block's first segment
    lacks its tile's last stage (one partial slot per block); a tile's last stages, when not the whole tile, are its
    block's last segment, and that block adds exactly the partials of the tile's other segments, lower tickets
    only, in the order of k (so no block waits for a higher ticket: the waits end whatever the residency)."""
    from leanq.kernels import cuda_int_wgmma as cw

    segs = cw.sk_segments(tiles, stages, blocks)
    seen = [[0] * stages for _ in range(tiles)]
    written, read = set(), []
    for b, mine in enumerate(segs):
        assert mine, b
        for i, (tile, kt0, nk) in enumerate(mine):
            for kt in range(kt0, kt0 + nk):
                seen[tile][kt] += 1
            if kt0 + nk < stages:
                assert i == 0
                written.add(b)
            elif kt0 > 0:
                assert i == len(mine) - 1
                others = cw.sk_partials(tiles, stages, blocks, b, tile)
                assert others == sorted(others) and all(o < b for o in others)
                assert all(segs[o][0][0] == tile for o in others)
                assert [segs[o][0][1] for o in others] == sorted(segs[o][0][1] for o in others)
                assert max(segs[o][0][1] + segs[o][0][2] for o in others) == kt0
                assert sum(segs[o][0][2] for o in others) + nk == stages
                read += others
    assert all(c == 1 for row in seen for c in row)
    assert sorted(read) == sorted(written)


def _emulate_a_fragments(pk: dict, n0: int, kt: int, wg: int) -> torch.Tensor:
    """The weights [64 WG, 64] of block rows n0.. and stage kt as the wgmma kernel's lanes hand them to the tensor
    cores: lane (g, t) of warp w decodes code pair (4t, 16 + 4t) of words 2j, 2j + 1 of rows 16w + g and 16w + g + 8
    (the kernel's decode_stage), placed where the m64k16 A fragment puts its registers (a0: row g, inputs 2t, 2t + 1;
    a1: row g + 8; a2: row g, inputs 2t + 8, 2t + 9; a3: row g + 8)."""
    words = pk["words"].to(torch.int64) & 0xFFFFFFFF
    sz = pk["sz"].to(torch.int64) & 0xFFFFFFFF
    gsh = (pk["group"] // 64).bit_length() - 1
    w = torch.full((64 * wg, 64), float("nan"))
    for warp in range(4 * wg):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for half, r in ((0, warp * 16 + g), (1, warp * 16 + g + 8)):
                n = min(n0 + r, pk["N"] - 1)
                szw = int(sz[n, kt >> gsh])
                s = (torch.tensor([szw >> 16], dtype=torch.int32) << 16).view(torch.float32).item() if pk["sbf16"] \
                    else torch.tensor([szw >> 16], dtype=torch.int16).view(torch.float16).float().item()
                z = szw & 0xFFFF
                for j in range(4):
                    for reg, word in ((0, 2 * j), (2, 2 * j + 1)):
                        v = int(words[n, kt * 8 + word]) >> (4 * t)
                        lo, hi = v & 0xF, (v >> 16) & 0xF
                        k = 16 * j + 2 * t + (8 if reg == 2 else 0)
                        w[r, k], w[r, k + 1] = (lo - z) * s, (hi - z) * s
    return w


@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16])
def test_int_wgmma_a_fragments_hold_the_weights(sdtype):
    """On any machine: the lanes' decode of each stage places every weight of the block where the A fragment's
    layout says it is (a wrong shift, word or row pairing fails)."""
    layer = _layer(200, 256, 4, 128, sdtype=sdtype, seed=3)
    pk = ci.packed_rk(layer)
    ref = ci.reference_rk(pk)
    for n0, kt, wg in ((0, 0, 2), (128, 3, 2), (0, 2, 3)):
        emu = _emulate_a_fragments(pk, n0, kt, wg)
        rows = min(64 * wg, 200 - n0)
        assert torch.equal(emu[:rows], ref[n0:n0 + rows, 64 * kt:64 * kt + 64]), (n0, kt, wg)


def test_int_wgmma_config_covers_the_shapes():
    """The launch choice for many shapes: a valid block (2-4 warpgroups, shared memory within a Hopper's 227 KB),
    splits that leave every block at least 8 stages, and the Llama shapes' picks that the sweeps favoured."""
    from leanq.kernels import cuda_int_wgmma as cw

    for n in (64, 576, 1536, 4096, 11008, 14336, 28672):
        for k in (64, 576, 4096, 11008, 14336):
            for m in (64, 100, 256, 1024):
                c = cw.config(m, n, k, 132)
                assert c["wg"] in (2, 3, 4) and c["bm"] in (64, 128, 256) and c["split"] >= 1
                assert c["bm"] == 64 if m <= 64 else c["bm"] in (128, 256) and c["ws"] == 4
                assert c["bm"] < 256 or (m > 128 and c["wg"] == 2)
                assert c["split"] == 1 or k // 64 >= 8 * c["split"]
                assert cw.smem_bytes(c["wg"], c["bm"], c["nst"]) * (c["minb"]) <= 227 * 1024
    assert cw.config(256, 4096, 4096, 132)["split"] == 2 and cw.config(256, 4096, 4096, 132)["wg"] == 2
    # stream-K where 86 tiles of two warpgroups fill two thirds of 132 SMs; not at 112 tiles or 32
    assert cw.config(256, 11008, 4096, 132) == dict(cw.DEFAULT, split=1, sk=1, **cw.WS256)
    assert cw.config(128, 11008, 4096, 132) == dict(cw.DEFAULT, split=1, sk=1, **dict(cw.WS_DEFAULT, wg=2, bm=128))
    assert cw.config(512, 11008, 4096, 132)["wg"] == 3 and not cw.config(512, 11008, 4096, 132).get("sk")
    assert not any(cw.config(m, n, k, 132).get("sk") for m in (128, 256) for n, k in
                   ((4096, 4096), (4096, 11008), (14336, 4096), (4096, 14336)))
    # above 128 rows the 256-row block where the estimate favours it: the faster form on each of these in the H200 run
    assert cw.config(256, 14336, 4096, 132) == dict(cw.DEFAULT, split=1, **cw.WS256)
    assert cw.config(256, 4096, 11008, 132) == dict(cw.DEFAULT, split=4, **cw.WS256)
    assert cw.config(128, 14336, 4096, 132) == dict(cw.DEFAULT, split=1, wg=2, bm=128, **cw.WS_DEFAULT)
    assert cw.config(64, 14336, 4096, 132) == dict(cw.DEFAULT, split=1, wg=2, bm=64, minb=2)  # 64 rows: no ws


def test_int_wgmma_declines_what_it_does_not_compute():
    from leanq.kernels import cuda_int_wgmma as cw

    pk4 = ci.packed_rk(_layer(64, 256, 4, 128))
    pk2 = ci.packed_rk(_layer(64, 256, 2, 128))
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    assert not cw.supports(pk4, x)  # not on a GPU
    if torch.cuda.is_available():
        xc = x.cuda()
        assert not cw.supports({**pk2, "words": pk2["words"].cuda()}, xc)  # 2-bit
        assert not cw.supports(pk4, xc[:32])  # below MIN_M rows
        assert not cw.supports(pk4, xc.float())  # fp32 activations


class _Barrier:
    """An mbarrier as the ws kernel uses it: ``count`` arrivals complete a phase; a wait on parity P passes once the
    latest phase of that parity is complete (phase index ``done`` is in progress: parity ``done & 1`` is not)."""

    def __init__(self, count: int):
        self.count, self.pending, self.done = count, count, 0

    def arrive(self, n: int = 1) -> None:
        self.pending -= n
        assert self.pending >= 0
        if self.pending == 0:
            self.done, self.pending = self.done + 1, self.count

    def passes(self, parity: int) -> bool:
        return (self.done & 1) != parity


@pytest.mark.parametrize("nst,nk,warps,pw", [(4, 1, 8, 4), (4, 11, 8, 4), (3, 7, 12, 2), (6, 20, 8, 4), (6, 20, 12, 4),
                                            (4, 4, 4, 2), (4, (3, 5, 1), 8, 4), (4, (1, 1, 1, 2), 8, 4),
                                            (6, (7, 13), 12, 4), (3, (2, 4, 6, 1), 8, 2)])
def test_int_wgmma_ws_stage_protocol(nst, nk, warps, pw):
    """The ws kernel's producer/consumer schedule (its stage, parity and release formulas), run under random
    interleavings of the ``pw`` producer warps (each copies its share of a stage) and each consumer warp: every stage
    a consumer decodes or multiplies holds all of that iteration's copies until the consumer releases it, and nothing
    deadlocks. A tuple ``nk`` is stream-K's segments: the stage count runs on across them (``gi``), and each
    segment's last stage is released after its products, before the next segment's first decode."""
    import random

    segs = nk if isinstance(nk, tuple) else (nk,)
    sk = isinstance(nk, tuple)

    for seed in range(30):
        rng = random.Random(seed)
        full = [_Barrier(32 * pw) for _ in range(nst)]
        empty = [_Barrier(warps) for _ in range(nst)]
        parts = [[None] * pw for _ in range(nst)]  # each producer warp's share of a stage's copies

        class _Buf:
            def __getitem__(self, s):
                return parts[s][0] if len(set(parts[s])) == 1 else ("torn", tuple(parts[s]))

        buf = _Buf()

        def producer(p):
            gi = 0
            for nks in segs:
                for it in range(gi, gi + nks):
                    s = it % nst
                    if it >= nst:
                        while not empty[s].passes(((it // nst) & 1) ^ 1):
                            yield
                    parts[s][p] = it                 # this warp's copies land
                    yield
                    full[s].arrive(32)               # cp.async.mbarrier.arrive.noinc, 32 lanes
                    yield
                gi += nks

        def consumer():
            gi = 0
            for nks in segs:
                if nks > 0:
                    while not full[gi % nst].passes((gi // nst) & 1):
                        yield
                    assert buf[gi % nst] == gi       # decode of the segment's first stage
                for it in range(gi, gi + nks):
                    assert buf[it % nst] == it       # the wgmmas of stage it read its x
                    yield
                    assert buf[it % nst] == it       # ... until they are waited for (wg_wait<1> next iteration)
                    if it >= gi + 1:
                        assert buf[(it - 1) % nst] == it - 1
                        empty[(it - 1) % nst].arrive()
                    if it + 1 < gi + nks:
                        s1 = (it + 1) % nst
                        while not full[s1].passes(((it + 1) // nst) & 1):
                            yield
                        assert buf[s1] == it + 1     # decode of stage it + 1
                    yield
                if sk and nks > 0:                   # wg_wait<0>, then the segment's last stage is free
                    assert buf[(gi + nks - 1) % nst] == gi + nks - 1
                    empty[(gi + nks - 1) % nst].arrive()
                gi += nks

        live = [producer(p) for p in range(pw)] + [consumer() for _ in range(warps)]
        steps = 0
        while live:  # waits spin by yielding: a deadlock shows as a run past the step bound
            a = rng.choice(live)
            try:
                next(a)
            except StopIteration:
                live.remove(a)
            steps += 1
            assert steps < 200 * (sum(segs) + 2) * (warps + 1), "deadlock"
