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
            if bits == 4 and k % 128 == 0:  # batches 3 and 16 through the tensor-core w kernel (direct, split K)
                from leanq.kernels import cuda_int_mma as cm

                for m, cfg in ((16, None), (3, dict(rt=2, kw=2, spw=k // 256, pd=4))):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    out = cm.run_int_mma_w(x, pk, None, cfg)
                    torch.cuda.synchronize()
                    e = bk.rel_err(out, x.float() @ ref_w.t())
                    bad += not e < 1e-2
                    print(f"4-bit {n}x{k} mma-w M={m} {cfg}: rel err {e:.1e}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
