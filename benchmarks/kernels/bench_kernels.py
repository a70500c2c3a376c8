"""Kernel benchmark: leanq's GPU int kernels (CUDA and Triton) vs BF16 F.linear and PyTorch's int4/int8 weight-only ops.

Shapes are F.linear weights, out x in (N x K): an [M, K] activation times W^T.
Every timed kernel is first checked against the float32 reference (dequantize,
then matmul) on fresh random inputs.  Times are medians of CUDA-event intervals
around single launches, each after a 256 MB L2 flush, so no weight is served
from cache (4-bit weights of these shapes would otherwise fit the 50 MB L2).
Bandwidth is measured in the same run with a large device-to-device copy.

    PYTHONPATH=src python3 benchmarks/kernels/bench_kernels.py --out $OUT
    ... --sweep           # also try tile configs (prints the best per path)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from leanq.config import QuantSpec
from leanq.formats.intq import IntWeight
from leanq.formats.packing import pack
from leanq.kernels import select
from leanq.kernels import triton_fast as tf
from leanq.kernels import triton_half2 as th
from leanq.kernels import triton_int as ti
from leanq.kernels import triton_kn as kn
from leanq.modules import QuantLinear

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]
BATCHES = [1, 4, 16, 64, 256]
BITS = [4, 3, 2, 8]
FLUSH = None
SPIN_CYCLES = 200_000  # ~100 us at 2 GHz: longer than any wrapper's host-side launch path


def flush_l2() -> None:
    global FLUSH
    if FLUSH is None:
        FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    FLUSH.zero_()


def bench(fn, reps: int = 60, warmup: int = 5) -> float:
    """Median milliseconds of one call, L2 flushed before each.

    After the flush the GPU spins ~100 us (torch.cuda._sleep) before the start event, so the host has
    enqueued the start event and the launch by the time the GPU gets there: the interval is the kernel's
    own time, not the Python launch overhead (runs before 2026-11-27 14:00 lacked this; a wrapper whose
    host side took longer than the 256 MB flush then read up to several times its kernel time)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _timed(fn, reps, 1)


def _timed(run, reps: int, per: int) -> float:
    """Median over ``reps`` of the CUDA-event time of ``run()`` / ``per`` (L2 flushed, ~100 us spin before each)."""
    times = []
    for _ in range(reps):
        flush_l2()
        torch.cuda._sleep(SPIN_CYCLES)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per)
    return statistics.median(times)


