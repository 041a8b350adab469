"""The oracle: Quaff's arithmetic in plain PyTorch, integer products taken exactly in float64.

Fast kernels are tested against these functions. Shapes: x [M, K], w_int8 [N, K] (row-major, one row
per output channel), w_scale [N], outlier_idx [k], act_div [k] (what the outlier channels are divided
by: S_o, or 1 where a norm already did it), w_corr [N, k] = (S_o − 1) · W_o (W_o: the FP weight columns of
the outlier input channels; the paper's W_o rows in its [in, out] layout). ``act_group`` G > 0: X̂ is quantized
per (row, group of G consecutive columns; the last group may be shorter) instead of per row, and each group's
integer products are scaled by its own activation scale: y = w_scale · Σ_g s[:, g] · (q_g · w_int8_gᵀ).
"""
from __future__ import annotations

import torch

QMAX = 127.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q = round(x / s), s = max|x_row| / 127 (rows of zeros get s = 1)."""
    x = x.float()
    absmax = x.abs().amax(-1)
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    q = torch.round(x / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def n_groups(k: int, group: int) -> int:
    """How many activation groups ``k`` input channels form with group size ``group`` (0: one, per row)."""
    return 1 if group <= 0 or group >= k else -(-k // group)


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (row, group of ``group`` consecutive columns) of 2-D x: q [M, K] int8 and the scales
    [M, ceil(K/group)] (max|x| of the group / 127; all-zero groups get 1). ``group`` 0 (or >= K): one group,
    quantize_rows's numbers with the scale shaped [M, 1]."""
    m, k = x.shape
    if n_groups(k, group) == 1:
        q, scale = quantize_rows(x)
        return q, scale[:, None]
    n = n_groups(k, group)
    padded = torch.nn.functional.pad(x.float(), (0, n * group - k))  # zeros change no group's max
    q, scale = quantize_rows(padded.reshape(m, n, group))
    return q.reshape(m, n * group)[:, :k].contiguous(), scale


def quantize_weight(w: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] and its scales [N]; per output channel or one scale for the whole tensor."""
    if granularity == "channel":
        return quantize_rows(w)
    absmax = w.detach().float().abs().amax()
    scale = (absmax / QMAX if absmax > 0 else torch.ones(())).expand(w.shape[0]).contiguous()
    q = torch.round(w.float() / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def outlier_scale(x_absmax: torch.Tensor, w_outlier: torch.Tensor) -> torch.Tensor:
    """S_o = max(sqrt(max|X_o| / max|W_o|), 1) per outlier channel. A zero weight column has nothing to
    balance against: its channel is scaled by sqrt(max|X_o|) (finite), which only shrinks it."""
    w_absmax = w_outlier.detach().float().abs().amax(0) if w_outlier.numel() else torch.zeros(0)
    w_absmax = torch.where(w_absmax > 0, w_absmax, torch.ones_like(w_absmax))
    return torch.sqrt(x_absmax.float() / w_absmax).clamp_min(1.0)


def smooth_factors(act_max: torch.Tensor, w_colmax: torch.Tensor, alpha: float,
                   outlier_idx: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s = max|X|^α / max|W|^(1−α) (x is divided by s, the weight
    column multiplied by it), with s = 1 on the outlier channels, which Quaff's own scaling handles.
    ``w_colmax``: max|W| per input column, over every layer that reads this input (siblings share s)."""
    s = (act_max.float().clamp_min(1e-5) ** alpha / w_colmax.float().clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
    s[outlier_idx] = 1.0
    return s


def scale_activations(x: torch.Tensor, outlier_idx: torch.Tensor,
                      act_div: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X̂ = X / S (S = 1 outside the outliers) as fp32 [M, K], and its outlier columns X̂_o [M, k]."""
    x = x.float()
    if outlier_idx.numel() == 0:
        return x, x.new_zeros(x.shape[0], 0)
    x_hat_o = x.index_select(1, outlier_idx) / act_div.float()
    return x.index_copy(1, outlier_idx, x_hat_o), x_hat_o


def correction_weight(w_outlier: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """(S_o − 1) · W_o, [N, k]: what the outlier columns of X̂ are multiplied by to restore X W."""
    return w_outlier * (act_scale.to(w_outlier.dtype) - 1.0)


def quaff_linear(x, w_int8, w_scale, outlier_idx, act_div, w_corr, bias=None, act_group: int = 0) -> torch.Tensor:
    """Y = deq(Q(X̂) W_intᵀ) + X̂_o w_corrᵀ + b, in fp32, for 2-D x; Q per row, or per (row, group of
    ``act_group`` columns) with each group's exact integer products scaled by its own scale."""
    x_hat, x_hat_o = scale_activations(x, outlier_idx, act_div)
    if n_groups(x_hat.shape[1], act_group) == 1:
        q, sx = quantize_rows(x_hat)
        acc = q.double() @ w_int8.double().t()
        out = (acc * sx.double()[:, None] * w_scale.double()[None, :]).float()
    else:
        q, sx = quantize_groups(x_hat, act_group)
        acc = sum((q[:, s:s + act_group].double() @ w_int8[:, s:s + act_group].double().t()) * sx[:, g, None].double()
                  for g, s in enumerate(range(0, x_hat.shape[1], act_group)))
        out = (acc * w_scale.double()[None, :]).float()
    if outlier_idx.numel():
        out = out + x_hat_o @ w_corr.float().t()
    return out if bias is None else out + bias.float()


def grad_input(grad: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, exact: bool) -> torch.Tensor:
    """grad_X = grad_Y · W with W = w_int8 · w_scale. Not exact: the per-output-channel weight scale is
    folded into the gradient first, then it is quantized per row and multiplied by the int8 weight."""
    grad = grad.float()
    if exact:
        return grad @ (w_int8.float() * w_scale.float()[:, None])
    q, sg = quantize_rows(grad * w_scale.float()[None, :])
    return (q.double() @ w_int8.double() * sg.double()[:, None]).float()
