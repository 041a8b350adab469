"""Baselines for accuracy comparisons: SmoothQuant-style smoothing and LLM.int8-style decomposition, both
at the same W8A8 scheme as Quaff (per-output-channel int8 weights, per-token int8 activations)."""
from __future__ import annotations

import torch
from torch import nn

from .hf import fp_linear, set_submodule
from .kernels import cpu
from .kernels.reference import quantize_rows, smooth_factors
from .quaff_linear import QuaffLinear

LLM_INT8_THRESHOLD = 6.0  # the LLM.int8 paper's outlier magnitude


class SmoothQuantLinear(nn.Module):
    """y = deq(Q(X / s) · Q(W · s)ᵀ) + b with s_j = max|X_j|^α / max|W_j|^(1−α) (SmoothQuant)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_max: torch.Tensor, alpha: float):
        super().__init__()
        w = weight.detach().float()
        s = smooth_factors(act_max, w.abs().amax(0), alpha, torch.zeros(0, dtype=torch.long))
        q, scale = quantize_rows(w * s[None, :])
        self.register_buffer("inv_smooth", 1.0 / s)
        self.register_buffer("w_int8", q)
        self.register_buffer("w_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float() * self.inv_smooth
        q, sx = quantize_rows(x2)
        out = cpu._int_mm(q, self.w_int8.t()).float() * sx[:, None] * self.w_scale[None, :]
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


def _calibrated_linears(model: nn.Module, stats, eligible):
    """(name, module, weight [out, in], bias, layer stats) of every calibrated, eligible Linear."""
    for name, layer in stats.layers.items():
        module = model.get_submodule(name)
        wb = fp_linear(module)
        if wb is not None and eligible(name):
            yield name, module, wb[0], wb[1], layer


def smoothquant_(model: nn.Module, stats, alpha: float, eligible) -> int:
    """Replace every calibrated, eligible Linear by its SmoothQuant version; returns how many."""
    n = 0
    for name, _, weight, bias, layer in list(_calibrated_linears(model, stats, eligible)):
        set_submodule(model, name, SmoothQuantLinear(weight, bias, layer.max_abs, alpha))
        n += 1
    return n


def llm_int8_(model: nn.Module, stats, eligible, threshold: float = LLM_INT8_THRESHOLD) -> int:
    """LLM.int8-style decomposition: input channels whose calibrated max|x| exceeds ``threshold`` run in FP,
    the rest in int8. Expressed as a QuaffLinear whose outlier scale is so large (1e6) that those channels
    leave the int8 GEMM and come back exactly through the FP correction. Returns the FP channel count."""
    kept = 0
    for name, module, weight, bias, layer in list(_calibrated_linears(model, stats, eligible)):
        idx = torch.nonzero(layer.max_abs > threshold).flatten()
        q = QuaffLinear.from_weight(weight, bias, idx).train(module.training)
        q.act_scale.fill_(1e6)
        set_submodule(model, name, q)
        kept += idx.numel()
    return kept
