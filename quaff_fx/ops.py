"""The ``quaff`` custom ops. Registered through ``torch.library`` with fake kernels and an explicit
autograd formula, so ``torch.export`` and ``torch.compile`` see one op per layer and no graph break.

quaff::linear(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias, prescaled, exact_grad, inv_smooth,
              w_int8_t, act_group) -> y
    y = deq(Q_token(X̂) · W_intᵀ) + X̂_o · ((S_o − 1) · W_o)ᵀ + b,   X̂ = X · inv_smooth / S
    (S = S_o on the outlier channels, 1 elsewhere; ``inv_smooth`` = 1/s of SmoothQuant-style smoothing, whose
    s the int8 weight holds, or None; ``prescaled``: x arrives as X̂ already, a norm before the layer having
    absorbed 1/S and 1/s). ``w_int8_t``: an optional transposed int8 copy of the weight [K, N] that the CUDA
    backward multiplies in int8 (the int8 tensor cores take K-major operands only; without it the CUDA backward
    makes a transient one per call); the forward does not read it. ``act_group`` G > 0: X̂ is quantized per
    (token, group of G consecutive input channels) instead of per token, deq(·) = w_scale · Σ_g s_g · (Q_g · W_gᵀ)
    (see kernels.reference); the backward does not depend on it.
    Every tensor argument is a module buffer, so graph passes can treat them as constants.
quaff::lora_linear(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, lora_h, lora_b, bias, prescaled, exact_grad,
                   inv_smooth, w_int8_t, act_group) -> y
    quaff::linear's y + lora_h · lora_bᵀ: a LoRA adapter on the layer, lora_h = dropout(x) · Aᵀ · scaling [.., r]
    computed outside (its graph reaches A), lora_b = B [N, r]; on CUDA the term is added in the int8 GEMM's
    epilogue, so the [M, N] LoRA output and the sum never go through memory. Differentiable in x, lora_h, lora_b
    (and bias); the term is computed in x's dtype.
quaff::linear_grad_input(grad, w_int8, w_scale, exact, inv_smooth, w_int8_t) -> grad_x
    grad_x = (grad · W) · inv_smooth, W the dequantized int8 weight (int8 GEMM on a per-row quantized
    gradient unless exact; on CUDA on ``w_int8_t`` or a transient transposed W, see
    ``kernels.triton_kernels.set_grad_x_mode``; exact: W dequantized into grad's dtype)
quaff::quantize_rows(x) -> (int8, scale)
    symmetric per-row (per-token) int8 quantization

The weight is frozen: no gradient reaches w_int8, scales or W_o. Bias gets its gradient when it asks.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .kernels import cpu, reference


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.library.custom_op("quaff::quantize_rows", mutates_args=())
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    q, scale = reference.quantize_rows(_flat(x))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


@quantize_rows.register_fake
def _(x):
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))


def _forward_cpu(x: Tensor, w_int8: Tensor, w_scale: Tensor, outlier_idx: Tensor, act_scale: Tensor,
                 w_outlier: Tensor, bias: Optional[Tensor], prescaled: bool, inv_smooth: Optional[Tensor],
                 act_group: int) -> Tensor:
    """quaff::linear on the CPU kernels: the fp32 [M, N] output for x flattened to 2-D."""
    torch._check(act_group >= 0, lambda: f"quaff::linear: act_group must be >= 0, got {act_group}")
    act_div = torch.ones_like(act_scale) if prescaled else act_scale
    w_corr = reference.correction_weight(w_outlier, act_scale)
    x2 = _flat(x) if inv_smooth is None or prescaled else _flat(x) * inv_smooth.to(x.dtype)
    return cpu.quaff_linear(x2, w_int8, w_scale, outlier_idx, act_div, w_corr, bias, act_group)


@torch.library.custom_op("quaff::linear", mutates_args=())
def linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, outlier_idx: Tensor, act_scale: Tensor, w_outlier: Tensor,
           bias: Optional[Tensor] = None, prescaled: bool = False, exact_grad: bool = False,
           inv_smooth: Optional[Tensor] = None, w_int8_t: Optional[Tensor] = None, act_group: int = 0) -> Tensor:
    out = _forward_cpu(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias, prescaled, inv_smooth, act_group)
    return out.to(x.dtype).reshape(*x.shape[:-1], w_int8.shape[0])


@linear.register_fake
def _(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias=None, prescaled=False, exact_grad=False,
      inv_smooth=None, w_int8_t=None, act_group=0):
    torch._check(x.shape[-1] == w_int8.shape[1],
                 lambda: f"quaff::linear: x has {x.shape[-1]} features, the weight {w_int8.shape[1]}")
    torch._check(act_group >= 0, lambda: f"quaff::linear: act_group must be >= 0, got {act_group}")
    return x.new_empty(*x.shape[:-1], w_int8.shape[0])


@torch.library.custom_op("quaff::linear_grad_input", mutates_args=())
def linear_grad_input(grad: Tensor, w_int8: Tensor, w_scale: Tensor, exact: bool = False,
                      inv_smooth: Optional[Tensor] = None, w_int8_t: Optional[Tensor] = None) -> Tensor:
    out = cpu.grad_input(_flat(grad), w_int8, w_scale, exact)  # the CPU GEMM takes W as it is: no use for w_int8_t
    if inv_smooth is not None:
        out = out * inv_smooth.float()
    return out.to(grad.dtype).reshape(*grad.shape[:-1], w_int8.shape[1])


@linear_grad_input.register_fake
def _(grad, w_int8, w_scale, exact=False, inv_smooth=None, w_int8_t=None):
    return grad.new_empty(*grad.shape[:-1], w_int8.shape[1])


def _save_for_grad_x(ctx, w_int8, w_scale, bias, prescaled, exact_grad, inv_smooth, w_int8_t, *more) -> None:
    """What ``_grad_x`` and ``_grad_bias`` read, saved (then ``more``: an op's own tensors for its other gradients)."""
    ctx.save_for_backward(w_int8, w_scale, None if prescaled else inv_smooth, w_int8_t, *more)
    ctx.exact_grad = exact_grad
    ctx.has_bias = bias is not None


def _setup_context(ctx, inputs, output):
    x, w_int8, w_scale, _idx, _scale, _w_o, bias, prescaled, exact_grad, inv_smooth, w_int8_t, _act_group = inputs
    _save_for_grad_x(ctx, w_int8, w_scale, bias, prescaled, exact_grad, inv_smooth, w_int8_t)


def _grad_x(ctx, grad: Tensor, saved: tuple) -> Optional[Tensor]:
    """grad_X from the saved (w_int8, w_scale, inv_smooth, w_int8_t, ...): ``saved`` is ``ctx.saved_tensors``, read
    once by the caller (activation checkpointing allows one unpack)."""
    w_int8, w_scale, inv_smooth, w_int8_t = saved[:4]
    if not ctx.needs_input_grad[0]:
        return None
    return linear_grad_input(grad, w_int8, w_scale, ctx.exact_grad, inv_smooth, w_int8_t)


def _grad_bias(ctx, grad: Tensor, index: int) -> Optional[Tensor]:
    """The bias's gradient if it has one and asks (``needs_input_grad`` stops short where the call's trailing
    arguments were their defaults: no bias then)."""
    return _flat(grad).sum(0) if ctx.has_bias and ctx.needs_input_grad[index] else None


def _backward(ctx, grad):
    grad_b = _grad_bias(ctx, grad, 6)
    grad_x = _grad_x(ctx, grad, ctx.saved_tensors)
    return grad_x, None, None, None, None, None, grad_b, None, None, None, None, None


linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("quaff::lora_linear", mutates_args=())
def lora_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, outlier_idx: Tensor, act_scale: Tensor, w_outlier: Tensor,
                lora_h: Tensor, lora_b: Tensor, bias: Optional[Tensor] = None, prescaled: bool = False,
                exact_grad: bool = False, inv_smooth: Optional[Tensor] = None, w_int8_t: Optional[Tensor] = None,
                act_group: int = 0) -> Tensor:
    out = _forward_cpu(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias, prescaled, inv_smooth, act_group)
    out.addmm_(_flat(lora_h.to(x.dtype)).float(), lora_b.to(x.dtype).float().t())
    return out.to(x.dtype).reshape(*x.shape[:-1], w_int8.shape[0])


