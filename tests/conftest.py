"""Shared fixtures: tiny random models of each supported family, a tiny tokenizer, local data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels are checked on the CPU through its interpreter; the switch
    # must be set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path | None:
    for p in [os.environ.get("LEANQ_DATA"), REPO.parent / "shared/data", REPO / "../shared/data"]:
        if p and Path(p).is_dir():
            return Path(p)
    return None


def data_file(rel: str) -> Path:
    d = data_dir()
    if d is None or not (d / rel).is_file():
        pytest.skip(f"{rel} not found: set LEANQ_DATA to the shared data folder (../shared/data)")
    return d / rel


TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model reads this text and learns little from it. "
    "Quantization stores each weight in a few bits; the scales and zero points say how to read them back. "
) * 40


def tiny_config(model_type: str = "llama", **kw):
    from transformers import AutoConfig

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "gpt2":
        base = dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    if model_type == "opt":
        base = dict(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def tiny_model(model_type: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=torch.float32)
    return m.eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # ByteLevel.alphabet() comes in no fixed order: sorted, so every run trains the same tokenizer (its last 80
    # characters, mostly absent from TEXT, keep the vocabulary above the models' 96 ids, as the tests expect)
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[-80:])
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def tiny_hf_folder(tmp_path: Path) -> Path:
    """A tiny random Llama saved as a Hugging Face folder with a tokenizer."""
    d = tmp_path / "tiny-llama"
    tok = tiny_tokenizer()
    m = tiny_model("llama", vocab_size=len(tok))
    m.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def stories():
    """The real stories260K model as a LlamaForCausalLM (skips when the data is absent)."""
    from leanq.llama2c import load_llama2c

    return load_llama2c(data_file("stories260K/stories260K.bin"))
