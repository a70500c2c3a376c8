"""Kernel benchmark of the vector-quantized format: Triton LUT GEMV / dequantize+cuBLAS vs BF16 F.linear.

Shapes are F.linear weights, out x in (N x K).  Settings are the vq presets
(leanq.methods.vq.PRESETS): 2-bit = 4-dim vectors, 8-bit indices, one codebook
per 192 input columns; 3-bit = 2-dim vectors, 6-bit indices.  Each layer holds
random indices, codebooks and scales; every timed path is first checked against
the float32 reference (decode, then matmul).  Times are medians of CUDA-event
intervals around single launches, each after a 256 MB L2 flush and a ~100 us GPU
spin (so the host's launch path is not in the interval; as bench_kernels.py).
With --graph, batch 1 is also timed as CUDA-graph replays of back-to-back calls
on rotating weight copies (bench_kernels.bench_graph), BF16 included.  One JSON object per line on stdout and in $OUT/bench_vq.jsonl;
the first line is the card and versions.

    cd benchmarks/kernels && PYTHONPATH=../../src python3 bench_vq.py --out $OUT --graph   # H100: ~1-2 min
    ... --graph --rows 256/2/1,512/1/2   # also the whole-row kernel (kernels.cuda_vq_rows), not yet timed
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/kernels/bench_vq.py --smoke   # CPU check, tiny shapes
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

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
BATCHES = [1, 16]
# name -> (--bits, --vq layout): the presets, and "vq2c", 2-dim vectors with 16 codewords (2 bits per weight), the
# layout of kernels.cuda_vq_cluster; "vq2r" the same
SETTINGS = {"vq2": (2, ""), "vq3": (3, ""), "vq2c": (2, "dim=2,index=4"),
            "vq2r": (2, "dim=2,index=4,rows=128,cols=64"),  # with a codebook per 128 x 64 tile
            "vq2r5": (2, "dim=2,index=4,rows=512")}  # a codebook per 512 x 192 tile
# (rows per program, vectors per step, warps, one word per codeword): small row tiles give enough
# programs (4096 rows / 16 = 256) to keep every SM's loads in flight
GEMV_CONFIGS = [dict(bn=16, bv=64, num_warps=4, pack=True), dict(bn=8, bv=128, num_warps=4, pack=True),
                dict(bn=32, bv=64, num_warps=4, pack=True), dict(bn=16, bv=128, num_warps=8, pack=True),
                dict(bn=8, bv=64, num_warps=2, pack=True), dict(bn=16, bv=64, num_warps=4, pack=False)]
# the K-major index layout (kernels.triton_vq_kn), batch 1: (BN outputs, BV vectors, warps, table variant)
KN_CONFIGS = [dict(BN=bn, BV=bv, num_warps=w, lut=lut) for bn, bv, w, lut in [
    (256, 8, 4, False), (256, 16, 4, False), (512, 8, 4, False), (128, 16, 4, False), (256, 32, 8, False),
    (512, 16, 8, False), (256, 8, 4, True), (256, 16, 4, True), (512, 8, 4, True), (512, 16, 8, True),
    (1024, 8, 8, True), (1024, 16, 8, True)]]
# the CUDA C++ table kernel (kernels.cuda_vq), batch 1: (threads, outputs per thread, vectors per block)
# (the sweeps of 2026-11-27 session 6 that chose these: docs/PERFORMANCE.md, "Codebook (vq) kernels, session 6")
CUDA_CONFIGS = [dict(threads=256, npt=4, vc=16, fuse=False), dict(threads=256, npt=4, vc=16, fuse=True),
                dict(threads=256, npt=4, vc=8, fuse=False), dict(threads=128, npt=8, vc=16, fuse=False),
                dict(threads=256, npt=4, vc=16, mode="stationary", bps=2),
                dict(threads=128, npt=4, vc=16, mode="stationary", bps=4),
                # 6, 7: the two presets' tuned configs with programmatic dependent launch (cuda_vq's gd)
                dict(threads=128, npt=4, vc=16, mode="stationary", bps=4, gd=1),
                dict(threads=256, npt=4, vc=16, fuse=False, gd=1),
                # 8, 9: the presets' tuned configs since session 15 (cuda_vq.TUNED: ec, cpw, vc1)
                dict(threads=128, npt=4, vc=16, vc1=8, mode="stationary", bps=4, gd=1, ec=1, cpw=4),
                dict(threads=256, npt=4, vc=16, fuse=False, gd=1, ec=1),
                # 10, 11: 8 and 9 with the fp16 table (th; prepared in session 15, not yet timed)
                dict(threads=128, npt=4, vc=16, vc1=8, mode="stationary", bps=4, gd=1, ec=1, cpw=4, th=1),
                dict(threads=256, npt=4, vc=16, fuse=False, gd=1, ec=1, th=1)]
FLUSH = None


def rows_name(c: dict) -> str:
    return f"rows t{c['threads']} r{c['r']} u{c['u']}"


def cluster_name(c: dict) -> str:
    return (f"cluster t{c['threads']} c{c['cs']} s{c['steps']}" + (f" p{c['ppt_max']}" if "ppt_max" in c else "")
            + (f" gd{c['gd']}" if c.get("gd") else ""))


def cuda_name(c: dict) -> str:
    parts = [f"cuda {c.get('mode', 'tile')[:4]} t{c['threads']} n{c['npt']} v{c['vc']}"
             + (f"/{c['vc1']}" if "vc1" in c else "")]
    parts += [f"b{c['bps']}"] if "bps" in c else []
    parts += [f"r{c['nr']}"] if "nr" in c else []
    parts += ["fused"] if c.get("fuse") else []
    parts += [f"gd{c['gd']}"] if c.get("gd") else []
    parts += ["ec"] if c.get("ec") else []
    parts += [f"cw{c['cpw']}"] if c.get("cpw") else []
    parts += ["th"] if c.get("th") else []
    parts += [f"ablate{c['ablate']}"] if c.get("ablate") else []
    return " ".join(parts)


def parse_cuda_cfg(spec: str) -> dict:
    """'stat/t128/n4/v16/b4/gd1' or 'tile/t256/n4/v16/fu1/gd1' (``r`` outputs-per-block steps of the stationary
    kernel instead of ``b`` blocks per SM; ``a`` cuda_vq.source's ablate bits, timing only) -> a launch config."""
    mode, *fields = spec.split("/")
    if mode not in ("tile", "stat"):
        raise SystemExit(f"--cuda-cfgs: mode must be tile or stat, got {mode!r} in {spec!r}")
    cfg = dict(mode="tile" if mode == "tile" else "stationary", threads=256, npt=4, vc=16)
    keys = {"t": "threads", "n": "npt", "v": "vc", "b": "bps", "r": "nr", "gd": "gd", "fu": "fuse", "a": "ablate", "ec": "ec",
            "cw": "cpw", "vo": "vc1", "th": "th"}
    for f in fields:
        k = f.rstrip("0123456789")
        if k not in keys or k == f:
            raise SystemExit(f"--cuda-cfgs: unknown field {f!r} in {spec!r} (t, n, v, vo, b, r, gd, ec, cw, th, fu, a with a number)")
        cfg[keys[k]] = bool(int(f[len(k):])) if k == "fu" else int(f[len(k):])
    return cfg


def flush_l2() -> None:
    global FLUSH
    if FLUSH is None:
        FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    FLUSH.zero_()


def bench(fn, reps: int, cuda: bool) -> float:
    """Median milliseconds of one call (L2 flushed before each on CUDA; wall clock on CPU)."""
    for _ in range(2 if not cuda else 5):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            flush_l2()
            torch.cuda._sleep(200_000)  # ~100 us: the host's launch path finishes before the timed interval
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_vq_layer(n: int, k: int, setting: tuple, dev: str, seed: int = 0):
    """A vq QuantLinear of ``setting`` (--bits, --vq layout) with random indices, codebooks (~N(0, 0.02)) and scales."""
    from leanq.config import QuantSpec
    from leanq.formats.vq import geometry, pack_vq_weight
    from leanq.methods.vq import vq_fields
    from leanq.modules import QuantLinear

    spec = QuantSpec(fmt="vq", **vq_fields(setting[0], None, setting[1]))
    geo = geometry(spec, n, k)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, geo["K"], (n, spec.vq_books, geo["nvec"]), generator=g)
    books = torch.randn(geo["nrt"] * geo["nct"], spec.vq_books, geo["K"], spec.vq_dim, generator=g) * 0.02
    scales = torch.rand(n, geo["nsg"], generator=g) + 0.5
    return QuantLinear.from_int_weight(pack_vq_weight(idx, books, scales, spec, k), None).to(dev)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref).norm() / ref.norm()).item()


