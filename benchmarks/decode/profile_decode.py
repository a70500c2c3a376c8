"""Where a 4-bit decode step's time goes on a GPU: the Llama-2-7B-shaped model of bench_decode.py,
RTN 4-bit g128 on the rk layout (``--layout kn``: the Triton kn layout), transformers' generate with a static cache (torch.compile, CUDA graphs;
``--graph``: the decode step as one graph by leanq.hf_graph).

Prints the tokens/s of two timed generates, then one profiled generate: the GPU kernels summed by name
(per token), and the host-side table (PyTorch profiler, by CPU time).  Compare the GPU kernel time per
token with the wall time per token: the difference is time the GPU waits for the host.

    PYTHONPATH=src python3 benchmarks/decode/profile_decode.py --layers 32 --new-tokens 128
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import statistics
import sys
import time

import torch


def busy_us(spans: list) -> float:
    """Length of the union of (start, end) intervals: the time at least one kernel ran."""
    tot, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            tot += b - max(a, end)
            end = b
    return tot


def timeline(events) -> dict:
    """Per decode step, medians in microseconds. A step runs from the end of one stop check (the last
    ``cudaStreamSynchronize`` before a ``cudaGraphLaunch``) to the end of the next:

    - ``host_pre``: that synchronize's end to the launch's start, host work with nothing queued on the GPU
      (``pre_kernels``: the eager kernels it launches);
    - ``launch_host``: how long ``cudaGraphLaunch`` itself takes on the host;
    - ``launch_to_gpu``: the launch's start to the first kernel after it;
    - ``span``: that kernel's start to the end of the last kernel before the next synchronize ends (``kernels`` of
      them); ``busy`` is the union of their intervals, so ``span - busy`` is the gaps between kernels inside it;
    - ``wake``: the last kernel's end to the synchronize's end.

    So ``host_pre + launch_to_gpu + span + wake`` is the step.
    """
    launches = sorted((e.time_range.start, e.time_range.end) for e in events
                      if e.device_type.name == "CPU" and e.name == "cudaGraphLaunch")
    sync_ends = sorted(e.time_range.end for e in events
                       if e.device_type.name == "CPU" and e.name == "cudaStreamSynchronize")
    kern = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    rows = collections.defaultdict(list)
    for (l0, l1), (n0, _) in zip(launches[1:-1], launches[2:]):  # the first launch may be the prompt's graph
        before = [t for t in sync_ends if t <= l0]
        after = [t for t in sync_ends if l0 < t <= n0]
        if not before or not after:
            continue
        s0, s1 = before[-1], after[-1]
        pre = [k for k in kern if s0 <= k[0] < l0]
        ks = [k for k in kern if l0 <= k[0] < s1]
        if not ks:
            continue
        end = max(k[1] for k in ks)
        rows["step"].append(s1 - s0)
        rows["host_pre"].append(l0 - s0)
        rows["pre_kernels"].append(len(pre))
        rows["launch_host"].append(l1 - l0)
        rows["launch_to_gpu"].append(ks[0][0] - l0)
        rows["span"].append(end - ks[0][0])
        rows["busy"].append(busy_us(ks))
        rows["kernels"].append(len(ks))
        rows["wake"].append(s1 - end)
    out = {k: round(statistics.median(v), 1) for k, v in rows.items()}
    out["steps"] = len(rows["step"])
    return out


def gpu_window(events) -> dict:
    """Per decode step, averaged over the decode (from the third graph launch's first kernel to the last kernel's
    end, whatever the host waits on): ``gpu_step`` the GPU's wall time, ``gpu_busy`` the union of its kernels'
    intervals, ``gpu_idle`` the rest; of that idle, ``idle_before_graph`` (median) is the GPU waiting right before a
    step's graph starts (the host late with the step's inputs or launch), the rest is gaps inside the steps.
    ``launch_interval``: the time from one graph launch to the next on the host (median): the host's step where the
    host is the bottleneck, the GPU's pace where the GPU is."""
    launches = sorted(e.time_range.start for e in events
                      if e.device_type.name == "CPU" and e.name == "cudaGraphLaunch")
    kern = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    if len(launches) < 4:
        return {}
    ks = [k for k in kern if k[0] >= launches[2]]
    if not ks:
        return {}
    steps = len(launches) - 2
    wall = max(k[1] for k in ks) - ks[0][0]
    busy = busy_us(ks)
    before = []
    for l0 in launches[3:]:
        first = next((k for k in ks if k[0] >= l0), None)
        if first is None:
            continue
        prev_end = max((k[1] for k in ks if k[0] < first[0]), default=first[0])
        before.append(max(0.0, first[0] - prev_end))
    out = dict(gpu_step=round(wall / steps, 1), gpu_busy=round(busy / steps, 1),
               gpu_idle=round((wall - busy) / steps, 1), steps=steps)
    if before:
        out["idle_before_graph"] = round(statistics.median(before), 1)
        out["launch_interval"] = round(statistics.median(b - a for a, b in zip(launches[2:], launches[3:])), 1)
    return out


