"""Probe: which learning rate suits QAT from a vq start (``--method qat --init vq``) on SmolLM2-135M.

Quantizes the vq start once (leanq's ``--method vq``), then for every learning
rate trains a copy of it with leanq.qat's own functions (to_fake, train,
freeze: what ``qat_quantize`` runs after its start) and scores it on the
held-out windows 49-96 of WikiText-2 test, never on the reported windows 1-48,
so the chosen rate is not tuned on the numbers the table shows.

    python benchmarks/quality/vq_ft_probe.py --bits 2 --lrs 5e-4,1e-3,3e-3 --steps 150 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch


HELD_OUT_FIRST = 48  # held-out windows start after the 48 the core protocol reports


def held_out(test_ids, windows: int, window: int = 1024):
    """The ids of ``windows`` held-out windows of the test text (from window 49 on): what learning rates and step
    counts are chosen on, never the reported windows 1-48."""
    return test_ids[HELD_OUT_FIRST * window: (HELD_OUT_FIRST + windows) * window]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--vq", default="", help="codebook layout (default: the preset for --bits)")
    ap.add_argument("--lrs", default="5e-4,1e-3,3e-3", help="codeword learning rates to try")
    ap.add_argument("--scale-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--windows", type=int, default=16, help="held-out windows scored (from window 49 on)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny calibration, 2 blocks, 2 steps")
    a = ap.parse_args()
    from leanq.api import pick_device, quantize
    from leanq.config import MethodConfig
    from leanq.data import CALIB_FILE, EVAL_FILE, find_file, read_text, tokenize
    from leanq.evaluate import perplexity
    from leanq.models import load_float
    from leanq.qat import freeze, to_fake, train

    dev = pick_device(a.device)
    kw = dict(nsamples=4, seqlen=128, keep=tuple(f"*.layers.{i}.*" for i in range(2, 64))) if a.smoke else {}
    t0 = time.perf_counter()
    start = quantize("smollm2-135m", method="vq", bits=a.bits, vq=a.vq, device=dev, progress=False, **kw)
    start_secs = time.perf_counter() - t0
    teacher = load_float("smollm2-135m").model.to(dev)
    tok = start.tokenizer
    test = tokenize(tok, read_text(find_file(None, EVAL_FILE, "--data")))
    windows = 1 if a.smoke else a.windows
    held = held_out(test, windows)
    text_ids = tokenize(tok, read_text(find_file(None, CALIB_FILE, "--calib")))
    steps = 2 if a.smoke else a.steps

    def score(m) -> float:
        return perplexity(m.to(dev), held, 1024, None, dev, False)[0]

    rows = {"start": {"held_ppl": score(start.model), "seconds": start_secs}}
    print(f"start: held-out ppl {rows['start']['held_ppl']:.3f} ({start_secs:.0f} s)", flush=True)
    for lr in [float(x) for x in a.lrs.split(",") if x]:
        model = copy.deepcopy(start.model).to(dev)
        t1 = time.perf_counter()
        mods = to_fake(model, teacher)
        cfg = MethodConfig(name="qat", init="vq", steps=steps, lr=lr, scale_lr=a.scale_lr, train_batch=4,
                           seqlen=512 if not a.smoke else 64)
        losses = train(model, teacher, text_ids, mods, cfg, start.recipe.default_spec, dev, progress=False)
        freeze(model)
        secs = time.perf_counter() - t1
        rows[f"lr={lr:g}"] = {"held_ppl": score(model), "seconds": secs,
                              "loss_first": sum(losses[:10]) / 10, "loss_last": sum(losses[-10:]) / 10}
        print(f"lr {lr:g}: held-out ppl {rows[f'lr={lr:g}']['held_ppl']:.3f}  loss {rows[f'lr={lr:g}']['loss_first']:.3f}"
              f" -> {rows[f'lr={lr:g}']['loss_last']:.3f}  ({secs:.0f} s)", flush=True)
        del model, mods
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"vq_ft_probe-{a.bits}.json"), "w") as f:
            json.dump({"bits": a.bits, "vq": a.vq, "steps": steps, "scale_lr": a.scale_lr, "windows": windows,
                       "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
