"""Sensitivity: the batched RTN equals the method, the proxy formula, measuring a tiny model, the cache file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanq.config import MethodConfig, QuantSpec
from leanq.errors import LeanqError
from leanq.methods import get_method
from leanq.sensitivity import (check_compatible, check_proxy, hessian_damage,
                               load_table, measure, module_bits, rtn_dequant, save_table, spearman, split_name)

from test_rules import tiny_llama


@pytest.mark.parametrize("spec", [QuantSpec(bits=2, group_size=64), QuantSpec(bits=3, group_size=128),
                                  QuantSpec(bits=4, group_size=64, sym=True), QuantSpec(bits=8, group_size=None)])
@pytest.mark.parametrize("n", [64, 200, 576])
def test_batched_rtn_is_bit_identical_to_the_method(spec, n):
    w = torch.randn(24, n, generator=torch.Generator().manual_seed(n))
    for clip in (True, False):
        want = get_method("rtn").fn(w, None, spec, MethodConfig(mse_clip=clip)).dequantize(torch.float32)
        assert torch.equal(rtn_dequant(w, spec, clip), want)


def test_hessian_damage_is_layer_output_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=g)
    dw = torch.randn(8, 32, generator=g) * 0.01
    h = 2.0 / x.shape[0] * x.t() @ x
    direct = 2.0 / x.shape[0] * float(((x @ dw.t()) ** 2).sum())
    assert hessian_damage(dw, h) == pytest.approx(direct, rel=1e-4)


def test_module_bits_and_names():
    assert module_bits(QuantSpec(fmt="float", dtype="float16"), 10, 20) == 16 * 200
    # int4 g64 asym, 64x128: codes 64*64 bytes, scales 64*2*2 bytes, zeros: 2 codes padded to one block of 8 = 4 bytes
    assert module_bits(QuantSpec(bits=4, group_size=64), 64, 128) == 8 * (64 * 64 + 64 * 4 + 64 * 4)
    assert module_bits(QuantSpec(bits=4, group_size=64), 64, 128, bias=True) == 8 * (64 * 64 + 64 * 4 + 64 * 4 + 256)
    assert split_name("model.layers.12.mlp.down_proj") == (12, "mlp.down_proj")
    assert split_name("lm_head") == (-1, "lm_head")


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


CANDS = (QuantSpec(bits=2, group_size=64), QuantSpec(bits=4, group_size=64), QuantSpec(fmt="float", dtype="float16"))


@pytest.fixture(scope="module")
def measured():
    model = tiny_llama(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    table = measure(model, ids, {"source": "tiny"}, MethodConfig(name="rtn"), CANDS, keep=("*.layers.0.mlp.up_proj",),
                    progress=False)
    return model, before, ids, table


def test_measure_tiny_model(measured):
    model, before, _, table = measured
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert len(table.modules) == 13 and "model.layers.0.mlp.up_proj" not in table.modules
    k2, k4, kf = 0, 1, 2
    for name, m in table.modules.items():
        d = m["damage"]
        assert all(math.isfinite(v) and v >= 0 for v in d)
        assert d[k2] > d[k4] > d[kf], name
    assert table.meta["proxy"] == "rtn" and table.meta["source"] == "tiny"


def test_gptq_proxy_is_no_worse_than_rtn_on_average():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    cands = (QuantSpec(bits=3, group_size=64),)
    r = measure(model, ids, {}, MethodConfig(name="gptq"), cands, proxy="rtn", progress=False)
    g = measure(model, ids, {}, MethodConfig(name="gptq"), cands, proxy="gptq", progress=False)
    assert sum(m["damage"][0] for m in g.modules.values()) < sum(m["damage"][0] for m in r.modules.values())
    with pytest.raises(LeanqError):
        measure(model, ids, {}, MethodConfig(), cands, proxy="awq", progress=False)


def test_check_proxy_restores_the_model(measured):
    model, before, ids, table = measured
    res = check_proxy(model, ids, table, n_modules=3, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(res["pairs"]) == 6 and res["tokens"] == ids.numel()
    assert all(p["candidate"] in ("int2 g64 asym", "int4 g64 asym") for p in res["pairs"])
    assert res["spearman"] is None or -1 <= res["spearman"] <= 1


def test_cache_round_trip_and_validation(measured, tmp_path):
    _, _, _, table = measured
    p = save_table(table, tmp_path / "s.json")
    back = load_table(p)
    assert back.modules == table.modules and back.candidates == table.candidates and back.meta == table.meta
    check_compatible(back, {"source": "tiny"}, set(table.modules), str(p))
    with pytest.raises(LeanqError, match="source"):
        check_compatible(back, {"source": "other"}, set(table.modules), str(p))
    with pytest.raises(LeanqError, match="modules"):
        check_compatible(back, {}, set(table.modules) | {"x"}, str(p))

    d = json.loads(p.read_text())
    name = next(iter(d["modules"]))
    bad_cases = {
        "notjson": "{",
        "kind": json.dumps(dict(d, kind="other")),
        "version": json.dumps(dict(d, version=2)),
        "short": json.dumps({**d, "modules": {name: {**d["modules"][name], "damage": [1.0]}}}),
        "negative": json.dumps({**d, "modules": {name: {**d["modules"][name], "damage": [-1.0] * 3}}}),
        "nan": p.read_text().replace(str(d["modules"][name]["damage"][0]), "NaN", 1),
        "shape": json.dumps({**d, "modules": {name: {**d["modules"][name], "out": 0}}}),
        "candidate": json.dumps({**d, "candidates": [{"fmt": "int", "bits": 99}] * 3}),
    }
    for what, text in bad_cases.items():
        f = tmp_path / f"{what}.json"
        f.write_text(text)
        with pytest.raises(LeanqError):
            load_table(f)
    with pytest.raises(LeanqError):
        load_table(tmp_path / "missing.json")


def test_report_files(measured, tmp_path):
    from leanq.planner import make_plan
    from leanq.plan_report import short, write_report

    _, _, _, table = measured
    plan = make_plan(table, bpw=6.0, kept={"model.layers.0.mlp.up_proj": (160, 64)})
    files = write_report(plan, table, tmp_path)
    names = {f.name for f in files}
    assert {"plan.md", "plan.json"} <= names
    md = (tmp_path / "plan.md").read_text()
    assert "bits per weight" in md and "| 1 |" in md and "keep" in md
    pytest.importorskip("matplotlib")
    assert {"plan_heatmap.png", "plan_curve.png"} <= names
    assert (tmp_path / "plan_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert short(QuantSpec(bits=8, group_size=None)) == "8pc" and short(QuantSpec(fmt="float")) == "f16"


def test_fisher_gains_weight_the_table(measured, tmp_path):
    from leanq.hybrid import add_gains
    from leanq.planner import make_plan

    model, before, ids, table = measured
    req = [p.requires_grad for p in model.parameters()]
    ft = add_gains(model, table, ids[:2])
    assert [p.requires_grad for p in model.parameters()] == req
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for name, m in ft.modules.items():
        assert m["gain"] > 0 and math.isfinite(m["gain"])
        assert ft.damage(name) == pytest.approx([m["gain"] * d for d in table.modules[name]["damage"]])
    assert ft.meta["weighting"] == "fisher"
    back = load_table(save_table(ft, tmp_path / "f.json"))
    assert back.modules == ft.modules
    p = make_plan(ft, bpw=6.0)
    assert p.damage == pytest.approx(sum(ft.damage(n)[ft.candidates.index(s)] for n, s in p.specs.items()))
    d = json.loads((tmp_path / "f.json").read_text())
    name = next(iter(d["modules"]))
    d["modules"][name]["gain"] = -1.0
    (tmp_path / "g.json").write_text(json.dumps(d))
    with pytest.raises(LeanqError):
        load_table(tmp_path / "g.json")
