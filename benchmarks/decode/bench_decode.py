"""End-to-end decode and GPTQ at 7B scale on one GPU, with random weights of Llama-2-7B's shapes.

decode: batch 1, a short random prompt, N new tokens (EOS disabled) through
transformers' ``generate`` with a static cache; on CUDA transformers then
compiles the forward with torch.compile (mode reduce-overhead: CUDA graphs).
The BF16 model and the same model quantized by leanq's RTN (4-bit g128) run
in the same harness and process.  Reports tokens/s (new tokens over the wall
time of generate, median of --reps, after a warm-up call that compiles),
weight memory and peak GPU memory during generate.  --compile-modes graph: the
same generate with leanq.hf_graph.enable (each decode step one CUDA graph of the
compiled forward, replayed; the host's per-step work of torch.compile's graph
trees off the path).

gptq: GPTQ 4-bit g128 of the same-shaped model (kept on the CPU, one block at
a time on the GPU) through leanq's sequential pipeline with
--nsamples x --seqlen random calibration tokens; wall time and peak GPU memory.

    PYTHONPATH=src python3 benchmarks/decode/bench_decode.py decode --out $OUT
    PYTHONPATH=src python3 benchmarks/decode/bench_decode.py decode --floor --out $OUT   # the harness's bound
    PYTHONPATH=src python3 benchmarks/decode/bench_decode.py decode --compile-modes all,graph --out $OUT
    PYTHONPATH=src python3 benchmarks/decode/bench_decode.py gptq --out $OUT
    PYTHONPATH=src python3 benchmarks/decode/bench_decode.py lean --out $OUT    # leanq.runtime, CUDA graph

lean: the same two models through leanq's own decoder (leanq.runtime.from_transformers over the same modules),
``generate(graph=True)``: the decode step compiled and captured as one CUDA graph, replayed once per token with
no host synchronisation between tokens. Not the issue's harness (that is transformers' generate); it shows what
the kernels give once the host's time per step is out of the way.
"""

from __future__ import annotations

import argparse
import json
import re
import os
import statistics
import sys
import time

import torch

from leanq.config import MethodConfig, QuantSpec
from leanq.pipeline import quantize_blocks


def llama7b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def build(layers: int, device: str, dtype=torch.bfloat16, seed: int = 0):
    """Random-weight Llama-2-7B-shaped model (transformers' own init: normal(0, 0.02)), built on the GPU."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama7b_config(layers))
    finally:
        torch.set_default_dtype(old)
    model.eval()
    return model.to(device)


def weight_bytes(model) -> int:
    """Bytes of the model's GPU parameters, buffers and cached kernel layouts, each storage once (a fused group's
    layers hold views of one storage)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() in seen or t.device.type != "cuda":
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    for m in model.modules():  # kernel layouts cached on quantized layers
        for layout, main in (("triton_int", "planes"), ("triton_kn", "words")):  # (cuda_int's are buffers)
            pk = getattr(m, "_cache", {}).get(layout)
            if pk is None:
                continue
            pk = pk[1]
            main_t = pk[main] if isinstance(pk[main], list) else [pk[main]]
            for t in main_t + [pk["scales"]] + ([] if pk["sym"] else [pk["zeros"]]):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


# Two more settings were tried on an H100 (2026-11-28) and dropped: inductor's plain CUDA graphs instead of graph
# trees, and dynamo's inline_inbuilt_nn_modules off. With either, the BF16 model's next generate hit a device-side
# index assert in an inductor kernel (benchmarks/kernels/NOTES.md, v10).
COMPILE_MODES = ("all", "lean", "graph", "graph-pdl", "graph-sync", "graph-pdl-sync", "graph-prefill",
                 "graph-pdl-prefill")


