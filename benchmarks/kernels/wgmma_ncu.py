"""Launch kernels.cuda_int_wgmma a few times on one shape, for ncu (``--kernel-name int_wgmma --launch-skip 2``).

    PYTHONPATH=src python3 benchmarks/kernels/wgmma_ncu.py N K M [wg/bm/nst/split/pipe/minb[/ws]]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402

from leanq.kernels import cuda_int as ci  # noqa: E402
from leanq.kernels import cuda_int_wgmma as cw  # noqa: E402

n, k, m = (int(v) for v in sys.argv[1:4])
cfg = None
if len(sys.argv) > 4:
    cfg = dict(zip(("wg", "bm", "nst", "split", "pipe", "minb", "ws"), (int(f) for f in sys.argv[4].split("/"))))
pk = ci.packed_rk(bk.random_layer(n, k, 4))
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(5):
    cw.run_int_wgmma(x, pk, None, cfg)
torch.cuda.synchronize()
print("done", cw.config(m, n, k, 132) if cfg is None else cfg)
