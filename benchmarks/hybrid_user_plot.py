"""Measured ppl vs bits per weight, planned vs uniform GPTQ (benchmarks/hybrid_user_path.py's results).

    python benchmarks/hybrid_user_plot.py PLANNED.json UNIFORM.json --png docs/img/hybrid_gptq_ppl_vs_bpw.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("planned", help="results.json whose P* rows are the plans to draw")
    ap.add_argument("uniform", help="results.json whose U* rows are the uniform settings")
    ap.add_argument("--png", required=True)
    ap.add_argument("--title", default="SmolLM2-135M, GPTQ (leanq defaults): planned vs uniform")
    a = ap.parse_args()
    p = {k: v for k, v in json.load(open(a.planned)).items() if k.startswith("P")}
    u = {k: v for k, v in json.load(open(a.uniform)).items() if k.startswith("U")}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for rows, style, label, off in ((u, "s--", "uniform", (6, 6)), (p, "o-", "planned (--bpw)", (-8, -26))):
        pts = sorted((v["bits_per_weight"], v["ppl"], k) for k, v in rows.items())
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, label=label)
        for x, y, k in pts:
            name = k[1:].replace(":", " ") if k.startswith("U") else f"{k[1:]} bpw"
            ax.annotate(f"{name}\n{y:.2f}", (x, y), textcoords="offset points", xytext=off, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(min(v["ppl"] for v in {**p, **u}.values()) * 0.8, max(v["ppl"] for v in {**p, **u}.values()) * 1.3)
    ax.set_xlim(left=min(v["bits_per_weight"] for v in {**p, **u}.values()) - 0.15)
    ax.set_xlabel("bits per weight of the decoder-block linears (scales and zeros counted)")
    ax.set_ylabel("WikiText-2 ppl (48 x 1024 tokens, log scale)")
    ax.set_title(a.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.png)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
