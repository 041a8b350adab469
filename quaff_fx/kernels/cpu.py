"""The default kernels of the ``quaff`` ops: the reference arithmetic with ``torch._int_mm`` for the
int8 GEMMs (int32 accumulation; exact like the oracle)."""
from __future__ import annotations

import torch

from .reference import n_groups, quantize_groups, quantize_rows, scale_activations


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] × int8 [K, N] → int32 [M, N]; falls back to an exact float path where torch._int_mm
    refuses the shape (CUDA wants M > 16 and K, N multiples of 8)."""
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        return (a.double() @ b.double()).to(torch.int32)


def quaff_linear(x, w_int8, w_scale, outlier_idx, act_div, w_corr, bias=None, act_group: int = 0) -> torch.Tensor:
    x_hat, x_hat_o = scale_activations(x, outlier_idx, act_div)
    if n_groups(x_hat.shape[1], act_group) == 1:
        q, sx = quantize_rows(x_hat)
        out = int_mm(q, w_int8.t()).float().mul_(sx[:, None])
    else:
        out = grouped_int_mm(x_hat, w_int8, act_group)
    out.mul_(w_scale[None, :].float())
    if outlier_idx.numel():
        out.addmm_(x_hat_o, w_corr.float().t())
    if bias is not None:
        out.add_(bias.float())
    return out


def grouped_int_mm(x_hat: torch.Tensor, w_int8: torch.Tensor, group: int) -> torch.Tensor:
    """Σ_g s[:, g] · (q_g · w_int8_gᵀ) for x_hat [M, K] quantized per (row, group of ``group`` columns): one int8
    GEMM per group (int32, exact), scaled by the group's activation scales and summed in fp32; no weight scale.
    On 2 cores, 12 groups of 128 cost 1.5x one GEMM over all K (SmolLM2's down_proj, 512 tokens)."""
    q, sx = quantize_groups(x_hat, group)
    out = x_hat.new_zeros(x_hat.shape[0], w_int8.shape[0])
    for g, start in enumerate(range(0, x_hat.shape[1], group)):
        cols = slice(start, start + group)
        out.add_(int_mm(q[:, cols], w_int8[:, cols].t()).float().mul_(sx[:, g, None]))
    return out


def grad_input(grad, w_int8, w_scale, exact: bool) -> torch.Tensor:
    grad = grad.float()
    if exact:
        return grad @ (w_int8.float() * w_scale.float()[:, None])
    q, sg = quantize_rows(grad * w_scale.float()[None, :])
    return int_mm(q, w_int8).float().mul_(sg[:, None])
