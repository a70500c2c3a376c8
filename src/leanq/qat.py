"""Quantization-aware training (``--method qat``): distil the float model into fake-quantized linears.

Start: a model quantized by ``cfg.init`` (GPTQ by default; RTN or learned
also work).  Each of its integer linears becomes an
:class:`~leanq.fakequant.LSQLinear` that computes exactly the same weight
(latent weight inside the start's rounding bins, step sizes = the start's
scales).  With ``init="vq"`` the start is the codebook method and each
codebook linear becomes a :class:`~leanq.fakequant.VQTrainLinear`: indices
fixed, codewords and scales trained.  Then ``cfg.steps`` AdamW steps
minimise KL(teacher ‖ student) of
the next-token distributions, the teacher being the float model, on random
windows of the calibration text (``cfg.train_batch`` windows of
``cfg.seqlen`` tokens per step, drawn with a seeded generator).  Learning
rates follow a cosine decay computed from the step number, so a resumed run
takes exactly the steps an uninterrupted one would.  Everything outside the
quantized linears (embeddings, norms, head) stays frozen.  At the end each
module is frozen into an ordinary packed :class:`IntWeight` (or :class:`VQWeight`).

Resumable: every ``state_every`` steps the trainable tensors, the optimizer,
the step, the data generator and the RNG states are written atomically to
``state``; ``resume=True`` continues from that file (the start method is
not re-run: the state holds every value it produced).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import set_submodule
from .config import MethodConfig, QuantSpec
from .errors import LeanqError
from .fakequant import LSQLinear, VQTrainLinear, fast_matmul
from .formats.layouts import container
from .modules import QuantLinear

# lr: latent weights in units of the start's step size (so 2e-3 is 1/500 of a step per Adam step)
DEFAULTS = dict(steps=500, lr=2e-3, scale_lr=1e-3, init="gptq", train_batch=4)
STATE_FORMAT = "leanq-qat-state"
STATE_VERSION = 1


def with_defaults(cfg: MethodConfig) -> MethodConfig:
    """Fill the trained-method fields left at 0 / "" with this method's defaults."""
    from .learned import check_trained

    check_trained(cfg)
    if cfg.target:
        raise LeanqError("target applies to method 'learned' only")
    return dataclasses.replace(cfg, **{k: v for k, v in DEFAULTS.items() if not getattr(cfg, k)})


def to_fake(model: nn.Module, float_model: nn.Module, lora_rank: int = 0) -> dict[str, LSQLinear]:
    """Replace every plain integer QuantLinear of ``model`` by an LSQLinear started from it.

    ``float_model`` supplies the float weights (same module names, nn.Linear).
    Returns {module name: LSQLinear}.
    """
    fl = dict(float_model.named_modules())
    out = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and m.fmt == "vq":
            fake = VQTrainLinear.from_start(container(m), m.bias)
            set_submodule(model, name, fake)
            out[name] = fake
        elif isinstance(m, QuantLinear) and m.fmt == "int" and getattr(m, "in_scale", None) is None:
            w = fl[name].weight.detach().to(m.scales.device)
            fake = LSQLinear.from_start(w, m.bias, m.int_weight(), lora_rank)
            set_submodule(model, name, fake)
            out[name] = fake
    return out


