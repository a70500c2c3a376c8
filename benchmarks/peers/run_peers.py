"""Peer comparison: SmolLM2-135M quantized by the libraries people use, scored by leanq's perplexity.

One command (after benchmarks/peers/setup.sh):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 LEANQ_DATA=/work/shared/data \
        benchmarks/peers/.venv/bin/python benchmarks/peers/run_peers.py

* Every peer starts from the same float weights: leanq's built-in ``smollm2-135m`` (GGUF
  dequantized to float32), saved once as a Hugging Face folder under out/peers/cache.
* Calibration (GPTQ, AWQ): leanq.data.calibration_ids, 128 x 512 tokens of wiki.valid.tokens, seed 0.
* Scoring: fake-quant. Each library's dequantized weights (its own dequantize) go back into the
  same float model, which leanq.evaluate.perplexity scores on the core protocol (wiki.test.raw,
  1024-token windows, first 48) -- the call ``leanq eval`` makes.
* bpw: see bpw.py (codes + scales + zeros of the decoder-block linears).
* leanq's own rows (LEANQ_ROWS) are not run here: the table reads them from the result files leanq's
  benchmark scripts recorded (benchmarks/quality/results/*.json, same protocol), and a verdict per setting
  is computed from all rows (compare.py).
* Incremental: each finished row is written to out/peers/peers.json at once; rows already there
  are skipped (``--redo KEY`` or ``--retry-errors`` to run again). ``--table-only`` rewrites the
  markdown from the cache without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from bpw import bits_per_weight, markdown_table  # noqa: E402
from compare import load_leanq_rows, verdict, verdict_text  # noqa: E402

CACHE = REPO / "out/peers"
MODEL_DIR = CACHE / "cache/smollm2-135m-fp32"
JSON = CACHE / "peers.json"
DOC = REPO / "docs/results/peers.md"
WINDOWS, WINDOW = 48, 1024
SMOKE_LAYERS = None  # --smoke: keep only this many decoder blocks (a fast check that each row's code runs)
NSAMPLES, SEQLEN, SEED = 128, 512, 0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMMAND = ("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 LEANQ_DATA=/work/shared/data "
           "benchmarks/peers/.venv/bin/python benchmarks/peers/run_peers.py")

# (key, setting, library, method label, kind, arg). Order here = run order (priority first).
ROWS = [
    ("hqq-4", "4-bit", "hqq", "HQQ 4-bit g128", "layer", "hqq-4-g128"),
    ("torchao-int4", "4-bit", "torchao", "int4 weight-only (tinygemm scheme)", "layer", "torchao-int4-g128"),
    ("bnb-nf4", "4-bit", "bitsandbytes", "NF4, block 64", "layer", "bnb-nf4-b64"),
    ("torchao-int8", "8-bit", "torchao", "int8 weight-only (per row)", "layer", "torchao-int8"),
    ("llmc-gptq-4", "4-bit", "llm-compressor", "GPTQ W4 asym", "llmc", ("gptq", 4, 128)),
    ("llmc-gptq-3", "3-bit", "llm-compressor", "GPTQ W3 asym", "llmc", ("gptq", 3, 128)),
    ("hqq-3", "3-bit", "hqq", "HQQ 3-bit g128", "layer", "hqq-3-g128"),
    ("llmc-gptq-2", "2-bit", "llm-compressor", "GPTQ W2 asym", "llmc", ("gptq", 2, 64)),
    ("hqq-2", "2-bit", "hqq", "HQQ 2-bit g64", "layer", "hqq-2-g64"),
    ("quanto-int8", "8-bit", "optimum-quanto", "qint8 (per row)", "layer", "quanto-int8"),
    ("quanto-int4", "4-bit", "optimum-quanto", "qint4 (library group 128)", "layer", "quanto-int4"),
    ("fp32", "FP32", "-", "float32 weights (baseline)", "fp32", None),
    ("llmc-awq-4", "4-bit", "llm-compressor", "AWQ W4 asym", "llmc", ("awq", 4, 128)),
    ("quanto-int2", "2-bit", "optimum-quanto", "qint2 (library group 128)", "layer", "quanto-int2"),
    ("quanto-int3", "3-bit", "optimum-quanto", "qint3", "absent",
     "optimum-quanto has no 3-bit integer type (its weight qtypes: qint2, qint4, qint8, qfloat8)"),
]
SETTING_ORDER = ["FP32", "8-bit", "4-bit", "3-bit", "2-bit"]
VERDICT_SETTINGS = ["4-bit", "3-bit", "2-bit", "8-bit"]  # issue 3's bar is on 4, 3 and 2 bits

# leanq's own rows, read at table time from the files leanq's benchmark scripts recorded (same core
# protocol; GPU rows need a GPU, so this command does not re-run them). Every number comes from the
# named file's row; "flags": quantize flags the recorded command string leaves out ("why" says why).
_R = "benchmarks/quality/results/"
_TWO_PASS = dict(flags="--two-pass", why="recorded before one-pass calibration became the default; "
                 "this row was calibrated two-pass")
LEANQ_ROWS = [
    dict(key="leanq-fp32", setting="FP32", method="float32 weights (reference)", groups="-",
         source=_R + "core-cpu-2026-11-27.json", row="fp32"),
    dict(key="leanq-int8", setting="8-bit", method="INT8 RTN sym (per row)", groups="per row",
         source=_R + "core-cpu-2026-11-27.json", row="int8"),
    dict(key="leanq-fp8", setting="8-bit", method="FP8 E4M3 weight-only (per-row scale)", groups="per row",
         source=_R + "core-h200-2026-11-27-session2.json", row="fp8"),
    dict(key="leanq-awqgptq4", setting="4-bit", method="AWQ+GPTQ 4-bit", groups="g128",
         source=_R + "core-h200-2026-11-27-session2.json", row="awqgptq4"),
    dict(key="leanq-gptq4", setting="4-bit", method="GPTQ 4-bit", groups="g128",
         source=_R + "core-cpu-2026-11-27.json", row="gptq4", **_TWO_PASS),
    dict(key="leanq-awq4", setting="4-bit", method="AWQ 4-bit", groups="g128",
         source=_R + "core-h200-2026-11-27-session2.json", row="awq4"),
    dict(key="leanq-nf4", setting="4-bit", method="NF4 (absmax)", groups="block 64",
         source=_R + "core-h200-2026-11-27-session2.json", row="nf4"),
    dict(key="leanq-rtn4", setting="4-bit", method="RTN 4-bit", groups="g128",
         source=_R + "core-cpu-2026-11-27.json", row="rtn4"),
    dict(key="leanq-hqq4", setting="4-bit", method="HQQ 4-bit", groups="g128",
         source=_R + "core-h200-2026-11-27-session2.json", row="hqq4"),
    dict(key="leanq-qat3", setting="3-bit", method="QAT 3-bit (from GPTQ, 150 steps)", groups="g128",
         source=_R + "learned-h100-2026-11-27-session3.json", row="qat3"),
    dict(key="leanq-learned3", setting="3-bit", method="learned PTQ 3-bit (from GPTQ)", groups="g128",
         source=_R + "learned-h200-2026-11-27.json", row="learned3"),
    dict(key="leanq-gptq3", setting="3-bit", method="GPTQ 3-bit", groups="g128",
         source=_R + "core-cpu-2026-11-27.json", row="gptq3", **_TWO_PASS),
    dict(key="leanq-awqgptq3", setting="3-bit", method="AWQ+GPTQ 3-bit", groups="g128",
         source=_R + "core-h100-2026-11-27-session3.json", row="awqgptq3"),
    dict(key="leanq-awq3", setting="3-bit", method="AWQ 3-bit", groups="g128",
         source=_R + "core-h100-2026-11-27-session3.json", row="awq3"),
    dict(key="leanq-rtn3", setting="3-bit", method="RTN 3-bit", groups="g128",
         source=_R + "core-cpu-2026-11-27.json", row="rtn3"),
    dict(key="leanq-hqq3", setting="3-bit", method="HQQ 3-bit", groups="g128",
         source=_R + "core-h100-2026-11-27-session3.json", row="hqq3"),
    dict(key="leanq-qat2", setting="2-bit", method="QAT 2-bit (from GPTQ, 250 steps)", groups="g64",
         source=_R + "learned-h200-2026-11-27.json", row="qat2"),
    dict(key="leanq-learned2", setting="2-bit", method="learned PTQ 2-bit (from GPTQ)", groups="g64",
         source=_R + "learned-h200-2026-11-27.json", row="learned2"),
    dict(key="leanq-gptq2", setting="2-bit", method="GPTQ 2-bit", groups="g64",
         source=_R + "core-cpu-2026-11-27.json", row="gptq2", **_TWO_PASS),
    dict(key="leanq-awqgptq2", setting="2-bit", method="AWQ+GPTQ 2-bit", groups="g64",
         source=_R + "core-h100-2026-11-27-session3.json", row="awqgptq2"),
    dict(key="leanq-awq2", setting="2-bit", method="AWQ 2-bit", groups="g64",
         source=_R + "core-h100-2026-11-27-session3.json", row="awq2"),
    dict(key="leanq-hqq2", setting="2-bit", method="HQQ 2-bit", groups="g64",
         source=_R + "core-h100-2026-11-27-session3.json", row="hqq2"),
]


# ---- shared inputs ---------------------------------------------------------------------------

def ensure_model_dir() -> None:
    """Save leanq's float SmolLM2-135M once as an HF folder (so every peer starts from identical weights)."""
    from leanq.models import save_float_folder

    save_float_folder("smollm2-135m", MODEL_DIR)