def emit(row: dict, fh) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through TRITON_INTERPRET=1")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="activation rows to time (default 1,16)")
    ap.add_argument("--kn", default="", help="indices into KN_CONFIGS to time (default all)")
    ap.add_argument("--cuda", default="", help="indices into CUDA_CONFIGS to time (default all; 'none' skips)")
    ap.add_argument("--cuda-cfgs", default="", help="time these CUDA configs instead of --cuda's, e.g. "
                    "stat/t128/n4/v16/b4/gd1,tile/t256/n4/v16/gd1 (see parse_cuda_cfg)")
    ap.add_argument("--rows", default="", help="also time the whole-row kernel (kernels.cuda_vq_rows) at these "
                    "launch configs, threads/rows per warp/chunks per lane: e.g. 256/2/1,512/1/2")
    ap.add_argument("--cluster", default="", help="time the 16-codeword cluster kernel (kernels.cuda_vq_cluster) "
                    "on layers it takes, at these configs: threads/cluster size/output steps per block[/gd[/most pairs per thread]], "
                    "e.g. 256/8/1,512/8/1/1/32")
    ap.add_argument("--graph", action="store_true",
                    help="batch 1: also time BF16, the Triton kn kernel and the CUDA configs as CUDA-graph replays "
                         "of back-to-back calls on rotating weight copies (bench_kernels.bench_graph)")
    ap.add_argument("--old-configs", type=int, default=len(GEMV_CONFIGS),
                    help="how many of the row-major GEMV configs to time (default all)")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    from leanq.formats.layouts import container
    from leanq.kernels import select
    from leanq.kernels import triton_vq as tv
    from leanq.kernels import cuda_vq as cv
    from leanq.kernels import cuda_vq_cluster as vcl
    from leanq.kernels import cuda_vq_rows as vr
    from leanq.kernels import triton_vq_kn as vk

    cuda = torch.cuda.is_available() and not args.smoke
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter computes in numpy: fp32 keeps it exact
    shapes = [(24, 384), (40, 192)] if args.smoke else SHAPES
    batches = [1, 3] if args.smoke else [int(b) for b in args.batches.split(",")]  # the interpreter runs one program per activation row
    reps = 1 if args.smoke else args.reps
    configs = [GEMV_CONFIGS[0], GEMV_CONFIGS[-1]] if args.smoke else GEMV_CONFIGS[: args.old_configs]
    kn_configs = [dict(BN=16, BV=4, num_warps=1), dict(BN=16, BV=4, num_warps=1, lut=True)] if args.smoke \
        else [KN_CONFIGS[int(i)] for i in args.kn.split(",")] if args.kn else KN_CONFIGS
    row_configs = [] if (args.smoke or not args.rows or not cv.available()) else [
        dict(threads=int(t), r=int(r), u=int(u)) for t, r, u in (c.split("/") for c in args.rows.split(","))]
    cuda_configs = [] if (args.smoke or args.cuda == "none" or not cv.available()) else \
        [CUDA_CONFIGS[int(i)] for i in args.cuda.split(",")] if args.cuda else CUDA_CONFIGS
    cluster_configs = [] if (args.smoke or not args.cluster or not vcl.available()) else [
        dict(threads=int(c[0]), cs=int(c[1]), steps=int(c[2]), gd=int(c[3]) if len(c) > 3 else 1,
             **({"ppt_max": int(c[4])} if len(c) > 4 else {}))
        for c in (t.split("/") for t in args.cluster.split(","))]
    if args.cuda_cfgs and cuda_configs:
        cuda_configs = [parse_cuda_cfg(c) for c in args.cuda_cfgs.split(",")]
    os.makedirs(args.out, exist_ok=True)
    fh = open(os.path.join(args.out, "bench_vq.jsonl"), "w")
    meta = dict(kind="meta", device=torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    emit(meta, fh)
    if cuda:
        from bench_kernels import warm_clocks  # the script's folder is on sys.path

        warm_clocks(1.5)
    failures = 0
    for n, k in shapes:
        w_bf16 = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
        base = {}
        for M in batches:
            x = torch.randn(M, k, device=dev, dtype=dtype)
            base[M] = bench(lambda: F.linear(x, w_bf16), reps, cuda)
            emit(dict(kind="baseline", impl="bf16 F.linear" if cuda else "fp32 F.linear", shape=f"{n}x{k}", M=M,
                      ms=base[M], GBps=2 * n * k / (base[M] * 1e-3) / 1e9), fh)
        graph_base = None
        if args.graph and cuda:
            from bench_kernels import bench_graph

            wcopies = {0: w_bf16}
            xg = torch.randn(1, k, device=dev, dtype=dtype)
            graph_base = bench_graph(lambda c: (lambda w=wcopies.setdefault(c, w_bf16.clone()): F.linear(xg, w)),
                                     2 * n * k)
            emit(dict(kind="baseline", impl="bf16 F.linear (graph)", shape=f"{n}x{k}", M=1, ms=graph_base,
                      GBps=2 * n * k / (graph_base * 1e-3) / 1e9), fh)
            del wcopies
        del w_bf16
        for name in args.settings.split(","):
            m = random_vq_layer(n, k, SETTINGS[name], dev)
            wbytes = sum(t.numel() * t.element_size() for t in container(m).tensors().values())
            w_ref = container(m).dequantize(torch.float32)
            for M in batches:
                x = torch.randn(M, k, device=dev, dtype=dtype)
                ref = x.float() @ w_ref.t()
                chosen = select(m, x).name if cuda else "-"
                fns = {}
                if M <= 16:  # the GEMV re-reads the indices per activation row; timed up to 16 to compare
                    for c in configs:
                        fns[f"gemv bn{c['bn']} bv{c['bv']} w{c['num_warps']}{'' if c['pack'] else ' unpacked'}"] = (lambda c=c: tv.vq_gemv(m, x, **c))
                if M == 1:
                    pk = vk.packed_vq_kn(m)
                    for c in kn_configs:
                        if c.get("lut") and not vk.lut_ok(pk):
                            continue
                        fns[f"kn bn{c['BN']} bv{c['BV']} w{c['num_warps']}{' lut' if c.get('lut') else ''}"] = (
                            lambda c=c: vk.run_vq_kn(x, pk, None, c))
                    for c in cuda_configs:
                        if cv.layout_ok(pk, c):
                            fns[cuda_name(c)] = (lambda c=c: cv.run_vq_cuda(x, pk, None, c))
                cl_pk = None
                if M == 1 and cluster_configs and vcl.layout_fields(m.spec, n, k) is not None:
                    cl_pk = vcl.packed_vq_cl(m)
                    for c in cluster_configs:
                        if vcl.layout_ok(cl_pk, c):
                            fns[cluster_name(c)] = (lambda c=c: vcl.run_vq_cluster(x, cl_pk, None, c))
                rows_pk = None
                if M == 1 and row_configs and vr.layout_fields(m.spec, n, k) is not None:
                    rows_pk = vr.repack_vq_rk(m.qweight, m.codebooks, m.scales, m.spec, k)
                    for c in row_configs:
                        fns[rows_name(c)] = (lambda c=c: vr.run_vq_rows(x, rows_pk, None, c))
                fns["dequant+cublas"] = lambda: tv.vq_dequant_linear(m, x)
                best = None
                for impl, fn in fns.items():
                    try:
                        err = rel_err(fn(), ref)
                    except Exception as e:  # a config out of resources: say so, go on
                        emit(dict(kind="error", setting=name, shape=f"{n}x{k}", M=M, impl=impl,
                                  error=f"{type(e).__name__}: {str(e)[:120]}"), fh)
                        continue
                    ok = err <= 2e-2
                    failures += not ok
                    ms = bench(fn, reps, cuda) if ok else float("nan")
                    row = dict(kind="vq", setting=name, spec=m.spec.describe(), shape=f"{n}x{k}", M=M, impl=impl,
                               ms=ms, rel_err=err, weight_bytes=wbytes, bpw=8 * wbytes / (n * k),
                               GBps=(wbytes + x.numel() * x.element_size()) / (ms * 1e-3) / 1e9,
                               vs_bf16=base[M] / ms, dispatch=chosen)
                    emit(row, fh)
                    if ok and (best is None or ms < best["ms"]):
                        best = row
                if graph_base is not None and M == 1:
                    pk = vk.packed_vq_kn(m)
                    pks = {0: pk}
                    runs = {"kn (graph)": lambda p: vk.run_vq_kn(x, p, None)}
                    for c in cuda_configs:
                        if cv.layout_ok(pk, c):
                            runs[cuda_name(c) + " (graph)"] = (
                                lambda p, c=c: cv.run_vq_cuda(x, p, None, c))
                    for impl, run in runs.items():
                        ms = bench_graph(lambda cp, run=run: (lambda p=pks.setdefault(cp, dict(pk, idx=pk["idx"].clone())): run(p)),
                                         pk["idx"].numel())
                        emit(dict(kind="vq", setting=name, spec=m.spec.describe(), shape=f"{n}x{k}", M=1, impl=impl,
                                  ms=ms, weight_bytes=wbytes, bpw=8 * wbytes / (n * k), vs_bf16=graph_base / ms,
                                  GBps=(wbytes + x.numel() * x.element_size()) / (ms * 1e-3) / 1e9), fh)
                    cpks = {0: cl_pk}
                    for c in cluster_configs if cl_pk is not None else []:
                        if not vcl.layout_ok(cl_pk, c):
                            continue
                        ms = bench_graph(lambda cp, c=c: (lambda p=cpks.setdefault(cp, dict(cl_pk, P=cl_pk["P"].clone())):
                                                          vcl.run_vq_cluster(x, p, None, c)), cl_pk["P"].numel())
                        emit(dict(kind="vq", setting=name, spec=m.spec.describe(), shape=f"{n}x{k}", M=1,
                                  impl=cluster_name(c) + " (graph)", ms=ms, weight_bytes=wbytes, bpw=8 * wbytes / (n * k),
                                  vs_bf16=graph_base / ms, GBps=(wbytes + x.numel() * x.element_size()) / (ms * 1e-3) / 1e9), fh)
                    del cpks
                    rpks = {0: rows_pk}
                    for c in row_configs if rows_pk is not None else []:
                        ms = bench_graph(lambda cp, c=c: (lambda p=rpks.setdefault(cp, dict(rows_pk, words=rows_pk["words"].clone())):
                                                          vr.run_vq_rows(x, p, None, c)), rows_pk["words"].numel() * 4)
                        impl = rows_name(c) + " (graph)"
                        emit(dict(kind="vq", setting=name, spec=m.spec.describe(), shape=f"{n}x{k}", M=1, impl=impl,
                                  ms=ms, weight_bytes=wbytes, bpw=8 * wbytes / (n * k), vs_bf16=graph_base / ms,
                                  GBps=(wbytes + x.numel() * x.element_size()) / (ms * 1e-3) / 1e9), fh)
                    del pks
                if best:
                    emit(dict(kind="best", setting=name, shape=f"{n}x{k}", M=M, impl=best["impl"], ms=best["ms"],
                              vs_bf16=best["vs_bf16"], bpw=best["bpw"]), fh)
            del m, w_ref
        if cuda:
            torch.cuda.empty_cache()
    fh.close()
    if failures:
        print(f"{failures} path(s) disagreed with the reference", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
