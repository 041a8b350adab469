"""CUDA kernels of the quaff ops, in Triton. Imported only where CUDA and Triton are present.

A forward pass is three launches:
0. ``_inv_kernel``: the dense [K] vector 1/S (1/S_o on the outlier channels, 1 elsewhere) from the outlier
   list and its scales.
1. ``quantize_rows``: one program per row; X̂ = X · inv, the row's absmax, then int8 codes and the row
   scale, in two passes over the row; the same program gathers the row's outlier columns X̂_o into a
   compact [M, k] tensor for the correction.
2. ``int8_gemm``: int8 × int8 → int32 on the tensor cores, with the dequantization (row scale × column
   scale), the bias and the outlier correction X̂_o · ((S_o − 1) · W_o)ᵀ (a small tensor-core dot over the k
   outlier columns, its weight made in the epilogue from W_o and S_o) fused in the epilogue: no [M, N]
   residual goes through memory. B is read as the row-major int8 weight [N, K] (K contiguous), i.e.
   column-major for the GEMM: the layout the Hopper int8 tensor cores want.
The smoothing's 1/s, when the layer has one, is folded into the dense vector of step 0: no extra pass over X.
A layer whose activation is quantized per (token, group of G channels) (``act_group``, the default for down_proj)
takes ``quantize_groups`` (one scale per row and group) and ``int8_gemm_grouped`` (the K loop steps one group at a
time and scales each group's int32 tile by its rows' scales before summing in fp32) instead of steps 1 and 2; its
outlier correction is one more small GEMM after it.

The backward (grad_X = grad · W · diag(1/s)) is an int8 GEMM unless the layer is ``exact``: the gradient times
W's row scales is quantized per row (step 1's kernel) and multiplied (step 2's kernel, 1/s as its column scale)
with the transposed int8 weight [K, N] (the int8 tensor cores take K-major operands only, and W [N, K] is N-major
for this product: read as it is, the same kernel reaches about 300 TOPS instead of 1000). That transposed weight
is the layer's kept copy where ``int8_backward_`` made one (one more byte per weight), else a transient one that
``transpose`` makes in one tiled pass and that is freed after the layer. ``exact`` (or the grad_X mode
'dequantize'): W is dequantized (with 1/s) into the gradient's dtype in one pass and cuBLAS multiplies.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import reference

_tracing = threading.local()


@contextlib.contextmanager
def traced():
    """Launches inside are recorded as ``wrap_triton`` calls (the triton-kernel higher-order op) instead of run: the
    ops' decomposition (``quaff_fx.ops``) runs the launchers below this way inside torch.compile's trace, so inductor
    calls the kernels from its generated code, with no Python dispatch of the op at run time."""
    before = getattr(_tracing, "on", False)
    _tracing.on = True
    try:
        yield
    finally:
        _tracing.on = before


def _k(kernel):
    """The kernel, launched as it is (eager), or wrapped for the compiler's trace (``traced``)."""
    return wrap_triton(kernel) if getattr(_tracing, "on", False) else kernel


