"""benchmarks/interop/llamacpp_ppl.py: the protocol equals leanq's, and (when installed) llama.cpp runs leanq's GGUF.

The llama.cpp test is skipped when ``llama_cpp`` (llama-cpp-python) is not installed: it is a
benchmark client, not a leanq dependency.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from leanq.checkpoint import load, save
from leanq.config import MethodConfig, QuantSpec, Recipe
from leanq.evaluate import perplexity
from leanq.pipeline import quantize_blocks

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks/interop/llamacpp_ppl.py"


def _script():
    spec = importlib.util.spec_from_file_location("llamacpp_ppl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_llama(vocab: int, init: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def test_windowed_ppl_is_leanq_perplexity():
    """Same windows (partial tail dropped, max_windows honoured), same scoring, same number."""
    m = _tiny_llama(96)
    ids = torch.randint(0, 96, (16 * 3 + 5,), generator=torch.Generator().manual_seed(1))
    mod = _script()
    for max_windows in (None, 2):
        ref, n_ref = perplexity(m, ids, 16, max_windows, "cpu", progress=False)
        with torch.no_grad():
            got, n, per = mod.windowed_ppl(lambda x: m(x[None], use_cache=False).logits[0], ids, 16, max_windows)
        assert n == n_ref == 15 * (3 if max_windows is None else 2) and len(per) == n // 15
        assert got == pytest.approx(ref, rel=1e-6)


def test_llama_cpp_runs_leanq_q4_0_export(tmp_path):
    """int4 g32 sym -> Q4_0 (every block copied): llama.cpp's logits and ppl follow leanq's module."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (benchmark client, optional)")
    pytest.importorskip("gguf")
    from test_export_gguf import _bpe_tokenizer

    from leanq.export.gguf import export_gguf

    tok = _bpe_tokenizer()
    m = _tiny_llama(len(tok), init=0.1)  # larger weights than the default: logits far from uniform
    fl = copy.deepcopy(m)
    spec, mc = QuantSpec(bits=4, group_size=32, sym=True), MethodConfig(name="rtn")
    mods = quantize_blocks(m, spec, mc, None, progress=False)
    src = tmp_path / "ck"
    save(m, tok, Recipe(source="tiny", model_type="llama", method=mc, default_spec=spec, modules=mods,
                        keep_dtype="float16", leanq_version="test"), src)
    rep = export_gguf(src, tmp_path / "m.gguf", qtype="Q4_0")
    assert rep["exact_share"] == 1.0
    ours, _, _ = load(src)
    ids = torch.randint(0, len(tok), (32 * 3,), generator=torch.Generator().manual_seed(2))
    mod = _script()
    lc = mod.LlamaCppLogits(tmp_path / "m.gguf", 32, threads=1)
    rel = lambda a, b: ((a - b).abs().max() / a.abs().max()).item()  # noqa: E731
    same = []
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 32:(w + 1) * 32]
            a, b, f = ours(x[None], use_cache=False).logits[0], lc(x), fl(x[None]).logits[0]
            # llama.cpp rounds activations to 8 bits for its Q4_0 dot products: close, not identical
            # (measured 0.021-0.035); the float model, quantized weights' only other candidate, is ~0.5 away
            assert rel(a, b) < 0.06 and rel(a, f) > 0.2
            same.append(a.argmax(-1) == b.argmax(-1))
        ref, _ = perplexity(ours, ids, 32, None, "cpu", progress=False)
        got, _, _ = mod.windowed_ppl(lc, ids, 32, None)
    lc.close()
    assert torch.cat(same).float().mean().item() > 0.85
    assert abs(got / ref - 1) < 0.01, (got, ref)  # measured 0.4%
