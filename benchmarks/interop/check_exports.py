"""Export a leanq checkpoint to compressed-tensors and GGUF and check each with its client.

    python benchmarks/interop/check_exports.py DIR --work /tmp/interop [--max-windows 8] [--gguf-types Q4_1,Q8_0]

compressed-tensors: loaded by transformers + compressed-tensors on the CPU
(the dequantizing loader for asymmetric schemes, see leanq.export.compressed_tensors);
GGUF: loaded back through leanq's own GGUF import (transformers' GGUF reader).
Each is compared with leanq's module on the same token ids: max |Δlogit| / max |logit|
over the first 512 tokens of the evaluation text, the greedy continuation of a
prompt (32 tokens), and, with --max-windows > 0, perplexity on the core protocol's
first windows.  Prints one JSON object (machine and versions included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

PROMPT = "The history of the city begins in the"


def _logits_and_greedy(model, ids: torch.Tensor, prompt_ids: torch.Tensor, pad: int):
    with torch.no_grad():
        logits = model(ids).logits.float()
        greedy = model.generate(prompt_ids, max_new_tokens=32, do_sample=False, pad_token_id=pad)
    return logits, greedy[0, prompt_ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--work", required=True, help="folder for the exported files")
    ap.add_argument("--max-windows", type=int, default=0)
    ap.add_argument("--gguf-types", default="auto")
    ap.add_argument("--skip-ct", action="store_true")
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
    ids = tokenize(tok, text)[None, :512]
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    ref_logits, ref_greedy = _logits_and_greedy(ours, ids, prompt, pad)
    res = {"dir": str(a.dir), "spec": recipe.default_spec.describe(), "method": recipe.method.name,
           "machine": f"CPU ({os.cpu_count()} cores); torch {torch.__version__}; transformers {transformers.__version__}; "
                      f"compressed-tensors {compressed_tensors.__version__}; gguf {getattr(gguf, '__version__', '?')}; "
                      f"leanq {leanq.__version__}; python {platform.python_version()}",
           "greedy_leanq": tok.decode(ref_greedy)}
    if a.max_windows:
        r = run_eval(ours, tok, text, "leanq", None, 1024, a.max_windows, "cpu", False)
        res["ppl_leanq"] = r.ppl

    def compare(name, model, tokenizer=None):
        t0 = time.perf_counter()
        lg, gr = _logits_and_greedy(model, ids, prompt, pad)
        res[name] = {"max_rel_logit_diff": ((lg - ref_logits).abs().max() / ref_logits.abs().max()).item(),
                     "same_greedy_32": gr == ref_greedy,
                     "same_argmax_share": (lg.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()}
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
    for qt in a.gguf_types.split(","):
        f = work / f"model-{qt}.gguf"
        rep = export_gguf(a.dir, f, overwrite=True, qtype=qt)
        lf = load_float(str(f))
        key = f"gguf_{qt}"
        compare(key, lf.model, lf.tokenizer)
        res[key].update({k: rep[k] for k in ("qtypes", "rel_sq_err", "exact_share", "bitexact_share")}, bytes=f.stat().st_size)
        del lf
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
