"""Export a leanq checkpoint to compressed-tensors and GGUF and check each with its client.

    python benchmarks/interop/check_exports.py DIR --work /tmp/interop [--max-windows 8] [--gguf-types Q4_1,Q8_0]

compressed-tensors: loaded by transformers + compressed-tensors on the CPU
(the dequantizing loader for asymmetric schemes, see leanq.export.compressed_tensors);
GGUF: loaded back through leanq's own GGUF import (transformers' GGUF reader).
Each is compared with leanq's module on the same token ids: max |Δlogit| / max |logit|
(and the worst per-position ||Δlogit|| / ||logit||) over the core protocol's first
--logit-windows 1024-token windows, the greedy continuation (--new-tokens) of four
prompts, and, with --max-windows > 0, perplexity on the core protocol's first windows.
Prints one JSON object (machine and versions included); exits 1 when the
compressed-tensors export differs by more than --tolerance or in a greedy continuation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

PROMPTS = ["The history of the city begins in the",
           "In 1998, the band released their second album,",
           "The main difference between a virus and a bacterium is",
           "def fibonacci(n):"]


def _logits_and_greedy(model, windows: list, prompts: list, pad: int, new_tokens: int):
    """Logits float32 [n, vocab] of each window (one forward each) and the greedy ids after each prompt."""
    logits, greedy = [], []
    with torch.no_grad():
        for w in windows:
            logits.append(model(w[None]).logits[0].float())
        for p in prompts:
            out = model.generate(p, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            greedy.append(out[0, p.shape[1]:].tolist())
    return logits, greedy


def _logit_diffs(lg: list, ref: list) -> dict:
    """max |d| / max |ref| over all windows, and the worst per-position ||d|| / ||ref||."""
    absd = max((a - b).abs().max().item() for a, b in zip(lg, ref))
    absr = max(b.abs().max().item() for b in ref)
    row = max(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item() for a, b in zip(lg, ref))
    return {"max_rel_logit_diff": absd / absr, "max_abs_logit_diff": absd, "max_row_rel_l2_diff": row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--work", required=True, help="folder for the exported files")
    ap.add_argument("--max-windows", type=int, default=0)
    ap.add_argument("--gguf-types", default="auto", help="comma list; '' for none")
    ap.add_argument("--skip-ct", action="store_true")
    ap.add_argument("--logit-windows", type=int, default=3, help="1024-token windows of the eval text whose logits are compared")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated after each prompt")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max relative logit difference allowed (exit 1 above)")
    ap.add_argument("--json-out", help="also write the JSON here")
    a = ap.parse_args()

    import compressed_tensors
    import gguf
    import transformers
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import leanq
    from leanq.checkpoint import load
    from leanq.data import EVAL_FILE, find_file, read_text, tokenize
    from leanq.evaluate import evaluate as run_eval
    from leanq.export.compressed_tensors import export_compressed_tensors
    from leanq.export.gguf import export_gguf
    from leanq.models import load_float

    torch.manual_seed(0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ours, tok, recipe = load(a.dir)
    text = read_text(find_file(None, EVAL_FILE, "--data"))
    all_ids = tokenize(tok, text)
    windows = [all_ids[i * 1024:(i + 1) * 1024] for i in range(a.logit_windows)]  # the core protocol's first windows
    prompts = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    ref_logits, ref_greedy = _logits_and_greedy(ours, windows, prompts, pad, a.new_tokens)
    res = {"dir": str(a.dir), "spec": recipe.default_spec.describe(), "method": recipe.method.name,
           "machine": f"CPU ({os.cpu_count()} cores); torch {torch.__version__}; transformers {transformers.__version__}; "
                      f"compressed-tensors {compressed_tensors.__version__}; gguf {getattr(gguf, '__version__', '?')}; "
                      f"leanq {leanq.__version__}; python {platform.python_version()}",
           "logit_positions": sum(len(w) for w in windows),
           "greedy_leanq": {p: tok.decode(g) for p, g in zip(PROMPTS, ref_greedy)}}
    if a.max_windows:
        r = run_eval(ours, tok, text, "leanq", None, 1024, a.max_windows, "cpu", False)
        res["ppl_leanq"] = r.ppl

    def compare(name, model, tokenizer=None):
        t0 = time.perf_counter()
        lg, gr = _logits_and_greedy(model, windows, prompts, pad, a.new_tokens)
        res[name] = _logit_diffs(lg, ref_logits)
        res[name].update({f"same_greedy_{a.new_tokens}": [g == r for g, r in zip(gr, ref_greedy)],
                          "same_argmax_share": torch.cat([x.argmax(-1) == y.argmax(-1) for x, y in zip(lg, ref_logits)])
                          .float().mean().item()})
        if gr != ref_greedy:
            res[name]["greedy"] = {p: tok.decode(g) for p, g in zip(PROMPTS, gr)}
        if tokenizer is not None:
            res[name]["same_token_ids"] = tokenizer(text[:20000]).input_ids == tok(text[:20000]).input_ids
        if a.max_windows:
            r = run_eval(model, tokenizer or tok, text, name, None, 1024, a.max_windows, "cpu", False)
            res[name]["ppl"] = r.ppl
            res[name]["ppl_rel_diff"] = r.ppl / res["ppl_leanq"] - 1
        res[name]["seconds"] = time.perf_counter() - t0

    if not a.skip_ct:
        out = work / "ct"
        t0 = time.perf_counter()
        export_compressed_tensors(a.dir, out, overwrite=True)
        kw = {} if recipe.default_spec.sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kw).eval()
        res["ct_export_and_load_seconds"] = time.perf_counter() - t0
        compare("compressed_tensors", hf)
        del hf
    for qt in filter(None, a.gguf_types.split(",")):  # --gguf-types "": compressed-tensors only
        f = work / f"model-{qt}.gguf"
        rep = export_gguf(a.dir, f, overwrite=True, qtype=qt)
        lf = load_float(str(f))
        key = f"gguf_{qt}"
        compare(key, lf.model, lf.tokenizer)
        res[key].update({k: rep[k] for k in ("qtypes", "rel_sq_err", "exact_share", "bitexact_share")}, bytes=f.stat().st_size)
        del lf
    ok = a.skip_ct or (res["compressed_tensors"]["max_rel_logit_diff"] <= a.tolerance
                       and all(res["compressed_tensors"][f"same_greedy_{a.new_tokens}"]))
    res["compressed_tensors_pass"] = None if a.skip_ct else ok
    out = json.dumps(res, indent=1)
    print(out)
    if a.json_out:
        Path(a.json_out).write_text(out + "\n", encoding="utf-8")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
