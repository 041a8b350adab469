"""Data-parallel LoRA training of a Llama-shaped model (random init) on 1 and 2 GPUs: tokens/s and peak memory per
GPU for one GPU, DDP and FSDP2, Quaff (int8 base) against bf16, with gradient checkpointing and torch.compile.

    python tools/fsdp_bench.py [--size 8b] [--gpus 1,2] [--models bf16,quaff] [--batch 2] [--seq-len 2048] [--steps 8]
                               [--out fsdp.jsonl]          # starts one torchrun per (GPU count, model, mode)
    python tools/fsdp_bench.py --report a.jsonl b.jsonl     # the table (with ratios) from rows of several runs

Each configuration runs in its own ``torchrun --standalone`` process group (clean peak memory): every rank builds the
model on its own device with the same seed, quantizes it with quaff-fx (preset 'fast': the benchmark is about speed
and memory, not GPTQ rounding), enables gradient checkpointing, puts PEFT LoRA r=16 on every projection, then wraps
it: one process as it is; several with DDP or FSDP2 (``quaff_fx.distributed.shard_model``: per decoder layer and
root, the int8 base sharded) and compiles the wrapped model. The batch per GPU is fixed (weak scaling); tokens/s
counts the global batch; step time is the median after warm-up; peak memory is ``max_memory_allocated`` of rank 0
over the timed steps (every rank holds the same amount), and ``peak_forward_bytes`` its peak by the end of the
forward (the loss included): where the step's peak is. Scaling = tokens/s with 2 GPUs / tokens/s with 1; memory ratio =
peak per GPU / peak of the 1-GPU run of the same model (the issue's targets: ≥ 1.8× and FSDP2 ≤ 0.6×).
``--device cpu --size tiny --compile-backend aot_eager`` runs the same code on CPU with gloo (a smoke test).
``--scale-sync step`` syncs the outlier scales once per step, after backward (``quaff_fx.distributed.scale_sync``),
instead of in every QuaffLinear forward. ``--profile`` records 2 more steps after the timed ones with torch.profiler
on rank 0 (the timed numbers are unchanged) and adds to the row, under "profile", the top ops by self CUDA time (CPU
time on the CPU), the CUDA time of NCCL kernels and the all-reduce calls: what the scale all-reduces cost.
``--inline-kernels``: the compiled layers launch the quaff ops' Triton kernels from inductor's code instead of
calling each op through Python (``quaff_fx.ops.inline_kernels``): the lever for a host-bound step; per-layer
compilation keeps its extra compile time to one layer's. ``--offload``: the checkpointed layer inputs wait in pinned
host memory (``quaff_fx.training.offload``; the 1-GPU row of a ``--one-group`` run has it too).
Each row has ``host_issue_seconds``, the median time the host took to issue a step (before the loss's sync): equal
to ``seconds``, the step is host-bound. With ``--profile`` the row's "timeline" splits the profiled steps' wall
time into GPU busy (compute, NCCL alone) and idle.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab)


SIZES = {"tiny": _llama(64, 128, 2, 4, 2, 256), "1b": _llama(2048, 5632, 22, 32, 4, 32000),
         "8b": _llama(4096, 14336, 32, 32, 8, 128256)}  # 1b: TinyLlama-1.1B's shape; 8b: Llama-3-8B's
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, device):
    """The random Llama on ``device`` (built there, in bf16: an 8B fp32 model on the CPU takes minutes), quantized
    for 'quaff', with gradient checkpointing and LoRA."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=max(2048, args.seq_len), **SIZES[args.size])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    with device:
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(default)
    if args.model == "quaff":
        quantize(model, cfg.vocab_size)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    if args.offload:  # the checkpointed layer inputs wait in pinned host memory (quaff_fx.training.offload)
        from quaff_fx.training.offload import offload_activations_

        offload_activations_(model, allow_cpu=device.type != "cuda")
    if args.loss == "chunked":  # the loss without the whole logits (4096 x 128k in fp32 would set the peak)
        from quaff_fx.kernels.linear_ce import fused_causal_lm_loss_

        fused_causal_lm_loss_(model, "chunked", **({"chunk": args.loss_chunk} if args.loss_chunk else {}))
    return model


