"""Hostile input: property and fuzz tests of every reader leanq has.

Readers: the checkpoint folder (leanq.json recipe, model.safetensors,
config.json, tokenizer files), GGUF files (``models._check_gguf`` + the
transformers GGUF loader behind ``load_float``), the lean runtime's own
readers of both (``leanq.runtime.load``) and the CLI on top of them.
The property is the same everywhere: a damaged or malicious input either
loads, or raises one :class:`LeanqError` whose message is one line (the CLI:
exit status 2 and one ``leanq: error: ...`` line) — never another exception,
a hang or an allocation far beyond the input's size.

Mutated safetensors files get their recorded size and sha256 updated, so the
mutation reaches the parser instead of stopping at the checksum.  Example
counts and deadlines keep the whole file well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanq.checkpoint import RECIPE, WEIGHTS, load, read_recipe
from leanq.cli import main as cli_main
from leanq.errors import LeanqError

# LEANQ_FUZZ_SCALE=20 multiplies every example count, for a long local fuzzing run, which also draws new examples
# each time; at the default scale (the test suite, CI) the examples are the same every run (derandomize), so that a
# case found by a long run becomes a named test here rather than a failure that comes and goes
SCALE = max(1, int(os.environ.get("LEANQ_FUZZ_SCALE", "1")))
# deadline: generous, because CI shares 2 cores; a hang still fails
FUZZ = settings(max_examples=25 * SCALE, deadline=20000, suppress_health_check=list(HealthCheck), database=None,
                derandomize=SCALE == 1)

# --------------------------------------------------------------------------- fixtures


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A valid leanq checkpoint of a tiny random Llama (RTN int4 g16 asym) with a tokenizer."""
    from conftest import tiny_tokenizer

    from leanq.checkpoint import save
    from leanq.config import MethodConfig, QuantSpec, Recipe
    from leanq.pipeline import quantize_blocks

    m = _tiny_model()
    spec, mc = QuantSpec(bits=4, group_size=16), MethodConfig(name="rtn")
    mods = quantize_blocks(m, spec, mc, None, progress=False)
    r = Recipe(source="tiny", model_type="llama", method=mc, default_spec=spec, modules=mods,
               keep_dtype="float16", leanq_version="test")
    out = tmp_path_factory.mktemp("fuzz") / "ck"
    save(m, tiny_tokenizer(), r, out)
    load(out)  # the unmutated checkpoint must load, or every test below proves nothing
    return out


def _copy(src: Path) -> Path:
    """A fresh copy of the checkpoint ``src`` beside it (under pytest's temporary directory, which pytest prunes;
    hypothesis examples cannot take a function-scoped ``tmp_path``)."""
    d = Path(tempfile.mkdtemp(prefix="copy-", dir=src.parent)) / "ck"
    shutil.copytree(src, d)
    return d


def _reseal(d: Path) -> None:
    """Record the current model.safetensors size and sha256 in leanq.json."""
    r = json.loads((d / RECIPE).read_text())
    b = (d / WEIGHTS).read_bytes()
    r["files"][WEIGHTS] = {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
    (d / RECIPE).write_text(json.dumps(r))


def _outcome(fn) -> str:
    """'ok' or 'error' (a one-line LeanqError); any other exception fails the test."""
    try:
        fn()
    except LeanqError as e:
        assert "\n" not in str(e), f"multi-line error: {e!r}"
        return "error"
    return "ok"


def _load_and_run(d: Path) -> str:
    def go():
        model, tok, _ = load(d)
        with torch.no_grad():  # a checkpoint that loads must also run
            model(torch.tensor([[1, 2, 3]]))
    try:
        return _outcome(go)
    finally:
        shutil.rmtree(d.parent, ignore_errors=True)


# JSON values of every kind, including the awkward ones: huge and negative ints, deep nesting
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30])
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


