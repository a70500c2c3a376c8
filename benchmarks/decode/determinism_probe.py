"""Are repeated decodes bit-for-bit the same? leanq.runtime over a small Llama-2-7B-shaped model (random weights, BF16
and RTN 4-bit g128 on the CUDA kernels), in one process:

- the prompt twice (logits and caches), the LM head twice;
- ``--new-tokens`` fixed-shape steps run eagerly, twice from the same state (caches compared);
- ``generate(graph=True)`` three times (tokens and caches compared; where caches differ, the first layer and the
  positions that differ).

    PYTHONPATH=src python3 benchmarks/decode/determinism_probe.py --layers 4 --new-tokens 256
"""

from __future__ import annotations

import argparse
import sys

import torch


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _cache(lm) -> list:
    return [t.clone() for t in lm._kv[0] + lm._kv[1]]


def probe(quant: bool, layers: int, new: int, compile_step: bool) -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import bench_decode as bd

    from leanq import runtime
    from leanq.config import MethodConfig, QuantSpec
    from leanq.kernels import cuda_int as ci
    from leanq.pipeline import quantize_blocks

    model = bd.build(layers, "cuda")
    if quant:
        quantize_blocks(model, QuantSpec(bits=4, group_size=128, sym=False), MethodConfig(name="rtn", mse_clip=False),
                        None, device="cuda", progress=False)
        ci.release_stored_rk(model, fold=False)  # the lean runtime runs its own layers
    lm = runtime.from_transformers(model)
    if not compile_step:
        lm._step_fn = lm.step  # captured eagerly
    tag = f"{'int4' if quant else 'bf16'} new={new}"
    ids = list(range(100, 116))
    with torch.inference_mode():
        h = torch.randn(1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        print(tag, "head twice equal:", torch.equal(lm.head(h), lm.head(h)))
        res = []
        for _ in range(2):
            lm.reset(len(ids) + new)
            res.append((lm(torch.tensor(ids, device="cuda"), 0).clone(), _cache(lm)))
        print(tag, "prompt: logits equal", torch.equal(res[0][0], res[1][0]), "caches equal", _same(res[0][1], res[1][1]))
        outs = []
        for _ in range(2):
            lm.reset(len(ids) + new)
            lm(torch.tensor(ids, device="cuda"), 0)
            tok, pos = torch.tensor([7], device="cuda"), torch.tensor([len(ids)], device="cuda")
            for _ in range(new - 1):
                tok = lm.step(tok, pos)
                pos += 1
            outs.append(_cache(lm))
        print(tag, "eager steps: caches equal", _same(outs[0], outs[1]))
    runs = []
    for _ in range(3):
        toks = lm.generate(ids, new, stop_at_eos=False, graph=True)
        runs.append((toks, _cache(lm)))
    print(tag, "graph: tokens equal", runs[0][0] == runs[1][0] == runs[2][0], "caches equal",
          _same(runs[0][1], runs[1][1]) and _same(runs[1][1], runs[2][1]))
    for i, (a, b) in enumerate(zip(runs[1][1], runs[2][1])):
        if not torch.equal(a, b):
            d = (a.float() - b.float()).abs()
            print(tag, "first differing cache tensor", i, "positions", d.nonzero()[:, 1].unique()[:8].tolist(),
                  "max", float(d.max()))
            break


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="capture the step uncompiled (eager kernels in the graph)")
    a = ap.parse_args()
    for quant in (False, True):
        probe(quant, a.layers, a.new_tokens, a.compile)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
