"""Checkpoints: a folder of config.json, tokenizer files, model.safetensors and leanq.json.

``leanq.json`` is the :class:`~leanq.config.Recipe` plus the size and sha256 of
``model.safetensors``.  Everything is written into a temporary folder beside
the target and renamed into place at the end, so an interrupted run never
leaves a half checkpoint at the output path, and an existing one is replaced
only when asked to.  Reading validates every file and tensor before use and
reports the first problem as one :class:`LeanqError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .config import Recipe
from .errors import LeanqError
from .export import move_into_place
from .models import named_outputs
from .modules import QuantLinear

WEIGHTS = "model.safetensors"
RECIPE = "leanq.json"
MAX_JSON_BYTES = 64 << 20


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (the first name wins)."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if v.numel() and key in seen:
            continue
        seen[key] = k
        out[k] = v
    return out


def check_stored(model: nn.Module) -> None:
    """Refuse a model whose quantized layers no longer hold their stored format: a kernel's ``release_stored``
    (inference only) frees those buffers and keeps only its own layout, from which no checkpoint is written."""
    from .formats.intq import expected_shapes

    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) or m.fmt == "float":
            continue
        for buf, (shape, _) in expected_shapes(m.spec, m.out_features, m.in_features).items():
            t = getattr(m, buf, None)
            if t is not None and tuple(t.shape) != tuple(shape):
                raise LeanqError(f"{name}: its stored weights were released for inference (a kernel's "
                                 f"release_stored); save the model before releasing them, or load it again")


def state_to_save(model: nn.Module, keep_dtype: str) -> dict[str, torch.Tensor]:
    """Packed buffers as they are; every other float tensor cast to ``keep_dtype``."""
    check_stored(model)
    quant_prefixes = {n + "." for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    dt = getattr(torch, keep_dtype)
    out = {}
    for k, v in _unique_state(model).items():
        if not any(k.startswith(p) for p in quant_prefixes) and v.is_floating_point():
            v = v.to(dt)
        out[k] = v.detach().to("cpu").contiguous()
    return out


def check_out(out: str | Path, overwrite: bool) -> Path:
    """Refuse an output folder that exists (unless overwriting a leanq checkpoint); called before long work too."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LeanqError(f"{out}: already exists; choose another --out or pass --overwrite")
    if out.exists() and not (out / RECIPE).is_file():
        raise LeanqError(f"{out}: exists and is not a leanq checkpoint; refusing to replace it")
    return out


