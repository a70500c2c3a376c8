"""Perplexity follows the protocol; the size report counts what is stored."""

import math

import torch
import torch.nn.functional as F

from leanq.config import MethodConfig, QuantSpec
from leanq.evaluate import model_bytes, perplexity, size_report
from leanq.formats.intq import bits_per_weight
from leanq.pipeline import quantize_blocks

from conftest import tiny_model


def test_perplexity_matches_manual_protocol():
    m = tiny_model("llama")
    ids = torch.randint(0, 96, (100,), generator=torch.Generator().manual_seed(0))
    ppl, n = perplexity(m, ids, window=16, max_windows=None, progress=False)
    nll = 0.0
    with torch.no_grad():
        for i in range(100 // 16):  # the 4-token tail is dropped
            x = ids[i * 16 : (i + 1) * 16]
            nll += F.cross_entropy(m(x[None]).logits[0, :-1], x[1:], reduction="sum").item()
    assert n == 6 * 15
    assert math.isclose(ppl, math.exp(nll / n), rel_tol=1e-9)
    assert perplexity(m, ids, window=16, max_windows=2, progress=False)[1] == 30


def test_size_report_counts_packed_bytes():
    m = tiny_model("llama")
    before = model_bytes(m)
    spec = QuantSpec(bits=3, group_size=32)
    quantize_blocks(m, spec, MethodConfig(name="rtn"), None, progress=False)
    rep = size_report(m, None)
    # 2 blocks x (q,o: 64x64; k,v: 32x64; gate,up: 96x64; down: 64x96)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)] * 2
    assert rep.quantized_params == sum(o * i for o, i in shapes)
    want = sum(bits_per_weight(spec, o, i) * o * i for o, i in shapes) / rep.quantized_params
    assert abs(rep.bits_per_weight - want) < 1e-9
    assert rep.bytes_in_memory < before
