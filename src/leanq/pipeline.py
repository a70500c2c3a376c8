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
import signal
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
from .relay import Relay, StageLinear, Stop
from .resume import BlockState, fingerprint, tensor_digest


PROFILE = bool(os.environ.get("LEANQ_PROFILE"))  # per-block timings on stderr


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    The pipeline allocates and frees the same large activations thousands of
    times; by default glibc hands each big block back (and every thread gets its
    own arena), so each reuse page-faults fresh zeroed pages: measured ~0.5 s of
    every 4.5 s block forward on the 2-core CPU.  Process-wide and harmless
    elsewhere (the price: freed memory stays in the process); LEANQ_MALLOC=0
    turns it off.  No-op off glibc.
    """
    if os.environ.get("LEANQ_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX: one arena for every thread
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: do not shrink the heap
    except (OSError, AttributeError):
        pass


def spec_for(name: str, default: QuantSpec, overrides: Callable[[str], QuantSpec | None] | None) -> QuantSpec:
    if overrides is not None:
        s = overrides(name)
        if s is not None:
            return s
    return default


def _new_module(qw, bias: torch.Tensor | None) -> QuantLinear:
    if isinstance(qw, FloatWeight):
        return QuantLinear.from_float(qw.weight, bias, qw.spec)
    return QuantLinear.from_int_weight(qw, bias)


def quantize_blocks(model: nn.Module, spec: QuantSpec, cfg: MethodConfig, calib: torch.Tensor | None,
                    keep: tuple[str, ...] = (), overrides=None, device: str = "cpu",
                    batch_size: int = 8, progress: bool = True,
                    on_hessian: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
                    state: BlockState | None = None, resume: bool = False) -> dict[str, ModuleRecipe]:
    """Quantize every target linear of every decoder block in place.

    calib: int64 [nsamples, seqlen] token ids (needed by data-driven methods).
    on_hessian(full name, W [out, in], H [in, in] float32): called for each
    target right before it is quantized (data-driven methods only), so callers
    such as :mod:`leanq.sensitivity` can measure a module under its own
    calibration Hessian without holding every H at once.
    state: a :class:`leanq.resume.BlockState` committed after every block
    (data-driven methods); with ``resume`` an existing state of the same run
    is continued from its next block, giving the same bytes as one run.
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
                set_submodule(block, rel, _new_module(qw, b).to(lin.weight.device))
                recipe[full] = ModuleRecipe(s, cfg.name if s.fmt != "float" else "cast", w.shape[1], w.shape[0], b is not None)
        return recipe

    if calib is None:
        raise LeanqError(f"method {cfg.name!r} needs calibration text: pass --calib FILE")
    dev = torch.device(device)
    _keep_freed_memory()
    inputs, extra = _capture_first_inputs(model, blocks, calib, dev, batch_size)

    start = 0
    if state is not None:
        state.key = _run_key(model, blocks, prefix, spec, cfg, calib, keep, overrides, dev, batch_size)
        if resume and state.exists():
            start, done = state.load(len(blocks))
            for i in range(start):
                _restore_block(blocks[i], i, model, f"{prefix}.{i}", keep, done, state)
            recipe.update(done)
            if start < len(blocks):
                inputs = state.inputs(start, inputs)
            state.resume_from(len(blocks), done)
        else:
            state.start(len(blocks))

    solve = _Solver(spec, cfg, overrides, on_hessian, recipe)
    run_block = _block_staged if cfg.true_sequential else _block_two_pass
    bar = tqdm(total=len(blocks), initial=start, desc=f"{cfg.name} blocks", disable=not progress)
    for i in range(start, len(blocks)):
        block = blocks[i]
        block.to(dev)
        for x in inputs:
            _check_finite(x, f"block {i} input")
        targets = block_targets(model, block, f"{prefix}.{i}", keep)
        t0 = time.perf_counter()
        inputs = run_block(block, f"{prefix}.{i}", targets, inputs, extra, solve, last=i + 1 == len(blocks))
        block.to("cpu")
        if PROFILE:
            print(f"block {i}: {time.perf_counter() - t0:.2f} s in all, of which forward {solve.t_forward:.2f} s, "
                  f"statistics {solve.t_stats:.2f} s, solve {solve.t_solve:.2f} s", file=sys.stderr)
        solve.t_stats = solve.t_solve = solve.t_forward = 0.0
        if state is not None:
            block_prefix = f"{prefix}.{i}."
            state.commit(i, block, {k: v for k, v in recipe.items() if k.startswith(block_prefix)}, inputs)
            if os.environ.get("LEANQ_KILL_AFTER_BLOCK") == str(i):  # test hook: die like a killed process
                os.kill(os.getpid(), signal.SIGKILL)
        bar.update(1)
    bar.close()
    # the model's own module order, whatever order the linears were solved in
    return {name: recipe[name] for name, _ in model.named_modules() if name in recipe}


