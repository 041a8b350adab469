"""GPU benchmark of one LoRA training step on a Llama-shaped model (random init), every variant in one run:
bf16 LoRA, fp32 LoRA, Quaff (int8 base, bf16 compute), QLoRA nf4 and 8-bit LoRA (bitsandbytes, skipped with
the reason when it does not import); each eager, ``compiled``, ``compiled+cudagraphs`` or ``compiled-layers`` (each
decoder layer compiled, one shared graph). Each variant runs in
its own process (clean peak memory); ratios to the bf16 variant of the same compilation (and to compiled
QLoRA); a speed-versus-memory scatter plot (PNG) of every variant when matplotlib imports.

    python tools/gpu_step_bench.py [--size 8b] [--gradient-checkpointing] [--batch 4] [--seq-len 1024]
        [--steps 10] [--parallel 3] [--out step.json] [--plot step.png] [--variants "bf16 compiled" ...]
    python tools/gpu_step_bench.py --plot-from step.json --plot step.png   # the plot of an earlier run

A variant is "<base>[<options>] [nf4] [compiled|compiled+cudagraphs]"; base: bf16, fp32, quaff, qlora (nf4), bnb
(int8). Options (comma-separated): ``fast`` (Quaff preset fast; otherwise the default preset with round-to-
nearest: its kernels, without the GPTQ rounding that would not fit a device call at 8B), ``int8-bwd`` (the
transposed int8 copy kept), ``gx=dequantize`` (grad_X on the dequantized W instead of the default int8 GEMM on a
transient transposed copy; quaff_fx.kernels.triton_kernels.set_grad_x_mode), ``lce`` (loss without full logits:
quaff_fx.kernels.linear_ce, chunked), ``liger`` (the same with Liger Kernel's fused linear cross-entropy),
``bf16a`` (bf16 adapters for this variant), ``peft-lora`` (Quaff: PEFT's own LoRA forward instead of the
adapter in the int8 GEMM's epilogue, ``quaff_fx.hf.fused_lora(False)``), ``inline`` (Quaff: torch.compile launches the
quaff ops' Triton kernels from inductor's code instead of calling each op as one Python function,
``quaff_fx.ops.inline_kernels(True)``), ``xseg`` (the variant's process runs
with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True). ``--parallel N``: N variants build and
compile at once (their GPU memory together must fit); their timed steps still run one at a time, the others
waiting idle.

Quaff's model goes through quaff_fx.quantize_ (capture, calibration on random token ids, passes), then PEFT
LoRA r=16 on every projection, AdamW on the adapters.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

SIZES = {  # Llama-shaped configs; 1b is TinyLlama-1.1B's shape, 3b Llama-3.2-3B's, 8b Llama-3-8B's
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}
GEMM_KERNELS = ("gemm", "nvjet", "xmma", "cutlass", "int8_gemm", "sm90_", "ampere_")  # kernel names of matrix products
VARIANTS = ["bf16 compiled", "qlora nf4 compiled", "quaff compiled", "quaff[int8-bwd] compiled"]
LOSS_OPTIONS = {"lce", "liger"}
SHARED_OPTIONS = LOSS_OPTIONS | {"bf16a", "xseg"}  # options a bf16 row can share: the fair reference has the same ones
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse(variant: str) -> tuple[str, set[str], str]:
    """"quaff[fast,lce] compiled" -> ("quaff", {"fast", "lce"}, "compiled"); compilation 'eager' when unnamed."""
    words = variant.split()
    head = words[0]
    base, opts = (head, set())
    if "[" in head:
        base, opts = head[:head.index("[")], set(head[head.index("[") + 1:-1].split(","))
    compilation = words[-1] if words[-1].startswith("compiled") else "eager"
    return base, opts - {""}, compilation


def modifiers(variant: str) -> set[str]:
    """The bracketed options of a variant: "quaff[fast,int8-bwd] compiled" -> {"fast", "int8-bwd"}."""
    return parse(variant)[1]


def _quantize_quaff(model, cfg, opts: set[str], torch) -> None:
    from quaff_fx import CalibrationConfig, QuaffConfig, quantize_

    capture_mod = sys.modules["quaff_fx.capture"]  # the module (the package exports a function of the same name)

    # static shapes: on the device image (torch 2.11, transformers 5.17, CUDA, sdpa) the dynamic-sequence export
    # reports a violated constraint on seq; the capture quantize_ runs is made static at the calibration shape
    dynamic_capture = capture_mod.capture
    capture_mod.capture = lambda m, ex=None, dynamic=True: dynamic_capture(
        m, (torch.zeros(2, 256, dtype=torch.long),), dynamic=False)
    config = QuaffConfig.preset("fast") if "fast" in opts else QuaffConfig.preset("default", weight_rounding="nearest")
    g = torch.Generator().manual_seed(1)
    batches = tuple(torch.randint(0, cfg.vocab_size, (2, 256), generator=g) for _ in range(2))
    result = quantize_(model, config, CalibrationConfig(token_batches=batches, num_batches=2))
    capture_mod.capture = dynamic_capture
    del result
    if "int8-bwd" in opts:
        from quaff_fx import int8_backward_

        int8_backward_(model)


def _qlora_(model, torch) -> None:
    """Every projection of the decoder layers as a bitsandbytes nf4 Linear4bit (QLoRA's base), in place."""
    import bitsandbytes as bnb  # ImportError: the variant is skipped with this reason

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in TARGETS:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                w = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", module=q)
                q.weight = w.to("cuda")  # quantized on the move
                setattr(parent, name, q)
                del lin
    model.is_loaded_in_4bit = True  # PEFT dispatches its bnb LoRA layers on this flag
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}