def gaps_by_kernel(events, top: int = 12) -> list[tuple[str, float, float, float]]:
    """The idle time before each kernel of the decode (its start minus the latest end of the kernels before it),
    summed by the kernel's name and that of the kernel before it: (the two names, us per step, launches per step,
    median gap in us), largest first. Says which transitions hold the GPU's idle time inside the steps."""
    launches = sorted(e.time_range.start for e in events
                      if e.device_type.name == "CPU" and e.name == "cudaGraphLaunch")
    kern = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type.name == "CUDA")
    if len(launches) < 4:
        return []
    ks = [k for k in kern if k[0] >= launches[2]]
    steps = len(launches) - 2
    by = collections.defaultdict(list)
    end, prev = None, None
    for a, b, name in ks:
        if end is not None:
            by[(prev[:34], name[:34])].append(max(0.0, a - end))
        if end is None or b > end:
            end, prev = b, name
    rows = [(f"{p} -> {n}", sum(g) / steps, len(g) / steps, statistics.median(g)) for (p, n), g in by.items()]
    return sorted(rows, key=lambda r: -r[1])[:top]


def decode_steps(events) -> list[list[tuple[float, float, str]]]:
    """The GPU kernels of each decode step replayed from a graph, (start, end, name) in start order: a step's kernels
    run from the first kernel at or after its ``cudaGraphLaunch`` to the first kernel at or after the next launch
    (the first two launches, which may hold the prompt, are skipped; the last step is open-ended)."""
    launches = sorted(e.time_range.start for e in events
                      if e.device_type.name == "CPU" and e.name == "cudaGraphLaunch")
    kern = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type.name == "CUDA")
    steps = []
    for l0, l1 in zip(launches[2:], launches[3:]):
        first = next((i for i, k in enumerate(kern) if k[0] >= l0), None)
        nxt = next((i for i, k in enumerate(kern) if k[0] >= l1), None)
        if first is None or nxt is None:
            continue
        steps.append(kern[first:nxt])
    return steps


def by_position(steps, name: str = "int_gemv", period: int = 4) -> list[tuple[int, int, float, float, float]]:
    """The launches of kernel ``name`` in each step, by their position modulo ``period`` (a folded decoder layer runs
    four GEMVs in order: q/k/v, o_proj, gate/up, down): (position, launches per step, median duration, median gap
    before it, median time it adds), in microseconds. A kernel's added time is its end minus the latest end of the
    kernels before it (its own duration less what overlapped its predecessor's, plus the gap before it), so the
    added times of a step's kernels sum to the step's GPU time."""
    rows = collections.defaultdict(lambda: ([], [], []))
    for ks in steps:
        end, j = None, 0
        for a, b, n in ks:
            if n.startswith(name):
                d, g, ad = rows[j % period]
                d.append(b - a)
                g.append(0.0 if end is None else max(0.0, a - end))
                ad.append(b - a if end is None else max(0.0, b - max(end, a)) + max(0.0, a - end))
                j += 1
            end = b if end is None else max(end, b)
    med = statistics.median
    return [(p, round(len(d) / max(1, len(steps))), med(d), med(g), med(ad)) for p, (d, g, ad) in sorted(rows.items())]


def step_listing(ks) -> list[str]:
    """One step's kernels in order: start offset, duration, gap before, added time (us) and name."""
    out, end, t0 = [], None, ks[0][0] if ks else 0.0
    for a, b, n in ks:
        gap = 0.0 if end is None else a - end
        add = b - a if end is None else max(0.0, b - max(end, a)) + max(0.0, a - end)
        out.append(f"{a - t0:9.1f} {b - a:7.2f} {gap:7.2f} {add:7.2f}  {n[:90]}")
        end = b if end is None else max(end, b)
    return out


