"""QAT (leanq.qat): distillation lowers the KL, resume continues exactly, checkpoints load back."""

import copy

import pytest
import torch

from leanq.config import MethodConfig, QuantSpec
from leanq.errors import LeanqError
from leanq.qat import kl_loss, lr_at, qat_quantize

from conftest import tiny_model

SPEC = QuantSpec(bits=2, group_size=32)
CFG = MethodConfig(name="qat", seqlen=32, steps=6, lr=1e-3, scale_lr=1e-2, train_batch=2, act_order=True,
                   mse_clip=True, refit=True)


def _data():
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(2))
    text = torch.randint(0, 96, (600,), generator=torch.Generator().manual_seed(3))
    return calib, text


def _codes(model):
    return {n: (m.qweight.clone(), m.scales.clone(), m.zeros.clone()) for n, m in model.named_modules()
            if hasattr(m, "qweight")}


def _kl(model, teacher, ids):
    with torch.no_grad():
        return kl_loss(model(ids).logits, teacher(ids).logits).item()


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert abs(kl_loss(a, a).item()) < 1e-6
    assert kl_loss(a, a + torch.randn_like(a)).item() > 0


def test_lr_schedule_warms_up_and_decays_to_zero():
    lrs = [lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] < lrs[4] <= 1.0 and lrs[-1] < 0.01 and max(lrs) <= 1.0


def test_qat_lowers_the_distillation_loss():
    """Trained from an RTN start, the frozen model is closer to the float model on held-out ids."""
    calib, text = _data()
    teacher = tiny_model("llama", seed=1, initializer_range=0.1)  # peaked enough outputs for quantization to matter
    held = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(9))
    start = copy.deepcopy(teacher)
    qat_quantize(start, SPEC, MethodConfig(name="qat", init="rtn", seqlen=32, steps=1, lr=1e-12, scale_lr=1e-12,
                                           train_batch=2), calib, text, progress=False)
    trained = copy.deepcopy(teacher)
    log = {}
    qat_quantize(trained, SPEC, MethodConfig(name="qat", init="rtn", seqlen=32, steps=30, lr=1e-3, scale_lr=1e-2,
                                             train_batch=4), calib, text, progress=False, log=log)
    assert _kl(trained, teacher, held) < 0.85 * _kl(start, teacher, held)  # measured: 0.337 -> 0.249
    assert sum(log["losses"][-5:]) < sum(log["losses"][:5])


def test_resume_after_interruption_continues_from_the_saved_step(tmp_path):
    calib, text = _data()
    base = tiny_model("llama", seed=1)
    full = copy.deepcopy(base)
    log_full = {}
    qat_quantize(full, SPEC, CFG, calib, text, progress=False, state=tmp_path / "a.pt", state_every=3, log=log_full)

    seen = []

    def interrupt(step, loss):
        seen.append(step)
        if step == 4:  # the state on disk is the one of step 3
            raise KeyboardInterrupt

    part = copy.deepcopy(base)
    with pytest.raises(KeyboardInterrupt):
        qat_quantize(part, SPEC, CFG, calib, text, progress=False, state=tmp_path / "b.pt", state_every=3,
                     on_step=interrupt)
    assert seen == [1, 2, 3, 4]
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["step"] == 3

    resumed_steps = []
    again = copy.deepcopy(base)
    log = {}
    qat_quantize(again, SPEC, CFG, calib, text, progress=False, state=tmp_path / "b.pt", state_every=3,
                 resume=True, log=log, on_step=lambda s, l: resumed_steps.append(s))
    assert resumed_steps == [4, 5, 6]  # continued from the saved step
    assert log["losses"] == log_full["losses"]
    a, b = _codes(full), _codes(again)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        for x, y in zip(a[n], b[n]):
            assert torch.equal(x, y), n


def test_resume_refuses_a_state_of_other_settings(tmp_path):
    calib, text = _data()
    base = tiny_model("llama", seed=1)
    qat_quantize(copy.deepcopy(base), SPEC, CFG, calib, text, progress=False, state=tmp_path / "s.pt", state_every=3)
    with pytest.raises(LeanqError, match="other settings"):
        qat_quantize(copy.deepcopy(base), QuantSpec(bits=3, group_size=32), CFG, calib, text, progress=False,
                     state=tmp_path / "s.pt", resume=True)


def test_lora_trains_adapters_and_freezes_into_the_same_format():
    calib, text = _data()
    model = tiny_model("llama", seed=1)
    cfg = MethodConfig(name="qat", init="rtn", seqlen=32, steps=3, lr=1e-2, train_batch=2, lora_rank=4)
    rec = qat_quantize(model, SPEC, cfg, calib, text, progress=False)
    assert {r.method for r in rec.values()} == {"qat"}
    assert len(_codes(model)) == 14


def test_qat_checkpoint_save_load_identity(tiny_hf_folder, text_file, tmp_path):
    from leanq.api import load, quantize

    qm = quantize(str(tiny_hf_folder), method="qat", bits=3, group_size=32, calib=str(text_file), nsamples=4,
                  seqlen=32, steps=3, device="cpu", progress=False)
    model, _, recipe = load(qm.save(tmp_path / "ck"))
    assert {m.method for m in recipe.modules.values()} == {"qat"}
    ids = torch.randint(0, 90, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, qm.model(ids).logits, rtol=0, atol=0)


def test_qat_cli_state_file_and_resume(tiny_hf_folder, text_file, tmp_path):
    from leanq.api import load
    from leanq.cli import main

    out = tmp_path / "ck"
    rc = main(["quantize", str(tiny_hf_folder), "--method", "qat", "--bits", "2", "--group-size", "32",
               "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--steps", "4", "--state-every", "2",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert (tmp_path / "ck.qat-state.pt").exists()
    model, _, recipe = load(out)
    assert recipe.method.name == "qat" and recipe.method.steps == 4 and recipe.method.init == "gptq"
    # resuming a finished run trains no further and writes the same weights
    out2 = tmp_path / "ck2"
    rc = main(["quantize", str(tiny_hf_folder), "--method", "qat", "--bits", "2", "--group-size", "32",
               "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--steps", "4",
               "--state", str(tmp_path / "ck.qat-state.pt"), "--resume", "--device", "cpu", "--out", str(out2)])
    assert rc == 0
    assert (out / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()
    ids = torch.randint(0, 90, (1, 20), generator=torch.Generator().manual_seed(0))
    again, _, _ = load(out2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)