def _run_key(model, blocks, prefix, spec, cfg, calib, keep, overrides, dev, batch_size) -> str:
    """What decides a run's bytes: settings, each target's spec, calibration tokens, model, device."""
    targets, probe = {}, []  # probe: the first target of the first and the last block stand for the weights
    for i, block in enumerate(blocks):
        lins = block_targets(model, block, f"{prefix}.{i}", keep)
        for rel in lins:
            full = f"{prefix}.{i}.{rel}"
            targets[full] = spec_for(full, spec, overrides).to_dict()
        if lins and i in (0, len(blocks) - 1):
            probe.append(linear_weight(next(iter(lins.values())))[0])
    cfg_d = model.config.to_dict()
    cfg_d.pop("_name_or_path", None)
    return fingerprint({"method": cfg.to_dict(), "spec": spec.to_dict(), "targets": targets,
                        "calib": tensor_digest(calib), "device": dev.type, "batch_size": batch_size,
                        "config": cfg_d, "weights": [tensor_digest(w) for w in probe], "torch": torch.__version__})


def _restore_block(block, i, model, name, keep, done, state) -> None:
    """Rebuild block ``i`` as the state saved it: QuantLinears of the saved layout, then the saved tensors."""
    for rel, lin in block_targets(model, block, name, keep).items():
        mr = done.get(f"{name}.{rel}")
        if mr is None:
            raise LeanqError(f"{state.folder}: no recipe for {name}.{rel} although block {i} is marked done")
        _, b = linear_weight(lin)
        set_submodule(block, rel, QuantLinear(mr.in_features, mr.out_features, mr.spec, mr.bias,
                                              b.dtype if b is not None else torch.float32))
    state.restore_block(i, block, dict(block.state_dict()))


class _Solver:
    """Quantize one target from its accumulated Hessian and build its replacement module."""

    def __init__(self, spec, cfg, overrides, on_hessian, recipe):
        self.spec, self.cfg, self.overrides, self.on_hessian, self.recipe = spec, cfg, overrides, on_hessian, recipe
        self.t_stats = self.t_solve = self.t_forward = 0.0

    def __call__(self, full: str, lin: nn.Module, hsum: torch.Tensor, count: int) -> QuantLinear:
        t = time.perf_counter()
        s = spec_for(full, self.spec, self.overrides)
        w, b = linear_weight(lin)
        _check_finite(w, full)
        h = hsum * (2.0 / count)
        if self.on_hessian is not None:
            self.on_hessian(full, w, h)
        name = self.cfg.name if s.fmt != "float" else "cast"
        qw = get_method(name).fn(w, h, s, self.cfg)
        new = _new_module(qw, b)
        self.recipe[full] = ModuleRecipe(s, name, w.shape[1], w.shape[0], b is not None)
        self.t_solve += time.perf_counter() - t
        return new


