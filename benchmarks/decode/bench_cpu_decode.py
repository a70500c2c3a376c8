"""CPU decode: SmolLM2-135M at FP32 vs leanq 4-bit (RTN g128) - tokens/s and memory, same prompt and length.

Each model runs in its own child process (so one's memory cannot hide in the other's numbers), with
the same thread count, prompt, greedy decoding and number of new tokens (EOS disabled).

    OMP_NUM_THREADS=2 python benchmarks/decode/bench_cpu_decode.py --out results.json
    OMP_NUM_THREADS=2 python benchmarks/decode/bench_cpu_decode.py --without-triton --out results.json
    OMP_NUM_THREADS=2 python benchmarks/decode/bench_cpu_decode.py --without-triton --runtime lean --out results.json

``--runtime lean`` runs both children through :mod:`leanq.runtime` (no transformers imported; the FP32 child reads
a float folder written once from --model); the default runs transformers' ``generate``.

The 4-bit checkpoint is made once (``leanq.quantize``, method rtn, 4-bit g128, asym; embeddings and
head kept) and cached at --ckpt.  The 4-bit layers run through the dispatch table (``cpu-int4pack``:
PyTorch's packed int4 CPU matmul, repacked once at load; ``--kernel reference`` pins the pure-torch
reference instead) with the stored-format buffers released after repacking.

Memory, per child: ``weights_mb`` (bytes of every parameter, buffer and kernel-layout cache),
``rss_base_mb`` (after imports, transformers' Llama modeling included, before loading), ``rss_loaded_mb`` (after loading and freeing the load's
temporaries), ``peak_rss_decode_mb`` (VmHWM reset right before decoding, read after it).  tokens/s =
new tokens / wall time of ``generate`` (prefill included), median of --reps after one warm-up call.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
          "combined several known techniques into a practical system for")


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _trim() -> None:
    gc.collect()
    try:  # give freed heap pages back to the OS, so RSS shows what the model holds
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _weights_bytes(model) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        hit = getattr(m, "_cache", {}).get("cpu-int4")
        if hit is not None:
            tensors += [hit[1]["packed"], hit[1]["sz"]]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if t.numel() == 0 or key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def int8_embedding_probe(model) -> None:
    """A probe, not a leanq format: the tied embedding / LM head as int8 codes with one float scale per row,
    swapped in after loading (the checkpoint keeps its float16 embedding). Looked up rows are dequantized; the
    head runs PyTorch's packed int8 CPU matmul with bf16 activations. Measures what quantizing that matrix would
    give acceptance 5's memory and speed."""
    import torch

    emb = model.get_input_embeddings()
    w = emb.weight.data.float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    del w

    class Int8Rows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("scale_bf16", scale.bfloat16())

        def forward(self, ids):  # the embedding
            return self.codes[ids].float() * self.scale[ids].unsqueeze(-1)

        def head(self, h):
            y = torch._weight_int8pack_mm(h.reshape(-1, h.shape[-1]).bfloat16(), self.codes, self.scale_bf16)
            return y.float().reshape(*h.shape[:-1], -1)

    class Head(torch.nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.rows = [rows]  # not a submodule: its buffers count once

        def forward(self, h):
            return self.rows[0].head(h)

    rows = Int8Rows()
    model.set_input_embeddings(rows)
    model.lm_head = Head(rows)
    model.config.tie_word_embeddings = False


def _timed(generate, reps: int, new_tokens: int) -> tuple[list[float], object]:
    """A 4-token warm-up (repacks, allocator), then ``reps`` timed calls of ``generate(new_tokens)`` with the peak RSS
    reset before them: (seconds of each call, the last call's output)."""
    generate(4)
    _trim()
    _reset_peak()
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = generate(new_tokens)
        times.append(time.perf_counter() - t0)
    return times, out


def _result(a, model, kernels, prompt_tokens: int, times, load_s, base, loaded, text: str, **extra) -> dict:
    import torch

    t = statistics.median(times)
    return dict(which=a.child, **extra, kernels=kernels, threads=torch.get_num_threads(), prompt_tokens=prompt_tokens,
                new_tokens=a.new_tokens, tokens_per_s=a.new_tokens / t, seconds=t, all_seconds=times,
                load_seconds=load_s, weights_mb=_weights_bytes(model) / 2**20, rss_base_mb=base,
                rss_loaded_mb=loaded, peak_rss_decode_mb=_rss_mb("VmHWM"), text=text[:120])


def child_lean(a) -> dict:
    """The same measurement through leanq.runtime (no transformers in the process): the FP32 child reads the float
    folder, the 4-bit child the checkpoint."""
    sys.modules["transformers"] = None  # proves the runtime never needs it
    if a.without_triton:
        sys.modules["triton"] = None
    if a.kernel == "reference":
        os.environ["LEANQ_KERNELS"] = "reference"
    import torch

    torch.set_num_threads(a.threads)
    from leanq import runtime
    from leanq.kernels import explain

    _trim()
    base = _rss_mb()
    t0 = time.perf_counter()
    model, tok = runtime.load(a.float_folder if a.child == "fp32" else a.ckpt, release=a.kernel != "reference")
    kernels = sorted({k for _, k in explain(model, batch=1, device="cpu")})
    load_s = time.perf_counter() - t0
    _trim()
    loaded = _rss_mb()
    ids = tok.encode(PROMPT).ids
    times, out = _timed(lambda n: model.generate(ids, n, stop_at_eos=False), a.reps, a.new_tokens)
    assert len(out) == a.new_tokens, len(out)
    return _result(a, model, kernels, len(ids), times, load_s, base, loaded, tok.decode(out), runtime="lean",
                   transformers_loaded=sys.modules.get("transformers") is not None)


def child(a) -> dict:
    if a.runtime == "lean":
        return child_lean(a)
    if a.without_triton:  # as an install without the test extra: `import triton` fails, as it does there
        sys.modules["triton"] = None
    import torch

    torch.set_num_threads(a.threads)
    from leanq import api
    from leanq.kernels import explain

    # the model's code too, before the base: importing transformers' Llama modeling adds ~115 MB of RSS to either
    # process, which is not the model's memory (measured 2026-11-28, session 10)
    import transformers.models.llama.modeling_llama  # noqa: F401

    _trim()
    base = _rss_mb()
    t0 = time.perf_counter()
    if a.child == "fp32":
        from leanq.models import load_float

        lf = load_float(a.model)
        model, tok = lf.model.eval(), lf.tokenizer  # load_float gives float32 already
        kernels = []
    else:
        if a.kernel == "reference":
            os.environ["LEANQ_KERNELS"] = "reference"
        model, tok, _ = api.load(a.ckpt)
        model.eval()
        if a.kernel != "reference":
            from leanq.kernels import cpu_int4

            cpu_int4.release_stored(model)
        kernels = sorted({k for _, k in explain(model, batch=1, device="cpu")})
        if a.embed_int8:
            int8_embedding_probe(model)
    load_s = time.perf_counter() - t0
    _trim()
    loaded = _rss_mb()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0

    def gen(n):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=pad)
    times, out = _timed(gen, a.reps, a.new_tokens)
    assert out.shape[1] == ids.shape[1] + a.new_tokens, out.shape
    return _result(a, model, kernels, ids.shape[1], times, load_s, base, loaded, tok.decode(out[0, ids.shape[1]:]))


