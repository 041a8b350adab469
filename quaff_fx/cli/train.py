"""quaff-fx finetune and ossh."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import QuaffError
from .common import MODEL_HELP, add_outlier_options, add_training_options, check_out, progress, quaff_config


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..data import read_text, tokenize
    from ..distributed import init_from_env
    from ..finetune import FinetuneConfig, make_peft_model, perplexity_of, save_adapter, train

    cfg = FinetuneConfig(args.peft, args.steps, args.batch_size, args.seq_len, args.lr, args.rank, args.alpha,
                         args.virtual_tokens, args.checkpoint_every, args.seed)
    rank, size = init_from_env()  # torchrun / accelerate launch set the environment; one process otherwise
    out = Path(args.out)
    if out.exists() and not (args.resume or args.force) and not (size > 1 and rank > 0):
        raise QuaffError(f"{args.out!r} exists; pass --resume to continue its training or --force to start over")
    check_out(args.out, force=True)  # the folder it goes in must exist
    text = read_text(args.data, "calibration")
    heldout = read_text(args.eval_text, "heldout")
    model, tokenizer, source = _finetune_base(args)
    ids = tokenize(tokenizer, text)
    if rank == 0:
        if args.force and out.exists() and not args.resume:
            import shutil

            shutil.rmtree(out)
        out.mkdir(exist_ok=True)
    peft_model = make_peft_model(model, cfg)
    log = train(peft_model, ids, cfg, out, resume=args.resume, progress=progress(f"finetune {cfg.peft}", cfg.steps) if rank == 0 else None,
                distributed="ddp" if size > 1 else None)
    log["heldout_perplexity"] = perplexity_of(peft_model, tokenize(tokenizer, heldout), cfg.seq_len)
    log["trainable_parameters"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log["world_size"] = size
    if rank > 0:
        return 0  # rank 0 writes and reports
    save_adapter(peft_model, out, log, {"source": source, "quantized": not args.fp32, "finetune": log["config"]})
    if args.merge:
        _save_merged(peft_model, out / "merged", source, tokenizer, cfg)
    losses = log["losses"]
    summary = {"steps": len(losses), "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "heldout_perplexity": log["heldout_perplexity"], "seconds": round(log["seconds"], 2),
               "trainable_parameters": log["trainable_parameters"], "out": args.out}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{cfg.peft} on {'fp32' if args.fp32 else 'quaff int8'} base: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} "
              f"in {summary['steps']} steps ({summary['seconds']} s), held-out perplexity {summary['heldout_perplexity']:.3f}; "
              f"{summary['trainable_parameters']} trainable parameters; adapter, loss.json and loss.svg in {args.out}")
    return 0


def _finetune_base(args: argparse.Namespace):
    """The model to train: an artifact as saved, or a model quantized here (or left FP32 with --fp32)."""
    from ..model_loading import load_model
    from ..transform import load_quantized

    target = Path(args.model) if args.model else None
    if target is not None and target.is_dir() and (target / "quaff.json").exists():
        if args.fp32:
            raise QuaffError("--fp32 needs a model, not a quantized artifact")
        loaded, manifest = load_quantized(target)
        return loaded.model, loaded.tokenizer, {"artifact": str(target.resolve()), **manifest.get("source", {})}
    loaded = load_model(args.model)
    if not args.fp32:
        from ..capture import capture
        from ..transform import calibrate_text, transform

        config = quaff_config(args)
        gm = capture(loaded.model)
        stats = calibrate_text(gm, loaded.tokenizer, None, config, progress=progress("calibrating", 4))
        transform(loaded.model, stats, config, gm=gm)
    return loaded.model, loaded.tokenizer, loaded.source


def _save_merged(peft_model, folder: Path, source: dict, tokenizer, cfg) -> None:
    from ..config import QuaffConfig
    from ..io import save_quantized
    from ..quaff_linear import QuaffLinear
    from ..transform import layer_spec

    if cfg.peft != "lora":
        raise QuaffError("--merge works with --peft lora only")
    merged = peft_model.merge_and_unload()
    layers = {n: layer_spec(m) for n, m in merged.named_modules() if isinstance(m, QuaffLinear)}
    save_quantized(merged, folder, {"source": source, "config": QuaffConfig().to_dict(), "layers": layers, "reports": []},
                   tokenizer=tokenizer, force=True)


def cmd_ossh(args: argparse.Namespace) -> int:
    """LoRA fine-tuning with every QuaffLinear's outliers tracked against the calibrated ones."""
    from tabulate import tabulate

    from ..data import read_text, tokenize
    from ..finetune import FinetuneConfig, make_peft_model, train
    from ..io import write_json
    from ..ossh import OutlierTracker, plot

    cfg = FinetuneConfig("lora", args.steps, args.batch_size, args.seq_len, args.lr)
    check_out(args.out, args.force)
    text = read_text(args.data, "calibration")
    args.fp32 = False
    model, tokenizer, _ = _finetune_base(args)
    peft_model = make_peft_model(model, cfg)
    tracker = OutlierTracker(peft_model, every=args.every)
    try:
        log = train(peft_model, tokenize(tokenizer, text), cfg, progress=progress("ossh", cfg.steps),
                    on_step=lambda step, loss: tracker.record(step, loss))
    finally:
        tracker.close()
    summary = tracker.summary()
    summary["losses"] = log["losses"]
    out = Path(args.out)
    plot(summary, out)
    write_json(out.with_suffix(".json"), summary)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_layer"}, indent=1))
    else:
        print(tabulate([[k, f"{sum(v['jaccard']) / len(v['jaccard']):.3f}", f"{min(v['jaccard']):.3f}", f"{v['jaccard'][-1]:.3f}"]
                        for k, v in sorted(summary["per_kind"].items())],
                       headers=["layer kind", "mean Jaccard", "min", "last step"]))
        print(f"{summary['layers']} layers over {cfg.steps} steps: mean Jaccard {summary['mean_jaccard']:.3f}, "
              f"mean recall {summary['mean_recall']:.3f}; plot {out}, data {out.with_suffix('.json')}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the finetune, ossh commands."""
    p = sub.add_parser("finetune", help="PEFT fine-tuning (LoRA, IA3, prompt, prefix) on the int8 Quaff base")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + ", or an artifact folder")
    add_training_options(p, lr=2e-4)
    p.add_argument("--eval-text", default=None, help="held-out text for the final perplexity (default: bundled gpl-3.0.txt)")
    p.add_argument("--peft", default="lora", help="lora | ia3 | prompt | prefix (default lora)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=16, help="LoRA alpha")
    p.add_argument("--virtual-tokens", type=int, default=16, help="prompt/prefix tuning length")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="quaff-finetune", help="output folder (default quaff-finetune)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--force", action="store_true", help="start over in an existing --out")
    p.add_argument("--fp32", action="store_true", help="fine-tune the unquantized model (the baseline)")
    p.add_argument("--merge", action="store_true", help="LoRA: also save the merged, re-quantized model in OUT/merged")
    add_outlier_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("ossh", help="track outlier channels during LoRA fine-tuning against the calibrated ones")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + ", or an artifact folder")
    add_training_options(p, lr=1e-3)
    p.add_argument("--every", type=int, default=1, help="record every N steps")
    p.add_argument("--out", default="ossh.png", help="PNG plot (the data goes beside it as .json)")
    p.add_argument("--force", action="store_true")
    add_outlier_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ossh)
