"""Methods choose the quantized values; each is a pure function of tensors.

A method is registered by name with :func:`register` and called as
``fn(W, H, spec, cfg) -> QuantizedWeight``: W is the float weight [out, in],
H the calibration Hessian ``2/n · XᵀX`` [in, in] (None for data-free
methods), spec the storage format and cfg the method's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import LeanqError


@dataclass(frozen=True)
class MethodInfo:
    """fmt: the storage format the method writes; spec: QuantSpec fields it fixes
    (e.g. bits=8 for fp8, in_scale=True for awq); default_group: the group or
    block size used when the caller asks for the method's default ("auto")."""

    name: str
    fn: Callable
    needs_data: bool
    help: str
    fmt: str = "int"
    spec: tuple = ()
    default_group: int | None = 128


METHODS: dict[str, MethodInfo] = {}


def register(name: str, needs_data: bool, help: str, fmt: str = "int", spec: dict | None = None,
             default_group: int | None = 128) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS[name] = MethodInfo(name, fn, needs_data, help, fmt, tuple(sorted((spec or {}).items())), default_group)
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise LeanqError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import gptq, rtn  # noqa: E402,F401  (fill the registry)
from . import awq, hqq, lowbit_float, w8a8  # noqa: E402,F401  (awq, awq+gptq, hqq, nf4, fp8, w8a8)
from . import vq  # noqa: E402,F401  (vector quantization, fmt="vq")
from . import trained  # noqa: E402,F401  (learned, qat: block/model-level drivers in leanq.learned, leanq.qat)
