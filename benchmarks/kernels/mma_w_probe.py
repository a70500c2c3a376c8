"""One shape through the w tensor-core kernel (kernels.cuda_int_mma.run_int_mma_w), or with ``x`` in place of the
config the x kernel (kernels.cuda_int_mmax.run_int_mma_x), for a profiler: a few launches of one config, then the
time per launch (CUDA events, graph of 24 launches) beside the batch-1 GEMV on the same words.

    PYTHONPATH=src python3 benchmarks/kernels/mma_w_probe.py 14336 4096 4 4/4/8/3
    PYTHONPATH=src python3 benchmarks/kernels/mma_w_probe.py 14336 4096 4 7/2/16/3 rp=1 pt=4 --time --abl=1,2,4,6
    PYTHONPATH=src python3 benchmarks/kernels/mma_w_probe.py 14336 4096 16 x pf=2 --time --abl=1,2
    ncu --kernel-name int_mma_w --launch-skip 2 --launch-count 1 --section SpeedOfLight ... python3 ...
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_kernels as bk  # noqa: E402

from leanq.kernels import cuda_int as ci  # noqa: E402
from leanq.kernels import cuda_int_mma as cm  # noqa: E402
from leanq.kernels import cuda_int_mmax as cx  # noqa: E402

# timing-only ablation bits of each kernel (cuda_int_mma.source_w's ABL, cuda_int_mmax.source_x's abl)
ABLATIONS = {"w": ((1, "weights from L2 (row tile 0 only)"), (2, "no decode / mma"), (4, "no x staging"),
                   (6, "neither decode nor staging"), (7, "all three"),
                   (8, "weights read 1 KB contiguous per warp step"), (10, "that, no decode / mma"),
                   (12, "that, no x staging"), (14, "that, neither decode nor staging")),
             "x": ((1, "no sum over the warps, no barrier"), (2, "no decode / mma"), (3, "neither"),
                   (4, "weights read as 512-byte runs of one row"), (8, "no group words"), (6, "no decode, runs"))}


def main() -> int:
    n, k, m = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    kind = "x" if sys.argv[4] == "x" else "w"
    if kind == "x":
        cfg, run, launch = {}, cx.run_int_mma_x, cx.x_launch
    else:
        rt, kw, spw, pd = (int(v) for v in sys.argv[4].split("/"))
        cfg, run, launch = dict(rt=rt, kw=kw, spw=spw or None, pd=pd), cm.run_int_mma_w, cm.w_launch
    # launch options after the config, e.g. mg=1 xv=0 (not the --flags)
    cfg.update((a.split("=")[0], int(a.split("=")[1])) for a in sys.argv[5:] if "=" in a and not a.startswith("--"))
    pk = ci.packed_rk(bk.random_layer(n, k, 4, seed=1))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ ci.reference_rk(pk).t()
    for _ in range(4):
        y = run(x, pk, None, cfg)
    torch.cuda.synchronize()
    c, grid = launch(m, n, k, cfg, torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"{n}x{k} M={m} {kind} kernel cfg {c} grid {grid} rel err {bk.rel_err(y, ref):.1e}", flush=True)
    if "--time" in sys.argv:
        nb = pk["words"].numel() * 4 + pk["sz"].numel() * 4
        pks = [ci.packed_rk(bk.random_layer(n, k, 4, seed=s)) for s in range(max(2, -(-(100 << 20) // nb)))]
        g = bk.bench_graph(lambda i: (lambda: run(x, pks[i % len(pks)], None, cfg)), nb, reps=10)
        x1 = x[:1].contiguous()
        g1 = bk.bench_graph(lambda i: (lambda: ci.run_int_cuda(x1, pks[i % len(pks)], None)), nb, reps=10)
        print(f"  mma-{kind} {g * 1e3:.1f} us ({nb / (g * 1e-3) / 1e9:.0f} GB/s), batch-1 GEMV {g1 * 1e3:.1f} us",
              flush=True)
        only = [int(v) for a in sys.argv if a.startswith("--abl=") for v in a[6:].split(",")]  # e.g. --abl=2,4,6
        for abl, what in ABLATIONS[kind]:
            if only and abl not in only:
                continue
            ca = dict(cfg, abl=abl)
            ga = bk.bench_graph(lambda i: (lambda: run(x, pks[i % len(pks)], None, ca)), nb, reps=10)
            print(f"  ablation {abl} ({what}): {ga * 1e3:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
