"""Where one decode step's GPU time goes: the kernel listings that ``profile_decode.py --listing`` writes, each
kernel's added time summed by what it does, drawn as one stacked bar per listing (and printed as a table).

    python benchmarks/decode/plot_step.py            # session 29's H200 listings -> docs/img/decode_step_h200.png

A kernel's added time is its end minus the latest end of the kernels before it, so a step's added times sum to its
GPU time; the part of it before the kernel starts (the gap) is counted as idle.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
DEFAULT = [
    ("BF16", "h200-2026-11-29-s29-step-bf16.txt"),
    ("4-bit, layers folded (session 28)", "h200-2026-11-29-s29-step-int4-s28.txt"),
    ("+ rotary, cache write (first form)", "h200-2026-11-29-s29-step-int4-rope-atomic.txt"),
    ("+ attention (session 29)", "h200-2026-11-29-s29-step-int4-attend.txt"),
]

# (category, pattern on the kernel's name), first match wins
CATEGORIES = [
    ("linear layers", r"int_gemv|int_mma|nvjet|cutlass|splitKreduce|gemm|cublas"),
    ("attention", r"sdpa|flash|decode_attention_kernel"),
    ("rotary, cache write", r"rope_cache|index_copy|cos|scaled_dot_product"),
    ("cache position advances", r"triton_poi_fused_add_copy__\d+$"),
    ("norms, SiLU, adds", r"triton_(red|poi)_fused"),
    ("generate's own kernels", r"."),
]
COLORS = {"linear layers": "#4c72b0", "attention": "#dd8452", "rotary, cache write": "#55a868",
          "cache position advances": "#c44e52", "norms, SiLU, adds": "#8172b3", "generate's own kernels": "#937860",
          "idle between kernels": "#cccccc"}


def read_listing(path: Path) -> list[tuple[float, float, float, str]]:
    """(duration, gap, added, name) of each kernel of a listing (offset, duration, gap, added time, name)."""
    rows = []
    for line in path.read_text().splitlines()[1:]:
        parts = line.split(None, 4)
        if len(parts) == 5:
            rows.append((float(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
    return rows


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return CATEGORIES[-1][0]


def breakdown(rows) -> dict[str, float]:
    """Microseconds of the step by category, the gaps before kernels as 'idle between kernels'."""
    out = {c: 0.0 for c, _ in CATEGORIES}
    out["idle between kernels"] = 0.0
    for _, gap, added, name in rows:
        idle = max(0.0, gap)
        out["idle between kernels"] += min(idle, added)
        out[category(name)] += max(0.0, added - idle)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listing", action="append", default=None, metavar="LABEL=FILE",
                    help="a listing to draw (repeatable); default: session 29's H200 listings")
    ap.add_argument("--out", default=str(HERE.parents[1] / "docs" / "img" / "decode_step_h200.png"))
    ap.add_argument("--no-plot", action="store_true", help="print the table only")
    a = ap.parse_args()
    items = [tuple(s.split("=", 1)) for s in a.listing] if a.listing else [(lbl, RES / f) for lbl, f in DEFAULT]
    data = [(lbl, breakdown(read_listing(Path(f)))) for lbl, f in items]
    cats = list(data[0][1])
    print("| per decode step (us) | " + " | ".join(lbl for lbl, _ in data) + " |")
    print("|---|" + "---:|" * len(data))
    for c in cats:
        print(f"| {c} | " + " | ".join(f"{d[c]:.0f}" for _, d in data) + " |")
    print("| **GPU step** | " + " | ".join(f"**{sum(d.values()):.0f}**" for _, d in data) + " |")
    if a.no_plot:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.75 * len(data)))
    labels = [lbl for lbl, _ in data][::-1]
    left = [0.0] * len(data)
    for c in cats:
        vals = [d[c] / 1000 for _, d in data][::-1]
        ax.barh(labels, vals, left=left, color=COLORS.get(c), label=c, height=0.6)
        left = [x + v for x, v in zip(left, vals)]
    for y, total in enumerate(left):
        ax.text(total + 0.03, y, f"{total:.2f} ms", va="center", fontsize=9)
    ax.set_xlabel("GPU time of one decode step (ms): 7B-shaped model, batch 1, H200")
    ax.set_xlim(0, max(left) * 1.12)
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(data) < 4 else -0.28),
              frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
