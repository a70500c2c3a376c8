"""The core quality table: SmolLM2-135M at 8/4/3/2 bits, RTN vs GPTQ, on the core protocol.

Protocol: WikiText-2 raw test, 1024-token windows, first 48 windows;
calibration 128 x 512 tokens from wiki.valid.tokens, seed 0; decoder-block
linears quantized, embeddings and head kept (float16 on disk).

    python benchmarks/quality/core_table.py --out out/core            # all rows
    python benchmarks/quality/core_table.py --rows gptq4 --out out/x  # some rows

Writes <out>/results.json (one object per row, with machine and versions) and
prints a markdown table.  Rows already in results.json are kept (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import leanq
from leanq.api import load_any, pick_device, quantize
from leanq.data import EVAL_FILE, find_file, read_text
from leanq.evaluate import evaluate as run_eval

ROWS = {
    "fp32": dict(method=None),
    "int8": dict(method="rtn", bits=8, group_size=None, sym=True),
    "rtn4": dict(method="rtn", bits=4, group_size=128),
    "gptq4": dict(method="gptq", bits=4, group_size=128),
    "rtn3": dict(method="rtn", bits=3, group_size=128),
    "gptq3": dict(method="gptq", bits=3, group_size=128),
    "rtn2": dict(method="rtn", bits=2, group_size=64),
    "gptq2": dict(method="gptq", bits=2, group_size=64),
    # GPTQ as before true-sequential calibration became the default (two forward passes per block)
    "gptq4tp": dict(method="gptq", bits=4, group_size=128, true_sequential=False),
    "gptq3tp": dict(method="gptq", bits=3, group_size=128, true_sequential=False),
    "gptq2tp": dict(method="gptq", bits=2, group_size=64, true_sequential=False),
    # issue 3: PTQ breadth
    "awq4": dict(method="awq", bits=4, group_size=128),
    "awq3": dict(method="awq", bits=3, group_size=128),
    "awq2": dict(method="awq", bits=2, group_size=64),
    "awqgptq4": dict(method="awq+gptq", bits=4, group_size=128),
    "awqgptq3": dict(method="awq+gptq", bits=3, group_size=128),
    "awqgptq2": dict(method="awq+gptq", bits=2, group_size=64),
    "hqq4": dict(method="hqq", bits=4, group_size=128),
    "hqq3": dict(method="hqq", bits=3, group_size=128),
    "hqq2": dict(method="hqq", bits=2, group_size=64),
    "nf4": dict(method="nf4", bits=4, group_size="auto"),
    "fp8": dict(method="fp8", bits=8, group_size="auto"),
    "w8a8": dict(method="w8a8", bits=8, group_size="auto", smooth=0.0),
    "w8a8s": dict(method="w8a8", bits=8, group_size="auto", smooth=0.5),
}


def machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    import transformers

    return f"{dev}; torch {torch.__version__}; transformers {transformers.__version__}; leanq {leanq.__version__}; {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-windows", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tag", default="", help="suffix for row names (variants)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    dev = pick_device(a.device)
    text = read_text(find_file(None, EVAL_FILE, "--data"))
    for row in a.rows.split(","):
        name = row + a.tag
        if name in results:
            continue
        kw = ROWS[row]
        t0 = time.perf_counter()
        if kw["method"] is None:
            model, tok, path = load_any(a.model, dev)
            qsecs, ckpt = 0.0, path
            cmd = f"leanq eval {a.model} --max-windows {a.max_windows}"
        else:
            qm = quantize(a.model, **kw, device=dev, progress=False)
            ckpt = qm.save(out / name, overwrite=True)
            model, tok, qsecs = qm.model.to(dev), qm.tokenizer, qm.seconds
            g = "none" if kw["group_size"] is None else kw["group_size"]
            extra = (" --sym" if kw.get("sym") else "") + (" --two-pass" if kw.get("true_sequential") is False else "")
            extra += f" --smooth {kw['smooth']}" if "smooth" in kw else ""
            cmd = (f"leanq quantize {a.model} --method {kw['method']} --bits {kw['bits']} --group-size {g}"
                   f"{extra} --out {name}; "
                   f"leanq eval {name} --max-windows {a.max_windows}")
        r = run_eval(model, tok, text, name, ckpt, 1024, a.max_windows, dev, progress=False)
        results[name] = {**r.to_dict(), "quant_seconds": qsecs, "command": cmd, "machine": machine(),
                         "wall_seconds": time.perf_counter() - t0}
        print(f"{name}: ppl {r.ppl:.3f}  bpw {r.bits_per_weight:.3f}  quant {qsecs:.1f}s", flush=True)
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(res_path)
        del model
    print(markdown(results))


def markdown(results: dict) -> str:
    base = results.get("fp32", {}).get("ppl")
    lines = ["| row | bits per weight (linears) | size on disk | ppl | ratio to FP32 | quantization time |",
             "|---|---|---|---|---|---|"]
    order = {k: i for i, k in enumerate(ROWS)}
    for name, r in sorted(results.items(), key=lambda kv: order.get(kv[0], 99)):
        ratio = f"{r['ppl'] / base:.3f}" if base else "-"
        lines.append(f"| {name} | {r['bits_per_weight']:.3f} | {r['bytes_on_disk'] / 1e6:.1f} MB | {r['ppl']:.2f} | "
                     f"{ratio} | {r['quant_seconds']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
