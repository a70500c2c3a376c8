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
    name: str
    fn: Callable
    needs_data: bool
    help: str


METHODS: dict[str, MethodInfo] = {}


def register(name: str, needs_data: bool, help: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS[name] = MethodInfo(name, fn, needs_data, help)
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise LeanqError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import gptq, rtn  # noqa: E402,F401  (fill the registry)
