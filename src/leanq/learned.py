"""Learned post-training quantization, block by block (``--method learned``).

For each decoder block in turn:

1. the block's linears are quantized by the start method (``cfg.init``: GPTQ
   by default, or RTN) from the Hessians of the block's inputs;
2. each becomes a :class:`~leanq.fakequant.LearnedRoundLinear` that reproduces
   those codes, and a few hundred steps minimise the block's output MSE
   against the float block: the rounding offsets by signed gradient descent
   (SignRound: each step moves every offset by ``lr`` in the sign of its
   gradient, the rate decaying linearly to 0, so ``steps · lr / 2`` bounds how
   far it can travel), the clipping logits with Adam (OmniQuant's learnable
   weight clipping), same decay;
3. the learned weights are frozen to ordinary integer weights and kept only
   when they lower the block error over the whole calibration set against
   the start (so a block never ends worse than GPTQ on its own objective);
4. the quantized block produces the next block's inputs.

Inputs and targets: the quantized block reads the outputs of the quantized
blocks before it (what it sees at run time); its target is, by default, the
float model's own activation at that depth (``target="float"``: the float
chain, so each block also corrects error accumulated upstream), or the float
block applied to the same quantized inputs (``target="same"``).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import block_targets, get_blocks, linear_weight, set_submodule
from .config import MethodConfig, ModuleRecipe, QuantSpec
from .errors import LeanqError
from .fakequant import LearnedRoundLinear, fast_matmul
from .formats.floatw import FloatWeight
from .kernels.reference import reuse_dequantized
from .methods import get_method
from .modules import QuantLinear
from .pipeline import _blocks_prefix, _capture_first_inputs, _check_finite, _first, gram, spec_for

DEFAULTS = dict(steps=200, lr=5e-3, scale_lr=1e-2, init="gptq", train_batch=4, target="float")
TARGETS = ("float", "same")


def with_defaults(cfg: MethodConfig) -> MethodConfig:
    """Fill the trained-method fields left at 0 / "" with this method's defaults."""
    check_trained(cfg)
    return dataclasses.replace(cfg, **{k: v for k, v in DEFAULTS.items() if not getattr(cfg, k)})


def check_trained(cfg: MethodConfig) -> None:
    """Refuse negative counts and rates (0 means: the method's default)."""
    for k in ("steps", "lr", "scale_lr", "lora_rank", "train_batch"):
        v = getattr(cfg, k)
        if not v >= 0:  # negative or NaN
            raise LeanqError(f"{k.replace('_', '-')} must be positive (or 0 for the default), got {v}")


def _hessians(block: nn.Module, targets: dict[str, nn.Module], inputs, extra) -> dict[str, torch.Tensor]:
    """H = 2/n XᵀX [in, in] of every target's input over the calibration batches."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def make(rel):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc[rel] = acc.get(rel, 0) + gram(x)
            count[rel] = count.get(rel, 0) + x.shape[0]
        return hook

    handles = [lin.register_forward_pre_hook(make(rel)) for rel, lin in targets.items()]
    try:
        with torch.no_grad():
            for x, (args, kwargs) in zip(inputs, extra):
                block(x, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {rel: acc[rel] * (2.0 / count[rel]) for rel in targets}


def block_loss(block: nn.Module, inputs, extra, ys) -> float:
    """Mean squared error of the block's outputs against ``ys`` over all batches."""
    tot, n = 0.0, 0
    with torch.no_grad(), reuse_dequantized(list(block.modules())):
        for x, (args, kwargs), y in zip(inputs, extra, ys):
            tot += F.mse_loss(_first(block(x, *args, **kwargs)), y, reduction="sum").item()
            n += y.numel()
    return tot / n


def learn_block(block: nn.Module, modules: dict[str, LearnedRoundLinear], inputs, extra, ys, cfg: MethodConfig,
                gen: torch.Generator) -> list[float]:
    """Run ``cfg.steps`` steps on one block whose learnable linears are ``modules``; returns the step losses.

    Each step takes one calibration batch (chosen with ``gen``), so the
    batches hold ``cfg.train_batch`` sequences each.
    """
    vs = [m.v for m in modules.values()]
    clips = [p for m in modules.values() for p in (m.clip_hi, m.clip_lo) if p is not None]
    adam = torch.optim.Adam(clips, lr=cfg.scale_lr)
    losses = []
    for step in range(cfg.steps):
        decay = 1.0 - step / cfg.steps  # linear decay to 0 (as AutoRound): the last iterates settle
        for g in adam.param_groups:
            g["lr"] = cfg.scale_lr * decay
        j = int(torch.randint(len(inputs), (1,), generator=gen))
        args, kwargs = extra[j]
        loss = F.mse_loss(_first(block(inputs[j], *args, **kwargs)), ys[j])
        adam.zero_grad(set_to_none=True)
        for v in vs:
            v.grad = None
        loss.backward()
        with torch.no_grad():
            for v in vs:
                if v.grad is not None:
                    v.sub_(cfg.lr * decay * torch.sign(v.grad))
        adam.step()
        for m in modules.values():
            m.clamp_()
        losses.append(loss.item())
    return losses


