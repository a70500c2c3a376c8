"""The CUDA C++ integer GEMV (kernels.cuda_int): its layout on any machine, the kernel itself on a GPU."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from leanq.config import QuantSpec
from leanq.formats.intq import IntWeight
from leanq.formats.packing import pack
from leanq.kernels import cuda_int as ci
from leanq.modules import QuantLinear

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU (NVRTC)")


def _layer(n, k, bits, group, sym=False, sdtype=torch.float16, bias=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, group_size=group, sym=sym)
    ng = -(-k // group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    # float32 scales that fp16 holds exactly (the layout keeps 16-bit scales; others are refused, tested below)
    scales = (torch.rand(n, ng, generator=g) * 0.018 + 0.002).half().to(sdtype)
    zeros = (torch.zeros(n, 0, dtype=torch.uint8) if sym
             else pack(torch.randint(0, 1 << bits, (n, ng), generator=g, dtype=torch.uint8), bits))
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_int_weight(IntWeight(pack(codes, bits), scales, zeros, spec, k), b).to(device)


def _gpu_case(n, k, bits, group, m, dtype, sdtype=torch.float16, seed=0):
    """A biased layer on the GPU, its rk pack, activations [m, k] of ``dtype`` with an outlier of 3000, and the
    float32 reference output: (layer, pk, x, ref)."""
    layer = _layer(n, k, bits, group, sdtype=sdtype, bias=True, device="cuda", seed=seed)
    pk = ci.packed_rk(layer)
    x = torch.randn(m, k, device="cuda").to(dtype)
    x[0, k // 2] = 3000.0
    return layer, pk, x, x.float() @ ci.reference_rk(pk).t() + layer.bias.float()


CASES = [(4, 128, False, torch.float16, 96, 512), (4, 32, True, torch.bfloat16, 33, 160),
         (2, 128, False, torch.bfloat16, 64, 384), (2, 64, True, torch.float16, 17, 200),
         (8, 128, False, torch.float16, 40, 256), (8, 16, False, torch.float32, 9, 48),
         (4, 64, False, torch.float32, 24, 200), (3, 128, False, torch.float16, 96, 512),
         (3, 64, True, torch.bfloat16, 17, 200), (3, 64, False, torch.float32, 24, 4160)]


@pytest.mark.parametrize("bits,group,sym,sdtype,n,k", CASES)
def test_rk_layout_decodes_to_the_stored_weight(bits, group, sym, sdtype, n, k):
    m = _layer(n, k, bits, group, sym, sdtype)
    pk = ci.repack_rk(m.qweight, m.scales, m.zeros, bits, sym, k, group)
    assert pk["words"].shape == (n, ci.words_per_row(bits, pk["KU"])) and pk["KU"] * ci.codes_per_chunk(bits) >= k
    assert torch.equal(ci.reference_rk(pk), m.int_weight().dequantize(torch.float32))


def _f16_bits(v: int) -> float:
    """The fp16 number with bit pattern v (16 bits)."""
    return torch.tensor([v], dtype=torch.int32).to(torch.int16).view(torch.float16).item()


@pytest.mark.parametrize("k,seed", [(128, 0), (4160, 1)])
def test_rk3_fields_decode_to_the_codes_as_the_kernel_reads_them(k, seed):
    """The 3-bit GEMV's field decode, step by step as int_gemv does it: per chunk six words (four from the row's
    first plane, two from its second); field f of a word masked at 0x00070007 << p, from the word itself for f < 3
    (p = 3f) or the word >> 9 (p = 3 (f - 3)); pairs 30 and 31 from words 3j .. 3j + 2 as ((w >> 15) & 0x00010001) |
    ((w' >> 14) & 0x00020002) | ((w'' >> 13) & 0x00040004), p = 0. Every result's fp16 halves are the subnormals
    code * 2**(p - 24) of the pair the staged activations expect (codes 2 pair, 2 pair + 1 of the chunk)."""
    m = _layer(5, k, 3, 64, seed=seed)
    pk = ci.repack_rk(m.qweight, m.scales, m.zeros, 3, False, k, 64)
    ku = pk["KU"]
    codes = torch.nn.functional.pad(m.int_weight().codes().to(torch.int64), (0, ku * 64 - k))
    w = pk["words"].to(torch.int64) & 0xFFFFFFFF
    for row in range(5):
        for c in list(range(ku))[:3] + [ku - 1]:
            w6 = [int(w[row, 4 * c + i]) for i in range(4)] + [int(w[row, 4 * ku + 2 * c + j]) for j in range(2)]
            fields = []
            for wi in range(6):
                for f in range(5):
                    p = 3 * f if f < 3 else 3 * (f - 3)
                    fields.append(((w6[wi] if f < 3 else w6[wi] >> 9) & (0x00070007 << p), p))
            for j in range(2):
                a, b, d = w6[3 * j: 3 * j + 3]
                fields.append((((a >> 15) & 0x00010001) | ((b >> 14) & 0x00020002) | ((d >> 13) & 0x00040004), 0))
            for pair, (v, p) in enumerate(fields):
                for half in range(2):
                    want = int(codes[row, 64 * c + 2 * pair + half]) * 2.0 ** (p - 24)
                    assert _f16_bits((v >> (16 * half)) & 0xFFFF) == want, (row, c, pair, half)


def test_rk_groups_and_scales_it_cannot_hold_are_refused():
    assert ci.group_ok(128, 4) and ci.group_ok(32, 4) and not ci.group_ok(32, 2) and not ci.group_ok(96, 4)
    m = _layer(8, 128, 2, 32)  # 2-bit chunks hold 64 codes: a 32-code group does not fit
    with pytest.raises(ValueError, match="group 32"):
        ci.repack_rk(m.qweight, m.scales, m.zeros, 2, False, 128, 32)
    m = _layer(8, 128, 4, 128, sdtype=torch.float32)
    m.scales = m.scales + 1e-9  # float32 values neither fp16 nor bf16 holds
    with pytest.raises(ValueError, match="float32 scales"):
        ci.repack_rk(m.qweight, m.scales, m.zeros, 4, False, 128, 128)


def test_cuda_int_declines_what_it_does_not_compute():
    x = torch.empty(1, 128, device="meta", dtype=torch.bfloat16)
    m3 = _layer(8, 128, 3, 32)
    assert not ci._ok(m3)  # 3-bit chunks hold 64 codes: a 32-code group does not fit
    m = _layer(8, 128, 4, 128)
    m.in_scale = torch.ones(128)  # AWQ's input scaling
    assert not ci._ok(m)
    m = _layer(8, 128, 4, 128)
    if not ci.available():  # CPU-only: the dispatch entry never claims a layer
        assert not ci._supports(m, x)


# the per-warp form (int_gemv) and the streaming form (int_gemv_stream: bulk copies, sm_90; elsewhere it falls back)
FORMS = {"rows": None, "stream": dict(mode="stream", threads=256, st=3, u=1),
         "xfirst": dict(threads=512, r=1, u=2, pf=1, xf=1), "pdl": dict(threads=512, r=1, u=2, pf=1, gd=1)}


@GPU
@pytest.mark.parametrize("bits,group,sym,sdtype,n,k", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("form", list(FORMS))
def test_cuda_int_matches_reference(bits, group, sym, sdtype, n, k, dtype, form):
    m = _layer(n, k, bits, group, sym, sdtype, bias=True, device="cuda")
    pk = ci.packed_rk(m)
    w = ci.reference_rk(pk)
    for trial in range(3):  # fresh inputs each time; the last with an outlier that plain fp16 sums would overflow
        x = torch.randn(1, k, device="cuda").to(dtype)
        if trial == 2:
            x[0, k // 2] = 3000.0
        out = torch.full((1, n), float("nan"), device="cuda", dtype=dtype)
        ci.run_int_cuda(x, pk, m.bias.to(dtype), FORMS[form], out=out)
        ref = x.float() @ w.t() + m.bias.float()
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@GPU
@pytest.mark.parametrize("cfg", [dict(threads=128, r=1, u=2, pf=0, bps=2), dict(threads=256, r=4, u=2, pf=1, bps=8),
                                 dict(threads=64, r=3, u=1, pf=1, bps=1), dict(mode="stream", threads=256, st=4, u=2),
                                 dict(mode="stream", threads=128, st=2, u=1, bps=1),
                                 dict(mode="stream", threads=64, st=6, u=3), dict(threads=256, r=2, u=1, pf=1, sp=2),
                                 dict(mode="stream", threads=256, st=5, u=2, bps=2, gd=3, xs=1),
                                 dict(mode="stream", threads=128, st=3, u=1, gd=1),
                                 dict(threads=128, r=1, u=2, pf=0, sp=2, bps=1), dict(threads=64, r=3, u=1, pf=0, xf=1),
                                 dict(threads=256, r=2, u=2, pf=1, sp=2, xf=1, sb=1),
                                 dict(threads=64, r=3, u=1, pf=0, gd=1), dict(threads=256, r=2, u=2, pf=1, sp=2, gd=2),
                                 dict(threads=256, r=2, u=1, pf=1, sp=2, gd=1)])
@pytest.mark.parametrize("bits", [4, 3, 2, 8])
def test_cuda_int_configs_agree(cfg, bits):
    """Every launch config computes the same function (rows and chunks that do not divide evenly included)."""
    m = _layer(333, 4160, bits, 128, device="cuda")
    pk = ci.packed_rk(m)
    x = torch.randn(1, 4160, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ ci.reference_rk(pk).t()
    out = ci.run_int_cuda(x, pk, None, cfg)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@GPU
@pytest.mark.parametrize("bits", [4, 3, 2, 8])
@pytest.mark.parametrize("n,k,offset", [(333, 4160, 0), (4096, 11008, 0), (333, 1000, 1), (9000, 256, 0)])
def test_cuda_int_l2_prefetch_gives_the_same_bytes(bits, n, k, offset):
    """Launch option ``xp`` (the rest of the warp's first row group requested into the L2 after x's first staging
    loads) only moves when bytes arrive: every output is the same to the bit as without it, with a bias, element
    loads (``offset``), rows of one and of several row groups a warp, each PDL mode, and each prologue."""
    m = _layer(n, k, bits, 128, bias=True, device="cuda")
    pk = ci.packed_rk(m)
    buf = torch.randn(1, 2 * k + offset, device="cuda").to(torch.bfloat16)
    x = buf[:, offset:offset + k]
    b = m.bias.to(x.dtype)
    for gd in (1, 2):
        cfg = dict(ci._cfg(bits), gd=gd, xp=0)
        old = ci.run_int_cuda(x, pk, b, cfg)
        for xp in (1, 2, 5):
            assert torch.equal(ci.run_int_cuda(x, pk, b, dict(cfg, xp=xp)), old), (gd, xp)
    ref = x.float() @ ci.reference_rk(pk).t() + m.bias.float()
    assert ((old.float() - ref).norm() / ref.norm()).item() < 1e-2
    g = torch.randn(k, device="cuda").to(x.dtype)
    x2 = buf[:, offset:offset + 2 * k].contiguous()
    for pro, xin, aux in ((1, x, g), (2, x2, None)):
        old = ci.run_int_cuda(xin, pk, None, dict(ci._cfg(bits), xp=0), pro=pro, aux=aux, eps=1e-5)
        new = ci.run_int_cuda(xin, pk, None, dict(ci._cfg(bits), xp=2), pro=pro, aux=aux, eps=1e-5)
        assert torch.equal(old, new), pro


@GPU
@pytest.mark.parametrize("bits", [4, 3, 2, 8])
@pytest.mark.parametrize("n,k,group", [(333, 4160, 128), (4096, 11008, 128), (9000, 256, 128), (100, 4096, 64),
                                       (64, 8192, 2048), (257, 1000, 128)])
def test_cuda_int_lean_tile_loop_gives_the_same_bytes(bits, n, k, group):
    """Launch option ``lt`` (unpredicated loads for whole tiles) loads the same words and adds the same products in
    the same order: every output is the same to the bit as without it, with a bias, rows that do not fill the last
    row group, K that leaves a last partial tile, one and several tiles a row, groups of more than 32 chunks (the
    predicated loads), each PDL mode with and without ``xp``, geometries of one and several rows and chunks a lane,
    and each prologue."""
    if not ci.group_ok(group, bits):
        pytest.skip("group not in the rk layout for these bits")
    m = _layer(n, k, bits, group, bias=True, device="cuda")
    pk = ci.packed_rk(m)
    x = torch.randn(1, 2 * k, device="cuda").to(torch.bfloat16)[:, :k]
    b = m.bias.to(x.dtype)
    cfgs = [dict(ci._cfg(bits), gd=gd, xp=xp) for gd in (0, 1, 2) for xp in ((0, 2) if gd else (0,))]
    cfgs += [dict(threads=256, r=1, u=2, pf=1, xf=1, gd=1, xs=1), dict(threads=128, r=3, u=1, pf=1, xs=1),
             dict(threads=512, r=2, u=4, pf=1, xf=1, gd=1, xs=0)]
    for cfg in cfgs:
        old = ci.run_int_cuda(x, pk, b, dict(cfg, lt=0))
        assert torch.equal(ci.run_int_cuda(x, pk, b, dict(cfg, lt=1)), old), cfg
    ref = x.float() @ ci.reference_rk(pk).t() + m.bias.float()
    assert ((old.float() - ref).norm() / ref.norm()).item() < 1e-2
    g = torch.randn(k, device="cuda").to(x.dtype)
    x2 = torch.randn(1, 2 * k, device="cuda").to(x.dtype)
    for pro, xin, aux in ((1, x.contiguous(), g), (2, x2, None)):
        old = ci.run_int_cuda(xin, pk, None, dict(ci._cfg(bits), lt=0), pro=pro, aux=aux, eps=1e-5)
        new = ci.run_int_cuda(xin, pk, None, dict(ci._cfg(bits), lt=1), pro=pro, aux=aux, eps=1e-5)
        assert torch.equal(old, new), pro


def test_lean_loads_group_index_holds_where_the_kernel_uses_it():
    """The lean loads (launch option ``lt``) take chunk c0 + lane + 32 u's group word at ((c0 + lane) >> GCS) +
    ((32 u) >> GCS), c0 a multiple of 32: the general index (c >> GCS) for every GCS up to 5, which is the bound
    the kernel tests before it takes that path; from 6 on the split index is wrong, so the bound cannot be raised."""
    src = ci.source(4, 2, 512, 2, 4, 1, False, gd=1, xs=1, lt=1)
    assert "GCS <= 5" in src and "((32 * u) >> GCS)" in src and "((c0 + lane) >> GCS)" in src

    def wrong(gcs):
        return sum((c0 + lane + 32 * u) >> gcs != ((c0 + lane) >> gcs) + ((32 * u) >> gcs)
                   for c0 in range(0, 2048, 32) for lane in range(32) for u in range(8))
    assert all(wrong(g) == 0 for g in range(6))
    assert wrong(6) > 0 and wrong(7) > 0


@GPU
@pytest.mark.parametrize("bits", [4, 3, 2, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k,offset", [(4160, 0), (4100, 0), (1000, 1), (200, 0)])
def test_cuda_int_xs_staging_gives_the_same_bytes(bits, dtype, k, offset):
    """Launch option ``xs`` (the staging's per-thread constants computed once, full-mask shuffles) stages the same
    activations as before, so every output is the same to the bit: 16-byte loads (K % 8 == 0), element loads (K % 8
    != 0, or x not 16-byte aligned: ``offset``), a last partial warp of chunks, both PDL modes."""
    m = _layer(333, k, bits, 128, device="cuda")
    pk = ci.packed_rk(m)
    buf = torch.randn(1, k + offset, device="cuda").to(dtype)
    x = buf[:, offset:]
    assert x.is_contiguous() and (x.data_ptr() % 16 != 0) == bool(offset)
    for cfg in (dict(threads=512, r=2, u=2, pf=1, xf=1, gd=1), dict(threads=256, r=1, u=4, pf=1, xf=1, gd=0, sb=1),
                dict(threads=64, r=3, u=1, pf=0, xf=0)):
        old = ci.run_int_cuda(x, pk, None, cfg)
        new = ci.run_int_cuda(x, pk, None, dict(cfg, xs=1))
        assert torch.equal(old, new), (cfg, (old.float() - new.float()).abs().max().item())
    ref = x.float() @ ci.reference_rk(pk).t()
    assert ((new.float() - ref).norm() / ref.norm()).item() < 1e-2


@GPU
@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("form", list(FORMS))
def test_cuda_int_wide_inputs_take_more_than_48kb_of_shared_memory(bits, form):
    """K = 32768: the staged activations need more than the default 48 KB of dynamic shared memory, which the
    launcher asks the driver for (cuFuncSetAttribute)."""
    m = _layer(64, 32768, bits, 128, device="cuda")
    pk = ci.packed_rk(m)
    assert pk["KU"] * (ci.codes_per_chunk(bits) * 2 + 16) > 48 * 1024
    x = torch.randn(1, 32768, device="cuda", dtype=torch.bfloat16)
    out = torch.full((1, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    ci.run_int_cuda(x, pk, None, FORMS[form], out=out)
    ref = x.float() @ ci.reference_rk(pk).t()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_pdl_mode_follows_the_gpu_and_inductor(monkeypatch):
    """gd applies from sm_90 on; while TorchInductor's PDL mode is on, the early trigger (gd 1) becomes gd 2, except
    in a chain of these GEMVs (``chain``: the next kernel waits)."""
    import torch._inductor.config as icfg

    monkeypatch.setattr(ci, "sm90", lambda dev: True)
    # inductor's own patch: monkeypatch's undo would delete the option from inductor's config, not restore it
    with icfg.patch({"triton.enable_pdl": False}):
        assert [ci.gdc(dict(gd=g), 0) for g in (0, 1, 2)] == [0, 1, 2]
        assert ci.gdc({}, 0) == 0
    with icfg.patch({"triton.enable_pdl": True}):
        assert [ci.gdc(dict(gd=g), 0) for g in (0, 1, 2)] == [0, 2, 2]
        assert [ci.gdc(dict(gd=g), 0, chain=True) for g in (0, 1, 2)] == [0, 1, 2]
    monkeypatch.setattr(ci, "sm90", lambda dev: False)
    assert ci.gdc(dict(gd=1), 0) == 0 and ci.gdc(dict(gd=1), 0, chain=True) == 0


def test_compile_kernels_compiles_a_source_once_for_all_its_kernels(monkeypatch):
    """cuda_rt.compile_kernels: one NVRTC compile and one module load for several kernels of one source; where
    PyTorch's private helpers differ (another signature or return), each kernel through torch.cuda._compile_kernel."""
    import torch.cuda._utils as tu

    from leanq.kernels import cuda_rt

    calls = []
    monkeypatch.setattr(tu, "_nvrtc_compile", lambda src, name: calls.append(("nvrtc", name)) or (b"ptx", name),
                        raising=False)
    class K:
        def __init__(self, name):
            self.func, self.name = 1, name

    monkeypatch.setattr(tu, "_cuda_load_module", lambda ptx, names: calls.append(("load", tuple(names)))
                        or {n: K(n) for n in names}, raising=False)
    assert [k.name for k in cuda_rt.compile_kernels("src", ["a", "b", "c"])] == ["a", "b", "c"]
    assert calls == [("nvrtc", "a"), ("load", ("a", "b", "c"))]

    monkeypatch.setattr(torch.cuda, "_compile_kernel", lambda src, name: f"one {name}", raising=False)
    monkeypatch.setattr(tu, "_cuda_load_module", lambda ptx, names: {n: f"no func {n}" for n in names}, raising=False)
    assert cuda_rt.compile_kernels("src", ["a", "b"]) == ["one a", "one b"]  # objects Launcher could not take
    monkeypatch.setattr(tu, "_nvrtc_compile", lambda src, name: b"ptx only", raising=False)  # an older return
    assert cuda_rt.compile_kernels("src", ["a", "b"]) == ["one a", "one b"]


def test_pdl_wait_precedes_every_read_of_x_in_the_sources():
    """The sources with gd: griddepcontrol.wait comes before the first read of x (int_gemv's staging, int_mma_w's
    x copies), and the early trigger sits under ``#if GD == 1`` (gd 2 leaves it out)."""
    from leanq.kernels import cuda_int_mma as cm

    for gd in (1, 2):
        src = ci.source(4, 2, 512, 1, 4, 1, True, gd=gd)
        srcw = cm.source_w(2, 6, 2, 1, 128, True, 3, 0, 0, 0, 1, gd)
        assert f"#define GD {gd}\n" in src and f"#define GD {gd}\n" in srcw
        for text, entry, first_x in ((src, "int_gemv(", "stage_x(xs, x"), (srcw, "int_mma_w(", "stage_x();")):
            body = text[text.index(entry):]
            body = body[body.index("#if GD\n"):]
            body = body[:body.index("#else\n")]
            assert body.index("gdc_wait();") < body.index(first_x)
            lines = [ln.strip() for ln in body.splitlines()]
            i = next(j for j, ln in enumerate(lines) if ln.startswith("gdc_launch();"))
            assert lines[i - 1] == "#if GD == 1" and lines[i + 1] == "#endif"
    with pytest.raises(AssertionError):
        cm.source_w(2, 6, 2, 1, 128, True, 3, 0, 1, 0, 1, 1)  # not with mg
    for gd in (1, 2):  # with xp (x's first loads split from their conversion): the wait still comes first
        src = ci.source(2, 2, 512, 2, 2, 1, True, gd=gd, xs=1, xp=2)
        body = src[src.index("int_gemv("):]
        body = body[body.index("#if GD\n"):]
        wait = body.index("gdc_wait();")
        assert wait < body.index("x_load(xraw, x") < body.index("prefetch_tiles(w") < body.index("x_store(xs, xraw")


def test_l2_prefetch_is_built_only_where_it_applies():
    """Launch option xp: the source defines XP, needs PDL (gd 1 or 2), and the launcher builds it only for rows of
    more than one tile of 32 * u chunks (rows of one tile keep the plain staging)."""
    assert "#define XP 2\n" in ci.source(8, 2, 512, 1, 4, 1, True, gd=1, xs=1, xp=2)
    assert "#define XP 0\n" in ci.source(8, 2, 512, 1, 4, 1, True, gd=1, xs=1)
    with pytest.raises(AssertionError):
        ci.source(4, 2, 512, 2, 4, 1, True, gd=0, xp=2)
    cfg = dict(u=4, xp=2)
    assert ci._xp(cfg, dict(KU=344), 1) == 2 and ci._xp(cfg, dict(KU=344), 2) == 2  # 4096x11008 at 4 bits
    assert ci._xp(cfg, dict(KU=128), 1) == 0  # K 4096 at 4 bits: one tile a row
    assert ci._xp(cfg, dict(KU=344), 0) == 0  # no PDL
    assert ci._xp(dict(u=4), dict(KU=344), 1) == 0
    assert ci._cfg(2).get("xp") == 2 and ci._cfg(8).get("xp") == 2 and ci._cfg(4).get("xp") == 2
    assert not ci._cfg(3).get("xp")


def test_shape_table_applies_on_132_sms_only(monkeypatch):
    """A layer of a shape in ``SHAPES`` gets that geometry over its width's tuned config on a part with 132 SMs,
    and the tuned config elsewhere; other shapes and widths get the tuned config."""
    assert ci.SHAPES, "the table is empty"
    for sms, hit in ((132, True), (114, False), (78, False)):
        monkeypatch.setattr(ci, "sm_count", lambda dev, sms=sms: sms)
        for (bits, n, k), over in ci.SHAPES.items():
            cfg = ci.default_cfg(dict(bits=bits, N=n, K=k), 0)
            assert cfg == (dict(ci._cfg(bits), **over) if hit else ci._cfg(bits)), (sms, bits, n, k)
            assert ci.default_cfg(dict(bits=bits, N=n + 8, K=k), 0) == ci._cfg(bits)
            other = next(b for b in ci.BITS if (b, n, k) not in ci.SHAPES)
            assert ci.default_cfg(dict(bits=other, N=n, K=k), 0) == ci._cfg(other)


@GPU
@pytest.mark.parametrize("key", sorted(ci.SHAPES))
def test_cuda_int_shape_table_configs_match_the_reference(key):
    """Each geometry of ``SHAPES``, at its shape, computes the layer (relative error <= 1e-2 against the float32
    reference) and gives the same bytes as that geometry with the predicated loads (``lt`` 0) and without PDL."""
    bits, n, k = key
    m = _layer(n, k, bits, 128, bias=True, device="cuda")
    pk = ci.packed_rk(m)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    b = m.bias.to(x.dtype)
    cfg = dict(ci._cfg(bits), **ci.SHAPES[key])
    out = ci.run_int_cuda(x, pk, b, cfg)
    ref = x.float() @ ci.reference_rk(pk).t() + m.bias.float()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(ci.run_int_cuda(x, pk, b, dict(cfg, lt=0)), out)
    assert torch.equal(ci.run_int_cuda(x, pk, b, dict(cfg, gd=0, xf=1)), out)


@GPU
@pytest.mark.parametrize("m,gd", [(1, 1), (1, 2), (4, 1), (16, 1), (16, 2)])
def test_cuda_int_pdl_chain_in_a_cuda_graph_reads_each_input_after_it_is_written(m, gd):
    """Programmatic dependent launch (batch 1: int_gemv; 4 and 16: int_mma_w, split over K): in a captured chain
    where each layer reads what the kernel before it wrote (the layer before it, or an elementwise op), every replay
    gives the bytes of the chain launched without it, for a new input each time (the chain's buffers still hold the
    last replay's values, so an early read would show)."""
    from leanq.kernels import cuda_int_mma as cm

    pks = [ci.packed_rk(_layer(2048, 2048, 4, 128, device="cuda", seed=i)) for i in range(2)]
    x0 = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    if m == 1:
        cfg = dict(threads=512, r=1, u=2, pf=1)
        run = lambda x, pk, c: ci.run_int_cuda(x, pk, None, c)  # noqa: E731
    else:
        cfg = dict(rt=2, kw=2, spw=2, pd=3)  # 8 input ranges: a split launch, its slots and counters
        assert cm.w_launch(m, 2048, 2048, cfg, 132)[1][1] > 1
        run = lambda x, pk, c: cm.run_int_mma_w(x, pk, None, c)  # noqa: E731

    check_pdl_chain(run, pks, x0, cfg, gd)


def check_pdl_chain(run, pks: list, x0: torch.Tensor, cfg: dict, gd: int) -> None:
    """A chain of twelve layers (``run(x, pk, cfg)``, the layers ``pks`` in turn, an elementwise kernel between
    some), captured in a CUDA graph with ``gd``: every replay gives the bytes of the chain launched without it,
    for a new ``x0`` each time (the chain's buffers still hold the last replay's values, so an early read would
    show)."""
    def chain(c):
        x = x0
        for i in range(12):
            x = run(x, pks[i % 2], c)
            x = x * 0.25 if i % 3 == 2 else x  # an elementwise kernel between some layers
        return x

    chain(dict(cfg, gd=gd))
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = chain(dict(cfg, gd=gd))
    for _ in range(4):
        x0.copy_(torch.randn(x0.shape, device="cuda", dtype=x0.dtype))
        g.replay()
        ref = chain(cfg)
        torch.cuda.synchronize()
        assert torch.isfinite(ref).all() and ref.abs().max() > 0
        assert torch.equal(y, ref)


@GPU
def test_cuda_int_is_chosen_at_batch_1_and_serves_prefill_once_released():
    from leanq.kernels import select

    m = _layer(256, 512, 4, 128, device="cuda")
    x1 = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    x8 = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    assert select(m, x1).name == "cuda-int-gemv"
    assert select(m, x8).name != "cuda-int-gemv"
    w = m.int_weight().dequantize(torch.float32)
    freed = ci.release_stored_rk(m)
    assert freed > 0 and m.qweight.numel() == 0
    assert select(m, x8).name == "cuda-int-gemv"  # dequantize + cuBLAS from the same words
    for x in (x1, x8):
        ref = x.float() @ w.t()
        assert ((m(x).float() - ref).norm() / ref.norm()).item() < 1e-2


@GPU
def test_cuda_int_runs_under_torch_compile():
    m = _layer(256, 512, 4, 128, bias=True, device="cuda")
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)(x)
    assert torch.equal(eager, compiled)


@GPU
@pytest.mark.parametrize("bits,group,sym,sdtype,n,k", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_int_dequantize_matches_reference(bits, group, sym, sdtype, n, k, dtype):
    """The prefill path's dense weight (16-byte stores where rows allow, one at a time elsewhere)."""
    m = _layer(n, k, bits, group, sym, sdtype, device="cuda")
    pk = ci.packed_rk(m)
    w = ci.dequantize_rk(pk, dtype)
    assert w.dtype == dtype and w.shape == (n, k)
    assert torch.allclose(w.float(), ci.reference_rk(pk), rtol=1e-2, atol=1e-6)


def _tiny_llama_4bit(family: str = "llama"):
    import transformers

    from leanq.config import MethodConfig
    from leanq.pipeline import quantize_blocks

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    cfg = getattr(transformers, f"{name}Config")(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    quantize_blocks(model, QuantSpec(bits=4, group_size=64, sym=False), MethodConfig(name="rtn", mse_clip=False),
                    None, device="cpu", progress=False)
    return model


def _compiled_logits(model, ids, calls: list) -> torch.Tensor:
    """The logits of ``torch.compile(model)`` on ``ids`` after a warm-up call; ``calls`` holds only the timed call's
    GEMVs (dynamo reset before and after)."""
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(ids)
        calls.clear()
        out = compiled(ids).logits
    torch._dynamo.reset()
    return out


def test_taken_over_layers_fuse_siblings_into_one_gemv_under_torch_compile(monkeypatch):
    """take_over (what release_stored_rk does after its GPU check) on the CPU, where the op runs its pure-torch
    path: same logits as the dispatch table; eagerly every layer runs on its own rows; compiled, the q/k/v and
    gate/up calls merge (DedupeOps): 4 GEMVs per decoder layer instead of 7."""
    model = _tiny_llama_4bit()
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        ref = model(ids).logits
    layers = [m for m in model.modules() if ci._ok(m) and hasattr(m, "qweight")]
    assert len(layers) == 14
    assert ci.take_over(model, layers, fuse=True) > 0
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.rk_fused_words is attn.v_proj.rk_fused_words and attn.q_proj.rk_rows == (0, 128)
    assert attn.k_proj.rk_words.data_ptr() == attn.q_proj.rk_fused_words[128:].data_ptr()  # a view, not a copy
    calls = []
    cpu_linear = ci._cpu_linear
    monkeypatch.setattr(ci, "_cpu_linear", lambda x2, pk, b: (calls.append(pk["N"]), cpu_linear(x2, pk, b))[1])
    with torch.no_grad():
        eager = model(ids).logits
    assert len(calls) == 14
    # the table's CPU path may be PyTorch's packed int4 op (bf16 inside): within its rounding of the exact weight
    assert ((eager - ref).norm() / ref.norm()).item() < 1e-2
    out = _compiled_logits(model, ids, calls)
    assert sorted(calls) == sorted([128 + 64 + 64, 128, 256 + 256, 128] * 2), calls  # qkv, o, gate+up, down
    assert torch.allclose(out, eager, rtol=1e-4, atol=1e-4)


@GPU
def test_release_stored_rk_fused_matches_dispatch_under_torch_compile():
    """On the GPU: release_stored_rk(fuse=True, fold=False) keeps the dispatch table's logits, eagerly and
    compiled."""
    model = _tiny_llama_4bit().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 100, (1, 5), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
    assert ci.release_stored_rk(model, fuse=True, fold=False) > 0
    assert not hasattr(model.model.layers[0].mlp.down_proj, "rk_pro")
    assert model.model.layers[0].mlp.gate_proj.rk_rows == (0, 256)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits.float()
        compiled = torch.compile(model)(ids).logits.float()
    for out in (eager, compiled):
        assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    torch._dynamo.reset()


def _emulate_int_mma(x: torch.Tensor, pk: dict, threads: int = 128, wr: int = 2, nt: int = 2) -> torch.Tensor:
    """kernels.cuda_int_mma's arithmetic, lane by lane, in torch: each thread's A and B registers and its C outputs
    taken with the kernel's own index formulas, then put where mma.m16n8k16 takes and leaves them (thread
    g = lane / 4, t = lane % 4: A[g | g+8][2t, 2t+1 | 2t+8, 2t+9], B[2t, 2t+1 | 2t+8, 2t+9][g],
    C[g | g+8][2t, 2t+1]) and multiplied in float32. x is read as the kernel reads it: pairs of 16-bit values."""
    bits, M, K, N, G = pk["bits"], x.shape[0], pk["K"], pk["N"], pk["group"]
    e_, wps = 32 // bits, 16 // (32 // bits)
    words = pk["words"].to(torch.int64) & 0xFFFFFFFF
    szw = pk["sz"].to(torch.int64) & 0xFFFFFFFF
    scales = ((szw >> 16).to(torch.int32) << 16).view(torch.float32) if pk["sbf16"] else \
        (szw >> 16).to(torch.int16).view(torch.float16).float()
    zeros = (szw & 0xFFFF).float()
    qmask = (1 << bits) - 1
    xp = x.float().reshape(M, K // 2, 2)  # x as the kernel's u32 pairs: xp[row, k / 2]
    out = torch.zeros(M, N)
    warps = threads // 32
    wk_n = warps // wr
    ng = pk["NG"]
    gpw = -(-ng // wk_n)

    def pair(word, shift, z):  # M0 + q in both halves, minus M0 + z: exact q - z
        return torch.tensor([float((word >> shift) & qmask), float((word >> (16 + shift)) & qmask)]) - z

    for blk in range(-(-N // (wr * nt * 8))):
        for wr_i in range(wr):
            nb = (blk * wr + wr_i) * nt * 8
            ctot = torch.zeros(nt, 16, 8)
            for wk in range(wk_n):  # the block's K ranges, summed as the shared-memory reduction does
                for grp in range(wk * gpw, min(ng, (wk + 1) * gpw)):
                    cg = torch.zeros(nt, 16, 8)
                    for s in range(G // 16):
                        k0 = grp * G + s * 16
                        if k0 >= K:
                            break
                        a_mat = torch.zeros(16, 16)
                        for lane in range(32):
                            g, t = lane // 4, lane % 4
                            # a[0..3] = x0[k0/2 + t], x1[k0/2 + t], x0[k0/2 + 4 + t], x1[k0/2 + 4 + t]
                            for reg, (row, pidx) in enumerate([(g, k0 // 2 + t), (g + 8, k0 // 2 + t),
                                                               (g, k0 // 2 + 4 + t), (g + 8, k0 // 2 + 4 + t)]):
                                mrow, mcol = g + 8 * (reg % 2), 2 * t + 8 * (reg // 2)
                                if row < M:
                                    a_mat[mrow, mcol:mcol + 2] = xp[row, pidx]
                        for j in range(nt):
                            b_mat = torch.zeros(16, 8)
                            for lane in range(32):
                                g, t = lane // 4, lane % 4
                                n = nb + j * 8 + g
                                if n >= N:
                                    continue
                                ws = [int(words[n, k0 // e_ + i]) for i in range(wps)]
                                z = zeros[n, grp].item()
                                if bits == 4:
                                    b0, b1 = pair(ws[0], 4 * t, z), pair(ws[1], 4 * t, z)
                                elif bits == 2:
                                    b0, b1 = pair(ws[0], 2 * t, z), pair(ws[0], 2 * t + 8, z)
                                else:
                                    b0, b1 = pair(ws[t >> 1], 8 * (t & 1), z), pair(ws[2 + (t >> 1)], 8 * (t & 1), z)
                                b_mat[2 * t:2 * t + 2, g] = b0
                                b_mat[2 * t + 8:2 * t + 10, g] = b1
                            cg[j] += a_mat @ b_mat
                    for j in range(nt):
                        for lane in range(32):  # c[j][0..3] += s0/s1 * cg: columns n0 = nb + 8j + 2t, n0 + 1
                            g, t = lane // 4, lane % 4
                            for e in range(2):
                                n = nb + j * 8 + 2 * t + e
                                sc = scales[n, grp].item() if n < N else 0.0
                                for h in range(2):
                                    ctot[j, g + 8 * h, 2 * t + e] += sc * cg[j, g + 8 * h, 2 * t + e]
            for j in range(nt):
                for lane in range(32):  # the writes: rows g, g + 8 below M, columns n0, n0 + 1 below N
                    g, t = lane // 4, lane % 4
                    for h in range(2):
                        for e in range(2):
                            r, n = g + 8 * h, nb + j * 8 + 2 * t + e
                            if r < M and n < N:
                                out[r, n] = ctot[j, r, 2 * t + e]
    return out


@pytest.mark.parametrize("bits,group,n,k,m,dtype", [(4, 128, 40, 384, 3, torch.bfloat16), (2, 64, 24, 208, 16, torch.float16),
                                                    (8, 32, 17, 96, 5, torch.float16)])
def test_int_mma_fragment_mapping_reproduces_the_product(bits, group, n, k, m, dtype):
    """The tensor-core kernel (kernels.cuda_int_mma) emulated lane by lane on the CPU: its register choices must
    rebuild x @ W^T from the rk words and x's 16-bit values (K split over warps, a partial last group)."""
    layer = _layer(n, k, bits, group, seed=bits)
    pk = ci.repack_rk(layer.qweight, layer.scales, layer.zeros, bits, False, k, group)
    x = torch.randn(m, k).to(dtype)
    ref = x.float() @ ci.reference_rk(pk).t()
    got = _emulate_int_mma(x, pk, threads=128, wr=2, nt=2)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_int_mma_supports_only_what_it_computes():
    """The tensor-core path's gate: 16-bit activations on a GPU, batches 2-16, K and the group multiples of 16,
    bf16 only up to 4 bits; everything else goes to dequantize + cuBLAS (or the pure-torch path)."""
    from leanq.kernels import cuda_int_mma as cm

    layer = _layer(16, 256, 4, 128, seed=1)
    pk = ci.repack_rk(layer.qweight, layer.scales, layer.zeros, 4, False, 256, 128)
    assert not cm.supports(pk, torch.randn(4, 256, dtype=torch.bfloat16))  # on the CPU
    meta = torch.empty(4, 256, dtype=torch.bfloat16, device="meta")
    assert not cm.supports(pk, meta)
    if torch.cuda.is_available():
        x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
        assert cm.supports(pk, x) and not cm.supports(pk, x.float()) and not cm.supports(pk, x[:1])
        assert not cm.supports(pk, torch.randn(17, 256, device="cuda", dtype=torch.bfloat16))
        assert not cm.supports(dict(pk, bits=8), x) and cm.supports(dict(pk, bits=8), x.half())


def _emulate_int_mma_w(x: torch.Tensor, pk: dict, rt: int, kw: int, spw: int, nt: int, tw: int = 1) -> torch.Tensor:
    """kernels.cuda_int_mma's w kernel (weights as the A operand), lane by lane in torch: every block, warp,
    super-step and tensor-core step takes its A registers from the rk words (rows clamped to N - 1, as the kernel
    loads them) and its B registers from x (batch rows clamped to M - 1) with the kernel's own index formulas, puts
    them where mma.m16n8k16 takes them (A[g | g+8][2t, 2t+1 | 2t+8, 2t+9], B[2t, 2t+1 | 2t+8, 2t+9][g]), multiplies
    in float64, scales per super-step by the rows' group scales and keeps only the outputs the kernel writes. ``tw``:
    row tiles per warp (launch option tw), tile i of warp rt_i of block bx at (bx * rt + rt_i) * tw + i."""
    M, K, N, G = x.shape[0], pk["K"], pk["N"], pk["group"]
    words = pk["words"].to(torch.int64) & 0xFFFFFFFF
    szw = pk["sz"].to(torch.int64) & 0xFFFFFFFF
    scales = ((szw >> 16).to(torch.int32) << 16).view(torch.float32).double() if pk["sbf16"] else \
        (szw >> 16).to(torch.int16).view(torch.float16).double()
    zeros = (szw & 0xFFFF).double()
    xd = x.double()
    ns, tiles = K // 128, -(-N // 16)
    gx, gy = -(-tiles // (rt * tw)), -(-ns // (kw * spw))
    out = torch.zeros(M, N, dtype=torch.float64)

    def pair(word: int, shift: int, z: float) -> torch.Tensor:  # (M0 + q) - (M0 + z) per half: q - z
        return torch.tensor([float((word >> shift) & 15), float((word >> (16 + shift)) & 15)], dtype=torch.float64) - z

    for bx in range(gx):
        for by in range(gy):
            for w, ti in ((w, ti) for w in range(rt * kw) for ti in range(tw)):
                rt_i, kw_i = w % rt, w // rt
                tile = (bx * rt + rt_i) * tw + ti
                s0 = (by * kw + kw_i) * spw
                for S in range(s0, min(s0 + spw, ns)):
                    a_mat = torch.zeros(16, 16, dtype=torch.float64)
                    sc = torch.zeros(16, dtype=torch.float64)
                    for step in range(8):
                        wi, sh = step >> 1, 8 * (step & 1)
                        a_mat.zero_()
                        for lane in range(32):
                            g, t = lane // 4, lane % 4
                            for h in range(2):  # rows g (a0, a2) and g + 8 (a1, a3)
                                row = min(tile * 16 + g + 8 * h, N - 1)
                                word = int(words[row, (4 * S + t) * 4 + wi])
                                z = zeros[row, (128 * S) // G].item()
                                a_mat[g + 8 * h, 2 * t:2 * t + 2] = pair(word, sh, z)
                                a_mat[g + 8 * h, 2 * t + 8:2 * t + 10] = pair(word, sh + 4, z)
                                sc[g + 8 * h] = scales[row, (128 * S) // G]
                        for n in range(nt):
                            b_mat = torch.zeros(16, 8, dtype=torch.float64)
                            for lane in range(32):
                                g, t = lane // 4, lane % 4
                                xr = xd[min(g + 8 * n, M - 1)]
                                k0 = 128 * S + 32 * t + 4 * step  # u32 2 * step, 2 * step + 1 of the lane's 64 bytes
                                b_mat[2 * t:2 * t + 2, g] = xr[k0:k0 + 2]
                                b_mat[2 * t + 8:2 * t + 10, g] = xr[k0 + 2:k0 + 4]
                            c = (a_mat @ b_mat) * sc[:, None]  # C[row][batch], scaled per row
                            for r in range(16):
                                row = tile * 16 + r
                                for col in range(8):
                                    b = 8 * n + col
                                    if row < N and b < M:
                                        out[b, row] += c[r, col]
    return out


@pytest.mark.parametrize("group,n,k,m,dtype,cfg", [(128, 40, 384, 3, torch.bfloat16, (2, 2, 1, 1)),
                                                   (256, 24, 512, 11, torch.float16, (1, 2, 1, 2)),
                                                   (128, 17, 256, 16, torch.bfloat16, (2, 1, 4, 2)),
                                                   (128, 72, 384, 16, torch.bfloat16, (1, 2, 1, 2, 3)),
                                                   (128, 40, 256, 5, torch.float16, (2, 1, 2, 1, 2))])
def test_int_mma_w_fragment_mapping_reproduces_the_product(group, n, k, m, dtype, cfg):
    """The w kernel emulated lane by lane on the CPU: its register choices must rebuild x @ W^T from the rk words
    and x's 16-bit values, with K split over warps and blocks, rows past N and batch rows past M clamped."""
    layer = _layer(n, k, 4, group, seed=7)
    pk = ci.repack_rk(layer.qweight, layer.scales, layer.zeros, 4, False, k, group)
    x = torch.randn(m, k).to(dtype)
    ref = x.double() @ ci.reference_rk(pk).double().t()
    got = _emulate_int_mma_w(x, pk, *cfg)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6
    # a wrong pairing (the pair at shift + 4 taken from the next word) must fail the same check
    bad = dict(pk, words=torch.roll(pk["words"], 1, dims=1))
    assert ((_emulate_int_mma_w(x, bad, *cfg) - ref).norm() / ref.norm()).item() > 1e-2


@pytest.mark.parametrize("nt,m,xv", [(2, 16, 1), (2, 11, 3), (1, 8, 1), (1, 3, 3)])
def test_int_mma_w_xv_staging_meets_the_fragments(nt, m, xv):
    """Launch option xv: the staging's 16-byte copies (thread u: tt = u % 4, batch row b, step pair jp, step sl; from
    x's row min(b, M - 1), 16-byte chunk 16 sl + 4 tt + jp; to uint4 ((4 sl + jp) NT + b // 8) * 32 + (b % 8) * 4 +
    tt) must put at the entry lane g * 4 + t reads for step pair jp and batch half n (((4 S + jp) NT + n) * 32 + lane)
    the inputs 128 S + 32 t + 8 jp .. + 7 of batch row g + 8 n (clamped), which hold its B registers of steps 2 jp and
    2 jp + 1; every entry written once."""
    steps = 3
    smem = {}
    for u in range(steps * 128 * nt):
        if xv == 3:  # quarter-warps by step pair, row pairs by warp
            tt, jp, b, sl = u & 3, (u >> 3) & 3, ((u >> 2) & 1) + 2 * ((u >> 5) % (4 * nt)), (u >> 5) // (4 * nt)
        else:
            tt, b, rest = u & 3, (u >> 2) % (8 * nt), (u >> 2) // (8 * nt)
            jp, sl = rest & 3, rest >> 2
        idx = ((sl * 4 + jp) * nt + (b >> 3)) * 32 + (b & 7) * 4 + tt
        assert idx not in smem
        chunk = sl * 16 + 4 * tt + jp  # 16-byte chunks of the block's inputs: 8 inputs each
        smem[idx] = (min(b, m - 1), 8 * chunk)
    assert len(smem) == steps * 128 * nt
    if xv == 3:  # every warp's 32 copies: 2 rows x 16 whole chunks from x, 4 runs of 8 neighbouring entries
        for w0 in range(0, steps * 128 * nt, 32):
            src, dst = set(), []
            for u in range(w0, w0 + 32):
                tt, jp, b = u & 3, (u >> 3) & 3, ((u >> 2) & 1) + 2 * ((u >> 5) % (4 * nt))
                sl = (u >> 5) // (4 * nt)
                src.add((b, 16 * sl + 4 * tt + jp))
                dst.append(((sl * 4 + jp) * nt + (b >> 3)) * 32 + (b & 7) * 4 + tt)
            assert len({r for r, _ in src}) == 2 and len(src) == 32
            assert all(dst[q + 7] - dst[q] == 7 and sorted(dst[q:q + 8]) == dst[q:q + 8] for q in range(0, 32, 8))
    for S in range(steps):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for jp in range(4):
                for n in range(nt):
                    want = (min(g + 8 * n, m - 1), 128 * S + 32 * t + 8 * jp)
                    assert smem[((S * 4 + jp) * nt + n) * 32 + lane] == want


@pytest.mark.parametrize("nt,m", [(2, 16), (2, 11), (1, 8), (1, 3)])
def test_int_mma_w_wg_staging_meets_the_fragments(nt, m):
    """Launch option wg: the staging (thread u: step pair jp = u % 4, batch row b, super-step sl; four 16-byte loads
    x[min(b, M - 1)][128 sl + 32 t + 8 jp ..], word 2q + kb of load t to word t of k'-chunk 2 (2 jp + q) + kb, that chunk
    c of block c // 8 at byte sl 2048 NT + (c // 8) 1024 NT + 128 b + 16 ((c % 8) ^ (b % 8))) read back the way the
    wgmma's B descriptor reads it (block j // 4, 32 bytes further per step, chunk c of row b at c ^ (b % 8)) must give
    B[kk][b] = x[b][128 S + 32 t + 4 j + e] for the A fragments' kk = 2t + (e % 2) + 8 (e // 2); every 4-byte word
    written once."""
    steps = 3
    smem = {}  # byte offset of a 4-byte word -> (batch row, first input of its pair)
    for u in range(steps * 32 * nt):
        jp, b, sl = u & 3, (u >> 2) % (8 * nt), (u >> 2) // (8 * nt)
        for m_ in range(4):
            cc = 2 * (2 * jp + (m_ >> 1)) + (m_ & 1)
            base = sl * 2048 * nt + (cc >> 3) * 1024 * nt + 128 * b + (((cc & 7) ^ (b & 7)) << 4)
            for t in range(4):
                off = base + 4 * t
                assert off not in smem
                smem[off] = (min(b, m - 1), 128 * sl + 32 * t + 8 * jp + 2 * m_)
    assert len(smem) == steps * 32 * nt * 16
    for S in range(steps):
        for j in range(8):
            desc = S * 2048 * nt + (j >> 2) * 1024 * nt + 32 * (j & 3)  # the descriptor's start, relative
            for b in range(8 * nt):
                for kk in range(0, 16, 2):  # B[kk][b], B[kk + 1][b]: one 4-byte word
                    blk = desc - desc % (1024 * nt)  # the block's base (1024 NT bytes, 1024-aligned)
                    col = desc % 128 + 2 * kk  # K-major: input kk of the step, bytes into row b's 128 ...
                    # ... in its 8-row group (1024 bytes apart), 16-byte chunk col // 16 at (col // 16) ^ (b % 8)
                    off = blk + 1024 * (b // 8) + 128 * (b % 8) + (((col // 16) ^ (b % 8)) << 4) + col % 16
                    t, e = (kk % 8) // 2, 2 * (kk // 8)
                    assert smem[off] == (min(b, m - 1), 128 * S + 32 * t + 4 * j + e), (S, j, b, kk)


def test_int_mma_w_mg_slot_layout_round_trips():
    """Launch option mg's slot of four steps: the copy side (instruction i, lane l: row 2i + l // 16, chunk l % 16,
    at position 16 r + (c ^ 4 (r % 2))) and the read side (lane g * 4 + t, step j: rows g and g + 8, position
    16 r + ((4 j + t) ^ 4 (g % 2))) must meet at the same chunk, and one step's 32 reads must cover all eight
    16-byte bank groups four times (no bank conflicts)."""
    slot = {}
    for i in range(8):
        for lane in range(32):
            r, c = 2 * i + lane // 16, lane % 16
            pos = 16 * r + (c ^ (4 * (r % 2)))
            assert pos not in slot
            slot[pos] = (r, c)
    assert len(slot) == 256
    for j in range(4):
        for h in (0, 8):
            groups = []
            for lane in range(32):
                g, t = lane // 4, lane % 4
                r = g + h
                pos = 16 * r + ((4 * j + t) ^ (4 * (g % 2)))
                assert slot[pos] == (r, 4 * j + t)
                groups.append(pos % 8)
            assert sorted(groups) == sorted(list(range(8)) * 4)


def test_int_mma_w_default_config_covers_every_shape():
    """w_config gives a launchable config for small and large shapes alike (one K step, a single row tile, the
    Llama shapes): a grid covering every row tile and step, no block without work, within a block's shared memory."""
    from leanq.kernels import cuda_int_mma as cm

    for m in (2, 8, 9, 16):
        for n in (1, 17, 1000, 4096, 11008, 14336, 28672):
            for k in (128, 256, 4096, 11008, 14336):
                c = cm.w_config(m, n, k, 132)
                c2, (gx, gy) = cm.w_launch(m, n, k, c, 132)
                ns, tiles = k // 128, -(-n // 16)
                assert gx * c2["rt"] >= tiles and gy * c2["kw"] * c2["spw"] >= ns > (gy - 1) * c2["kw"] * c2["spw"]
                assert cm.w_smem(c2, 1 if m <= 8 else 2) <= cm.W_SMEM_MAX, (m, n, k, c2)


def test_int_mma_w_shape_table_applies_on_132_sms_only():
    """W_SHAPES (configs a sweep chose for one shape on a 132-SM part) serves that shape there; other SM counts and
    shapes go through the search, and each entry launches within one wave of two blocks per SM."""
    from leanq.kernels import cuda_int_mma as cm

    for (n, k), cfg in cm.W_SHAPES.items():
        for m in (4, 16):
            small = cm.W_SMALL if m <= 8 else {}  # batches 2-8: the register form in the same geometry
            assert cm.w_config(m, n, k, 132) == dict(cfg, **small)
            assert cm.w_config(m, n, k, 114) == dict(cm._w_search(8 if m <= 8 else 16, n, k, 114), **small)
            c, (gx, gy) = cm.w_launch(m, n, k, cfg, 132)
            assert c["spw"] == cfg["spw"] and gx * gy <= 2 * 132
    assert cm.w_config(16, 4096, 11008, 132) == cm._w_search(16, 4096, 11008, 132)
    assert cm.w_config(8, 4096, 11008, 132) == dict(cm._w_search(8, 4096, 11008, 132), rp=1, pt=4)


def test_int_mma_w_launch_geometry():
    """The grid covers every row tile and super-step, and no block is left without work."""
    from leanq.kernels import cuda_int_mma as cm

    for (n, k) in [(4096, 4096), (4096, 14336), (14336, 4096), (333, 128)]:
        for cfg in (None, dict(rt=2, kw=8), dict(rt=8, kw=1, spw=3), dict(rt=4, kw=2, spw=2, rp=1, tw=3)):
            c, (gx, gy) = cm.w_launch(16, n, k, cfg, 132)
            ns, tiles, rows = k // 128, -(-n // 16), c["rt"] * c.get("tw", 1)
            assert gx * rows >= tiles > (gx - 1) * rows
            assert gy * c["kw"] * c["spw"] >= ns > (gy - 1) * c["kw"] * c["spw"]
            assert 1 <= c["spw"] <= ns
    with pytest.raises(ValueError, match="needs rp"):  # row tiles per warp: the register form only
        cm.w_launch(16, 4096, 4096, dict(rt=2, kw=2, tw=2), 132)
    with pytest.raises(ValueError, match="needs rp"):  # steps per register tile: the register form only
        cm.w_launch(16, 4096, 4096, dict(rt=2, kw=2, pt=4), 132)
    with pytest.raises(ValueError, match="static shared memory"):  # the partial tiles' buffer past 48 KB
        cm.w_launch(16, 4096, 4096, dict(rt=8, kw=4, rp=1, tw=2), 132)


@GPU
@pytest.mark.parametrize("group,n,k,m,sdtype", [(128, 96, 512, 16, torch.float16), (128, 333, 4224, 3, torch.bfloat16),
                                                (256, 40, 1024, 9, torch.float16), (128, 1000, 256, 8, torch.float16),
                                                (128, 17, 128, 2, torch.bfloat16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_mma_w_matches_reference(group, n, k, m, sdtype, dtype):
    """The w kernel on the GPU against the float32 reference: one block per K range (direct writes) and K split
    over blocks (slots + last-block sum), bias, partial row tiles and batches; the same bytes on every launch, and
    the arrival counters back at zero after each."""
    from leanq.kernels import cuda_int_mma as cm

    layer, pk, x, ref = _gpu_case(n, k, 4, group, m, dtype, sdtype, seed=3)
    assert cm.supports_w(pk, x)
    ns = k // 128
    for cfg in (None, dict(rt=1, kw=1, spw=1, pd=2), dict(rt=2, kw=2, spw=ns, pd=4), dict(rt=4, kw=2, spw=1, pd=3),
                dict(rt=1, kw=4, spw=2, pd=4), dict(rt=2, kw=1, spw=6, pd=2, mg=1), dict(rt=1, kw=2, spw=4, pd=3, mg=1),
                dict(rt=2, kw=2, spw=3, pd=3, rp=1), dict(rt=1, kw=1, spw=ns, pd=3, rp=1),
                dict(rt=4, kw=2, spw=1, pd=3, rs=1), dict(rt=1, kw=4, spw=2, pd=4, rs=1),
                dict(rt=2, kw=2, spw=1, pd=3, gd=1), dict(rt=1, kw=1, spw=ns, pd=4, gd=1),
                dict(rt=2, kw=2, spw=1, pd=3, gd=2), dict(rt=2, kw=2, spw=1, pd=3, rp=1, tw=2, gd=1),
                dict(rt=1, kw=2, spw=3, pd=3, rp=1, tw=3), dict(rt=4, kw=1, spw=ns, pd=3, rp=1, tw=4, gd=1),
                dict(rt=2, kw=4, spw=1, pd=3, rp=1, tw=2, rs=0), dict(rt=2, kw=2, spw=3, pd=3, rs=1, gd=1, xv=1),
                dict(rt=4, kw=2, spw=1, pd=3, rs=1, xv=1), dict(rt=2, kw=1, spw=6, pd=2, mg=1, xv=1),
                dict(rt=2, kw=2, spw=1, pd=3, rp=1, tw=2, gd=1, xv=1), dict(rt=2, kw=2, spw=3, pd=3, gd=1, xv=2),
                dict(rt=1, kw=4, spw=2, pd=4, xv=3)):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        cm.run_int_mma_w(x, pk, layer.bias.to(dtype), cfg, out=out)
        assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, cfg
        again = cm.run_int_mma_w(x, pk, layer.bias.to(dtype), cfg)
        assert torch.equal(again, cm.run_int_mma_w(x, pk, layer.bias.to(dtype), cfg)), cfg  # deterministic
        if cfg and cfg.get("rs"):  # the split sum's other schedule: the same additions, so the same bytes
            assert torch.equal(again, cm.run_int_mma_w(x, pk, layer.bias.to(dtype), dict(cfg, rs=0))), cfg
        if cfg and cfg.get("gd"):  # programmatic dependent launch changes the order of the copies only
            assert torch.equal(again, cm.run_int_mma_w(x, pk, layer.bias.to(dtype), dict(cfg, gd=0))), cfg
        if cfg and cfg.get("xv"):  # the same values staged in another layout: the same products and sums
            assert torch.equal(again, cm.run_int_mma_w(x, pk, layer.bias.to(dtype), dict(cfg, xv=0))), cfg
    for _, cnt in cm._WSCRATCH.values():
        assert int(cnt.abs().sum()) == 0  # every launch left its counters at zero


@GPU
@pytest.mark.parametrize("group,n,k,m,sdtype", [(128, 333, 4224, 3, torch.bfloat16), (256, 40, 1024, 9, torch.float16),
                                                (128, 17, 128, 2, torch.bfloat16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_mma_w_register_tiles_match(group, n, k, m, sdtype, dtype):
    """The register form with pt steps per register tile (double-buffered): the reference's values, and the same
    bytes as one step at a time (only when the loads go out changes)."""
    from leanq.kernels import cuda_int_mma as cm

    layer, pk, x, ref = _gpu_case(n, k, 4, group, m, dtype, sdtype, seed=4)
    ns = k // 128
    for cfg in (dict(rt=2, kw=2, spw=3, pd=3, rp=1, pt=2), dict(rt=1, kw=1, spw=ns, pd=3, rp=1, pt=4, gd=1, xv=3),
                dict(rt=2, kw=2, spw=5, pd=3, rp=1, pt=3, tw=2), dict(rt=2, kw=2, spw=5, pd=3, rp=1, pt=4, xv=3),
                dict(rt=1, kw=1, spw=ns, pd=3, rp=1, pt=6, gd=1, xv=3), None):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        cm.run_int_mma_w(x, pk, layer.bias.to(dtype), cfg, out=out)
        assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, cfg
        if cfg:
            one = cm.run_int_mma_w(x, pk, layer.bias.to(dtype), dict(cfg, pt=1))
            assert torch.equal(out, one), cfg


@GPU
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="wgmma needs a Hopper GPU (sm_90a)")
@pytest.mark.parametrize("group,n,k,m,sdtype", [(128, 333, 4224, 16, torch.bfloat16), (256, 200, 1024, 9, torch.float16),
                                                (128, 70, 512, 5, torch.bfloat16), (128, 64, 128, 2, torch.float16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_mma_w_wgmma_form_matches(group, n, k, m, sdtype, dtype):
    """Launch option wg (the register form's products on warpgroup tensor cores, x staged for their B descriptor):
    the reference's values, with K split over warps and blocks, rows past N and batch rows past M, both PDL modes."""
    from leanq.kernels import cuda_int_mma as cm

    layer, pk, x, ref = _gpu_case(n, k, 4, group, m, dtype, sdtype, seed=5)
    ns = k // 128
    for cfg in (dict(rt=4, kw=2, spw=3, pd=3, rp=1, pt=2, wg=1, gd=1), dict(rt=4, kw=1, spw=ns, pd=3, rp=1, pt=4, wg=1),
                dict(rt=8, kw=1, spw=2, pd=3, rp=1, pt=1, wg=1, gd=1), dict(rt=4, kw=4, spw=1, pd=3, rp=1, pt=3, wg=1),
                dict(rt=8, kw=2, spw=3, pd=3, rp=1, pt=2, wg=1, gd=1)):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        cm.run_int_mma_w(x, pk, layer.bias.to(dtype), cfg, out=out)
        assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, cfg


@GPU
def test_int_mma_w_in_a_cuda_graph_without_room_for_its_split():
    """Captured into a CUDA graph while its split-K scratch is too small (and may not be allocated there), the w
    kernel launches one input range per block instead; reserve_w sizes the scratch beforehand."""
    from leanq.kernels import cuda_int_mma as cm

    layer = _layer(256, 4096, 4, 128, device="cuda", seed=5)
    pk = ci.packed_rk(layer)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ ci.reference_rk(pk).t()
    cfg = dict(rt=2, kw=2, spw=2, pd=3)  # 8 input ranges: a split launch
    assert cm.w_launch(16, 256, 4096, cfg, 132)[1][1] > 1
    cm.run_int_mma_w(x, pk, None, cfg)  # compiled outside the capture
    dev = x.device
    saved = cm._WSCRATCH.get(dev)
    cm._WSCRATCH[dev] = (torch.empty(1, device=dev), torch.zeros(1, dtype=torch.int32, device=dev))
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = cm.run_int_mma_w(x, pk, None, cfg)
        g.replay()
        torch.cuda.synchronize()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    finally:
        if saved is None:
            cm._WSCRATCH.pop(dev, None)
        else:
            cm._WSCRATCH[dev] = saved
    cm.reserve_w(28672, 4096, dev)
    cm.reserve_w(4096, 14336, dev)
    for n, k in ((28672, 4096), (4096, 14336)):
        for m in (8, 16):
            _, (gx, gy) = cm.w_launch(m, n, k, cm.w_config(m, n, k, 132), 132)
            assert gy == 1 or (cm._WSCRATCH[dev][0].numel() >= gy * n * 16 and cm._WSCRATCH[dev][1].numel() >= gx)


@GPU
@pytest.mark.parametrize("bits,group,n,k,m", [(4, 128, 96, 512, 16), (4, 128, 333, 4160, 3), (2, 64, 64, 384, 8),
                                              (8, 32, 40, 256, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_mma_matches_reference(bits, group, n, k, m, dtype):
    from leanq.kernels import cuda_int_mma as cm

    layer, pk, x, ref = _gpu_case(n, k, bits, group, m, dtype)
    if not cm.supports(pk, x):
        assert dtype == torch.bfloat16 and bits == 8
        return
    for cfg in (None, dict(threads=128, wr=2, nt=1), dict(threads=512, wr=2, nt=4), dict(threads=64, wr=1, nt=2)):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        cm.run_int_mma(x, pk, layer.bias.to(dtype), cfg, out=out)
        assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, cfg
    again = cm.run_int_mma(x, pk, layer.bias.to(dtype))
    assert torch.equal(again, cm.run_int_mma(x, pk, layer.bias.to(dtype)))  # same bytes every launch


def _folded_tiny_llama(family: str = "llama"):
    model = _tiny_llama_4bit(family)
    layers = [m for m in model.modules() if ci._ok(m) and hasattr(m, "qweight")]
    assert ci.take_over(model, layers, fuse=True) > 0
    return model


def test_prologue_reference_is_the_module_it_replaces():
    """The prologues in torch: 1 is transformers' RMSNorm, 2 is SiLU x up of the two halves."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 64, dtype=torch.bfloat16)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
        assert torch.equal(ci.prologue(x, norm.weight, 1, 1e-5), norm(x))
    a, b = torch.randn(2, 3, 32)
    assert torch.equal(ci.prologue(torch.cat([a, b], -1), None, 2, 0.0), torch.nn.functional.silu(a) * b)
    assert ci.prologue(x, None, 0, 0.0) is x


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_fold_decoder_keeps_the_logits_and_four_gemvs_a_layer(monkeypatch, residual):
    """fold_decoder on the CPU (the op's torch path): per layer two norms and SiLU x up folded (and the two residual
    adds, o_proj moved out of the attention), the norms become identities; the logits stay those of the unfolded
    model, eagerly and compiled, and compiled each layer still calls 4 GEMVs (q/k/v and gate/up each one, with the
    norm inside)."""
    ids = torch.randint(0, 100, (1, 5))
    model = _folded_tiny_llama()
    with torch.no_grad():
        ref = model(ids).logits
    assert ci.fold_decoder(model, residual=residual) == 2 * (5 if residual else 4)  # two layers, rope included
    assert ci.fold_decoder(model, residual=residual) == 0  # once only
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.Identity)
    assert isinstance(layer.post_attention_layernorm, torch.nn.Identity)
    assert layer.self_attn.q_proj.rk_pro[0] == 1 and layer.mlp.down_proj.rk_pro == (2, 0.0)
    assert isinstance(layer.self_attn.o_proj, torch.nn.Identity) == residual
    assert hasattr(layer, "leanq_o_proj") == residual
    calls = []
    cpu_linear = ci._cpu_linear
    monkeypatch.setattr(ci, "_cpu_linear", lambda x2, pk, b: (calls.append(pk["N"]), cpu_linear(x2, pk, b))[1])
    with torch.no_grad():
        eager = model(ids).logits
    assert sorted(calls) == sorted([128, 64, 64, 128, 256 + 256, 128] * 2), calls  # gate/up one call eagerly too
    assert torch.allclose(eager, ref, rtol=1e-4, atol=1e-4)
    out = _compiled_logits(model, ids, calls)
    assert sorted(calls) == sorted([128 + 64 + 64, 128, 256 + 256, 128] * 2), calls
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_fold_decoder_keeps_the_logits_of_the_other_families(family):
    """Mistral and Qwen2 decoder layers (Qwen2's q/k/v with a bias, added after the norm's scale) fold as Llama's do
    and keep their logits, for a prompt and for a token decoded after it."""
    model = _folded_tiny_llama(family)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        assert ci.fold_decoder(model) == 2 * 5
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fold_decoder_declines_what_it_cannot_fold():
    """Layers not taken over as fused groups, an unknown norm or activation: nothing is folded."""
    model = _tiny_llama_4bit()
    layers = [m for m in model.modules() if ci._ok(m) and hasattr(m, "qweight")]
    ci.take_over(model, layers, fuse=False)
    assert ci.fold_decoder(model) == 0
    model = _folded_tiny_llama()
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
        layer.input_layernorm = torch.nn.LayerNorm(128)
    assert ci.fold_decoder(model) == 2 * 2  # only the norms before the MLPs and the attention's rope
    assert not hasattr(model.model.layers[0].mlp.down_proj, "rk_pro")
    model = _folded_tiny_llama()
    for layer in model.model.layers:  # gate/up with a bias: SiLU x up (and so the residual adds) not folded
        layer.mlp.up_proj.bias = torch.nn.Parameter(torch.zeros(256))
    assert ci.fold_decoder(model) == 2 * 3
    assert not hasattr(model.model.layers[0].mlp.down_proj, "rk_pro")
    assert not hasattr(model.model.layers[0], "leanq_o_proj")
    model = _folded_tiny_llama()
    for layer in model.model.layers:  # a decoder layer whose forward returns a tuple (transformers before 5)
        layer.__class__ = type("LlamaDecoderLayer", (type(layer),), {"forward": _tuple_forward})
    assert ci.fold_decoder(model) == 2 * 4  # norms, SiLU x up and rope; the layer's forward kept
    assert not hasattr(model.model.layers[0], "leanq_o_proj")


def _tuple_forward(self, hidden_states, **kw) -> tuple:
    return (hidden_states,)


@GPU
@pytest.mark.parametrize("bits,group,sym,sdtype,n,k", CASES)
@pytest.mark.parametrize("pro", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_cuda_int_prologue_matches_reference(bits, group, sym, sdtype, n, k, pro, dtype, offset):
    """The batch-1 GEMV with a prologue folded into its staging (1: an RMSNorm, 2: SiLU x up) against the torch
    prologue and the reference layer (relative error <= 1e-2), with x on 16-byte boundaries (vector loads) and off
    them (element loads), bias included."""
    m = _layer(n, k, bits, group, sym, sdtype, bias=True, device="cuda", seed=pro)
    pk = ci.packed_rk(m)
    g = torch.Generator(device="cuda").manual_seed(pro + offset)
    width = (2 if pro == 2 else 1) * k
    x = torch.randn(1, width + offset, device="cuda", generator=g).to(dtype)[:, offset:]
    w = (torch.rand(k + offset, device="cuda", generator=g) + 0.5).to(dtype)[offset:] if pro == 1 else None
    bias = m.bias.to(dtype)
    ref = ci.prologue(x, w, pro, 1e-5).float() @ ci.reference_rk(pk, torch.float32).t() + bias.float()
    y = ci.run_int_cuda(x.contiguous() if offset == 0 else x, pk, bias, pro=pro, aux=w, eps=1e-5).float()
    assert torch.isfinite(y).all()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2


@GPU
@pytest.mark.parametrize("pdl", [False, True], ids=["no-pdl", "inductor-pdl"])
def test_release_stored_rk_folded_matches_dispatch_under_torch_compile(pdl):
    """On the GPU: release_stored_rk(fuse=True, fold=True) keeps the dispatch table's logits at batch 1 (the folded
    GEMVs, the residual added through their bias slot; o_proj, gate/up and down chained in one op) and for a prompt
    (the torch prologue), eagerly and compiled, with TorchInductor's PDL mode off and on."""
    import torch._inductor.config as icfg

    with icfg.patch({"triton.enable_pdl": pdl}):
        _check_folded_on_gpu()


def _check_folded_on_gpu():
    model = _tiny_llama_4bit().to("cuda", torch.bfloat16)
    torch.manual_seed(0)
    ids = [torch.randint(0, 100, (1, t), device="cuda") for t in (1, 5)]
    with torch.no_grad():
        refs = [model(i).logits.float() for i in ids]
    assert ci.release_stored_rk(model) > 0  # fuse and fold: the defaults
    assert model.model.layers[0].mlp.down_proj.rk_pro == (2, 0.0) and hasattr(model.model.layers[0], "leanq_o_proj")
    torch._dynamo.reset()
    with torch.no_grad():
        for i, ref in zip(ids, refs):
            for out in (model(i).logits.float(), torch.compile(model)(i).logits.float()):
                assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    torch._dynamo.reset()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("pdl", [False, True], ids=["no-pdl", "inductor-pdl"])
def test_layer_tail_is_o_proj_norm_gate_up_silu_down(device, pdl):
    """The folded layer's tail (o_proj + residual, the RMSNorm inside gate/up, SiLU x up inside down + residual): on
    the GPU at batch 1 three chained GEMVs (each letting the next in early, also under TorchInductor's PDL mode), on
    the CPU the torch path; both against the reference layers in float32 (relative error <= 1e-2), the same bytes
    every call, and the GPU's chained launches equal to unchained ones."""
    import torch._inductor.config as icfg

    H, inter = 256, 384
    o, gu, d = (ci.packed_rk(_layer(n, k, 4, 128, device=device, seed=s))
                for s, (n, k) in enumerate(((H, H), (2 * inter, H), (H, inter))))
    g = torch.Generator().manual_seed(5)
    x, res = (torch.randn(1, H, generator=g).to(device, torch.bfloat16) for _ in range(2))
    w = (torch.rand(H, generator=g) + 0.5).to(device, torch.bfloat16)
    wo, wgu, wd = (ci.reference_rk(p, torch.float32) for p in (o, gu, d))
    h = x.float() @ wo.t() + res.float()
    ref = ci.prologue(ci.prologue(h, w.float(), 1, 1e-5) @ wgu.t(), None, 2, 0.0) @ wd.t() + h
    with icfg.patch({"triton.enable_pdl": pdl}):
        y = ci._run_tail(x, res, w, 1e-5, o, gu, d)
        assert torch.equal(y, ci._run_tail(x, res, w, 1e-5, o, gu, d))
    assert y.shape == (1, H) and y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    if device == "cuda":
        h2 = ci.run_int_cuda(x, o, res.reshape(-1))
        y2 = ci.run_int_cuda(ci.run_int_cuda(h2, gu, None, pro=1, aux=w, eps=1e-5), d, h2.reshape(-1), pro=2)
        assert torch.equal(y, y2)


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvcc") is None,
                    reason="a CPU machine with nvcc (the GPU tests launch the kernels)")
@pytest.mark.parametrize("bits,opts", [(4, {}), (3, {}), (2, {}), (8, {}), (4, dict(xf=1, gd=0, xp=0)), (4, dict(xp=0)),
                                       (3, dict(xp=1)), (4, dict(stream_gd=3)), (4, dict(lt=0)), (3, dict(lt=0)),
                                       (2, dict(lt=0)), (8, dict(lt=0))],
                         ids=["4bit", "3bit", "2bit", "8bit", "4bit-xf", "4bit-xp0", "3bit-xp1", "stream-gd3",
                              "4bit-lt0", "3bit-lt0", "2bit-lt0", "8bit-lt0"])
def test_cuda_int_sources_compile_for_sm90(tmp_path, bits, opts):
    """The GEMV's CUDA source compiles for sm_90 with nvcc, without spills, in each width's default config, without
    PDL, and in the streaming form with gd 3: compile errors and register spills show on the CPU, before a GPU
    session (new launch options belong here while they are prepared without a GPU)."""
    import subprocess

    if "stream_gd" in opts:
        src = ci.source(bits, 2, 256, 1, 2, 1, False, st=5, gd=opts["stream_gd"], xs=1)
    else:
        c = dict(ci._cfg(bits), **opts)
        src = ci.source(bits, 2, c["threads"], c["r"], c["u"], c["pf"], False, xf=int(c.get("xf", 0)),
                        gd=int(c.get("gd", 0)), xs=int(c.get("xs", 0)), xp=int(c.get("xp", 0)),
                        lt=int(c.get("lt", 0)))
    (tmp_path / "k.cu").write_text(src)
    r = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu"),
                        "-Xptxas", "-v"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = [line for line in r.stderr.splitlines() if "spill stores" in line]
    assert "int_gemv" in r.stderr and spills and all(" 0 bytes spill stores" in line for line in spills)
