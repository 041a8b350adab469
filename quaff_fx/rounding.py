"""GPTQ-style rounding of the int8 weight (``weight_rounding="gptq"``).

Round-to-nearest makes each weight's error independent of the data. GPTQ (Frantar et al., 2022) rounds
the columns of W one after another and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse Hessian H = X̂ᵀX̂ of the layer's input, so that ‖X̂ Wᵀ − X̂ Qᵀ‖ rather
than ‖W − Q‖ is kept small. The scales stay those of round-to-nearest (per output channel), so the result
is an ordinary int8 weight for the same int8 GEMM. X̂ is what the int8 GEMM really sees: the input after
smoothing and after the outlier channels were divided by S_o.
"""
from __future__ import annotations

import torch

from .kernels.reference import QMAX


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, block: int = 128,
               damp: float = 0.01) -> torch.Tensor:
    """int8 codes [N, K] of ``weight`` [N, K] with per-row ``scale`` [N], error-compensated by ``hessian`` [K, K]."""
    w = weight.detach().float().clone()
    k = w.shape[1]
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # channels that never fired: nothing to compensate with
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    scale = scale.float().to(w.device)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hi = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = torch.clamp(torch.round(col / scale), -QMAX, QMAX)
            q[:, i1 + i] = qc
            e = (col - qc * scale) / hi[i, i]
            w1[:, i:] -= e[:, None] * hi[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.to(torch.int8)


def seen_hessian(hessian: torch.Tensor, inv_smooth: torch.Tensor | None, outlier_idx: torch.Tensor,
                 act_scale: torch.Tensor) -> torch.Tensor:
    """H of X̂ from H of X: X̂ = X · diag(d), d = inv_smooth (or 1) with the outlier channels divided by S_o."""
    d = torch.ones(hessian.shape[0], dtype=torch.float64, device=hessian.device)
    if inv_smooth is not None:
        d = d * inv_smooth.double().to(d.device)
    d[outlier_idx.to(d.device)] /= act_scale.double().to(d.device)
    return hessian.double() * d[:, None] * d[None, :]
