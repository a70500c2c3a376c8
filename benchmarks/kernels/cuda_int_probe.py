"""Launch one CUDA kernel on one shape a few times, for a profiler to look at.

    ncu --clock-control none -k regex:int_gemv -c 3 --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/kernels/cuda_int_probe.py --shape 14336x4096 --bits 4

--kernel: int (kernels.cuda_int, batch 1), mma (kernels.cuda_int_mma, --batch rows), vqrows
(kernels.cuda_vq_rows) or vqlut (kernels.cuda_vq); for the vq kernels --bits picks the preset (2 or 3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk

from leanq.kernels import cuda_int as ci


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="14336x4096")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--cfg", default="", help="JSON launch config (default: the tuned one)")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--kernel", choices=["int", "mma", "vqrows", "vqlut"], default="int")
    ap.add_argument("--batch", type=int, default=16, help="batch rows of --kernel mma")
    args = ap.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    cfg = json.loads(args.cfg) if args.cfg else None
    if args.kernel != "int":
        return other(args, n, k, cfg)
    m = bk.random_layer(n, k, args.bits)
    pk = ci.packed_rk(m)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ ci.reference_rk(pk).t()
    for _ in range(args.launches):
        out = ci.run_int_cuda(x, pk, None, cfg)
    torch.cuda.synchronize()
    print("rel err", bk.rel_err(out, ref))
    return 0


def other(args, n: int, k: int, cfg: dict | None) -> int:
    if args.kernel == "mma":
        from leanq.kernels import cuda_int_mma as cm

        pk = ci.packed_rk(bk.random_layer(n, k, args.bits))
        x = torch.randn(args.batch, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ ci.reference_rk(pk).t()
        run = lambda: cm.run_int_mma(x, pk, None, cfg)
    else:
        from bench_vq import random_vq_layer

        from leanq.formats.layouts import container

        m = random_vq_layer(n, k, args.bits, "cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ container(m).dequantize(torch.float32).t()
        if args.kernel == "vqrows":
            from leanq.kernels import cuda_vq_rows as vr

            pk = vr.repack_vq_rk(m.qweight, m.codebooks, m.scales, m.spec, k)
            run = lambda: vr.run_vq_rows(x, pk, None, cfg)
        else:
            from leanq.kernels import cuda_vq as cv
            from leanq.kernels import triton_vq_kn as vk

            pk = vk.packed_vq_kn(m)
            run = lambda: cv.run_vq_cuda(x, pk, None, cfg)
    for _ in range(args.launches):
        out = run()
    torch.cuda.synchronize()
    print(args.kernel, "rel err", bk.rel_err(out, ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
