"""Architecture specifics as data: where the decoder blocks are, what to quantize.

Adding a family is one entry in ``ARCHS``; no per-model driver code.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LeanqError


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    targets: tuple[str, ...]  # patterns (relative to a block) of linears to quantize
    keep: tuple[str, ...] = ()  # patterns (full names) never quantized


_LLAMA = ArchSpec("model.layers", ("self_attn.*_proj", "mlp.*_proj"))
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": ArchSpec("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "opt": ArchSpec("model.decoder.layers", ("self_attn.*_proj", "fc1", "fc2")),
}


def arch_of(model: nn.Module) -> ArchSpec:
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHS:
        raise LeanqError(f"model type {mt!r} is not supported yet; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[mt]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    obj = model
    for part in arch_of(model).blocks.split("."):
        obj = getattr(obj, part)
    return obj


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [out, in], bias [out] or None) for nn.Linear or GPT-2's transposed Conv1D."""
    if isinstance(m, nn.Linear):
        return m.weight.data, m.bias.data if m.bias is not None else None
    if type(m).__name__ == "Conv1D":
        return m.weight.data.t(), m.bias.data if m.bias is not None else None
    w = getattr(m, "weight", None)
    if w is not None:
        return w.data, m.bias.data if getattr(m, "bias", None) is not None else None
    raise TypeError(f"not a linear layer: {type(m).__name__}")


def block_targets(model: nn.Module, block: nn.Module, block_name: str, keep: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Linears of one block to quantize: {name relative to the block: module}."""
    spec = arch_of(model)
    out = {}
    for name, m in block.named_modules():
        if not name or not is_linear(m):
            continue
        full = f"{block_name}.{name}"
        if any(fnmatch.fnmatch(name, p) for p in spec.targets) and not any(
            fnmatch.fnmatch(full, p) for p in spec.keep + tuple(keep)
        ):
            out[name] = m
    return out


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
