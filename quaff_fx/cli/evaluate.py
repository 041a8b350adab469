"""quaff-fx eval, sweep and bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import QuaffError
from .common import MODEL_HELP, add_outlier_options, check_positive, progress, quaff_config, torch_threads


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import read_text, tokenize
    from ..evaluate import perplexity

    check_positive(args, "batch_size", "seq_len", "max_batches")
    text = read_text(args.text, "heldout")
    models = _eval_models(args)
    tokenizer = models[0][2]
    if tokenizer is None:
        raise QuaffError("the artifact has no tokenizer folder; it cannot be evaluated on text")
    ids = tokenize(tokenizer, text)
    rows = []
    for label, model, _ in models:
        r = perplexity(model, ids, args.seq_len, args.batch_size, args.max_batches, source=f"text {args.text or '(bundled gpl-3.0.txt)'}")
        rows.append({"model": label, **r})
    base = rows[0]["perplexity"]
    for r in rows:
        r["delta_vs_first"] = r["perplexity"] / base - 1.0
    if args.json:
        print(json.dumps({"text": args.text or "gpl-3.0.txt (bundled)", "seq_len": args.seq_len, "results": rows}, indent=1))
    else:
        from tabulate import tabulate

        print(tabulate([[r["model"], f"{r['perplexity']:.4f}", f"{100 * r['delta_vs_first']:+.2f}%", r["tokens"]] for r in rows],
                       headers=["model", "perplexity", "vs " + rows[0]["model"], "tokens"]))
    return 0


def _eval_models(args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    """(label, model, tokenizer) to evaluate: the one given, or with --compare FP32, naive W8A8 and Quaff."""
    from ..model_loading import load_model
    from ..transform import load_quantized

    target = Path(args.model) if args.model else None
    if target is not None and target.is_dir() and (target / "quaff.json").exists():
        loaded, manifest = load_quantized(target)
        if not args.compare:
            return [("quaff", loaded.model, loaded.tokenizer)]
        source = manifest.get("source", {})
        base_name = source.get("name") if source.get("name") == "smollm2" else str(Path(source["path"]) / source.get("gguf_file", ""))
        fp = load_model(base_name)
        return _compare_set(fp, args, quaff_model=loaded.model, tokenizer=loaded.tokenizer or fp.tokenizer)
    fp = load_model(args.model)
    if not args.compare:
        return [("fp32", fp.model, fp.tokenizer)]
    return _compare_set(fp, args)


def _compare_set(fp, args: argparse.Namespace, quaff_model=None, tokenizer=None):
    import copy

    from ..capture import capture
    from ..hf import naive_w8a8_
    from ..transform import calibrate_text, transform

    config = quaff_config(args)
    naive = copy.deepcopy(fp.model)
    naive_w8a8_(naive, config)
    if quaff_model is None:
        quaff_model = copy.deepcopy(fp.model)
        gm = capture(quaff_model)
        stats = calibrate_text(gm, fp.tokenizer, args.calib, config, 256, 2, 4, progress("calibrating", 4))
        transform(quaff_model, stats, config, gm=gm)
    return [("fp32", fp.model, tokenizer or fp.tokenizer), ("w8a8 naive", naive, None), ("quaff", quaff_model, None)]


def cmd_sweep(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ..data import heldout_paths, read_text
    from ..model_loading import load_model
    from ..sweep import plot, sweep

    texts = {Path(t).name: Path(t) for t in args.texts} if args.texts else heldout_paths()
    for t in texts.values():
        read_text(t, "heldout")  # a bad text fails before the model loads
    loaded = load_model(args.model)
    rows = sweep(loaded.model, loaded.tokenizer, texts, args.strategies, args.ratios, args.alphas, args.calib,
                 seq_len=args.seq_len, eval_batches=args.eval_batches, progress=lambda m: print(m, file=sys.stderr))
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    names = list(rows[0]["perplexity"])
    print(tabulate([[r["method"], r["channels"], f"{r['fp_bytes'] / 2**10:.0f} KiB"]
                    + [f"{r['perplexity'][t]:.3f} ({100 * r['delta'][t]:+.2f}%)" for t in names] for r in rows],
                   headers=["method", "FP channels", "FP columns"] + names))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ..bench import bench_inference, bench_train

    check_positive(args, "batch", "seq_len", "repeats")
    if args.train:
        rows = bench_train(args.model, args.batch, args.seq_len, args.repeats, profile=args.profile,
                           progress=lambda m: print(m, file=sys.stderr))
        if args.json:
            print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "threads": torch_threads(), "rows": rows}, indent=1))
            return 0
        print(f"one LoRA training step (r=8 on every quantized layer kind), batch {args.batch} x {args.seq_len} tokens, "
              f"{torch_threads()} threads, median of {args.repeats} after a warm-up step; peak RSS during the steps")
        print(tabulate([[r["variant"], f"{r['seconds']:.3f}", f"{r['speedup_vs_fp32']:.2f}x", f"{r['peak_rss'] / 2**20:.0f} MiB",
                         f"{r['peak_memory_vs_fp32']:.2f}x"] for r in rows],
                       headers=["variant", "s/step", "speed vs fp32", "peak memory", "memory vs fp32"]))
        for r in rows:
            if "profile" in r:
                print(f"\nprofile of one {r['variant']} step:\n{r['profile']}")
        return 0
    rows = bench_inference(args.model, args.batch, args.seq_len, args.repeats, compiled=not args.no_compile,
                           progress=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "threads": torch_threads(), "rows": rows}, indent=1))
    else:
        print(f"forward of batch {args.batch} x {args.seq_len} tokens, {torch_threads()} threads, median of {args.repeats}")
        print(tabulate([[r["variant"], f"{r['seconds']:.3f}", f"{r['speedup_vs_fp32_eager']:.2f}x"] for r in rows],
                       headers=["variant", "seconds", "speed vs fp32 eager"]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the eval, sweep, bench commands."""
    p = sub.add_parser("eval", help="perplexity on held-out text; --compare: FP32 vs naive W8A8 vs Quaff")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + ", or an artifact folder")
    p.add_argument("--text", default=None, help="held-out text (default: the bundled gpl-3.0.txt)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="evaluate FP32, naive W8A8 and Quaff in one run")
    p.add_argument("--calib", default=None, help="with --compare on a model: calibration text (default bundled)")
    add_outlier_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sweep", help="accuracy of FP32, naive, SmoothQuant, LLM.int8 and Quaff settings on several texts")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--texts", nargs="*", default=None, help="held-out texts (default: the three bundled ones)")
    p.add_argument("--calib", default=None, help="calibration text (default: the bundled apache-2.0.txt)")
    p.add_argument("--strategies", nargs="*", default=["top_abs", "mean_times"])
    p.add_argument("--ratios", nargs="*", type=float, default=[0.005, 0.01, 0.02])
    p.add_argument("--alphas", nargs="*", type=float, default=[0.5])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate on at most this many batches of each text")
    p.add_argument("--plot", default=None, help="PNG of perplexity delta vs outlier budget")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("bench", help="time FP32 vs Quaff forward (eager, fused, compiled) side by side")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--train", action="store_true", help="time one LoRA training step instead (each variant in its own process)")
    p.add_argument("--profile", action="store_true", help="with --train: print the op profile of a Quaff eager step")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