def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32, use_safetensors=True,
                                             local_files_only=True)
    if SMOKE_LAYERS:
        m.model.layers = m.model.layers[:SMOKE_LAYERS]
        m.config.num_hidden_layers = SMOKE_LAYERS
        if getattr(m.config, "layer_types", None):
            m.config.layer_types = m.config.layer_types[:SMOKE_LAYERS]
    return m.eval()


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)


def eval_ids(tok):
    from leanq.data import EVAL_FILE, find_file, read_text, tokenize

    return tokenize(tok, read_text(find_file(None, EVAL_FILE, "--data")))


def calib_ids(tok):
    from leanq.data import CALIB_FILE, calibration_ids, find_file

    return calibration_ids(tok, find_file(None, CALIB_FILE, "--calib"), NSAMPLES, SEQLEN, SEED)


def target_linears(model):
    """(name, nn.Linear) of the decoder-block linears, in model order."""
    import torch

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS and ".layers." in n]


# ---- the row kinds ---------------------------------------------------------------------------

def run_layer_peer(name: str):
    """Quantize each target linear with a per-layer peer function; returns (model, bpw, groups, (wall s, cpu s))."""
    import torch

    from quantizers import LAYER_PEERS

    fn = LAYER_PEERS[name]
    model = load_model()
    layers, groups = [], set()
    # one throw-away call first: quanto builds/loads its C++ extension (minutes) on first use, and
    # that is installation, not quantization time
    fn(torch.randn(192, 576) * 0.02)
    t0 = _clock()
    with torch.no_grad():
        for _, lin in target_linears(model):
            r = fn(lin.weight.data.float())
            if r.deq.shape != lin.weight.shape or not torch.isfinite(r.deq).all():
                raise RuntimeError(f"{name}: bad dequantized weight {tuple(r.deq.shape)}")
            lin.weight.data.copy_(r.deq)
            layers.append((lin.weight.numel(), r.bits))
            groups.add(r.group)
    secs = _since(t0)
    return model, bits_per_weight(layers), _groups_text(groups), secs


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall s, process CPU s) since ``t0``. This machine is shared and other jobs are paused and
    resumed around ours, so wall time is noise; with one thread, CPU time is the quiet-machine time."""
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def _groups_text(groups: set) -> str:
    gs = sorted(g for g in groups if g is not None)
    if not gs:
        return "per row"
    return "/".join(f"g{g}" for g in gs)


def _llmc_scheme(bits: int, group: int, symmetric: bool = False):
    """config_groups: compressed-tensors needs whole groups per row, so the 576-wide inputs
    (q/k/v/o/gate/up) get g64 when ``group`` is 128; down_proj (1536-wide) keeps ``group``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from bpw import pick_group

    def args(g):
        return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=g)

    g576 = pick_group(576, group)
    if g576 == group:
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args(group))}, f"g{group}"
    return ({"group_0": QuantizationScheme(targets=["re:.*down_proj$"], weights=args(group)),
             "group_1": QuantizationScheme(targets=["re:.*(q|k|v|o|gate|up)_proj$"], weights=args(g576))},
            f"g{group} down_proj, g{g576} 576-wide")


