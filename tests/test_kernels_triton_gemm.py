"""The batched GEMM on the rk words (kernels.triton_gemm): on a GPU when there is one, else through Triton's
interpreter on the CPU (fp32 activations; the interpreter has no bf16 dots), tiny shapes."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from leanq.kernels import cuda_int as ci  # noqa: E402
from leanq.kernels import triton_gemm as tg  # noqa: E402

from test_kernels_cuda_int import _layer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEV == "cuda" else [torch.float32]
# (bits, group, sym, scale dtype, N, K, M, launch config): partial tiles of rows and batch, BK below the group,
# split-K with a ragged last range, 2/4/8 bits, bf16 and fp16 scales, x as the first operand (XA) or the second
CASES = [(4, 128, False, torch.float16, 40, 256, 20, dict(BN=32, BM=16, BK=64, SPLIT=1, GM=2)),
         (4, 64, True, torch.bfloat16, 64, 320, 33, dict(BN=32, BM=32, BK=32, SPLIT=3, GM=1)),
         (2, 128, False, torch.bfloat16, 48, 384, 17, dict(BN=16, BM=32, BK=128, SPLIT=2, GM=4, XA=True)),
         (4, 128, False, torch.bfloat16, 80, 512, 64, dict(BN=32, BM=32, BK=64, SPLIT=1, GM=8, XA=True)),
         (8, 32, False, torch.float16, 24, 96, 40, dict(BN=16, BM=16, BK=32, SPLIT=1, GM=8))]


@pytest.mark.parametrize("bits,group,sym,sdtype,n,k,m,cfg", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_rk_matches_reference(bits, group, sym, sdtype, n, k, m, cfg, dtype):
    layer = _layer(n, k, bits, group, sym=sym, sdtype=sdtype, bias=True, device=DEV, seed=bits)
    pk = ci.packed_rk(layer)
    x = torch.randn(m, k, device=DEV).to(dtype)
    ref = x.float() @ ci.reference_rk(pk).t() + layer.bias.float()
    if bits == 8 and dtype == torch.bfloat16:  # 128 + q exact in bf16 only below 128: dequantize + cuBLAS serves
        assert not tg.supports(pk, x)
        return
    assert tg.supports(pk, x)
    c = dict(cfg, num_warps=4, num_stages=2)
    out = tg.run_gemm_rk(x, pk, layer.bias.to(dtype), c)
    assert out.shape == (m, n) and out.dtype == dtype
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    if c["SPLIT"] > 1:  # the last program sums the slots in order: the same bytes every launch, counters reset
        assert torch.equal(out, tg.run_gemm_rk(x, pk, layer.bias.to(dtype), c))
        for _, cnt in tg._scratch.__globals__["_SCRATCH"].values():
            assert int(cnt.abs().sum()) == 0


def test_gemm_rk_takes_only_what_it_computes():
    layer = _layer(16, 128, 3, 128, device=DEV)
    x = torch.randn(32, 128, device=DEV)
    assert not tg.supports(ci.packed_rk(layer), x)  # 3-bit: two planes per row
    layer4 = _layer(16, 128, 4, 128, device=DEV)
    assert not tg.supports(ci.packed_rk(layer4), x[:4])  # small batches: cuda_int_mma
    assert tg.config(256, 4096, 4096, 64)["BK"] <= 64
