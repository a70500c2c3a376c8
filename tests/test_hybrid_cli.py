"""`leanq quantize --bpw/--max-size/--override/--keep` end to end on a tiny model folder."""

from __future__ import annotations

import json

import pytest

from leanq.cli import main
from leanq.config import QuantSpec, Recipe


@pytest.fixture
def folder(tmp_path):
    """A tiny random Llama folder whose vocabulary matches its tokenizer."""
    from conftest import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    d = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _modules(out):
    return Recipe.from_json((out / "leanq.json").read_text()).modules


def test_quantize_with_a_bpw_budget_and_cache(folder, text_file, tmp_path, capsys):
    cache = tmp_path / "sens.json"
    common = [str(folder), "--method", "rtn", "--calib", str(text_file), "--seqlen", "32",
              "--sensitivity-samples", "4", "--sensitivity-cache", str(cache)]
    out = tmp_path / "q6"
    assert main(["quantize", *common, "--bpw", "6", "--out", str(out)]) == 0
    assert cache.is_file()
    mods = _modules(out)
    n = sum(m.in_features * m.out_features for m in mods.values())
    from leanq.sensitivity import module_bits

    bits = sum(module_bits(m.spec, m.out_features, m.in_features, m.bias) for m in mods.values())
    assert bits <= 6 * n and bits >= 0.9 * 6 * n
    assert len({m.spec for m in mods.values()}) >= 2  # a mixed plan
    for f in ("plan.md", "plan.json"):
        assert (out / f).is_file()
    assert "plan:" in capsys.readouterr().out

    # re-plan from the cache at another budget, with a rule pinned and a module kept
    out2 = tmp_path / "q5"
    assert main(["quantize", *common, "--bpw", "5.5", "--out", str(out2), "--override", "*.down_proj=8:gnone",
                 "--keep", "*.layers.0.self_attn.q_proj"]) == 0
    mods2 = _modules(out2)
    assert "model.layers.0.self_attn.q_proj" not in mods2
    assert all(m.spec == QuantSpec(bits=8, group_size=None) for k, m in mods2.items() if k.endswith("down_proj"))

    # `leanq plan` re-plans from the cache alone and agrees with what quantize applied
    rep = tmp_path / "rep"
    assert main(["plan", str(cache), "--bpw", "5.5", "--override", "*.down_proj=8:gnone",
                 "--keep", "*.layers.0.self_attn.q_proj", "--out", str(rep)]) == 0
    planned = json.loads((rep / "plan.json").read_text())
    assert {k: QuantSpec.from_dict(v) for k, v in planned.items()} == {k: m.spec for k, m in mods2.items()}
    assert main(["plan", str(tmp_path / "nope.json"), "--bpw", "3", "--out", str(rep)]) == 2


def test_max_size_budget_is_respected_on_disk(folder, text_file, tmp_path):
    from leanq.planner import parse_size

    out = tmp_path / "qs"
    args = [str(folder), "--method", "rtn", "--calib", str(text_file), "--seqlen", "32",
            "--sensitivity-samples", "4"]
    assert main(["quantize", *args, "--max-size", "60KB", "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_size <= parse_size("60KB")


def test_budget_errors_are_one_line(folder, text_file, tmp_path, capsys):
    args = [str(folder), "--method", "rtn", "--calib", str(text_file), "--seqlen", "32",
            "--sensitivity-samples", "4", "--out", str(tmp_path / "x")]
    assert main(["quantize", *args, "--bpw", "1.0"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # progress bars come before it
    assert err.startswith("leanq: error: --bpw 1 is below the smallest plan") and "bits per weight" in err
    assert main(["quantize", *args, "--max-size", "1KB"]) == 2
    assert "below the smallest plan" in capsys.readouterr().err
    assert main(["quantize", *args, "--override", "*.q_proj=4:g7"]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # argparse: the two budgets exclude each other
        main(["quantize", *args, "--bpw", "3", "--max-size", "1MB"])
