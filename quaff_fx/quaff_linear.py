"""QuaffLinear: an int8 Linear with Quaff's outlier scaling, the module the rewrite puts in place of nn.Linear."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.quaff)
from .config import MOMENTUM, check_act_group
from .distributed import global_max
from .errors import QuaffError
from .kernels.reference import outlier_scale, quantize_weight, smooth_factors

if TYPE_CHECKING:
    from .annotation import QuaffAnnotation
    from .config import QuaffConfig


class QuaffLinear(nn.Linear):
    """y = x Wᵀ + b with W kept as int8 (the FP weight is dropped) plus FP copies of the outlier columns W_o.

    It is an ``nn.Linear`` to the outside (``in_features``, ``out_features``, ``bias``, a read-only
    ``weight`` that dequantizes on demand), so PEFT's LoRA and IA3 and other Linear-aware code take it
    as it is; it never stores the FP weight.

    Buffers: w_int8 [out, in], w_scale [out], outlier_idx [k], w_outlier [out, k] (compute dtype),
    act_scale [k] (S_o, fp32). In training the scales follow
        S_o <- momentum * S_o + (1 - momentum) * max(sqrt(max|X_o| / max|W_o|), 1)
    computed on each batch; in eval they are frozen. The base is frozen; adapters train on top.
    ``prescaled``: the input already arrives divided by S (a norm before the layer absorbed 1/S; eval only).
    ``smoothed``: SmoothQuant-style smoothing of the other channels: x is multiplied by ``inv_smooth`` = 1/s
    (inside the op, with 1/S) and the int8 weight holds W·s (s = 1 on the outlier channels, which Quaff's
    scaling handles).
    ``act_group``: 0 quantizes X̂ per token; G > 0 per (token, group of G consecutive input channels), each group's
    int8 products scaled by its own activation scale (a plain int attribute: the scales are computed per call).
    On CUDA, grad_X is computed in int8 on a transient transposed copy of W by default (made per backward call);
    ``int8_backward_()`` keeps that copy as ``w_int8_t`` [in, out] instead (not saved; one more byte per weight),
    and ``ops.set_grad_x_mode("dequantize")`` computes grad_X on the dequantized W.
    """

    def __init__(self, in_features: int, out_features: int, n_outliers: int = 0, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None, momentum: float = MOMENTUM, exact_grad: bool = False,
                 smoothed: bool = False, weight_granularity: str = "channel", act_group: int = 0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate the FP weight
        check_act_group(act_group)
        self.in_features, self.out_features = in_features, out_features
        self.act_group = act_group  # activation group size (0: per token); recorded in artifacts
        self.weight_granularity = weight_granularity  # 'channel' | 'tensor': kept by add_delta_, recorded in artifacts
        self.momentum, self.exact_grad, self.prescaled = momentum, exact_grad, False
        self.register_buffer("w_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("outlier_idx", torch.zeros(n_outliers, dtype=torch.long, device=device))
        self.register_buffer("w_outlier", torch.zeros(out_features, n_outliers, dtype=dtype, device=device))
        self.register_buffer("act_scale", torch.ones(n_outliers, dtype=torch.float32, device=device))
        zero_bias = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = nn.Parameter(zero_bias, requires_grad=False) if bias else None
        inv_smooth = torch.ones(in_features, dtype=torch.float32, device=device) if smoothed else None
        self.register_buffer("inv_smooth", inv_smooth)
        self.register_buffer("w_int8_t", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, outlier_channels: Sequence[int] | torch.Tensor = (),
                    act_max: torch.Tensor | None = None, weight_granularity: str = "channel",
                    momentum: float = MOMENTUM, exact_grad: bool = False, act_group: int = 0) -> "QuaffLinear":
        """Quantize ``linear``. ``act_max`` (max|x| per input channel from calibration) sets the initial
        scales; without it they start at 1 and are learned from the first training batches."""
        return cls.from_weight(linear.weight, linear.bias, outlier_channels, act_max, weight_granularity, momentum,
                               exact_grad, act_group=act_group)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, outlier_channels=(), act_max=None,
                    weight_granularity: str = "channel", momentum: float = MOMENTUM, exact_grad: bool = False,
                    smooth_alpha: float | None = None, smooth_w_max: torch.Tensor | None = None,
                    act_group: int = 0) -> "QuaffLinear":
        """``smooth_alpha`` (needs the full per-channel ``act_max``): also smooth the non-outlier channels,
        s = max|X|^α / max|W|^(1−α) (SmoothQuant), folded into the int8 weight. ``smooth_w_max``: max|W|
        per input column over all layers reading this input (default: this weight's), so siblings agree on s.
        ``act_group``: the activation group size (0: per token)."""
        weight = weight.detach()
        idx = torch.as_tensor(outlier_channels, dtype=torch.long, device=weight.device).flatten()
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, idx.numel(), bias is not None, weight.dtype, weight.device, momentum, exact_grad,
                  smoothed=smooth_alpha is not None, weight_granularity=weight_granularity, act_group=act_group)
        if smooth_alpha is not None:
            if act_max is None:
                raise QuaffError("smoothing needs the calibrated max|x| of every input channel: pass act_max, "
                                 "or smooth_alpha=None")
            act_max = act_max.to(weight.device).float()
            w_max = weight.float().abs().amax(0) if smooth_w_max is None else smooth_w_max.to(weight.device)
            s = smooth_factors(act_max, w_max, smooth_alpha, idx)
            mod.inv_smooth.copy_(1.0 / s)
            weight = (weight.float() * s[None, :]).to(weight.dtype)
        w_int8, w_scale = quantize_weight(weight, weight_granularity)
        mod.w_int8.copy_(w_int8)
        mod.w_scale.copy_(w_scale)
        mod.outlier_idx.copy_(idx)
        mod.w_outlier.copy_(weight.index_select(1, idx))
        if act_max is not None and idx.numel():
            mod.act_scale.copy_(outlier_scale(act_max.to(weight.device).index_select(0, idx), mod.w_outlier))
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    @classmethod
    def from_annotation(cls, weight: torch.Tensor, bias: torch.Tensor | None, annotation: "QuaffAnnotation",
                        config: "QuaffConfig") -> "QuaffLinear":
        """The QuaffLinear an annotated layer gets (the int8 weight rounded to nearest; GPTQ rounding, where the
        annotation asks for it, is a later step): outliers, scales and smoothing as the annotation says, the
        activation group size as the config gives it for this layer."""
        smooth = annotation.smooth
        return cls.from_weight(weight, bias, annotation.outliers, annotation.act_max, config.weight_granularity,
                               config.momentum, config.exact_grad, None if smooth is None else smooth.alpha,
                               None if smooth is None else smooth.w_max, config.act_group_of(annotation.module))

    @classmethod
    def from_parts(cls, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias=None, prescaled=False,
                   exact_grad=False, inv_smooth=None, w_int8_t=None, act_group: int = 0,
                   momentum: float = MOMENTUM) -> "QuaffLinear":
        """A QuaffLinear around existing tensors (shared, not copied): the arguments of a quaff::linear call."""
        mod = cls(0, 0, 0, bias=False)
        mod.in_features, mod.out_features = int(w_int8.shape[1]), int(w_int8.shape[0])
        for name, t in (("w_int8", w_int8), ("w_scale", w_scale), ("outlier_idx", outlier_idx),
                        ("act_scale", act_scale), ("w_outlier", w_outlier), ("inv_smooth", inv_smooth),
                        ("w_int8_t", w_int8_t)):
            setattr(mod, name, t)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        mod.bias = bias
        mod.prescaled, mod.exact_grad, mod.momentum, mod.act_group = prescaled, exact_grad, momentum, int(act_group)
        return mod.eval()

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (computed; the FP weight is not stored, so writing into it changes nothing:
        use ``add_delta_`` to change the layer)."""
        w = self.w_int8.float() * self.w_scale[:, None]
        return (w if self.inv_smooth is None else w * self.inv_smooth[None, :]).to(self.w_outlier.dtype)

    @torch.no_grad()
    def add_delta_(self, delta: torch.Tensor) -> None:
        """W <- W + delta, re-quantized (a merged LoRA update). The outlier columns stay exact in FP; the
        granularity (per channel or per tensor) is kept."""
        granularity = self.weight_granularity
        if self.inv_smooth is not None:  # the int8 weight holds W·s
            delta = delta.float() / self.inv_smooth[None, :]
        w_int8, w_scale = quantize_weight(self.w_int8.float() * self.w_scale[:, None] + delta.float(), granularity)
        self.w_int8.copy_(w_int8)
        self.w_scale.copy_(w_scale)
        self.w_outlier.add_(delta.index_select(1, self.outlier_idx).to(self.w_outlier.dtype))
        if self.w_int8_t is not None:
            self.int8_backward_()

    @torch.no_grad()
    def input_scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [in] vector x is multiplied by before quantization (X̂ = x · this), computed in ``dtype``: 1/S_o
        on the outlier channels, the smoothing's 1/s (or 1) elsewhere; s is 1 on the outliers. What the CUDA
        kernel builds per call, what a norm absorbs when it folds the scales, what GPTQ's XᵀX is seen through."""
        inv = torch.ones(self.in_features, dtype=dtype, device=self.act_scale.device)
        if self.inv_smooth is not None:
            inv = self.inv_smooth.to(dtype).clone()
        inv[self.outlier_idx] = 1.0 / self.act_scale.to(dtype)
        return inv

    @torch.no_grad()
    def int8_backward_(self, enable: bool = True) -> "QuaffLinear":
        """Keep (or drop) the transposed int8 copy of the weight that the CUDA backward multiplies in int8."""
        self.w_int8_t = self.w_int8.t().contiguous() if enable else None
        return self

    def forward(self, x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``lora`` = (h, B), h = dropout(x) · Aᵀ · scaling: the output gains h · Bᵀ inside the op (quaff::lora_linear;
        on CUDA in the GEMM's epilogue). PEFT's LoRA layer on a QuaffLinear passes it."""
        if self.training and self.outlier_idx.numel():
            self._update_scales(x)  # the smoothing leaves the outlier channels alone (s = 1 there)
        if lora is not None:
            return torch.ops.quaff.lora_linear(x, self.w_int8, self.w_scale, self.outlier_idx, self.act_scale,
                                               self.w_outlier, lora[0], lora[1], self.bias, self.prescaled,
                                               self.exact_grad, self.inv_smooth, self.w_int8_t, self.act_group)
        return torch.ops.quaff.linear(x, self.w_int8, self.w_scale, self.outlier_idx, self.act_scale, self.w_outlier,
                                      self.bias, self.prescaled, self.exact_grad, self.inv_smooth, self.w_int8_t,
                                      self.act_group)

    @torch.no_grad()
    def _update_scales(self, x: torch.Tensor) -> None:
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return  # an activation-checkpoint recomputation, inside backward: this batch has updated the scales already
        x_absmax = x.detach().index_select(-1, self.outlier_idx).abs().reshape(-1, self.outlier_idx.numel()).amax(0)
        # the global batch's max (a collective compile traces), or this rank's under scale_sync("step"), where
        # sync_scales_ makes the updated scales the global batch's after backward
        x_absmax = global_max(x_absmax)
        batch_scale = outlier_scale(x_absmax, self.w_outlier)
        self.act_scale.mul_(self.momentum).add_(batch_scale * (1.0 - self.momentum))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"outliers={self.outlier_idx.numel()}, "
                + ("prescaled, " if self.prescaled else "") + ("smoothed, " if self.inv_smooth is not None else "") +
                ("int8 backward, " if self.w_int8_t is not None else "") +
                (f"act_group={self.act_group}, " if self.act_group else "") +
                f"bias={self.bias is not None}, weight=int8[{self.w_scale.numel()} scales], "
                f"w_outlier={self.w_outlier.dtype}")


def int8_backward_(model: nn.Module, enable: bool = True) -> int:
    """Give every QuaffLinear of ``model`` (or take away) the transposed int8 weight copy with which the CUDA
    backward computes grad_X as an int8 GEMM; returns how many layers. A GPU-training choice: one more byte per
    weight, for an int8 instead of a dequantized bf16 backward GEMM (the CPU backward reads W as it is)."""
    layers = [m for m in model.modules() if isinstance(m, QuaffLinear)]
    for m in layers:
        m.int8_backward_(enable)
    return len(layers)
