"""The default kernels of the ``quaff`` ops: the reference arithmetic with ``torch._int_mm`` for the
int8 GEMMs (int32 accumulation; exact like the oracle)."""
from __future__ import annotations

import torch

from .reference import quantize_rows, scale_activations


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] × int8 [K, N] → int32 [M, N]; falls back to an exact float path where torch._int_mm
    refuses the shape (CUDA wants M > 16 and K, N multiples of 8)."""
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        return (a.double() @ b.double()).to(torch.int32)


def quaff_linear(x, w_int8, w_scale, outlier_idx, act_div, w_corr, bias=None) -> torch.Tensor:
    x_hat, x_hat_o = scale_activations(x, outlier_idx, act_div)
    q, sx = quantize_rows(x_hat)
    out = int_mm(q, w_int8.t()).float().mul_(sx[:, None]).mul_(w_scale[None, :].float())
    if outlier_idx.numel():
        out.addmm_(x_hat_o, w_corr.float().t())
    if bias is not None:
        out.add_(bias.float())
    return out


def grad_input(grad, w_int8, w_scale, exact: bool) -> torch.Tensor:
    grad = grad.float()
    if exact:
        return grad @ (w_int8.float() * w_scale.float()[:, None])
    q, sg = quantize_rows(grad * w_scale.float()[None, :])
    return int_mm(q, w_int8).float().mul_(sg[:, None])
