"""GPU benchmark of one LoRA training step on a Llama-shaped model (random init), every variant in one run:
bf16 LoRA (eager and torch.compile), fp32 LoRA, Quaff (int8 base, bf16 compute; eager and compiled) and
bitsandbytes 8-bit LoRA when bitsandbytes imports. Each variant runs in its own process (clean peak memory);
printed as ratios to bf16 eager and to fp32 from the same run.

    python tools/gpu_step_bench.py [--size 1b] [--batch 4] [--seq-len 1024] [--steps 10] [--out step.json]

Quaff's model goes through quaff-fx's own pipeline (capture, calibration on the bundled text's token ids,
annotate + rewrite, default config), then PEFT LoRA r=16 on every projection, AdamW on the adapters.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SIZES = {  # Llama-shaped configs; 1b is TinyLlama-1.1B's shape, 3b Llama-3.2-3B's
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8),
}
GEMM_KERNELS = ("gemm", "nvjet", "xmma", "cutlass", "int8_gemm", "sm90_", "ampere_")  # kernel names of matrix products
VARIANTS = ["bf16", "bf16 compiled", "bf16 compiled+cudagraphs", "fp32", "quaff", "quaff compiled", "quaff compiled+cudagraphs",
            "bnb int8"]


def modifiers(variant: str) -> set[str]:
    """The bracketed options of a Quaff variant: "quaff[fast,int8-bwd] compiled" -> {"fast", "int8-bwd"}
    (fast: the preset fast; int8-bwd: grad_X in int8 too, on the transposed int8 copy)."""
    head = variant.split(" ")[0]
    return set(head[head.index("[") + 1:-1].split(",")) if "[" in head else set()


def build(variant: str, size: str, seq_len: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=max(2048, seq_len), **SIZES[size])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    if variant == "bnb int8":
        import bitsandbytes  # noqa: F401  (ImportError: the variant is skipped)
        from transformers import BitsAndBytesConfig
        import tempfile

        tmp = tempfile.mkdtemp()
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp)
        return LlamaForCausalLM.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                dtype=torch.bfloat16, device_map={"": 0})
    model = LlamaForCausalLM(cfg).to(dtype).cuda().eval()
    if variant.startswith("quaff"):
        from quaff_fx import QuaffConfig, calibrate_text, capture, transform
        class Tok:  # token ids from the bundled text's bytes: a random-init model has no tokenizer
            def __call__(self, text, **_):
                return {"input_ids": [b % cfg.vocab_size for b in text.encode()]}

        config = QuaffConfig.preset("fast" if "fast" in modifiers(variant) else "default")
        # static shapes: on the device image (torch 2.11, transformers 5.17, CUDA, sdpa) the dynamic-sequence
        # export reports a violated constraint on seq; calibration uses the one shape captured
        gm = capture(model, (torch.zeros(2, 256, dtype=torch.long),), dynamic=False)
        stats = calibrate_text(gm, Tok(), None, config, seq_len=256, batch_size=2, max_batches=2)
        transform(model, stats, config, gm=gm)
        del gm
        if "int8-bwd" in modifiers(variant):
            from quaff_fx import int8_backward_

            int8_backward_(model)
    return model


def run_variant(variant: str, size: str, batch: int, seq_len: int, steps: int, profile: bool = False,
                adapter_dtype: str = "fp32") -> dict:
    import torch
    import peft

    model = build(variant, size, seq_len)
    torch.cuda.synchronize()
    base_params = sum(t.numel() for t in model.parameters()) + sum(  # int8 weights, not their transposed copies
        t.numel() for n, t in model.named_buffers() if t.dtype == torch.int8 and not n.endswith("w_int8_t"))
    torch.cuda.empty_cache()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # adapter_dtype fp32: PEFT's default (autocast_adapter_dtype: adapters of a bf16 model in fp32, x cast up for
    # them); bf16: the adapters in the model's dtype
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0),
                                autocast_adapter_dtype=adapter_dtype == "fp32")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 32000, (batch, seq_len), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step(m):
        if variant.endswith("+cudagraphs"):
            torch.compiler.cudagraph_mark_step_begin()
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fn = step
    if "compiled" in variant:  # +cudagraphs: mode reduce-overhead (CUDA graphs take the kernel launches off the CPU)
        compiled = torch.compile(model, mode="reduce-overhead" if variant.endswith("+cudagraphs") else None)
        fn = lambda _: step(compiled)  # noqa: E731
    t0 = time.perf_counter()
    for _ in range(3):
        loss = fn(model)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()  # the reserved peak keeps what warm-up reserved (CUDA graph pools included)
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn(model)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    sec = statistics.median(times)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn(model)
            torch.cuda.synchronize()
        events = prof.key_averages()
        table = events.table(sort_by="cuda_time_total", row_limit=24, max_name_column_width=60)
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in kernels)
        gemm = sum(e.self_device_time_total for e in kernels if any(w in e.key.lower() for w in GEMM_KERNELS))
        table += f"\nGPU kernel time {total / 1e3:.1f} ms, of which GEMM kernels {gemm / 1e3:.1f} ms ({gemm / max(total, 1):.0%})"
    return {"profile": table, "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "variant": variant, "seconds": sec, "tokens_per_s": batch * seq_len / sec, "peak_bytes": torch.cuda.max_memory_allocated(),
            "loss": float(loss), "warmup_s": warmup_s, "trainable": sum(p.numel() for p in params),
            "params": base_params, "device": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print the CUDA-time profile of one step of each variant")
    ap.add_argument("--adapter-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="LoRA adapters of the bf16 models: fp32 (PEFT's default) or bf16")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: run one variant, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args.size, args.batch, args.seq_len, args.steps, args.profile, args.adapter_dtype)), flush=True)
        return
    rows = []
    for v in args.variants:
        cmd = [sys.executable, __file__, "--one", v, "--size", args.size, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--adapter-dtype", args.adapter_dtype] + (
                   ["--profile"] if args.profile else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            print(f"{v}: skipped ({tail[0][:160]})", flush=True)
            continue
        rows.append(json.loads(found[0]))
        r = rows[-1]
        print(f"{v}: {r['seconds'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s, peak {r['peak_bytes'] / 2**30:.2f} GiB, "
              f"(reserved {r['peak_reserved_bytes'] / 2**30:.2f} GiB), loss {r['loss']:.3f}", flush=True)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for ref in ("bf16", "fp32"):
            if ref in by:
                r[f"speed_vs_{ref}"] = by[ref]["seconds"] / r["seconds"]
                r[f"memory_vs_{ref}"] = r["peak_bytes"] / by[ref]["peak_bytes"]
        same = by.get(("bf16 " + r["variant"].partition(" ")[2]).strip())  # bf16 with the same compilation
        if same:
            r["speed_vs_bf16_same_compilation"] = same["seconds"] / r["seconds"]
            r["reserved_vs_bf16_same_compilation"] = r["peak_reserved_bytes"] / same["peak_reserved_bytes"]
    from tabulate import tabulate

    if not rows:
        raise SystemExit("no variant ran")
    print(f"\nLoRA step ({args.adapter_dtype} adapters), Llama-shaped {args.size} ({rows[0]['params'] / 1e9:.2f}B params), batch {args.batch} x {args.seq_len} tokens, "
          f"median of {args.steps} steps, {rows[0]['device']}")
    print(tabulate([[r["variant"], f"{r['seconds'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_bytes'] / 2**30:.2f}",
                     f"{r.get('speed_vs_bf16', float('nan')):.2f}x", f"{r.get('speed_vs_fp32', float('nan')):.2f}x",
                     f"{r.get('memory_vs_bf16', float('nan')):.2f}x", f"{r.get('speed_vs_bf16_same_compilation', float('nan')):.2f}x",
                     f"{r.get('reserved_vs_bf16_same_compilation', float('nan')):.2f}x"] for r in rows],
                   headers=["variant", "ms/step", "tokens/s", "peak GiB", "speed vs bf16", "speed vs fp32", "memory vs bf16",
                            "speed vs bf16 same compilation", "reserved vs bf16 same compilation"]))
    for r in rows:
        if r.get("profile"):
            print(f"\nprofile of one {r['variant']} step:\n{r['profile']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
