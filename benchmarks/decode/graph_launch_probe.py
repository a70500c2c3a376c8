"""How a CUDA graph's launch cost grows with its kernel count, and whether the GPU starts before the launch call
returns: graphs of n dependent small kernels (an in-place add on a 4096-element vector, about the size of a decode
step's norm), replayed with and without the PyTorch profiler.

Per n, medians over the replays (microseconds): ``launch`` (host time of ``replay()``), ``wall`` (replay and
synchronize), ``gpu`` (CUDA events around the replay). ``wall`` near ``launch + gpu`` says the GPU waited for the
launch call; near ``max(launch, gpu)`` says it did not.

    python3 benchmarks/decode/graph_launch_probe.py --sizes 100,400,800
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def probe(n: int, reps: int) -> dict:
    x = torch.zeros(4096, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            x.add_(1)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rows = {"launch": [], "wall": [], "gpu": []}
    for i in range(reps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        e0.record()
        g.replay()
        t1 = time.perf_counter()
        e1.record()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 3:
            rows["launch"].append((t1 - t0) * 1e6)
            rows["wall"].append((t2 - t0) * 1e6)
            rows["gpu"].append(e0.elapsed_time(e1) * 1e3)
    return {k: round(statistics.median(v), 1) for k, v in rows.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,100,200,400,800")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    res = []
    for n in [int(v) for v in a.sizes.split(",")]:
        r = dict(n=n, profiler=False, **probe(n, a.reps))
        print(json.dumps(r), flush=True)
        res.append(r)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            r = dict(n=n, profiler=True, **probe(n, a.reps))
        print(json.dumps(r), flush=True)
        res.append(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=res), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
