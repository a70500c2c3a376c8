"""Vector-quantization rows of the core protocol (SmolLM2-135M), resumable across short GPU calls.

Protocol as benchmarks/quality/core_table.py: WikiText-2 raw test, 1024-token
windows, first 48; calibration 128 x 512 tokens of wiki.valid.tokens, seed 0;
decoder-block linears quantized, embeddings/head kept in float16.

Each row is quantized, saved, evaluated, and written as <state>/<row>.json
(default state folder /root/vq) and copied to $OUT; rows whose JSON exists are
skipped, so a call cut short by its time limit loses at most the row in flight.
A row is not started when the time left (--budget) is less than the longest
row so far (or --row-estimate before any has run).

    bash benchmarks/quality/vq_gpu.sh                         # on the lent GPU: setup + every row
    bash benchmarks/quality/vq_gpu.sh --rows vq2,vq3          # some rows
    LEANQ_DATA=../shared/data python benchmarks/quality/vq_gpu.py --smoke --state /tmp/vqs   # CPU check

Fine-tuned rows also report the perplexity of held-out windows 49-64 (``held_out_ppl``), which is what a
learning rate or step count is chosen on. What the calls carry: benchmarks/quality/gpu_prepare.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

# name -> (bits, --vq layout, --bpw budget or None[, training]); "" = the preset for bits
# (leanq.methods.vq.PRESETS).  A budget plans every module's setting from measured sensitivities
# (leanq.hybrid; candidates leanq.methods.vq.VQ_CANDIDATES: the vq presets, GPTQ int3/int4 g128, int8,
# float16), everything counted.  A training dict makes the row `--method qat --init vq` with those
# fields: the vq start, then its codewords and scales distilled from the float model (leanq.qat).
FT = dict(steps=250, lr=3e-3, scale_lr=1e-3)  # lr chosen on held-out windows (vq_ft_probe.py)
ROWS = {
    "vq2": (2, "", None),
    "vq3": (3, "", None),
    "vq-bpw2.3": (2, "", 2.3),
    "vq-bpw3.1": (2, "", 3.1),
    "vq2-c96": (2, "cols=96", None),
    "vq2-d8x2": (2, "dim=8,index=8,books=2,cols=none", None),
    "vq3-d3": (3, "dim=3,index=8,cols=192", None),
    "vq2-g64": (2, "cols=none,group=64", None),  # scales per 64 inputs instead of per row
    "vq3-g128": (3, "group=128", None),
    "vq2-ft": (2, "", None, FT),
    "vq3-ft": (3, "", None, FT),
    "vq3-g128-ft": (3, "group=128", None, FT),
    # session 18: the 2-bit layout of kernels.cuda_vq_cluster (2-dim vectors, 16 codewords, a codebook per 512 x 192
    # tile) fine-tuned 250 and 500 steps at the learning rate that won at 50 steps on held-out windows (1e-2), and
    # 250 steps at 3e-3 (held-out windows 49-64 again chose 1e-2: docs/results/vq.md, "Session 18")
    "vq2c-r512-ft250": (2, "dim=2,index=4,rows=512", None, dict(steps=250, lr=1e-2, scale_lr=3e-3)),
    "vq2c-r512-ft250-lr3e-3": (2, "dim=2,index=4,rows=512", None, dict(steps=250, lr=3e-3, scale_lr=1e-3)),
    "vq2c-r512-ft500": (2, "dim=2,index=4,rows=512", None, dict(steps=500, lr=1e-2, scale_lr=3e-3)),
}
HELD_OUT_WINDOWS = 16  # windows 49-64 (vq_ft_probe.held_out), scored for the fine-tuned rows


def machine() -> str:
    import transformers

    import leanq

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (f"{dev}; torch {torch.__version__}; transformers {transformers.__version__}; leanq {leanq.__version__}; "
            f"python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="vq2,vq3")
    ap.add_argument("--state", default="/root/vq", help="folder of finished rows (JSON) and checkpoints")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="copy every row's JSON here (default $OUT)")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds this call may spend (default 270)")
    ap.add_argument("--row-estimate", type=float, default=150.0, help="assumed seconds per row before one has run")
    ap.add_argument("--max-windows", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check: 4 calibration sequences of 128 tokens, 1 eval window, 2 blocks quantized")
    a = ap.parse_args()
    t_start = time.perf_counter()
    from leanq.api import pick_device, quantize
    from leanq.data import EVAL_FILE, find_file, read_text
    from leanq.evaluate import evaluate as run_eval

    state = Path(a.state)
    state.mkdir(parents=True, exist_ok=True)
    dev = pick_device(a.device)
    text = read_text(find_file(None, EVAL_FILE, "--data"))
    windows = 1 if a.smoke else a.max_windows
    longest = a.row_estimate
    held_ids = None  # the held-out windows' ids, tokenized at the first fine-tuned row
    for row in [r for r in a.rows.split(",") if r]:
        if row not in ROWS:
            print(f"unknown row {row!r}; have {', '.join(ROWS)}", file=sys.stderr)
            return 2
        res = state / f"{row}.json"
        if res.exists():
            print(f"{row}: done before ({json.loads(res.read_text())['ppl']:.2f}), skipped", flush=True)
            _copy(res, a.out)
            continue
        left = a.budget - (time.perf_counter() - t_start)
        if left < longest:
            print(f"{row}: not started ({left:.0f} s left, a row takes ~{longest:.0f} s)", flush=True)
            continue
        bits, layout, bpw, *train = ROWS[row]
        train = train[0] if train else None
        t0 = time.perf_counter()
        kw = dict(nsamples=4, seqlen=128, keep=tuple(f"*.layers.{i}.*" for i in range(2, 64))) if a.smoke else {}
        if bpw is not None:
            kw.update(bpw=bpw, sensitivity_cache=str(state / "sensitivity-vq.json"))
            if a.smoke:
                kw["sensitivity_samples"] = 4
        if train:
            kw.update(method="qat", init="vq", **train)
            if a.smoke:
                kw.update(steps=2)
        else:
            kw["method"] = "vq"
        qm = quantize("smollm2-135m", bits=bits, vq=layout, device=dev, progress=False, **kw)
        ckpt = qm.save(state / f"ckpt-{row}", overwrite=True)
        model, tok = qm.model.to(dev), qm.tokenizer
        r = run_eval(model, tok, text, row, ckpt, 1024, windows, dev, progress=False)
        held = {}
        if train and not a.smoke:
            from leanq.data import tokenize
            from leanq.evaluate import perplexity
            from vq_ft_probe import HELD_OUT_FIRST, held_out

            if held_ids is None:
                held_ids = held_out(tokenize(tok, text), HELD_OUT_WINDOWS)
            held = {"held_out_windows": [HELD_OUT_FIRST, HELD_OUT_FIRST + HELD_OUT_WINDOWS],
                    "held_out_ppl": perplexity(model, held_ids, 1024, None, dev, False)[0]}
        wall = time.perf_counter() - t0
        spec = qm.recipe.default_spec
        how = ("--method qat --init vq " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in train.items())
               if train else "--method vq")
        cmd = (f"leanq quantize smollm2-135m {how} --bits {bits}{f' --vq {layout}' if layout else ''}"
               f"{f' --bpw {bpw}' if bpw is not None else ''} --out {row}; leanq eval {row} --max-windows {windows}")
        if qm.plan is not None:
            from collections import Counter

            out_plan = {"plan_bpw": qm.plan.bpw, "plan_mix": dict(Counter(s.describe() for s in qm.plan.specs.values()))}
        else:
            out_plan = {}
        out = {**r.to_dict(), "row": row, "spec": spec.to_dict(), "describe": spec.describe(),
               "quant_seconds": qm.seconds, "wall_seconds": wall, "command": cmd, "machine": machine(),
               "smoke": a.smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **out_plan, **held}
        tmp = res.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(res)
        _copy(res, a.out)
        print(f"{row}: ppl {r.ppl:.3f}  bpw {r.bits_per_weight:.3f}  quant {qm.seconds:.0f} s  wall {wall:.0f} s"
              + (f"  held-out {held['held_out_ppl']:.3f}" if held else ""), flush=True)
        longest = max(longest if longest != a.row_estimate else 0.0, wall)
        del model, qm
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        shutil.rmtree(ckpt, ignore_errors=True)  # the JSON keeps the numbers; disk stays free for the next rows
    return 0


def _copy(p: Path, out: str) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, Path(out) / p.name)


if __name__ == "__main__":
    sys.exit(main())
