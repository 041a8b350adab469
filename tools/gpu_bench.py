"""GPU layer benchmark: one Linear forward + backward (grad_X; the weight is frozen) in bf16 against
QuaffLinear on the Triton kernels (backward: dequantized W + cuBLAS, and int8 on the transposed int8 copy),
at Llama/Phi-3 sizes, plus the int8 GEMM's throughput. Ratios from one run.

Times are GPU times: each measured call is captured 20 times into a CUDA graph and replayed, as in a
training step under torch.compile's CUDA graphs, so the CPU's launch overhead (Python, Triton's launcher),
which an eager loop of small kernels would measure instead, is left out. ``--eager-timing``: time eager calls.

    python tools/gpu_bench.py [--tokens 4096 8192] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from quaff_fx.kernels import triton_kernels as tk
from quaff_fx.quaff_linear import QuaffLinear

SHAPES = [(2048, 2048), (2048, 11264), (4096, 4096), (4096, 14336), (14336, 4096), (3072, 8192), (8192, 3072)]
TOKENS = [2048, 4096, 8192, 16384]
PEAK_INT8_TOPS = 1979.0  # H100 SXM dense int8 tensor-core peak


def graph_time(fn, reps: int = 20) -> float:
    """GPU seconds per call of ``fn``: ``reps`` calls captured in one CUDA graph, the replay timed."""
    fn()  # compile and autotune outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return cuda_time(graph.replay, 5) / reps


def cuda_time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def breakdown(timer, k: int = 4096, n: int = 14336, m: int = 8192) -> None:
    """Where a Quaff layer's time goes, part by part, next to the bf16 GEMMs it replaces."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    idx = torch.randperm(k, device="cuda")[: k // 100]
    quaff = QuaffLinear.from_weight(w, None, idx, act_max=torch.full((k,), 300.0, device="cuda")).eval()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    inv = tk.outlier_inv(k, quaff.outlier_idx, quaff.act_scale)
    q, sx, x_o = tk.quantize_rows(x, inv, quaff.outlier_idx)
    qg, sg, _ = tk.quantize_rows(g, quaff.w_scale)
    w_t = quaff.w_int8.t().contiguous()
    w_o = quaff.w_outlier.to(torch.bfloat16)
    parts = {
        "bf16 forward GEMM": lambda: F.linear(x, w),
        "bf16 grad_X GEMM": lambda: g @ w,
        "1/S vector (Triton)": lambda: tk.outlier_inv(k, quaff.outlier_idx, quaff.act_scale),
        "quantize X + gather X̂_o (Triton)": lambda: tk.quantize_rows(x, inv, quaff.outlier_idx),
        "int8 GEMM + epilogue, no correction": lambda: tk.int8_gemm(q, quaff.w_int8, sx, quaff.w_scale, torch.bfloat16),
        "int8 GEMM + epilogue with correction": lambda: tk.int8_gemm(q, quaff.w_int8, sx, quaff.w_scale, torch.bfloat16,
                                                                     None, x_o, w_o, quaff.act_scale),
        "torch._int_mm (same GEMM, int32 out)": lambda: torch._int_mm(q, quaff.w_int8.t()),
        "quaff linear op forward (all of it)": lambda: torch.ops.quaff.linear(x, quaff.w_int8, quaff.w_scale,
                                                                          quaff.outlier_idx, quaff.act_scale, w_o),
        "dequantize W to bf16 (Triton)": lambda: tk.dequantize(quaff.w_int8, quaff.w_scale, torch.bfloat16),
        "grad_X: dequantized W + cuBLAS (exact)": lambda: tk.grad_input(g, quaff.w_int8, quaff.w_scale, True),
        "grad_X: int8 on a transient Wᵀ (default)": lambda: tk.grad_input(g, quaff.w_int8, quaff.w_scale, False),
        "grad_X: int8 on the Wᵀ copy (int8_backward_)": lambda: tk.grad_input(g, quaff.w_int8, quaff.w_scale, False,
                                                                              None, w_t),
        "  of which quantize grad (Triton)": lambda: tk.quantize_rows(g, quaff.w_scale),
        "  of which int8 GEMM on the Wᵀ copy": lambda: tk.int8_gemm(qg, w_t, sg, None, torch.bfloat16),
        "torch._int_mm on row-major W (no copy)": lambda: torch._int_mm(qg, quaff.w_int8),
    }
    print(f"\nbreakdown at K={k} N={n} M={m}:")
    for name, fn in parts.items():
        print(f"  {name:44s} {timer(fn) * 1e3:.3f} ms", flush=True)