@lora_linear.register_fake
def _(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, lora_h, lora_b, bias=None, prescaled=False,
      exact_grad=False, inv_smooth=None, w_int8_t=None, act_group=0):
    torch._check(x.shape[-1] == w_int8.shape[1],
                 lambda: f"quaff::lora_linear: x has {x.shape[-1]} features, the weight {w_int8.shape[1]}")
    torch._check(lora_h.shape[:-1] == x.shape[:-1], lambda: "quaff::lora_linear: lora_h's tokens are not x's")
    torch._check(lora_b.shape[0] == w_int8.shape[0] and lora_b.shape[1] == lora_h.shape[-1],
                 lambda: f"quaff::lora_linear: lora_b {tuple(lora_b.shape)} does not fit the layer's "
                         f"{w_int8.shape[0]} outputs and rank {lora_h.shape[-1]}")
    torch._check(act_group >= 0, lambda: f"quaff::lora_linear: act_group must be >= 0, got {act_group}")
    return x.new_empty(*x.shape[:-1], w_int8.shape[0])


def _lora_setup_context(ctx, inputs, output):
    w_int8, w_scale, lora_h, lora_b, bias, prescaled, exact_grad, inv_smooth, w_int8_t = inputs[1:3] + inputs[6:13]
    _save_for_grad_x(ctx, w_int8, w_scale, bias, prescaled, exact_grad, inv_smooth, w_int8_t, lora_h, lora_b)


