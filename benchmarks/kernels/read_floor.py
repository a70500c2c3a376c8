"""How fast can anything read a quantized layer's bytes?  A plain streaming read of the same byte count as each
shape's 4-bit (or 2-bit) g128 layer, timed in the kernel harness's graph chain beside the batch-1 GEMV and BF16
``F.linear``, against the same run's device copy (docs/PERFORMANCE.md, version 31).

Issue 5 asks the 4-bit GEMV for 75% of the copy bandwidth on the large shapes.  A copy moves 2 GiB; a layer is 10-30
MB, so a launch's fixed part (the first bytes' round trip, the last wave's tail) weighs more.  This probe measures
that ceiling for a kernel that only reads: each program sums one contiguous block of 32-bit words and writes one
value (so the loads cannot be dropped), optionally launched with programmatic dependent launch (``pdl``: the next
launch in the chain may start while this one drains, as the GEMV's ``gd`` 1 does).

    python benchmarks/kernels/read_floor.py [--bits 4] [--reps 20] [--persistent] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_sum(w_ptr, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr, WAIT: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if WAIT == 2:  # as a kernel that reads the one before it first: nothing starts before that one ends
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(w_ptr + offs, mask=offs < n, other=0)
        if WAIT == 1:  # as a GEMV that loads its weights, then waits for its input (the kernel before) to use them
            tl.extra.cuda.gdc_wait()
        tl.store(out_ptr + pid, tl.sum(v, axis=0))

    return read_sum


@functools.cache
def _persistent_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_sum_persistent(w_ptr, out_ptr, n, nblocks, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # the GEMV's shape of work: a fixed set of programs (a few a SM) walking the blocks by the grid's stride, the
        # first block loaded before the wait for the launch before, the rest pipelined by Triton (num_stages)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        # int32 offsets: a layer's words are far fewer than 2**31
        first = pid * BLOCK + tl.arange(0, BLOCK)
        cur = tl.load(w_ptr + first, mask=first < n, other=0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc = cur * 0  # a thread's own sums; one reduction over the program at the end, no barrier in the loop
        for b in range(pid + nprog, nblocks, nprog):  # the next block loaded before this one is added: two in flight
            offs = b * BLOCK + tl.arange(0, BLOCK)
            nxt = tl.load(w_ptr + offs, mask=offs < n, other=0)
            acc += cur
            cur = nxt
        tl.store(out_ptr + pid, tl.sum(acc + cur, axis=0))

    return read_sum_persistent


def read_sum_persistent(words: torch.Tensor, out: torch.Tensor, block: int, programs: int, pdl: bool = False,
                        warps: int = 16, stages: int = 2) -> torch.Tensor:
    """out[p] = the sum of the blocks p, p + programs, ... of ``words`` (int32, wrapping): a persistent grid of
    ``programs`` (out has that many) of ``warps`` warps, each with its next block in flight while it sums one."""
    n = words.numel()
    kw = dict(BLOCK=block, PDL=pdl, num_warps=warps, num_stages=stages)
    if pdl:
        kw["launch_pdl"] = True
    _persistent_kernel()[(programs,)](words, out, n, -(-n // block), **kw)
    return out


def read_sum(words: torch.Tensor, out: torch.Tensor, block: int, pdl: bool = False, wait: int = 0) -> torch.Tensor:
    """out[i] = sum of words[i * block:(i + 1) * block] (int32, wrapping): every word is read once.  ``pdl``: the
    next launch may start at once; ``wait`` (with pdl) 1: wait for the launch before after the loads, 2: before."""
    n = words.numel()
    grid = (-(-n // block),)
    kw = dict(BLOCK=block, PDL=pdl, WAIT=wait if pdl else 0, num_warps=8)
    if pdl:
        kw["launch_pdl"] = True
    _kernel()[grid](words, out, n, **kw)
    return out


def reference(words: torch.Tensor, block: int) -> torch.Tensor:
    n = words.numel()
    pad = torch.zeros(-(-n // block) * block, dtype=torch.int64, device=words.device)
    pad[:n] = words.long()
    return (pad.view(-1, block).sum(1) & 0xFFFFFFFF).to(torch.int64)


def layer_bytes(n: int, k: int, bits: int, group: int = 128) -> int:
    """The rk layout's bytes: codes plus one 32-bit group word (scale and zero) a group."""
    return n * k * bits // 8 + n * (-(-k // group)) * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--blocks", default="4096,16384", help="words a program reads (comma-separated)")
    ap.add_argument("--out", default=None, help="folder for read_floor.json")
    ap.add_argument("--persistent", action="store_true",
                    help="also the read in the GEMV's shape of work: 64 KB a SM a step (one 512-thread program a SM or "
                         "two of 256) walking the blocks by the grid's stride, a step ahead in flight (PDL, the first "
                         "block before the wait)")
    a = ap.parse_args()
    import bench_kernels as bk

    bw = bk.copy_bandwidth()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_GBps=bw, bits=a.bits,
                command="benchmarks/kernels/read_floor.py " + " ".join(sys.argv[1:]),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps(meta), flush=True)
    rows = []
    blocks = [int(b) for b in a.blocks.split(",")]
    for n, k in SHAPES:
        nb = layer_bytes(n, k, a.bits)
        words = nb // 4
        bufs: dict = {}

        def make(c, block, pdl, wait=0):
            if c not in bufs:
                bufs[c] = torch.randint(-2 ** 31, 2 ** 31 - 1, (words,), dtype=torch.int32, device="cuda")
            w = bufs[c]
            o = torch.empty(-(-words // block), dtype=torch.int32, device="cuda")
            return lambda: read_sum(w, o, block, pdl, wait)

        # correctness once per shape
        w0 = torch.randint(-2 ** 31, 2 ** 31 - 1, (words,), dtype=torch.int32, device="cuda")
        o0 = torch.empty(-(-words // blocks[0]), dtype=torch.int32, device="cuda")
        ok = torch.equal(read_sum(w0, o0, blocks[0]).long() & 0xFFFFFFFF, reference(w0, blocks[0]))
        res = dict(shape=f"{n}x{k}", bytes=nb, read_ok=ok)
        for block in blocks:
            for pdl in (False, True):
                ms = bk.bench_graph(lambda c: make(c, block, pdl), nb, reps=a.reps)
                res[f"read_b{block}{'_pdl' if pdl else ''}_us"] = ms * 1e3
        best = min(v for key, v in res.items() if key.startswith("read_") and key.endswith("_us"))
        res["read_best_us"] = best
        # the best block size again, waiting for the launch before: after the loads (a GEMV's best case), before
        bb = min(blocks, key=lambda b: res[f"read_b{b}_pdl_us"])
        for wait in (1, 2):
            res[f"read_b{bb}_wait{wait}_us"] = bk.bench_graph(lambda c: make(c, bb, True, wait), nb, reps=a.reps) * 1e3
        res["read_wait1_pct_copy"] = 100 * nb / (res[f"read_b{bb}_wait1_us"] * 1e-6) / 1e9 / bw
        # the GEMV's shape of work: 64 KB a SM a step (one 512-thread program a SM, or two of 256), the next step in
        # flight while one is added (the default GEMV: one 512-thread block a SM, 4 KB a warp a tile, a tile ahead)
        if a.persistent:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            for per_sm in (1, 2):
                def pmake(c, per_sm=per_sm):
                    if c not in bufs:
                        bufs[c] = torch.randint(-2 ** 31, 2 ** 31 - 1, (words,), dtype=torch.int32, device="cuda")
                    w = bufs[c]
                    o = torch.empty(per_sm * sms, dtype=torch.int32, device="cuda")
                    return lambda: read_sum_persistent(w, o, 16384 // per_sm, per_sm * sms, True, warps=16 // per_sm)

                us = bk.bench_graph(pmake, nb, reps=a.reps) * 1e3
                res[f"read_persistent{per_sm}_us"] = us
                res[f"read_persistent{per_sm}_pct_copy"] = 100 * nb / (us * 1e-6) / 1e9 / bw
        res["read_pct_copy"] = 100 * nb / (best * 1e-6) / 1e9 / bw
        x = torch.randn(1, k, device="cuda").bfloat16()
        res["bf16_us"] = bk.bench_graph(bk.bf16_copies(n, k, x), 2 * n * k, reps=a.reps) * 1e3
        try:
            res.update(gemv(n, k, a.bits, x, bk, a.reps, bw))
        except Exception as e:  # the GEMV needs leanq's CUDA kernels; the read floor stands without it
            res["gemv_error"] = str(e)[:200]
        rows.append(res)
        print(json.dumps(res), flush=True)
        del bufs
    print("\n| W (out x in) | bytes (MB) | read, no PDL us | read floor us | % copy | read, wait after loads us | "
          "% copy | GEMV us | % copy | GEMV / floor | BF16 us |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        plain = min(r[f"read_b{b}_us"] for b in blocks)
        w1 = next(v for key, v in r.items() if key.endswith("_wait1_us"))
        print(f"| {r['shape']} | {r['bytes'] / 1e6:.1f} | {plain:.2f} | {r['read_best_us']:.2f} | "
              f"{r['read_pct_copy']:.0f} | {w1:.2f} | {r['read_wait1_pct_copy']:.0f} | "
              f"{r.get('gemv_us', float('nan')):.2f} | {r.get('gemv_pct_copy', float('nan')):.0f} | "
              f"{r.get('gemv_us', float('nan')) / r['read_best_us']:.2f} | {r['bf16_us']:.1f} |")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "read_floor.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


def gemv(n: int, k: int, bits: int, x: torch.Tensor, bk, reps: int, bw: float) -> dict:
    """The batch-1 GEMV (cuda-int, default config) on a random layer of this shape, as bench_cuda_int times it."""
    from leanq.kernels import cuda_int as ci

    layers: dict = {}

    def make(c):
        if c not in layers:
            layers[c] = ci.packed_rk(bk.random_layer(n, k, bits, seed=c))
        pk = layers[c]
        return lambda: ci.run_int_cuda(x, pk, None)

    ms = bk.bench_graph(make, layer_bytes(n, k, bits), reps=reps)
    nb = ci.rk_bytes(layers[0])
    return dict(gemv_us=ms * 1e3, gemv_bytes=nb, gemv_pct_copy=100 * nb / (ms * 1e-3) / 1e9 / bw)


if __name__ == "__main__":
    main()
