"""What a generate costs besides its decode steps, on a GPU: the 7B-shaped model of bench_decode.py in BF16, then
the same model at 4-bit (RTN g128, rk layout, fused), each under leanq.hf_graph (pdl on), in transformers' generate
with a static cache, 256 new tokens after a 16-token prompt.

Per model: the median wall time of 3 generates, then one generate timed in parts, with the GPU synchronised at
each boundary (so the parts add up to a little more than a plain generate):

- ``setup``: generate's entry to the prefill's start (configs, logits processors, the static cache);
- ``prefill``: the prompt's forward (transformers runs it uncompiled; ``--prefill``: compiled, dynamic shapes);
- ``first_step``: the first decode call (a new cache adopted into the recorded graph, the replay);
- ``steps``: the remaining decode steps, and their mean;
- ``tail``: the last step's end to generate's return.

``fixed = total - new_tokens x step`` is what the ratio of tokens/s carries besides the step times.

    PYTHONPATH=src python3 benchmarks/decode/fixed_cost_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def parts(model, ids, kw: dict, new: int) -> dict:
    """One generate, timed in parts (see the module's text)."""
    from leanq import hf_graph

    marks: dict[str, float] = {}
    cls_prefill = type(model)._prefill

    def prefill(*a, **k):
        marks["prefill0"] = _sync_time()
        out = cls_prefill(model, *a, **k)
        marks["prefill1"] = _sync_time()
        return out

    call = hf_graph.graphed_call(model)
    real_call = type(call).__call__
    count = [0]

    def counted(self, *a, **k):
        out = real_call(self, *a, **k)
        if hf_graph._tokens(k) == 1:  # a decode step (with --prefill the prompt comes here too)
            count[0] += 1
            if count[0] == 1:
                marks["first1"] = _sync_time()
        return out

    model._prefill = prefill
    type(call).__call__ = counted
    try:
        with torch.no_grad():
            t0 = _sync_time()
            model.generate(ids, **kw)
            marks["end"] = time.perf_counter()
            t1 = _sync_time()
    finally:
        type(call).__call__ = real_call
        del model._prefill
    steps = count[0] - 1
    last = marks["end"]
    return dict(setup_ms=(marks["prefill0"] - t0) * 1e3, prefill_ms=(marks["prefill1"] - marks["prefill0"]) * 1e3,
                first_step_ms=(marks["first1"] - marks["prefill1"]) * 1e3,
                steps=steps, steps_ms=(last - marks["first1"]) * 1e3,
                step_ms=(last - marks["first1"]) * 1e3 / max(steps, 1), tail_ms=(t1 - last) * 1e3,
                total_ms=(t1 - t0) * 1e3)


def probe(model, label: str, new: int, reps: int, prefill: bool = False) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_decode as bd

    from leanq import hf_graph

    hf_graph.enable(model, pdl=True, prefill=prefill)
    ids = torch.randint(100, 30000, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
              pad_token_id=0, eos_token_id=None, compile_config=bd.compile_config("graph-pdl"))
    with torch.no_grad():
        model.generate(ids, **kw)  # compiles, records
        times = []
        for _ in range(reps):
            t0 = _sync_time()
            model.generate(ids, **kw)
            times.append(_sync_time() - t0)
    res = dict(model=label, new_tokens=new, median_ms=statistics.median(times) * 1e3,
               all_ms=[t * 1e3 for t in times], **parts(model, ids, kw, new))
    res["fixed_ms"] = res["median_ms"] - (new - 1) * res["step_ms"]
    hf_graph.disable(model)
    torch._dynamo.reset()
    print(label, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill", action="store_true",
                    help="hf_graph.enable(model, prefill=True): the prompt's forward compiled too (dynamic shapes)")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_decode as bd

    from leanq.config import MethodConfig, QuantSpec
    from leanq.kernels import cuda_int as ci
    from leanq.pipeline import quantize_blocks

    model = bd.build(a.layers, "cuda")
    out = {"meta": dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                        command="benchmarks/decode/fixed_cost_probe.py " + " ".join(sys.argv[1:]),
                        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))}
    out["bf16"] = probe(model, "bf16", a.new_tokens, a.reps, a.prefill)
    quantize_blocks(model, QuantSpec(bits=4, group_size=128, sym=False), MethodConfig(name="rtn", mse_clip=False),
                    None, device="cuda", progress=False)
    ci.release_stored_rk(model)
    torch.cuda.empty_cache()
    out["int4"] = probe(model, "int4", a.new_tokens, a.reps, a.prefill)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fixed_cost.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
