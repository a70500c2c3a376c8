"""transformers' ``generate`` with each decode step replayed from one CUDA graph.

With a static cache on a GPU, ``generate`` compiles the model's forward (torch.compile, mode reduce-overhead) and
calls the compiled forward once per new token.  The host's work around each call (dynamo's guards, the CUDA graph
trees' bookkeeping and input copies) leaves the GPU idle between steps, as long for a 4-bit model as for its BF16
self, so a quantized model's faster kernels show up only in part (docs/PERFORMANCE.md, versions 26 and 27).

:func:`enable` gives ``generate`` another compiled call.  The forward is compiled by torch.compile as before (the
same fused kernels, no graph trees); the first decode step runs it on a side stream and records it as one CUDA
graph, and every later step copies its few small inputs (token ids, positions, the 4D mask: fixed shapes under a
static cache) into the graph's buffers and replays it.  The cache's tensors, its write position included (a device
counter the step advances in place), are the ones the graph holds.  ``generate`` makes a new cache per call: one of
the same layout is adopted (its contents and the graph's tensors trade places, so each cache keeps its own
contents); another length or batch, dtype or shape records a new graph.  Anything a graph cannot hold (no static
cache, positional arguments, other objects) runs the compiled forward as usual.

    import leanq.hf_graph
    leanq.hf_graph.enable(model)
    model.generate(ids, max_new_tokens=256, cache_implementation="static")

Prefill runs as transformers runs it (uncompiled; but see ``prefill`` below), and everything off a GPU is untouched
(generate compiles only on a GPU with a static cache).  A replay runs the recorded kernels, so its logits are the compiled forward's.

``generate`` also asks the GPU after every step whether to stop, which holds the host until the step has run, so the
next step's host work (its inputs, the mask, the launch) and the GPU's work never overlap.  transformers has a
deferred check for this (``DeferredStopCheck``: the answer read one step late, one extra step undone at the end) and
uses it on Apple's GPUs only; for the generates of a model given to :func:`enable` it is used on CUDA too
(``defer_stop``).  The tokens and what ``generate`` returns are the same either way.

transformers runs the prompt's forward (prefill) uncompiled, one Python call per module: for a short prompt that is
most of what a generate costs besides its steps (28-40 ms of a 7B-shaped model's, docs/PERFORMANCE.md, version
28).  With a chunked prefill (``prefill_chunk_size``) it asks for the compiled call for the prompt too; calls of more
than one token then go to a compile of the forward with dynamic shapes (no graph: prompts differ in length), and
``enable(model, prefill=True)`` asks for such a prefill on every generate with a static cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

_PLAIN = (bool, int, float, str, type(None))
# True while a generate of a model enabled with defer_stop runs: transformers' deferred stop check is then allowed on
# CUDA
_DEFER = contextvars.ContextVar("leanq_hf_graph_defer", default=False)


def _on_gpu(tensors) -> bool:
    return all(t.device.type == "cuda" for t in tensors)


def _bindings(cache) -> list[tuple[object, str, torch.Tensor]] | None:
    """Every tensor a static cache's layers hold (keys, values, the write position) as (layer, attribute, tensor);
    None for anything else (no layers, not compileable, not yet initialised)."""
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(cache, "is_compileable", False):
        return None
    out = []
    for layer in layers:
        if not getattr(layer, "is_initialized", True):
            return None
        ts = [(layer, k, v) for k, v in sorted(vars(layer).items()) if isinstance(v, torch.Tensor)]
        if not ts:
            return None
        out += ts
    return out


def _layout(b: list[tuple[object, str, torch.Tensor]]) -> tuple:
    return tuple((a, tuple(t.shape), t.dtype, t.device) for _, a, t in b)


def call_key(kw: dict[str, Any]) -> tuple | None:
    """What a recorded graph depends on in a forward's keyword arguments: each tensor's shape, dtype and device,
    the plain values themselves, and for a static cache the address, shape and dtype of every tensor it holds.
    None when an argument is none of these (the call then runs without a graph)."""
    key = []
    for name in sorted(kw):
        v = kw[name]
        if isinstance(v, torch.Tensor):
            key.append((name, "t", tuple(v.shape), v.dtype, str(v.device)))
        elif isinstance(v, _PLAIN):
            key.append((name, "v", v))
        else:
            b = _bindings(v)
            if b is None:
                return None
            key.append((name, "c", tuple((a, t.data_ptr(), tuple(t.shape), t.dtype) for _, a, t in b)))
    return tuple(key)


def _tokens(kw: dict[str, Any]) -> int:
    """Tokens per sequence of a forward's keyword arguments (input_ids [..., T] or inputs_embeds [..., T, H]); 0 when
    neither is a tensor."""
    ids = kw.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return ids.shape[-1]
    emb = kw.get("inputs_embeds")
    if isinstance(emb, torch.Tensor) and emb.dim() >= 2:
        return emb.shape[-2]
    return 0


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    names: frozenset
    tensors: dict[str, tuple]  # name -> (shape, dtype, device)
    plain: dict[str, Any]
    cache_name: str | None
    cache: object
    bindings: list  # the cache's (layer, attribute, tensor): the tensors the graph reads and writes
    inputs: dict[str, torch.Tensor]  # the graph's copies of the call's tensors
    out: Any
    replays: int = 0


class GraphedCall:
    """A compiled forward whose calls on CUDA tensors replay a recorded CUDA graph (see the module's text).

    A call matches the recorded graph when it has the same argument names, tensor shapes, dtypes and devices and
    plain values, and the same cache tensors; that check is a few microseconds of host time (a 32-layer cache's
    full key would be about 0.3 ms a step). A new cache of the same layout (``generate`` makes one per call) is
    adopted instead of recorded again: its contents and the graph's tensors trade places, so the new cache holds the
    graph's tensors with its own contents and the old one keeps its contents in the new cache's former tensors.

    Calls that change what a graph depends on every time (a plain value that counts steps, say) would record a
    graph per call: after ``MAX_IDLE_RECORDS`` graphs in a row that were never replayed, every call runs the compiled
    forward without a graph (``given_up``), with one warning.

    Calls of more than one token (a prompt's forward, which transformers sends here under a chunked prefill) go to
    ``prefill_fn`` (by default ``fn``) and record nothing: prompts differ in length, and a graph per length would
    push out the decode step's.

    ``captures``: graphs recorded; ``adoptions``: new caches taken into the recorded graph; ``replays``: calls
    answered by a replay; ``prefills``: calls of more than one token."""

    MAX_IDLE_RECORDS = 3

    def __init__(self, fn: Callable, pdl: bool = False, prefill_fn: Callable | None = None):
        self.fn = fn
        self.prefill_fn = fn if prefill_fn is None else prefill_fn
        self.pdl = pdl
        self.prefills = 0
        self.rec: _Recorded | None = None
        self.captures = self.adoptions = self.replays = 0
        self.idle_records = 0
        self.given_up = False

    def __call__(self, *args, **kw):
        if _tokens(kw) > 1:
            self.prefills += 1
            return self.prefill_fn(*args, **kw)
        if self.given_up:
            return self.fn(*args, **kw)
        rec = self.rec
        if rec is not None and not args:
            how = self._match(rec, kw)
            if how:
                if how == "adopt":
                    self._adopt(rec, kw[rec.cache_name])
                for name, buf in rec.inputs.items():
                    buf.copy_(kw[name])
                rec.graph.replay()
                rec.replays += 1
                self.replays += 1
                return rec.out
        tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
        if args or not tensors or not _on_gpu(tensors.values()):
            return self.fn(*args, **kw)
        caches = [k for k, v in kw.items() if not isinstance(v, (torch.Tensor,) + _PLAIN)]
        if len(caches) > 1 or call_key(kw) is None:
            return self.fn(**kw)
        if self.rec is not None:
            self.idle_records = 0 if self.rec.replays else self.idle_records + 1
            if self.idle_records >= self.MAX_IDLE_RECORDS:
                warnings.warn(f"leanq.hf_graph: {self.idle_records} CUDA graphs in a row were recorded and never "
                              "replayed (the forward's arguments change every call); running without a graph")
                self.given_up, self.rec = True, None
                return self.fn(**kw)
        return self._record(kw, tensors, caches[0] if caches else None)

    @staticmethod
    def _match(rec: _Recorded, kw: dict) -> str | None:
        """"same" when the call fits the recorded graph, "adopt" when only its cache differs (same layout), else
        None."""
        if kw.keys() != rec.names:
            return None
        how = "same"
        for name, v in kw.items():
            if name in rec.tensors:
                if not isinstance(v, torch.Tensor) or (v.shape, v.dtype, v.device) != rec.tensors[name]:
                    return None
            elif name == rec.cache_name:
                if v is not rec.cache or any(getattr(layer, a) is not t for layer, a, t in rec.bindings):
                    b = _bindings(v)
                    if b is None or _layout(b) != _layout(rec.bindings):
                        return None
                    how = "adopt"
            else:
                want = rec.plain[name]
                if type(v) is not type(want) or v != want:
                    return None
        return how

    def _adopt(self, rec: _Recorded, cache) -> None:
        """Swap the contents of ``cache``'s tensors with the graph's, and the tensors between the two caches."""
        new = _bindings(cache)
        with torch.no_grad():
            for (old_layer, a, g), (new_layer, _, n) in zip(rec.bindings, new):
                if n is g:
                    continue
                tmp = g.clone()
                g.copy_(n)
                n.copy_(tmp)
                setattr(old_layer, a, n)
                setattr(new_layer, a, g)
        old, rec.cache = rec.cache, cache
        rec.bindings = [(layer, a, g) for (layer, a, _), (_, _, g) in zip(new, rec.bindings)]
        for k in list(rec.out.keys()) if hasattr(rec.out, "keys") else ():
            if rec.out[k] is old:
                rec.out[k] = cache
        self.adoptions += 1

    def _record(self, kw: dict, tensors: dict[str, torch.Tensor], cname: str | None):
        """Run this step for real (on a side stream: compiles, sizes the kernels' scratch) and record it into a new
        graph over copies of its tensor inputs; the real step's output is returned."""
        self.rec = None  # the old graph's memory goes first
        dev = next(iter(tensors.values())).device
        static = {k: v.clone() for k, v in tensors.items()}
        call = {**kw, **static}
        # the step itself runs first: it writes this token's keys and values and advances the cache
        with _inductor_pdl(self.pdl):
            out, g, gout = run_and_record(lambda: self.fn(**call), dev)
        self.rec = _Recorded(graph=g, names=frozenset(kw), cache_name=cname,
                             tensors={k: (v.shape, v.dtype, v.device) for k, v in tensors.items()},
                             plain={k: v for k, v in kw.items() if isinstance(v, _PLAIN)},
                             cache=kw[cname] if cname else None, bindings=_bindings(kw[cname]) if cname else [],
                             inputs=static, out=gout)
        self.captures += 1
        return out


def run_and_record(step: Callable[[], Any], device: torch.device) -> tuple[Any, torch.cuda.CUDAGraph, Any]:
    """Run ``step`` once for real on a side stream (torch.compile compiles there, kernels size their scratch outside
    any graph), then record it, not run, into a new CUDA graph. Returns (the real run's output, the graph, the
    recorded output, which each replay rewrites)."""
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = step()
    main.wait_stream(side)
    for v in (out.values() if isinstance(out, dict) else [out]):
        if isinstance(v, torch.Tensor):
            v.record_stream(main)  # made on the side stream, read on this one
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = step()
    return out, g, gout


@contextlib.contextmanager
def _inductor_pdl(on: bool):
    """TorchInductor's programmatic dependent launch (``torch._inductor.config.triton.enable_pdl``) switched on while
    the forward compiles and is recorded, when ``on``; as it was otherwise and afterwards."""
    if not on:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.enable_pdl": True}):
        yield


def _compile_kwargs(compile_config) -> dict:
    """torch.compile's arguments from transformers' CompileConfig (or its defaults), without CUDA graph trees: the
    graph is ours."""
    d = dict(compile_config.to_dict()) if compile_config is not None else {}
    kw = {k: d[k] for k in ("fullgraph", "dynamic", "backend") if k in d}
    if kw.get("dynamic") is None:  # every decode step has the same shapes
        kw["dynamic"] = False
    opts = {k: v for k, v in (d.get("options") or {}).items() if k != "triton.cudagraphs"}
    if opts:
        kw["options"] = opts
    return kw


def _install_deferred_stop() -> bool:
    """Let transformers' ``DeferredStopCheck`` serve CUDA while ``_DEFER`` is set (its own rule otherwise: Apple's GPUs
    only), for a generate without an assistant model whose cache is not returned: the extra step's cache entries then
    go with the cache (a returned cache would be cropped back every step, which a recorded graph does not follow).
    False when this transformers has no deferred check."""
    try:
        from transformers.generation import utils as gen_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    cls = getattr(gen_utils, "DeferredStopCheck", None)
    if cls is None or not hasattr(cls, "is_supported"):
        return False
    if getattr(cls.is_supported, "_leanq_original", None) is not None:
        return True
    original = cls.is_supported

    def is_supported(device, cache, cache_is_returned, is_assistant):
        if _DEFER.get() and torch.device(device).type == "cuda" and not is_assistant:
            return cache is None or not cache_is_returned
        return original(device, cache, cache_is_returned, is_assistant)

    is_supported._leanq_original = original
    cls.is_supported = staticmethod(is_supported)
    return True


def enable(model, compile: bool = True, pdl: bool = False, defer_stop: bool = True, prefill: bool = False):
    """Make ``model.generate`` (transformers) replay each decode step from a CUDA graph; returns the model.

    ``generate`` asks the model for its compiled call when it decodes on a GPU with a static cache; this hands it a
    :class:`GraphedCall` over ``torch.compile(model.__call__)`` (``compile=False``: over the plain call, each step's
    kernels as eager PyTorch runs them), made on that first request. ``pdl``: compile and record with TorchInductor's
    programmatic dependent launch (Hopper on; its kernels let the next one start while they finish, and leanq's own
    kernels then leave their trigger to their end): a 7B-shaped model's 4-bit decode measured 8-18% faster with it
    on an H200, BF16 4-5% (docs/PERFORMANCE.md, version 27). Off by default: it is TorchInductor's opt-in mode.
    ``defer_stop``: this model's generates on CUDA read the stop decision one step late (transformers'
    ``DeferredStopCheck``), so the host prepares and launches the next step while the GPU runs this one; generates
    that return their cache (``return_dict_in_generate``, a cache passed in) keep the check of every step.
    ``prefill``: generates with a static cache that set no ``prefill_chunk_size`` get one larger than any prompt, so
    transformers sends the prompt's forward to the compiled call too (one chunk), where it runs compiled with
    dynamic shapes (the first prompt compiles it, which makes the first generate longer: 29-74 s of warm-up against
    17-34 s on an H200 for the 7B-shaped model). Off by default: on an H200 it sped a 4-bit decode by 2% and BF16's
    by 2% without ``pdl``, and with ``pdl`` by -2% to +8% depending on the host (docs/PERFORMANCE.md, version 29).
    :func:`disable` undoes it."""
    if not callable(getattr(model, "get_compiled_call", None)) or not hasattr(model, "generate"):
        from .errors import LeanqError

        raise LeanqError(f"hf_graph.enable: {type(model).__name__} is not a transformers generation model")
    defer = bool(defer_stop) and _install_deferred_stop()
    model._leanq_graph_options = dict(compile=compile, pdl=pdl, defer_stop=defer, prefill=prefill)
    # instance attributes that shadow the class's methods, bound methods so that a copy of the model binds its own
    model.get_compiled_call = types.MethodType(_get_compiled_call, model)
    vars(model).pop("generate", None)
    if defer or prefill:
        model.generate = types.MethodType(_graph_generate, model)
    return model


# a prefill chunk larger than any prompt: transformers' chunked prefill in one chunk
PREFILL_CHUNK = 1 << 30


def _get_compiled_call(model, compile_config=None) -> GraphedCall:
    """``get_compiled_call`` of an enabled model: its GraphedCall, made on the first request (with ``compile``, a
    compile with fixed shapes for the decode steps and, made lazily by torch.compile, one with dynamic shapes for
    prompts)."""
    call = vars(model).get("_leanq_graphed")
    if call is None:
        opts = model._leanq_graph_options
        fn = prefill_fn = model.__call__
        if opts["compile"]:
            kw = _compile_kwargs(compile_config)
            fn = torch.compile(model.__call__, **kw)
            prefill_fn = torch.compile(model.__call__, **dict(kw, dynamic=True))
        call = model._leanq_graphed = GraphedCall(fn, pdl=opts["pdl"], prefill_fn=prefill_fn)
    return call


def _one_chunk_prefill(model, kwargs: dict) -> bool:
    """A generate with a static cache that gives no prefill chunk size (by argument or in its generation config)."""
    if "prefill_chunk_size" in kwargs:
        return False
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    impl = kwargs.get("cache_implementation", getattr(cfg, "cache_implementation", None))
    return impl == "static" and getattr(cfg, "prefill_chunk_size", None) is None


def _graph_generate(model, *args, **kwargs):
    """``generate`` of an enabled model: the class's generate, with the deferred stop check allowed (``defer_stop``)
    and the prompt sent to the compiled call (``prefill``, with a static cache and no chunk size given)."""
    opts = model._leanq_graph_options
    if opts["prefill"] and _one_chunk_prefill(model, kwargs):
        kwargs["prefill_chunk_size"] = PREFILL_CHUNK
    token = _DEFER.set(opts["defer_stop"])
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        _DEFER.reset(token)


def disable(model):
    """Undo :func:`enable` (generate compiles as transformers does by default again); returns the model."""
    for name in ("get_compiled_call", "_leanq_graphed", "generate", "_leanq_graph_options"):
        vars(model).pop(name, None)
    return model


def graphed_call(model) -> GraphedCall | None:
    """The :class:`GraphedCall` that :func:`enable` gave ``model`` (None before generate first asked for it)."""
    return vars(model).get("_leanq_graphed")