def save(model: nn.Module, tokenizer, recipe: Recipe, out: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = state_to_save(model, recipe.keep_dtype)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: safetensors writes a map in random order
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # a GGUF source's marker; the weights here are leanq's
        cfg.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        d = json.loads(recipe.to_json())
        d["files"] = {WEIGHTS: {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": _sha256(tmp / WEIGHTS)}}
        (tmp / RECIPE).write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_recipe(path: str | Path) -> tuple[Recipe, dict]:
    p = Path(path)
    f = p / RECIPE
    if not p.is_dir():
        raise LeanqError(f"{p}: not a folder (a leanq checkpoint is a folder with {RECIPE})")
    if not f.is_file():
        raise LeanqError(f"{f}: missing; this is not a leanq checkpoint")
    if f.stat().st_size > MAX_JSON_BYTES:
        raise LeanqError(f"{f}: too large to be a recipe ({f.stat().st_size} bytes)")
    try:
        raw = f.read_bytes()
    except OSError as e:
        raise LeanqError(f"{f}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LeanqError(f"{f}: not UTF-8 text") from None
    recipe = Recipe.from_json(text, where=str(f))
    files = json.loads(text).get("files")
    if not isinstance(files, dict) or not isinstance(files.get(WEIGHTS), dict):
        raise LeanqError(f"{f}: no 'files' entry for {WEIGHTS}")
    w = files[WEIGHTS]
    n, sha = w.get("bytes"), w.get("sha256")
    if type(n) is not int or n < 0 or not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise LeanqError(f"{f}: the 'files' entry of {WEIGHTS} needs 'bytes' (an integer) and 'sha256' (64 hex digits)")
    return recipe, files


def verified_weights(p: Path, files: dict, verify: bool = True) -> Path:
    """The checkpoint's weights file, after checking it exists and has the size (and, with ``verify``, the sha256)
    that ``files`` (the recipe's 'files' entry, from :func:`read_recipe`) records."""
    wf = p / WEIGHTS
    if not wf.is_file():
        raise LeanqError(f"{wf}: missing")
    want = files[WEIGHTS]
    size = wf.stat().st_size
    if size != want.get("bytes"):
        raise LeanqError(f"{wf}: {size} bytes, but {RECIPE} records {want.get('bytes')} (truncated or replaced)")
    if verify and _sha256(wf) != want.get("sha256"):
        raise LeanqError(f"{wf}: contents do not match the sha256 recorded in {RECIPE} (corrupt or replaced)")
    return wf


def load(path: str | Path, device: str = "cpu", verify: bool = True):
    """Rebuild a quantized model from a checkpoint folder: returns (model, tokenizer, recipe)."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    p = Path(path)
    recipe, files = read_recipe(p)
    wf = verified_weights(p, files, verify)
    size = wf.stat().st_size
    cfgf = p / "config.json"
    if not cfgf.is_file():
        raise LeanqError(f"{cfgf}: missing")
    try:
        cfg_dict = json.loads(cfgf.read_text(encoding="utf-8"))
        if not isinstance(cfg_dict, dict):
            raise ValueError("expected a JSON object")
        for k in _BOOL_FLAGS:  # transformers accepts any value here, and forward() then crashes on it
            if k in cfg_dict and not isinstance(cfg_dict[k], bool):
                raise ValueError(f"{k} must be true or false, got {cfg_dict[k]!r}"[:200])
        # never run code shipped in a checkpoint (and never prompt for it)
        config = AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers' config validation raises many types (ZeroDivisionError, AttributeError, ...)
        raise LeanqError(f"{cfgf}: unreadable model config ({_first_line(e)})") from None
    named_outputs(config)
    if config.model_type != recipe.model_type:
        raise LeanqError(f"{cfgf}: model type {config.model_type!r} does not match the recipe's {recipe.model_type!r}")

    _check_bounded(p, recipe, config, wf, size)  # on the meta device: nothing allocated yet
    model = _skeleton(p, recipe, config)
    model.eval()

    expected = _unique_state(model)
    keep_dt = getattr(torch, recipe.keep_dtype)
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    try:
        with safe_open(str(wf), framework="pt") as st:
            keys = set(st.keys())
            missing = sorted(set(expected) - keys)
            extra = sorted(keys - set(expected))
            if missing or extra:
                what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
                raise LeanqError(f"{wf}: tensors do not match the model ({what})")
            state = {}
            for k, ref in expected.items():
                t = st.get_tensor(k)
                owner = k.rsplit(".", 1)[0]
                if owner in quant:
                    want_shape, want_dtype = tuple(ref.shape), ref.dtype
                else:
                    want_shape, want_dtype = tuple(ref.shape), keep_dt if ref.is_floating_point() else ref.dtype
                if tuple(t.shape) != want_shape or t.dtype != want_dtype:
                    raise LeanqError(f"{wf}: tensor {k} is {t.dtype} {tuple(t.shape)}, expected {want_dtype} {want_shape}")
                if t.is_floating_point() and not torch.isfinite(t.float() if t.element_size() == 1 else t).all():  # fp8: no isfinite
                    raise LeanqError(f"{wf}: tensor {k} holds NaN or Inf")
                state[k] = t.to(ref.dtype)
    except SafetensorError as e:
        raise LeanqError(f"{wf}: not a valid safetensors file ({e})") from None
    _check_codes(model, state, quant)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device)
    tok = None
    if any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # the tokenizers library raises plain Exception on a malformed file

            raise LeanqError(f"{p}: tokenizer files unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model, tok, recipe


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _no_init():
    """transformers' context that skips weight initialisation (a no-op where this version lacks it)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _skeleton(p: Path, recipe: Recipe, config, meta: bool = False) -> nn.Module:
    """The model config.json describes, float32, with the recipe's QuantLinears in place.

    meta=True builds it on the meta device (no memory, no initialisation) for
    checks.  Every recipe module must replace a linear of exactly its shape.
    """
    from transformers import AutoModelForCausalLM

    from .arch import linear_weight, set_submodule

    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    try:
        # the real skeleton skips random initialisation: load() refuses a file lacking any of its tensors, so
        # every value is overwritten (non-persistent buffers such as rotary tables are computed in __init__,
        # not initialised).  Peak RSS while loading SmolLM2 at 4 bits: 987 -> 510 MB above the process base.
        with ctx, (contextlib.nullcontext() if meta else _no_init()):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if not meta and getattr(config, "tie_word_embeddings", False):
            model.tie_weights()  # skipped with the initialisation
    except Exception as e:  # transformers rejects bad configs with many types (TypeError, ZeroDivisionError, ...)
        raise LeanqError(f"{p / 'config.json'}: no model can be built from it ({_first_line(e)})") from None
    names = dict(model.named_modules())
    for full, mr in recipe.modules.items():
        old = names.get(full)
        if old is None:
            raise LeanqError(f"{p / RECIPE}: module {full!r} does not exist in this model")
        try:
            w, _ = linear_weight(old)
        except TypeError:
            raise LeanqError(f"{p / RECIPE}: module {full!r} is not a linear layer") from None
        if tuple(w.shape) != (mr.out_features, mr.in_features):
            raise LeanqError(f"{p / RECIPE}: module {full!r} is {mr.out_features}x{mr.in_features} in the recipe "
                             f"but {w.shape[0]}x{w.shape[1]} in config.json")
        with ctx:
            new = QuantLinear(mr.in_features, mr.out_features, mr.spec, mr.bias)
        set_submodule(model, full, new)
    return model


# config flags forward() reads at run time (found by tests/test_fuzz_readers.py: output_hidden_states=[None])
_BOOL_FLAGS = ("output_hidden_states", "output_attentions", "return_dict", "use_cache", "tie_word_embeddings",
               "is_decoder", "is_encoder_decoder", "torchscript", "use_return_dict")

# config fields whose size is a count of modules: building millions of them takes hours even on meta
_MODULE_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "num_experts", "num_local_experts", "n_routed_experts")


def _check_bounded(p: Path, recipe: Recipe, config, wf: Path, file_bytes: int) -> None:
    """Refuse a config.json that describes a model larger than model.safetensors holds.

    A hostile or mistaken config (hidden_size 10**6, a billion layers) would
    otherwise exhaust memory or hang before any tensor is read.  Module counts
    are bounded by the number of tensors in the file; then the model is built
    on the meta device and the bytes its stored tensors need are compared with
    the file size, so the real build allocates at most a few times the file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(wf), framework="pt") as st:
            ntensors = len(st.keys())
    except SafetensorError as e:
        raise LeanqError(f"{wf}: not a valid safetensors file ({e})") from None
    for k in _MODULE_COUNTS:
        v = getattr(config, k, None)
        if isinstance(v, int) and v > ntensors:
            raise LeanqError(f"{p / 'config.json'}: {k}={v} but {WEIGHTS} holds only {ntensors} tensors")
    model = _skeleton(p, recipe, config, meta=True)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    keep_size = torch.empty(0, dtype=getattr(torch, recipe.keep_dtype)).element_size()
    need = 0
    for k, v in model.state_dict().items():
        if k in tied:
            continue
        float_kept = v.is_floating_point() and k.rsplit(".", 1)[0] not in quant
        need += v.numel() * (keep_size if float_kept else v.element_size())
    if need > file_bytes:
        raise LeanqError(f"{p / 'config.json'}: describes a model whose tensors need {need} bytes, "
                         f"but {WEIGHTS} has only {file_bytes}")


def _check_codes(model: nn.Module, state: dict[str, torch.Tensor], quant: set[str]) -> None:
    """Zero points must lie in the code range; scales must be finite and non-negative."""
    mods = dict(model.named_modules())
    for name in quant:
        m = mods[name]
        if m.fmt != "int":
            continue
        sc = state[f"{name}.scales"]
        if (sc < 0).any():
            raise LeanqError(f"{WEIGHTS}: {name}.scales has negative values")
