"""Batch-1 benchmark of the CUDA C++ integer GEMV (kernels.cuda_int) against BF16 F.linear, the Triton kn GEMV
and torch._weight_int4pack_mm, all in one run, in both harnesses of bench_kernels.py:

- "single": one launch per timed interval, L2 flushed before, ~100 us GPU spin (bench_kernels.bench);
- "graph": 24 launches back to back in one CUDA graph, weights rotated past the L2 (bench_kernels.bench_graph).

Every row is first checked against the float32 reference (dequantize, then matmul) on fresh random inputs,
with the output poisoned (NaN) before the kernel writes it, and once more with an activation outlier
(max |x| = 3000) that would overflow plain fp16 sums.  % of copy: weight bytes (codes + group words) over
the time, against a 2 GiB device copy timed in the same run.

    PYTHONPATH=src python3 benchmarks/kernels/bench_cuda_int.py --out $OUT            # table
    PYTHONPATH=src python3 benchmarks/kernels/bench_cuda_int.py --out $OUT --sweep    # + launch configs
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402

from leanq.kernels import cuda_int as ci  # noqa: E402
from leanq.kernels.cuda_rt import sm_count  # noqa: E402
from leanq.kernels import triton_kn as kn  # noqa: E402

SWEEP = [dict(threads=t, r=r, u=u, pf=pf, bps=b) for t in (128, 256, 512) for r in (1, 2, 4) for u in (1, 2, 4)
         for pf in (1,) for b in (None,) if 2 <= r * u <= 8] + [
    dict(threads=1024, r=r, u=u, pf=1, bps=None) for r, u in ((1, 1), (1, 2), (2, 1))]


def _wg_cfg(text: str) -> dict:
    """A --wgmma-cfgs entry: wg/bm/nst/split[/pipe/minb/ws[/sk[/abl]]], or key=value pairs joined by ':' laid over the
    config the kernel chooses for the shape (``over``)."""
    if "=" in text:
        return dict(over=1, **{k: int(v) for k, v in (kv.split("=") for kv in text.split(":"))})
    return dict(zip(("wg", "bm", "nst", "split", "pipe", "minb", "ws", "sk", "abl"), (int(f) for f in text.split("/"))))


def check(pk: dict, n: int, k: int, w_ref: torch.Tensor, cfg: dict | None = None) -> float:
    """Worst relative error over three fresh activations (one with an outlier), output poisoned first."""
    worst = 0.0
    for trial in range(3):
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        if trial == 2:
            x[0, k // 3] = 3000.0
        out = torch.full((1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        ci.run_int_cuda(x, pk, None, cfg, out=out)
        worst = max(worst, bk.rel_err(out, x.float() @ w_ref.t()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--bits", default="4,2,8")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="also time the launch configs of SWEEP (graph harness)")
    ap.add_argument("--sweep-bits", default="4")
    ap.add_argument("--rows-cfgs", default="", help="per-warp-form configs to time with the sweep's widths, "
                    "threads/rows per warp/chunks per lane/warps per row (1 or 2)[/next tile prefetched (0 or 1)"
                    "[/x's first staging loads before the first tile (xf 0 or 1)[/programmatic dependent launch (gd 0, "
                    "1 or 2)[/the staging's lean form (xs 0 or 1)[/blocks per SM at most (bps; 0: as many as fit)[/the "
                    "warp's next tiles requested into the L2 after x's first loads (xp, with gd)]]]]]]: e.g. 512/1/2/2 or "
                    "512/1/4/1/1/0/1/1 or 256/2/4/1/1/1/1/1/1 or 512/2/4/1/1/1/1/1/0/2")
    ap.add_argument("--stream-cfgs", default="", help="streaming-form configs (cuda_int.int_gemv_stream, sm_90) to time "
                    "with the sweep's widths, threads/stages/units per lane[/blocks per SM (0: as many as fit)[/programmatic "
                    "dependent launch (gd 0, 1, or 3: the next grid let in at the start)[/the staging's lean form (xs)]]]: "
                    "e.g. 256/4/2,128/8/1/4,256/5/2/2/3/1")
    ap.add_argument("--no-single", action="store_true", help="graph harness only")
    ap.add_argument("--mma", default="", help="batches (e.g. 4,16) to time the tensor-core kernel (kernels.cuda_int_mma) "
                    "at, beside BF16, the Triton kn-dot and dequantize + cuBLAS (both harnesses)")
    ap.add_argument("--mma-cfgs", default="", help="also these cuda-int-mma launch configs, threads/wr/nt: e.g. "
                    "256/1/2,512/2/4")
    ap.add_argument("--mmaw-cfgs", default="", help="with --mma: also these configs of the w kernel (weights as the A "
                    "operand), rt/kw/spw/pd[/mg[/rp[/rs[/gd[/tw[/xv]]]]]] or changes to the chosen config joined by +: "
                    "rs0, gd0-2, xv0-3, pd2-5, rp0-1, pt1-8 (with rp: steps per register tile), tw1-4, wg0-1 (with rp, rt a multiple "
                    "of 4: wgmma, sm_90a), rt/kw/sp (rows, ranges, steps per warp), e.g. gd0+pd4 or rp1+pt4+wg1+rt4 or "
                    "rp1+pt4 (spw 0: chosen by the launcher; mg 1: copies of four steps at a time; rp 1: weights "
                    "loaded into registers; rs: the split sum's loads in flight together, 1 unless given; gd: "
                    "programmatic dependent launch, as W_DEFAULT unless given; tw: row tiles per warp, with rp; xv: x "
                    "staged by 16-byte copies), e.g. 4/4/0/4,2/8/2/4,7/1/32/2/1,7/2/16/3/0/1,8/2/16/3/0/0/0")
    ap.add_argument("--mmax-cfgs", default="", help="with --mma batches up to 16: also time the x kernel "
                    "(kernels.cuda_int_mmax: x in registers) at its default and at these configs, key=value pairs "
                    "joined by ':' over X_DEFAULT, several joined by ',' (nw warps, sp super-steps per warp, pf tiles "
                    "ahead, rb tiles per block, gd, abl timing-only ablation bits), e.g. nw=16:sp=1,pf=1; 'none' skips it")
    ap.add_argument("--mma-lite", action="store_true", help="with --mma: skip dequantize + cuBLAS and the Triton kn-dot")
    ap.add_argument("--wgmma-cfgs", default="", help="with --mma batches above 16: also these configs of the wgmma "
                    "kernel (kernels.cuda_int_wgmma), wg/bm/nst/split[/pipe/minb/ws[/sk[/abl]]] (split 0: chosen; ws 4: a "
                    "producer warpgroup and mbarriers; sk 1: stream-K, one block per SM; abl: timing-only ablation bits "
                    "of cuda_int_wgmma's ABL), or key=value pairs joined by ':' over the config chosen for the shape, "
                    "e.g. 2/128/4/0,1/256/3/2/1/1,2/256/4/1/1/1/4/1,gd=1,gd=1:abl=8")
    ap.add_argument("--gemm-cfgs", default="", help="with --mma batches above 16: also these configs of the Triton GEMM "
                    "on the rk words (kernels.triton_gemm), BN/BM/BK/warps/stages/split/GM[/XA], e.g. 128/128/64/8/4/1/8/1")
    ap.add_argument("--ablate", nargs="?", const="1,2,3", default="",
                    help="also time the tuned config with parts left out (cuda_int.source's ablate bits: 1, 2, 3 "
                    "unless given, e.g. --ablate 3; 0 leaves nothing out, a baseline for --ablate-cfg)")
    ap.add_argument("--ablate-cfg", default="", help="with --ablate: changes to each width's tuned config for the "
                    "ablations, key=value pairs joined by ':', several such sets joined by ',' (each timed with every "
                    "ablation), e.g. xp=2 or xp=0,xp=2 or xp=0:u=2")
    args = ap.parse_args()
    if any(len(c.split("/")) > 10 for c in args.rows_cfgs.split(",")):
        ap.error(f"--rows-cfgs takes at most ten fields a config: {args.rows_cfgs}")
    try:
        ablate_overs = [{key: int(val) for key, val in (kv.split("=") for kv in part.split(":") if kv)}
                        for part in args.ablate_cfg.split(",")]
    except ValueError:
        ap.error(f"--ablate-cfg takes key=integer pairs joined by ':' and ',': {args.ablate_cfg}")
    sweep = (SWEEP if args.sweep else []) + [
        dict(mode="stream", threads=int(f[0]), st=int(f[1]), u=int(f[2]), bps=int(f[3]) if len(f) > 3 and int(f[3])
             else None, gd=int(f[4]) if len(f) > 4 else 0, xs=int(f[5]) if len(f) > 5 else 0)
        for f in (c.split("/") for c in args.stream_cfgs.split(",") if c)] + [
        dict(threads=int(f[0]), r=int(f[1]), u=int(f[2]), pf=int(f[4]) if len(f) > 4 else 1,
             bps=int(f[8]) if len(f) > 8 and int(f[8]) else None, sp=int(f[3]),
             xf=int(f[5]) if len(f) > 5 else 0, gd=int(f[6]) if len(f) > 6 else 0, xs=int(f[7]) if len(f) > 7 else 0,
             xp=int(f[9]) if len(f) > 9 else 0)
        for f in (c.split("/") for c in args.rows_cfgs.split(",") if c)]
    os.makedirs(args.out, exist_ok=True)
    meta = bk.run_meta()
    bk.warm_clocks()
    bw = bk.copy_bandwidth()
    meta["copy_GBps"] = bw
    print(json.dumps(meta), flush=True)
    with open(os.path.join(args.out, "bench_cuda_int.jsonl"), "a") as f:
        f.write(json.dumps(dict(meta=meta)) + "\n")
    rows = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else bk.SHAPES
    single = (lambda f: float("nan")) if args.no_single else (lambda f: bk.bench(f, args.reps))

    def emit(r):
        rows.append(r)
        with open(os.path.join(args.out, "bench_cuda_int.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")

    for n, k in shapes:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        bf16_fn = bk.bf16_copies(n, k, x)
        ws = bf16_fn.copies

        base = (single(bf16_fn(0)), bk.bench_graph(bf16_fn, 2 * n * k, reps=args.reps))
        ws.clear()
        i4s = {}

        def i4_fn(c):
            if c not in i4s:
                i4s[c] = bk.int4pack_baseline((torch.randn(n, k, device="cuda") * 0.02).bfloat16(), n, k)[0]
            f = i4s[c]
            return lambda: f(x)

        i4 = (single(i4_fn(0)), bk.bench_graph(i4_fn, n * k // 2, reps=args.reps))
        i4s.clear()
        for name, (s1, g1), nbytes in (("bf16", base, 2 * n * k), ("int4pack", i4, n * k // 2 + n * k // 64)):
            r = dict(shape=f"{n}x{k}", n=n, k=k, bits=16 if name == "bf16" else 4, impl=name, single_us=s1 * 1e3,
                     graph_us=g1 * 1e3, x_bf16_single=base[0] / s1, x_bf16_graph=base[1] / g1,
                     pct_copy_graph=100 * nbytes / (g1 * 1e-3) / 1e9 / bw)
            emit(r)
            print(f"{n:>5}x{k:<5} {name:<9}      single {r['single_us']:6.1f} us  graph {r['graph_us']:6.1f} us "
                  f"(x{r['x_bf16_graph']:.2f} bf16, {r['pct_copy_graph']:4.1f}% copy)", flush=True)
        for bits in [int(b) for b in args.bits.split(",")]:
            layers = {}

            def layer(c, bits=bits):
                if c not in layers:
                    layers[c] = bk.random_layer(n, k, bits, seed=c)
                return layers[c]

            m0 = layer(0)
            w_ref = m0.int_weight().dequantize(torch.float32)
            pk0 = ci.packed_rk(m0)
            cfg0 = ci.default_cfg(pk0, 0)  # the config the layer gets when none is given (its row, the ablations' base)
            assert torch.equal(ci.reference_rk(pk0), w_ref), "rk layout does not decode to the stored weight"
            err = check(pk0, n, k, w_ref)
            pks, kns = {}, {}

            def rk_pk(c):
                if c not in pks:
                    pks[c] = ci.packed_rk(layer(c))
                return pks[c]

            def kn_pk(c):
                if c not in kns:
                    kns[c] = kn.packed_kn(layer(c))
                return kns[c]

            def rk_fn(c, cfg=None):
                p = rk_pk(c)
                return lambda: ci.run_int_cuda(x, p, None, cfg)

            def kn_fn(c):
                p = kn_pk(c)
                return lambda: kn.run_gemv_kn(x, p, None)

            nb = ci.rk_bytes(pk0)
            res = {"cuda-int": (single(rk_fn(0)) if err <= 1e-2 else float("nan"),
                                bk.bench_graph(rk_fn, nb, reps=args.reps) if err <= 1e-2 else float("nan"), err)}
            if bits in kn.BITS:  # the Triton kn GEMV beside it (3-bit: kn packs 2, 4 and 8 bits only)
                kerr = bk.rel_err(kn.run_gemv_kn(x, kn.packed_kn(m0), None), x.float() @ w_ref.t())
                res["kn"] = (single(kn_fn(0)), bk.bench_graph(kn_fn, nb, reps=args.reps), kerr)
            for name, (s1, g1, e) in res.items():
                r = dict(shape=f"{n}x{k}", n=n, k=k, bits=bits, impl=name, single_us=s1 * 1e3, graph_us=g1 * 1e3,
                         rel_err=e, x_bf16_single=base[0] / s1, x_bf16_graph=base[1] / g1,
                         x_int4pack_graph=i4[1] / g1, pct_copy_graph=100 * nb / (g1 * 1e-3) / 1e9 / bw,
                         pct_copy_single=100 * nb / (s1 * 1e-3) / 1e9 / bw, cfg=cfg0 if name == "cuda-int" else None)
                emit(r)
                print(f"{n:>5}x{k:<5} int{bits} {name:<9} single {r['single_us']:6.1f} us (x{r['x_bf16_single']:.2f})  "
                      f"graph {r['graph_us']:6.1f} us (x{r['x_bf16_graph']:.2f} bf16, {r['pct_copy_graph']:4.1f}% copy)"
                      f"  err {e:.1e}", flush=True)
            if sweep and str(bits) in args.sweep_bits.split(","):
                for cfg in sweep:
                    try:
                        e = check(pk0, n, k, w_ref, cfg)
                        g1 = bk.bench_graph(lambda c: rk_fn(c, cfg), nb, reps=max(10, args.reps // 2))
                    except Exception as ex:  # a config the device refuses (registers, shared memory)
                        print(f"  cfg {cfg} failed: {type(ex).__name__}: {str(ex)[:120]}", flush=True)
                        continue
                    r = dict(shape=f"{n}x{k}", n=n, k=k, bits=bits, impl="cuda-int-sweep", cfg=cfg, graph_us=g1 * 1e3,
                             rel_err=e, x_bf16_graph=base[1] / g1, pct_copy_graph=100 * nb / (g1 * 1e-3) / 1e9 / bw)
                    emit(r)
                    print(f"  sweep {cfg} graph {g1 * 1e3:6.1f} us x{r['x_bf16_graph']:.2f} {r['pct_copy_graph']:4.1f}% "
                          f"err {e:.1e}", flush=True)
            for M in [int(b) for b in args.mma.split(",") if b]:
                from leanq.kernels import cuda_int_mma as cm

                xm = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
                refm = xm.float() @ w_ref.t()
                mma_cfgs = [None] + [dict(threads=int(t), wr=int(w), nt=int(j)) for t, w, j in
                                     (c.split("/") for c in args.mma_cfgs.split(",") if c)]

                def mma_fn(c, cfg=None, xm=xm):
                    p = rk_pk(c)
                    return lambda: cm.run_int_mma(xm, p, None, cfg)

                def deq_fn(c, xm=xm):
                    p = rk_pk(c)
                    return lambda: F.linear(xm, ci.dequantize_rk(p, xm.dtype))

                def kn_dot_fn(c, xm=xm):
                    p = kn_pk(c)
                    return lambda: kn.run_dot_kn(xm, p, None)

                cands = {"bf16": (bk.bf16_copies(n, k, xm), 2 * n * k)}
                if M > 16:  # the Triton GEMM on the rk words, beside dequantize + cuBLAS
                    from leanq.kernels import triton_gemm as tg

                    def gemm_fn(c, cfg=None, xm=xm):
                        p = rk_pk(c)
                        return lambda: tg.run_gemm_rk(xm, p, None, cfg)

                    gcfgs = [None] + [dict(zip(("BN", "BM", "BK", "num_warps", "num_stages", "SPLIT", "GM", "XA"),
                                               (int(f) for f in c.split("/")))) for c in args.gemm_cfgs.split(",") if c]
                    for cfg in gcfgs:
                        name = "triton-gemm" + ("" if cfg is None else " " + "/".join(str(v) for v in cfg.values()))
                        cands[name] = (lambda c, cfg=cfg: gemm_fn(c, cfg), nb)
                    if bits == 4:  # the wgmma kernel (sm_90a)
                        from leanq.kernels import cuda_int_wgmma as cw

                        def wg_fn(c, cfg=None, xm=xm):
                            p = rk_pk(c)
                            return lambda: cw.run_int_wgmma(xm, p, None, cfg)

                        wgcfgs = [None] + [_wg_cfg(c) for c in args.wgmma_cfgs.split(",") if c]
                        for cfg in wgcfgs:
                            name = "cuda-int-wgmma" + ("" if cfg is None else " " + (
                                ":".join(f"{k}={v}" for k, v in cfg.items() if k != "over") if cfg.get("over")
                                else "/".join(str(v) for v in cfg.values())))
                            name += " (ablation)" if cfg and cfg.get("abl") else ""  # timed though wrong
                            cands[name] = (lambda c, cfg=cfg: wg_fn(c, cfg), nb)
                    mma_cfgs = []
                for cfg in mma_cfgs:
                    name = "cuda-int-mma" + ("" if cfg is None else f" t{cfg['threads']} wr{cfg['wr']} nt{cfg['nt']}")
                    cands[name] = (lambda c, cfg=cfg: mma_fn(c, cfg), nb)
                if bits == 4 and M <= 16:
                    def mmaw_fn(c, cfg=None, xm=xm):
                        p = rk_pk(c)
                        return lambda: cm.run_int_mma_w(xm, p, None, cfg)

                    wcfgs = [None]
                    for spec in (c.split("/") for c in args.mmaw_cfgs.split(",") if c):
                        changes = spec[0].split("+") if len(spec) == 1 else []
                        keys = {"rs": "rs", "gd": "gd", "xv": "xv", "pd": "pd", "rp": "rp", "pt": "pt", "tw": "tw",
                                "wg": "wg", "rt": "rt", "kw": "kw", "sp": "spw"}
                        if changes and all(ch[:2] in keys for ch in changes):
                            # the chosen config with these changes, e.g. gd0 or gd0+pd4 or rp1+pt4+wg1+rt4
                            wcfgs.append({"mg": 0, "rp": 0, "rs": cm.W_DEFAULT["rs"], "gd": cm.W_DEFAULT.get("gd", 0),
                                          **cm.w_config(M, n, k, sm_count(0)),
                                          **{keys[ch[:2]]: int(ch[2:]) for ch in changes}})
                            continue
                        rest = [0, 0, cm.W_DEFAULT["rs"], cm.W_DEFAULT.get("gd", 0), 1, cm.W_DEFAULT.get("xv", 0)]
                        v = [int(f) for f in spec] + rest[len(spec) - 4:]
                        wcfgs.append(dict(rt=v[0], kw=v[1], spw=v[2] or None, pd=v[3], mg=v[4], rp=v[5], rs=v[6],
                                          gd=v[7], tw=v[8], xv=v[9]))
                    for cfg in wcfgs:
                        name = "cuda-int-mma-w" + ("" if cfg is None else
                                                   f" rt{cfg['rt']} kw{cfg['kw']} spw{cfg['spw'] or 0} pd{cfg['pd']}"
                                                   + (" mg" if cfg["mg"] else "") + (" rp" if cfg["rp"] else "")
                                                   + ("" if cfg["rs"] else " rs0") + (" gd" if cfg["gd"] else "")
                                                   + (f" tw{cfg['tw']}" if cfg.get("tw", 1) != 1 else "")
                                                   + (f" pt{cfg['pt']}" if cfg.get("pt", 1) != 1 else "")
                                                   + (f" wg{cfg['wg']}" if cfg.get("wg") else "")
                                                   + (f" xv{cfg['xv']}" if "xv" in cfg else ""))
                        cands[name] = (lambda c, cfg=cfg: mmaw_fn(c, cfg), nb)
                if bits == 4 and M <= 16 and args.mmax_cfgs != "none":  # the x kernel (x in registers)
                    from leanq.kernels import cuda_int_mmax as cx

                    def mmax_fn(c, cfg=None, xm=xm):
                        p = rk_pk(c)
                        return lambda: cx.run_int_mma_x(xm, p, None, cfg)

                    xcfgs = [None] + [{key: int(val) for key, val in (kv.split("=") for kv in part.split(":") if kv)}
                                      for part in args.mmax_cfgs.split(",") if part]
                    for cfg in xcfgs:
                        name = "cuda-int-mma-x" + ("" if cfg is None else " " + ":".join(f"{k}={v}" for k, v in cfg.items()))
                        name += " (ablation)" if cfg and cfg.get("abl") else ""  # timed though wrong
                        cands[name] = (lambda c, cfg=cfg: mmax_fn(c, cfg), nb)
                if not args.mma_lite:
                    cands["rk-dequant+cublas"] = (deq_fn, nb)
                    if bits in kn.DOT_BITS:
                        cands["kn-dot"] = (kn_dot_fn, nb)
                tb = gb = None
                for name, (make, nbytes) in cands.items():
                    try:
                        e = bk.rel_err(make(0)(), refm) if name != "bf16" else 0.0
                    except Exception as ex:  # a config the device refuses (shared memory, registers)
                        print(f"  M={M:<3} {name} failed: {type(ex).__name__}: {str(ex)[:160]}", flush=True)
                        continue
                    ok = e <= 1e-2 or name.endswith("(ablation)")
                    t1 = bk.bench(make(0), args.reps) if ok and not args.no_single else float("nan")
                    g1 = bk.bench_graph(make, nbytes, reps=args.reps) if ok else float("nan")
                    tb, gb = (t1, g1) if name == "bf16" else (tb, gb)
                    r = dict(shape=f"{n}x{k}", n=n, k=k, bits=bits, M=M, impl=f"batch-{name}", single_us=t1 * 1e3,
                             graph_us=g1 * 1e3, rel_err=e, x_bf16_single=tb / t1, x_bf16_graph=gb / g1,
                             pct_copy_graph=100 * nbytes / (g1 * 1e-3) / 1e9 / bw)
                    emit(r)
                    print(f"  M={M:<3} {name:<28} single {t1 * 1e3:6.1f} us x{tb / t1:.2f}  graph {g1 * 1e3:6.1f} us "
                          f"x{gb / g1:.2f} bf16 ({r['pct_copy_graph']:.0f}% copy)  err {e:.1e}", flush=True)
            for ablate_over in (ablate_overs if args.ablate else []):
                for ab in (int(a) for a in args.ablate.split(",")):
                    cfg = dict(cfg0, **ablate_over, ablate=ab)
                    # ablation 0 leaves nothing out: its outputs are the layer's, so they are checked like a sweep's
                    e = check(pk0, n, k, w_ref, cfg) if ab == 0 else float("nan")
                    g1 = bk.bench_graph(lambda c: rk_fn(c, cfg), nb, reps=args.reps)
                    tag = "".join(f"-{key}{val}" for key, val in ablate_over.items())
                    r = dict(shape=f"{n}x{k}", n=n, k=k, bits=bits, impl=f"cuda-int-ablate{ab}{tag}", cfg=cfg,
                             graph_us=g1 * 1e3, x_bf16_graph=base[1] / g1, pct_copy_graph=100 * nb / (g1 * 1e-3) / 1e9 / bw,
                             rel_err=e)
                    emit(r)
                    checked = "" if ab else f" err {e:.1e}" + (" FAILED" if e > 1e-2 else "")
                    print(f"  ablate {ab}{tag} graph {g1 * 1e3:6.1f} us x{r['x_bf16_graph']:.2f} {r['pct_copy_graph']:4.1f}%"
                          f"{checked}", flush=True)
            del layers, pks, kns, pk0, m0, w_ref
            torch.cuda.empty_cache()
    print("\n| W (out x in) | bits | impl | single us | x bf16 | graph us | x bf16 | % copy (graph) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["impl"].startswith(("cuda-int-", "batch-")):
            print(f"| {r['shape']} | {r['bits']} | {r['impl']} | {r['single_us']:.1f} | {r['x_bf16_single']:.2f} | "
                  f"{r['graph_us']:.1f} | {r['x_bf16_graph']:.2f} | {r['pct_copy_graph']:.0f} |")
    import math

    def geo(v: list) -> float:
        return math.exp(sum(map(math.log, v)) / len(v))

    b1: dict = {}
    for r in rows:  # the launcher's default config at batch 1, by width (rows that matched the reference)
        if r["impl"] == "cuda-int" and r["x_bf16_graph"] == r["x_bf16_graph"]:
            b1.setdefault(r["bits"], []).append((r["x_bf16_graph"], r["pct_copy_graph"]))
    if b1:
        print("\nbatch 1, default config, x bf16 (graph) by width: geometric mean, min-max, % of copy min-max:")
        for bits, v in sorted(b1.items()):
            xs, ps = [a for a, _ in v], [p for _, p in v]
            print(f"  {bits}-bit {geo(xs):.2f}  {min(xs):.2f}-{max(xs):.2f}  {min(ps):.0f}-{max(ps):.0f}%  "
                  f"({len(v)} shapes)")
    wbest: dict = {}
    for r in rows:
        if r["impl"].startswith(("batch-cuda-int-mma", "batch-triton-gemm", "batch-rk-dequant", "batch-cuda-int-wgmma")) and \
                r["x_bf16_graph"] == r["x_bf16_graph"]:
            wbest.setdefault((r["M"], r["impl"]), []).append(r["x_bf16_graph"])
    if wbest:
        print("\ntensor-core kernels, geometric-mean x bf16 (graph) over shapes, by batch:")
        for (m, impl), v in sorted(wbest.items(), key=lambda kv: (kv[0][0], -sum(map(math.log, kv[1])) / len(kv[1]))):
            print(f"  M={m:<3} {math.exp(sum(map(math.log, v)) / len(v)):.2f}  min {min(v):.2f}  {impl}  ({len(v)} shapes)")
    if sweep:
        best: dict = {}
        for r in rows:
            if r["impl"] == "cuda-int-sweep":
                key = json.dumps(r["cfg"], sort_keys=True) + f"|{r['bits']}"
                best.setdefault(key, []).append(r["x_bf16_graph"])
        print("\nsweep, geometric-mean x bf16 (graph) over shapes, best 12:")
        scored = sorted(((math.exp(sum(map(math.log, v)) / len(v)), kk, len(v)) for kk, v in best.items()), reverse=True)
        for sc, kk, cnt in scored[:12]:
            print(f"  {sc:.2f}  {kk}  ({cnt} shapes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
