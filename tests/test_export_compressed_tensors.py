"""compressed-tensors export: bit-exact packing, and transformers (+ compressed-tensors) as the real client."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanq.checkpoint import load, save
from leanq.config import MethodConfig, QuantSpec, Recipe
from leanq.errors import LeanqError
from leanq.export.compressed_tensors import _as_int32_words, export_compressed_tensors, refusal
from leanq.formats.packing import pack
from leanq.pipeline import quantize_blocks


@pytest.fixture(autouse=True)
def _reference_cpu_kernel(monkeypatch):
    """These tests compare leanq's logits with another reader's at float32 precision: pin the pure-torch
    reference on the CPU (the packed int4 op, on by default, rounds activations to bf16)."""
    from leanq.kernels import cpu_int4

    monkeypatch.setattr(cpu_int4, "MAX_ROWS", 0)


ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors to test the export's client")


def _tiny_checkpoint(path, spec: QuantSpec, seed: int = 0, hidden: int = 96, inter: int = 160):
    """A tiny random Llama whose widths (96, 160) are not multiples of 64, quantized with RTN."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    float_model = LlamaForCausalLM(cfg).eval()
    m = LlamaForCausalLM(cfg).eval()
    m.load_state_dict(float_model.state_dict())
    mc = MethodConfig(name="rtn")
    mods = quantize_blocks(m, spec, mc, None, progress=False)
    r = Recipe(source="tiny", model_type="llama", method=mc, default_spec=spec, modules=mods,
               keep_dtype="float32", leanq_version="test")
    save(m, None, r, path)
    return float_model


@pytest.mark.parametrize("bits, n", [(4, 96), (4, 100), (8, 96), (8, 13), (4, 7)])
def test_packing_matches_compressed_tensors(bits, n):
    """leanq's byte stream read as int32 words == compressed-tensors' pack_to_int32, codes and zero points."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g, dtype=torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    want = pack_to_int32(signed, bits)
    got = _as_int32_words(pack(codes, bits), math.ceil(n * bits / 32))
    assert torch.equal(got, want)
    # zero points: packed along the output dimension (dim 0)
    want0 = pack_to_int32(signed.t().contiguous(), bits, packed_dim=0)
    got0 = _as_int32_words(pack(codes, bits), math.ceil(n * bits / 32)).t().contiguous()
    assert torch.equal(got0, want0)


def _load_hf(out, sym: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # Asymmetric pack-quantized checkpoints (packed zero points) load through the dequantizing path
    # in transformers 5.x + compressed-tensors 0.20: the default path builds its zero-point
    # parameters unpacked on the meta device and rejects the packed ones as a size mismatch.
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kw).eval()


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=64, sym=False), QuantSpec(bits=4, group_size=32, sym=True),
                                  QuantSpec(bits=8, group_size=None, sym=True), QuantSpec(bits=8, group_size=128, sym=False)],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_transformers_loads_export(tmp_path, spec):
    src, out = tmp_path / "ck", tmp_path / "ct"
    float_model = _tiny_checkpoint(src, spec)
    export_compressed_tensors(src, out)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and qcfg["quant_method"] == "compressed-tensors"

    ours, _, _ = load(src)
    theirs = _load_hf(out, spec.sym)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, f = ours(ids).logits, theirs(ids).logits, float_model(ids).logits
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel <= 1e-3, rel
    # the client really ran the quantized weights, not a float copy
    assert ((a - f).abs().max() / a.abs().max()).item() > 100 * max(rel, 1e-7)
    with torch.no_grad():
        ga = ours.generate(ids[:1, :8], max_new_tokens=12, do_sample=False, pad_token_id=0)
        gb = theirs.generate(ids[:1, :8], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)


def test_group_split_when_group_does_not_divide_width(tmp_path):
    """g64 over widths 96 and 160: written as g32 with each scale repeated, same weights."""
    src, out = tmp_path / "ck", tmp_path / "ct"
    _tiny_checkpoint(src, QuantSpec(bits=4, group_size=64, sym=False))
    export_compressed_tensors(src, out)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["group_size"] for g in groups.values()) == [32]


def test_widths_with_different_splits_share_one_scheme(tmp_path):
    """g128 over widths 128 and 192 (like SmolLM2's 1536 and 576): one g64 scheme, which transformers'
    dequantizing loader needs (two schemes failed its weight conversion)."""
    src, out = tmp_path / "ck", tmp_path / "ct"
    _tiny_checkpoint(src, QuantSpec(bits=4, group_size=128, sym=False), hidden=128, inter=192)
    export_compressed_tensors(src, out)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["weights"]["group_size"] for g in groups.values()] == [64]
    ours, _, _ = load(src)
    theirs = _load_hf(out, sym=False)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-3


def test_refusals_name_the_setting():
    assert "int3" in refusal(QuantSpec(bits=3, group_size=128), 576, "llama")
    assert "int2" in refusal(QuantSpec(bits=2, group_size=64), 576, "llama")
    assert "nf4" in refusal(QuantSpec(fmt="nf4", bits=4, group_size=64), 576, "llama")
    assert "in_scale" in refusal(QuantSpec(bits=4, group_size=128, in_scale=True), 576, "llama")
    assert "Conv1D" in refusal(QuantSpec(bits=4, group_size=128), 576, "gpt2")
    assert refusal(QuantSpec(bits=4, group_size=128), 576, "llama") is None
    assert refusal(QuantSpec(bits=8, group_size=None, sym=True), 576, "llama") is None


def test_cli_export_and_refusal(tmp_path, capsys):
    from leanq.cli import main

    ok, bad = tmp_path / "ok", tmp_path / "bad"
    _tiny_checkpoint(ok, QuantSpec(bits=4, group_size=32, sym=True))
    assert main(["export", str(ok), "--format", "compressed-tensors", "--out", str(tmp_path / "o1")]) == 0
    assert (tmp_path / "o1" / "model.safetensors").is_file()
    assert main(["export", str(ok), "--format", "compressed-tensors", "--out", str(tmp_path / "o1")]) == 2  # exists
    _tiny_checkpoint(bad, QuantSpec(bits=3, group_size=32))
    capsys.readouterr()
    assert main(["export", str(bad), "--format", "compressed-tensors", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int3" in err[0] and err[0].startswith("leanq: error: ")
    assert not (tmp_path / "o2").exists()
    with pytest.raises(LeanqError):
        export_compressed_tensors(tmp_path / "nowhere", tmp_path / "o3")
