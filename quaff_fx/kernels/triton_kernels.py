"""CUDA kernels of the quaff ops, in Triton. Imported only where CUDA and Triton are present.

1. ``quantize_rows``: one program per row; X̂ = X · inv_s (inv_s: 1/S on the outlier channels, 1 elsewhere,
   or the per-column weight scale in the backward pass), the row's absmax, then int8 codes and the row
   scale, in two passes over the row and one kernel launch.
2. ``int8_gemm``: int8 × int8 → int32 on the tensor cores, with the dequantization (row scale × column
   scale), the bias and the outlier correction (a precomputed [M, N] residual) fused in the epilogue.
   B is read as the row-major int8 weight [N, K] (K contiguous), i.e. column-major for the GEMM: the
   layout the Hopper int8 tensor cores want.
3. the backward GEMM grad_q [M, N] × W_int8 [N, K] runs on a transposed int8 copy of W, row-scaled.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_rows_kernel(x_ptr, inv_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(inv_ptr + offs, mask=mask, other=1.0)
        absmax = tl.maximum(absmax, tl.abs(x))
    amax = tl.max(absmax, axis=0)
    scale = tl.where(amax > 0, amax / 127.0, 1.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(inv_ptr + offs, mask=mask, other=1.0)
        q = tl.extra.cuda.libdevice.rint(x / scale)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=mask)


def quantize_rows(x: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K] and fp32 row scales [M] of x · inv (x: [M, K], inv: [K] fp32)."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(k), 4096)
    _quantize_rows_kernel[(m,)](x, inv, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block, num_warps=8 if block >= 2048 else 4)
    return q, scale


def _gemm_configs():
    out = []
    for bm, bn, bk, stages, warps in [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8),
                                      (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps))
    return out


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "B_KMAJOR"])
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, res_ptr, M, N, K,
                      stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn,
                      HAS_SB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, B_KMAJOR: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RES:
        out += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, out.to(c_ptr.dtype.element_ty), mask=mask)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor | None, out_dtype: torch.dtype,
              bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, b_is_nk: bool = True) -> torch.Tensor:
    """C = (A · B) · sa[:, None] (· sb[None, :]) (+ bias) (+ residual).

    a: int8 [M, K]; b: int8 weight, [N, K] when ``b_is_nk`` (C = A Bᵀ, the forward) or [K, N] (C = A B,
    the backward's grad × W)."""
    m, k = a.shape
    n = b.shape[0] if b_is_nk else b.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    stride_bk, stride_bn = (b.stride(1), b.stride(0)) if b_is_nk else (b.stride(0), b.stride(1))
    dummy = sa
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _int8_gemm_kernel[grid](a, b, c, sa, sb if sb is not None else dummy, bias if bias is not None else dummy,
                            residual if residual is not None else c, m, n, k,
                            a.stride(0), a.stride(1), stride_bk, stride_bn, c.stride(0), c.stride(1),
                            residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
                            HAS_SB=sb is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, B_KMAJOR=b_is_nk)
    return c


def quaff_linear(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias=None, prescaled=False) -> torch.Tensor:
    """The forward of quaff::linear on CUDA; x is [M, K] (any float dtype), the output is in x's dtype."""
    k = x.shape[1]
    inv = torch.ones(k, dtype=torch.float32, device=x.device)
    has_outliers = outlier_idx.numel() > 0
    if has_outliers and not prescaled:
        inv.index_copy_(0, outlier_idx, 1.0 / act_scale.float())
    q, sx = quantize_rows(x, inv)
    residual = None
    if has_outliers:
        # the correction X̂_o ((S_o - 1) W_o)ᵀ, a skinny [M, k] x [k, N] product, on cuBLAS in x's dtype
        x_hat_o = (x.index_select(1, outlier_idx).float() * inv.index_select(0, outlier_idx)).to(x.dtype)
        w_corr = (w_outlier.float() * (act_scale.float() - 1.0)).to(x.dtype)
        residual = x_hat_o @ w_corr.t()
    return int8_gemm(q, w_int8, sx, w_scale, x.dtype, bias, residual, b_is_nk=True)


def grad_input(grad: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, exact: bool) -> torch.Tensor:
    """grad_X = grad · W on CUDA: the per-output-channel weight scale folded into the gradient, which is
    quantized per row in the same kernel, then one int8 GEMM with the row scale in its epilogue."""
    if exact:
        return (grad.float() @ (w_int8.float() * w_scale[:, None])).to(grad.dtype)
    q, sg = quantize_rows(grad, w_scale.float())
    # Wᵀ as a [K, N] row-major copy: the GEMM then reads its B K-major, the layout the int8 tensor cores
    # take (reading W [N, K] directly ran at a third of the speed); the copy costs one pass over int8 W
    w_t = w_int8.t().contiguous()
    return int8_gemm(q, w_t, sg, None, grad.dtype, b_is_nk=True)
