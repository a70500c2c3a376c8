"""Diagnostic: is the vq-kn GEMV's time a property of the layer instance?  The same shape and config, timed on
several freshly built layers (same seed, new allocations) beside BF16, each a median of --reps launches.

    PYTHONPATH=src python3 benchmarks/kernels/vq_kn_repeat.py --shape 4096x14336 --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_vq import bench, random_vq_layer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x14336")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--bits", type=int, default=2)
    a = ap.parse_args()
    from leanq.kernels import triton_vq_kn as vk

    cfgs = {"default": dict(BN=512, BV=8, num_warps=4), "evict_last": dict(BN=512, BV=8, num_warps=4, cb_evict="evict_last")}
    rows = []
    for shape in a.shapes.split(","):
        n, k = map(int, shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for i in range(a.layers):
            m = random_vq_layer(n, k, a.bits, "cuda", seed=i)
            pk = vk.packed_vq_kn(m)
            r = dict(shape=shape, layer=i, bf16_us=1e3 * bench(lambda: F.linear(x, w), a.reps, True))
            for name, c in cfgs.items():
                r[name + "_us"] = 1e3 * bench(lambda c=c: vk.run_vq_kn(x, pk, None, c), a.reps, True)
            r["cb_addr_mod_4k"] = pk["cb"].data_ptr() % 4096
            print(json.dumps(r), flush=True)
            rows.append(r)
            del m, pk
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "vq_kn_repeat.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
