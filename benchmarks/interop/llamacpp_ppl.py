"""Run leanq's GGUF exports in llama.cpp and compare perplexity with leanq's own evaluation.

    OMP_NUM_THREADS=1 python benchmarks/interop/llamacpp_ppl.py DIR[@Q8_0,Q4_0] [DIR ...] --work out/interop \
        [--qtypes Q4_0,Q8_0] [--max-windows 48] [--threads 1] [--json-out FILE]

(DIR@TYPES: the GGUF types for that checkpoint; plain DIR: --qtypes.)

For every leanq checkpoint DIR and every GGUF type: export DIR with
``leanq.export.gguf.export_gguf`` (its report says how many blocks were copied onto
GGUF's grid without requantizing), load the file in llama.cpp through
``llama-cpp-python`` (CPU, ``--threads`` threads) and score it on the core protocol.

The protocol is leanq's ``evaluate.perplexity`` exactly: wiki.test.raw read as one
string, tokenized by leanq's tokenizer without BOS, cut into consecutive 1024-token
windows (first ``--max-windows``); each window is decoded by llama.cpp from an empty
KV cache with logits for every position, and tokens 2..1024 are scored with the same
``cross_entropy`` leanq uses.  llama.cpp receives leanq's token ids, so the tokenizers
cannot differ (``llama-perplexity`` itself scores only the second half of each chunk
and adds a BOS: a different protocol).  leanq's number comes from the same ids through
leanq's module (``leanq eval DIR --max-windows 48`` gives the same value).

llama.cpp is not a leanq dependency: ``pip install llama-cpp-python==0.3.36`` (it builds
llama.cpp from source; see docs/results/interop.md).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed NLL of ids[1:] under logits[:-1] (float32 [n, vocab], int64 [n]): leanq's scoring."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()


def windowed_ppl(logits_fn, ids: torch.Tensor, window: int, max_windows: int | None) -> tuple[float, int, list[float]]:
    """(ppl, tokens scored, per-window NLL) of ``logits_fn(window ids int64 [window]) -> [window, vocab]``.

    Same windows as leanq.evaluate.perplexity: consecutive, non-overlapping, partial tail dropped.
    """
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    nll, count, per = 0.0, 0, []
    for i in range(n):
        x = ids[i * window : (i + 1) * window]
        w = window_nll(logits_fn(x), x)
        per.append(w)
        nll += w
        count += window - 1
    return math.exp(nll / count), count, per


class LlamaCppLogits:
    """Logits of llama.cpp (llama-cpp-python) for one window at a time, from an empty KV cache."""

    def __init__(self, gguf_path: str | Path, window: int, threads: int = 1):
        from llama_cpp import Llama

        # n_batch = n_ubatch = window: one decode call per window, logits kept for every position
        self.llm = Llama(str(gguf_path), n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                         n_threads_batch=threads, logits_all=True, verbose=False, seed=0)
        if self.llm.n_ctx() < window:
            raise RuntimeError(f"llama.cpp gave a context of {self.llm.n_ctx()} < {window}")

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.llm.reset()  # n_tokens = 0: eval() then drops the whole KV cache before decoding
        self.llm.eval(ids.tolist())
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def close(self) -> None:
        self.llm.close()


def versions() -> str:
    import gguf
    import llama_cpp
    import transformers

    import leanq

    return (f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores); llama-cpp-python "
            f"{llama_cpp.__version__}; torch {torch.__version__}; transformers {transformers.__version__}; "
            f"gguf {getattr(gguf, '__version__', '?')}; leanq {leanq.__version__}; python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="leanq checkpoint folders, each optionally DIR@Q8_0,Q4_0")
    ap.add_argument("--work", required=True, help="folder for the .gguf files")
    ap.add_argument("--qtypes", default="Q4_0,Q8_0")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--tolerance", type=float, default=0.01, help="allowed |ppl_llama.cpp / ppl_leanq - 1|")
    ap.add_argument("--json-out", help="also write the JSON here")
    a = ap.parse_args()

    import llama_cpp  # fail early, before minutes of leanq work, when llama.cpp is absent

    from leanq.checkpoint import load
    from leanq.data import EVAL_FILE, find_file, read_text, tokenize
    from leanq.export.gguf import export_gguf

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    text = read_text(find_file(None, EVAL_FILE, "--data"))
    res = {"machine": versions(), "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
           "protocol": f"wiki.test.raw, {a.window}-token windows, first {a.max_windows}, no BOS, leanq token ids",
           "threads": a.threads, "runs": []}
    ok = True
    for arg in a.dirs:
        d, _, qtypes = arg.partition("@")
        model, tok, recipe = load(d)
        ids = tokenize(tok, text)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref, count, ref_per = windowed_ppl(lambda x: model(x[None], use_cache=False).logits[0], ids, a.window,
                                               a.max_windows)
        base = {"dir": str(d), "spec": recipe.default_spec.describe(), "method": recipe.method.name,
                "ppl_leanq": ref, "tokens_scored": count, "leanq_seconds": time.perf_counter() - t0}
        del model
        for qt in (qtypes or a.qtypes).split(","):
            f = work / f"{Path(d).name}-{qt}.gguf"
            rep = export_gguf(d, f, overwrite=True, qtype=qt)
            t0 = time.perf_counter()
            lc = LlamaCppLogits(f, a.window, a.threads)
            ppl, n2, per = windowed_ppl(lc, ids, a.window, a.max_windows)
            lc.close()
            row = dict(base, qtype=qt, gguf=str(f), gguf_bytes=f.stat().st_size, ppl_llama_cpp=ppl,
                       rel_diff=ppl / ref - 1, within_tolerance=abs(ppl / ref - 1) <= a.tolerance,
                       max_window_nll_rel_diff=max(abs(p / r - 1) for p, r in zip(per, ref_per)),
                       llama_cpp_seconds=time.perf_counter() - t0,
                       gguf_exact_share=rep["exact_share"], gguf_bitexact_share=rep["bitexact_share"],
                       gguf_rel_sq_err=rep["rel_sq_err"], gguf_qtypes=rep["qtypes"])
            assert n2 == count
            ok &= row["within_tolerance"]
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
    res["all_within_tolerance"] = ok
    out = json.dumps(res, indent=1)
    print(out)
    if a.json_out:
        Path(a.json_out).write_text(out + "\n", encoding="utf-8")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
