"""Probe: int8 GEMM throughput of the in-tree Triton kernel, a TMA-descriptor Triton kernel (plain and
persistent) and torch._int_mm, on one H100, at Llama shapes. Prints TOPS; checks results exactly.

    python tools/int8_gemm_probe.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from gpu_bench import cuda_time  # tools/ is on the path when run as a script
from triton.tools.tensor_descriptor import TensorDescriptor

from quaff_fx.kernels import triton_kernels as tk


def _hook(nargs):
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]


def _configs():
    out = []
    for bm, bn, bk, st, w in [(128, 256, 128, 3, 8), (128, 256, 128, 4, 8), (256, 128, 128, 3, 8),
                              (128, 128, 128, 4, 8), (128, 128, 128, 5, 4), (128, 256, 64, 4, 8), (256, 128, 64, 4, 8)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st,
                                 num_warps=w, pre_hook=_hook))
    return out


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def _tma_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, M, N, K, stride_cm, NUM_SMS: tl.constexpr,
                PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    num_tiles = num_m * num_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    group = GROUP_M * num_n
    start = tl.program_id(0)
    step = NUM_SMS if PERSISTENT else num_tiles
    for tile in tl.range(start, num_tiles, step, flatten=True):
        first_m = (tile // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group) % size_m
        pid_n = (tile % group) // size_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kk in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, kk * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out = acc.to(tl.float32) * tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        out = out * tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)


def tma_gemm(a, b, sa, sb, persistent: bool):
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    dummy = [1, 1]
    a_desc = TensorDescriptor(a, a.shape, a.stride(), dummy)
    b_desc = TensorDescriptor(b, b.shape, b.stride(), dummy)
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def grid(meta):  # one program per output tile, or (persistent) one per SM looping over tiles
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(sms, tiles),) if persistent else (tiles,)

    _tma_kernel[grid](a_desc, b_desc, c, sa, sb, m, n, k, c.stride(0), NUM_SMS=sms, PERSISTENT=persistent)
    return c


def main():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    for m, k, n in [(4096, 2048, 2048), (4096, 2048, 5632), (4096, 5632, 2048), (8192, 4096, 4096), (8192, 4096, 14336),
                    (8192, 14336, 4096)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        sa, sb = torch.rand(m, device="cuda") * 1e-3, torch.rand(n, device="cuda") * 1e-3
        ref = tk.int8_gemm(a, b, sa, sb, torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row = {"in-tree": cuda_time(lambda: tk.int8_gemm(a, b, sa, sb, torch.bfloat16)),
               "_int_mm": cuda_time(lambda: torch._int_mm(a, b.t())),
               "bf16 cuBLAS": cuda_time(lambda: xb @ wb.t())}
        for p in (False, True):
            got = tma_gemm(a, b, sa, sb, p)
            assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2), (m, k, n, p)
            row["tma persistent" if p else "tma"] = cuda_time(lambda: tma_gemm(a, b, sa, sb, p))
        ops = 2 * m * n * k
        rates = "  ".join(f"{name} {ops / t / 1e12:.0f}" for name, t in row.items())
        print(f"M={m} K={k} N={n}: {rates}  (TOPS / TFLOPS)", flush=True)


if __name__ == "__main__":
    main()
