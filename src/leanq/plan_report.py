"""The plan as a table and pictures, written next to a checkpoint.

* ``plan.md``: budget, achieved bits per weight and size, a layer x module-type
  table of settings, counts per setting, and planned vs uniform (predicted damage).
* ``plan.json``: {module: spec} (machine-readable; the recipe holds the same specs).
* ``plan_heatmap.png``: stored bits per weight (overheads counted) by layer and module type.
* ``plan_curve.png``: predicted damage vs bits per weight, planned (re-planned at
  many budgets) and each uniform candidate.

matplotlib is an optional dependency (``pip install leanq[plot]``); without it
the PNGs are skipped and plan.md says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import QuantSpec
from .planner import Plan, make_plan, uniform_plan
from .sensitivity import SensitivityTable, module_bits, split_name


def short(spec: QuantSpec) -> str:
    """int4 g64 asym -> '4g64'; int8 per-channel -> '8pc'; float16 -> 'f16'."""
    if spec.fmt == "float":
        return {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}[spec.dtype]
    if spec.fmt == "vq":  # vq d4 8-bit -> 'vq4x8'
        return f"vq{spec.vq_dim}x{spec.bits}" + (f"x{spec.vq_books}" if spec.vq_books > 1 else "")
    g = "pc" if spec.group_size is None else f"g{spec.group_size}"
    return f"{spec.bits}{g}{'s' if spec.sym else ''}"


def _grid(plan: Plan, table: SensitivityTable, keep_bits: int):
    """layers, types, {(layer, type): (label, bits per weight)}."""
    cells = {}
    for name, spec in plan.specs.items():
        m = table.modules[name]
        cells[split_name(name)] = (short(spec), module_bits(spec, m["out"], m["in"], m["bias"]) / (m["out"] * m["in"]))
    for name in plan.kept:
        cells[split_name(name)] = ("keep", float(keep_bits))
    layers = sorted({k[0] for k in cells})
    types = sorted({k[1] for k in cells}, key=lambda t: (not t.startswith(("self_attn", "attn")), t))
    return layers, types, cells


def curve(table: SensitivityTable, lo: float, hi: float, points: int = 16) -> list[tuple[float, float]]:
    """(bpw, predicted damage) of plans at evenly spaced budgets (coarse DP: it is a picture)."""
    out = []
    for i in range(points):
        b = lo + (hi - lo) * i / max(1, points - 1)
        try:
            p = make_plan(table, bpw=b, resolution=20_000)
        except Exception:  # below the smallest plan
            continue
        out.append((p.bpw, p.damage))
    return out


def write_report(plan: Plan, table: SensitivityTable, out: str | Path, keep_bits: int = 16,
                 title: str = "leanq plan") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers, types, cells = _grid(plan, table, keep_bits)
    written = []
    uniforms = [uniform_plan(table, c) for c in table.candidates]

    lines = [f"# {title}", "",
             f"- budget: {plan.budget_label or 'none'}",
             f"- achieved: **{plan.bpw:.4f} bits per weight** over the {plan.n_weights:,} weights of the decoder-block "
             f"linears (codes, scales and zero points counted; kept modules at {keep_bits} bits)",
             f"- those linears: {plan.total_bits / 8 / 1e6:.3f} MB"
             + (f"; predicted model.safetensors: {plan.file_bytes() / 1e6:.3f} MB" if plan.fixed_bytes else ""),
             f"- predicted damage (sum of tr(dW H dW^T) over modules): {plan.damage:.4g}",
             f"- sensitivities: proxy {table.meta.get('proxy')}, {table.meta.get('nsamples')} x "
             f"{table.meta.get('seqlen')} calibration tokens, measured in {table.seconds:.0f} s", ""]
    if plan.pinned or plan.kept:
        lines += [f"- fixed by rules: {len(plan.pinned)} overridden, {len(plan.kept)} kept float", ""]
    counts: dict[str, int] = {}
    for s in plan.specs.values():
        counts[s.describe()] = counts.get(s.describe(), 0) + 1
    lines += ["| setting | modules |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    if plan.kept:
        lines.append(f"| kept float | {len(plan.kept)} |")
    lines += ["", "## Settings by layer", "", "| layer | " + " | ".join(types) + " |",
              "|---|" + "---|" * len(types)]
    for L in layers:
        lines.append(f"| {L} | " + " | ".join(cells.get((L, t), ("-", 0))[0] for t in types) + " |")
    lines += ["", "## Planned vs uniform (predicted damage)", "", "| setting | bits per weight | predicted damage |",
              "|---|---|---|", f"| **this plan** | {plan.bpw:.4f} | {plan.damage:.4g} |"]
    lines += [f"| uniform {u.budget_label.removeprefix('uniform ')} | {u.bpw:.4f} | {u.damage:.4g} |" for u in uniforms]

    pngs = _pictures(plan, table, out, layers, types, cells, uniforms, title)
    if pngs:
        lines += ["", "![bits by layer](plan_heatmap.png)", "", "![damage vs size](plan_curve.png)"]
        written += pngs
    else:
        lines += ["", "(matplotlib is not installed: no pictures; pip install leanq[plot])"]
    (out / "plan.md").write_text("\n".join(lines) + "\n")
    (out / "plan.json").write_text(json.dumps({n: s.to_dict() for n, s in sorted(plan.specs.items())}, indent=1) + "\n")
    return [out / "plan.md", out / "plan.json"] + written


def _pictures(plan, table, out, layers, types, cells, uniforms, title) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import numpy as np

    grid = np.full((len(layers), len(types)), np.nan)
    for (L, t), (_, b) in cells.items():
        grid[layers.index(L), types.index(t)] = b
    fig, ax = plt.subplots(figsize=(1.1 * len(types) + 2.5, 0.22 * len(layers) + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=max(8.5, float(np.nanmax(grid))))
    for (L, t), (lab, _) in cells.items():
        ax.text(types.index(t), layers.index(L), lab, ha="center", va="center", fontsize=6,
                color="k" if cells[(L, t)][1] > 6 else "w")
    ax.set_xticks(range(len(types)), [t.split(".")[-1] for t in types], rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(L) for L in layers], fontsize=6)
    ax.set_xlabel("module type")
    ax.set_ylabel("decoder layer")
    ax.set_title(f"{title}: bits per weight ({plan.bpw:.3f} average)", fontsize=9)
    fig.colorbar(im, ax=ax, label="stored bits per weight (overheads counted)")
    fig.tight_layout()
    fig.savefig(out / "plan_heatmap.png", dpi=90)
    plt.close(fig)

    ints = [u for u in uniforms if math.isfinite(u.damage) and u.damage > 0 and "float" not in u.budget_label]
    lo = min(u.bpw for u in uniforms)
    hi = max(u.bpw for u in ints) if ints else plan.bpw
    pts = curve(table, lo, hi)
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, label="planned (mixed)")
    ax.plot([u.bpw for u in ints], [u.damage for u in ints], "s", label="uniform")
    for u in ints:
        ax.annotate(u.budget_label.removeprefix("uniform "), (u.bpw, u.damage), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    if plan.damage > 0:
        ax.plot([plan.bpw], [plan.damage], "*", ms=12, label="this plan")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder-block linears, overheads counted)")
    ax.set_ylabel("predicted damage (sum of tr(dW H dW^T))")
    ax.set_title(f"{title}: predicted quality vs size", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "plan_curve.png", dpi=90)
    plt.close(fig)
    return [out / "plan_heatmap.png", out / "plan_curve.png"]
