"""Hybrid precision on a real model: sensitivity pass, proxy check, re-plan time, planned vs uniform ppl.

Usage (core protocol, SmolLM2-135M; every stage appends JSON lines to OUT/results.jsonl):

    nice -n 19 python benchmarks/hybrid_bench.py --stage sens   --out out/hybrid
    nice -n 19 python benchmarks/hybrid_bench.py --stage check  --out out/hybrid
    nice -n 19 python benchmarks/hybrid_bench.py --stage plan   --out out/hybrid --bpw 4.25 3.25 2.5
    nice -n 19 python benchmarks/hybrid_bench.py --stage eval   --out out/hybrid --configs P3.25 U3:g64 ...

Configs: ``P<bpw>`` = planned at that budget; ``U<bits>:g<size>|gnone`` = uniform.  The
quantizer is ``--method`` (rtn by default: data-free, so each config costs one
eval); evaluation is wiki.test.raw, 1024-token windows, the first 48.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from leanq.config import MethodConfig, QuantSpec
from leanq.data import CALIB_FILE, EVAL_FILE, calibration_ids, find_file, read_text, tokenize
from leanq.evaluate import perplexity
from leanq.hybrid import DEFAULT_SENS_SAMPLES, FISHER_SAMPLES, add_gains, get_table
from leanq.models import load_float
from leanq.pipeline import quantize_blocks
from leanq.planner import make_plan, uniform_plan
from leanq.rules import Rules, parse_spec
from leanq.sensitivity import check_proxy, rtn_dequant, save_table


def env() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def emit(out: Path, row: dict) -> None:
    row = dict(row, time=time.strftime("%Y-%m-%d %H:%M:%S"), env=env())
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stage", required=True, nargs="+", choices=["sens", "check", "plan", "eval"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/hybrid")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--samples", type=int, default=DEFAULT_SENS_SAMPLES)
    ap.add_argument("--bpw", type=float, nargs="*", default=[4.25, 3.25, 2.5])
    ap.add_argument("--configs", nargs="*", default=[])
    ap.add_argument("--max-windows", type=int, default=48)
    ap.add_argument("--check-modules", type=int, default=8)
    ap.add_argument("--check-samples", type=int, default=2, help="512-token sequences for the proxy check")
    ap.add_argument("--weighting", default="none", choices=["none", "fisher"],
                    help="fisher: weight output errors by measured loss gains (built from the plain table if absent)")
    ap.add_argument("--packed", action="store_true", help="quantize through the pipeline (QuantLinear) even for rtn")
    ap.add_argument("--mse-clip", action="store_true",
                    help="RTN/proxy with the per-group MSE clip search (as `leanq quantize --mse-clip`); off by default as in MethodConfig")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = str(out / ("sensitivity.json" if a.weighting == "none" else "sensitivity_fisher.json"))
    t0 = time.perf_counter()
    lf = load_float(a.model)
    load_s = time.perf_counter() - t0
    cfg = MethodConfig(name=a.method, mse_clip=a.mse_clip)
    rules = Rules()
    calib = find_file(None, CALIB_FILE, "--calib")

    t0 = time.perf_counter()
    if a.weighting == "fisher" and not Path(cache).exists() and (out / "sensitivity.json").exists():
        # reuse the plain measurement: only the forward+backward pass for the gains is new
        plain = get_table(lf, cfg, rules, calib, str(out / "sensitivity.json"), a.samples, progress=False,
                          weighting="none")
        ids = calibration_ids(lf.tokenizer, calib, a.samples, cfg.seqlen, cfg.seed)[:FISHER_SAMPLES]
        t1 = time.perf_counter()
        table = add_gains(lf.model, plain, ids)
        table.meta.update(fisher_samples=FISHER_SAMPLES, weighting="fisher")
        save_table(table, cache)
        emit(out, {"stage": "fisher", "samples": FISHER_SAMPLES, "seconds": time.perf_counter() - t1})
    table = get_table(lf, cfg, rules, calib, cache, a.samples, device=a.device, progress=False, weighting=a.weighting)
    table_s = time.perf_counter() - t0
    if "sens" in a.stage:
        emit(out, {"stage": "sens", "device": a.device, "model": a.model, "samples": a.samples, "seqlen": cfg.seqlen,
                   "modules": len(table.modules), "candidates": [c.describe() for c in table.candidates],
                   "sensitivity_seconds": table.seconds, "cache_load_seconds": table_s, "load_seconds": load_s})
    if "check" in a.stage:
        ids = calibration_ids(lf.tokenizer, calib, a.check_samples, 512, seed=1)  # other windows than the proxy's (seed 0)
        t0 = time.perf_counter()
        lf.model.to(a.device)
        table.check = check_proxy(lf.model, ids.to(a.device), table, n_modules=a.check_modules, progress=False)
        lf.model.to("cpu")
        save_table(table, cache)
        emit(out, {"stage": "check", "weighting": a.weighting, "device": a.device, "seconds": time.perf_counter() - t0, **table.check})
    if "plan" in a.stage:
        for b in a.bpw:
            t0 = time.perf_counter()
            plan = make_plan(table, bpw=b)
            emit(out, {"stage": "plan", "weighting": a.weighting, "bpw_budget": b, "bpw": plan.bpw, "predicted_damage": plan.damage,
                       "plan_seconds": time.perf_counter() - t0, "table_load_seconds": table_s,
                       "counts": _counts(plan)})
        for c in table.candidates:
            u = uniform_plan(table, c)
            emit(out, {"stage": "uniform", "spec": c.describe(), "bpw": u.bpw, "predicted_damage": u.damage})
    if "eval" not in a.stage:
        return
    text = read_text(find_file(None, EVAL_FILE, "--data"))
    ids = tokenize(lf.tokenizer, text)
    for name in a.configs:
        if name.startswith("P"):
            plan = make_plan(table, bpw=float(name[1:]))
            spec, overrides = QuantSpec(), plan
            bpw, dmg = plan.bpw, plan.damage
        else:
            spec = parse_spec(name[1:], QuantSpec())
            overrides = None
            u = uniform_plan(table, spec)
            bpw, dmg = u.bpw, u.damage
        model = copy.deepcopy(lf.model)
        t0 = time.perf_counter()
        if a.method == "rtn" and not a.packed:
            model.to(a.device)
            # fake-quant: each weight replaced by what RTN stores, dequantized (sensitivity.rtn_dequant is
            # bit-identical to methods.rtn, see tests/test_sensitivity.py); skips packing, same outputs
            mods = dict(model.named_modules())
            for full in table.modules:
                w = mods[full].weight
                s = overrides(full) if overrides is not None else spec
                w.data = rtn_dequant(w.data, s, cfg.mse_clip)
        else:
            calib_ids = calibration_ids(lf.tokenizer, calib, 128, 512, 0) if a.method != "rtn" else None
            quantize_blocks(model, spec, cfg, calib_ids, overrides=overrides, device=a.device, progress=False)
            model.to(a.device)
        # embeddings/head/norms as a saved checkpoint holds them (fake-quant weights stay exact in float32)
        fq = {id(m.weight) for n, m in model.named_modules() if n in table.modules} if a.method == "rtn" and not a.packed else set()
        with torch.no_grad():
            for prm in model.parameters():
                if id(prm) not in fq:
                    prm.data = prm.data.half().float()
        qs = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl, n = perplexity(model, ids, 1024, a.max_windows, device=a.device, progress=False)
        emit(out, {"stage": "eval", "weighting": a.weighting, "device": a.device, "config": name, "method": a.method, "bpw": bpw, "predicted_damage": dmg,
                   "ppl": ppl, "tokens": n, "quant_seconds": qs, "eval_seconds": time.perf_counter() - t0})
        del model


def _counts(plan) -> dict:
    c: dict[str, int] = {}
    for s in plan.specs.values():
        c[s.describe()] = c.get(s.describe(), 0) + 1
    return c


if __name__ == "__main__":
    main()