def _block_staged(block, name, targets, inputs, extra, solve, last):
    """True-sequential GPTQ in one forward pass per block (see :mod:`leanq.relay`)."""
    relay = Relay([_call(block, x, args, kwargs) for x, (args, kwargs) in zip(inputs, extra)])
    stand_ins = {rel: StageLinear(rel, relay) for rel in targets}
    for rel, st in stand_ins.items():
        set_submodule(block, rel, st)
    done: dict[str, nn.Module] = {}
    prev = None  # (inputs, H sum, rows) of the last linear solved: q/k/v and gate/up share theirs
    try:
        with reuse_dequantized(list(block.modules())):
            for rel, xs in relay.stages():
                if rel in done:
                    raise RuntimeError(f"{name}.{rel} was called twice in one forward pass")
                t = time.perf_counter()
                if prev is None or not _same_tensors(prev[0], xs):
                    rows = [x.reshape(-1, x.shape[-1]) for x in xs]
                    hsum = gram(rows[0].float())
                    for r in rows[1:]:
                        hsum += gram(r.float())
                    prev = (xs, hsum, sum(r.shape[0] for r in rows))
                solve.t_stats += time.perf_counter() - t
                new = solve(f"{name}.{rel}", targets[rel], prev[1], prev[2])
                new.to(xs[0].device)
                stand_ins[rel].impl = done[rel] = new
                if last and len(done) == len(targets):
                    break  # the last block's outputs feed nothing
    finally:
        relay.close()
        solve.t_forward += relay.seconds
        for rel in targets:  # on failure the float linears go back
            set_submodule(block, rel, done.get(rel, targets[rel]))
    missing = sorted(set(targets) - set(done))
    if missing:
        raise RuntimeError(f"{name}: linears never called by the block: {', '.join(missing)}")
    return [] if last else [_first(o) for o in relay.outputs]


def _call(block, x, args, kwargs):
    return lambda: block(x, *args, **kwargs)


def _same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """The same storage in every batch (while ``a`` is alive no other tensor can take its address)."""
    return all(x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
               for x, y in zip(a, b, strict=True))


def _block_two_pass(block, name, targets, inputs, extra, solve, last):
    """Statistics from the float block, quantize every linear, re-run the block quantized."""
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
                t = time.perf_counter()
                shared[key] = (x, gram(x))
                solve.t_stats += time.perf_counter() - t
            hessians[rel] = hessians.get(rel, 0) + shared[key][1]
            counts[rel] = counts.get(rel, 0) + x.shape[0]
            if len(order) < len(targets):
                order.append(rel)
            elif rel == order[-1]:
                raise Stop  # every statistic of this batch is in: skip the rest of the block
        return hook

    for rel, lin in targets.items():
        handles.append(lin.register_forward_pre_hook(make_hook(rel)))
    try:
        with torch.no_grad():
            for x, (args, kwargs) in zip(inputs, extra):
                shared.clear()
                try:
                    block(x, *args, **kwargs)
                except Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        shared.clear()

    for rel, lin in targets.items():
        new = solve(f"{name}.{rel}", lin, hessians.pop(rel), counts[rel])
        new.to(next(iter(new.buffers())).device)
        set_submodule(block, rel, new)
    if last:  # the last block's outputs feed nothing
        return []
    with torch.no_grad(), reuse_dequantized(list(block.modules())):
        return [_first(block(x, *args, **kwargs)) for x, (args, kwargs) in zip(inputs, extra)]


def gram(x: torch.Tensor, chunk: int = 192) -> torch.Tensor:
    """XᵀX [d, d] for x [n, d]: only the blocks on and above the diagonal are multiplied.

    With k column chunks that is (k+1)/2k of the full product (5/8 for d=576,
    ~0.56 for d=1536 at the default chunk), the lower blocks are copies.
    """
    d = x.shape[1]
    if d < 2 * chunk:
        return x.t() @ x
    k = -(-d // chunk)
    edges = [round(i * d / k) for i in range(k + 1)]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for a in range(k):
        a0, a1 = edges[a], edges[a + 1]
        xa = x[:, a0:a1]
        blk = xa.t() @ x[:, a0:]  # the diagonal block and everything to its right
        out[a0:a1, a0:] = blk
        out[a1:, a0:a1] = blk[:, a1 - a0 :].t()
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
        raise Stop

    # everything but the blocks goes to the device for this one pass
    _move_outside_blocks(model, blocks, dev)
    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, calib.shape[0], batch_size):
                try:
                    model(calib[start : start + batch_size].to(dev), use_cache=False)
                except Stop:
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
