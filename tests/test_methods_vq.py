"""The vq method on real weights (stories260K): Hessian-weighted error against plain k-means and scalar 2-bit.

Weights and Hessians come from block 1 of stories260K as in test_methods_ptq.py
(random token ids through the real embedding, norms and SwiGLU).  Codebooks of
16 two-dimensional codewords (2 index bits per weight) suit its 64-wide layers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import data_file
from leanq.config import MethodConfig, QuantSpec
from leanq.errors import LeanqError
from leanq.formats.intq import IntWeight
from leanq.formats.vq import VQWeight, geometry
from leanq.methods import get_method
from leanq.methods import vq as vqm
from leanq.sensitivity import hessian_damage

NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
SPEC = QuantSpec(fmt="vq", bits=4, vq_dim=2, group_size=None)
CFG = MethodConfig(name="vq")


@pytest.fixture(scope="module")
def layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (W [out, in], H [in, in])} for block 1 of stories260K."""
    from test_methods_ptq import _parse_llama2c

    t, (dim, _hidden, n_heads, n_kv) = _parse_llama2c(data_file("stories260K/stories260K.bin").read_bytes(), 1)
    ntok = 2048
    tok = torch.randint(0, t["emb"].shape[0], (ntok,), generator=torch.Generator().manual_seed(0))
    e = t["emb"][tok]

    def rms(x, wn):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * wn

    xa, xf = rms(e, t["attn_norm"]), rms(e, t["ffn_norm"])
    xd = torch.nn.functional.silu(xf @ t["w1"].t()) * (xf @ t["w3"].t())
    xo = (xa @ t["wv"].t()).reshape(ntok, n_kv, -1).repeat_interleave(n_heads // n_kv, 1).reshape(ntok, dim)
    xs = {"wq": xa, "wk": xa, "wv": xa, "wo": xo, "w1": xf, "w3": xf, "w2": xd}
    return {n: (t[n], 2.0 / ntok * xs[n].t() @ xs[n]) for n in NAMES}


def damage(w, h, qw) -> float:
    return hessian_damage(qw.dequantize(torch.float32) - w, h)


def plain_kmeans(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Unweighted k-means of the raw d-vectors, nearest-codeword rounding: no scales, no H, no feedback."""
    d = spec.vq_dim
    x = w.reshape(-1, d)
    c = vqm.kmeans(x, torch.ones_like(x), 1 << spec.bits, torch.Generator().manual_seed(0))
    k = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    return c[k].reshape(w.shape)


def test_vq_beats_plain_kmeans_and_scalar_2bit(layers):
    rtn, gptq = get_method("rtn").fn, get_method("gptq").fn
    int2 = QuantSpec(bits=2, group_size=64)
    gcfg = MethodConfig(name="gptq", act_order=True, mse_clip=True, refit=True)
    tot = dict(vq=0.0, km=0.0, rtn=0.0, gptq=0.0)
    for name, (w, h) in layers.items():
        qv = vqm.vq(w, h, SPEC, CFG)
        assert isinstance(qv, VQWeight)
        dv = damage(w, h, qv)
        dk = hessian_damage(plain_kmeans(w, SPEC) - w, h)
        assert dv < dk, name  # H-weighted fitting and error feedback beat plain k-means on every matrix
        tot["vq"] += dv
        tot["km"] += dk
        tot["rtn"] += damage(w, h, rtn(w, None, int2, gcfg))
        tot["gptq"] += damage(w, h, gptq(w, h, int2, gcfg))
    # scalar 2-bit g64 (2.5 bits per weight on these 64-wide rows) against vq's ~2.1
    assert tot["vq"] < 0.5 * tot["rtn"], tot
    assert tot["vq"] < tot["gptq"], tot


def test_refit_and_feedback_each_lower_the_error(layers, monkeypatch):
    w, h = layers["w1"]
    full = damage(w, h, vqm.vq(w, h, SPEC, CFG))
    monkeypatch.setattr(vqm, "REFIT_ROUNDS", 0)
    no_refit = damage(w, h, vqm.vq(w, h, SPEC, CFG))
    assert full < no_refit
    # without error feedback: an identity H inverse factor (plain nearest-codeword rounding)
    real = vqm._inverse_cholesky
    monkeypatch.setattr(vqm, "_inverse_cholesky", lambda hh, damp: torch.eye(hh.shape[0]) * real(hh, damp).diag().mean())
    no_feedback = damage(w, h, vqm.vq(w, h, SPEC, CFG))
    assert no_refit < no_feedback


def test_deterministic_and_seeded(layers):
    w, h = layers["wo"]
    a, b = vqm.vq(w, h, SPEC, CFG), vqm.vq(w, h, SPEC, CFG)
    for k, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[k]), k
    c = vqm.vq(w, h, SPEC, dataclasses.replace(CFG, seed=1))
    assert not torch.equal(a.codebooks, c.codebooks)


def test_residual_books_and_tiles_run_and_help(layers):
    w, h = layers["w3"]
    one = damage(w, h, vqm.vq(w, h, SPEC, CFG))
    two = vqm.vq(w, h, dataclasses.replace(SPEC, vq_books=2), CFG)
    assert two.indices().shape[1] == 2 and damage(w, h, two) < one
    tiled = vqm.vq(w, h, dataclasses.replace(SPEC, vq_rows=64, vq_cols=32), CFG)
    geo = geometry(tiled.spec, *w.shape)
    assert tiled.codebooks.shape[0] == geo["nrt"] * geo["nct"] > 1
    assert damage(w, h, tiled) < one


def test_int_specs_go_through_gptq_and_presets_parse(layers):
    w, h = layers["wq"]
    assert isinstance(vqm.vq(w, h, QuantSpec(bits=4, group_size=32), CFG), IntWeight)
    with pytest.raises(LeanqError, match="calibration"):
        vqm.vq(w, None, SPEC, CFG)
    f = vqm.vq_fields(2, None, "")
    assert (f["vq_dim"], f["bits"]) == (4, 8)
    f = vqm.vq_fields(2, None, "dim=2,index=6,books=2,rows=none,cols=64")
    assert (f["vq_dim"], f["bits"], f["vq_books"], f["vq_rows"], f["vq_cols"]) == (2, 6, 2, None, 64)
    with pytest.raises(LeanqError, match="KEY=VALUE"):
        vqm.vq_fields(2, None, "size=3")
    with pytest.raises(LeanqError, match="preset"):
        vqm.vq_fields(7, None, "")


def test_planner_measures_and_can_choose_vq(layers):
    """The sensitivity proxy measures vq candidates; the planner picks them when they are the better deal."""
    from leanq.planner import make_plan
    from leanq.sensitivity import SensitivityTable, module_bits, quantized_weight

    cands = (SPEC, QuantSpec(bits=2, group_size=64), QuantSpec(bits=4, group_size=64),
             QuantSpec(fmt="float", dtype="float16"))
    mods = {}
    for name in ("wq", "w1"):
        w, h = layers[name]
        dmg = [hessian_damage(quantized_weight(w, h, c, CFG, "gptq") - w, h) for c in cands]
        mods[f"model.layers.1.{name}"] = {"out": w.shape[0], "in": w.shape[1], "bias": False, "damage": dmg}
    table = SensitivityTable(cands, mods, {})
    vq_bits = sum(module_bits(SPEC, m["out"], m["in"]) for m in mods.values())
    n = sum(m["out"] * m["in"] for m in mods.values())
    plan = make_plan(table, bpw=vq_bits / n + 1e-6)
    assert all(s.fmt == "vq" for s in plan.specs.values())  # under 2.5 bpw nothing else fits
    assert plan.bpw <= vq_bits / n + 1e-6


def test_size_plan_with_method_vq_end_to_end(tiny_hf_folder, text_file, tmp_path, monkeypatch):
    """--method vq --bpw: the sensitivity pass measures the vq candidates and the pipeline stores the mix.

    The tiny model's 64-wide layers cannot carry the presets' 256-entry codebooks (4 bits per
    weight of codebook alone), so the candidates here are small codebooks, 4-bit GPTQ and float16.
    """
    from leanq.api import load, quantize

    cands = (SPEC, QuantSpec(bits=4, group_size=32), QuantSpec(fmt="float", dtype="float16"))
    monkeypatch.setattr(vqm, "VQ_CANDIDATES", cands)
    qm = quantize(str(tiny_hf_folder), method="vq", bits=2, bpw=3.5, calib=str(text_file), nsamples=4, seqlen=32,
                  sensitivity_samples=4, sensitivity_weighting="none", device="cpu", progress=False)
    assert qm.plan is not None and qm.plan.bpw <= 3.5
    assert qm.sensitivity.candidates == cands
    fmts = [mr.spec.fmt for mr in qm.recipe.modules.values()]
    assert len(fmts) == 14 and "vq" in fmts and set(fmts) <= {"vq", "int", "float"}
    ck = qm.save(tmp_path / "ck")
    _, _, r2 = load(ck)
    assert r2.modules == qm.recipe.modules


def test_upfront_codebooks_survive_a_massive_input(layers, monkeypatch):
    """One input with a massive activation in the middle of a layer of several codebook tiles (SmolLM2's
    layers.28.mlp.down_proj has one: 1224x the mean Hessian diagonal).  Codebooks fitted lazily, from the
    weights error feedback has inflated, lose badly; fitted up front (the default) they do not."""
    w, h = layers["w2"]
    dg = torch.ones(h.shape[0])
    dg[40] = 40.0
    hh = dg[:, None] * h * dg[None, :]  # input 40's activations x40
    spec = dataclasses.replace(SPEC, vq_cols=32)  # several column tiles
    upfront = vqm.vq(w, hh, spec, CFG)
    monkeypatch.setattr(vqm, "LAZY_INIT", True)
    lazy = vqm.vq(w, hh, spec, CFG)
    monkeypatch.setattr(vqm, "LAZY_INIT", False)
    assert damage(w, hh, upfront) < 0.8 * damage(w, hh, lazy)
    ordered = vqm.vq(w, hh, spec, dataclasses.replace(CFG, act_order=True))
    again = vqm.vq(w, hh, spec, dataclasses.replace(CFG, act_order=True))
    for k, t in ordered.tensors().items():  # act-order: deterministic, same stored layout
        assert torch.equal(t, again.tensors()[k]), k
        assert t.shape == upfront.tensors()[k].shape, k
    assert damage(w, hh, ordered) < 0.8 * damage(w, hh, lazy)
