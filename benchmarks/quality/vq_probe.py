"""Probe: GPTQ 2-bit g64 vs the vq 2-bit preset on the first N decoder blocks of SmolLM2-135M (the rest kept
float), same calibration, ppl on the first W windows of the core protocol, on any device.

    python benchmarks/quality/vq_probe.py --blocks 4 --windows 6 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from leanq.api import quantize
from leanq.data import EVAL_FILE, find_file, read_text, tokenize
from leanq.evaluate import perplexity


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="4", help="N (blocks 0..N-1) or A:B (blocks A..B-1) are quantized")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="gptq2,vq2")
    a = ap.parse_args()
    lo, hi = (int(v) for v in a.blocks.split(":")) if ":" in a.blocks else (0, int(a.blocks))
    keep = tuple(f"*.layers.{i}.*" for i in list(range(0, lo)) + list(range(hi, 64)))
    runs = {"gptq2": ("gptq", dict(bits=2, group_size=64)), "vq2": ("vq", dict(bits=2)),
            "vq3": ("vq", dict(bits=3)), "gptq3": ("gptq", dict(bits=3, group_size=128))}
    ids = None
    for row in a.rows.split(","):
        method, kw = runs[row]
        t = time.time()
        qm = quantize("smollm2-135m", method=method, nsamples=a.nsamples, keep=keep, device=a.device, progress=False, **kw)
        if ids is None:
            ids = tokenize(qm.tokenizer, read_text(find_file(None, EVAL_FILE, "--data")))
        ppl, _ = perplexity(qm.model.to(a.device), ids, 1024, a.windows, a.device, progress=False)
        print(json.dumps(dict(row=row, blocks=a.blocks, windows=a.windows, nsamples=a.nsamples, device=a.device,
                              ppl=ppl, seconds=time.time() - t)), flush=True)
        del qm
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