def compile_config(mode: str):
    """transformers' CompileConfig for generate, by host-overhead setting (both compile the same graphs):
    ``all``: transformers' default (mode reduce-overhead: CUDA graph trees, every dynamo guard);
    ``lean``: the same with dynamo's guards on nn.Module attributes skipped
    (torch.compiler.skip_guard_on_all_nn_modules_unsafe: a decode loop never swaps a layer's tensors);
    ``graph``: transformers' default config, the compiled call replaced by leanq.hf_graph's (the same compiled
    forward without graph trees, each decode step replayed from one CUDA graph; see time_generate);
    ``graph-pdl``: as graph, compiled and recorded with inductor's programmatic dependent launch
    (hf_graph.enable(model, pdl=True));
    ``graph-sync``, ``graph-pdl-sync``: as graph and graph-pdl with generate's stop check read every step, as
    transformers does on CUDA (hf_graph.enable(model, defer_stop=False); hf_graph defers it by default);
    ``graph-prefill``, ``graph-pdl-prefill``: as graph and graph-pdl with the prompt's forward compiled too
    (hf_graph.enable(model, prefill=True): transformers' chunked prefill in one chunk, dynamic shapes)."""
    from transformers import CompileConfig

    if mode == "all" or mode.startswith("graph"):
        return CompileConfig()
    # mode "reduce-overhead" is the option triton.cudagraphs; torch.compile takes a mode or options, not both
    return CompileConfig(mode=None, options={"triton.cudagraphs": True,
                                             "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})


def time_generate(model, prompt_len: int, new: int, reps: int, mode: str = "all", host_profile: bool = False) -> dict:
    from leanq import hf_graph

    if mode.startswith("graph"):
        hf_graph.enable(model, pdl=mode.startswith("graph-pdl"), defer_stop=not mode.endswith("-sync"),
                        prefill=mode.endswith("-prefill"))
    try:
        res = _time_generate(model, prompt_len, new, reps, mode, host_profile)
        call = hf_graph.graphed_call(model)
        if call is not None:
            res.update(graphs_recorded=call.captures, graph_replays=call.replays)
        return res
    finally:
        hf_graph.disable(model)


def _time_generate(model, prompt_len: int, new: int, reps: int, mode: str, host_profile: bool) -> dict:
    # the same prompt for every setting and model, so that their first tokens can be compared
    ids = torch.randint(100, 30000, (1, prompt_len), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
              pad_token_id=0, eos_token_id=None, compile_config=compile_config(mode))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)  # warm-up: compiles
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        assert out.shape[1] == prompt_len + new, out.shape
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    res = dict(compile_mode=mode, tokens_per_s=new / t, seconds=t, all_seconds=times, warmup_seconds=warm,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, tokens=out[0, prompt_len:prompt_len + 8].tolist())
    if host_profile:  # where the host's time per step goes (PyTorch profiler, CPU side; it slows every step)
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(ids, **kw)  # the timed length: the same compiled graphs, no re-recording
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:20]
        res["host_profile_us_per_step"] = {e.key[:60]: round(e.self_cpu_time_total / new, 1) for e in rows}
        gpu = sum(e.device_time_total for e in prof.events() if e.device_type.name == "CUDA")
        res["profiled_gpu_kernel_us_per_step"] = round(gpu / new, 1)  # prefill included
    return res


def install_tuned(path: str) -> dict:
    """Tile configs measured by benchmarks/kernels/bench_kernels.py (its JSON's "tuned"), if given."""
    from leanq.kernels import triton_fast as tf
    from leanq.kernels import triton_half2 as th

    if not path or not os.path.isfile(path):
        return {}
    tuned = json.load(open(path)).get("tuned", {})
    for key, cfg in tuned.items():
        kind, batch = key.split("@")
        if kind == "h2":
            th.TUNED_H2.update(cfg)
        elif kind.startswith("kn"):  # "kn4@1": triton_kn's batch-1 config for 4-bit layers
            from leanq.kernels import triton_kn as kn

            kn.TUNED_KN[int(kind[2:])] = cfg
        else:
            tf.TUNED[(kind, int(batch))] = cfg
    return tuned