def profile_once(model, ids, kw: dict, new: int, table: bool, label: str = "int4", listing: str | None = None) -> None:
    """Compile (first generate), two timed generates, one profiled: GPU kernel time per token by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model.generate(ids, **kw)  # compiles
        torch.cuda.synchronize()
        for _ in range(2):
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            print(f"{label} {new} tokens: {t:.3f} s, {t / new * 1e3:.2f} ms per token (prefill included)", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            toks = model.generate(ids, **kw)
            torch.cuda.synchronize()
    # the tokens, to compare runs that should compute the same thing (a changed launch mode, say)
    print(f"tokens digest: {hashlib.sha256(toks.cpu().numpy().tobytes()).hexdigest()[:16]}")
    agg = collections.defaultdict(lambda: [0, 0.0])
    spans = []
    for e in prof.events():
        if e.device_type.name == "CUDA":
            agg[e.name[:70]][0] += 1
            agg[e.name[:70]][1] += e.device_time_total
            spans.append((e.time_range.start, e.time_range.end))
    total = sum(v[1] for v in agg.values())
    print(f"GPU kernel time: {total / new:.0f} us per token")
    print(f"GPU busy (the union of the kernels' intervals; overlapping kernels count once): "
          f"{busy_us(spans) / new:.0f} us per token")
    for name, (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"{us / new:9.1f} us/token {n / new:7.1f} launches/token  {name}")
    tl = timeline(prof.events())
    print("timeline, medians per decode step (us): " + ", ".join(f"{k} {v}" for k, v in tl.items()))
    gw = gpu_window(prof.events())
    print("GPU over the decode, per step (us): " + ", ".join(f"{k} {v}" for k, v in gw.items()))
    print("idle before a kernel, by the kernel before it and the kernel (us per step, launches per step, median us):")
    for name, us, n, med in gaps_by_kernel(prof.events()):
        print(f"{us:9.1f} {n:7.1f} {med:7.2f}  {name}")
    steps = decode_steps(prof.events())
    if steps:
        print("int_gemv by position in the layer (folded: q/k/v, o_proj, gate/up, down), medians in us: "
              "position, launches per step, duration, gap before, added time")
        for p, n, d, g, ad in by_position(steps):
            print(f"  {p} {n:5d} {d:8.2f} {g:8.2f} {ad:8.2f}")
        per = collections.defaultdict(list)
        for ks in steps:
            c = collections.Counter()
            end = None
            for a, b, n in ks:
                add = b - a if end is None else max(0.0, b - max(end, a)) + max(0.0, a - end)
                c[n[:50]] += add
                end = b if end is None else max(end, b)
            for n, v in c.items():
                per[n].append(v)
        print("added time per step by kernel name (median over steps, us):")
        for n, v in sorted(per.items(), key=lambda kv: -statistics.median(kv[1]))[:14]:
            print(f"  {statistics.median(v):8.1f}  {n}")
        if listing:
            mid = steps[len(steps) // 2]
            with open(listing, "w") as f:
                f.write("start_us dur_us gap_us added_us name (one decode step, the middle one)\n")
                f.write("\n".join(step_listing(mid)) + "\n")
            print(f"one step's kernels ({len(mid)}): {listing}")
    if table:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layout", choices=["rk", "kn"], default="rk")
    ap.add_argument("--bf16", action="store_true", help="profile the BF16 model instead (no quantization)")
    ap.add_argument("--graph", action="store_true",
                    help="generate with leanq.hf_graph.enable: each decode step replayed from one CUDA graph of the "
                         "compiled forward instead of torch.compile's graph trees")
    ap.add_argument("--pdl", action="store_true",
                    help="with --graph: hf_graph.enable(model, pdl=True) (inductor's programmatic dependent launch)")
    ap.add_argument("--sync", action="store_true",
                    help="with --graph: hf_graph.enable(model, defer_stop=False) (generate's stop check read every "
                         "step, as transformers does on CUDA)")
    ap.add_argument("--fold", action=argparse.BooleanOptionalAction, default=True,
                    help="fold the decoder layers' RMSNorms, SiLU x up and residual adds into the 4-bit GEMVs "
                         "(cuda_int.release_stored_rk's fold, the default)")
    ap.add_argument("--rope", action=argparse.BooleanOptionalAction, default=True,
                    help="with --fold: the attention's rotary embedding and cache write in one kernel too (the "
                         "default)")
    ap.add_argument("--attn", default="default",
                    help="the folded attention's variant (bench_decode.set_attn_variant: default, plain, or pdl, "
                         "trigger, once, chunkN joined by '+')")
    ap.add_argument("--table", action=argparse.BooleanOptionalAction, default=True,
                    help="print the host-side table")
    ap.add_argument("--listing", default=None, metavar="FILE",
                    help="write one decode step's kernels in order (offset, duration, gap, added time) to FILE")
    ap.add_argument("--gd", type=int, default=None,
                    help="the batch-1 GEMV's programmatic dependent launch mode for every width (cuda_int's launch "
                         "option gd: 0 off, 1, 2); default: as cuda_int.TUNED")
    a = ap.parse_args()
    if a.gd is not None:
        from leanq.kernels import cuda_int as ci

        for cfg in ci.TUNED.values():
            cfg["gd"] = a.gd
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import bench_decode as bd

    from leanq.config import MethodConfig, QuantSpec
    from leanq.kernels import triton_kn as kn
    from leanq.pipeline import quantize_blocks

    model = bd.build(a.layers, "cuda")
    if not a.bf16:
        quantize_blocks(model, QuantSpec(bits=4, group_size=128, sym=False), MethodConfig(name="rtn", mse_clip=False),
                        None, device="cuda", progress=False)
        if a.layout == "rk":
            from leanq.kernels import cuda_int as ci

            bd.set_attn_variant(a.attn)
            ci.release_stored_rk(model, fold=a.fold, rope=a.rope)
        else:
            kn.release_stored_kn(model)
    torch.cuda.empty_cache()
    if a.graph:
        from leanq import hf_graph

        hf_graph.enable(model, pdl=a.pdl, defer_stop=not a.sync)
    ids = torch.randint(100, 30000, (1, 16), device="cuda")
    new = a.new_tokens
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static", pad_token_id=0,
              eos_token_id=None)
    profile_once(model, ids, kw, new, a.table, "bf16" if a.bf16 else "int4", a.listing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