def run_llmc(method: str, bits: int, group: int):
    """llm-compressor oneshot (GPTQ or AWQ) on the float model with leanq's calibration windows; the
    resulting weights (fake-quantized by the library, AWQ's scales folded into norms/linears) are
    copied into a fresh float model for scoring."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    tok = load_tokenizer()
    ids = calib_ids(tok)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    groups, gtext = _llmc_scheme(bits, group)
    if not torch.cuda.is_available():
        # AWQ pins its cached activations for faster host-to-GPU copies; pinning needs an accelerator and
        # raises on a CPU-only machine ("Cannot access accelerator device"), so skip it (no effect on values)
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups=groups, ignore=["lm_head"])
    model = load_model()
    t0 = _clock()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=NSAMPLES, max_seq_length=SEQLEN,
            shuffle_calibration_samples=False, processor=tok)
    secs = _since(t0)
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    layers, maxdiff = [], 0.0
    fresh = load_model()
    qsd = model.state_dict()
    with torch.no_grad():
        for name, lin in target_linears(model):
            args = lin.quantization_scheme.weights
            scale, zp = lin.weight_scale, getattr(lin, "weight_zero_point", None)
            gidx = getattr(lin, "weight_g_idx", None)
            w = lin.weight.data.float()
            if isinstance(gidx, torch.Tensor) and (gidx >= 0).any() and not torch.equal(
                    gidx, torch.arange(gidx.numel()) // args.group_size):
                raise RuntimeError(f"{name}: activation-ordered g_idx is not handled by this runner")
            # GPTQ leaves weights already rounded (this is then idempotent); AWQ leaves them scaled but
            # unrounded, rounding in the forward pass: either way this is what the library computes with
            fq = fake_quantize(w, scale.float(), zp, args)
            maxdiff = max(maxdiff, (fq - w).abs().max().item())
            qsd[name + ".weight"] = fq
            side = [scale.numel() * 16]  # scale kept in the model's dtype (see bpw.py)
            if zp is not None and not args.symmetric:
                side.append(zp.numel() * bits)  # compressed-tensors packs asym zero points at num_bits
            if isinstance(gidx, torch.Tensor) and gidx.numel() and (gidx >= 0).all():
                side.append(gidx.numel() * 32)
            layers.append((w.numel(), w.numel() * bits + sum(side)))
        fsd = fresh.state_dict()
        missing = [k for k in fsd if k not in qsd]
        if missing:
            raise RuntimeError(f"llm-compressor model lost parameters: {missing[:3]}")
        fresh.load_state_dict({k: qsd[k].float() for k in fsd}, strict=True)
    note = f"fake_quantize re-check max |diff| {maxdiff:.2e}"
    return fresh, bits_per_weight(layers), gtext, secs, note


# ---- bookkeeping -----------------------------------------------------------------------------

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in ("torch", "transformers", "hqq", "optimum-quanto", "torchao", "llmcompressor", "compressed-tensors",
              "bitsandbytes", "leanq"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), CPU only"


def load_cache() -> dict:
    if JSON.is_file():
        return json.loads(JSON.read_text())
    return {"rows": {}}


def save_cache(c: dict) -> None:
    JSON.parent.mkdir(parents=True, exist_ok=True)
    tmp = JSON.with_suffix(".tmp")
    tmp.write_text(json.dumps(c, indent=1, sort_keys=True))
    tmp.replace(JSON)


def run_row(row, ids) -> dict:
    key, setting, lib, label, kind, arg = row
    rec = {"key": key, "setting": setting, "library": lib, "method": label, "status": "ok", "note": ""}
    if kind == "absent":
        rec.update(status="not available", note=arg)
        return rec
    from leanq.evaluate import perplexity

    try:
        note = ""
        if kind == "fp32":
            model, bpw, groups, secs = load_model(), 32.0, "-", (0.0, 0.0)
        elif kind == "layer":
            model, bpw, groups, secs = run_layer_peer(arg)
        else:
            model, bpw, groups, secs, note = run_llmc(*arg)
        t0 = _clock()
        ppl, count = perplexity(model, ids, WINDOW, WINDOWS, "cpu", progress=False)
        ev = _since(t0)
        rec.update(ppl=ppl, tokens_scored=count, bpw=bpw, groups=groups, quant_s=secs[0], quant_cpu_s=secs[1],
                   eval_s=ev[0], eval_cpu_s=ev[1], note=note)
    except Exception as e:  # one peer failing must not stop the others: the row says why
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        rec.update(status="error", note=f"{type(e).__name__}: {first[:300]}")
        traceback.print_exc()
    return rec


def write_doc(c: dict) -> None:
    rows = dict(c["rows"])
    for key, setting, lib, label, kind, arg in ROWS:  # rows the runner has not reached yet say so
        status, note = ("not available", arg) if kind == "absent" else ("pending", "not run yet: the same command runs it")
        rows.setdefault(key, {"key": key, "setting": setting, "library": lib, "method": label,
                              "status": status, "note": note})
    # leanq's recorded rows (not in a --smoke table: its peers ran on 2 blocks and 2 windows)
    ours = [] if SMOKE_LAYERS else load_leanq_rows(LEANQ_ROWS, REPO)
    fp32_row = rows.get("fp32", {})
    fp32, fp32_from = fp32_row.get("ppl"), "this run's FP32 row"
    if fp32 is None:
        mine = next((r for r in ours if r["key"] == "leanq-fp32" and r["status"] == "ok"), None)
        if mine:
            fp32, fp32_from = mine["ppl"], "leanq's recorded FP32 row (the peers' FP32 row has not run yet)"
    everything = list(rows.values()) + ours
    order = sorted(everything, key=lambda r: (SETTING_ORDER.index(r["setting"]), r.get("bpw") or 99,
                                              r.get("ppl") or 1e30, r["key"]))
    v = c.get("versions", {})
    lines = [
        "# Peer comparison: SmolLM2-135M, core protocol",
        "",
        "Produced by one command (from the repository root, after `bash benchmarks/peers/setup.sh`):",
        "",
        f"    {COMMAND}",
        "",
        f"Machine: {c.get('machine', '?')}. Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"Protocol: leanq.evaluate.perplexity on wiki.test.raw, {WINDOW}-token windows, first {WINDOWS} "
        f"(the call `leanq eval --max-windows {WINDOWS}` makes). Calibration for GPTQ/AWQ: leanq.data.calibration_ids, "
        f"{NSAMPLES} x {SEQLEN} tokens of wiki.valid.tokens, seed {SEED}. Every peer starts from leanq's float "
        "`smollm2-135m` (GGUF dequantized to float32, saved once as an HF folder). Decoder-block linears quantized; "
        "embeddings, norms and the tied head stay float.",
        "",
        "Scoring is fake-quant: each library quantizes, its own dequantization gives the weights, and those go "
        "back into the same float32 model. bpw counts the codes + scales + zeros each library stores for the "
        "quantized linears; float scales the library keeps in the model dtype are counted at 16 bits "
        "(benchmarks/peers/bpw.py explains the rule). Quantization time: process CPU seconds, summed over "
        "threads (rows finished before 2026-11-27 17:00 UTC ran with one thread, so for them it is about the time "
        "on a quiet machine; later rows ran with OMP_NUM_THREADS=2) and, in brackets, wall seconds on this shared "
        f"2-core machine, where other jobs ran beside ours and paused it at times. The ratio to FP32 uses {fp32_from}.",
        "",
    ]
    if ours:
        machines = sorted({(r["source"], r.get("machine", "?")) for r in ours})
        lines += [
            "Rows of library **leanq** are not run by this command (most need a GPU): the command reads them, "
            "at table time, from the result files leanq's own benchmark scripts recorded on the same protocol "
            "(`leanq quantize` + `leanq eval --max-windows 48`: the same perplexity code, the same calibration "
            "windows). Each row's note names its file and row and the command that reproduces it; its "
            "quantization time is that run's, on that machine. leanq's bpw counts every stored byte of codes, "
            "float16 scales, packed zero points and AWQ's float16 input-channel scale; at g128 the 576-wide "
            "inputs have a shorter fifth group of 64 columns. The recorded runs' machines and versions:",
            "",
            *[f"- `{src}`: {m}" for src, m in machines],
            "",
        ]
    lines += [markdown_table(order, fp32), ""]
    if ours:
        lines += [
            "## Verdict",
            "",
            "Issue 3's bar: at each of 4-bit g128, 3-bit g128 and 2-bit g64, leanq's best row has lower ppl than "
            "every peer row at the same or higher bits per weight (8-bit is listed too). Computed from the table "
            "above by `benchmarks/peers/compare.py` (`verdict`); a peer row that has not run yet leaves the "
            "setting pending.",
            "",
            *[verdict_text(verdict(everything, s)) for s in VERDICT_SETTINGS],
            "",
        ]
    lines += [
        "Notes:",
        "- Groups: compressed-tensors (llm-compressor) and torchao need whole groups per row, so at '128' the "
        "576-wide inputs (q/k/v/o/gate/up) use g64 and down_proj (1536 wide) g128. HQQ groups the flattened "
        "weight, so its g128 groups may straddle rows; quanto picks its own group (the largest divisor of the "
        "row <= 128: 96 on 576-wide rows).",
        "- torchao int4: Int4WeightOnlyConfig's packed tensors are built only on CUDA/XPU/NPU; the row uses the "
        "same torchao primitives its tile-packed path calls (asymmetric, bf16 scale and float zero), minus the packing.",
        "- llm-compressor: GPTQModifier/AWQModifier defaults (GPTQ: block 128, dampening 0.01, actorder static), "
        "asymmetric int weights, lm_head ignored.",
    ]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(DOC)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="run only these row keys")
    ap.add_argument("--redo", nargs="*", default=[], help="run these rows again even if cached")
    ap.add_argument("--retry-errors", action="store_true", help="run rows cached as errors again")
    ap.add_argument("--table-only", action="store_true", help="only rewrite docs/results/peers.md from the cache")
    ap.add_argument("--smoke", action="store_true", help="2 decoder blocks, 2 windows, 8 calibration windows, cache and table under "
                    "out/peers/smoke (a quick check that every row runs)")
    a = ap.parse_args(argv)
    if a.smoke:
        global JSON, DOC, WINDOWS, NSAMPLES, SMOKE_LAYERS
        JSON, DOC, WINDOWS, NSAMPLES = CACHE / "smoke/peers.json", CACHE / "smoke/peers.md", 2, 8
        SMOKE_LAYERS = 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    c = load_cache()
    if a.table_only:
        write_doc(c)
        print(DOC.read_text())
        return 0
    import torch

    torch.manual_seed(0)
    ensure_model_dir()
    c["versions"], c["machine"] = versions(), machine()
    ids = eval_ids(load_tokenizer())
    for row in ROWS:
        key = row[0]
        if a.only and key not in a.only:
            continue
        old = c["rows"].get(key)
        if old and key not in a.redo and not (a.retry_errors and old.get("status") == "error"):
            print(f"[skip] {key}: cached", flush=True)
            continue
        print(f"[run ] {key} ({time.strftime('%H:%M:%S')})", flush=True)
        rec = run_row(row, ids)
        rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        c = load_cache() | {"versions": c["versions"], "machine": c["machine"]}
        c["rows"][key] = rec
        save_cache(c)
        write_doc(c)
        print(f"[done] {key}: {json.dumps({k: rec.get(k) for k in ('status', 'ppl', 'bpw', 'groups', 'quant_s', 'note')})}",
              flush=True)
    write_doc(load_cache())
    return 0


if __name__ == "__main__":
    sys.exit(main())
