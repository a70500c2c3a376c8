"""Choose one storage setting per module to minimise predicted damage under a size budget.

The problem is a multiple-choice knapsack: module i takes exactly one candidate
k, costing c[i][k] stored bits (codes + scales + zeros, exact, from
:func:`leanq.sensitivity.module_bits`) and doing damage d[i][k] (the proxy of
:mod:`leanq.sensitivity`); minimise Σ d subject to Σ c ≤ budget.

:func:`solve` is a dynamic programme over the budget left above the all-cheapest
plan, in units of u bits with every cost rounded *up* to whole units, so any
plan it returns fits the true budget.  With u = 1 (small budgets, the tests)
it is exact; with the default resolution of 100,000 units the rounding can
waste at most N·u bits (about 0.2% of the budget for SmolLM2's 210 modules), and a
greedy pass with exact costs then spends what is left.  Budgets:

* bits per weight (``--bpw``): averaged over the *base*, every linear of every
  decoder block (the modules leanq quantizes, plus any of them kept float by
  ``--keep``, counted at the float dtype they are saved in).  Embeddings, the
  head and norms are not in the base; they do not change with the plan.
* bytes (``--max-size``): the whole ``model.safetensors`` file: the base, every
  other tensor at ``keep_dtype``, and the safetensors header (estimated from
  above).  Tokenizer and config files are not counted.

A budget below the all-cheapest plan is one clear :class:`LeanqError`; a budget
that holds every module at its largest candidate (float16) keeps them all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .config import QuantSpec
from .errors import LeanqError


def solve(costs: list[list[int]], damages: list[list[float]], budget: int,
          resolution: int = 100_000) -> list[int]:
    """Indices (one per item) minimising Σ damage with Σ cost ≤ ``budget`` (integers, bits).

    Raises LeanqError when even the cheapest choice of every item exceeds the budget.
    """
    n = len(costs)
    if n == 0:
        return []
    if any(len(c) != len(d) or not c for c, d in zip(costs, damages)) or len(damages) != n:
        raise ValueError("costs and damages must be non-empty lists of the same shape")
    cheapest = [min(range(len(c)), key=lambda k: (c[k], damages[i][k])) for i, c in enumerate(costs)]
    base = sum(costs[i][k] for i, k in enumerate(cheapest))
    if base > budget:
        raise LeanqError(f"budget of {budget} bits is below the smallest possible plan ({base} bits)")
    least = [min(range(len(c)), key=lambda k: (damages[i][k], c[k])) for i, c in enumerate(costs)]
    if sum(costs[i][k] for i, k in enumerate(least)) <= budget:
        return least  # the least damaging choice of every item fits: nothing to trade
    slack = budget - base
    unit = max(1, math.ceil(slack / resolution))
    nb = slack // unit
    dp = np.zeros(nb + 1)  # dp[b] = least damage of the items so far within b units
    choice = np.zeros((n, nb + 1), dtype=np.int8)
    for i in range(n):
        new = np.full(nb + 1, np.inf)
        arg = np.zeros(nb + 1, dtype=np.int8)
        for k, (c, d) in enumerate(zip(costs[i], damages[i])):
            cu = math.ceil((c - costs[i][cheapest[i]]) / unit) if c >= costs[i][cheapest[i]] else 0
            if cu > nb:
                continue
            cand = np.full(nb + 1, np.inf)
            cand[cu:] = dp[: nb + 1 - cu] + d
            better = cand < new
            new = np.where(better, cand, new)
            arg = np.where(better, k, arg)
        dp, choice[i] = new, arg
    picks, b = [0] * n, nb
    for i in range(n - 1, -1, -1):
        k = int(choice[i, b])
        picks[i] = k
        c = costs[i][k]
        b -= math.ceil((c - costs[i][cheapest[i]]) / unit) if c >= costs[i][cheapest[i]] else 0
    return _greedy_fill(picks, costs, damages, budget)


def _greedy_fill(picks: list[int], costs, damages, budget: int) -> list[int]:
    """Spend the bits the unit rounding left over: best damage drop per bit first, exact costs."""
    picks = list(picks)
    left = budget - sum(costs[i][k] for i, k in enumerate(picks))
    while True:
        best, gain = None, 0.0
        for i, k0 in enumerate(picks):
            for k, (c, d) in enumerate(zip(costs[i], damages[i])):
                dc, dd = c - costs[i][k0], damages[i][k0] - d
                if dd > 0 and dc <= left and (dc <= 0 or dd / dc > gain):
                    if dc <= 0:
                        best, gain = (i, k), math.inf
                        break
                    best, gain = (i, k), dd / dc
            if gain == math.inf:
                break
        if best is None:
            return picks
        i, k = best
        left -= costs[i][k] - costs[i][picks[i]]
        picks[i] = k


# ---------------------------------------------------------------------------
# budgets and the plan of a model

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'70MB' -> 70_000_000, '70MiB' -> 73_400_320, '1234' -> 1234 bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise LeanqError(f"size {text!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(v) or v <= 0:
        raise LeanqError(f"size {text!r} must be positive")
    return int(v)


@dataclass
class Plan:
    """One spec per planned or pinned module, kept-float modules, and the accounting.

    specs: {full name: QuantSpec} for every quantized module of the base.
    kept: {full name: (out, in)} base modules left float (``--keep``), at ``keep_bits`` per weight.
    total_bits / n_weights: the base's stored bits and weights (bpw = their ratio).
    """

    specs: dict[str, QuantSpec]
    kept: dict[str, tuple[int, int]]
    total_bits: int
    n_weights: int
    damage: float
    budget_bits: int | None = None
    budget_label: str = ""
    fixed_bytes: int = 0  # everything outside the base, for --max-size
    pinned: set[str] = field(default_factory=set)

    @property
    def bpw(self) -> float:
        return self.total_bits / self.n_weights

    def file_bytes(self) -> int:
        """Predicted model.safetensors size (header estimate included)."""
        return self.fixed_bytes + math.ceil(self.total_bits / 8)

    def __call__(self, name: str) -> QuantSpec | None:  # the pipeline's overrides(name)
        return self.specs.get(name)


def make_plan(table, bpw: float | None = None, max_bytes: int | None = None, pinned: dict[str, QuantSpec] | None = None,
              kept: dict[str, tuple[int, int]] | None = None, keep_bits: int = 16, fixed_bytes: int = 0,
              resolution: int = 100_000) -> Plan:
    """Plan every module of ``table`` (a SensitivityTable) not in ``pinned`` under one budget.

    pinned: modules whose spec a rule fixed (counted, not chosen); kept: base modules left float.
    fixed_bytes: bytes of model.safetensors outside the base (only used with ``max_bytes``).
    """
    from .sensitivity import module_bits

    if (bpw is None) == (max_bytes is None):
        raise LeanqError("give exactly one budget: --bpw or --max-size")
    pinned, kept = dict(pinned or {}), dict(kept or {})
    mods = table.modules
    n_weights = sum(m["out"] * m["in"] for m in mods.values()) + sum(o * i for o, i in kept.values())
    fixed_bits = sum(keep_bits * o * i for o, i in kept.values())
    for name, spec in pinned.items():
        m = mods[name]
        fixed_bits += module_bits(spec, m["out"], m["in"], m["bias"])
    free = [n for n in sorted(mods) if n not in pinned]
    if bpw is not None:
        if not math.isfinite(bpw) or bpw <= 0:
            raise LeanqError(f"--bpw must be a positive number, got {bpw!r}")
        budget = math.floor(bpw * n_weights)
        label = f"{bpw:g} bits per weight"
    else:
        budget = 8 * (max_bytes - fixed_bytes)
        label = f"{max_bytes / 1e6:.2f} MB model.safetensors"
    costs = [[table.bits(n, k) for k in range(len(table.candidates))] for n in free]
    dmg = [table.damage(n) for n in free]
    smallest = fixed_bits + sum(min(c) for c in costs)
    if smallest > budget:
        if bpw is not None:
            raise LeanqError(f"--bpw {bpw:g} is below the smallest plan: every module at its cheapest setting "
                             f"needs {smallest / n_weights:.3f} bits per weight")
        raise LeanqError(f"--max-size {max_bytes / 1e6:.2f} MB is below the smallest plan: "
                         f"{(fixed_bytes + smallest / 8) / 1e6:.2f} MB (of which {fixed_bytes / 1e6:.2f} MB "
                         f"is outside the decoder-block linears)")
    top = [max(range(len(c)), key=lambda k: c[k]) for c in costs]
    if fixed_bits + sum(c[k] for c, k in zip(costs, top)) <= budget:
        picks = top  # the budget holds every module at its largest setting (float16): keep them all
    else:
        picks = solve(costs, dmg, budget - fixed_bits, resolution)
    specs = dict(pinned)
    specs.update({n: table.candidates[k] for n, k in zip(free, picks)})
    total = fixed_bits + sum(c[k] for c, k in zip(costs, picks))
    damage = sum(d[k] for d, k in zip(dmg, picks))
    return Plan(specs, kept, total, n_weights, damage, budget, label, fixed_bytes, set(pinned))


def uniform_plan(table, spec: QuantSpec, kept: dict[str, tuple[int, int]] | None = None, keep_bits: int = 16) -> Plan:
    """Every module at ``spec`` (for comparison curves); damage from the table when measured."""
    from .sensitivity import module_bits

    kept = dict(kept or {})
    k = table.candidates.index(spec) if spec in table.candidates else None
    total = sum(keep_bits * o * i for o, i in kept.values())
    n = sum(o * i for o, i in kept.values())
    dmg = 0.0
    for name, m in table.modules.items():
        total += module_bits(spec, m["out"], m["in"], m["bias"])
        n += m["out"] * m["in"]
        dmg += table.damage(name)[k] if k is not None else math.nan
    return Plan({name: spec for name in table.modules}, kept, total, n, dmg, budget_label=f"uniform {spec.describe()}")
