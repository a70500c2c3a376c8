"""First-run probe of kernels.cuda_int_wgmma: small shapes against the reference, with the error's pattern by
row and batch blocks, and a one-hot x that reads single weights back (their place shows any permutation)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from test_kernels_cuda_int import _layer  # noqa: E402

from leanq.kernels import cuda_int as ci  # noqa: E402
from leanq.kernels import cuda_int_wgmma as cw  # noqa: E402


def main() -> None:
    for (n, k, m, cfg) in ((64, 64, 64, dict(wg=1, bm=64, nst=2, split=1)), (128, 128, 128, dict(wg=2, bm=128, nst=2, split=1)),
                           (256, 1024, 256, None)):
        layer = _layer(n, k, 4, 64, sdtype=torch.bfloat16, device="cuda", seed=1)
        pk = ci.packed_rk(layer)
        w = ci.reference_rk(pk)
        x = torch.randn(m, k, device="cuda").bfloat16()
        try:
            out = cw.run_int_wgmma(x, pk, None, cfg).float()
        except Exception as e:
            print(n, k, m, cfg, "FAILED", type(e).__name__, str(e)[:300], flush=True)
            continue
        torch.cuda.synchronize()
        ref = x.float() @ w.t()
        err = ((out - ref).norm() / ref.norm()).item()
        print(n, k, m, cfg, f"rel err {err:.2e}", flush=True)
        if err > 1e-2:
            d = (out - ref).abs()
            print(" max err by 16 batch x 16 rows blocks:\n", d.view(m // 16, 16, n // 16, 16).amax((1, 3)).cpu().numpy().round(2))
            # one-hot x: out[m, :] = w[:, m % k]
            xo = torch.zeros(m, k, device="cuda").bfloat16()
            xo[torch.arange(m), torch.arange(m) % k] = 1
            oo = cw.run_int_wgmma(xo, pk, None, cfg).float()
            want = w.t()[torch.arange(m) % k]
            bad = (oo - want.float()).abs() > 1e-2 * want.abs().max()
            print(" one-hot mismatches", int(bad.sum()), "of", bad.numel())
            idx = bad.nonzero()[:8].tolist()
            for (mm, nn) in idx:
                hit = ((w.t().float() - oo[mm, nn]).abs() < 1e-6).nonzero()[:3].tolist()
                print(f"  out[{mm},{nn}]={oo[mm, nn].item():.4f} want {want[mm, nn].item():.4f}; equal weights at (k,n) {hit}")


if __name__ == "__main__":
    main()