def quantize(model, vocab: int) -> None:
    """quaff-fx's pipeline on random token ids (a random-init model has no text to calibrate on)."""
    import torch

    from quaff_fx import CalibrationConfig, QuaffConfig, quantize_

    ids = torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(1))
    quantize_(model, QuaffConfig.preset("fast"), CalibrationConfig(token_batches=(ids,), num_batches=1, seq_len=256))


def worker(args) -> None:
    """One configuration, inside torchrun: rank 0 appends its row to ``args.out``."""
    import torch
    import torch.distributed as dist

    from quaff_fx.distributed import init_from_env, scale_sync
    from quaff_fx.ops import inline_kernels
    from quaff_fx.training.trainer import compile_layers_

    rank, size = init_from_env()
    device = _device(args)
    model = build(args, device)
    net = model if size == 1 else _wrap(args, model, args.mode)
    inline_kernels(args.inline_kernels)
    if args.compile_backend != "none" and args.compile_scope == "layers":
        compile_layers_(model, backend=args.compile_backend)  # each decoder layer: one shared graph, wrappers outside
    elif args.compile_backend != "none":
        net = torch.compile(net, backend=args.compile_backend)
    with scale_sync(args.scale_sync):
        _emit(args, rank, _measure(args, net, model, device, rank, size, "single" if size == 1 else args.mode))
    if size > 1:
        dist.destroy_process_group()


def _wrap(args, model, mode: str):
    """DDP, or FSDP2 with the bench's sharding options."""
    from quaff_fx.distributed import wrap

    return wrap(model, mode, prefetch=args.prefetch, shard_head=args.shard_head, offload_layers=args.offload_layers)


def _device(args):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def _emit(args, rank: int, row: dict) -> None:
    """Rank 0 appends the row to ``args.out`` and prints it."""
    if rank == 0:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _measure(args, net, model, device, rank: int, size: int, mode: str) -> dict:
    """Warm-up, then ``args.steps`` timed steps of a fresh AdamW on the adapters; the row of this configuration."""
    import torch
    import torch.distributed as dist

    from quaff_fx.distributed import local_bytes, sync_scales_

    cuda = device.type == "cuda"
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, fused=True if cuda else None)
    # fused as the Trainer's default (adamw_torch_fused); it groups by device, so host-offloaded shards step on the
    # host in one fused kernel (foreach there costs a step about 4x the time: many small CPU ops)
    gen = torch.Generator().manual_seed(1000 + rank)
    batch = torch.randint(0, SIZES[args.size]["vocab_size"], (args.batch, args.seq_len), generator=gen).to(device)
    model.train()

    forward_peaks = []  # per timed step: the peak by the end of the forward (the loss), before backward
    issued = []  # per timed step: when the host had issued all of it (before the loss's sync)

    def step(timed: bool = False) -> float:
        if timed and cuda:
            torch.cuda.reset_peak_memory_stats()  # the max over steps of each step's peak: the timed steps' peak
        loss = net(input_ids=batch, labels=batch).loss
        if timed and cuda:
            forward_peaks.append(torch.cuda.max_memory_allocated())
        loss.backward()
        if args.scale_sync == "step":
            sync_scales_(model)  # one all-reduce of every layer's scales (no-op in one process)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if timed:
            issued.append(time.perf_counter())
        return loss.item()  # a host sync: the step is over when it returns

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.empty_cache()  # the build's (bf16 before quantization, full before sharding) is gone
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else None
    times, losses, peaks = [], [], []
    for _ in range(args.steps):
        if size > 1:
            dist.barrier()
        t = time.perf_counter()
        losses.append(step(timed=True))
        times.append(time.perf_counter() - t)
        issued[-1] -= t
        if cuda:
            peaks.append((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()))
    sec = statistics.median(times)
    row = {"model": args.model, "gpus": size, "mode": mode, "size": args.size, "batch_per_gpu": args.batch,
            "seq_len": args.seq_len, "seconds": sec, "host_issue_seconds": statistics.median(issued),
            "warmup_s": warmup_s,
            "tokens_per_s": args.batch * args.seq_len * size / sec, "loss": losses[-1],
            "int8_bytes_per_gpu": local_bytes(model, device=device.type),
            "int8_host_bytes": local_bytes(model, device="cpu") if cuda else 0,  # shards offloaded to the host
            "bf16_bytes_per_gpu": local_bytes(model, torch.bfloat16, device=device.type),
            "resident_bytes": resident, "peak_bytes": max(p for p, _ in peaks) if cuda else None,
            "peak_forward_bytes": max(forward_peaks) if cuda else None,
            "peak_reserved_bytes": max(r for _, r in peaks) if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "compile": args.compile_backend,
            "compile_scope": args.compile_scope, "loss_impl": args.loss, "scale_sync": args.scale_sync,
            "inline_kernels": args.inline_kernels, "prefetch": args.prefetch if mode == "fsdp" else None,
            "shard_head": args.shard_head if mode == "fsdp" else None, "offload": args.offload,
            "loss_chunk": args.loss_chunk or None, "offload_layers": args.offload_layers if mode == "fsdp" else None}
    if args.profile:  # after the row is made: its peak memory and step times are the timed steps'
        row["profile"] = profile_steps(step, PROFILE_STEPS, cuda, rank)
    return row