@triton.jit
def _inv_kernel(idx_ptr, s_ptr, smooth_ptr, inv_ptr, K, KO, HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if HAS_SMOOTH:
        inv = tl.load(smooth_ptr + offs, mask=offs < K, other=1.0).to(tl.float32)
    else:
        inv = tl.full([BLOCK], 1.0, dtype=tl.float32)
    for j in range(KO):
        inv = tl.where(offs == tl.load(idx_ptr + j), 1.0 / tl.load(s_ptr + j).to(tl.float32), inv)
    tl.store(inv_ptr + offs, inv, mask=offs < K)


def outlier_inv(k: int, outlier_idx: torch.Tensor, act_scale: torch.Tensor, inv_smooth: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The dense [k] fp32 vector that X is multiplied by, in one launch: 1/S_o on the outlier channels,
    elsewhere ``inv_smooth`` (the smoothing's 1/s; its s is 1 on the outliers) or 1."""
    inv = torch.empty(k, dtype=torch.float32, device=act_scale.device)
    block = 1024
    _k(_inv_kernel)[(triton.cdiv(k, block),)](outlier_idx, act_scale, inv_smooth if inv_smooth is not None else inv,
                                              inv, k, outlier_idx.numel(), HAS_SMOOTH=inv_smooth is not None,
                                              BLOCK=block)
    return inv


@triton.jit
def _scaled(x_row, inv_ptr, offs, K, HAS_INV: tl.constexpr):
    mask = offs < K
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_INV:
        x = x * tl.load(inv_ptr + offs, mask=mask, other=1.0)
    return x


@triton.jit
def _quantize_rows_kernel(x_ptr, inv_ptr, q_ptr, scale_ptr, idx_ptr, xo_ptr, K, KO, stride_xm, stride_qm, stride_om,
                          HAS_INV: tl.constexpr, HAS_OUT: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_O: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    if ONE_PASS:  # the whole row in registers: x is read once
        offs = tl.arange(0, BLOCK_K)
        x = _scaled(x_row, inv_ptr, offs, K, HAS_INV)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.where(amax > 0, amax / 127.0, 1.0)
        q = tl.minimum(tl.maximum(tl.extra.cuda.libdevice.rint(x / scale), -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=offs < K)
    else:
        absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            absmax = tl.maximum(absmax, tl.abs(_scaled(x_row, inv_ptr, k0 + tl.arange(0, BLOCK_K), K, HAS_INV)))
        amax = tl.max(absmax, axis=0)
        scale = tl.where(amax > 0, amax / 127.0, 1.0)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = _scaled(x_row, inv_ptr, offs, K, HAS_INV)
            q = tl.minimum(tl.maximum(tl.extra.cuda.libdevice.rint(x / scale), -127.0), 127.0)
            tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=offs < K)
    tl.store(scale_ptr + row, scale)
    if HAS_OUT:
        for j0 in range(0, KO, BLOCK_O):  # the outlier columns X̂_o, compact, in x's dtype
            j = j0 + tl.arange(0, BLOCK_O)
            jm = j < KO
            c = tl.load(idx_ptr + j, mask=jm, other=0)
            xo = tl.load(x_row + c, mask=jm, other=0.0).to(tl.float32)
            if HAS_INV:
                xo = xo * tl.load(inv_ptr + c, mask=jm, other=1.0)
            tl.store(xo_ptr + row * stride_om + j, xo.to(xo_ptr.dtype.element_ty), mask=jm)


ONE_PASS_MAX = 16384  # rows up to this width are read once (held in registers); wider ones twice


def quantize_rows(x: torch.Tensor, inv: torch.Tensor | None, outlier_idx: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int8 codes [M, K] and fp32 row scales [M] of x · inv (x: [M, K], inv: [K] fp32 or None for 1), and,
    given ``outlier_idx`` [k], the columns (x · inv)[:, outlier_idx] as [M, k] in x's dtype (else None)."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    ko = 0 if outlier_idx is None else outlier_idx.numel()
    xo = torch.empty((m, ko), dtype=x.dtype, device=x.device) if ko else None
    one_pass = triton.next_power_of_2(k) <= ONE_PASS_MAX
    block = triton.next_power_of_2(k) if one_pass else 4096
    _k(_quantize_rows_kernel)[(m,)](x, inv if inv is not None else scale, q, scale, outlier_idx if ko else scale,
                                    xo if ko else q, k, ko, x.stride(0), q.stride(0), xo.stride(0) if ko else 0,
                                    HAS_INV=inv is not None, HAS_OUT=ko > 0, ONE_PASS=one_pass, BLOCK_K=block,
                                    BLOCK_O=min(triton.next_power_of_2(max(ko, 1)), 256),
                                    num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return q, scale, xo


@triton.jit
def _quantize_groups_kernel(x_ptr, inv_ptr, q_ptr, scale_ptr, K, NG, stride_xm, stride_qm, stride_sm,
                            G: tl.constexpr, HAS_INV: tl.constexpr, BLOCK_G: tl.constexpr, GROUPS: tl.constexpr):
    """One program per (row, run of GROUPS groups): each group's absmax, int8 codes and scale."""
    row, g0 = tl.program_id(0), tl.program_id(1) * GROUPS
    groups = g0 + tl.arange(0, GROUPS)
    cols = groups[:, None] * G + tl.arange(0, BLOCK_G)[None, :]
    mask = (groups[:, None] < NG) & (tl.arange(0, BLOCK_G)[None, :] < G) & (cols < K)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_INV:
        x = x * tl.load(inv_ptr + cols, mask=mask, other=1.0)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, amax / 127.0, 1.0)
    q = tl.minimum(tl.maximum(tl.extra.cuda.libdevice.rint(x / scale[:, None]), -127.0), 127.0)
    tl.store(q_ptr + row * stride_qm + cols, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row * stride_sm + groups, scale, mask=groups < NG)


def quantize_groups(x: torch.Tensor, inv: torch.Tensor | None, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K] and fp32 scales [M, ceil(K / group)] of x · inv, one scale per (row, group of ``group``
    consecutive columns; the last may be shorter): ``reference.quantize_groups``."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    ng = triton.cdiv(k, group)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, ng), dtype=torch.float32, device=x.device)
    block_g = triton.next_power_of_2(group)
    groups = max(1, min(triton.next_power_of_2(ng), 4096 // block_g))
    _k(_quantize_groups_kernel)[(m, triton.cdiv(ng, groups))](
        x, inv if inv is not None else scale, q, scale, k, ng, x.stride(0), q.stride(0), scale.stride(0), G=group,
        HAS_INV=inv is not None, BLOCK_G=block_g, GROUPS=groups, num_warps=4)
    return q, scale


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The rows and columns of this program's output tile; tiles are visited GROUP_M row tiles at a time, so the
    programs that run together share B's column tiles in L2."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _low_rank_dot(out, offs_m, offs_n, M, N, x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, KS, HAS_S: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    """out + X[offs_m, :KS] · (W[offs_n, :KS] · (s − 1))ᵀ, or · W[offs_n, :KS]ᵀ without s: a thin product added in a
    GEMM's epilogue, KS in blocks of BLOCK, on the tensor cores in X's dtype. The outlier correction (X̂_o, W_o,
    S_o) and the LoRA term (x·Aᵀ·scaling, B) are both of this form."""
    for j0 in range(0, KS, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jm = j < KS
        xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + j[None, :], mask=(offs_m[:, None] < M) & jm[None, :],
                     other=0.0)
        ws = tl.load(w_ptr + offs_n[None, :] * stride_wn + j[:, None], mask=jm[:, None] & (offs_n[None, :] < N),
                     other=0.0)
        if HAS_S:
            ws = ws.to(tl.float32) * (tl.load(s_ptr + j, mask=jm, other=1.0).to(tl.float32) - 1.0)[:, None]
        out = tl.dot(xs, ws.to(xs.dtype), out, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _epilogue(out, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, xo_ptr, wo_ptr, so_ptr, KO, stride_om,
              stride_wn, h_ptr, lb_ptr, R, stride_hm, stride_ln, HAS_BIAS: tl.constexpr, HAS_OUT: tl.constexpr,
              HAS_LORA: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_O: tl.constexpr):
    """Bias, outlier correction X̂_o · ((S_o − 1) · W_o)ᵀ and LoRA term h · Bᵀ added to the fp32 tile; stored in C's
    dtype: no [M, N] residual goes through memory."""
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_OUT:
        out = _low_rank_dot(out, offs_m, offs_n, M, N, xo_ptr, stride_om, wo_ptr, stride_wn, so_ptr, KO, True,
                            DOT_PRECISION, BLOCK_O)
    if HAS_LORA:
        out = _low_rank_dot(out, offs_m, offs_n, M, N, h_ptr, stride_hm, lb_ptr, stride_ln, so_ptr, R, False,
                            DOT_PRECISION, 16)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, out.to(c_ptr.dtype.element_ty),
             mask=mask)


def _gemm_configs():
    out = []
    for bm, bn, bk, stages, warps in [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8),
                                      (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                                 num_warps=warps))
    return out


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "B_KMAJOR"])
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, xo_ptr, wo_ptr, so_ptr, h_ptr, lb_ptr, M, N, K, KO,
                      R, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_om, stride_wn,
                      stride_hm, stride_ln, HAS_SB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUT: tl.constexpr,
                      HAS_LORA: tl.constexpr, B_KMAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      BLOCK_O: tl.constexpr):
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out = acc.to(tl.float32) * tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_SB:
        out = out * tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    _epilogue(out, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, xo_ptr, wo_ptr, so_ptr, KO, stride_om,
              stride_wn, h_ptr, lb_ptr, R, stride_hm, stride_ln, HAS_BIAS, HAS_OUT, HAS_LORA, DOT_PRECISION, BLOCK_O)


def _thin(x_o, w_outlier, lora_h, lora_b, dummy, out_dtype: torch.dtype) -> dict:
    """The epilogue's two thin products as kernel arguments (pointers, sizes, strides, flags, the dot precision of
    their dtype): the outlier correction when x_o has columns, the LoRA term when lora_h is given (both made
    contiguous in their last dim); ``dummy`` stands for the pointers of a term that is absent."""
    has_out = x_o is not None and x_o.shape[1] > 0
    has_lora = lora_h is not None
    if has_out and w_outlier.stride(1) != 1:
        w_outlier = w_outlier.contiguous()
    if has_lora:
        lora_h, lora_b = (t if t.stride(1) == 1 else t.contiguous() for t in (lora_h, lora_b))
    thin_dtype = x_o.dtype if has_out else lora_h.dtype if has_lora else out_dtype
    return dict(xo=x_o if has_out else dummy, wo=w_outlier if has_out else dummy, h=lora_h if has_lora else dummy,
                lb=lora_b if has_lora else dummy, KO=x_o.shape[1] if has_out else 0,
                R=lora_h.shape[1] if has_lora else 0, stride_om=x_o.stride(0) if has_out else 0,
                stride_wn=w_outlier.stride(0) if has_out else 0, stride_hm=lora_h.stride(0) if has_lora else 0,
                stride_ln=lora_b.stride(0) if has_lora else 0, HAS_OUT=has_out, HAS_LORA=has_lora,
                # fp32 thin products to fp32 accuracy; 16-bit ones are exact on the tensor cores
                DOT_PRECISION="tf32x3" if thin_dtype == torch.float32 else "tf32")


def _tile_grid(m: int, n: int):
    """The launch grid of a GEMM kernel: one program per output tile (the tile size is the autotuner's choice)."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor | None, out_dtype: torch.dtype,
              bias: torch.Tensor | None = None, x_o: torch.Tensor | None = None, w_outlier: torch.Tensor | None = None,
              act_scale: torch.Tensor | None = None, b_is_nk: bool = True, lora_h: torch.Tensor | None = None,
              lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """C = (A · B) · sa[:, None] (· sb[None, :]) (+ bias) (+ x_o · ((act_scale − 1) · w_outlier)ᵀ) (+ lora_h · lora_bᵀ).

    a: int8 [M, K]; b: int8 weight, [N, K] when ``b_is_nk`` (C = A Bᵀ, the forward) or [K, N] (C = A B);
    x_o [M, k] (x's dtype), w_outlier [N, k], act_scale [k]: the outlier correction, made in the epilogue;
    lora_h [M, r], lora_b [N, r] (x's dtype): a LoRA term, also in the epilogue.
    B [K, N] row-major (N-major tiles) is correct but slow: about 300 TOPS on an H100 against 1000 K-major."""
    m, k = a.shape
    n = b.shape[0] if b_is_nk else b.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    stride_bk, stride_bn = (b.stride(1), b.stride(0)) if b_is_nk else (b.stride(0), b.stride(1))
    t = _thin(x_o, w_outlier, lora_h, lora_b, sa, out_dtype)
    _k(_int8_gemm_kernel)[_tile_grid(m, n)](
        a, b, c, sa, sb if sb is not None else sa, bias if bias is not None else sa, t["xo"], t["wo"],
        act_scale if t["HAS_OUT"] else sa, t["h"], t["lb"], m, n, k, t["KO"], t["R"], a.stride(0), a.stride(1),
        stride_bk, stride_bn, c.stride(0), c.stride(1), t["stride_om"], t["stride_wn"], t["stride_hm"],
        t["stride_ln"], HAS_SB=sb is not None, HAS_BIAS=bias is not None, HAS_OUT=t["HAS_OUT"],
        HAS_LORA=t["HAS_LORA"], B_KMAJOR=b_is_nk, DOT_PRECISION=t["DOT_PRECISION"], BLOCK_O=32)
    return c


def _grouped_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
            for bm, bn, stages, warps in [(128, 256, 3, 8), (256, 128, 3, 8), (128, 128, 4, 8), (64, 128, 4, 4),
                                          (128, 64, 4, 4)]]


@triton.autotune(configs=_grouped_configs(), key=["M", "N", "K", "G"])
@triton.jit
def _int8_gemm_grouped_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, xo_ptr, wo_ptr, so_ptr, h_ptr, lb_ptr, M,
                              N, K, KO, R, stride_am, stride_bn, stride_cm, stride_sam, stride_om, stride_wn, stride_hm,
                              stride_ln, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUT: tl.constexpr,
                              HAS_LORA: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                              BLOCK_O: tl.constexpr):
    """C = Σ_g (A_g · B_gᵀ) · sa[:, g] · sb (+ the epilogue's terms): the K loop steps one activation group (G
    columns) at a time; each group's int32 tile is scaled by its rows' scales and summed in fp32. A [M, K], B [N, K]
    int8, K contiguous."""
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, G)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, tl.cdiv(K, G)):
        k_left = K - g * G
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0)
        part = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
        sa = tl.load(sa_ptr + offs_m * stride_sam + g, mask=offs_m < M, other=0.0)
        acc += part * sa[:, None]
        a_ptrs += G
        b_ptrs += G
    out = acc * tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    _epilogue(out, offs_m, offs_n, M, N, c_ptr, stride_cm, 1, bias_ptr, xo_ptr, wo_ptr, so_ptr, KO, stride_om,
              stride_wn, h_ptr, lb_ptr, R, stride_hm, stride_ln, HAS_BIAS, HAS_OUT, HAS_LORA, DOT_PRECISION, BLOCK_O)


def grouped_kernel_takes(group: int) -> bool:
    """The grouped GEMM steps K one group at a time on the tensor cores: groups of a power of two from 32 up."""
    return group >= 32 and group & (group - 1) == 0


def int8_gemm_grouped(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, group: int,
                      out_dtype: torch.dtype, bias: torch.Tensor | None = None, x_o: torch.Tensor | None = None,
                      w_outlier: torch.Tensor | None = None, act_scale: torch.Tensor | None = None,
                      lora_h: torch.Tensor | None = None, lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """C = Σ_g (A_g · B_gᵀ) · sa[:, g] · sb (+ bias) (+ x_o · ((act_scale − 1) · w_outlier)ᵀ) (+ lora_h · lora_bᵀ):
    a [M, K] int8 codes quantized per (row, group of ``group`` columns) with scales sa [M, ceil(K / group)], b the
    int8 weight [N, K] with row scales sb [N]; the thin terms as in ``int8_gemm``, in the epilogue. Groups that the
    kernel does not take (``grouped_kernel_takes``) go through exact fp32 matmuls, one per group."""
    m, k = a.shape
    n = b.shape[0]
    if not grouped_kernel_takes(group):
        out = torch.zeros((m, n), dtype=torch.float32, device=a.device)
        for i, k0 in enumerate(range(0, k, group)):  # |sum| <= group * 127² < 2²⁴: exact in fp32 for group < 1040
            out += (a[:, k0:k0 + group].float() @ b[:, k0:k0 + group].float().t()) * sa[:, i:i + 1]
        out *= sb[None, :]
        out = out if bias is None else out + bias.float()
        if x_o is not None and x_o.shape[1]:
            out += x_o.float() @ reference.correction_weight(w_outlier.float(), act_scale).t()
        if lora_h is not None:
            out += lora_h.float() @ lora_b.float().t()
        return out.to(out_dtype)
    a, b = (t if t.stride(1) == 1 else t.contiguous() for t in (a, b))
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    t = _thin(x_o, w_outlier, lora_h, lora_b, sb, out_dtype)
    _k(_int8_gemm_grouped_kernel)[_tile_grid(m, n)](
        a, b, c, sa, sb, bias if bias is not None else sb, t["xo"], t["wo"], act_scale if t["HAS_OUT"] else sb, t["h"],
        t["lb"], m, n, k, t["KO"], t["R"], a.stride(0), b.stride(0), c.stride(0), sa.stride(0), t["stride_om"],
        t["stride_wn"], t["stride_hm"], t["stride_ln"], G=group, HAS_BIAS=bias is not None, HAS_OUT=t["HAS_OUT"],
        HAS_LORA=t["HAS_LORA"], DOT_PRECISION=t["DOT_PRECISION"], BLOCK_O=32)
    return c


def quaff_linear(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias=None, prescaled=False,
                 inv_smooth=None, act_group: int = 0, lora_h: torch.Tensor | None = None,
                 lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """The forward of quaff::linear on CUDA; x is [M, K] (any float dtype), the output is in x's dtype.
    ``act_group`` > 0: X̂ quantized per (token, group of that many channels) and the grouped GEMM. ``lora_h`` [M, r]
    and ``lora_b`` [N, r] (quaff::lora_linear): + lora_h · lora_bᵀ, in the GEMM's epilogue."""
    has_outliers = outlier_idx.numel() > 0
    scaled = not prescaled and (has_outliers or inv_smooth is not None)
    inv = outlier_inv(x.shape[1], outlier_idx, act_scale, inv_smooth) if scaled else None
    if lora_h is not None:
        lora_h, lora_b = lora_h.to(x.dtype), lora_b.to(x.dtype)
    w_o = w_outlier.to(x.dtype)
    if act_group and act_group < x.shape[1]:
        q, sx = quantize_groups(x, inv, act_group)
        x_o = None
        if has_outliers:
            x_o = x.index_select(1, outlier_idx)
            x_o = x_o if inv is None else x_o * inv.index_select(0, outlier_idx).to(x.dtype)
        return int8_gemm_grouped(q, w_int8, sx, w_scale, act_group, x.dtype, bias, x_o, w_o, act_scale, lora_h, lora_b)
    q, sx, x_o = quantize_rows(x, inv, outlier_idx if has_outliers else None)
    return int8_gemm(q, w_int8, sx, w_scale, x.dtype, bias, x_o, w_o, act_scale, b_is_nk=True, lora_h=lora_h,
                     lora_b=lora_b)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, c_ptr, out_ptr, K, HAS_COL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    w = tl.load(w_ptr + row * K + offs, mask=mask, other=0).to(tl.float32) * tl.load(s_ptr + row).to(tl.float32)
    if HAS_COL:
        w = w * tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * K + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(w_int8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype, col_scale: torch.Tensor | None = None
               ) -> torch.Tensor:
    """W = w_int8 · w_scale[:, None] (· col_scale[None, :]) in ``dtype``, one pass."""
    n, k = w_int8.shape
    w_int8 = w_int8.contiguous()
    out = torch.empty((n, k), dtype=dtype, device=w_int8.device)
    block = 1024
    _k(_dequant_kernel)[(n, triton.cdiv(k, block))](w_int8, w_scale,
                                                    col_scale if col_scale is not None else w_scale, out, k,
                                                    HAS_COL=col_scale is not None, BLOCK=block)
    return out


@triton.jit
def _transpose_kernel(x_ptr, y_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = tl.load(x_ptr + offs_r[:, None] * C + offs_c[None, :], mask=(offs_r[:, None] < R) & (offs_c[None, :] < C))
    tl.store(y_ptr + offs_c[:, None] * R + offs_r[None, :], tl.trans(tile),
             mask=(offs_c[:, None] < C) & (offs_r[None, :] < R))


def transpose(x: torch.Tensor) -> torch.Tensor:
    """x [R, C] (contiguous) -> its transpose [C, R], contiguous, in one tiled pass (torch's int8 ``.t().contiguous()``
    reaches about a seventh of the memory bandwidth)."""
    x = x.contiguous()
    r, c = x.shape
    y = torch.empty((c, r), dtype=x.dtype, device=x.device)
    block = 128
    grid = (triton.cdiv(r, block), triton.cdiv(c, block))
    _k(_transpose_kernel)[grid](x, y, r, c, BLOCK_R=block, BLOCK_C=block, num_warps=8)
    return y


GRAD_X_MODES = ("int8", "dequantize")
_grad_x_mode = "int8"


def set_grad_x_mode(mode: str) -> None:
    """How the CUDA backward computes grad_X of a layer that has no transposed int8 copy, when not ``exact``:
    'int8' (the default: the gradient, times W's row scales, quantized per row, and the int8 GEMM on a transient
    transposed copy of W, made by ``transpose`` and freed after the layer: the int8 tensor cores take K-major
    operands only) or 'dequantize' (W dequantized into the gradient's dtype, cuBLAS; exact up to the dtype)."""
    global _grad_x_mode
    if mode not in GRAD_X_MODES:
        raise ValueError(f"grad_X mode {mode!r}: use one of {GRAD_X_MODES}")
    _grad_x_mode = mode


def grad_input(grad: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, exact: bool,
               inv_smooth: torch.Tensor | None = None, w_int8_t: torch.Tensor | None = None) -> torch.Tensor:
    """grad_X = (grad · W) · inv_smooth on CUDA. When not ``exact``, in int8 (unless the grad_X mode is
    'dequantize' and there is no copy): the gradient times the weight's row scales, quantized per row, then the
    int8 GEMM on the transposed int8 weight (``w_int8_t`` [K, N] if the layer keeps it, else a transient one)
    with inv_smooth as its column scale. Otherwise W (with inv_smooth) is dequantized into grad's dtype in one
    pass and cuBLAS multiplies."""
    if not exact and (w_int8_t is not None or _grad_x_mode == "int8"):
        q, sg, _ = quantize_rows(grad, w_scale.float())
        w_t = w_int8_t if w_int8_t is not None else transpose(w_int8)
        return int8_gemm(q, w_t, sg, inv_smooth, grad.dtype, b_is_nk=True)  # w_t: [K, N], N contracted
    return grad @ dequantize(w_int8, w_scale, grad.dtype, inv_smooth)