def freeze(model: nn.Module) -> list[str]:
    """Replace every LSQLinear / VQTrainLinear by the QuantLinear of its packed weight; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, (LSQLinear, VQTrainLinear))]
    for n in names:
        m = model.get_submodule(n)
        set_submodule(model, n, QuantLinear.from_int_weight(m.freeze(), m.bias))
    return names


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student), logits [..., vocab]."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v), -1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def lr_at(step: int, total: int, base: float) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps (a short linear warm-up first)."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _fingerprint(cfg: MethodConfig, spec: QuantSpec, extra: str) -> str:
    d = cfg.to_dict()
    d.pop("steps", None)  # a resumed run may be asked to go further
    return json.dumps({"cfg": d, "spec": spec.to_dict(), "extra": extra}, sort_keys=True)


def save_state(path: Path, step: int, modules: dict[str, LSQLinear], opt: torch.optim.Optimizer,
               gen: torch.Generator, fingerprint: str, losses: list[float]) -> None:
    """Write the training state atomically (temporary file, fsync, rename)."""
    state = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "fingerprint": fingerprint,
        "modules": {n: {k: v.detach().cpu() for k, v in m.state_dict().items()} for n, m in modules.items()},
        "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "losses": torch.tensor(losses, dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path, fingerprint: str) -> dict:
    """Read a state file written by :func:`save_state` (tensors only: weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: many exception types from the unpickler
        raise LeanqError(f"{path}: not a readable QAT state file ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise LeanqError(f"{path}: not a leanq QAT state file (version {STATE_VERSION})")
    if state.get("fingerprint") != fingerprint:
        raise LeanqError(f"{path}: was written for other settings (method config, format or model); "
                         "resume with the same settings or start afresh without --resume")
    return state


def empty_fakes(model: nn.Module, names: list[str], spec_of: Callable[[str], QuantSpec], lora_rank: int) -> dict[str, LSQLinear]:
    """LSQLinears (VQTrainLinears for codebook specs) of the right shapes in place of the float
    linears ``names`` (a resumed run fills them)."""
    out = {}
    for name in names:
        lin = model.get_submodule(name)
        s = spec_of(name)
        if s.fmt == "vq":
            fake = VQTrainLinear(lin.in_features, lin.out_features, s, lin.bias is not None)
        else:
            fake = LSQLinear(lin.in_features, lin.out_features, s, lin.bias is not None, lora_rank)
        set_submodule(model, name, fake.to(lin.weight.device))
        out[name] = fake
    return out


def train(model: nn.Module, teacher: nn.Module, text_ids: torch.Tensor, modules: dict[str, LSQLinear],
          cfg: MethodConfig, spec: QuantSpec, device: str = "cpu", state: str | Path | None = None,
          state_every: int = 50, resume: bool = False, progress: bool = True, fingerprint_extra: str = "",
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the LSQLinears ``modules`` of ``model`` (on ``device``) by distillation from ``teacher``.

    text_ids: int64 [n] calibration text.  Returns the loss of every step run
    (from the start, when resumed).  ``on_step(step, loss)`` is called after
    each step and its state save (tests use it to interrupt a run).
    """
    cfg = with_defaults(cfg)
    dev = torch.device(device)
    seqlen = cfg.seqlen
    if len(text_ids) <= seqlen:
        raise LeanqError(f"the calibration text has {len(text_ids)} tokens, fewer than one window of {seqlen}")
    fp = _fingerprint(cfg, spec, fingerprint_extra)
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in list(model.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    groups = [
        {"params": [m.codebooks if isinstance(m, VQTrainLinear) else m.weight for m in modules.values()
                    if m.lora_rank == 0], "lr": cfg.lr, "base": cfg.lr},
        {"params": [m.log_scale for m in modules.values()], "lr": cfg.scale_lr, "base": cfg.scale_lr},
        {"params": [p for m in modules.values() if m.lora_rank for p in (m.lora_a, m.lora_b)], "lr": cfg.lr, "base": cfg.lr},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses = 0, []
    if resume and state is not None and Path(state).exists():
        st = load_state(Path(state), fp)
        for n, m in modules.items():
            if n not in st["modules"]:
                raise LeanqError(f"{state}: holds no state for {n}")
            m.load_state_dict(st["modules"][n])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        if "cuda_rng" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        step, losses = int(st["step"]), st["losses"].tolist()
    teacher.eval()
    bar = tqdm(total=cfg.steps, initial=step, desc="qat", disable=not progress)
    ema = losses[-1] if losses else None
    try:
        with fast_matmul(dev):
            while step < cfg.steps:
                starts = torch.randint(0, len(text_ids) - seqlen, (cfg.train_batch,), generator=gen)
                x = torch.stack([text_ids[s : s + seqlen] for s in starts.tolist()]).to(dev)
                for g in opt.param_groups:  # not `groups`: load_state_dict replaces the group dicts
                    g["lr"] = lr_at(step, cfg.steps, g["base"])
                with torch.no_grad():
                    t_logits = teacher(x, use_cache=False).logits
                loss = kl_loss(model(x, use_cache=False).logits, t_logits)
                del t_logits
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                losses.append(loss.item())
                ema = losses[-1] if ema is None else 0.9 * ema + 0.1 * losses[-1]
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", avg=f"{ema:.4f}")
                if state is not None and state_every > 0 and (step % state_every == 0 or step == cfg.steps):
                    save_state(Path(state), step, modules, opt, gen, fp, losses)
                if on_step is not None:
                    on_step(step, losses[-1])
    finally:
        bar.close()
        for p, r in requires.items():
            p.requires_grad_(r)
    return losses


def qat_quantize(model: nn.Module, spec: QuantSpec, cfg: MethodConfig, calib: torch.Tensor | None,
                 text_ids: torch.Tensor, keep: tuple[str, ...] = (), overrides=None, device: str = "cpu",
                 progress: bool = True, state: str | Path | None = None, state_every: int = 50,
                 resume: bool = False, log: dict | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> dict:
    """The whole QAT method on a float ``model`` (CPU): start, train, freeze, in place.

    calib: int64 [nsamples, seqlen] ids for the start method; text_ids: int64 [n]
    the calibration text the training windows are drawn from.  With ``resume``
    and an existing ``state`` the start method is skipped (the state holds
    everything it produced).  ``log`` receives "losses" and "start_seconds";
    ``on_step`` is passed to :func:`train`.
    Returns {full module name: ModuleRecipe}.
    """
    import copy
    import time

    from .arch import block_targets, get_blocks, linear_weight
    from .config import ModuleRecipe
    from .methods import get_method
    from .pipeline import _blocks_prefix, quantize_blocks, spec_for

    cfg = with_defaults(cfg)
    if cfg.init in ("qat",) or get_method(cfg.init).fmt not in ("int", "vq"):
        raise LeanqError(f"QAT starts from rtn, gptq, learned or vq, not {cfg.init!r}")
    blocks = get_blocks(model)
    prefix = _blocks_prefix(model, blocks)
    targets = {}
    for i, block in enumerate(blocks):
        for rel, lin in block_targets(model, block, f"{prefix}.{i}", keep).items():
            full = f"{prefix}.{i}.{rel}"
            s = spec_for(full, spec, overrides)
            if s.fmt not in ("int", "float", "vq") or s.in_scale or (s.fmt == "vq" and cfg.init != "vq"):
                raise LeanqError(f"{full}: QAT trains plain integer or (from a vq start) codebook weights, "
                                 f"not {s.describe()}")
            targets[full] = (s, lin)
    teacher = copy.deepcopy(model)
    t0 = time.perf_counter()
    int_names = [n for n, (s, _) in targets.items() if s.fmt in ("int", "vq")]
    if resume and state is not None and Path(state).exists():
        for n, (s, lin) in targets.items():
            if s.fmt == "float":
                w, b = linear_weight(lin)
                set_submodule(model, n, QuantLinear.from_float(get_method("cast").fn(w, None, s, cfg).weight, b, s))
        modules = empty_fakes(model, int_names, lambda n: targets[n][0], cfg.lora_rank)
    else:
        if cfg.init == "learned":
            from .learned import learned_blocks

            init_cfg = dataclasses.replace(cfg, name="learned", init="gptq", steps=0, lr=0.0, scale_lr=0.0, train_batch=0,
                                           lora_rank=0)
            learned_blocks(model, spec, init_cfg, calib, keep, overrides, device, progress)
        else:
            quantize_blocks(model, spec, dataclasses.replace(cfg, name=cfg.init), calib, keep=keep,
                            overrides=overrides, device=device, progress=progress)
        modules = to_fake(model, teacher, cfg.lora_rank)
    start_secs = time.perf_counter() - t0
    model.to(device)
    teacher.to(device)
    losses = train(model, teacher, text_ids, modules, cfg, spec, device, state, state_every, resume, progress,
                   fingerprint_extra=f"{type(model).__name__}:{len(int_names)}", on_step=on_step)
    freeze(model)
    model.to("cpu")
    del teacher
    if log is not None:
        log.update(losses=losses, start_seconds=start_secs)
    recipe = {}
    for n, (s, lin) in targets.items():
        w, b = linear_weight(lin)
        recipe[n] = ModuleRecipe(s, "qat" if s.fmt in ("int", "vq") else "cast", w.shape[1], w.shape[0], b is not None)
    return recipe
