"""GGUF export: block encodings against gguf's own dequantizer, and the round trip through leanq's GGUF import."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanq.checkpoint import load, save
from leanq.config import MethodConfig, QuantSpec, Recipe
from leanq.errors import LeanqError
from leanq.export.gguf import encode_blocks, export_gguf
from leanq.pipeline import quantize_blocks


@pytest.fixture(autouse=True)
def _reference_cpu_kernel(monkeypatch):
    """These tests compare leanq's logits with another reader's at float32 precision: pin the pure-torch
    reference on the CPU (the packed int4 op, on by default, rounds activations to bf16)."""
    from leanq.kernels import cpu_int4

    monkeypatch.setattr(cpu_int4, "MAX_ROWS", 0)


gguf = pytest.importorskip("gguf")


def _bpe_tokenizer():
    """A small byte-level BPE tokenizer with real merges (GGUF stores them)."""
    from conftest import TEXT
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bpe():
    return _bpe_tokenizer()


def _checkpoint(path, spec: QuantSpec, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    mc = MethodConfig(name="rtn")
    mods = quantize_blocks(m, spec, mc, None, progress=False)
    save(m, tok, Recipe(source="tiny", model_type="llama", method=mc, default_spec=spec, modules=mods,
                        keep_dtype="float16", leanq_version="test"), path)


@pytest.mark.parametrize("qtype, lo, hi, sym", [("Q8_0", -128, 127, True), ("Q4_0", -8, 7, True), ("Q4_0", -7, 8, True),
                                                ("Q4_1", -15, 0, False), ("Q4_1", 0, 15, False), ("Q4_1", -3, 9, False)])
def test_exact_blocks_decode_to_leanq_values(qtype, lo, hi, sym):
    """A block on one leanq grid (scale s, integers k) decodes, through gguf's dequantizer, to s*k."""
    rng = np.random.default_rng(0)
    n = 64
    s = np.repeat(rng.uniform(1e-3, 2e-2, (n, 1)).astype(np.float16).astype(np.float32), 32, 1)
    k = rng.integers(lo, hi + 1, (n, 32)).astype(np.int32)
    w = s * k
    data, exact = encode_blocks(s, k, w, qtype)
    assert exact.all()
    back = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, qtype))
    tol = 0 if qtype != "Q4_1" else 16 * np.abs(s).max() * 2.0**-11  # only Q4_1's offset m is rounded to fp16
    assert np.abs(back - w).max() <= tol


def test_blocks_off_the_grid_are_requantized():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    s = np.concatenate([np.full((16, 16), 0.1), np.full((16, 16), 0.2)], 1).astype(np.float32)  # two groups in a block
    data, exact = encode_blocks(s, np.zeros((16, 32), np.int32), w, "Q8_0")
    assert not exact.any()
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(data, ref)


@pytest.mark.parametrize("spec, qtype, exact_share, max_rel", [
    (QuantSpec(bits=4, group_size=32, sym=True), "auto", 1.0, 1e-6),     # Q4_0, bit-exact
    (QuantSpec(bits=4, group_size=128, sym=False), "auto", 1.0, 1e-2),   # Q4_1, offset rounded to fp16
    (QuantSpec(bits=8, group_size=None, sym=True), "auto", 1.0, 1e-6),   # Q8_0, bit-exact
    (QuantSpec(bits=4, group_size=128, sym=False), "Q4_0", None, 0.5),   # requantized: the error is reported
], ids=["int4-sym-Q4_0", "int4-asym-Q4_1", "int8-sym-Q8_0", "int4-asym-as-Q4_0"])
def test_round_trip_through_leanq_gguf_import(tmp_path, bpe, spec, qtype, exact_share, max_rel):
    from leanq.models import load_float

    src, out = tmp_path / "ck", tmp_path / "m.gguf"
    _checkpoint(src, spec, bpe)
    rep = export_gguf(src, out, qtype=qtype)
    if exact_share is not None:
        assert rep["exact_share"] == exact_share
    else:
        assert 0 < rep["rel_sq_err"] < 0.05 and rep["exact_share"] < 1
    ours, tok, _ = load(src)
    lf = load_float(str(out))
    ids = torch.randint(0, len(bpe), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, lf.model(ids).logits
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel <= max_rel, rel
    text = "The quick brown fox jumps over the lazy dog."
    assert lf.tokenizer(text).input_ids == tok(text).input_ids


def test_refusals(tmp_path, bpe):
    src = tmp_path / "ck"
    _checkpoint(src, QuantSpec(bits=4, group_size=32, sym=True), bpe)
    with pytest.raises(LeanqError):
        export_gguf(src, tmp_path / "x.gguf", qtype="Q2_K")
    export_gguf(src, tmp_path / "x.gguf")
    with pytest.raises(LeanqError, match="already exists"):
        export_gguf(src, tmp_path / "x.gguf")
