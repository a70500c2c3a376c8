"""The dispatch table (kernels/__init__.py): inside torch.compile, a kernel whose layout was never built steps aside."""

from __future__ import annotations

import torch

from leanq import kernels
from leanq.kernels import Kernel, register_kernel, select


class _Layer(torch.nn.Module):
    fmt = "dispatch-test"

    def __init__(self):
        super().__init__()
        self.in_features = 4
        self._cache: dict = {}

    def forward(self, x):
        return select(self, x).run(self, x)


def test_compiled_select_skips_kernels_whose_layout_is_not_built():
    fast = register_kernel(Kernel("test-fast", "dispatch-test", ("any",), lambda m, x: True, lambda m, x: x * 2,
                                  priority=5, layout="test-slot"))
    slow = register_kernel(Kernel("test-slow", "dispatch-test", ("any",), lambda m, x: True, lambda m, x: x * 3,
                                  priority=1))
    try:
        m, x = _Layer(), torch.ones(2, 4)
        assert torch.equal(m(x), x * 2)  # eagerly the first kernel serves (and would build its layout)
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), x * 3)  # traced without the layout: the next kernel, no graph break
        m._cache["test-slot"] = object()
        torch._dynamo.reset()
        assert torch.equal(torch.compile(m, backend="eager", fullgraph=True)(x), x * 2)
    finally:
        kernels.KERNELS.remove(fast)
        kernels.KERNELS.remove(slow)
        torch._dynamo.reset()
