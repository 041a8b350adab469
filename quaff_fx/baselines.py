"""Baselines for accuracy comparisons, as configs that ``quantize_`` handles like ``QuaffConfig``: naive W8A8
(no outlier handling), SmoothQuant-style smoothing and LLM.int8-style decomposition, all at the same W8A8 scheme
as Quaff (per-output-channel int8 weights, per-token int8 activations)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import DEFAULT_EXCLUDE, QuaffConfig
from .hf import fp_linear, naive_w8a8_, set_submodule
from .kernels import cpu
from .kernels.reference import quantize_rows, smooth_factors
from .quaff_linear import QuaffLinear
from .quantize import CalibrationConfig, QuantizeResult, Timer, calibrate_model, register_quantize_handler

LLM_INT8_THRESHOLD = 6.0  # the LLM.int8 paper's outlier magnitude


@dataclass(frozen=True)
class _Baseline:
    """Which Linears a baseline quantizes (fnmatch patterns on module names, as in QuaffConfig)."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    @property
    def quaff(self) -> QuaffConfig:
        """The plain QuaffConfig of the same layers (round to nearest, no smoothing): what the calibration uses."""
        return QuaffConfig.preset("fast", include=self.include, exclude=self.exclude)


@dataclass(frozen=True)
class NaiveW8A8Config(_Baseline):
    """Every eligible Linear as int8 weight x int8 activation, no outlier handling, no calibration."""


@dataclass(frozen=True)
class SmoothQuantConfig(_Baseline):
    """SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α), X/s and W·s both int8."""

    alpha: float = 0.5


@dataclass(frozen=True)
class LLMInt8Config(_Baseline):
    """LLM.int8-style: input channels whose calibrated max|x| exceeds ``threshold`` stay in FP."""

    threshold: float = LLM_INT8_THRESHOLD


@register_quantize_handler(NaiveW8A8Config)
def _quantize_naive(model: nn.Module, config: NaiveW8A8Config, calibration: CalibrationConfig, tokenizer, stats,
                    progress,
                    timer: Timer) -> QuantizeResult:
    with timer("rewrite"):
        names = naive_w8a8_(model, config.quaff)
    return QuantizeResult(model, None, [], {n: {"outliers": []} for n in names}, None)


def _max_stats(model: nn.Module, config: _Baseline, calibration: CalibrationConfig, tokenizer, stats, progress,
               timer: Timer):
    """The per-channel max|x| the baselines need: the given stats, or a plain calibration."""
    if stats is not None:
        return stats
    from .capture import capture

    with timer("capture"):
        gm = capture(model)
    return calibrate_model(model, gm, config.quaff, calibration, tokenizer, progress, timer)


@register_quantize_handler(SmoothQuantConfig)
def _quantize_smoothquant(model: nn.Module, config: SmoothQuantConfig, calibration: CalibrationConfig, tokenizer, stats,
                          progress, timer: Timer) -> QuantizeResult:
    stats = _max_stats(model, config, calibration, tokenizer, stats, progress, timer)
    with timer("rewrite"):
        names = smoothquant_(model, stats, config.alpha, config.quaff.eligible)
    return QuantizeResult(model, None, [], {n: {"outliers": []} for n in names}, stats)


@register_quantize_handler(LLMInt8Config)
def _quantize_llm_int8(model: nn.Module, config: LLMInt8Config, calibration: CalibrationConfig, tokenizer, stats,
                       progress,
                       timer: Timer) -> QuantizeResult:
    stats = _max_stats(model, config, calibration, tokenizer, stats, progress, timer)
    with timer("rewrite"):
        layers = llm_int8_layers_(model, stats, config.quaff.eligible, config.threshold)
    return QuantizeResult(model, None, [], layers, stats)


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
        out = cpu.int_mm(q, self.w_int8.t()).float() * sx[:, None] * self.w_scale[None, :]
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


def smoothquant_(model: nn.Module, stats, alpha: float, eligible) -> list[str]:
    """Replace every calibrated, eligible Linear by its SmoothQuant version; returns their names."""
    names = []
    for name, _, weight, bias, layer in list(_calibrated_linears(model, stats, eligible)):
        set_submodule(model, name, SmoothQuantLinear(weight, bias, layer.max_abs.to(weight.device), alpha))
        names.append(name)
    return names


def llm_int8_(model: nn.Module, stats, eligible, threshold: float = LLM_INT8_THRESHOLD) -> int:
    """LLM.int8-style decomposition (see ``llm_int8_layers_``); returns the FP channel count."""
    return sum(len(spec["outliers"]) for spec in llm_int8_layers_(model, stats, eligible, threshold).values())


def llm_int8_layers_(model: nn.Module, stats, eligible, threshold: float = LLM_INT8_THRESHOLD) -> dict[str, dict]:
    """LLM.int8-style decomposition: input channels whose calibrated max|x| exceeds ``threshold`` run in FP,
    the rest in int8. Expressed as a QuaffLinear whose outlier scale is so large (1e6) that those channels
    leave the int8 GEMM and come back exactly through the FP correction. Returns name -> {"outliers": [...]}."""
    layers = {}
    for name, module, weight, bias, layer in list(_calibrated_linears(model, stats, eligible)):
        idx = torch.nonzero(layer.max_abs > threshold).flatten().to(weight.device)
        q = QuaffLinear.from_weight(weight, bias, idx).train(module.training)
        q.act_scale.fill_(1e6)
        set_submodule(model, name, q)
        layers[name] = {"outliers": idx.tolist()}
    return layers