def _paths(obj, prefix=()):
    """Every (path) into a nested dict/list structure."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_json(data, obj):
    """Replace, delete or add one field somewhere in ``obj`` (a deep copy is changed)."""
    obj = copy.deepcopy(obj)
    path = data.draw(st.sampled_from(_paths(obj)))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(json_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(json_values)
    return obj


def _mutate_bytes(data, b: bytes, hot: int | None = None) -> bytes:
    """Truncate, flip bytes (mostly within the first ``hot`` bytes), insert or delete a run."""
    b = bytearray(b)
    hot = min(hot or len(b), len(b))
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    if kind == "truncate":
        return bytes(b[: data.draw(st.integers(0, len(b) - 1))])
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, hot - 1))
            b[i] = data.draw(st.integers(0, 255))
        return bytes(b)
    i = data.draw(st.integers(0, hot))
    if kind == "insert":
        return bytes(b[:i] + data.draw(st.binary(min_size=1, max_size=16)) + b[i:])
    return bytes(b[:i] + b[i + data.draw(st.integers(1, 16)):])


# --------------------------------------------------------------------------- leanq.json


@FUZZ
@given(value=json_values)
def test_recipe_random_json(ckpt, value):
    d = _copy(ckpt)
    try:
        (d / RECIPE).write_text(json.dumps(value))
        with pytest.raises(LeanqError):
            read_recipe(d)
    finally:
        shutil.rmtree(d.parent, ignore_errors=True)


@settings(FUZZ, max_examples=40 * SCALE)
@given(data=st.data())
def test_recipe_field_mutation(ckpt, data):
    d = _copy(ckpt)
    r = _mutate_json(data, json.loads((d / RECIPE).read_text()))
    (d / RECIPE).write_text(json.dumps(r))
    _load_and_run(d)


@FUZZ
@given(data=st.data())
def test_recipe_bytes_mutation(ckpt, data):
    d = _copy(ckpt)
    try:
        (d / RECIPE).write_bytes(_mutate_bytes(data, (d / RECIPE).read_bytes()))
        _outcome(lambda: read_recipe(d))
    finally:
        shutil.rmtree(d.parent, ignore_errors=True)


@pytest.mark.parametrize("text, what", [
    ('{"version": ' + "1" * 5000 + "}", "integer beyond Python's digit limit"),
    ('{"version": 1, "x": NaN}', "NaN literal"),
    ('{"version": 1, "x": 1e999}', "float overflowing to inf"),
    ("[" * 100000 + "]" * 100000, "deep nesting"),
    ('{"version": true}', "version true (== 1 in Python)"),
    ('{"version": 2}', "future version"),
    ("\xff\xfe", "not UTF-8"),
])
def test_recipe_awkward_json(ckpt, text, what):
    d = _copy(ckpt)
    try:
        (d / RECIPE).write_bytes(text.encode("utf-8", "surrogateescape") if what != "not UTF-8" else b"\xff\xfe")
        with pytest.raises(LeanqError) as e:
            read_recipe(d)
        assert "\n" not in str(e.value), what
    finally:
        shutil.rmtree(d.parent, ignore_errors=True)


@pytest.mark.parametrize("field, value", [
    ("in_features", 1 << 20), ("out_features", 1 << 20), ("in_features", 31), ("bias", True),
    ("spec", {"fmt": "int", "bits": 4, "group_size": 10**400, "sym": False, "dtype": "float16"}),
    ("spec", {"fmt": "int", "bits": 9}), ("spec", {"fmt": "float", "dtype": "float64"}),
])
def test_recipe_module_bounds(ckpt, field, value):
    """A recipe asking for tensors of another size is refused before anything is allocated."""
    d = _copy(ckpt)
    r = json.loads((d / RECIPE).read_text())
    name = sorted(r["modules"])[0]
    r["modules"][name][field] = value
    if field in ("in_features", "out_features") and value == 1 << 20:
        r["modules"][name]["in_features"] = r["modules"][name]["out_features"] = 1 << 20  # 2**40 codes
    (d / RECIPE).write_text(json.dumps(r))
    assert _load_and_run(d) == "error"


# --------------------------------------------------------------------------- model.safetensors


@settings(FUZZ, max_examples=50 * SCALE)
@given(data=st.data())
def test_safetensors_bytes_mutation(ckpt, data):
    d = _copy(ckpt)
    raw = (d / WEIGHTS).read_bytes()
    hlen = struct.unpack("<Q", raw[:8])[0]
    if data.draw(st.booleans()):
        claimed = data.draw(st.sampled_from([0, 1, 7, hlen - 1, hlen + 1, len(raw), 1 << 30, 1 << 40, 2**64 - 1]))
        raw = struct.pack("<Q", claimed) + raw[8:]
    else:
        raw = _mutate_bytes(data, raw, hot=hlen + 8)
    (d / WEIGHTS).write_bytes(raw)
    _reseal(d)
    _load_and_run(d)


SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
                      "F8_E4M3", "F8_E5M2", "C64", "XX"]


@settings(FUZZ, max_examples=50 * SCALE)
@given(data=st.data())
def test_safetensors_header_edit(ckpt, data):
    """Well-formed files whose header lies: wrong dtype, shape, offsets, missing or extra tensors."""
    d = _copy(ckpt)
    raw = (d / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    ent = header[name]
    kind = data.draw(st.sampled_from(["dtype", "shape", "offsets", "delete", "extra", "metadata"]))
    if kind == "dtype":
        ent["dtype"] = data.draw(st.sampled_from(SAFETENSORS_DTYPES))
    elif kind == "shape":
        ent["shape"] = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 16, 32, 96, -1, 2**31, 2**62]), max_size=4))
    elif kind == "offsets":
        ent["data_offsets"] = data.draw(st.lists(st.integers(-1, 2**64), min_size=2, max_size=2))
    elif kind == "delete":
        del header[name]
    elif kind == "extra":
        header["extra.weight"] = {"dtype": "F16", "shape": [4], "data_offsets": [len(body), len(body) + 8]}
        body += bytes(8)
    else:
        header["__metadata__"] = data.draw(json_values)
    hb = json.dumps(header).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(hb)) + hb + body)
    _reseal(d)
    _load_and_run(d)


def test_safetensors_nonfinite_and_negative_scales(ckpt):
    from safetensors.torch import load_file, save_file

    for bad in ("nan", "negative"):
        d = _copy(ckpt)
        state = load_file(str(d / WEIGHTS))
        k = next(k for k in sorted(state) if k.endswith(".scales"))
        state[k] = state[k].clone()
        state[k][0, 0] = float("nan") if bad == "nan" else -1.0
        save_file(state, str(d / WEIGHTS))
        _reseal(d)
        assert _load_and_run(d) == "error", bad


# --------------------------------------------------------------------------- config.json and tokenizer


_config_values = st.one_of(json_values, st.sampled_from([0, -1, -4, 1, 3, 2**20, 10**6, 10**12, 2**63, "silu", "x", None]))


@settings(FUZZ, max_examples=40 * SCALE)
@given(data=st.data())
def test_config_mutation(ckpt, data):
    d = _copy(ckpt)
    cfg = json.loads((d / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(cfg) + ["auto_map", "num_experts", "rope_scaling", "torch_dtype",
                                                   "output_hidden_states", "output_attentions", "return_dict"]))
    if key in cfg and data.draw(st.booleans()):
        del cfg[key]
    else:
        cfg[key] = data.draw(_config_values)
    (d / "config.json").write_text(json.dumps(cfg))
    _load_and_run(d)


@pytest.mark.parametrize("field, value", [("return_dict", False), ("torchscript", True), ("output_hidden_states", True),
                                          ("output_attentions", True)])
def test_config_output_flags_still_load_and_run(ckpt, field, value):
    """Valid flags that change what forward() returns (found by test_config_mutation: return_dict false crashed
    transformers' own forward): the checkpoint loads and runs, its outputs still carry the logits."""
    d = _copy(ckpt)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        model, _, _ = load(d)
        with torch.no_grad():
            assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 96)
    finally:
        shutil.rmtree(d.parent, ignore_errors=True)


