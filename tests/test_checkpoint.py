"""Save -> load bitwise identity, determinism, and one clear error for each bad checkpoint."""

import json
import shutil

import pytest
import torch

from leanq.api import _round_kept
from leanq.checkpoint import load, save
from leanq.config import MethodConfig, QuantSpec, Recipe
from leanq.errors import LeanqError
from leanq.modules import QuantLinear
from leanq.pipeline import quantize_blocks

from conftest import tiny_model, tiny_tokenizer


def quantized(model_type="llama", method="gptq", spec=QuantSpec(bits=4, group_size=32), seed=0):
    m = tiny_model(model_type, seed=seed)
    cfg = MethodConfig(name=method, nsamples=8, seqlen=32)
    calib = torch.randint(0, m.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(seed))
    mods = quantize_blocks(m, spec, cfg, calib, progress=False)
    _round_kept(m, "float16")
    recipe = Recipe(source="tiny", model_type=m.config.model_type, method=cfg, default_spec=spec, modules=mods)
    return m, recipe


def test_save_load_bitwise_identical(tmp_path):
    m, recipe = quantized()
    tok = tiny_tokenizer()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(ids).logits
    save(m, tok, recipe, tmp_path / "ck")
    m2, tok2, r2 = load(tmp_path / "ck")
    with torch.no_grad():
        after = m2(ids).logits
    assert torch.equal(before, after)
    assert r2 == recipe
    assert sum(isinstance(x, QuantLinear) for x in m2.modules()) == len(recipe.modules) == 14
    assert tok2 is not None and tok2("fox").input_ids == tok("fox").input_ids


def test_same_inputs_same_bytes(tmp_path):
    a, ra = quantized(seed=3)
    b, rb = quantized(seed=3)
    save(a, None, ra, tmp_path / "a")
    save(b, None, rb, tmp_path / "b")
    for f in ("model.safetensors", "leanq.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_existing_output_is_not_overwritten(tmp_path):
    m, r = quantized(method="rtn")
    out = tmp_path / "ck"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LeanqError, match="already exists"):
        save(m, None, r, out)
    with pytest.raises(LeanqError, match="not a leanq checkpoint"):
        save(m, None, r, out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_checkpoint_and_leaves_no_temp(tmp_path):
    m, r = quantized(method="rtn")
    save(m, None, r, tmp_path / "ck")
    save(m, None, r, tmp_path / "ck", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_released_model_is_not_saved(tmp_path):
    """A kernel's release_stored (inference only) frees the stored buffers; saving then stops with one clear
    error and writes nothing, instead of a checkpoint that cannot be read back."""
    from leanq.kernels import drop_stored

    m, recipe = quantized(method="rtn")
    layer = next(x for x in m.modules() if isinstance(x, QuantLinear))
    drop_stored(layer)
    with pytest.raises(LeanqError, match="released for inference"):
        save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    assert not (tmp_path / "ck").exists() and not list(tmp_path.glob(".ck.tmp-*"))


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import leanq.checkpoint as ck

    m, r = quantized(method="rtn")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_sha256", boom)
    with pytest.raises(KeyboardInterrupt):
        save(m, None, r, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "ck"
    m, r = quantized(method="rtn")
    save(m, tiny_tokenizer(), r, d)
    return d


def broken(good_ckpt, tmp_path, edit):
    d = tmp_path / "ck"
    shutil.copytree(good_ckpt, d)
    edit(d)
    return d


def _truncate(d):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _flip(d):
    p = d / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[-10] ^= 0xFF
    p.write_bytes(bytes(b))


def _recipe(d, change):
    p = d / "leanq.json"
    j = json.loads(p.read_text())
    change(j)
    p.write_text(json.dumps(j))


CASES = {
    "missing recipe": (lambda d: (d / "leanq.json").unlink(), "leanq.json: missing"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    "truncated weights": (_truncate, "truncated"),
    "corrupt weights": (_flip, "sha256"),
    "bad json": (lambda d: (d / "leanq.json").write_text("{nope"), "not valid JSON"),
    "wrong version": (lambda d: _recipe(d, lambda j: j.update(version=99)), "version 99"),
    "bad bits": (lambda d: _recipe(d, lambda j: j["default_spec"].update(bits=11)), "bits must be"),
    "unknown field": (lambda d: _recipe(d, lambda j: j["method"].update(evil=1)), "unknown field"),
    "wrong shape": (lambda d: _recipe(d, lambda j: next(iter(j["modules"].values())).update(in_features=128)),
                    "in the recipe|expected"),
    "unknown module": (lambda d: _recipe(d, lambda j: j["modules"].update(
        {"model.nope": next(iter(j["modules"].values()))})), "does not exist"),
    "missing config": (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    "broken config": (lambda d: (d / "config.json").write_text("[1, 2"), "config.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_one_clear_error(good_ckpt, tmp_path, case):
    edit, msg = CASES[case]
    d = broken(good_ckpt, tmp_path, edit)
    with pytest.raises(LeanqError, match=msg) as e:
        load(d)
    assert "\n" not in str(e.value)
