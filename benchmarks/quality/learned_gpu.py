"""GPTQ vs learned PTQ vs QAT on SmolLM2-135M at 3-bit g128 and 2-bit g64 (issue 7), in one GPU call.

Core protocol: WikiText-2 raw test, 1024-token windows, first 48 windows
("test"); calibration 128 x 512 tokens from wiki.valid.tokens, seed 0; QAT's
training windows are drawn from wiki.valid.tokens only.  Held-out check: the
next 48 windows of the test text (windows 49-96, "held"), which no row
looked at while choosing anything.

    python benchmarks/quality/learned_gpu.py --out /root/learned          # all rows, resumable
    python benchmarks/quality/learned_gpu.py --out /tmp/s --smoke         # CPU end-to-end check, minutes

The float model is loaded once; every row quantizes a copy.  Each finished
row is written to <out>/results.json at once (and to $OUT when set), so a
second call skips it; a row is not started when the time budget (--budget
seconds) would likely be overrun.  Every checkpoint is saved and loaded back,
and the loaded model's logits are compared with the in-memory ones (save ->
load identity).  QAT starts from the GPTQ row's model of the same setting
(its time is counted in the QAT row), and its step count is fitted to
--qat-seconds from a timed probe of a few steps on this device (recorded).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import leanq
from leanq import learned, qat
from leanq.api import _round_kept, load as load_ckpt, pick_device
from leanq.config import MethodConfig, QuantSpec, Recipe
from leanq.data import CALIB_FILE, EVAL_FILE, find_file, read_text, tokenize
from leanq.evaluate import perplexity, size_report
from leanq.models import load_float
from leanq.pipeline import quantize_blocks

SETTINGS = {"3": (3, 128), "2": (2, 64)}
ROWS = ["fp32", "gptq2", "learned2", "qat2", "gptq3", "learned3", "qat3"]
# rough seconds per row on one H100 for the budget (QAT: plus its training seconds); estimates, not measured
EST = {"fp32": 15, "gptq": 45, "learned": 100, "qat": 25}


def machine() -> str:
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}; torch {torch.__version__}; transformers {transformers.__version__}; leanq {leanq.__version__}; {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="/root/learned")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--windows", type=int, default=48, help="windows per half (test, held)")
    ap.add_argument("--learned-steps", type=int, default=200, help="learned PTQ steps per block")
    ap.add_argument("--qat-steps", type=int, default=2000, help="most QAT steps (fewer when --qat-seconds says so)")
    ap.add_argument("--qat-seconds", default="2=75,3=40",
                    help="QAT training seconds to fit the steps to, per bit width (2-bit gets the most: acceptance "
                         "asks QAT to beat learned PTQ there)")
    ap.add_argument("--budget", type=float, default=480.0, help="start no row that would likely end after this")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration sequences of 512 tokens")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: 2 quantized blocks, 2 windows, few steps")
    a = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    dev = pick_device(a.device)
    keep: tuple[str, ...] = ()
    nsamples, seqlen, windows = a.nsamples, 512, a.windows
    qat_seconds = {k: float(v) for k, v in (kv.split("=") for kv in a.qat_seconds.split(","))}
    if a.smoke:  # blocks 0 and 1 only; everything else as small as runs
        keep = ("model.layers.[2-9].*", "model.layers.[1-9][0-9].*")
        nsamples, seqlen, windows = 8, 128, 1
        a.learned_steps, a.qat_steps, qat_seconds = 2, 4, {"2": 1e9, "3": 1e9}
    unknown = [r for r in a.rows.split(",") if r and r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    todo = [r for r in a.rows.split(",") if r and r not in results]
    print(f"{machine()}; rows to run: {', '.join(todo) or 'none'}", flush=True)
    if not todo:
        print(markdown(results))
        return
    loaded = load_float(a.model)
    base, tok = loaded.model, loaded.tokenizer
    chars = 200_000 if a.smoke else None  # the smoke run tokenizes a prefix only (a slow step on a small CPU)
    test_ids = tokenize(tok, read_text(find_file(None, EVAL_FILE, "--data"))[:chars])
    text_ids = tokenize(tok, read_text(find_file(None, CALIB_FILE, "--calib"))[:chars])
    # leanq.data.calibration_ids on the text tokenized once (it would tokenize it again)
    starts_at = torch.randint(0, len(text_ids) - seqlen, (nsamples,), generator=torch.Generator().manual_seed(0))
    calib = torch.stack([text_ids[s : s + seqlen] for s in starts_at.tolist()])
    halves = {"test": test_ids[: windows * 1024], "held": test_ids[windows * 1024 : 2 * windows * 1024]}
    print(f"loaded in {time.perf_counter() - t_start:.0f} s", flush=True)
    # leanq quantize's GPTQ defaults (act-order, clip search, refit, true-sequential)
    gptq_cfg = MethodConfig(name="gptq", act_order=True, mse_clip=True, refit=True, nsamples=nsamples, seqlen=seqlen,
                            true_sequential=True)
    starts: dict[str, tuple] = {}  # GPTQ models (before rounding the kept tensors) for the QAT rows

    for row in todo:
        kind = "fp32" if row == "fp32" else row.rstrip("23")
        elapsed = time.perf_counter() - t_start
        est = EST[kind] + (qat_seconds[row[-1]] if kind == "qat" else 0)
        if not a.smoke and elapsed + est > a.budget:
            print(f"stopping before {row}: {elapsed:.0f} s used, budget {a.budget:.0f} s; call again to finish",
                  flush=True)
            break
        t0 = time.perf_counter()
        info: dict = {}
        cmd_extra = ""
        if kind == "fp32":
            model, cfg, qsecs = base, None, 0.0
        else:
            bits, g = SETTINGS[row[-1]]
            spec = QuantSpec(bits=bits, group_size=g)
            if kind == "gptq":
                model = copy.deepcopy(base)
                modules = quantize_blocks(model, spec, gptq_cfg, calib, keep=keep, device=dev, progress=False)
                cfg = gptq_cfg
                starts[row[-1]] = (copy.deepcopy(model), modules, time.perf_counter() - t0)
            elif kind == "learned":
                model = copy.deepcopy(base)
                cfg = learned.with_defaults(dataclasses.replace(gptq_cfg, name="learned", steps=a.learned_steps,
                                                                true_sequential=False))  # as leanq.api records it
                log: list = []
                modules = learned.learned_blocks(model, spec, cfg, calib, keep=keep, device=dev, progress=False, log=log)
                info["blocks"] = log
                info["blocks_kept"] = sum(b["kept"] for b in log)
                cmd_extra = f" --steps {cfg.steps}"
            else:  # qat, from the GPTQ model of the same setting
                if row[-1] not in starts:
                    m0 = copy.deepcopy(base)
                    mods = quantize_blocks(m0, spec, gptq_cfg, calib, keep=keep, device=dev, progress=False)
                    starts[row[-1]] = (m0, mods, time.perf_counter() - t0)
                m0, mods, start_secs = starts[row[-1]]
                t0 = time.perf_counter() - start_secs  # the start's time counts in this row
                cfg = qat.with_defaults(dataclasses.replace(gptq_cfg, name="qat", steps=a.qat_steps))
                steps, per_step = fit_steps(m0, base, text_ids, cfg, spec, dev, qat_seconds[row[-1]], a.qat_steps)
                cfg = dataclasses.replace(cfg, steps=steps)
                info.update(probe_seconds_per_step=per_step, start_seconds=start_secs)
                model = copy.deepcopy(m0)
                fakes = qat.to_fake(model, base)
                teacher = copy.deepcopy(base).to(dev)
                model.to(dev)
                losses = qat.train(model, teacher, text_ids, fakes, cfg, spec, dev, progress=False)
                qat.freeze(model)
                model.to("cpu")
                del teacher
                modules = {n: dataclasses.replace(r, method="qat" if r.spec.fmt == "int" else r.method) for n, r in mods.items()}
                info.update(loss_first=sum(losses[:20]) / len(losses[:20]), loss_last=sum(losses[-20:]) / len(losses[-20:]))
                cmd_extra = f" --steps {cfg.steps}"
            qsecs = time.perf_counter() - t0
            _round_kept(model, "float16")
            recipe = Recipe(source=Path(loaded.source).name, model_type=model.config.model_type, method=cfg,
                            default_spec=spec, modules=modules, keep_dtype="float16", leanq_version=leanq.__version__)
            from leanq.checkpoint import save

            ckpt = save(model, tok, recipe, out / row, overwrite=True)
            info["save_load_max_abs_diff"] = identity_check(model, ckpt, halves["test"][:256], dev)
        model.to(dev)
        ppl = {h: perplexity(model, ids, 1024, None, dev, progress=False)[0] for h, ids in halves.items()}
        model.to("cpu")
        rep = size_report(model, out / row if kind != "fp32" else None)
        g = "" if kind == "fp32" else f" --method {kind} --bits {SETTINGS[row[-1]][0]} --group-size {SETTINGS[row[-1]][1]}"
        results[row] = dict(
            ppl_test=ppl["test"], ppl_held=ppl["held"], bits_per_weight=rep.bits_per_weight, quant_seconds=qsecs,
            steps=None if cfg is None or cfg.name == "gptq" else cfg.steps, method=None if cfg is None else cfg.to_dict(),
            device=str(dev), machine=machine(), wall_seconds=time.perf_counter() - t0, windows=windows,
            smoke=a.smoke, command=(f"leanq quantize {a.model}{g}{cmd_extra} --out {row}; " if g else "")
            + f"leanq eval {row if g else a.model} --max-windows {windows}", **info)
        print(f"{row}: ppl test {ppl['test']:.3f} held {ppl['held']:.3f}  bpw {rep.bits_per_weight:.3f}  "
              f"quant {qsecs:.1f} s  steps {results[row]['steps']}", flush=True)
        write(results, res_path)
        if kind != "fp32":
            del model
    print(markdown(results))


def fit_steps(m0, base, text_ids, cfg, spec, dev, seconds: float, most: int) -> tuple[int, float]:
    """Steps of QAT that fit ``seconds`` here: time a few steps on copies (the first one is warm-up)."""
    if seconds >= 1e8:
        return most, float("nan")
    model, teacher = copy.deepcopy(m0), copy.deepcopy(base).to(dev)
    fakes = qat.to_fake(model, base)
    model.to(dev)
    marks = []
    qat.train(model, teacher, text_ids, fakes, dataclasses.replace(cfg, steps=6), spec, dev, progress=False,
              on_step=lambda s, l: marks.append(time.perf_counter()))
    per = (marks[-1] - marks[1]) / (len(marks) - 2)
    del model, teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return max(50, min(most, int(seconds / per) // 50 * 50)), per


def identity_check(model, ckpt: Path, ids: torch.Tensor, dev: str) -> float:
    """Largest |logit difference| between the model in memory and its checkpoint loaded back."""
    loaded, _, _ = load_ckpt(ckpt, device=dev)
    model.to(dev)
    with torch.no_grad():
        a = model(ids[None].to(dev), use_cache=False).logits
        b = loaded(ids[None].to(dev), use_cache=False).logits
    model.to("cpu")
    return float((a - b).abs().max())


def write(results: dict, path: Path) -> None:
    for p in [path] + ([Path(os.environ["OUT"]) / "learned_results.json"] if os.environ.get("OUT") else []):
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(p)


def markdown(results: dict) -> str:
    n = max((r["windows"] for r in results.values()), default=48)
    lines = [f"| row | bits per weight | steps | ppl test (windows 1-{n}) | ppl held-out (windows {n + 1}-{2 * n}) "
             "| time | device |", "|---|---|---|---|---|---|---|"]
    for name in ROWS + sorted(set(results) - set(ROWS)):
        if name not in results:
            continue
        r = results[name]
        lines.append(f"| {name} | {r['bits_per_weight']:.3f} | {r['steps'] or '-'} | {r['ppl_test']:.2f} | "
                     f"{r['ppl_held']:.2f} | {r['quant_seconds']:.0f} s | {r['machine'].split(';')[0]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
