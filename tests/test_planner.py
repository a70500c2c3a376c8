"""The planner: optimal against brute force, never over budget, the edges, and byte budgets."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from leanq.config import QuantSpec
from leanq.errors import LeanqError
from leanq.planner import make_plan, parse_size, solve, uniform_plan
from leanq.sensitivity import DEFAULT_CANDIDATES, SensitivityTable, module_bits


def brute(costs, dmg, budget):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        if sum(costs[i][k] for i, k in enumerate(combo)) <= budget:
            d = sum(dmg[i][k] for i, k in enumerate(combo))
            best = d if best is None or d < best else best
    return best


def test_solve_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for _ in range(300):
        n, kk = rng.randint(1, 5), rng.randint(1, 4)
        costs = [[rng.randint(1, 25) for _ in range(kk)] for _ in range(n)]
        dmg = [[rng.random() * 10 for _ in range(kk)] for _ in range(n)]
        budget = rng.randint(0, 110)
        want = brute(costs, dmg, budget)
        if want is None:
            with pytest.raises(LeanqError):
                solve(costs, dmg, budget)
            continue
        picks = solve(costs, dmg, budget)
        assert sum(costs[i][k] for i, k in enumerate(picks)) <= budget
        assert sum(dmg[i][k] for i, k in enumerate(picks)) == pytest.approx(want, abs=1e-9)


def test_coarse_resolution_never_exceeds_and_stays_close_to_optimal():
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(2, 5)
        costs = [sorted(rng.randint(10, 400) for _ in range(3)) for _ in range(n)]
        dmg = [sorted((rng.random() * 10 for _ in range(3)), reverse=True) for _ in range(n)]
        lo, hi = sum(c[0] for c in costs), sum(c[-1] for c in costs)
        budget = rng.randint(lo, hi)
        picks = solve(costs, dmg, budget, resolution=7)  # units of many bits: rounding + greedy repair
        assert sum(costs[i][k] for i, k in enumerate(picks)) <= budget
        assert sum(dmg[i][k] for i, k in enumerate(picks)) >= brute(costs, dmg, budget) - 1e-9


def fake_table(n_layers=6, seed=0) -> SensitivityTable:
    """Realistic shapes (a small llama) and damages that fall with more bits, like measured ones."""
    rng = random.Random(seed)
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (160, 64), "mlp.up_proj": (160, 64),
              "mlp.down_proj": (64, 160)}
    mods = {}
    for layer in range(n_layers):
        for rel, (o, i) in shapes.items():
            scale = rng.lognormvariate(0, 1.5)
            dmg = []
            for c in DEFAULT_CANDIDATES:
                bits = module_bits(c, o, i) / (o * i)
                dmg.append(scale * o * i * 4.0 ** (-bits) * (1 + 0.1 * rng.random()))
            mods[f"model.layers.{layer}.{rel}"] = {"out": o, "in": i, "bias": False, "damage": dmg}
    return SensitivityTable(DEFAULT_CANDIDATES, mods, {"proxy": "rtn"})


def test_bpw_budget_never_exceeded_and_within_one_percent():
    t = fake_table()
    lo = uniform_plan(t, QuantSpec(bits=2, group_size=64)).bpw
    hi = uniform_plan(t, QuantSpec(fmt="float", dtype="float16")).bpw
    rng = random.Random(2)
    budgets = [lo, lo + 1e-9, 2.5, 3.0, 3.25, 4.25, 8.0, hi - 1e-6, hi, hi + 1] + [rng.uniform(lo, hi) for _ in range(20)]
    for b in budgets:
        p = make_plan(t, bpw=b)
        assert p.total_bits <= math.floor(b * p.n_weights), b
        assert p.total_bits >= 0.99 * min(b, hi) * p.n_weights, b
        assert p.total_bits == sum(t.bits(n, t.candidates.index(s)) for n, s in p.specs.items())


def test_edges_below_smallest_and_above_float16():
    t = fake_table()
    lo = uniform_plan(t, QuantSpec(bits=2, group_size=64)).bpw
    with pytest.raises(LeanqError, match="below the smallest plan"):
        make_plan(t, bpw=lo * 0.999)
    assert set(make_plan(t, bpw=lo).specs.values()) == {QuantSpec(bits=2, group_size=64)}
    assert set(make_plan(t, bpw=16.0).specs.values()) == {QuantSpec(fmt="float", dtype="float16")}
    assert set(make_plan(t, bpw=99.0).specs.values()) == {QuantSpec(fmt="float", dtype="float16")}
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(LeanqError):
            make_plan(t, bpw=bad)
    with pytest.raises(LeanqError):
        make_plan(t)
    with pytest.raises(LeanqError):
        make_plan(t, bpw=3.0, max_bytes=10**6)


def test_planned_beats_uniform_in_predicted_damage():
    t = fake_table()
    for c in DEFAULT_CANDIDATES[:5]:
        u = uniform_plan(t, c)
        p = make_plan(t, bpw=u.bpw)
        assert p.bpw <= u.bpw and p.damage <= u.damage + 1e-12


def test_pinned_and_kept_modules_are_counted():
    t = fake_table(n_layers=2)
    pin = {"model.layers.0.mlp.down_proj": QuantSpec(bits=8, group_size=None)}
    kept = {"model.layers.9.mlp.down_proj": (64, 160)}  # a base module left float by --keep
    p = make_plan(t, bpw=6.0, pinned=pin, kept=kept)
    assert p.specs["model.layers.0.mlp.down_proj"] == pin["model.layers.0.mlp.down_proj"]
    assert p.n_weights == sum(m["out"] * m["in"] for m in t.modules.values()) + 64 * 160
    want = 16 * 64 * 160 + sum(t.bits(n, t.candidates.index(s)) for n, s in p.specs.items())
    assert p.total_bits == want <= 6.0 * p.n_weights
    assert p("model.layers.0.mlp.down_proj") == pin["model.layers.0.mlp.down_proj"] and p("nope") is None


def test_byte_budget():
    t = fake_table()
    fixed = 50_000
    small = make_plan(t, bpw=uniform_plan(t, QuantSpec(bits=2, group_size=64)).bpw)
    with pytest.raises(LeanqError, match="max-size"):
        make_plan(t, max_bytes=fixed + small.total_bits // 8 - 1, fixed_bytes=fixed)
    for mb in range(fixed + small.total_bits // 8, fixed + 400_000, 39_989):
        p = make_plan(t, max_bytes=mb, fixed_bytes=fixed)
        assert p.file_bytes() <= mb


@pytest.mark.parametrize("text,want", [("70MB", 70_000_000), ("70MiB", 70 << 20), ("1234", 1234), ("1.5 GB", 1_500_000_000),
                                       ("64kib", 65536)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "MB", "70XB", "-5MB", "0", "1e400MB"])
def test_parse_size_errors(bad):
    with pytest.raises(LeanqError):
        parse_size(bad)
