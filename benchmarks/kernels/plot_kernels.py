"""One figure of the GPU kernel results: 4-bit x BF16 by batch, and batch 1 by weight format, with issue 5's and
issue 6's targets drawn in. Reads the JSON lines that bench_cuda_int.py and bench_vq.py write.

    python benchmarks/kernels/plot_kernels.py            # the H200 files below -> docs/img/kernels_h200.png

The defaults name the files of each point's latest run: batch 1 and the integer widths from sessions 19-20, batch 4
from session 21 (the register form of the w kernel), batch 16 from session 20, batches 64-256 from session 12, the
codebook kernels from session 15 (their kernels have not changed since).

Each point is the graph-harness ratio against BF16 ``F.linear`` timed in the same run as the point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = ["4096x4096", "4096x11008", "11008x4096", "4096x14336", "14336x4096"]


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if "meta" not in r and r.get("kind") != "meta"]


def _pick(rows: list[dict], **want) -> dict[str, float]:
    """shape -> x_bf16_graph of the rows matching ``want`` (the last one per shape)."""
    out = {}
    for r in rows:
        if all(r.get(k) == v for k, v in want.items()) and isinstance(r.get("x_bf16_graph"), float):
            if not math.isnan(r["x_bf16_graph"]):
                out[r["shape"]] = r["x_bf16_graph"]
    return out


def _vq(rows: list[dict], setting: str, impls: list[str] | None = None) -> dict[str, float]:
    """shape -> the best CUDA table kernel's graph ratio at batch 1 (bench_vq.py's rows), among ``impls`` (names
    without " (graph)") when given."""
    bf = {r["shape"]: r["ms"] for r in rows if r.get("kind") == "baseline" and r.get("M") == 1
          and r.get("impl") == "bf16 F.linear (graph)"}
    out: dict[str, float] = {}
    for r in rows:
        if (r.get("kind") == "vq" and r.get("setting") == setting and r.get("M") == 1
                and str(r.get("impl", "")).startswith("cuda") and r["impl"].endswith("(graph)") and r["shape"] in bf
                and (not impls or r["impl"][: -len(" (graph)")] in impls)):
            out[r["shape"]] = max(out.get(r["shape"], 0.0), bf[r["shape"]] / r["ms"])
    return out


def _rows_of(paths: str) -> list[dict]:
    """The rows of comma-separated result files, in order (so a later file's row wins in :func:`_pick`)."""
    return [r for p in paths.split(",") if p for r in _rows(p)]


def _w_batch(final: list[dict], spec: str, m: int) -> dict[str, float]:
    """shape -> batch-m x BF16 of the w kernel: from ``spec`` ("FILE[: SUFFIX]", rows whose name ends with SUFFIX,
    without one the default config's), else the default rows of ``final``."""
    if not spec:
        return _pick(final, impl="batch-cuda-int-mma-w", M=m)
    path, _, suffix = spec.partition(": ")
    rows = [r for r in _rows(path) if str(r.get("impl", "")).startswith("batch-cuda-int-mma-w")
            and r["impl"].endswith(suffix.strip())]
    if not suffix.strip():
        rows = [r for r in rows if r["impl"] == "batch-cuda-int-mma-w"]
    return _pick(rows, M=m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--final", default=",".join(os.path.join(R, f"h200-2026-11-28-s19-{v}.jsonl") for v in ("rows", "r2u4")),
                    help="batch 1 (cuda-int, int4pack) and batch 16 (mma-w) rows, comma-separated files (a later file's "
                    "row wins per shape)")
    ap.add_argument("--b16", default=os.path.join(R, "h200-2026-11-28-s20-default.jsonl"),
                    help="FILE[: SUFFIX]: the batch-16 rows of the w kernel whose name ends with SUFFIX (without one: "
                    "the default config's; '' for the '--final' files' default rows)")
    ap.add_argument("--b4", default=os.path.join(R, "h200-2026-11-28-s21-final.jsonl"),
                    help="the same for batch 4 (the register form by default since session 21)")
    ap.add_argument("--b64", default=os.path.join(R, "ws-h200-2026-11-28-reduce.jsonl"), help="batch-64 rows")
    ap.add_argument("--gemm", default=os.path.join(R, "gemm-h200-2026-11-28-final.jsonl"), help="batch 128/256 rows")
    ap.add_argument("--widths", default=",".join(os.path.join(R, f) for f in ("h200-2026-11-28-s19-rows.jsonl",
                                                                              "h200-2026-11-28-s20-rk3.jsonl")),
                    help="batch-1 2/3/8-bit rows, comma-separated files (a later file's row wins per shape)")
    ap.add_argument("--vq", default=",".join(os.path.join(R, f"h200-2026-11-28-s15-cpw-{v}.jsonl") for v in ("vq2", "vq3")),
                    help="bench_vq.py rows, comma-separated files")
    ap.add_argument("--vq-impls", default="cuda stat t128 n4 v16 b4 gd1 ec cw4,cuda stat t128 n4 v8 b4 gd1 ec cw4,"
                    "cuda tile t256 n4 v16 gd1 ec",
                    help="the CUDA configs to draw, best per shape (default: the presets' defaults of version 16; "
                    "v8 is what vc1 picks at 4096x4096); '' for every config")
    ap.add_argument("--title", default="leanq kernels, H200 (driver 580.159.04, torch 2.11.0, triton 3.6.0), 2026-11-28: "
                    "batch 1 session 19 (3-bit session 20), 4 session 21, 16 session 20, 64-256 session 12, "
                    "vq session 15")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "docs", "img", "kernels_h200.png"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = _rows_of(args.final)
    b64, gemm = _rows(args.b64), _rows(args.gemm)
    by_batch = {
        1: _pick(final, impl="cuda-int", bits=4),
        4: _w_batch(final, args.b4, 4),
        16: _w_batch(final, args.b16, 16),
        64: _pick(b64, impl="batch-cuda-int-wgmma", M=64),
        128: _pick(gemm, impl="batch-cuda-int-wgmma", M=128),
        256: _pick(gemm, impl="batch-cuda-int-wgmma", M=256),
    }
    widths = _rows_of(args.widths)
    vq_files = [_rows(p) for p in args.vq.split(",") if p]  # each file's rows against its own run's BF16
    impls = [i for i in args.vq_impls.split(",") if i] or None

    def vq(setting: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for rows in vq_files:
            for shape, x in _vq(rows, setting, impls).items():
                out[shape] = max(out.get(shape, 0.0), x)
        return out

    fmts = {
        "2-bit": (_pick(widths, impl="cuda-int", bits=2), 4.5),
        "3-bit": (_pick(widths, impl="cuda-int", bits=3), 3.5),
        "4-bit": (by_batch[1], 3.0),
        "8-bit": (_pick(widths, impl="cuda-int", bits=8), 1.7),
        "vq2": (vq("vq2"), 2.5),
        "vq3": (vq("vq3"), 2.5),
        "int4pack": (_pick(final, impl="int4pack", bits=4), None),
    }

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw=dict(width_ratios=[1, 1.25]))
    batches = list(by_batch)
    for s in SHAPES:
        a.plot(range(len(batches)), [by_batch[m].get(s, float("nan")) for m in batches], "o-", label=s)
    for i, (m, t) in enumerate(((1, 3.0), (16, 2.0), (256, 0.9))):
        x = batches.index(m)
        a.hlines(t, x - 0.3, x + 0.3, colors="k", linestyles="--", linewidth=1.2)
    a.axhline(1.0, color="grey", linewidth=0.8)
    a.set_xticks(range(len(batches)), [str(m) for m in batches])
    a.set_xlabel("batch rows")
    a.set_ylabel("x BF16 F.linear (graph harness)")
    a.set_title("4-bit g128 by batch (dashes: issue 5's targets)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)

    names = list(fmts)
    w = 0.8 / len(SHAPES)
    for j, s in enumerate(SHAPES):
        b.bar([i + (j - 2) * w for i in range(len(names))], [fmts[n][0].get(s, float("nan")) for n in names], w,
              label=s)
    for i, n in enumerate(names):
        if fmts[n][1]:
            b.hlines(fmts[n][1], i - 0.42, i + 0.42, colors="k", linestyles="--", linewidth=1.2)
    b.axhline(1.0, color="grey", linewidth=0.8)
    b.set_xticks(range(len(names)), names)
    b.set_ylabel("x BF16 F.linear at batch 1")
    b.set_title("batch 1 by weight format (dashes: targets; 4-bit's is 2.5 at 4096x4096)")
    b.grid(alpha=0.3, axis="y")
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(args.out))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets, not figures
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(args.out)
    for m, d in by_batch.items():
        print(f"batch {m:>3}: " + " ".join(f"{d.get(s, float('nan')):.2f}" for s in SHAPES))
    for n in names:
        print(f"{n:>8}: " + " ".join(f"{fmts[n][0].get(s, float('nan')):.2f}" for s in SHAPES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
