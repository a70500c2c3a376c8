"""Probes of the CUDA codebook kernel (kernels.cuda_vq) on a GPU, batch 1, bf16; times in microseconds from
bench_kernels.bench_graph (CUDA-graph replays of back-to-back calls on rotating weight copies), BF16 F.linear
timed the same way in the same run.  One JSON object per shape on stdout.

    cd benchmarks/kernels && PYTHONPATH=../../src python3 vq_cuda_probe.py ablate   # where the time goes
    cd benchmarks/kernels && PYTHONPATH=../../src python3 vq_cuda_probe.py sweep    # stationary-kernel tiles

ablate: the tile kernel with parts left out (the results are then wrong; timing only): bit 1 plain stores for
the atomic adds, bit 2 no table build, bit 4 no table reads; "fused" finishes in the last block instead of a
second kernel.  sweep: BF16 time / kernel time for stationary-kernel shapes around the chosen one.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from bench_kernels import bench_graph
from bench_vq import random_vq_layer


def main() -> int:
    from leanq.kernels import cuda_vq as cv
    from leanq.kernels import triton_vq_kn as vk

    what = sys.argv[1] if len(sys.argv) > 1 else "ablate"
    print(json.dumps(dict(kind="meta", device=torch.cuda.get_device_name(), torch=torch.__version__,
                          command=" ".join(sys.argv))), flush=True)
    if what == "ablate":
        shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
        cfgs = []
        for name, cfg in [("t256x4v16", dict(threads=256, npt=4, vc=16)), ("t256x4v8", dict(threads=256, npt=4, vc=8)),
                          ("t256x8v8", dict(threads=256, npt=8, vc=8)), ("t128x8v16", dict(threads=128, npt=8, vc=16))]:
            for fuse in (False, True):
                for ab in ((0, 2, 4, 6) if name == "t256x4v16" else (0,)):
                    cfgs.append((f"{name}{' fused' if fuse else ''} ab{ab}", dict(cfg, ablate=ab, fuse=fuse)))
    else:
        shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
        cfgs = [(f"s t{t} n{n} v{v} b{b}", dict(threads=t, npt=n, vc=v, mode="stationary", bps=b)) for t, n, v, b in [
            (128, 4, 16, 4), (128, 4, 16, 8), (128, 4, 16, 3), (128, 4, 8, 4), (128, 4, 8, 8), (64, 4, 16, 4),
            (64, 4, 16, 8), (128, 4, 32, 4), (256, 4, 16, 4), (64, 8, 16, 4), (64, 4, 32, 4), (32, 4, 16, 8)]]
        cfgs.append(("tile t256 n4 v16", dict(threads=256, npt=4, vc=16)))
    for bits in (2, 3):
        for n, k in shapes:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ws = {0: w}
            base = bench_graph(lambda c: (lambda w=ws.setdefault(c, w.clone()): F.linear(x, w)), 2 * n * k)
            del ws, w
            m = random_vq_layer(n, k, bits, "cuda")
            pk = vk.packed_vq_kn(m)
            pks = {0: pk}
            res = {}
            for name, c in cfgs:
                if not cv.layout_ok(pk, c):
                    continue
                ms = bench_graph(lambda cp, c=c: (lambda p=pks.setdefault(cp, dict(pk, idx=pk["idx"].clone())):
                                                  cv.run_vq_cuda(x, p, None, c)), pk["idx"].numel())
                res[name] = round(ms * 1e3, 2) if what == "ablate" else round(base / ms, 2)
            print(json.dumps(dict(bits=bits, shape=f"{n}x{k}", bf16_us=round(base * 1e3, 2), **res)), flush=True)
            del m, pk, pks
    return 0


if __name__ == "__main__":
    sys.exit(main())