def ensure_ckpt(a) -> None:
    if a.runtime == "lean" and not (Path(a.float_folder) / "model.safetensors").is_file():
        code = (f"from pathlib import Path; from leanq.models import save_float_folder; "
                f"save_float_folder({a.model!r}, Path({a.float_folder!r}))")
        subprocess.run([sys.executable, "-c", code], check=True)
    if (Path(a.ckpt) / "leanq.json").is_file():
        return
    code = (f"from leanq import api; q = api.quantize({a.model!r}, method='rtn', bits=4, group_size=128, "
            f"device='cpu', progress=False); q.save({a.ckpt!r}, overwrite=True)")
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ckpt", default="/tmp/leanq-smollm2-rtn4-g128")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--kernel", choices=["auto", "reference"], default="auto")
    ap.add_argument("--which", default="fp32,int4")
    ap.add_argument("--out", default="")
    ap.add_argument("--without-triton", action="store_true",
                    help="children run as if Triton were not installed (leanq needs it only on GPUs; the test "
                         "extra installs it for the interpreter tests). Otherwise transformers' import of "
                         "torch._dynamo loads libtriton (~64 MB resident) into both processes")
    ap.add_argument("--embed-int8", action="store_true",
                    help="probe: in the 4-bit child, swap the tied embedding / LM head for int8 rows after loading "
                         "(int8_embedding_probe; not a checkpoint format)")
    ap.add_argument("--runtime", choices=["hf", "lean"], default="hf",
                    help="hf: transformers' generate (the default); lean: leanq.runtime, no transformers in the "
                         "children (the FP32 child reads --float-folder, written once from --model)")
    ap.add_argument("--float-folder", default="/tmp/leanq-smollm2-f32")
    ap.add_argument("--child", choices=["fp32", "int4"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return 0
    import torch

    ensure_ckpt(a)
    load1 = os.getloadavg()[0]
    res = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", torch=torch.__version__, embed_int8=a.embed_int8,
               runtime=a.runtime,
               python=platform.python_version(), command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), runs={})
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    for which in a.which.split(","):
        cmd = [sys.executable, __file__, "--child", which, "--model", a.model, "--ckpt", a.ckpt, "--new-tokens",
               str(a.new_tokens), "--reps", str(a.reps), "--threads", str(a.threads), "--kernel", a.kernel,
               "--runtime", a.runtime, "--float-folder", a.float_folder]
        cmd += ["--without-triton"] if a.without_triton else []
        cmd += ["--embed-int8"] if a.embed_int8 and which == "int4" else []
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        res["runs"][which] = json.loads(r.stdout.strip().splitlines()[-1])
        print(which, json.dumps(res["runs"][which]), flush=True)
    res["loadavg_1min"] = [load1, os.getloadavg()[0]]
    if "fp32" in res["runs"] and "int4" in res["runs"]:
        f, q = res["runs"]["fp32"], res["runs"]["int4"]
        res["speedup"] = q["tokens_per_s"] / f["tokens_per_s"]
        res["weights_ratio"] = q["weights_mb"] / f["weights_mb"]
        res["peak_rss_ratio"] = q["peak_rss_decode_mb"] / f["peak_rss_decode_mb"]
        res["model_rss_ratio"] = (q["peak_rss_decode_mb"] - q["rss_base_mb"]) / (f["peak_rss_decode_mb"] - f["rss_base_mb"])
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
