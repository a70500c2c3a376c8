"""One quick check per width of the CUDA int GEMV's two forms against the float32 reference (a GPU call's first
step: a hang or a wrong result shows here in seconds, before the long tests and benchmarks).

    PYTHONPATH=src python3 benchmarks/kernels/cuda_int_smoke.py
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_kernels as bk  # noqa: E402

from leanq.kernels import cuda_int as ci  # noqa: E402


def main() -> int:
    bad = 0
    for bits in (4, 3, 2, 8):
        for n, k in ((333, 4160), (4096, 4096)):
            m = bk.random_layer(n, k, bits, seed=bits)
            pk = ci.packed_rk(m)
            ref_w = ci.reference_rk(pk)
            for cfg in (None, dict(mode="stream", threads=256, st=4, u=1)):
                x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                out = torch.full((1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                ci.run_int_cuda(x, pk, None, cfg, out=out)
                torch.cuda.synchronize()
                e = bk.rel_err(out, x.float() @ ref_w.t())
                bad += not e < 1e-2
                print(f"{bits}-bit {n}x{k} {'stream' if cfg else 'rows'}: rel err {e:.1e}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