def _lora_backward(ctx, grad):
    saved = ctx.saved_tensors
    lora_h, lora_b = saved[4:]
    g2 = _flat(grad)
    grad_h = grad_lb = None
    if ctx.needs_input_grad[6]:  # ∂/∂h = grad · B
        grad_h = (g2 @ lora_b.to(g2.dtype)).reshape(lora_h.shape).to(lora_h.dtype)
    if ctx.needs_input_grad[7]:  # ∂/∂B = gradᵀ · h
        grad_lb = (g2.t() @ _flat(lora_h).to(g2.dtype)).to(lora_b.dtype)
    grad_bias = _grad_bias(ctx, grad, 8)
    return (_grad_x(ctx, grad, saved), None, None, None, None, None, grad_h, grad_lb, grad_bias,
            None, None, None, None, None)


lora_linear.register_autograd(_lora_backward, setup_context=_lora_setup_context)


_INLINE = False
_CACHES: dict = {}  # the compile caches' settings while inlining is on


def inline_kernels(enabled: bool) -> None:
    """Whether torch.compile sees the CUDA kernels of the quaff ops or calls each op as one opaque Python function
    (the default). Inlined, AOTAutograd traces each op's launchers (``triton_kernels.traced``) into the graph as
    Triton-kernel calls that inductor launches from its generated code: the op costs no Python dispatch per call
    (8 compiled LoRA layers at 4096 tokens on an H100: 2.45x faster than opaque, where the launches bound the step).
    The price is compile time, likely growing with the call sites (inductor analyses and autotunes each site's
    kernels): it suits a compiled decoder layer (regional compilation, ``Module.compile`` per layer) more than a
    whole 8B model as one graph (that one did not finish compiling within a 395 s device call). The CPU
    kernels, eager calls and ``torch.export`` (ONNX) keep the op whole either way. Takes effect at the next
    compilation. The compile caches do not know this switch (a graph compiled one way would be served the other),
    so they are off while inlining is on and back as they were after."""
    global _INLINE
    from torch._functorch import config as aot_config
    from torch._inductor import config as inductor_config

    enabled = bool(enabled)
    if enabled and not _INLINE:
        _CACHES.update(aot=aot_config.enable_autograd_cache, fx=inductor_config.fx_graph_cache)
        aot_config.enable_autograd_cache, inductor_config.fx_graph_cache = False, False
    elif not enabled and _INLINE and _CACHES:
        aot_config.enable_autograd_cache, inductor_config.fx_graph_cache = _CACHES.pop("aot"), _CACHES.pop("fx")
    _INLINE = enabled


def kernels_inlined() -> bool:
    """The current ``inline_kernels`` setting."""
    return _INLINE


@contextlib.contextmanager
def kernel_inlining(enabled: bool):
    """``inline_kernels(enabled)`` for the compilations inside, the setting before restored after."""
    before = _INLINE
    inline_kernels(enabled)
    try:
        yield
    finally:
        inline_kernels(before)


def _inline_rule(body):
    """A FunctionalTensorMode rule (the mode AOTAutograd traces under) that runs ``body``, the op's CUDA launchers, in
    the trace instead of recording the op; as ``torch.library.triton_op`` does, for ops that also have a CPU kernel."""
    def rule(mode, op, types, args, kwargs):
        if not _INLINE:
            return mode.__torch_dispatch__(op, types, args, kwargs)
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        from .kernels import triton_kernels as tk

        first = args[0] if args else next(iter(kwargs.values()))  # x (or grad): where the op runs
        if (custom_triton_ops_decomposition_disabled() or first.device.type != "cuda"
                or any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not Tensor for t in types)):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode, tk.traced():
            return body(*args, **kwargs)
    return rule


def _register_cuda() -> bool:
    """Triton kernels for the CUDA dispatch key, where CUDA and Triton exist; the CPU path is unchanged."""
    if not torch.cuda.is_available():
        return False
    try:
        from .kernels import triton_kernels as tk
    except ImportError:
        return False

    def linear_cuda(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias=None, prescaled=False,
                    exact_grad=False, inv_smooth=None, w_int8_t=None, act_group=0):
        out = tk.quaff_linear(_flat(x), w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias, prescaled, inv_smooth,
                              act_group)
        return out.reshape(*x.shape[:-1], w_int8.shape[0])

    def lora_linear_cuda(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, lora_h, lora_b, bias=None,
                         prescaled=False, exact_grad=False, inv_smooth=None, w_int8_t=None, act_group=0):
        out = tk.quaff_linear(_flat(x), w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias, prescaled, inv_smooth,
                              act_group, _flat(lora_h), lora_b)
        return out.reshape(*x.shape[:-1], w_int8.shape[0])

    def grad_input_cuda(grad, w_int8, w_scale, exact=False, inv_smooth=None, w_int8_t=None):
        out = tk.grad_input(_flat(grad), w_int8, w_scale, exact, inv_smooth, w_int8_t)
        return out.reshape(*grad.shape[:-1], w_int8.shape[1])

    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for name, body in (("quaff::linear", linear_cuda), ("quaff::lora_linear", lora_linear_cuda),
                       ("quaff::linear_grad_input", grad_input_cuda)):
        torch.library.register_kernel(name, "cuda", body)
        torch.library.register_torch_dispatch(name, FunctionalTensorMode, _inline_rule(body))
    return True


CUDA_KERNELS = _register_cuda()