@pytest.mark.parametrize("field, value", [("return_dict", False), ("torchscript", True)])
def test_hf_folder_output_flags_still_run(tmp_path, field, value):
    """The same flags in a Hugging Face folder that leanq quantizes or evaluates (``load_float``)."""
    from leanq.models import load_float

    _tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_float(str(tmp_path), with_tokenizer=False).model
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 96)


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 10**12), ("hidden_size", 10**6), ("intermediate_size", 10**9), ("num_hidden_layers", 10**7),
    ("num_attention_heads", 0), ("hidden_size", -4), ("hidden_act", "nope"), ("torch_dtype", "foo"),
    ("model_type", "not-a-model"), ("output_hidden_states", [None]), ("output_attentions", 0.0), ("auto_map", {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}),
])
def test_config_hostile_sizes(ckpt, field, value):
    """Sizes that would exhaust memory or hang the build are refused at once (each well under a second)."""
    d = _copy(ckpt)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    if field == "auto_map":
        cfg["model_type"] = "evil"  # code the loader would have to import: must be refused, not run or prompted for
        (d / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    (d / "config.json").write_text(json.dumps(cfg))
    assert _load_and_run(d) == "error"


@FUZZ
@given(data=st.data())
def test_tokenizer_mutation(ckpt, data):
    d = _copy(ckpt)
    f = d / data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json"]))
    f.write_bytes(_mutate_bytes(data, f.read_bytes(), hot=2000))
    _load_and_run(d)


@pytest.mark.parametrize("edit", ["model type", "bad regex", "not an object"])
def test_tokenizer_hostile(ckpt, edit):
    """The tokenizers library raises bare Exception for these (schema mismatch, regex error)."""
    d = _copy(ckpt)
    t = json.loads((d / "tokenizer.json").read_text())
    if edit == "model type":
        t["model"]["type"] = "Nope"
    elif edit == "bad regex":
        t["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated", "invert": False}
    else:
        t = [t]
    (d / "tokenizer.json").write_text(json.dumps(t))
    assert _load_and_run(d) == "error"


# --------------------------------------------------------------------------- GGUF


def write_tiny_gguf(path: Path, meta: dict | None = None, layers: int = 1) -> None:
    """A tiny float32 Llama GGUF (no tokenizer) written with gguf's GGUFWriter."""
    import gguf

    h, ff, vocab = 32, 64, 64
    w = gguf.GGUFWriter(str(path), "llama")
    kv = dict(context_length=64, embedding_length=h, block_count=layers, feed_forward_length=ff,
              head_count=4, head_count_kv=2, vocab_size=vocab)
    kv.update(meta or {})
    kv = {(f"attention.{k}" if k.startswith("head_count") else k): v for k, v in kv.items()}
    for k, v in kv.items():
        (w.add_uint32 if v < 2**32 else w.add_uint64)(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)

    def t(*s):
        return (rng.standard_normal(s) * 0.02).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, h))
    for i in range(layers):
        for n, s in [("attn_q", (h, h)), ("attn_k", (h // 2, h)), ("attn_v", (h // 2, h)), ("attn_output", (h, h)),
                     ("ffn_gate", (ff, h)), ("ffn_up", (ff, h)), ("ffn_down", (h, ff))]:
            w.add_tensor(f"blk.{i}.{n}.weight", t(*s))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from transformers.utils import logging as hf_logging

    from leanq.models import load_float

    hf_logging.disable_progress_bar()
    p = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(p)
    load_float(str(p), with_tokenizer=False)  # the unmutated file must load
    return p


def _gguf_outcome(raw: bytes) -> str:
    from leanq.models import load_float

    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "m.gguf"
        p.write_bytes(raw)

        def go():
            m = load_float(str(p), with_tokenizer=False).model
            with torch.no_grad():
                m(torch.tensor([[1, 2, 3]]))
        return _outcome(go)


@settings(FUZZ, max_examples=40 * SCALE)
@given(data=st.data())
def test_gguf_bytes_mutation(tiny_gguf, data):
    raw = tiny_gguf.read_bytes()
    if data.draw(st.booleans()):  # the version, tensor count and metadata count words of the header
        off = data.draw(st.sampled_from([4, 8, 16]))
        val = data.draw(st.sampled_from([0, 1, 2, 3, 99, 2**31, 2**63, 2**64 - 1]))
        raw = raw[:off] + struct.pack("<I" if off == 4 else "<Q", val % (2**32 if off == 4 else 2**64)) + raw[off + (4 if off == 4 else 8):]
    else:
        raw = _mutate_bytes(data, raw, hot=1500)
    _gguf_outcome(raw)


@pytest.mark.parametrize("meta", [{"block_count": 10**6}, {"embedding_length": 10**6}, {"feed_forward_length": 10**9},
                                  {"embedding_length": 2**40}, {"head_count": 0}])
def test_gguf_hostile_metadata(tmp_path, meta):
    p = tmp_path / "m.gguf"
    write_tiny_gguf(p, meta)
    assert _gguf_outcome(p.read_bytes()) == "error"


def test_gguf_garbage_and_wrong_magic(tmp_path):
    rng = np.random.default_rng(0)
    for raw in [b"", b"GGU", b"GGUF", b"GGUF" + rng.bytes(4000), b"PK\x03\x04" + rng.bytes(100)]:
        assert _gguf_outcome(raw) == "error"


# --------------------------------------------------------------------------- the lean runtime's readers


def _lean_run(p: Path, cleanup: Path | None = None) -> str:
    """leanq.runtime.load, then two greedy tokens: 'ok' or 'error' (one-line LeanqError)."""
    from leanq import runtime

    def go():
        lm, _ = runtime.load(p)
        lm.generate([1, 2, 3], 2, stop_at_eos=False)
    try:
        return _outcome(go)
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


def test_lean_reads_the_unmutated_inputs(ckpt, tiny_gguf):
    assert _lean_run(ckpt) == "ok" and _lean_run(tiny_gguf) == "ok"


@settings(FUZZ, max_examples=40 * SCALE)
@given(data=st.data())
def test_lean_config_mutation(ckpt, data):
    d = _copy(ckpt)
    cfg = json.loads((d / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(cfg) + ["rope_scaling", "head_dim", "attention_bias", "sliding_window"]))
    if key in cfg and data.draw(st.booleans()):
        del cfg[key]
    else:
        cfg[key] = data.draw(_config_values)
    (d / "config.json").write_text(json.dumps(cfg))
    _lean_run(d, d.parent)


@FUZZ
@given(data=st.data())
def test_lean_weights_and_tokenizer_mutation(ckpt, data):
    d = _copy(ckpt)
    name = data.draw(st.sampled_from([WEIGHTS, "tokenizer.json"]))
    (d / name).write_bytes(_mutate_bytes(data, (d / name).read_bytes(), hot=3000))
    if name == WEIGHTS:
        _reseal(d)
    _lean_run(d, d.parent)


@settings(FUZZ, max_examples=40 * SCALE)
@given(data=st.data())
def test_lean_gguf_bytes_mutation(tiny_gguf, data):
    raw = _mutate_bytes(data, tiny_gguf.read_bytes(), hot=1500)
    t = Path(tempfile.mkdtemp(prefix="gguf-", dir=tiny_gguf.parent))
    (t / "m.gguf").write_bytes(raw)
    _lean_run(t / "m.gguf", t)


@pytest.mark.parametrize("meta", [{"block_count": 10**6}, {"embedding_length": 10**6}, {"feed_forward_length": 10**9},
                                  {"embedding_length": 2**40}, {"head_count": 0}, {"context_length": 0}])
def test_lean_gguf_hostile_metadata(tmp_path, meta):
    write_tiny_gguf(tmp_path / "m.gguf", meta)
    assert _lean_run(tmp_path / "m.gguf") == "error"


# --------------------------------------------------------------------------- CLI


def _cli(argv, capsys) -> tuple[int, str]:
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _assert_one_error_line(rc, err):
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("leanq: error: "), err


def test_cli_hostile_checkpoints(ckpt, tmp_path, capsys):
    bad = []
    d = _copy(ckpt)
    (d / RECIPE).write_text("{not json")
    bad.append(d)
    d = _copy(ckpt)
    r = json.loads((d / RECIPE).read_text())
    r["files"][WEIGHTS]["bytes"] = "many"
    (d / RECIPE).write_text(json.dumps(r))
    bad.append(d)
    d = _copy(ckpt)
    (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:100])
    _reseal(d)
    bad.append(d)
    g = tmp_path / "bad.gguf"
    g.write_bytes(b"GGUF" + bytes(20))
    for d in bad:
        for argv in (["info", str(d), "--kernels"], ["generate", str(d), "--prompt", "hi"], ["eval", str(d)]):
            _assert_one_error_line(*_cli(argv, capsys))
    for argv in (["generate", str(g), "--prompt", "hi"], ["info", str(g)], ["info", str(tmp_path / "nope")]):
        _assert_one_error_line(*_cli(argv, capsys))


@pytest.mark.parametrize("argv", [
    ["eval", "X", "--max-windows", "-2"], ["eval", "X", "--max-windows", "0"], ["eval", "X", "--device", "tpu"],
    ["generate", "X", "--prompt", "hi", "--max-new-tokens", "-1"], ["generate", "X", "--prompt", "  "],
    ["quantize", "X", "--out", "Y", "--nsamples", "0"], ["quantize", "X", "--out", "Y", "--seqlen", "-1"],
])
def test_cli_bad_arguments(ckpt, argv, capsys):
    """Found by probing: --max-windows -2 (ZeroDivisionError), --max-new-tokens -1, an empty prompt, --device tpu."""
    argv = [str(ckpt) if x == "X" else x for x in argv]
    _assert_one_error_line(*_cli(argv, capsys))


def test_cli_subprocess_no_traceback(ckpt):
    """End to end through the console entry: exit 2, one line, no traceback."""
    d = _copy(ckpt)
    try:
        (d / RECIPE).write_text("[" * 100000)  # deep nesting: RecursionError inside json, in a fresh interpreter
        p = subprocess.run([sys.executable, "-m", "leanq", "info", str(d)], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert "Traceback" not in p.stderr and len(lines) == 1 and lines[0].startswith("leanq: error: "), p.stderr
    finally:
        shutil.rmtree(d.parent, ignore_errors=True)


# --------------------------------------------------------------------------- nothing unpickles


def test_no_code_path_unpickles():
    """leanq reads weights from safetensors/GGUF only; any torch.load must pass weights_only=True."""
    src = Path(__file__).resolve().parents[1] / "src" / "leanq"
    problems = []
    for f in sorted(src.rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{f.name}: {m.group(0)}")
        for pat in (r"\bimport pickle\b", r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"trust_remote_code\s*=\s*True",
                    r"\bimport dill\b", r"\bjoblib\.load\("):
            problems += [f"{f.name}: {pat}" for _ in re.finditer(pat, text)]
    assert not problems, problems
