"""The Python API: load → calibrate → quantize → save → load → run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .checkpoint import load as load_checkpoint
from .checkpoint import save as save_checkpoint
from .config import TRAINED_METHODS, MethodConfig, QuantSpec, Recipe
from .data import CALIB_FILE, EVAL_FILE, calibration_ids, find_file, read_text, tokenize
from .errors import LeanqError
from .evaluate import EvalResult, evaluate as _evaluate
from .methods import get_method
from .models import is_checkpoint, load_float, resolve
from .pipeline import quantize_blocks


@dataclass
class QuantizedModel:
    model: torch.nn.Module
    tokenizer: object | None
    recipe: Recipe
    seconds: float
    plan: object | None = None  # leanq.planner.Plan when a size budget was given
    sensitivity: object | None = None  # its leanq.sensitivity.SensitivityTable

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        return save_checkpoint(self.model, self.tokenizer, self.recipe, out, overwrite)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LeanqError("--device cuda asked for, but no CUDA device is available")
    return device


def quantize(model: str, method: str = "gptq", bits: int = 4, group_size: int | None | str = "auto", sym: bool = False,
             calib: str | None = None, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
             act_order: bool | None = None, mse_clip: bool | None = None, refit: bool | None = None, damp: float = 0.01, keep: tuple[str, ...] = (),
             dtype: str = "float16", keep_dtype: str = "float16", device: str = "auto",
             progress: bool = True, smooth: float = 0.5, overrides: tuple[str, ...] | str = (),
             bpw: float | None = None, max_size: int | str | None = None, sensitivity_cache: str | None = None,
             sensitivity_samples: int = 32, sensitivity_weighting: str = "fisher",
             steps: int = 0, lr: float = 0.0, scale_lr: float = 0.0, init: str = "", lora_rank: int = 0,
             train_batch: int = 0, state: str | None = None, state_every: int = 50, resume: bool = False,
             target: str = "", vq: str = "", true_sequential: bool = True,
             block_state: str | None = None) -> QuantizedModel:
    """Quantize the decoder-block linears of ``model`` (HF folder, .gguf, or built-in name).

    keep / overrides: pattern rules (see :mod:`leanq.rules`; later overrides win, keep wins over all).
    bpw / max_size: a size budget; each module's setting is then planned from measured
    sensitivities (:mod:`leanq.hybrid`), cached in ``sensitivity_cache`` when given.

    true_sequential: calibrate each linear on the outputs of the already-quantized
    linears before it, one forward pass per block (False: two passes, less memory).

    group_size "auto" takes the method's default (128; NF4's block 64); fields a
    method fixes (fp8/w8a8: 8-bit per-row symmetric; awq: in_scale) override the
    arguments.  smooth: SmoothQuant alpha of w8a8 (0 = off).

    Trained methods (method "learned": :mod:`leanq.learned`; "qat": :mod:`leanq.qat`):
    steps, lr, scale_lr, init, lora_rank, train_batch (0 / "" = the method's
    default; saved in the recipe); target: learned PTQ's block targets ("float"
    chain or "same" inputs); state, state_every, resume: QAT's resumable state file.
    block_state: a folder committed after every decoder block (block-pipeline methods,
    :mod:`leanq.resume`); with ``resume`` an interrupted run of the same settings goes on
    from it, and without ``resume`` an existing one is refused rather than overwritten.

    vq: codebook layout of --method vq, "dim=4,index=8,books=1,rows=none,cols=192"
    (any subset; "" = the preset for ``bits``, see ``leanq.methods.vq.vq_fields``).
    """
    info = get_method(method)
    if method not in TRAINED_METHODS:  # training settings would be dropped without a word
        given = [k for k, v in dict(steps=steps, lr=lr, scale_lr=scale_lr, init=init, lora_rank=lora_rank,
                                    train_batch=train_batch, target=target).items() if v]
        if given:
            raise LeanqError(f"--{given[0].replace('_', '-')} applies to the trained methods (learned, qat), "
                             f"not --method {method}")
    # GPTQ's refinements default on (each measured to help on SmolLM2, docs/RESULTS.md);
    # for data-free methods a plain min/max range is the better default
    gptq_like = method in ("gptq", "awq+gptq", "learned", "qat")  # GPTQ rounds (trained methods start from it)
    # vq: act-order at the granularity of its vectors (leanq.methods.vq)
    act_order = (gptq_like or method == "vq") if act_order is None else act_order
    mse_clip = gptq_like if mse_clip is None else mse_clip
    refit = gptq_like if refit is None else refit
    fmt = "float" if method == "cast" else info.fmt
    if method == "qat" and init == "vq":  # QAT from a codebook start trains codebook weights
        info = get_method("vq")
        fmt = "vq"
    if group_size == "auto":
        group_size = info.default_group
    fields = dict(fmt=fmt, bits=bits, group_size=group_size, sym=sym, dtype=dtype)
    fields.update(dict(info.spec))
    if fmt == "vq":  # --bits is the target bits per weight; --vq may set the codebook layout (methods.vq)
        from .methods.vq import vq_fields

        fields.update(vq_fields(bits, group_size, vq))
    spec = QuantSpec(**fields)
    cfg = MethodConfig(name=method, damp=damp, act_order=act_order, mse_clip=mse_clip, refit=refit,
                       nsamples=nsamples, seqlen=seqlen, seed=seed, smooth=smooth, steps=steps, lr=lr,
                       scale_lr=scale_lr, init=init, lora_rank=lora_rank, train_batch=train_batch,
                       target=target if method == "learned" else "",
                       # learned PTQ computes each block's start from one pass of the block (leanq.learned)
                       true_sequential=bool(true_sequential and info.needs_data and method != "learned"))
    if method in ("learned", "qat"):
        from . import learned as _learned, qat as _qat

        cfg = (_learned if method == "learned" else _qat).with_defaults(cfg)
    if keep_dtype not in ("float32", "float16", "bfloat16"):
        raise LeanqError(f"keep dtype must be float32, float16 or bfloat16, got {keep_dtype!r}")
    dev = pick_device(device)
    if is_checkpoint(resolve(model)):
        raise LeanqError(f"{model}: is already a leanq checkpoint; quantize the original model")
    bstate = None
    if block_state and info.needs_data and method not in ("learned", "qat"):
        from .resume import BlockState

        bstate = BlockState(block_state)
        if bstate.exists() and not resume:
            raise LeanqError(f"{block_state}: holds an interrupted run ({bstate.describe()}); pass --resume to "
                             "continue it, or delete it to start over")
    loaded = load_float(model)
    calib_ids = None
    if info.needs_data:
        path = find_file(calib, CALIB_FILE, "--calib")
        calib_ids = calibration_ids(loaded.tokenizer, path, nsamples, seqlen, seed)
    from .rules import parse_rules

    rules = parse_rules(tuple(keep), overrides, spec)
    if rules.overrides and spec.fmt != "int":
        raise LeanqError(f"--override sets integer formats; use it with --method rtn or gptq, not {method}")
    ov, plan, table = (rules if rules.overrides else None), None, None
    if bpw is not None or max_size is not None:
        from .hybrid import plan_model
        from .planner import parse_size

        size = parse_size(max_size) if isinstance(max_size, str) else max_size
        plan, table = plan_model(loaded, spec, cfg, rules, find_file(calib, CALIB_FILE, "--calib"), bpw=bpw,
                                 max_size=size, cache=sensitivity_cache, samples=sensitivity_samples,
                                 keep_dtype=keep_dtype, device=dev, progress=progress,
                                 weighting=sensitivity_weighting)
        ov = plan
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if method == "learned":
        modules = _learned.learned_blocks(loaded.model, spec, cfg, calib_ids, keep=rules.keep, overrides=ov,
                                          device=dev, progress=progress)
    elif method == "qat":
        text_ids = tokenize(loaded.tokenizer, read_text(find_file(calib, CALIB_FILE, "--calib")))
        modules = _qat.qat_quantize(loaded.model, spec, cfg, calib_ids, text_ids, keep=rules.keep, overrides=ov,
                                    device=dev, progress=progress, state=state, state_every=state_every,
                                    resume=resume)
    else:
        modules = quantize_blocks(loaded.model, spec, cfg, calib_ids, keep=rules.keep, overrides=ov, device=dev,
                                  progress=progress, state=bstate, resume=resume)
    secs = time.perf_counter() - t0
    _round_kept(loaded.model, keep_dtype)
    recipe = Recipe(source=Path(loaded.source).name, model_type=loaded.model.config.model_type, method=cfg,
                    default_spec=spec, modules=modules, keep_dtype=keep_dtype, leanq_version=__version__)
    return QuantizedModel(loaded.model, loaded.tokenizer, recipe, secs, plan, table)


def _round_kept(model: torch.nn.Module, keep_dtype: str) -> None:
    """Round the float tensors that stay float through the dtype they are saved in,
    so the model in memory computes exactly what the saved one will."""
    from .modules import QuantLinear

    dt = getattr(torch, keep_dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                continue
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dt).to(p.dtype)


def load(path: str | Path, device: str = "cpu"):
    """Load a leanq checkpoint folder: returns (model, tokenizer, recipe)."""
    return load_checkpoint(path, device=pick_device(device))


def load_any(name: str, device: str = "cpu"):
    """A leanq checkpoint or a float model: returns (model, tokenizer, path)."""
    p = resolve(name)
    if is_checkpoint(p):
        m, t, _ = load_checkpoint(p, device=device)
        return m, t, p
    lf = load_float(name)
    return lf.model.to(device), lf.tokenizer, p


def evaluate(model: str | torch.nn.Module, data: str | None = None, window: int = 1024,
             max_windows: int | None = None, tokenizer=None, device: str = "auto",
             progress: bool = True) -> EvalResult:
    """Perplexity and size report of a model (path or module) on a text file."""
    dev = pick_device(device)
    if isinstance(model, (str, Path)):
        resolve(str(model))  # a missing model is named before the data is looked for
    text = read_text(find_file(data, EVAL_FILE, "--data"))
    if isinstance(model, (str, Path)):
        m, tok, p = load_any(str(model), dev)
        name = str(model)
    else:
        m, tok, p, name = model.to(dev), tokenizer, None, type(model).__name__
    return _evaluate(m, tok, text, name, p, window, max_windows, dev, progress)
