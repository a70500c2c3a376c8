"""Launch the CUDA int GEMV (kernels.cuda_int) on one shape a few times, for a profiler to look at.

    ncu --clock-control none -k regex:int_gemv -c 3 --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/kernels/cuda_int_probe.py --shape 14336x4096 --bits 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402

from leanq.kernels import cuda_int as ci  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="14336x4096")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--cfg", default="", help="JSON launch config (default: the tuned one)")
    ap.add_argument("--launches", type=int, default=5)
    args = ap.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    cfg = json.loads(args.cfg) if args.cfg else None
    m = bk.random_layer(n, k, args.bits)
    pk = ci.packed_rk(m)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ ci.reference_rk(pk).t()
    for _ in range(args.launches):
        out = ci.run_int_cuda(x, pk, None, cfg)
    torch.cuda.synchronize()
    print("rel err", bk.rel_err(out, ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