def build(variant: str, size: str, seq_len: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base, opts, _ = parse(variant)
    cfg = LlamaConfig(**{"vocab_size": 32000, **SIZES[size]}, max_position_embeddings=max(2048, seq_len))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.float32 if base == "fp32" else torch.bfloat16
    if base == "bnb":
        import tempfile

        import bitsandbytes  # noqa: F401  (ImportError: the variant is skipped)
        from transformers import BitsAndBytesConfig

        tmp = tempfile.mkdtemp()
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp)
        return LlamaForCausalLM.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                dtype=torch.bfloat16, device_map={"": 0})
    if base == "qlora":
        import bitsandbytes  # noqa: F401  (checked before the model is built)
    with torch.device("cuda"):  # random init on the GPU: seconds at 8B, where the CPU takes minutes
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    if base == "quaff":
        _quantize_quaff(model, cfg, opts, torch)
    elif base == "qlora":
        _qlora_(model, torch)
    return model


def _prepare(variant: str, model, adapter_dtype: str, checkpointing: bool):
    import peft
    import torch

    base, opts, _ = parse(variant)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # adapter dtype fp32: PEFT's default (autocast_adapter_dtype: adapters of a bf16 model in fp32, x cast up for
    # them); bf16 (--adapter-dtype bf16 or the option bf16a): the adapters in the model's dtype
    fp32_adapters = adapter_dtype == "fp32" and "bf16a" not in opts
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    if base == "quaff":  # LoRA layers of quaff_fx on the QuaffLinears (as quaff-fx finetune has them)
        from quaff_fx.hf import fused_lora, register_peft

        register_peft(config)
        fused_lora("peft-lora" not in opts)
        from quaff_fx.ops import inline_kernels

        inline_kernels("inline" in opts)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)
    if not fp32_adapters:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if "lce" in opts or "liger" in opts:
        from quaff_fx.kernels.linear_ce import fused_causal_lm_loss_

        fused_causal_lm_loss_(model, "liger" if "liger" in opts else "chunked")
    if "gx" in {o.split("=")[0] for o in opts}:
        from quaff_fx.kernels.triton_kernels import set_grad_x_mode

        set_grad_x_mode(next(o.split("=")[1] for o in opts if o.startswith("gx=")))
    return model.train()


def _wait_turn() -> None:
    """Under --parallel: say READY, then wait for the parent's GO before the timed steps."""
    if os.environ.get("QUAFF_BENCH_HANDSHAKE"):
        print("READY", flush=True)
        sys.stdin.readline()