def learned_blocks(model: nn.Module, spec: QuantSpec, cfg: MethodConfig, calib: torch.Tensor | None,
                   keep: tuple[str, ...] = (), overrides=None, device: str = "cpu", progress: bool = True,
                   log: list | None = None) -> dict[str, ModuleRecipe]:
    """Quantize every target linear of every decoder block in place, learning each block's weights.

    calib: int64 [nsamples, seqlen] token ids.  ``log``, when given, receives
    one dict per block (start and final block error, whether the learned
    weights were kept, seconds).  Returns {full module name: ModuleRecipe}.
    """
    cfg = with_defaults(cfg)
    if calib is None:
        raise LeanqError("method 'learned' needs calibration text: pass --calib FILE")
    target = cfg.target
    if target not in TARGETS:
        raise LeanqError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if cfg.lora_rank:
        raise LeanqError("LoRA (--lora-rank) applies to qat only")
    init = get_method(cfg.init)
    if init.fmt != "int" or cfg.init in ("learned", "qat") or dict(init.spec).get("in_scale"):
        raise LeanqError(f"learned quantization starts from rtn or gptq, not {cfg.init!r}")
    init_cfg = dataclasses.replace(cfg, name=cfg.init)
    dev = torch.device(device)
    blocks = get_blocks(model)
    prefix = _blocks_prefix(model, blocks)
    inputs, extra = _capture_first_inputs(model, blocks, calib, dev, cfg.train_batch)
    fp_inputs = inputs  # the float chain (the same tensors until block 0 is quantized)
    gen = torch.Generator().manual_seed(cfg.seed)
    recipe: dict[str, ModuleRecipe] = {}
    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)  # only the learned offsets and clipping factors train
        for i, block in enumerate(tqdm(blocks, desc="learned blocks", disable=not progress)):
            t0 = time.perf_counter()
            block.to(dev)
            targets = block_targets(model, block, f"{prefix}.{i}", keep)
            with torch.no_grad():
                ys = [_first(block(x, *a, **k)) for x, (a, k) in zip(fp_inputs if target == "float" else inputs, extra)]
            hess = _hessians(block, targets, inputs, extra) if init.needs_data else {}
            start, learn = {}, {}
            for rel, lin in targets.items():
                full = f"{prefix}.{i}.{rel}"
                s = spec_for(full, spec, overrides)
                w, b = linear_weight(lin)
                _check_finite(w, full)
                if s.fmt == "float":
                    qw, name = get_method("cast").fn(w, None, s, cfg), "cast"
                elif s.fmt == "int" and not s.in_scale:
                    qw, name = init.fn(w, hess.get(rel), s, init_cfg), "learned"
                    learn[rel] = LearnedRoundLinear(w, b, qw)
                else:
                    raise LeanqError(f"{full}: learned quantization stores plain integer weights, not {s.describe()}")
                start[rel] = (qw, b)
                recipe[full] = ModuleRecipe(s, name, w.shape[1], w.shape[0], b is not None)
            del hess
            _install(block, start)
            if not learn:  # nothing to learn here (kept or float): pass the block's outputs on
                if i + 1 < len(blocks):
                    with torch.no_grad(), reuse_dequantized(list(block.modules())):
                        inputs = [_first(block(x, *a, **k)) for x, (a, k) in zip(inputs, extra)]
                    fp_inputs = ys if target == "float" else inputs
                block.to("cpu")
                continue
            loss0 = block_loss(block, inputs, extra, ys)
            for rel, m in learn.items():
                set_submodule(block, rel, m)
            with torch.enable_grad(), fast_matmul(dev):
                losses = learn_block(block, learn, inputs, extra, ys, cfg, gen)
            learned = {rel: (m.freeze(), m.bias) for rel, m in learn.items()}
            _install(block, learned)
            loss1 = block_loss(block, inputs, extra, ys)
            kept = loss1 < loss0
            if not kept:  # the start was better on the whole set: keep it
                _install(block, {rel: start[rel] for rel in learn})
            del learn, learned
            if i + 1 < len(blocks):
                with torch.no_grad(), reuse_dequantized(list(block.modules())):
                    inputs = [_first(block(x, *a, **k)) for x, (a, k) in zip(inputs, extra)]
                fp_inputs = ys if target == "float" else inputs
            block.to("cpu")
            entry = dict(block=i, start_mse=loss0, final_mse=loss1, kept=kept, seconds=time.perf_counter() - t0,
                         first_step_loss=losses[0] if losses else None, last_step_loss=losses[-1] if losses else None)
            if log is not None:
                log.append(entry)
            if progress:
                print(f"block {i}: mse {loss0:.3e} -> {loss1:.3e}{'' if kept else ' (start kept)'} "
                      f"in {entry['seconds']:.1f} s", file=sys.stderr)
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
    return recipe


def _install(block: nn.Module, weights: dict) -> None:
    """Put packed weights {rel: (IntWeight | FloatWeight, bias)} into the block as QuantLinears."""
    for rel, (qw, b) in weights.items():
        if isinstance(qw, FloatWeight):
            new = QuantLinear.from_float(qw.weight, b, qw.spec)
        else:
            new = QuantLinear.from_int_weight(qw, b)
        new.to(next(iter(new.buffers())).device)
        set_submodule(block, rel, new)
