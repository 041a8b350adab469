"""quaff-fx finetune and ossh."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..corpus import DEFAULT_BATCHES
from ..distributed import DISTRIBUTED, SCALE_SYNCS
from ..errors import QuaffError
from ..io import is_artifact, read_json, read_manifest
from .common import (
    MODEL_HELP,
    add_device_options,
    add_outlier_options,
    add_training_options,
    calibration_config,
    check_out,
    device_of,
    dtype_of,
    phase,
    quaff_config,
)


def _check_finetune_args(args: argparse.Namespace):
    """Every option checked before any data is read or model loaded: (FinetuneConfig, TrainConfig, out)."""
    from ..finetune import FinetuneConfig
    from ..training.trainer import TrainConfig

    if args.merge and args.peft != "lora":
        raise QuaffError(
            f"--merge works with --peft lora only (an {args.peft} adapter cannot be folded into int8 weights)"
        )
    if args.merge and args.fp32:
        raise QuaffError("--merge writes a Quaff artifact; it does not apply to --fp32 training")
    if not 0 <= args.eval_split < 1:
        raise QuaffError(f"--eval-split must be in [0, 1), got {args.eval_split}")
    if args.eval_data is not None and args.eval_split_given:
        raise QuaffError("give --eval-data FILE or --eval-split FRACTION, not both")
    device = device_of(args)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    cfg = FinetuneConfig(args.peft, max(args.steps, 1), args.batch_size, args.seq_len, args.lr, args.rank, args.alpha,
                         args.virtual_tokens, args.save_every, args.seed)
    tcfg = TrainConfig(
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        lr_scheduler=args.lr_scheduler,
        warmup=args.warmup,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        device=device.type,
        bf16=bf16,
        compile=args.compile or args.compile_mode != "default" or args.compile_scope != "model",
        compile_mode=args.compile_mode, compile_scope=args.compile_scope, inline_kernels=args.inline_kernels,
        gradient_checkpointing=args.gradient_checkpointing, offload_activations=args.offload_activations,
        report_to=args.report_to, loss=args.loss, scale_sync=args.scale_sync, distributed=args.distributed,
        offload_layers=args.offload_layers,
    )
    layers = _declared_layers(args.model) if tcfg.offload_layers else None
    if layers is not None and tcfg.offload_layers > layers:
        raise QuaffError(f"--offload-layers {tcfg.offload_layers}: {args.model!r} has {layers} decoder layers")
    out = Path(args.out)
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        from ..training.fsdp import check_resumable

        last = get_last_checkpoint(str(out / "checkpoints")) if (out / "checkpoints").is_dir() else None
        if last is None:
            raise QuaffError(f"--resume: {args.out!r} has no checkpoint to continue from; start without --resume")
        check_resumable(last, args.distributed)
    elif out.exists() and not args.force:
        raise QuaffError(f"{args.out!r} exists; pass --resume to continue its training or --force to start over")
    check_out(args.out, force=True)  # the folder it goes in must exist
    return cfg, tcfg, out


def _declared_layers(model: str | None) -> int | None:
    """The decoder layer count a model folder declares (an artifact's manifest, a Hugging Face folder's
    config.json), read without loading the model; None where it declares none (the embedded default, a GGUF)."""
    if is_artifact(model):
        config = read_manifest(model)["model_config"]
    elif model and (Path(model) / "config.json").is_file():
        config = read_json(Path(model) / "config.json")
    else:
        return None
    layers = config.get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..distributed import init_from_env
    from ..finetune import make_peft_model
    from ..training.adapter import save_adapter, save_merged
    from ..training.data import build_examples, pad_id, read_rows, split
    from ..training.fsdp import adapter_state, is_sharded, unshard_
    from ..training.trainer import fit, write_log

    cfg, tcfg, out = _check_finetune_args(args)
    rank, size = init_from_env()  # torchrun / accelerate launch set the environment; one process otherwise
    if tcfg.batch_size % size:
        raise QuaffError(f"--batch-size {tcfg.batch_size} does not split over {size} processes")
    tcfg.batch_size //= size
    if tcfg.offload_layers and size == 1:
        raise QuaffError(f"--offload-layers {tcfg.offload_layers} keeps FSDP2 shards in host memory: launch several "
                         "processes (torchrun, accelerate launch); one process does not shard")
    if args.int8_backward and args.distributed == "fsdp" and size > 1:
        raise QuaffError("--int8-backward keeps a transposed int8 copy of every weight, which FSDP2 would replicate "
                         "in full; drop it, or train with --distributed ddp")
    train_rows = read_rows(args.data)  # a bad row fails here, before the model loads
    eval_rows = read_rows(args.eval_data) if args.eval_data else None
    calibration = (
        calibration_config(
            args, num_batches=args.calib_batches, batch_size=args.calib_batch_size, seq_len=args.calib_seq_len
        )
        if not (args.fp32 or is_artifact(args.model))
        else None
    )
    model, tokenizer, source, config = _finetune_base(args, calibration)
    name = args.data or "the bundled apache-2.0.txt"
    examples = build_examples(train_rows, tokenizer, cfg.seq_len, args.packing, f"training data {name}")
    if eval_rows is not None:
        train_set, eval_set = (
            examples,
            build_examples(eval_rows, tokenizer, cfg.seq_len, args.packing, f"eval data {args.eval_data}"),
        )
        eval_name = f"{args.eval_data} ({len(eval_set)} examples)"
    else:
        train_set, eval_set = split(examples, args.eval_split, cfg.seed)
        eval_name = f"{len(eval_set)} held-out examples ({args.eval_split:.0%}) of {name}"
    if args.int8_backward:
        from ..quaff_linear import int8_backward_

        int8_backward_(model)
    created = rank == 0 and not out.exists()
    if rank == 0:
        if args.force and out.exists() and not args.resume:
            shutil.rmtree(out)
        out.mkdir(exist_ok=True)
    try:
        peft_model = make_peft_model(model, cfg)
        evaluated = eval_name if eval_set else "nothing"
        phase(f"fine-tuning {cfg.peft} on {len(train_set)} examples of {name}; eval on {evaluated}")
        log = fit(
            peft_model, train_set, eval_set, tcfg, out / "checkpoints", pad_id=pad_id(tokenizer), resume=args.resume
        )
    except BaseException:
        if created and not any((out / "checkpoints").glob("checkpoint-*")):
            shutil.rmtree(out, ignore_errors=True)  # nothing resumable: leave no empty folder behind
        raise
    log.update(
        {
            "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
            "world_size": size,
            "eval_set": eval_name if eval_set else None,
            "train_examples": len(train_set),
        }
    )
    adapter = None
    if is_sharded(peft_model):  # every rank takes part in gathering what rank 0 writes
        adapter = adapter_state(peft_model)
        if args.merge:
            unshard_(peft_model)  # the whole model on every rank, for merge_and_unload
    if rank > 0:
        return 0  # rank 0 writes and reports
    base = source.get("artifact") or source.get("name") or source.get("path")
    save_adapter(peft_model, out / "adapter", base, state_dict=adapter)
    write_log(log, out)
    from ..io import write_json

    write_json(
        out / "finetune.json",
        {
            "source": source,
            "quantized": config is not None,
            "quaff_config": config,
            "finetune": {**vars(cfg), **log["config"]},
        },
    )
    if args.merge:
        phase(f"merging the adapter and re-quantizing into {out / 'merged'}")
        save_merged(peft_model, out / "merged", source, tokenizer, config)
    _report(args, cfg, log)
    return 0


def _report(args: argparse.Namespace, cfg, log: dict) -> None:
    losses = log["losses"]
    summary = {
        "steps": log["steps"],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": log.get("eval_loss"),
        "eval_perplexity": log.get("eval_perplexity"),
        "eval_set": log["eval_set"],
        "seq_len": cfg.seq_len, "seconds": round(log["seconds"], 2),
        "tokens_per_s": log.get("tokens_per_s"), "tokens_per_s_median_step": log.get("tokens_per_s_median_step"),
        "step_seconds": log.get("step_seconds"), "peak_memory_bytes": log.get("peak_memory_bytes"),
        "peak_memory_after_warmup_bytes": log.get("peak_memory_after_warmup_bytes"),
        "trainable_parameters": log["trainable_parameters"],
        "out": args.out,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    base = "fp32" if args.fp32 else "quaff int8"
    line = (
        f"{cfg.peft} on {base} base: training loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} in "
        f"{summary['steps']} steps ({summary['seconds']} s"
    )
    if summary["tokens_per_s"]:
        median = summary["tokens_per_s_median_step"]
        line += f", {summary['tokens_per_s']:.0f} tokens/s ({median:.0f} at the median step)"
    if summary["peak_memory_bytes"]:
        after = summary["peak_memory_after_warmup_bytes"]
        line += f", peak GPU memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB" + (
            f" ({after / 2**30:.2f} GiB after the warm-up steps)" if after else "")
    print(line + ")")
    if summary["eval_loss"] is not None:
        print(
            f"eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.3f}) "
            f"on {summary['eval_set']}, examples of up to {cfg.seq_len} tokens, loss on trained tokens only"
        )
    print(
        f"{summary['trainable_parameters']} trainable parameters; adapter/ (with its outlier scales), loss.json, "
        f"loss.png in {args.out}"
        + ("; merged/ is re-quantized: evaluate it, it can score a little worse than the adapter" if args.merge else "")
    )


def _finetune_base(args: argparse.Namespace, calibration):
    """(model, tokenizer, source, QuaffConfig dict or None): an artifact as saved, or a model quantized here with
    the calibration options (or left unquantized with --fp32), on --device in --dtype (bf16 on CUDA by default)."""
    import torch

    from ..io import load_quantized
    from ..model_loading import load_model

    device = device_of(args)
    dtype = dtype_of(args) or (torch.bfloat16 if device.type == "cuda" else None)
    if is_artifact(args.model):
        if args.fp32:
            raise QuaffError("--fp32 needs a model, not a quantized artifact")
        phase(f"loading the artifact {args.model}")
        loaded, manifest = load_quantized(args.model, dtype, device)  # straight onto the device
        source = {"artifact": str(Path(args.model).resolve()), **manifest.get("source", {})}
        return loaded.model, loaded.tokenizer, source, manifest["config"]
    phase(f"loading {args.model or 'smollm2'} ({dtype or torch.float32}, {device})")
    loaded = load_model(args.model, dtype or torch.float32)
    loaded.model.to(device)
    if args.fp32:
        return loaded.model, loaded.tokenizer, loaded.source, None
    from ..quantize import quantize_

    config = quaff_config(args)
    quantize_(loaded.model, config, calibration, loaded.tokenizer, progress=True)
    return loaded.model, loaded.tokenizer, loaded.source, config.to_dict()


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
    calibration = None if is_artifact(args.model) else calibration_config(args, seq_len=min(args.seq_len, 256))
    model, tokenizer, _, _ = _finetune_base(args, calibration)
    peft_model = make_peft_model(model, cfg)
    tracker = OutlierTracker(peft_model, every=args.every)
    try:
        log = train(
            peft_model,
            tokenize(tokenizer, text),
            cfg,
            progress=True,
            on_step=lambda step, loss: tracker.record(step, loss),
        )
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
        print(
            tabulate(
                [
                    [
                        k,
                        f"{sum(v['jaccard']) / len(v['jaccard']):.3f}",
                        f"{min(v['jaccard']):.3f}",
                        f"{v['jaccard'][-1]:.3f}",
                    ]
                    for k, v in sorted(summary["per_kind"].items())
                ],
                headers=["layer kind", "mean Jaccard", "min", "last step"],
            )
        )
        print(
            f"{summary['layers']} layers over {cfg.steps} steps: mean Jaccard {summary['mean_jaccard']:.3f}, "
            f"mean recall {summary['mean_recall']:.3f}; plot {out}, data {out.with_suffix('.json')}"
        )
    return 0


class _Given(argparse.Action):
    """Stores the value and records that the user gave it (to refuse --eval-split with --eval-data)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="training data: a text file (packed windows), JSON/JSONL/CSV rows with 'text', 'prompt'+'completion' "
        "or chat 'messages', or a saved datasets folder (default: the bundled apache-2.0.txt)",
    )
    g.add_argument("--eval-data", default=None, metavar="FILE", help="evaluation data, in the same formats")
    g.add_argument(
        "--eval-split",
        type=float,
        default=0.05,
        action=_Given,
        help="without --eval-data: the fraction of the training examples held out for evaluation (0: none)",
    )
    g.add_argument("--packing", action="store_true", help="rows: concatenate them and cut full windows of --seq-len")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=20, help="optimizer steps (0: use --epochs)")
    g.add_argument("--epochs", type=float, default=0.0, help="passes over the data, when --steps is 0")
    g.add_argument("--batch-size", type=int, default=4, help="windows per step (over all processes)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation: batches per optimizer step")
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    g.add_argument("--lr-scheduler", default="linear", help="linear | cosine | constant | constant_with_warmup | ...")
    g.add_argument(
        "--warmup", type=float, default=0.0, help="warm-up: a fraction of the steps (< 1) or a number of steps"
    )
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    g.add_argument("--checkpoint-every", dest="save_every", type=int, help=argparse.SUPPRESS)  # the old name
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 mixed precision (default: on with CUDA, off on the CPU)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", default="default", help="torch.compile's mode (implies --compile); "
                   "reduce-overhead (CUDA graphs) is the fast one on GPUs")
    g.add_argument("--compile-scope", default="model", help="model: one graph (the Trainer compiles it); layers: each "
                   "decoder layer, one shared graph compiled in the time of one (implies --compile)")
    g.add_argument("--inline-kernels", action="store_true", help="GPU: compiled code launches the quaff ops' Triton "
                   "kernels itself, no Python per op call (compiles longer: pair with --compile-scope layers)")
    g.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)"
    )
    g.add_argument("--offload-activations", action="store_true", help="GPU: what the decoder's layers save for "
                   "backward (their inputs, with --gradient-checkpointing) waits in pinned host memory, copied on a "
                   "side stream (less GPU memory at the step's peak)")
    g.add_argument(
        "--int8-backward",
        action="store_true",
        help="GPU: the backward's grad_X as an int8 GEMM (faster; keeps a transposed int8 copy of W)",
    )
    g.add_argument("--report-to", default="none", choices=("none", "tensorboard"), help="training logs for")
    g.add_argument("--loss", default="auto", choices=("auto", "chunked", "model"), help="chunked: linear + "
                   "cross-entropy without the whole logits (less memory); model: the model's own; auto: CUDA chunked")
    g.add_argument("--scale-sync", default="forward", choices=SCALE_SYNCS, help="several processes: the "
                   "outlier scales' all-reduce in every layer's forward, or one per micro-batch after its backward")
    g.add_argument("--distributed", default="ddp", choices=DISTRIBUTED, help="several processes (torchrun, "
                   "accelerate launch): ddp replicates the model; fsdp (FSDP2) shards it, the int8 base included")
    g.add_argument("--offload-layers", type=int, default=0, metavar="N", help="--distributed fsdp: the last N "
                   "decoder layers keep their shards (int8 base, adapters, AdamW state) in pinned host memory, copied "
                   "in for each all-gather (less GPU memory, some speed: README, 'Two GPUs')")
    g = p.add_argument_group("calibration (a model quantized here)")
    g.add_argument(
        "--calib",
        action="append",
        default=None,
        metavar="TEXT",
        help="calibration text or dataset, repeatable (default: the bundled calibration corpus, 'bundled')",
    )
    g.add_argument("--calib-batches", type=int, default=DEFAULT_BATCHES, help="calibration batches")
    g.add_argument("--calib-batch-size", type=int, default=2, help="windows per calibration batch")
    g.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the finetune, ossh commands."""
    p = sub.add_parser(
        "finetune",
        help="PEFT fine-tuning (LoRA, IA3, prompt, prefix) on the int8 Quaff base, with the Hugging Face Trainer",
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + ", or an artifact folder")
    _add_finetune_options(p)
    g = p.add_argument_group("adapter")
    g.add_argument("--peft", default="lora", choices=("lora", "ia3", "prompt", "prefix"), help="PEFT method")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=int, default=16, help="LoRA alpha")
    g.add_argument("--virtual-tokens", type=int, default=16, help="prompt/prefix tuning length")
    p.add_argument("--out", default="quaff-finetune", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--force", action="store_true", help="start over in an existing --out")
    p.add_argument(
        "--fp32", action="store_true", help="fine-tune the unquantized model (the baseline; --dtype sets its dtype)"
    )
    p.add_argument(
        "--merge", action="store_true", help="LoRA: also write the merged, re-quantized artifact in OUT/merged"
    )
    add_device_options(p)
    add_outlier_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_finetune, eval_split_given=False)
    p = sub.add_parser("ossh", help="track outlier channels during LoRA fine-tuning against the calibrated ones")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + ", or an artifact folder")
    add_training_options(p, lr=1e-3)
    p.add_argument("--every", type=int, default=1, help="record every N steps")
    p.add_argument("--out", default="ossh.png", help="PNG plot (the data goes beside it as .json)")
    p.add_argument("--force", action="store_true")
    add_device_options(p)
    add_outlier_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ossh)
