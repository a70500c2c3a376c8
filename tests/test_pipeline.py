"""The sequential pipeline hands each linear the Hessian of its own input."""

import torch

from leanq.config import MethodConfig, QuantSpec
from leanq.pipeline import gram, quantize_blocks

from conftest import tiny_model


def test_gram_equals_xtx():
    x = torch.randn(300, 640, dtype=torch.float64)
    torch.testing.assert_close(gram(x), x.t() @ x)


def test_each_linear_gets_its_own_hessian():
    """o_proj and gate_proj inputs have the same shape in this model: their statistics
    must never be mixed up (an input freed and its address reused must not alias)."""
    torch.manual_seed(0)
    ref_model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    # expected: block 0's inputs come from the float model, so compute them directly
    inputs, hooks = {}, []
    for name, m in ref_model.model.layers[0].named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, a, name=name: inputs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for start in range(0, 8, 4):
            ref_model(ids[start : start + 4])
    for h in hooks:
        h.remove()

    got = {}
    model = tiny_model("llama", seed=1)
    quantize_blocks(model, QuantSpec(bits=4, group_size=32), MethodConfig(name="gptq"), ids, batch_size=4,
                    progress=False, on_hessian=lambda name, w, h: got.setdefault(name, h.clone()))
    for name, xs in inputs.items():
        x = torch.cat(xs)
        want = 2 * x.t() @ x / x.shape[0]
        torch.testing.assert_close(got[f"model.layers.0.{name}"], want, rtol=1e-4, atol=1e-5)
