"""quaff-fx eval, sweep and bench."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import QuaffError
from .common import (
    MODEL_HELP,
    add_device_options,
    add_outlier_options,
    calibration_config,
    check_positive,
    device_of,
    dtype_of,
    load_model_for,
    phase,
    quaff_config,
    torch_threads,
)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import read_text, tokenize
    from ..evaluate import describe_perplexity, perplexity, text_label

    check_positive(args, "batch_size", "seq_len", "max_batches")
    text = read_text(args.text, "heldout")
    label = text_label(args.text)
    models, tokenizer = _eval_models(args)
    if tokenizer is None:
        raise QuaffError("the artifact has no tokenizer folder; it cannot be evaluated on text")
    ids = tokenize(tokenizer, text)
    rows = []
    for name, model in models:
        phase(f"perplexity of {name} on {label} ({args.seq_len}-token windows)")
        r = perplexity(model, ids, args.seq_len, args.batch_size, args.max_batches, source=f"text {label}")
        rows.append({"model": name, **r})
    base = rows[0]["perplexity"]
    for r in rows:
        r["delta_vs_first"] = r["perplexity"] / base - 1.0
    if args.json:
        print(json.dumps({"text": label, "seq_len": args.seq_len, "results": rows}, indent=1))
        return 0
    from tabulate import tabulate

    print(describe_perplexity(label, args.seq_len, rows[0]["tokens"]))
    print(tabulate([[r["model"], f"{r['perplexity']:.4f}", f"{100 * r['delta_vs_first']:+.2f}%"] for r in rows],
                   headers=["model", "perplexity", "vs " + rows[0]["model"]]))
    return 0


def _eval_models(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], Any]:
    """(label, model) pairs to evaluate and the tokenizer: the one model given, or with --compare FP32, naive
    W8A8 and Quaff (an artifact is compared with the model it was made from)."""
    from ..evaluate import comparison_set
    from ..io import is_artifact, load_quantized
    from ..model_loading import load_model

    calibration = calibration_config(args) if args.compare else None
    if args.model and is_artifact(args.model):
        phase(f"loading the artifact {args.model}")
        loaded, manifest = load_quantized(args.model, dtype_of(args), device_of(args))
        if getattr(args, "adapter", None):
            from ..training.adapter import load_adapter

            phase(f"loading the adapter {args.adapter} (with its trained outlier scales)")
            return [("quaff+adapter", load_adapter(loaded.model, args.adapter))], loaded.tokenizer
        if not args.compare:
            return [("quaff", loaded.model)], loaded.tokenizer
        fp = load_model(_source_model(manifest.get("source", {})), dtype_of(args) or loaded.model.dtype)
        fp.model.to(device_of(args))
        tokenizer = loaded.tokenizer or fp.tokenizer
        return comparison_set(fp.model, quaff_config(args), calibration, tokenizer, loaded.model), tokenizer
    if getattr(args, "adapter", None):
        raise QuaffError("--adapter needs a quaff-fx artifact folder as the model (the one the adapter was trained on)")
    fp = load_model_for(args)
    if not args.compare:
        return [("fp32", fp.model)], fp.tokenizer
    phase("quantizing two copies (naive W8A8 and Quaff)")
    return comparison_set(fp.model, quaff_config(args), calibration, fp.tokenizer, progress=True), fp.tokenizer


def _source_model(source: dict[str, Any]) -> str:
    """The model argument that loads the FP model an artifact was made from."""
    if source.get("name") == "smollm2":
        return "smollm2"
    return str(Path(source["path"]) / source.get("gguf_file", ""))


def cmd_sweep(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ..data import heldout_paths, read_text
    from ..sweep import plot, sweep

    texts = {Path(t).name: Path(t) for t in args.texts} if args.texts else heldout_paths()
    for t in texts.values():
        read_text(t, "heldout")  # a bad text fails before the model loads
    loaded = load_model_for(args)
    rows = sweep(loaded.model, loaded.tokenizer, texts, args.strategies, args.ratios, args.alphas, args.calib,
                 seq_len=args.seq_len, eval_batches=args.eval_batches, progress=phase)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    names = list(rows[0]["perplexity"])
    print(tabulate([[r["method"], r["channels"], f"{r['fp_bytes'] / 2**10:.0f} KiB"]
                    + [f"{r['perplexity'][t]:.3f} ({100 * r['delta'][t]:+.2f}%)" for t in names]
                    + [f"{100 * r['mean']:+.2f}%", f"{r['worst'][0]} {100 * r['worst'][1]:+.2f}%"] for r in rows],
                   headers=["method", "FP channels", "FP columns"] + names + ["mean", "worst text"]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ..bench import bench_inference, bench_train

    check_positive(args, "batch", "seq_len", "repeats")
    header = {"batch": args.batch, "seq_len": args.seq_len, "threads": torch_threads()}
    if args.train:
        phase("timing LoRA steps, one process per variant (each loads and quantizes the model first)")
        rows = bench_train(args.model, args.batch, args.seq_len, args.repeats, profile=args.profile, progress=phase)
        if args.json:
            print(json.dumps({**header, "rows": rows}, indent=1))
            return 0
        print(f"one LoRA training step (r=8 on every quantized layer kind), batch {args.batch} x {args.seq_len} "
              f"tokens, {torch_threads()} threads, median of {args.repeats} after a warm-up step; "
              "peak RSS during the steps")
        print(tabulate([[r["variant"], f"{r['seconds']:.3f}", f"{r['speedup_vs_fp32']:.2f}x",
                         f"{r['peak_rss'] / 2**20:.0f} MiB", f"{r['peak_memory_vs_fp32']:.2f}x"] for r in rows],
                       headers=["variant", "s/step", "speed vs fp32", "peak memory", "memory vs fp32"]))
        for r in rows:
            if "profile" in r:
                print(f"\nprofile of one {r['variant']} step:\n{r['profile']}")
        return 0
    phase("loading the model, quantizing a copy and fusing its graph (about a minute for SmolLM2), then timing")
    rows = bench_inference(args.model, args.batch, args.seq_len, args.repeats, compiled=not args.no_compile,
                           progress=phase)
    if args.json:
        print(json.dumps({**header, "rows": rows}, indent=1))
        return 0
    print(f"forward of batch {args.batch} x {args.seq_len} tokens, {torch_threads()} threads, median of {args.repeats}")
    print(tabulate([[r["variant"], f"{r['seconds']:.3f}", f"{r['speedup_vs_fp32_eager']:.2f}x"] for r in rows],
                   headers=["variant", "seconds", "speed vs fp32 eager"]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the eval, sweep, bench commands."""
    p = sub.add_parser("eval", help="perplexity on held-out text; --compare: FP32 vs naive W8A8 vs Quaff")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + ", or an artifact folder")
    p.add_argument("--text", default=None, help="held-out text (default: the bundled gpl-3.0.txt)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches (default all)")
    p.add_argument("--compare", action="store_true", help="evaluate FP32, naive W8A8 and Quaff in one run")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a finetune's OUT/adapter folder: evaluate the artifact with it (and its trained outlier "
                        "scales)")
    p.add_argument("--calib", action="append", default=None, metavar="TEXT",
                   help="with --compare on a model: calibration text or dataset (repeatable; default: the bundled "
                        "corpus; 4 batches of 2 x 256 tokens)")
    add_outlier_options(p)
    add_device_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sweep",
                       help="accuracy of FP32, naive, SmoothQuant, LLM.int8 and Quaff settings on several texts")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--texts", nargs="*", default=None, help="held-out texts (default: the three bundled ones)")
    p.add_argument("--calib", default=None, help="calibration text or dataset "
                   "(default: the bundled corpus, 'bundled')")
    p.add_argument("--strategies", nargs="*", default=["top_abs", "mean_times"], help="outlier strategies")
    p.add_argument("--ratios", nargs="*", type=float, default=[0.005, 0.01, 0.02], help="outlier budgets (max_ratio)")
    p.add_argument("--alphas", nargs="*", type=float, default=[0.5], help="SmoothQuant strengths")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate on at most this many batches of each text")
    p.add_argument("--plot", default=None, help="PNG of perplexity delta vs outlier budget")
    add_device_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("bench", help="time FP32 vs Quaff forward (eager, fused, compiled) side by side")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--batch", type=int, default=4, help="sequences per forward")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--train", action="store_true",
                   help="time one LoRA training step instead (each variant in its own process)")
    p.add_argument("--profile", action="store_true", help="with --train: print the op profile of a Quaff eager step")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
