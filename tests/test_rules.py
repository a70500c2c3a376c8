"""Pattern rules (--keep, --override): parsing, precedence, and mixed specs through the pipeline and a checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanq.config import MethodConfig, QuantSpec
from leanq.errors import LeanqError
from leanq.rules import Rules, parse_rules, parse_spec, split_list

DEFAULT = QuantSpec(bits=4, group_size=128, sym=False)


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("text,want", [
    ("8", QuantSpec(bits=8, group_size=128)),
    ("4:g64", QuantSpec(bits=4, group_size=64)),
    ("3:gnone:sym", QuantSpec(bits=3, group_size=None, sym=True)),
    ("2:g32:asym", QuantSpec(bits=2, group_size=32, sym=False)),
    (" 6 ", QuantSpec(bits=6, group_size=128)),
    ("float16", QuantSpec(fmt="float", dtype="float16")),
    ("bf16", QuantSpec(fmt="float", dtype="bfloat16")),
])
def test_parse_spec(text, want):
    assert parse_spec(text, DEFAULT) == want


def test_parse_spec_inherits_default_fields():
    d = QuantSpec(bits=3, group_size=64, sym=True)
    assert parse_spec("8", d) == QuantSpec(bits=8, group_size=64, sym=True)
    assert parse_spec("8:asym", d) == QuantSpec(bits=8, group_size=64, sym=False)


@pytest.mark.parametrize("bad", ["", "x", "4:g7", "4:g", "4:foo", "9", "1", "4:g64:g32", "4:sym:asym", "4.5", "-4"])
def test_parse_spec_errors_are_one_leanq_error(bad):
    with pytest.raises(LeanqError):
        parse_spec(bad, DEFAULT)


def test_split_and_parse_rules():
    assert split_list(" a, b,,c ") == ("a", "b", "c")
    assert split_list(None) == ()
    r = parse_rules("lm_head,*.layers.0.*", "*.down_proj=8,*.v_proj=4:g64", DEFAULT)
    assert r.keep == ("lm_head", "*.layers.0.*")
    assert r.overrides == (("*.down_proj", QuantSpec(bits=8, group_size=128)), ("*.v_proj", QuantSpec(bits=4, group_size=64)))
    assert r.describe()[0] == "keep lm_head"
    for bad in ("*.down_proj", "=8", "*.x=", "*.x=abc"):
        with pytest.raises(LeanqError):
            parse_rules("", bad, DEFAULT)


def test_precedence_last_matching_override_wins():
    r = parse_rules("", "*.mlp.*=8,*.down_proj=3", DEFAULT)
    assert r("model.layers.1.mlp.down_proj") == QuantSpec(bits=3, group_size=128)
    assert r("model.layers.1.mlp.up_proj") == QuantSpec(bits=8, group_size=128)
    assert r("model.layers.1.self_attn.q_proj") is None
    r2 = parse_rules("", "*.down_proj=3,*.mlp.*=8", DEFAULT)  # same rules, other order
    assert r2("model.layers.1.mlp.down_proj") == QuantSpec(bits=8, group_size=128)


def test_precedence_keep_wins_over_overrides():
    r = parse_rules("*.layers.0.*", "*.layers.0.mlp.down_proj=8", DEFAULT)
    assert r.is_kept("model.layers.0.mlp.down_proj")
    assert r("model.layers.0.mlp.down_proj") is None
    assert not r.is_kept("model.layers.10.mlp.down_proj")  # '.0.' is not a prefix match of '.10.'
    assert Rules()("anything") is None


def _quantize_tiny(rules: Rules):
    from leanq.pipeline import quantize_blocks

    model = tiny_llama()
    recipe = quantize_blocks(model, DEFAULT, MethodConfig(name="rtn"), None, keep=rules.keep, overrides=rules,
                             progress=False)
    return model, recipe


def test_rules_through_the_pipeline():
    from leanq.modules import QuantLinear

    rules = parse_rules("*.layers.0.self_attn.*", "*.mlp.*=8:gnone,*.v_proj=3:g32:sym,*.layers.1.mlp.up_proj=float16",
                        DEFAULT)
    model, recipe = _quantize_tiny(rules)
    assert "model.layers.0.self_attn.q_proj" not in recipe
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert recipe["model.layers.0.mlp.down_proj"].spec == QuantSpec(bits=8, group_size=None)
    assert recipe["model.layers.1.self_attn.v_proj"].spec == QuantSpec(bits=3, group_size=32, sym=True)
    assert recipe["model.layers.1.self_attn.q_proj"].spec == DEFAULT
    up = recipe["model.layers.1.mlp.up_proj"]
    assert up.spec == QuantSpec(fmt="float", dtype="float16") and up.method == "cast"
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)


def test_recipe_round_trip_with_mixed_specs(tmp_path):
    from leanq import __version__
    from leanq.api import _round_kept
    from leanq.checkpoint import load, save
    from leanq.config import Recipe

    rules = parse_rules("*.layers.0.self_attn.o_proj",
                        "*.mlp.*=8:gnone,*.v_proj=3:g32:sym,*.k_proj=2:g64,*.layers.1.mlp.up_proj=float16", DEFAULT)
    model, modules = _quantize_tiny(rules)
    _round_kept(model, "float16")
    recipe = Recipe(source="tiny", model_type="llama", method=MethodConfig(name="rtn"), default_spec=DEFAULT,
                    modules=modules, keep_dtype="float16", leanq_version=__version__)
    assert len({m.spec for m in modules.values()}) == 5
    assert Recipe.from_json(recipe.to_json()) == recipe
    out = save(model, None, recipe, tmp_path / "ckpt")
    model2, _, recipe2 = load(out)
    assert recipe2.modules == recipe.modules
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(ids, use_cache=False).logits
        b = model2(ids, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