PROFILE_STEPS = 2
PROFILE_ROWS = 15


def profile_steps(step, steps: int, cuda: bool, rank: int) -> dict | None:
    """``steps`` calls of ``step`` on every rank (their collectives pair up), recorded by torch.profiler on rank 0:
    the top ops by self CUDA time (self CPU time without CUDA), the CUDA time of NCCL kernels (by kernel: AllReduce
    Max is the scales', Sum DDP's gradients), and each all-reduce op's calls and times. Times in µs over all steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if rank != 0:
        for _ in range(steps):
            step()
        return None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"

    def rows(selected) -> list[dict]:
        return [{"name": e.key[:100], "calls": e.count, "self_cuda_us": e.self_device_time_total,
                 "cuda_us": e.device_time_total, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total}
                for e in sorted(selected, key=lambda e: -getattr(e, sort_key))]

    # kernels only (a CPU op's device time counts the kernels it launched, which are rows of their own)
    nccl = [e for e in events if "nccl" in e.key.lower() and e.device_type == torch.autograd.DeviceType.CUDA]
    reduces = [e for e in events if "all_reduce" in e.key.lower() or "allreduce" in e.key.lower()]
    by_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:PROFILE_ROWS]
    out = {"steps": steps, "sorted_by": sort_key, "top": rows(events)[:PROFILE_ROWS],
           "top_cpu": [{"name": e.key[:100], "calls": e.count, "self_cpu_us": e.self_cpu_time_total,
                        "cpu_us": e.cpu_time_total} for e in by_cpu],
           "nccl_cuda_us": sum(e.self_device_time_total for e in nccl), "nccl_kernels": rows(nccl),
           "all_reduce": rows(reduces), "timeline": timeline(prof.events()) if cuda else None}
    print(f"profile of {steps} steps on rank 0, by {sort_key} (µs):", flush=True)
    for r in out["top"]:
        print(f"  {r['self_cuda_us']:>12.0f} {r['self_cpu_us']:>12.0f} {r['calls']:>7}  {r['name'][:80]}", flush=True)
    if cuda:
        print("  by self CPU time:", flush=True)
        for r in out["top_cpu"]:
            print(f"  {r['self_cpu_us']:>12.0f} {r['cpu_us']:>12.0f} {r['calls']:>7}  {r['name'][:80]}", flush=True)
    if out["timeline"]:
        print("  timeline: " + ", ".join(f"{k} {v:.0f}" for k, v in out["timeline"].items()), flush=True)
    print(f"  NCCL kernels: {out['nccl_cuda_us']:.0f} µs of CUDA time; all-reduce ops: "
          + ", ".join(f"{r['name'][:40]} ×{r['calls']}" for r in out["all_reduce"]), flush=True)
    return out


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def timeline(events) -> dict:
    """Where the profiled steps' wall time went on the GPU (µs): ``busy`` (any kernel or copy running), of which
    ``compute`` (not NCCL) and ``exposed_nccl`` (NCCL alone: a collective the compute waits for), and ``idle`` (no
    kernel at all: the host behind, or a host sync). ``host_syncs``: the CUDA calls that block the host."""
    import torch

    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0]
    if not gpu:
        return {}
    start = min(e.time_range.start for e in gpu)
    end = max(e.time_range.end for e in gpu)
    busy = _union([(e.time_range.start, e.time_range.end) for e in gpu])
    compute = _union([(e.time_range.start, e.time_range.end) for e in gpu if "nccl" not in e.name.lower()])
    syncs = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(SYNCS)]
    return {"wall_us": end - start, "busy_us": busy, "compute_us": compute, "exposed_nccl_us": busy - compute,
            "idle_us": end - start - busy, "host_syncs": len(syncs),
            "host_sync_us": sum(e.time_range.end - e.time_range.start for e in syncs)}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def worker_sequence(args) -> None:
    """Every configuration of one model in one process group of N ranks, on one build of the model: first each
    rank trains its own whole model on its own GPU with no collective (the 1-GPU row: rank 0's, timed while the
    other ranks do the same on theirs), then DDP over the N, then FSDP2 over the N (last: sharding is one-way).
    Per-layer compilation is shared by the three; rank 0 appends the rows to ``args.out``."""
    import gc

    import torch.distributed as dist

    from quaff_fx.distributed import init_from_env, local_scales, scale_sync
    from quaff_fx.ops import inline_kernels
    from quaff_fx.training.trainer import compile_layers_

    rank, size = init_from_env()
    device = _device(args)
    model = build(args, device)
    inline_kernels(args.inline_kernels)
    if args.compile_backend != "none":
        compile_layers_(model, backend=args.compile_backend)
    with local_scales():
        _emit(args, rank, {**_measure(args, model, model, device, rank, 1, "single"), "ranks_at_once": size})
    dist.barrier()
    for mode in args.modes.split(","):
        net = _wrap(args, model, mode)
        with scale_sync(args.scale_sync):
            _emit(args, rank, _measure(args, net, model, device, rank, size, mode))
        del net
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


def report(rows: list[dict]) -> str:
    """One line per configuration, in the order run; scaling and memory against the 1-GPU row of the same model,
    batch and length that came last before it (a one-group run writes its 1-GPU row first). Mode suffixes: /off
    (activation offload), /step (scales synced once per step), /p0 (FSDP2's implicit prefetch), /head (the lm_head
    sharded too), /hostN (N layers' shards in host memory)."""
    key = lambda r: (r["model"], r["batch_per_gpu"], r["seq_len"])  # noqa: E731
    ones = {key(r): r for r in reversed(rows) if r["gpus"] == 1}  # each key's first 1-GPU row, until one comes
    lines = [f"{'model':6} {'b/GPU':>5} {'gpus':>4} {'mode':16} {'tokens/s':>10} {'scaling':>8} {'peak GiB/GPU':>13} "
             f"{'mem vs 1 GPU':>13} {'int8 GiB/GPU':>13} {'int8 GiB host':>13} {'loss':>7}"]
    for r in rows:
        if r["gpus"] == 1:
            ones[key(r)] = r
        base = ones.get(key(r))
        scaling = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else "-"
        mem = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base and base["peak_bytes"] and r["peak_bytes"] else "-"
        host = f"{r['int8_host_bytes'] / 2**30:.2f}" if "int8_host_bytes" in r else "-"  # rows before it: GPU+host
        lines.append(f"{r['model']:6} {r['batch_per_gpu']:>5} {r['gpus']:>4} {_mode(r):16} {r['tokens_per_s']:>10.0f} "
                     f"{scaling:>8} {peak:>13} {mem:>13} {r['int8_bytes_per_gpu'] / 2**30:>13.2f} {host:>13} "
                     f"{r['loss']:>7.3f}")
    return "\n".join(lines)


def _mode(row: dict) -> str:
    mode = row["mode"] + ("/off" if row.get("offload") else "")
    if row["gpus"] == 1:
        return mode
    return (mode + ("/step" if row.get("scale_sync") == "step" else "")
            + ("/p0" if row.get("prefetch") == 0 else "") + ("/head" if row.get("shard_head") else "")
            + (f"/host{row['offload_layers']}" if row.get("offload_layers") else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="8b")
    p.add_argument("--gpus", default="1,2", help="process counts to run, comma-separated")
    p.add_argument("--models", default="bf16,quaff")
    p.add_argument("--modes", default="ddp,fsdp", help="wrappers for more than one process")
    p.add_argument("--batch", type=int, default=2, help="sequences per GPU")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend, or none")
    p.add_argument("--out", default="fsdp_bench.jsonl", help="rows are appended here (JSON lines)")
    p.add_argument("--one-group", action="store_true",
                   help="one torchrun per model over the largest --gpus count: 1-GPU (every rank its own model), "
                        "then each --modes wrapper, on one build (fsdp must come last)")
    p.add_argument("--compile-scope", choices=["layers", "model"], default="layers",
                   help="compile each decoder layer (shared graph, wrappers outside) or the whole wrapped model")
    p.add_argument("--loss", choices=["chunked", "model"], default="chunked",
                   help="chunked linear + cross-entropy (quaff_fx.kernels.linear_ce) or the model's own loss")
    p.add_argument("--scale-sync", choices=["forward", "step"], default="forward",
                   help="the outlier scales' all-reduce in every QuaffLinear forward, or one per step after backward")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile 2 more on rank 0 (top CUDA ops, NCCL and all-reduce time)")
    p.add_argument("--inline-kernels", action="store_true",
                   help="compiled code launches the quaff ops' Triton kernels itself (quaff_fx.ops.inline_kernels)")
    p.add_argument("--prefetch", type=int, default=1, help="FSDP2: layers whose all-gathers each layer starts "
                   "(quaff_fx.distributed.shard_model); 0: FSDP2's implicit prefetch")
    p.add_argument("--shard-head", action="store_true", help="FSDP2: shard the lm_head too (default: whole on "
                   "every rank; quaff_fx.distributed.shard_model)")
    p.add_argument("--offload", action="store_true", help="offload the decoder's saved activations (the "
                   "checkpointed layer inputs) to pinned host memory (quaff_fx.training.offload)")
    p.add_argument("--offload-layers", type=int, default=0, help="FSDP2: the last N decoder layers keep their shards "
                   "in pinned host memory (quaff_fx.distributed.shard_model's offload_layers; the optimizer is fused)")
    p.add_argument("--loss-chunk", type=int, default=0, help="tokens per chunk of the chunked loss (0: its default)")
    p.add_argument("--report", nargs="*", help="print the table of these JSON-lines files and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_sequence(args) if args.mode == "sequence" else worker(args)
        return 0
    if args.report is not None:
        print(report(_rows(args.report)))
        return 0
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    failed = 0
    if args.one_group:
        modes = args.modes.split(",")
        if "fsdp" in modes and modes[-1] != "fsdp":
            p.error("--one-group: fsdp must be the last of --modes (sharding cannot be undone)")
        if args.compile_scope != "layers":
            p.error("--one-group compiles the decoder layers (one build serves three wrappers): --compile-scope layers")
        gpus = max(int(g) for g in args.gpus.split(","))
        for model in args.models.split(","):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                   __file__, *_strip_lists(sys.argv[1:]), "--modes", args.modes, "--worker", "--model", model,
                   "--mode", "sequence", "--out", args.out]
            print(f"== {model}, {gpus} processes: 1 GPU each, then {args.modes}", flush=True)
            failed += subprocess.run(cmd, env=env).returncode != 0
        print(report(_rows([args.out] if Path(args.out).exists() else [])))
        return 1 if failed else 0
    for gpus in [int(g) for g in args.gpus.split(",")]:
        for model in args.models.split(","):
            for mode in (["single"] if gpus == 1 else args.modes.split(",")):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                       __file__, *_strip_lists(sys.argv[1:]), "--worker", "--model", model, "--mode", mode,
                       "--out", args.out]
                print(f"== {model}, {gpus} process(es), {mode}", flush=True)
                failed += subprocess.run(cmd, env=env).returncode != 0
    print(report(_rows([args.out] if Path(args.out).exists() else [])))
    return 1 if failed else 0


def _rows(paths: list[str]) -> list[dict]:
    return [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]


def _strip_lists(argv: list[str]) -> list[str]:
    """The driver's own options (what to run, where rows go) are not the workers'."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--gpus", "--models", "--modes", "--out", "--one-group"):
            skip = a != "--one-group"
            continue
        if not a.startswith(("--gpus=", "--models=", "--modes=", "--out=")):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
