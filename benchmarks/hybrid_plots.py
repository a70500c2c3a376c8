"""Pictures for docs/results/hybrid.md from benchmarks/hybrid_bench.py's output.

    python benchmarks/hybrid_plots.py --out out/hybrid --img docs/img

Writes hybrid_heatmap_<bpw>.png (the plan at each planned budget that was evaluated),
hybrid_ppl_vs_bpw.png (measured ppl, planned vs uniform) and hybrid_predicted.png
(predicted damage vs bits per weight) and prints a markdown table of the eval rows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leanq.plan_report import _pictures  # noqa: E402
from leanq.planner import make_plan, uniform_plan  # noqa: E402
from leanq.plan_report import _grid  # noqa: E402
from leanq.sensitivity import load_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/hybrid")
    ap.add_argument("--img", default="docs/img")
    a = ap.parse_args()
    out, img = Path(a.out), Path(a.img)
    img.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r["stage"] == "eval"]
    # a planned row is re-planned from the table it was planned with: plain proxy or loss-gain (fisher) weighted
    tables = {w: load_table(out / f) for w, f in (("none", "sensitivity.json"), ("fisher", "sensitivity_fisher.json"))
              if (out / f).exists()}
    suffix = {"none": "", "fisher": "_fisher"}
    label = {"none": "plain proxy", "fisher": "loss-gain weighted proxy"}

    tmp = out / "pictures"
    tmp.mkdir(parents=True, exist_ok=True)
    for r in evals:
        if r["config"].startswith("P"):
            b, w = float(r["config"][1:]), r.get("weighting", "none")
            table = tables[w]
            plan = make_plan(table, bpw=b)
            layers, types, cells = _grid(plan, table, 16)
            uniforms = [uniform_plan(table, c) for c in table.candidates]
            _pictures(plan, table, tmp, layers, types, cells, uniforms, f"SmolLM2-135M plan at {b:g} bpw ({label[w]})")
            (tmp / "plan_heatmap.png").replace(img / f"hybrid_heatmap_{b:g}{suffix[w]}.png")
            (tmp / "plan_curve.png").replace(img / f"hybrid_predicted{suffix[w]}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    series = [(lambda r, w=w: r["config"].startswith("P") and r.get("weighting", "none") == w, "-o",
               f"planned, {label[w]}") for w in ("fisher", "none")]
    series.append((lambda r: r["config"].startswith("U"), "s", "uniform"))
    for pick, mark, lab in series:
        pts = sorted((r["bpw"], r["ppl"], r["config"]) for r in evals if pick(r))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], mark, label=lab)
            for x, y, c in pts:
                ax.annotate(c[1:], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder-block linears, scales and zeros counted)")
    ax.set_ylabel("WikiText-2 ppl (48 x 1024 tokens)")
    ax.set_title("SmolLM2-135M, RTN: planned mixed precision vs uniform", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "hybrid_ppl_vs_bpw.png", dpi=90)
    plt.close(fig)

    print("| config | proxy (planned rows) | bits per weight | predicted damage | ppl | eval s |")
    print("|---|---|---|---|---|---|")
    for r in evals:
        d = r["predicted_damage"]
        w = label[r.get("weighting", "none")] if r["config"].startswith("P") else "-"
        ds = f"{d:.4g}" if d is not None and not (isinstance(d, float) and math.isnan(d)) else "-"
        print(f"| {r['config']} | {w} | {r['bpw']:.4f} | {ds} | {r['ppl']:.2f} | {r['eval_seconds']:.0f} |")


if __name__ == "__main__":
    main()
