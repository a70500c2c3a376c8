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


def _linear_inputs(model, ids, batch_size):
    """Every linear's input rows over the calibration batches, running ``model`` as it stands."""
    inputs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or hasattr(m, "qweight"):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, a, name=name: inputs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start : start + batch_size])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


import pytest  # noqa: E402


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_true_sequential_sees_the_quantized_model(model_type):
    """With true_sequential each linear is calibrated on exactly the inputs it receives in the
    finished quantized model: every earlier linear (this block and before) already quantized."""
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    got = {}
    model = tiny_model(model_type, seed=1)
    quantize_blocks(model, QuantSpec(bits=3, group_size=32), MethodConfig(name="gptq", true_sequential=True), ids,
                    batch_size=4, progress=False, on_hessian=lambda name, w, h: got.setdefault(name, h.clone()))
    seen = _linear_inputs(model, ids, 4)
    quantized = [n for n in seen if n in got]
    assert len(quantized) == len(got) > 0
    for name in quantized:
        x = seen[name]
        torch.testing.assert_close(got[name], 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    # and it is not the two-pass answer: o_proj-like inputs differ once q/k/v are quantized
    two = {}
    quantize_blocks(tiny_model(model_type, seed=1), QuantSpec(bits=3, group_size=32), MethodConfig(name="gptq"), ids,
                    batch_size=4, progress=False, on_hessian=lambda name, w, h: two.setdefault(name, h.clone()))
    assert any(not torch.allclose(two[n], got[n]) for n in got if ".0." in n)


def test_true_sequential_float_cast_matches_two_pass():
    """A float32 "cast" changes no weight, so both pipelines must hand out the same Hessians."""
    ids = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(3))
    out = []
    for ts in (False, True):
        got = {}
        quantize_blocks(tiny_model("llama", seed=4), QuantSpec(fmt="float", dtype="float32"),
                        MethodConfig(name="gptq", true_sequential=ts), ids, batch_size=2, progress=False,
                        on_hessian=lambda name, w, h: got.setdefault(name, h.clone()))
        out.append(got)
    assert out[0].keys() == out[1].keys()
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=0, atol=0)


def test_true_sequential_is_deterministic_and_cleans_up_after_errors(monkeypatch):
    import threading

    from leanq.methods import METHODS, MethodInfo
    from leanq.errors import LeanqError

    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(5))
    spec, cfg = QuantSpec(bits=4, group_size=32), MethodConfig(name="gptq", true_sequential=True)
    a, b = tiny_model("llama", seed=6), tiny_model("llama", seed=6)
    quantize_blocks(a, spec, cfg, ids, batch_size=2, progress=False)
    quantize_blocks(b, spec, cfg, ids, batch_size=2, progress=False)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na

    before = threading.active_count()
    calls = []
    real = METHODS["gptq"]

    def failing(w, h, s, c):
        calls.append(1)
        if len(calls) == 3:
            raise LeanqError("boom")
        return real.fn(w, h, s, c)

    monkeypatch.setitem(METHODS, "gptq", MethodInfo("gptq", failing, True, "test"))
    m = tiny_model("llama", seed=6)
    with pytest.raises(LeanqError, match="boom"):
        quantize_blocks(m, spec, cfg, ids, batch_size=2, progress=False)
    assert threading.active_count() == before  # every parked batch was unwound
    layer = m.model.layers[0]
    # the two linears solved before the failure are quantized, every other one is float again
    assert sum(hasattr(mod, "qweight") for mod in layer.modules()) == 2
    assert not any(type(mod).__name__ == "StageLinear" for mod in m.modules())