def bench_graph(make_fn, nbytes: int, reps: int = 20, launches: int = 24) -> float:
    """Median milliseconds per call with calls back to back, as a decoder replays them under CUDA graphs.

    ``make_fn(c)`` returns the call on weight copy ``c``; enough copies rotate that their bytes exceed
    twice the 50 MB L2, so no call finds its weights in cache.  ``launches`` calls are captured in one
    CUDA graph; each timed replay (CUDA events) is divided by ``launches``.  This removes the ~3.6 us
    per-launch floor of :func:`bench` (event + launch latency) that a graph replay does not pay."""
    copies = max(2, min(16, -(-(100 << 20) // max(nbytes, 1))))
    fns = [make_fn(c) for c in range(copies)]
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm-up on the capture stream
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            fns[i % copies]()
    g.replay()
    torch.cuda.synchronize()
    ms = _timed(g.replay, reps, launches)
    del g, fns
    return ms


def bf16_copies(n: int, k: int, x: torch.Tensor):
    """make_fn for bench_graph: F.linear(x, W) on BF16 weight copy c (random, made at first use)."""
    ws = {}

    def make(c):
        if c not in ws:
            ws[c] = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        w = ws[c]
        return lambda: F.linear(x, w)

    make.copies = ws
    return make


def graph_table(args, bw: float) -> list[dict]:
    """Batch 1 in both harnesses, same run: BF16 F.linear, torch int4pack (g128), leanq kn at 4, 2, 8 bits."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rows = []
    for n, k in shapes:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        bf16_fn = bf16_copies(n, k, x)
        ws = bf16_fn.copies
        i4s = {}

        def i4_fn(c):
            if c not in i4s:
                i4s[c] = int4pack_baseline((torch.randn(n, k, device="cuda") * 0.02).bfloat16(), n, k)[0]
            f = i4s[c]
            return lambda: f(x)

        res = {}
        res["bf16"] = (bench(bf16_fn(0), args.reps), bench_graph(bf16_fn, 2 * n * k))
        ws.clear()
        res["int4pack"] = (bench(i4_fn(0), args.reps), bench_graph(i4_fn, n * k // 2))
        i4s.clear()
        for bits in (4, 2, 8):
            pks = {}

            def kn_fn(c, bits=bits):
                if c not in pks:
                    m = random_layer(n, k, bits, seed=c)
                    pks[c] = kn.packed_kn(m)
                    del m
                p = pks[c]
                return lambda: kn.run_gemv_kn(x, p, None)

            f0 = kn_fn(0)
            nbytes = kn_bytes(pks[0])
            res[f"kn{bits}"] = (bench(f0, args.reps), bench_graph(kn_fn, nbytes))
            pks.clear()
            from leanq.kernels import cuda_int as ci

            if ci.available():
                rks = {}

                def rk_fn(c, bits=bits):
                    if c not in rks:
                        rks[c] = ci.packed_rk(random_layer(n, k, bits, seed=c))
                    p = rks[c]
                    return lambda: ci.run_int_cuda(x, p, None)

                f0 = rk_fn(0)
                res[f"cuda-int{bits}"] = (bench(f0, args.reps), bench_graph(rk_fn, rk_bytes(rks[0])))
                rks.clear()
            torch.cuda.empty_cache()
        for name, (single, graph) in res.items():
            r = dict(shape=f"{n}x{k}", n=n, k=k, M=1, impl=name, single_ms=single, graph_ms=graph,
                     x_bf16_single=res["bf16"][0] / single, x_bf16_graph=res["bf16"][1] / graph)
            rows.append(r)
            print(f"{n:>5}x{k:<5} {name:<9} single {single * 1e3:6.1f} us (x{r['x_bf16_single']:.2f} bf16)   "
                  f"graph {graph * 1e3:6.1f} us (x{r['x_bf16_graph']:.2f} bf16)", flush=True)
    return rows


def warm_clocks(seconds: float = 2.0) -> None:
    """Busy the GPU before timing: the first timed BF16 row of one run read 60 us where every other run read 22 us."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        torch.cuda.synchronize()
    del a


def run_meta() -> dict:
    """The card, driver and versions of this run, its command and date (UTC)."""
    import subprocess

    import triton

    props = torch.cuda.get_device_properties(0)
    meta = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        meta["driver"] = "?"
    return meta


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, bytes read + written."""
    src = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), reps=20, warmup=3)
    del src, dst
    return 2 * (2 << 30) / (ms * 1e-3) / 1e9


def random_layer(n: int, k: int, bits: int, group: int = 128, sym: bool = False, seed: int = 0) -> QuantLinear:
    """A QuantLinear of random codes, scales in [0.002, 0.02) and zeros (every code value reachable)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    spec = QuantSpec(bits=bits, group_size=group, sym=sym)
    ng = -(-k // group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, device="cuda", dtype=torch.uint8)
    scales = (torch.rand(n, ng, generator=g, device="cuda") * 0.018 + 0.002).half()
    zeros = torch.zeros(n, 0, dtype=torch.uint8, device="cuda") if sym else \
        pack(torch.randint(0, 1 << bits, (n, ng), generator=g, device="cuda", dtype=torch.uint8), bits)
    return QuantLinear.from_int_weight(IntWeight(pack(codes, bits), scales, zeros, spec, k), None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref).norm() / ref.norm()).item()


def packed_bytes(pk: dict) -> int:
    t = pk["planes"] + [pk["scales"]] + ([] if pk["sym"] else [pk["zeros"]])
    return sum(x.numel() * x.element_size() for x in t)


def int4pack_baseline(w_ref: torch.Tensor, n: int, k: int, group: int = 128):
    """torch._weight_int4pack_mm on its own quantization of w_ref (g128); returns (fn(x), weight bytes)."""
    wf = w_ref.float().reshape(n, k // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
    q = ((wf - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()  # [k/g, n, 2]
    wq = ((q.reshape(n, k // group, group).float() - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    packed = None
    for order in (0, 1):  # the nibble order of the uint8 input differs between versions: check which is right
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]) if order == 0 else ((q[:, 1::2] << 4) | q[:, ::2])
        cand = torch._convert_weight_to_int4pack(u8.to(torch.uint8).contiguous(), 8)
        x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
        if rel_err(torch._weight_int4pack_mm(x, cand, group, sz), x.float() @ wq.t()) < 1e-2:
            packed = cand
            break
    if packed is None:
        raise RuntimeError("could not reproduce torch._weight_int4pack_mm's packing")
    nbytes = packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    return (lambda x: torch._weight_int4pack_mm(x, packed, group, sz)), nbytes


def int8pack_baseline(w_ref: torch.Tensor):
    scale = (w_ref.float().abs().amax(1) / 127).clamp(min=1e-8)
    q = (w_ref.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    s = scale.bfloat16()
    x = torch.randn(4, w_ref.shape[1], device="cuda", dtype=torch.bfloat16)
    err = rel_err(torch._weight_int8pack_mm(x, q, s), x.float() @ (q.float() * s.float()[:, None]).t())
    assert err < 1e-2, f"int8pack check {err}"
    return (lambda x: torch._weight_int8pack_mm(x, q, s)), q.numel() + s.numel() * 2


def rk_bytes(pk: dict) -> int:
    return sum(t.numel() * t.element_size() for t in (pk["words"], pk["sz"]))


def kn_bytes(pk: dict) -> int:
    t = [pk["words"], pk["scales"]] + ([] if pk["sym"] else [pk["zeros"]])
    return sum(x.numel() * x.element_size() for x in t)


def leanq_fns(pk: dict, M: int, v3: bool = False, pkn: dict | None = None, prk: dict | None = None):
    """Candidate leanq paths for batch M: name -> fn(x).  v4 kernels (triton_fast) always; the v3 ones
    (triton_int: gemv, dot) only when asked (--v3), to keep the number of compilations down; the kn GEMV
    (triton_kn, its own layout ``pkn``) at batch 1; the CUDA GEMV (cuda_int, its layout ``prk``) at batch 1 and
    its dequantize + cuBLAS above."""
    fns = {}
    if prk is not None:
        from leanq.kernels import cuda_int as ci

        if M == 1:
            fns["cuda-int"] = lambda x: ci.run_int_cuda(x, prk, None)
        else:
            fns["rk-dequant+cublas"] = lambda x: F.linear(x, ci.dequantize_rk(prk, x.dtype))
    if M == 1 and pkn is not None:
        fns["kn"] = lambda x: kn.run_gemv_kn(x, pkn, None)
    if M > 1 and pkn is not None:
        fns["kn-dot"] = lambda x: kn.run_dot_kn(x, pkn, None)
        fns["kn-dequant+cublas"] = lambda x: F.linear(x, kn.dequantize_kn(pkn, x.dtype))
    if M == 1 and th.supported(pk):
        fns["h2"] = lambda x: th.run_gemv_h2(x, pk, None, th.TUNED_H2 or None)
    if M <= 16:
        fns["gemv4"] = lambda x: tf.run_gemv4(x, pk, None)
    if M >= 4:
        fns["wdot"] = lambda x: tf.run_wdot(x, pk, None)
    if M >= 64:
        fns["dequant+cublas"] = lambda x: F.linear(x, ti.dequantize(pk, x.dtype))
    if v3:
        if M <= 4:
            fns["gemv"] = lambda x: ti.run_gemv(x, pk, None)
        if M > 1:
            fns["dot"] = lambda x: ti.run_dot(x, pk, None)
    return fns


def _wpt(cfg: dict, cpw: int = 8) -> float:
    """Weight words per thread per tile (4-bit): keeps the sweep to sane register budgets."""
    return cfg["BN"] * cfg["BK"] / cpw / (32 * cfg["num_warps"])


def sweep(args, bw: float) -> list[dict]:
    """Try tile configs on three shapes (4-bit g128).  The config with the least total time over
    the shapes wins per (path, batch) and is installed in ti.TUNED for the main run."""
    rows = []
    # gemv4: BN rows per program; a row's word tile is BK/8 words, so with BK=1024 one warp covers a row
    # and each thread holds BN/num_warps rows (the activations it converts serve all of them)
    g1 = [(4, 1024, 1, 1), (8, 1024, 2, 1), (16, 1024, 4, 1), (32, 1024, 8, 1),
          (16, 2048, 4, 1), (16, 512, 2, 1), (16, 1024, 4, 3), (8, 2048, 2, 1)]
    h2 = [dict(BN=bn, BK=bk, num_warps=w, num_stages=1, CENTER=c) for bn, bk, w, c in
          [(16, 1024, 4, True), (16, 1024, 4, False), (8, 1024, 2, True), (32, 1024, 8, True), (16, 512, 2, True),
           (32, 1024, 4, True), (16, 2048, 4, True), (64, 1024, 8, True), (4, 1024, 1, True)]]
    gemv1 = [dict(BM=1, BN=bn, BK=bk, num_warps=w, num_stages=st) for bn, bk, w, st in g1]
    gemv4 = [dict(BM=4, BN=bn, BK=bk, num_warps=w, num_stages=st) for bn, bk, w, st in
             [(8, 1024, 2, 1), (16, 1024, 4, 1), (32, 1024, 8, 1), (8, 512, 2, 1)]]
    w16 = [dict(BMX=16, BN=bn, BK=bk, SPLIT=sp, num_warps=w, num_stages=st) for bn, bk, sp, w, st in
           [(64, 128, 0, 4, 3), (32, 128, 0, 4, 3), (128, 128, 0, 4, 3), (64, 256, 0, 4, 3), (64, 64, 0, 4, 4),
            (64, 128, 1, 4, 3), (128, 64, 0, 8, 4), (32, 256, 0, 2, 3), (32, 128, 1, 4, 3), (16, 256, 1, 2, 3)]]
    w64 = [dict(BMX=64, BN=bn, BK=bk, SPLIT=sp, num_warps=w, num_stages=3) for bn, bk, sp, w in
           [(64, 128, 1, 4), (128, 64, 1, 8), (64, 128, 0, 4)]]
    w256 = [dict(BMX=bmx, BN=bn, BK=bk, SPLIT=1, num_warps=w, num_stages=st) for bmx, bn, bk, w, st in
            [(128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 128, 4, 3), (256, 64, 64, 8, 4),
             (128, 128, 128, 8, 3)]]
    plan = [(1, "h2", h2), (1, "gemv4", gemv1), (4, "gemv4", gemv4), (16, "wdot", w16), (64, "wdot", w64),
            (256, "wdot", w256)]
    totals: dict = {}
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        m = random_layer(n, k, 4, seed=1)
        pk = ti.packed_for(m)
        w_ref = m.int_weight().dequantize(torch.float32)
        for M, kind, cfgs in plan:
            x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_ref.t()
            run = {"gemv4": tf.run_gemv4, "wdot": tf.run_wdot, "h2": th.run_gemv_h2}[kind]
            best = None
            for i, cfg in enumerate(cfgs):
                key = (kind, M, i)
                try:
                    err = rel_err(run(x, pk, None, cfg), ref)
                    if err > 1e-2:
                        print(f"  sweep {kind} {cfg}: error {err:.2e}", flush=True)
                        totals[key] = float("inf")
                        continue
                    ms = bench(lambda: run(x, pk, None, cfg), reps=20, warmup=2)
                except Exception as e:  # out of resources etc.: skip that config
                    print(f"  sweep {kind} {cfg}: {type(e).__name__} {str(e)[:80]}", flush=True)
                    totals[key] = float("inf")
                    continue
                totals[key] = totals.get(key, 0.0) + ms
                rows.append(dict(n=n, k=k, M=M, kind=kind, cfg=cfg, ms=ms))
                if best is None or ms < best[1]:
                    best = (cfg, ms)
            if best:
                gbs = packed_bytes(pk) / (best[1] * 1e-3) / 1e9
                print(f"SWEEP {n}x{k} M={M} {kind}: best {best[0]} {best[1] * 1e3:.1f} us "
                      f"({gbs:.0f} GB/s, {100 * gbs / bw:.0f}% of copy)", flush=True)
        if args.v3:  # the v3 kernels in the tree (never timed on a GPU before), default configs
            for M, name, fn in ((1, "gemv", ti.run_gemv), (16, "dot", ti.run_dot), (256, "dot", ti.run_dot)):
                x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
                try:
                    err = rel_err(fn(x, pk, None), x.float() @ w_ref.t())
                    ms = bench(lambda: fn(x, pk, None), reps=20, warmup=2) if err <= 1e-2 else float("nan")
                except Exception as e:
                    print(f"  v3 {name}: {type(e).__name__} {str(e)[:80]}", flush=True)
                    continue
                rows.append(dict(n=n, k=k, M=M, kind="v3-" + name, cfg={}, ms=ms, err=err))
                gbs = packed_bytes(pk) / (ms * 1e-3) / 1e9
                print(f"V3 {n}x{k} M={M} {name}: {ms * 1e3:.1f} us ({gbs:.0f} GB/s, {100 * gbs / bw:.0f}% of copy) "
                      f"err {err:.1e}", flush=True)
    for M, kind, cfgs in plan:
        scored = [(totals.get((kind, M, i), float("inf")), i) for i in range(len(cfgs))]
        t, i = min(scored)
        if t < float("inf"):
            if kind == "h2":
                th.TUNED_H2.clear()
                th.TUNED_H2.update(cfgs[i])
            else:
                tf.TUNED[(kind, M)] = cfgs[i]
            print(f"TUNED {kind} M={M}: {cfgs[i]} (sum over shapes {t * 1e3:.1f} us)", flush=True)
    return rows


def sweep1(args, bw: float) -> list[dict]:
    """Batch 1 only, on every shape: h2 (4-bit) and gemv4 (8-bit) tile/split configs.  Installs the config
    with the least total time over the shapes (TUNED_H2, TUNED gemv4@1)."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    h2 = [dict(BN=bn, BK=bk, num_warps=w, num_stages=1, CENTER=True, SPLIT=sp) for bn, bk, w, sp in
          [(16, 2048, 4, 1), (16, 1024, 4, 1), (16, 1024, 4, 0), (8, 1024, 4, 0), (8, 1024, 4, 1),
           (16, 512, 4, 0), (8, 512, 2, 0), (16, 512, 2, 0)]]
    g8 = [dict(BM=1, BN=bn, BK=bk, num_warps=w, num_stages=1, SPLIT=sp) for bn, bk, w, sp in
          [(8, 2048, 2, 1), (8, 512, 2, 0), (8, 512, 2, 1), (16, 512, 4, 0), (16, 1024, 4, 0)]]
    plan = [(4, "h2", h2, th.run_gemv_h2), (8, "gemv4", g8, tf.run_gemv4)]
    rows, totals = [], {}
    for n, k in shapes:
        for bits, kind, cfgs, run in plan:
            m = random_layer(n, k, bits, seed=1)
            pk = ti.packed_for(m)
            w_ref = m.int_weight().dequantize(torch.float32)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_ref.t()
            best = None
            for i, cfg in enumerate(cfgs):
                key = (kind, i)
                try:
                    # twice, on fresh inputs: a split-K counter left non-zero would break the second call
                    x2 = torch.randn_like(x)
                    err = max(rel_err(run(x, pk, None, cfg), ref), rel_err(run(x2, pk, None, cfg), x2.float() @ w_ref.t()))
                    if err > 1e-2:
                        print(f"  sweep1 {kind} {cfg}: error {err:.2e}", flush=True)
                        totals[key] = float("inf")
                        continue
                    ms = bench(lambda: run(x, pk, None, cfg), reps=20, warmup=2)
                except Exception as e:
                    print(f"  sweep1 {kind} {cfg}: {type(e).__name__} {str(e)[:80]}", flush=True)
                    totals[key] = float("inf")
                    continue
                totals[key] = totals.get(key, 0.0) + ms
                rows.append(dict(n=n, k=k, M=1, bits=bits, kind=kind, cfg=cfg, ms=ms, err=err))
                gbs = packed_bytes(pk) / (ms * 1e-3) / 1e9
                print(f"  {n}x{k} int{bits} {kind} {cfg}: {ms * 1e3:.1f} us {100 * gbs / bw:.0f}% err {err:.1e}",
                      flush=True)
                if best is None or ms < best[1]:
                    best = (cfg, ms)
            del m, pk, w_ref
    for bits, kind, cfgs, run in plan:
        t, i = min((totals.get((kind, i), float("inf")), i) for i in range(len(cfgs)))
        if t < float("inf"):
            if kind == "h2":
                th.TUNED_H2.clear()
                th.TUNED_H2.update(cfgs[i])
            else:
                tf.TUNED[("gemv4", 1)] = cfgs[i]
            print(f"TUNED1 {kind}: {cfgs[i]} (sum over shapes {t * 1e3:.1f} us)", flush=True)
    return rows


def sweep_kn(args, bw: float) -> list[dict]:
    """Batch 1, triton_kn GEMV tile configs (BN columns x BK inputs per program, warps) for 4, 2 and 8 bits
    on every shape; installs the config with the least total 4-bit time (TUNED_KN)."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    # (BN, BK, warps, paired-fp16 arithmetic); split-K tail: the finishing kernel unless said
    tiles = [(256, 128, 4), (512, 128, 4), (128, 128, 2), (1024, 128, 4), (512, 128, 8), (256, 64, 2)]
    grid4 = [dict(BN=bn, BK=bk, num_warps=w) for bn, bk, w in tiles]
    grid4 += [dict(BN=256, BK=128, num_warps=4, tail="counter"), dict(BN=512, BK=128, num_warps=4, h2=True),
              dict(BN=256, BK=128, num_warps=4, h2=True)]
    other = grid4[:4] + [dict(BN=bn, BK=bk, num_warps=w, h2=True) for bn, bk, w in tiles[:4]]
    plan = [(4, grid4), (2, other), (8, other)]
    rows, totals = [], {}
    one = torch.zeros(1, device="cuda")
    floor = bench(lambda: one.add_(1.0), reps=50)
    print(f"harness floor (one 1-element add kernel): {floor * 1e3:.1f} us", flush=True)
    rows.append(dict(kind="floor", ms=floor))
    for n, k in shapes:
        for bits, cfgs in plan:
            m = random_layer(n, k, bits, seed=1)
            pkn = kn.packed_kn(m)
            nbytes = kn_bytes(pkn)
            w_ref = m.int_weight().dequantize(torch.float32)
            m._cache.clear()
            del m
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            x2 = torch.randn_like(x)
            ref, ref2 = x.float() @ w_ref.t(), x2.float() @ w_ref.t()
            for i, cfg in enumerate(cfgs):
                key = (bits, i)
                try:
                    if cfg.get("diag"):  # timing only: the scratch is left dirty, so clean it after
                        err = float("nan")
                    else:
                        err = max(rel_err(kn.run_gemv_kn(x, pkn, None, cfg), ref),
                                  rel_err(kn.run_gemv_kn(x2, pkn, None, cfg), ref2))
                    if err > 1e-2:
                        print(f"  kn int{bits} {cfg}: error {err:.2e}", flush=True)
                        totals[key] = float("inf")
                        continue
                    ms = bench(lambda: kn.run_gemv_kn(x, pkn, None, cfg), reps=20, warmup=2)
                    if cfg.get("diag"):
                        for t in kn._scratch(x.device, 1):
                            t.zero_()
                except Exception as e:
                    print(f"  kn int{bits} {cfg}: {type(e).__name__} {str(e)[:80]}", flush=True)
                    totals[key] = float("inf")
                    continue
                totals[key] = totals.get(key, 0.0) + ms
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(n=n, k=k, M=1, bits=bits, kind="kn", cfg=cfg, ms=ms, err=err, pct_copy=100 * gbs / bw))
                print(f"  {n}x{k} int{bits} kn {cfg}: {ms * 1e3:.1f} us {100 * gbs / bw:.0f}% err {err:.1e}", flush=True)
            del pkn, w_ref
    for bits, cfgs in plan:
        t, i = min((totals.get((bits, i), float("inf")), i) for i in range(len(cfgs)) if not cfgs[i].get("diag"))
        print(f"BEST kn int{bits}: {cfgs[i]} (sum over shapes {t * 1e3:.1f} us)", flush=True)
        if t < float("inf"):
            kn.TUNED_KN[bits] = dict(cfgs[i])
    return rows


DOT_TILES = {  # batch bucket -> candidate tiles of triton_kn's tensor-core path (see kn.dot_cfg)
    16: [dict(BM=16, BN=bn, target=t, num_warps=w, num_stages=3) for bn, t, w in
         [(64, 264, 4), (128, 264, 4), (256, 264, 4), (128, 528, 4), (256, 528, 8), (64, 528, 4)]]
        + [dict(BM=16, BN=256, target=264, num_warps=4, num_stages=3, magic=False)]  # codes through I2F
        + [dict(BM=16, BN=bn, target=t, num_warps=4, num_stages=3, trans=True)  # codes as wgmma's operand A
           for bn, t in [(64, 264), (128, 264), (256, 264), (128, 528)]],
    64: [dict(BM=bm, BN=bn, target=t, num_warps=4, num_stages=3) for bm, bn, t in
         [(64, 64, 264), (64, 128, 264), (64, 64, 132), (32, 128, 264)]]
        + [dict(BM=64, BN=bn, target=264, num_warps=4, num_stages=3, trans=True) for bn in (64, 128)],
    256: [dict(BM=bm, BN=bn, target=t, num_warps=w, num_stages=st) for bm, bn, t, w, st in
          [(128, 128, 132, 8, 3), (128, 64, 132, 4, 3), (64, 128, 132, 4, 3), (128, 128, 264, 8, 3),
           (128, 256, 132, 8, 3), (64, 64, 264, 4, 4)]],
}


def sweep_dot(args, bw: float) -> list[dict]:
    """Batches 16, 64, 256 (4-bit g128): triton_kn's tensor-core tiles on every shape beside BF16 F.linear;
    installs, per batch bucket, the tile with the least total time over the shapes (kn.TUNED_DOT)."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rows, totals = [], {}
    for n, k in shapes:
        m = random_layer(n, k, 4, seed=4)
        pkn = kn.packed_kn(m)
        w_ref = m.int_weight().dequantize(torch.float32)
        w_bf16 = w_ref.bfloat16()
        m._cache.clear()
        del m
        for M, tiles in DOT_TILES.items():
            x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_ref.t()
            base = bench(lambda: F.linear(x, w_bf16), reps=30, warmup=3)
            for i, tile in enumerate(tiles):
                cfg = kn.dot_cfg(M, n, k, pkn["span"], tile)
                try:
                    err = rel_err(kn.run_dot_kn(x, pkn, None, cfg), ref)
                    ms = bench(lambda: kn.run_dot_kn(x, pkn, None, cfg), reps=30, warmup=3) if err <= 1e-2 else float("inf")
                except Exception as e:
                    print(f"  dot M={M} {tile}: {type(e).__name__} {str(e)[:100]}", flush=True)
                    err, ms = float("nan"), float("inf")
                totals[(M, i)] = totals.get((M, i), 0.0) + ms
                rows.append(dict(n=n, k=k, M=M, kind="kn-dot", tile=tile, cfg=cfg, ms=ms, err=err, bf16_ms=base,
                                 vs_bf16=base / ms))
                print(f"  {n}x{k} M={M} kn-dot {tile} SPS={cfg['SPS']}: {ms * 1e3:.1f} us  x{base / ms:.2f} bf16 "
                      f"err {err:.1e}", flush=True)
        del pkn, w_ref, w_bf16
        torch.cuda.empty_cache()
    for M, tiles in DOT_TILES.items():
        t, i = min((totals.get((M, i), float("inf")), i) for i in range(len(tiles)))
        print(f"BEST kn-dot M={M}: {tiles[i]} (sum over shapes {t * 1e3:.1f} us)", flush=True)
        if t < float("inf"):
            kn.TUNED_DOT[M] = dict(tiles[i])
    return rows


def diag_kn(args, bw: float) -> list[dict]:
    """Where the kn GEMV's time goes (4-bit, batch 1): the full kernel beside variants that drop the counter
    tail (diag 1), all atomics (3), and the arithmetic too (4: load only), for a few tiles."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    tiles = [(256, 128, 4), (512, 128, 4), (128, 128, 2), (256, 64, 2), (1024, 128, 4), (512, 128, 8)]
    rows = []
    one = torch.zeros(1, device="cuda")
    floor = bench(lambda: one.add_(1.0), reps=50)
    print(f"harness floor (one 1-element add kernel): {floor * 1e3:.1f} us", flush=True)
    for n, k in shapes:
        m = random_layer(n, k, 4, seed=1)
        pkn = kn.packed_kn(m)
        nbytes = kn_bytes(pkn)
        del m
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        line = []
        for bn, bk, w in tiles:
            for d in (0, 1, 3, 4):
                cfg = dict(BN=bn, BK=bk, num_warps=w, diag=d)
                try:
                    ms = bench(lambda: kn.run_gemv_kn(x, pkn, None, cfg), reps=20, warmup=2)
                except Exception as e:
                    print(f"  {cfg}: {type(e).__name__} {str(e)[:80]}", flush=True)
                    continue
                for t in kn._scratch(x.device, 1):
                    t.zero_()
                rows.append(dict(n=n, k=k, cfg=cfg, ms=ms, pct_copy=100 * nbytes / (ms * 1e-3) / 1e9 / bw))
                line.append(f"{bn}/{bk}/{w} d{d} {ms * 1e3:.1f}")
        print(f"{n}x{k}: " + " | ".join(line), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep1", action="store_true", help="batch-1 sweep (h2 4-bit, gemv4 8-bit, split-K) on every shape")
    ap.add_argument("--sweep-kn", action="store_true", help="batch-1 sweep of the triton_kn GEMV tiles (4, 2, 8 bits)")
    ap.add_argument("--graph-table", action="store_true", help="batch 1, single-launch and CUDA-graph harnesses")
    ap.add_argument("--sweep-dot", action="store_true", help="batches 16/64/256: triton_kn tensor-core tiles")
    ap.add_argument("--diag-kn", action="store_true", help="where the kn GEMV's time goes (see diag_kn)")
    ap.add_argument("--no-main", action="store_true", help="sweep only")
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--other-batches", default="", help="batches for bit widths other than 4 (default: --batches)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--v3", action="store_true", help="also time the v3 kernels (triton_int)")
    ap.add_argument("--shapes", default="", help="e.g. 4096x4096,14336x4096 (default: all five)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    meta = run_meta()
    warm_clocks()
    bw = copy_bandwidth()
    meta["copy_GBps"] = bw
    print(json.dumps(meta), flush=True)
    result = dict(meta=meta, rows=[], sweep=[])
    if args.sweep:
        result["sweep"] = sweep(args, bw)
        result["tuned"] = {f"{k}@{b}": c for (k, b), c in tf.TUNED.items()}
        result["tuned"]["h2@1"] = dict(th.TUNED_H2)
        _write(args.out, result)
    if args.sweep1:
        result["sweep1"] = sweep1(args, bw)
        result["tuned"] = dict(result.get("tuned", {}), **{"h2@1": dict(th.TUNED_H2)},
                               **{f"{k}@{b}": c for (k, b), c in tf.TUNED.items()})
        _write(args.out, result)
    if args.diag_kn:
        result["diag_kn"] = diag_kn(args, bw)
        _write(args.out, result)
    if args.sweep_kn:
        result["sweep_kn"] = sweep_kn(args, bw)
        result["tuned"] = dict(result.get("tuned", {}), **{f"kn{b}@1": c for b, c in kn.TUNED_KN.items()})
        _write(args.out, result)
    if args.sweep_dot:
        result["sweep_dot"] = sweep_dot(args, bw)
        result["tuned"] = dict(result.get("tuned", {}), **{f"kn-dot@{b}": c for b, c in kn.TUNED_DOT.items()})
        _write(args.out, result)
    if args.graph_table:
        result["graph_table"] = graph_table(args, bw)
        _write(args.out, result)
    if args.no_main:
        _write(args.out, result)
        return 0
    bits_list = [int(b) for b in args.bits.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    for n, k in shapes:
        xs = {M: torch.randn(M, k, device="cuda", dtype=torch.bfloat16) for M in batches}
        w_bf16 = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        base = {}
        try:
            i4, i4_bytes = int4pack_baseline(w_bf16, n, k)
        except Exception as e:  # keep the run going; the row says what failed
            print(f"int4pack baseline failed: {type(e).__name__}: {e}", flush=True)
            i4, i4_bytes = (lambda x: F.linear(x, w_bf16)), float("nan")
        try:
            i8, i8_bytes = int8pack_baseline(w_bf16)
        except Exception as e:
            print(f"int8pack baseline failed: {type(e).__name__}: {e}", flush=True)
            i8, i8_bytes = (lambda x: F.linear(x, w_bf16)), float("nan")
        for M in batches:
            x = xs[M]
            base[M] = dict(bf16=bench(lambda: F.linear(x, w_bf16), args.reps),
                           int4pack=bench(lambda: i4(x), args.reps), int8pack=bench(lambda: i8(x), args.reps))
            r = dict(shape=f"{n}x{k}", n=n, k=k, M=M, impl="baselines", **{f"{a}_ms": b for a, b in base[M].items()},
                     bf16_GBps=2 * n * k / (base[M]["bf16"] * 1e-3) / 1e9,
                     int4pack_GBps=i4_bytes / (base[M]["int4pack"] * 1e-3) / 1e9,
                     int8pack_GBps=i8_bytes / (base[M]["int8pack"] * 1e-3) / 1e9)
            result["rows"].append(r)
        del w_bf16
        for bits in bits_list:
            m = random_layer(n, k, bits, seed=bits)
            pk = ti.packed_for(m)
            pkn = kn.packed_kn(m) if bits in kn.BITS else None
            prk = None
            try:
                from leanq.kernels import cuda_int as ci

                prk = ci.packed_rk(m) if ci.available() and ci._ok(m) else None
            except Exception as e:  # no NVRTC here: the table goes on without the CUDA kernel
                print(f"cuda-int unavailable: {type(e).__name__}: {e}", flush=True)
            w_ref = m.int_weight().dequantize(torch.float32)
            nbytes = packed_bytes(pk)
            for M in batches if bits == 4 or not args.other_batches else \
                    [int(b) for b in args.other_batches.split(",")]:
                x = xs[M]
                ref = x.float() @ w_ref.t()
                # the path the dispatch table picks for this batch, and the alternatives
                chosen = select(m, x).name
                out = m(x)
                err_chosen = rel_err(out, ref)
                for name, fn in leanq_fns(pk, M, args.v3, pkn, prk).items():
                    err = rel_err(fn(x), ref)
                    ok = err <= 1e-2
                    ms = bench(lambda: fn(x), args.reps) if ok else float("nan")
                    wbytes = kn_bytes(pkn) if name == "kn" else rk_bytes(prk) if name.startswith(("cuda-int", "rk-")) \
                        else nbytes
                    gbs = (wbytes + x.numel() * 2 + M * n * 2) / (ms * 1e-3) / 1e9
                    row = dict(shape=f"{n}x{k}", n=n, k=k, M=M, bits=bits, impl=name, ms=ms, rel_err=err,
                               GBps=gbs, pct_copy=100 * gbs / bw, vs_bf16=base[M]["bf16"] / ms,
                               vs_int4pack=base[M]["int4pack"] / ms, vs_int8pack=base[M]["int8pack"] / ms,
                               dispatch=chosen, dispatch_err=err_chosen)
                    result["rows"].append(row)
                    print(f"{n:>5}x{k:<5} M={M:<3} int{bits} {name:<14} {ms * 1e3:8.1f} us  {gbs:6.0f} GB/s "
                          f"{row['pct_copy']:5.1f}%  x{row['vs_bf16']:.2f} bf16  x{row['vs_int4pack']:.2f} i4pk  "
                          f"err {err:.1e}", flush=True)
            del m, pk, pkn, prk, w_ref
        torch.cuda.empty_cache()
        _write(args.out, result)  # after every shape: a run cut short still leaves its rows
    _write(args.out, result)
    print(table(result))
    return 0


def table(result: dict) -> str:
    """Markdown: per shape/batch/bits the fastest leanq path and the baselines."""
    meta = result["meta"]
    base = {(r["n"], r["k"], r["M"]): r for r in result["rows"] if r["impl"] == "baselines"}
    best: dict = {}
    for r in result["rows"]:
        if r["impl"] != "baselines" and r["ms"] == r["ms"]:
            key = (r["n"], r["k"], r["M"], r["bits"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    lines = [f"GPU {meta['gpu']}, driver {meta['driver']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"copy {meta['copy_GBps']:.0f} GB/s",
             "", "| W (out x in) | M | bf16 us | int4pack us | int8pack us | bits | leanq path | leanq us | GB/s | % copy | x bf16 | x int4pack | x int8pack |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (n, k, M, bits), r in sorted(best.items(), key=lambda t: (t[0][0], t[0][1], t[0][2], -t[0][3] if t[0][3] != 8 else 0)):
        b = base[(n, k, M)]
        lines.append(f"| {n}x{k} | {M} | {b['bf16_ms'] * 1e3:.1f} | {b['int4pack_ms'] * 1e3:.1f} | "
                     f"{b['int8pack_ms'] * 1e3:.1f} | {bits} | {r['impl']} | {r['ms'] * 1e3:.1f} | {r['GBps']:.0f} | "
                     f"{r['pct_copy']:.0f} | {r['vs_bf16']:.2f} | {r['vs_int4pack']:.2f} | {r['vs_int8pack']:.2f} |")
    return "\n".join(lines)


def _write(out: str, result: dict) -> None:
    with open(os.path.join(out, "bench_kernels.json"), "w") as f:
        json.dump(result, f, indent=1)
    if result["rows"]:
        with open(os.path.join(out, "bench_kernels.md"), "w") as f:
            f.write(table(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