class NullLinear(torch.nn.Module):
    """A linear layer that costs nothing: its output is a stored zero row broadcast (no kernel runs)."""

    def __init__(self, out_features: int, like: torch.Tensor):
        super().__init__()
        self.out_features = out_features
        self.register_buffer("zero", torch.zeros(out_features, dtype=like.dtype, device=like.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.zero.expand(*x.shape[:-1], self.out_features)


def null_linears(model) -> int:
    """Replace every nn.Linear inside the decoder layers by a NullLinear (the embedding, norms, attention,
    RoPE, residual adds and the LM head stay); returns how many were replaced."""
    n = 0
    for layer in model.model.layers:
        for name, m in list(layer.named_modules()):
            if isinstance(m, torch.nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], NullLinear(m.out_features, m.weight))
                n += 1
    return n


def cmd_decode(a) -> dict:
    from leanq.kernels import explain
    from leanq.kernels import triton_int as ti

    modes = a.compile_modes.split(",")
    bad = [g for g in modes if g not in COMPILE_MODES]
    if bad:
        raise SystemExit(f"--compile-modes: unknown {bad}; choose from {', '.join(COMPILE_MODES)}")
    res = {"tuned": install_tuned(a.tuned)}
    if a.inductor_gd is not None:
        from leanq.kernels import cuda_rt

        cuda_rt.INDUCTOR_GD = res["inductor_gd"] = a.inductor_gd
    model = build(a.layers, "cuda")
    for g in modes:
        key = "bf16" if g == modes[0] else f"bf16-{g}"
        res[key] = dict(weights_gib=weight_bytes(model) / 2**30,
                        **time_generate(model, a.prompt_len, a.new_tokens, a.reps, g, a.host_profile))
        print(key, json.dumps(res[key]), flush=True)
        torch._dynamo.reset()
    if a.floor:  # the same harness with every decoder-layer linear free: what any linear kernel could reach
        res["null_linears"] = dict(replaced=null_linears(model),
                                   **time_generate(model, a.prompt_len, a.new_tokens, a.reps, modes[0]))
        print("null_linears", json.dumps(res["null_linears"]), flush=True)
        res["speedup_bound"] = res["null_linears"]["tokens_per_s"] / res["bf16"]["tokens_per_s"]
        return res
    t0 = time.perf_counter()
    spec = QuantSpec(bits=a.bits, group_size=128, sym=False)
    quantize_blocks(model, spec, MethodConfig(name="rtn", mse_clip=False), None, device="cuda", progress=False)
    qsec = time.perf_counter() - t0
    if not a.release:
        freed = 0
    elif a.layout == "rk":  # batch 1 on the CUDA int GEMV, prefill dequantize + cuBLAS: one layout in memory
        from leanq.kernels import cuda_int as ci

        set_attn_variant(a.attn)
        freed = ci.release_stored_rk(model, fuse=a.fuse, fold=not a.unfolded, rope=not a.no_rope)
        res["folded"] = sum(hasattr(m, "leanq_o_proj") for m in model.modules())
        res["rope_folded"] = sum(hasattr(m, "leanq_heads") for m in model.modules())
    elif a.layout == "kn":  # batch 1 on the kn GEMV, prefill dequantize + cuBLAS: one layout in memory
        from leanq.kernels import triton_kn as kn

        freed = kn.release_stored_kn(model)
    else:
        freed = ti.release_stored(model)
    torch.cuda.empty_cache()
    kernels = sorted({k for _, k in explain(model, batch=1, device="cuda", **_dt())})
    for g in modes:
        key, bkey = (f"int{a.bits}", "bf16") if g == modes[0] else (f"int{a.bits}-{g}", f"bf16-{g}")
        res[key] = dict(layout=a.layout, fuse=bool(a.fuse), quantize_seconds=qsec, stored_bytes_released=freed,
                        kernels_batch1=kernels, weights_gib=weight_bytes(model) / 2**30,
                        **time_generate(model, a.prompt_len, a.new_tokens, a.reps, g, a.host_profile))
        print(key, json.dumps(res[key]), flush=True)
        torch._dynamo.reset()
        q = res[key]
        sfx = "" if g == modes[0] else f"_{g}"
        res["speedup" + sfx] = q["tokens_per_s"] / res[bkey]["tokens_per_s"]
        res["weight_memory_ratio" + sfx] = q["weights_gib"] / res[bkey]["weights_gib"]
        res["peak_memory_ratio" + sfx] = q["peak_gib"] / res[bkey]["peak_gib"]
    # the same model again with each prepared variant of the folded attention (set_attn_variant)
    for v in (x for x in a.attn_after.split(",") if x) if a.layout == "rk" and a.release else ():
        from leanq.kernels import decode_attention

        set_attn_variant(v)
        time_again(model, a, modes, res, v.replace("+", "-"), lambda r: r.update(attn_pdl=decode_attention.PDL))
    # the same model again, its norms and SiLU x up folded into the GEMVs (after --unfolded), or its attention's
    # rotary embedding and cache write (after --no-rope)
    if a.fold and (a.unfolded or a.no_rope) and a.layout == "rk" and a.release:
        from leanq.kernels import cuda_int as ci

        res["folds"] = ci.fold_decoder(model)
        res["second_pass"] = "fold" if a.unfolded else "rope"
        time_again(model, a, modes, res, "fold")
    return res


def time_again(model, a, modes: list, res: dict, tag: str, note=None) -> None:
    """The 4-bit model timed again in every mode after a change: res[int{bits}-{tag}[-mode]] (``note`` may add to
    it), its speedup and peak-memory ratio against BF16 in the same mode (speedup_{tag}[_mode], ...)."""
    for g in modes:
        key, bkey = (f"int{a.bits}-{tag}", "bf16") if g == modes[0] else (f"int{a.bits}-{tag}-{g}", f"bf16-{g}")
        res[key] = dict(weights_gib=weight_bytes(model) / 2**30,
                        **time_generate(model, a.prompt_len, a.new_tokens, a.reps, g, a.host_profile))
        if note is not None:
            note(res[key])
        print(key, json.dumps(res[key]), flush=True)
        torch._dynamo.reset()
        sfx = f"_{tag}" if g == modes[0] else f"_{tag}_{g}"
        res["speedup" + sfx] = res[key]["tokens_per_s"] / res[bkey]["tokens_per_s"]
        res["peak_memory_ratio" + sfx] = res[key]["peak_gib"] / res[bkey]["peak_gib"]


def set_attn_variant(v: str) -> None:
    """The folded attention's options, joined by '+': ``pdl`` its kernel launched early (decode_attention.PDL, off by
    default), ``trigger`` the o_proj GEMV after it let in early (decode_attention.TRIGGER, off), ``once`` the cache
    positions advanced in one op (cuda_int.ADVANCE_ONCE, the default since session 30), ``chunkN`` at least N cache
    positions a program (decode_attention.MIN_CHUNK); ``plain`` none of them; ``default`` leaves the library's
    settings as they are."""
    from leanq.kernels import cuda_int as ci
    from leanq.kernels import decode_attention

    if v == "default":  # the library's own settings
        return
    parts = set(v.split("+")) - {"plain"}
    chunks = [p for p in parts if re.fullmatch(r"chunk\d+", p)]
    if parts - {"pdl", "trigger", "once"} - set(chunks) or len(chunks) > 1:
        raise SystemExit(f"--attn: default, plain, or pdl, trigger, once, chunkN joined by '+', not {v!r}")
    decode_attention.PDL = "pdl" in parts
    decode_attention.TRIGGER = "trigger" in parts
    ci.ADVANCE_ONCE = "once" in parts
    decode_attention.MIN_CHUNK = int(chunks[0][5:]) if chunks else decode_attention.BLOCK_N


def time_lean(model, prompt_len: int, new: int, reps: int) -> dict:
    """leanq.runtime over ``model``'s modules, generate(graph=True): tokens/s (new tokens over the wall time of a
    generate, prompt included, median of ``reps`` after a warm-up that compiles and captures), peak GPU memory."""
    from leanq import runtime

    lm = runtime.from_transformers(model)
    ids = torch.randint(100, 30000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    toks = lm.generate(ids, new, stop_at_eos=False, graph=True)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    assert len(toks) == new, len(toks)
    torch.cuda.reset_peak_memory_stats()
    times, runs = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runs.append(lm.generate(ids, new, stop_at_eos=False, graph=True))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    # the warm-up runs its first step eagerly (on a side stream, which compiles) and captures the rest; the timed
    # runs replay the graph for every step
    first_diff = next((i for i, (u, v) in enumerate(zip(toks, runs[0])) if u != v), None)
    return dict(tokens_per_s=new / t, seconds=t, all_seconds=times, warmup_seconds=warm,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, tokens=toks[:8],
                replays_agree=all(r == runs[0] for r in runs), warmup_first_difference=first_diff)


def cmd_lean(a) -> dict:
    res = {}
    model = build(a.layers, "cuda")
    res["bf16"] = dict(weights_gib=weight_bytes(model) / 2**30, **time_lean(model, a.prompt_len, a.new_tokens, a.reps))
    print("bf16", json.dumps(res["bf16"]), flush=True)
    torch._dynamo.reset()
    spec = QuantSpec(bits=a.bits, group_size=128, sym=False)
    quantize_blocks(model, spec, MethodConfig(name="rtn", mse_clip=False), None, device="cuda", progress=False)
    from leanq.kernels import cuda_int as ci

    ci.release_stored_rk(model, fuse=a.fuse, fold=False)  # the lean runtime runs its own layers
    torch.cuda.empty_cache()
    key = f"int{a.bits}"
    res[key] = dict(fuse=bool(a.fuse), weights_gib=weight_bytes(model) / 2**30,
                    **time_lean(model, a.prompt_len, a.new_tokens, a.reps))
    print(key, json.dumps(res[key]), flush=True)
    res["speedup"] = res[key]["tokens_per_s"] / res["bf16"]["tokens_per_s"]
    res["peak_memory_ratio"] = res[key]["peak_gib"] / res["bf16"]["peak_gib"]
    return res


def _dt() -> dict:
    import inspect

    from leanq.kernels import explain

    return {"dtype": torch.bfloat16} if "dtype" in inspect.signature(explain).parameters else {}


def cmd_gptq(a) -> dict:
    model = build(a.layers, "cpu")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(100, 30000, (a.nsamples, a.seqlen), generator=g)
    spec = QuantSpec(bits=4, group_size=128, sym=False)
    t0 = time.perf_counter()
    quantize_blocks(model, spec, MethodConfig(name="gptq", nsamples=a.nsamples, seqlen=a.seqlen), calib,
                    device="cuda", batch_size=a.batch_size, progress=True)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return dict(seconds=secs, peak_gib=torch.cuda.max_memory_allocated() / 2**30, nsamples=a.nsamples,
                seqlen=a.seqlen, layers=a.layers, batch_size=a.batch_size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["decode", "gptq", "lean"])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-release", dest="release", action="store_false",
                    help="keep the stored-format buffers beside the kernel layout")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layout", choices=["rk", "kn", "nk"], default="rk",
                    help="rk: cuda_int (batch-1 CUDA GEMV, whole rows per warp); kn: triton_kn (batch-1 GEMV on "
                         "K-major words); nk: triton_int/fast/half2 row layout")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false",
                    help="rk: keep q/k/v and gate/up as separate GEMVs (by default each group shares one under "
                         "torch.compile: cuda_int.take_over)")
    ap.add_argument("--compile-modes", default="all",
                    help="generate's compile settings, comma-separated, each model timed under each in this run: "
                         "all (transformers' default), lean, graph, graph-pdl (see compile_config)")
    ap.add_argument("--host-profile", action="store_true",
                    help="also profile the host side of a 32-token generate per model and config (CPU time by op)")
    ap.add_argument("--tuned", default="", help="bench_kernels.json whose tuned tile configs to use")
    ap.add_argument("--unfolded", action="store_true",
                    help="decode: release the 4-bit model without folding its decoder layers' norms, SiLU x up and "
                         "residual adds into the GEMVs (release_stored_rk(fold=False))")
    ap.add_argument("--attn", default="default",
                    help="decode: the folded attention's variant (set_attn_variant): default (the library's), plain "
                         "(none of these), or joined by '+': pdl launches its kernel early, trigger lets o_proj's "
                         "GEMV start during it, once advances the cache positions in one op (part of the default), "
                         "chunkN gives each program at least N positions")
    ap.add_argument("--attn-after", default="", metavar="LIST",
                    help="decode: after the first settings, time every setting again with each of these variants "
                         "(comma-separated, e.g. pdl,once,chunk512,pdl+once), same process")
    ap.add_argument("--no-rope", action="store_true",
                    help="decode: fold the 4-bit model's decoder layers without their attention's rotary embedding "
                         "and cache write (release_stored_rk(rope=False)); with --fold, fold those after the first "
                         "settings and time every setting again in the same process")
    ap.add_argument("--fold", action="store_true",
                    help="decode, with --unfolded: after the 4-bit model's settings, fold them "
                         "(cuda_int.fold_decoder) and time every setting again in the same process")
    ap.add_argument("--inductor-gd", type=int, choices=(0, 2), default=None,
                    help="what the CUDA kernels' gd 1 becomes while TorchInductor's PDL mode is on "
                         "(cuda_rt.INDUCTOR_GD; default as there)")
    ap.add_argument("--floor", action="store_true",
                    help="decode: after BF16, time the same model with every decoder-layer linear replaced by a "
                         "free stand-in (the bound on any quantized model's speedup in this harness); no int4 run")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import transformers
    import triton

    meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, command=" ".join(sys.argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    res = dict(meta=meta, **{"decode": cmd_decode, "gptq": cmd_gptq, "lean": cmd_lean}[a.what](a))
    with open(os.path.join(a.out, f"bench_{a.what}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
