"""The sequential calibration pipeline.

Capture the inputs of the first decoder block, then for each block in turn:
run it on those inputs while hooks accumulate each target linear's Hessian,
quantize its linears with the chosen method, and run it again to produce the
inputs of the next block — now carrying the quantization error of everything
before, as the model will at run time.  Only one block is on the device at a
time, so peak memory is about one block plus its activations.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import block_targets, get_blocks, linear_weight, set_submodule
from .config import MethodConfig, ModuleRecipe, QuantSpec
from .errors import LeanqError
from .formats.floatw import FloatWeight
from .methods import get_method
from .kernels.reference import reuse_dequantized
from .modules import QuantLinear


PROFILE = bool(os.environ.get("LEANQ_PROFILE"))  # per-block timings on stderr


class _Stop(Exception):
    pass


def spec_for(name: str, default: QuantSpec, overrides: Callable[[str], QuantSpec | None] | None) -> QuantSpec:
    if overrides is not None:
        s = overrides(name)
        if s is not None:
            return s
    return default


def _replace(block: nn.Module, rel: str, qw, bias: torch.Tensor | None) -> QuantLinear:
    if isinstance(qw, FloatWeight):
        new = QuantLinear.from_float(qw.weight, bias, qw.spec)
    else:
        new = QuantLinear.from_int_weight(qw, bias)
    new.to(next(iter(new.buffers())).device)
    set_submodule(block, rel, new)
    return new


def quantize_blocks(model: nn.Module, spec: QuantSpec, cfg: MethodConfig, calib: torch.Tensor | None,
                    keep: tuple[str, ...] = (), overrides=None, device: str = "cpu",
                    batch_size: int = 8, progress: bool = True,
                    on_hessian: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None) -> dict[str, ModuleRecipe]:
    """Quantize every target linear of every decoder block in place.

    calib: int64 [nsamples, seqlen] token ids (needed by data-driven methods).
    on_hessian(full name, W [out, in], H [in, in] float32): called for each
    target right before it is quantized (data-driven methods only), so callers
    such as :mod:`leanq.sensitivity` can measure a module under its own
    calibration Hessian without holding every H at once.
    Returns {full module name: ModuleRecipe}.
    """
    method = get_method(cfg.name)
    blocks = get_blocks(model)
    prefix = _blocks_prefix(model, blocks)
    recipe: dict[str, ModuleRecipe] = {}

    if not method.needs_data:
        for i, block in enumerate(tqdm(blocks, desc=f"{cfg.name} blocks", disable=not progress)):
            for rel, lin in block_targets(model, block, f"{prefix}.{i}", keep).items():
                full = f"{prefix}.{i}.{rel}"
                s = spec_for(full, spec, overrides)
                w, b = linear_weight(lin)
                qw = get_method(cfg.name if s.fmt != "float" else "cast").fn(w, None, s, cfg)
                _replace(block, rel, qw, b)
                recipe[full] = ModuleRecipe(s, cfg.name if s.fmt != "float" else "cast", w.shape[1], w.shape[0], b is not None)
        return recipe

    if calib is None:
        raise LeanqError(f"method {cfg.name!r} needs calibration text: pass --calib FILE")
    dev = torch.device(device)
    inputs, extra = _capture_first_inputs(model, blocks, calib, dev, batch_size)

    for i, block in enumerate(tqdm(blocks, desc=f"{cfg.name} blocks", disable=not progress)):
        block.to(dev)
        targets = block_targets(model, block, f"{prefix}.{i}", keep)
        hessians, counts, handles = {}, {}, []
        shared: dict[tuple, torch.Tensor] = {}
        order: list[str] = []  # targets in the order the block runs them (learnt on the first batch)

        def make_hook(rel: str):
            def hook(mod, args):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).float()
                key = (x.data_ptr(), tuple(x.shape))
                if key not in shared:  # q/k/v and gate/up read the same input: one XᵀX
                    # keep x alive with its product, so that no later input of the
                    # same shape can be allocated at this address during the batch
                    shared[key] = (x, gram(x))
                hessians[rel] = hessians.get(rel, 0) + shared[key][1]
                counts[rel] = counts.get(rel, 0) + x.shape[0]
                if len(order) < len(targets):
                    order.append(rel)
                elif rel == order[-1]:
                    raise _Stop  # every statistic of this batch is in: skip the rest of the block
            return hook

        for rel, lin in targets.items():
            handles.append(lin.register_forward_pre_hook(make_hook(rel)))
        t0 = time.perf_counter()
        with torch.no_grad():
            for x, (args, kwargs) in zip(inputs, extra):
                shared.clear()
                try:
                    block(x, *args, **kwargs)
                except _Stop:
                    pass
                _check_finite(x, f"block {i} input")
        for h in handles:
            h.remove()
        shared.clear()

        t1 = time.perf_counter()
        for rel, lin in targets.items():
            full = f"{prefix}.{i}.{rel}"
            s = spec_for(full, spec, overrides)
            w, b = linear_weight(lin)
            _check_finite(w, full)
            h = hessians[rel] * (2.0 / counts[rel])
            if on_hessian is not None:
                on_hessian(full, w, h)
            name = cfg.name if s.fmt != "float" else "cast"
            qw = get_method(name).fn(w, h, s, cfg)
            _replace(block, rel, qw, b)
            recipe[full] = ModuleRecipe(s, name, w.shape[1], w.shape[0], b is not None)
        del hessians

        t2 = time.perf_counter()
        if i + 1 < len(blocks):  # the last block's outputs feed nothing
            with torch.no_grad(), reuse_dequantized(list(block.modules())):
                inputs = [_first(block(x, *args, **kwargs)) for x, (args, kwargs) in zip(inputs, extra)]
        block.to("cpu")
        if PROFILE:
            print(f"block {i}: statistics {t1 - t0:.2f} s, solve {t2 - t1:.2f} s, "
                  f"forward {time.perf_counter() - t2:.2f} s", file=sys.stderr)
    return recipe


def gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX [d, d] for x [n, d], computing one off-diagonal block only (3/4 of the products)."""
    d = x.shape[1]
    if d < 512:
        return x.t() @ x
    h = d // 2
    a, b = x[:, :h], x[:, h:]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    out[:h, :h] = a.t() @ a
    out[h:, h:] = b.t() @ b
    ab = a.t() @ b
    out[:h, h:] = ab
    out[h:, :h] = ab.t()
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise LeanqError(f"{what} holds NaN or Inf values; the model or the calibration data is broken")


def _blocks_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    for name, m in model.named_modules():
        if m is blocks:
            return name
    raise RuntimeError("decoder blocks not found in the model")


def _capture_first_inputs(model, blocks, calib, dev, batch_size):
    """Run the model up to block 0 and keep what it receives: ([hidden], [(args, kwargs)])."""
    inputs, extra = [], []

    def grab(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        kw["use_cache"] = False
        extra.append((tuple(args[1:]), kw))
        raise _Stop

    # everything but the blocks goes to the device for this one pass
    _move_outside_blocks(model, blocks, dev)
    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, calib.shape[0], batch_size):
                try:
                    model(calib[start : start + batch_size].to(dev), use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
    _move_outside_blocks(model, blocks, torch.device("cpu"))
    return inputs, extra


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, dev: torch.device) -> None:
    """Move the parameters and buffers that are not in a decoder block (ties survive)."""
    inside = {id(m) for m in blocks.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m.parameters(recurse=False):
            p.data = p.data.to(dev)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = b.to(dev)