def act_group_rows(timer, groups=(64, 128)) -> list[dict]:
    """down_proj's forward (Llama-3-8B: K 14336, N 4096) per token against per (token, group): the quantization, the
    GEMM and the whole op, next to bf16's GEMM."""
    rows = []
    k, n = 14336, 4096
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    idx = torch.randperm(k, device="cuda")[: k // 100]
    quaff = QuaffLinear.from_weight(w, None, idx, act_max=torch.full((k,), 300.0, device="cuda")).eval()
    inv = tk.outlier_inv(k, quaff.outlier_idx, quaff.act_scale)
    w_o = quaff.w_outlier.to(torch.bfloat16)
    for m in (4096, 8192):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q, sx, x_o = tk.quantize_rows(x, inv, quaff.outlier_idx)
        row = {"K": k, "N": n, "M": m, "bf16 GEMM": timer(lambda: F.linear(x, w)),
               "per token: quantize": timer(lambda: tk.quantize_rows(x, inv, quaff.outlier_idx)),
               "per token: int8 GEMM + correction": timer(lambda: tk.int8_gemm(q, quaff.w_int8, sx, quaff.w_scale,
                                                                                torch.bfloat16, None, x_o, w_o,
                                                                                quaff.act_scale)),
               "per token: op": timer(lambda: tk.quaff_linear(x, quaff.w_int8, quaff.w_scale, quaff.outlier_idx,
                                                               quaff.act_scale, w_o))}
        for group in groups:
            qg, sg = tk.quantize_groups(x, inv, group)
            row[f"group {group}: quantize"] = timer(lambda: tk.quantize_groups(x, inv, group))
            row[f"group {group}: int8 GEMM"] = timer(lambda: tk.int8_gemm_grouped(qg, quaff.w_int8, sg, quaff.w_scale,
                                                                                 group, torch.bfloat16))
            row[f"group {group}: op"] = timer(lambda: tk.quaff_linear(x, quaff.w_int8, quaff.w_scale, quaff.outlier_idx,
                                                                      quaff.act_scale, w_o, act_group=group))
        print(f"\ndown_proj forward, M={m}:")
        for name, t in row.items():
            if name not in ("K", "N", "M"):
                print(f"  {name:36s} {t * 1e3:.3f} ms  ({row['bf16 GEMM'] / t:.2f}x bf16)", flush=True)
        rows.append(row)
    return rows


def lora_rows(timer, m: int = 4096, r: int = 16) -> list[dict]:
    """A LoRA layer's forward at Llama-3-8B's shapes: bf16 base + PEFT-style adapter (x·Aᵀ, ·Bᵀ, scaled, added),
    the Quaff op + the same adapter, and quaff::lora_linear (h · Bᵀ in the int8 GEMM's epilogue); down_proj with
    its default activation groups of 128."""
    rows = []
    for k, n, group in [(4096, 4096, 0), (4096, 14336, 0), (14336, 4096, 128)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        idx = torch.randperm(k, device="cuda")[: k // 100]
        quaff = QuaffLinear.from_weight(w, None, idx, act_max=torch.full((k,), 300.0, device="cuda"),
                                        act_group=group).eval()
        quaff.w_outlier.data = quaff.w_outlier.to(torch.bfloat16)
        a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 0.01
        b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * 0.01
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

        def adapter(base):
            return base + F.linear(F.linear(x, a), b) * 2.0

        with torch.no_grad():
            row = {"K": k, "N": n, "M": m, "act_group": group,
                   "bf16 + adapter": timer(lambda: adapter(F.linear(x, w))),
                   "quaff op + adapter": timer(lambda: adapter(quaff(x))),
                   "quaff::lora_linear": timer(lambda: quaff(x, lora=(F.linear(x, a) * 2.0, b)))}
        print(f"\nLoRA layer forward K={k} N={n} M={m} group={group}:")
        for name in ("bf16 + adapter", "quaff op + adapter", "quaff::lora_linear"):
            print(f"  {name:24s} {row[name] * 1e3:.3f} ms  ({row['bf16 + adapter'] / row[name]:.2f}x)", flush=True)
        rows.append(row)
    return rows


def host_rows(layers: int = 8, k: int = 4096, r: int = 16, tokens=(512, 4096)) -> list[dict]:
    """A stack of ``layers`` LoRA layers (K × K, Llama-3-8B's q_proj) compiled by torch.compile, forward and backward
    of x, h and B: the Quaff ops' Triton kernels inlined into inductor's code (``ops.inline_kernels(True)``) against
    each op called as one Python function (the default), and bf16 + adapter compiled alike. Per step: the host's time to
    launch it (no sync) and the wall time with the sync; at 512 tokens the GPU work is small, so the step is as
    long as its launches."""
    import time

    from quaff_fx import ops

    torch.manual_seed(0)
    ws = [torch.randn(k, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    idx = torch.randperm(k, device="cuda")[: k // 100]
    quaffs = [QuaffLinear.from_weight(w, None, idx, act_max=torch.full((k,), 300.0, device="cuda")).eval() for w in ws]
    for q in quaffs:
        q.w_outlier.data = q.w_outlier.to(torch.bfloat16)
    a_s = [(torch.randn(r, k, device="cuda") * 0.01).requires_grad_() for _ in ws]
    b_s = [(torch.randn(k, r, device="cuda") * 0.01).requires_grad_() for _ in ws]

    def stack(x, quaff: bool):
        for i, (w, a, b) in enumerate(zip(ws, a_s, b_s)):
            h = F.linear(x, a.to(x.dtype)) * 2.0
            x = quaffs[i](x, lora=(h, b)) if quaff else F.linear(x, w) + F.linear(h, b.to(x.dtype))
        return x.float().pow(2).mean()

    rows, default = [], ops.kernels_inlined()
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = {"layers": layers, "K": k, "M": m, "rank": r}
        for name, quaff, inline in [("bf16 + adapter", False, True), ("quaff inlined", True, True),
                                    ("quaff opaque", True, False)]:
            ops.inline_kernels(inline)
            torch._dynamo.reset()
            fn = torch.compile(lambda: stack(x, quaff).backward(), dynamic=False)
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            host, wall = [], []
            for _ in range(20):
                t0 = time.perf_counter()
                fn()
                host.append(time.perf_counter() - t0)
                torch.cuda.synchronize()
                wall.append(time.perf_counter() - t0)
            row[f"{name} host ms"] = statistics.median(host) * 1e3
            row[f"{name} wall ms"] = statistics.median(wall) * 1e3
            print(f"{layers} compiled LoRA layers K={k} M={m} {name:16s} host {row[f'{name} host ms']:.2f} ms, "
                  f"wall {row[f'{name} wall ms']:.2f} ms", flush=True)
        ops.inline_kernels(default)
        rows.append(row)
    return rows


def grad_x_modes(timer, m: int = 4096) -> list[dict]:
    """grad_X of a layer without the transposed copy, each mode of ``set_grad_x_mode`` (int8 on a transient
    transposed copy, dequantized W + cuBLAS), against the kept copy and bf16, at Llama-3-8B's shapes; the int8
    GEMM's TOPS on W as it is (N-major tiles) and on the copy (K-major); the int8 transpose's bandwidth."""
    rows = []
    for k, n in [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        quaff = QuaffLinear.from_weight(w, None, []).eval()
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        qg, sg, _ = tk.quantize_rows(g, quaff.w_scale)
        w_t = quaff.w_int8.t().contiguous()
        flops = 2 * m * n * k
        row = {"K": k, "N": n, "M": m, "bf16 grad_X GEMM": timer(lambda: g @ w),
               "int8 GEMM on the copy": timer(lambda: tk.int8_gemm(qg, w_t, sg, None, torch.bfloat16)),
               "int8 GEMM on W, N-major": timer(lambda: tk.int8_gemm(qg, quaff.w_int8, sg, None, torch.bfloat16,
                                                                     b_is_nk=False)),
               "transpose W (torch)": timer(lambda: quaff.w_int8.t().contiguous()),
               "transpose W (Triton)": timer(lambda: tk.transpose(quaff.w_int8))}
        for mode in tk.GRAD_X_MODES:
            tk.set_grad_x_mode(mode)
            row[f"grad_X {mode}"] = timer(lambda: tk.grad_input(g, quaff.w_int8, quaff.w_scale, False))
        tk.set_grad_x_mode("int8")
        row["grad_X int8 on the copy"] = timer(lambda: tk.grad_input(g, quaff.w_int8, quaff.w_scale, False, None, w_t))
        row = {key: (v * 1e3 if isinstance(v, float) else v) for key, v in row.items()}  # ms
        row["transpose GB/s"] = 2 * n * k / (row["transpose W (Triton)"] / 1e3) / 1e9
        for key in ("int8 GEMM on the copy", "int8 GEMM on W, N-major"):
            row[f"{key} TOPS"] = flops / (row[key] / 1e3) / 1e12
        row["bf16 TFLOPS"] = flops / (row["bf16 grad_X GEMM"] / 1e3) / 1e12
        rows.append(row)
        print(f"grad_X K={k} N={n} M={m}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items() if key not in "KNM"),
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    ap.add_argument("--eager-timing", action="store_true", help="time eager calls (CPU launch overhead included)")
    ap.add_argument("--grad-x-only", action="store_true", help="only the grad_X modes at Llama-3-8B's shapes")
    ap.add_argument("--act-group-only", action="store_true",
                    help="only down_proj's forward per token against per (token, group of 64 / 128 channels)")
    ap.add_argument("--lora-only", action="store_true",
                    help="only a LoRA layer's forward: adapter added after the op against in its epilogue")
    ap.add_argument("--host-only", action="store_true",
                    help="only compiled LoRA layer stacks: the ops' kernels inlined into inductor's code or opaque")
    args = ap.parse_args()
    timer = cuda_time if args.eager_timing else graph_time
    if args.grad_x_only or args.act_group_only or args.lora_only or args.host_only:
        rows = (grad_x_modes(timer) if args.grad_x_only else act_group_rows(timer) if args.act_group_only
                else lora_rows(timer) if args.lora_only else host_rows())
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        idx = torch.randperm(k, device="cuda")[: k // 100]
        act_max = torch.ones(k, device="cuda") * 3
        act_max[idx] = 300
        quaff = QuaffLinear.from_weight(w, None, idx, act_max=act_max).eval()
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x[:, idx] *= 100
            x.requires_grad_(True)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

            def bf16_step():
                F.linear(x, w).backward(g)

            def quaff_step():
                quaff(x).backward(g)

            def quaff_fwd():
                with torch.no_grad():
                    quaff(x)

            def bf16_fwd():
                with torch.no_grad():
                    F.linear(x, w)

            q, sx, _ = tk.quantize_rows(x.detach(), None)
            t_gemm = timer(lambda: tk.int8_gemm(q, quaff.w_int8, sx, quaff.w_scale, torch.bfloat16))
            t_intmm = timer(lambda: torch._int_mm(q, quaff.w_int8.t()))
            t_b, t_q = timer(bf16_step), timer(quaff_step)
            quaff.int8_backward_()  # the transposed int8 copy: grad_X in int8
            t_q8 = timer(quaff_step)
            quaff.int8_backward_(False)
            t_bf, t_qf = timer(bf16_fwd), timer(quaff_fwd)
            tops = 2 * m * n * k / t_gemm / 1e12
            rows.append({"K": k, "N": n, "M": m, "bf16_fwd_bwd_ms": t_b * 1e3, "quaff_fwd_bwd_ms": t_q * 1e3,
                         "quaff_int8_bwd_fwd_bwd_ms": t_q8 * 1e3, "speedup_fwd_bwd": t_b / t_q,
                         "speedup_fwd_bwd_int8_bwd": t_b / t_q8, "bf16_fwd_ms": t_bf * 1e3, "quaff_fwd_ms": t_qf * 1e3,
                         "speedup_fwd": t_bf / t_qf, "int8_gemm_tops": tops,
                         "torch_int_mm_tops": 2 * m * n * k / t_intmm / 1e12,
                         "int8_roofline_fraction": tops / PEAK_INT8_TOPS,
                         "timing": "eager" if args.eager_timing else "cuda graph"})
            r = rows[-1]
            print(f"K={k:5d} N={n:5d} M={m:5d}  fwd+bwd bf16 {r['bf16_fwd_bwd_ms']:.3f} ms "
                  f"quaff {r['quaff_fwd_bwd_ms']:.3f} ms ({r['speedup_fwd_bwd']:.2f}x), "
                  f"int8 backward {r['quaff_int8_bwd_fwd_bwd_ms']:.3f} ms ({r['speedup_fwd_bwd_int8_bwd']:.2f}x)"
                  f"  fwd {r['speedup_fwd']:.2f}x  int8 GEMM {tops:.0f} TOPS (_int_mm {r['torch_int_mm_tops']:.0f})",
                  flush=True)
    breakdown(timer)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
