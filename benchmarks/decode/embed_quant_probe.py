"""Probe: what quantizing SmolLM2's tied embedding (and so its LM head) costs in perplexity.

The float32 model with only the tied embedding matrix replaced by its round-to-nearest dequantized copy,
on the first --windows 1024-token windows of WikiText-2 test (leanq.evaluate.perplexity).  Prints one
line per setting.  CPU, about 1 minute per setting at 8 windows on 2 cores.

    LEANQ_DATA=../shared/data PYTHONPATH=src python benchmarks/decode/embed_quant_probe.py --windows 8
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--settings", default="8:128,4:128,4:64",
                    help="BITS:GROUP[:sym],...; GROUP 0 is one scale per row (8:0:sym is bench_cpu_decode's --embed-int8)")
    a = ap.parse_args()
    from leanq.config import QuantSpec
    from leanq.data import EVAL_FILE, find_file, read_text, tokenize
    from leanq.evaluate import perplexity
    from leanq.methods.rtn import rtn_codes
    from leanq.models import load_float

    lf = load_float(a.model)
    model, tok = lf.model.eval(), lf.tokenizer
    ids = tokenize(tok, read_text(find_file(None, EVAL_FILE, "--eval-text")))
    with torch.no_grad():
        p0, _ = perplexity(model, ids, max_windows=a.windows, progress=False)
        print(f"float32: ppl {p0:.3f}", flush=True)
        emb = model.get_input_embeddings().weight
        orig = emb.detach().clone()
        n = orig.shape[1]
        for item in a.settings.split(","):
            f = item.split(":")
            bits, g, sym = int(f[0]), int(f[1]), f[2:] == ["sym"]
            if sym and g == 0:  # one scale per row, max |w| / (2**(bits-1) - 1), no zero point
                qmax = 2 ** (bits - 1) - 1
                scale = (orig.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12)
                emb.copy_(torch.round(orig / scale).clamp(-qmax, qmax) * scale)
            else:
                gg = g or n
                codes, s, z = rtn_codes(orig, QuantSpec(bits=bits, group_size=gg, sym=sym))
                emb.copy_((codes - z.repeat_interleave(gg, 1)[:, :n]) * s.repeat_interleave(gg, 1)[:, :n])
            p, _ = perplexity(model, ids, max_windows=a.windows, progress=False)
            print(f"tied embedding + head at {item}: ppl {p:.3f} ({p / p0 - 1:+.2%})", flush=True)
            emb.copy_(orig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