def run_variant(variant: str, size: str, batch: int, seq_len: int, steps: int, profile: bool = False,
                adapter_dtype: str = "fp32", checkpointing: bool = False) -> dict:
    import torch

    model = build(variant, size, seq_len)
    torch.cuda.synchronize()
    base_params = sum(t.numel() for t in model.parameters()) + sum(  # int8 weights, not their transposed copies
        t.numel() for n, t in model.named_buffers() if t.dtype == torch.int8 and not n.endswith("w_int8_t"))
    torch.cuda.empty_cache()
    model = _prepare(variant, model, adapter_dtype, checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    compilation = parse(variant)[2]

    def step(m):
        if compilation == "compiled+cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fn = step
    if compilation == "compiled-layers":  # regional: each decoder layer compiled, one graph shared by all
        from quaff_fx.training.trainer import compile_layers_

        compile_layers_(model)
    elif compilation != "eager":  # +cudagraphs: mode reduce-overhead (CUDA graphs take the kernel launches off the CPU)
        compiled = torch.compile(model, mode="reduce-overhead" if compilation == "compiled+cudagraphs" else None)
        fn = lambda _: step(compiled)  # noqa: E731
    t0 = time.perf_counter()
    for _ in range(3):
        loss = fn(model)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    _wait_turn()
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
    table = _profile(fn, model, torch) if profile else None
    return {"profile": table, "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "variant": variant,
            "seconds": sec,
            "tokens_per_s": batch * seq_len / sec, "peak_bytes": torch.cuda.max_memory_allocated(), "loss": float(loss),
            "warmup_s": warmup_s, "trainable": sum(p.numel() for p in params), "params": base_params,
            "device": torch.cuda.get_device_name(), "step_times": times}


def _profile(fn, model, torch) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(model)
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total", row_limit=24, max_name_column_width=60)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    gemm = sum(e.self_device_time_total for e in kernels if any(w in e.key.lower() for w in GEMM_KERNELS))
    return table + (f"\nGPU kernel time {total / 1e3:.1f} ms, of which GEMM kernels {gemm / 1e3:.1f} ms "
                    f"({gemm / max(total, 1):.0%})")


def _child_cmd(v: str, args) -> list[str]:
    return [sys.executable, __file__, "--one", v, "--size", args.size, "--batch", str(args.batch), "--seq-len",
            str(args.seq_len), "--steps", str(args.steps), "--adapter-dtype", args.adapter_dtype] + (
        ["--profile"] if args.profile else []) + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def _finish(v: str, code: int, stdout: str, stderr: str, rows: list[dict]) -> None:
    found = [line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")]
    if code or not found:
        tail = [ln for ln in (stderr or stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        print(f"{v}: skipped ({tail[0][:200]})", flush=True)
        return
    r = json.loads(found[0])
    rows.append(r)
    print(f"{v}: {r['seconds'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
          f"peak {r['peak_bytes'] / 2**30:.2f} GiB, reserved {r['peak_reserved_bytes'] / 2**30:.2f} GiB, "
          f"loss {r['loss']:.3f}, warm-up {r['warmup_s']:.0f} s", flush=True)


def _variant_env(variant: str, env: dict) -> dict:
    """The child's environment: ``xseg`` sets PyTorch's expandable_segments allocator (less fragmentation)."""
    if "xseg" in modifiers(variant):
        return {**env, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    return env


def run_all(args) -> list[dict]:
    """Every variant in its own process, ``args.parallel`` at a time: they build and compile together, then each
    runs its timed steps alone (READY / GO over its pipes) while the others wait."""
    import tempfile

    rows: list[dict] = []
    env = {**os.environ, "QUAFF_BENCH_HANDSHAKE": "1"}
    todo = list(args.variants)
    while todo:
        wave, todo = todo[:args.parallel], todo[args.parallel:]
        procs = []
        for v in wave:
            err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a child's long stderr cannot block it
            procs.append((v, err, subprocess.Popen(_child_cmd(v, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                   stderr=err, text=True, env=_variant_env(v, env))))
        heads = []
        for _, _, p in procs:  # wait until each is READY (or has ended)
            head = []
            for line in p.stdout:
                head.append(line)
                if line.startswith("READY"):
                    break
            heads.append("".join(head))
        for (v, err, p), head in zip(procs, heads):
            if p.poll() is None:
                try:
                    p.stdin.write("GO\n")
                    p.stdin.flush()
                except BrokenPipeError:
                    pass
            rest = p.stdout.read()
            p.wait()
            err.seek(0)
            _finish(v, p.returncode, head + rest, err.read(), rows)
            err.close()
            if args.out:  # every finished row kept, should a later variant not finish in time
                with open(args.out, "w") as f:
                    json.dump({"title": "partial", "command": sys.argv, "rows": rows}, f, indent=1)
    return rows


ENV_OPTIONS = {"xseg"}  # process settings, not model changes: a reference row is looked up with the same ones


def _reference(rows: list[dict], base: str, opts: set[str], comp: str) -> dict | None:
    return next((x for x in rows if parse(x["variant"])[0] == base and parse(x["variant"])[1] == opts
                 and parse(x["variant"])[2] == comp), None)


def ratios(rows: list[dict]) -> None:
    """speed and reserved memory relative to bf16 and to QLoRA of the same compilation, with no options but the
    row's process settings (``xseg``), and to bf16 with every option the row shares with it (same settings)."""
    for r in rows:
        _, opts, comp = parse(r["variant"])
        for key in ("bf16", "qlora"):
            ref = _reference(rows, key, opts & ENV_OPTIONS, comp)
            if ref:
                r[f"speed_vs_{key}"] = ref["seconds"] / r["seconds"]
                r[f"reserved_vs_{key}"] = r["peak_reserved_bytes"] / ref["peak_reserved_bytes"]
        shared = opts & SHARED_OPTIONS
        same = _reference(rows, "bf16", shared, comp)
        if shared and same:  # fair both ways: bf16 with the same loss computation, adapter dtype and allocator
            r["speed_vs_bf16_same_settings"] = same["seconds"] / r["seconds"]
            r["reserved_vs_bf16_same_settings"] = r["peak_reserved_bytes"] / same["peak_reserved_bytes"]


def plot(rows: list[dict], path: str, title: str) -> None:
    """ms/step against reserved GiB, one labelled point per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot skipped: matplotlib does not import ({e}); run --plot-from on the JSON where it does")
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        x, y = r["peak_reserved_bytes"] / 2**30, r["seconds"] * 1e3
        ax.scatter([x], [y], s=40)
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("peak reserved GPU memory (GiB)")
    ax.set_ylabel("ms per training step (lower is faster)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.margins(x=0.25, y=0.15)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def _table(rows: list[dict]) -> None:
    from tabulate import tabulate

    nan = float("nan")
    print(tabulate([[r["variant"], f"{r['seconds'] * 1e3:.1f}", f"{r.get('speed_vs_bf16', nan):.2f}x",
                     f"{r.get('speed_vs_qlora', nan):.2f}x", f"{r['peak_reserved_bytes'] / 2**30:.2f}",
                     f"{r.get('reserved_vs_bf16', nan):.3f}x", f"{r.get('speed_vs_bf16_same_settings', nan):.2f}x",
                     f"{r.get('reserved_vs_bf16_same_settings', nan):.3f}x", f"{r['peak_bytes'] / 2**30:.2f}",
                     f"{r['loss']:.3f}"]
                    for r in rows],
                   headers=["variant", "ms/step", "speed vs bf16", "speed vs QLoRA", "reserved GiB", "reserved vs bf16",
                            "speed vs bf16 same settings",
                            "reserved vs bf16 same settings", "allocated GiB", "loss"]))


def report(rows: list[dict], args) -> str:
    title = (f"LoRA step, Llama-shaped {args.size} ({rows[0]['params'] / 1e9:.2f}B params), batch {args.batch} x "
             f"{args.seq_len}, {'gradient checkpointing, ' if args.gradient_checkpointing else ''}{args.adapter_dtype} "
             f"adapters, median of {args.steps} steps, {rows[0]['device']}")
    print("\n" + title)
    _table(rows)
    for r in rows:
        if r.get("profile"):
            print(f"\nprofile of one {r['variant']} step:\n{r['profile']}")
    return title


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    ap.add_argument("--parallel", type=int, default=1, help="variants built and compiled at once (timed one at a time)")
    ap.add_argument("--out", default=None, help="JSON of every row")
    ap.add_argument("--plot", default=None, help="PNG: ms/step against reserved GiB of every variant")
    ap.add_argument("--plot-from", default=None, help="make --plot from an earlier --out JSON and exit")
    ap.add_argument("--report-from", default=None, help="print the table (ratios recomputed) of an earlier --out JSON")
    ap.add_argument("--profile", action="store_true", help="print the CUDA-time profile of one step of each variant")
    ap.add_argument("--adapter-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="LoRA adapters of the bf16 models: fp32 (PEFT's default) or bf16")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: run one variant, print JSON
    args = ap.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            data = json.load(f)
        plot(data["rows"], args.plot or args.plot_from.replace(".json", ".png"), data["title"])
        return
    if args.report_from:
        with open(args.report_from) as f:
            data = json.load(f)
        ratios(data["rows"])
        print("\n" + data["title"])
        _table(data["rows"])
        return
    if args.one:
        r = run_variant(args.one, args.size, args.batch, args.seq_len, args.steps, args.profile, args.adapter_dtype,
                        args.gradient_checkpointing)
        print("RESULT " + json.dumps(r), flush=True)
        return
    rows = run_all(args)
    if not rows:
        raise SystemExit("no variant ran")
    ratios(rows)
    title = report(rows, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"title": title, "command": sys.argv, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, title)


if __name__ == "__main__":
    main()
