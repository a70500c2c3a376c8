"""The vector-quantized format: spec checks, packing, bits-per-weight accounting, save -> load identity."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanq.checkpoint import load, save
from leanq.config import MethodConfig, QuantSpec, Recipe
from leanq.errors import LeanqError
from leanq.formats.intq import bits_per_weight
from leanq.formats.vq import geometry, pack_vq_weight, vq_shapes
from leanq.modules import QuantLinear

from conftest import tiny_model, tiny_tokenizer


def vq_spec(**kw) -> QuantSpec:
    f = dict(fmt="vq", bits=8, vq_dim=4, group_size=None)
    f.update(kw)
    return QuantSpec(**f)


def random_parts(spec: QuantSpec, out_f: int, in_f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    geo = geometry(spec, out_f, in_f)
    idx = torch.randint(0, geo["K"], (out_f, spec.vq_books, geo["nvec"]), generator=g)
    books = torch.randn(geo["nrt"] * geo["nct"], spec.vq_books, geo["K"], spec.vq_dim, generator=g).half().float()
    scales = (torch.rand(out_f, geo["nsg"], generator=g) + 0.5).half().float()
    return idx, books, scales


@pytest.mark.parametrize("kw,in_f", [
    (dict(), 64), (dict(bits=6, vq_dim=2, vq_cols=16, group_size=32), 40), (dict(bits=5, vq_dim=3), 44),
    (dict(bits=4, vq_dim=2, vq_books=2, vq_rows=4), 24), (dict(bits=3, vq_dim=8, vq_books=3), 64)])
def test_pack_round_trip_and_decode_by_hand(kw, in_f):
    spec = vq_spec(**kw)
    out_f = 10
    idx, books, scales = random_parts(spec, out_f, in_f)
    vw = pack_vq_weight(idx, books, scales, spec, in_f)
    assert torch.equal(vw.indices(), idx)
    geo = geometry(spec, out_f, in_f)
    w = vw.dequantize()
    d = spec.vq_dim
    for r in (0, out_f - 1):
        for v in (0, geo["nvec"] - 1):
            tile = (r // geo["rows"]) * geo["nct"] + (v * d) // geo["cols"]
            vec = sum(books[tile, b, idx[r, b, v]] for b in range(spec.vq_books))
            for a in range(d):
                col = v * d + a
                if col < in_f:
                    want = vec[a] * scales[r, col // geo["group"]]
                    assert w[r, col].item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)


def test_bits_per_weight_counts_indices_codebooks_and_scales():
    spec = vq_spec(vq_cols=192)
    out_f, in_f = 1536, 576
    idx, books, scales = random_parts(spec, out_f, in_f)
    vw = pack_vq_weight(idx, books, scales, spec, in_f)
    want = 8 * 1 * (in_f // 4) * out_f + 16 * 3 * 256 * 4 + 16 * out_f  # indices + 3 codebooks + per-row scales
    assert 8 * vw.nbytes() == want
    assert bits_per_weight(spec, out_f, in_f) == pytest.approx(want / (out_f * in_f))
    assert 2.0 < bits_per_weight(spec, out_f, in_f) < 2.1
    # residual books double the indices and the codebooks
    spec2 = vq_spec(bits=6, vq_books=2, vq_dim=4)
    shapes = vq_shapes(spec2, 20, 40)
    assert shapes["qweight"][0] == (20, 2 * 6 * math.ceil(10 / 8))
    assert shapes["codebooks"][0] == (1, 2, 64, 4)


@pytest.mark.parametrize("kw,msg", [
    (dict(vq_dim=9), "vq_dim"), (dict(vq_dim=0), "vq_dim"), (dict(bits=9), "index bits"),
    (dict(vq_books=5), "vq_books"), (dict(vq_cols=6), "vq_cols"), (dict(group_size=30), "group_size"),
    (dict(vq_rows=0), "vq_rows")])
def test_bad_specs_are_refused(kw, msg):
    with pytest.raises(LeanqError, match=msg):
        vq_spec(**kw)


def test_vq_fields_only_with_fmt_vq_and_old_json_unchanged():
    with pytest.raises(LeanqError, match="fmt='vq' only"):
        QuantSpec(bits=4, vq_dim=4)
    # recipes of other formats keep exactly the fields they had
    assert set(QuantSpec().to_dict()) == {"fmt", "bits", "group_size", "sym", "dtype", "in_scale"}
    old = {"fmt": "int", "bits": 3, "group_size": 128, "sym": False, "dtype": "float16", "in_scale": False}
    assert QuantSpec.from_dict(old) == QuantSpec(bits=3)
    s = vq_spec(vq_books=2, vq_rows=64, vq_cols=192, bits=6)
    assert QuantSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert "vq d4 6-bit x2" in s.describe()


def _vq_model(seed: int = 0):
    from leanq.api import _round_kept
    from leanq.pipeline import quantize_blocks

    m = tiny_model("llama", seed=seed)
    spec = vq_spec(bits=3, vq_dim=2, vq_cols=32)  # 8 codewords: quick
    cfg = MethodConfig(name="vq", nsamples=4, seqlen=32)
    calib = torch.randint(0, m.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
    mods = quantize_blocks(m, spec, cfg, calib, progress=False)
    _round_kept(m, "float16")
    return m, Recipe(source="tiny", model_type="llama", method=cfg, default_spec=spec, modules=mods)


def test_save_load_identity_and_validated_shapes(tmp_path):
    m, recipe = _vq_model()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(ids).logits
    save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    m2, _, r2 = load(tmp_path / "ck")
    with torch.no_grad():
        after = m2(ids).logits
    assert torch.equal(before, after)
    assert r2 == recipe
    qls = [x for x in m2.modules() if isinstance(x, QuantLinear)]
    assert len(qls) == 14 and all(q.fmt == "vq" for q in qls)
    # generate runs on the reference kernel (CPU)
    out = m2.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)

    # a recipe that describes other codebooks than the file holds: one clear error
    rj = json.loads((tmp_path / "ck" / "leanq.json").read_text())
    name = sorted(rj["modules"])[0]
    rj["modules"][name]["spec"]["vq_cols"] = 16
    (tmp_path / "ck" / "leanq.json").write_text(json.dumps(rj))
    with pytest.raises(LeanqError, match="codebooks"):
        load(tmp_path / "ck", verify=False)
