"""The Hugging Face Trainer as the fine-tuning engine, with what Quaff adds: the momentum-updated outlier
scales saved in every checkpoint and restored on resume (a TrainerCallback), synced across processes once per
micro-batch under ``scale_sync="step"`` (another), the loss log as JSON and a PNG, tokens per second and peak memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..distributed import (
    DISTRIBUTED,
    SCALE_SYNCS,
    decoder_layers,
    local_bytes,
    scale_sync,
    shard_model,
    sync_scales_,
    world,
)
from ..errors import QuaffError
from ..hf import lora_fusion
from ..io import write_json
from ..ops import kernel_inlining
from .adapter import SCALES, load_scales_, read_scales, write_scales
from .data import Collator
from .fsdp import ShardedTrainer, check_resumable
from .offload import offload_activations_

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


LOSSES = ("auto", "chunked", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
COMPILE_SCOPES = ("model", "layers")  # one graph of the whole model (the Trainer's torch_compile), or per decoder layer


@dataclass
class TrainConfig:
    """The Trainer's settings as quaff-fx names them (``steps`` wins over ``epochs`` when > 0)."""

    steps: int = 20
    epochs: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    lr_scheduler: str = "linear"
    warmup: float = 0.0  # < 1: a fraction of the steps; >= 1: a number of steps
    eval_every: int = 0
    save_every: int = 10
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    compile: bool = False
    compile_mode: str = "default"  # COMPILE_MODES; "reduce-overhead" runs the step in CUDA graphs
    compile_scope: str = "model"  # COMPILE_SCOPES
    inline_kernels: bool = False  # compiled code launches the quaff ops' Triton kernels itself (ops.inline_kernels)
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # the decoder's saved activations to pinned host memory (training.offload)
    report_to: str = "none"
    progress: bool = True
    loss: str = "auto"  # LOSSES: "chunked" (kernels.linear_ce), "model" (its own), "auto" (chunked on CUDA)
    scale_sync: str = "forward"  # SCALE_SYNCS: the outlier scales' all-reduce in every forward, or once per micro-batch
    distributed: str = "ddp"  # DISTRIBUTED: how several processes train (one process: neither)
    offload_layers: int = 0  # fsdp: decoder layers whose shards wait in pinned host memory (shard_model)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise QuaffError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps < 1 and not self.epochs > 0:
            raise QuaffError("give --steps N (>= 1) or --epochs E (> 0)")
        if not self.lr > 0:
            raise QuaffError(f"--lr must be > 0, got {self.lr}")
        if self.lr_scheduler not in SCHEDULERS:
            raise QuaffError(f"--lr-scheduler {self.lr_scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.warmup < 0 or self.eval_every < 0:
            raise QuaffError("--warmup and --eval-every must be >= 0")
        if self.compile_mode not in COMPILE_MODES:
            raise QuaffError(f"--compile-mode {self.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
        if self.compile_scope not in COMPILE_SCOPES:
            raise QuaffError(f"--compile-scope {self.compile_scope!r}: choose one of {', '.join(COMPILE_SCOPES)}")
        if self.compile_scope == "layers" and self.compile_mode in CUDA_GRAPH_MODES:
            raise QuaffError(f"--compile-scope layers with --compile-mode {self.compile_mode} (CUDA graphs per layer) "
                             "is not supported: use --compile-scope model for CUDA graphs, or another mode")
        if self.loss not in LOSSES:
            raise QuaffError(f"--loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.scale_sync not in SCALE_SYNCS:
            raise QuaffError(f"--scale-sync {self.scale_sync!r}: choose one of {', '.join(SCALE_SYNCS)}")
        if self.distributed not in DISTRIBUTED:
            raise QuaffError(f"--distributed {self.distributed!r}: choose one of {', '.join(DISTRIBUTED)}")
        if self.offload_activations and self.device != "cuda":
            raise QuaffError("--offload-activations moves activations from the GPU to host memory: it needs "
                             f"--device cuda (got {self.device})")
        if self.offload_activations and self.compile and self.compile_scope == "model":
            raise QuaffError("--offload-activations hooks the decoder module, which a whole-model compile would "
                             "trace: use --compile-scope layers (or no --compile)")
        if self.offload_layers < 0:
            raise QuaffError(f"--offload-layers must be >= 0, got {self.offload_layers}")
        if self.offload_layers and self.distributed != "fsdp":
            raise QuaffError(f"--offload-layers {self.offload_layers} keeps FSDP2 shards in host memory: it needs "
                             f"--distributed fsdp (got {self.distributed})")
        if self.report_to not in ("none", "tensorboard"):
            raise QuaffError(f"--report-to {self.report_to!r}: choose none or tensorboard")


class QuaffStateCallback(TrainerCallback):
    """Saves the outlier scales into each checkpoint folder and, on resume, loads them back before the first
    step: the scales are buffers the optimizer never sees, so without this a resumed run would start from the
    calibrated scales instead of the trained ones."""

    def __init__(self, model: nn.Module, resume_from: str | Path | None = None) -> None:
        self.model, self.resume_from = model, resume_from

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume_from is not None:
            path = Path(self.resume_from) / SCALES
            if not path.is_file():
                raise QuaffError(f"checkpoint {str(self.resume_from)!r} has no {SCALES}; it cannot resume exactly")
            load_scales_(self.model, read_scales(path), str(self.resume_from))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_scales(self.model, folder / SCALES)


class ScaleSync(TrainerCallback):
    """``sync_scales_`` after every micro-batch's backward, for ``scale_sync("step")``: the Trainer calls
    ``on_substep_end`` after each micro-batch of a gradient accumulation but the last, and ``on_step_end`` after
    the last one's backward and the optimizer step, before it logs, saves or evaluates (so a checkpoint holds the
    synced scales)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def on_substep_end(self, args, state, control, **kwargs):
        sync_scales_(self.model)

    def on_step_end(self, args, state, control, **kwargs):
        sync_scales_(self.model)


class StepHook(TrainerCallback):
    """Calls ``on_step(step, loss)`` after each logged step (0-based step; the OSSH tracker's hook)."""

    def __init__(self, on_step) -> None:
        self.on_step = on_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.on_step(state.global_step - 1, logs["loss"])


class LossBar(ProgressCallback):
    """The Trainer's progress bar (on stderr) with the loss in it, and no log dicts printed on stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")


WARMUP_STEPS = 3


class Throughput(TrainerCallback):
    """Tokens seen (non-padding) per second, over the steps after the warm-up ones (the first steps compile and
    allocate): steps after min(3, half of them)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.marks: list[tuple[float, int]] = []
        self.peak_warmup: int | None = None  # CUDA: the peak of the first WARMUP_STEPS steps (compilation)

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), self.tokens))
        if len(self.marks) == WARMUP_STEPS and torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak_warmup = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()  # what follows is the steady state's peak

    def _first(self) -> int:
        return min(WARMUP_STEPS, len(self.marks) // 2) - 1 if len(self.marks) > 2 else 0

    def rate(self) -> float | None:
        """Tokens over seconds of all the steps after the warm-up (a hiccup in one step counts)."""
        if len(self.marks) < 2:
            return None
        (t0, n0), (t1, n1) = self.marks[self._first()], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def step_seconds(self) -> list[float]:
        """Each step's seconds after the warm-up (a step benchmark's median compares with their median)."""
        times = [t for t, _ in self.marks[self._first():]]
        return [b - a for a, b in zip(times, times[1:])]

    def median_rate(self) -> float | None:
        """Tokens per step over the median step's seconds, the statistic of a step benchmark."""
        steps = sorted(self.step_seconds())
        if not steps:
            return None
        (_, n0), (_, n1) = self.marks[self._first()], self.marks[-1]
        return (n1 - n0) / len(steps) / steps[len(steps) // 2]


def checkpointing_arguments(enable: bool) -> dict[str, Any]:
    """Activation checkpointing under the name this transformers uses (``activation_checkpointing`` from 5.2x on,
    ``gradient_checkpointing`` before); nothing when off, so no deprecation warning either way."""
    if not enable:
        return {}
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def training_arguments(cfg: TrainConfig, output_dir: Path, has_eval: bool):
    from transformers import TrainingArguments

    length = {"max_steps": cfg.steps} if cfg.steps > 0 else {"num_train_epochs": cfg.epochs}
    evals = (
        {"eval_strategy": "steps", "eval_steps": cfg.eval_every}
        if has_eval and cfg.eval_every
        else {"eval_strategy": "no"}
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_every,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        use_cpu=cfg.device == "cpu",
        torch_compile=cfg.compile and cfg.compile_scope == "model",
        torch_compile_mode=cfg.compile_mode if cfg.compile and cfg.compile_mode != "default" else None,
        **checkpointing_arguments(cfg.gradient_checkpointing),
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        remove_unused_columns=False,
        ddp_broadcast_buffers=False,  # the int8 base is buffers (the whole base, equal on every rank from the start)
        ddp_find_unused_parameters=False,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        warmup_steps=int(cfg.warmup) if cfg.warmup >= 1 else cfg.warmup,
        **length,
        **evals,
    )
    if cfg.device == "cuda" and world()[1] == 1:  # one process trains on one GPU: the Trainer would wrap the model
        _ = args.device  # in nn.DataParallel over every visible GPU (it breaks the Quaff model: several GPUs go
        args._n_gpu = 1  # through torchrun or accelerate launch); its device setup first, which sets _n_gpu
    return args


def fuse_lora(cfg: TrainConfig) -> bool:
    """LoRA in the base op's epilogue (``hf.fused_lora``) on the CPU, under CUDA graphs and with the kernels inlined
    into the compiled code; on CUDA otherwise PEFT's own forward, whose op costs the host less (measured at 8B on an
    H100: README)."""
    return cfg.device != "cuda" or (cfg.compile and (cfg.compile_mode in CUDA_GRAPH_MODES or cfg.inline_kernels))


def compile_layers_(model: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """``Module.compile`` on every decoder layer (regional compilation): the layers share one graph, so the model
    compiles in about the time of one layer, and what wraps the layers (DDP, FSDP2, the Trainer) stays outside.
    Also the benchmarks' per-layer compilation (tools/fsdp_bench.py, tools/gpu_step_bench.py)."""
    layers = decoder_layers(model)
    if not layers:
        raise QuaffError(f"--compile-scope layers: found no decoder layers (an nn.ModuleList of blocks) in "
                         f"{type(model).__name__}; use --compile-scope model")
    for layer in layers:
        layer.compile(mode=None if mode == "default" else mode, backend=backend)
    return len(layers)


def fit(
    model: nn.Module,
    train: Sequence[dict],
    eval_set: Sequence[dict],
    cfg: TrainConfig,
    output_dir: str | Path,
    pad_id: int | None = None,
    resume: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Train the PEFT ``model`` on ``train`` with the Trainer; checkpoints go to ``output_dir`` (``resume``:
    continue from its latest). Returns the log: per-step training loss, eval losses, final eval loss, speed."""
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(output_dir)
    dequantized_gguf_(model)
    last = get_last_checkpoint(str(output_dir)) if resume and output_dir.is_dir() else None
    if resume and last is None:
        raise QuaffError(f"--resume: no checkpoint in {str(output_dir)!r}; start without --resume")
    if last is not None:
        check_resumable(last, cfg.distributed)
    if cfg.loss == "chunked" or (cfg.loss == "auto" and cfg.device == "cuda"):
        from ..kernels.linear_ce import fused_causal_lm_loss_

        fused_causal_lm_loss_(model, "chunked")  # the vocabulary projection no longer sets the peak
    trainer_class = Trainer
    if cfg.distributed == "fsdp":  # its checkpoints in one process too: they resume on any number of processes
        trainer_class = ShardedTrainer
        if world()[1] > 1:
            shard_model(model, offload_layers=cfg.offload_layers)  # before the Trainer makes the optimizer: it
            # takes the shards (host-offloaded ones too: the fused AdamW steps each device's group where it is)
    throughput = Throughput()
    collator = Collator(pad_id)

    def counting(batch):
        out = collator(batch)
        throughput.tokens += int(out["attention_mask"].sum())
        return out

    trainer = trainer_class(
        model=model,
        args=training_arguments(cfg, output_dir, bool(eval_set)),
        train_dataset=list(train),
        eval_dataset=list(eval_set) or None,
        data_collator=counting,
        callbacks=[QuaffStateCallback(model, last), *([ScaleSync(model)] if cfg.scale_sync == "step" else []),
                   throughput, *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossBar())
    if cfg.compile and cfg.compile_scope == "layers":
        compile_layers_(model, cfg.compile_mode)
    offload = offload_activations_(model) if cfg.offload_activations else None
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        with scale_sync(cfg.scale_sync), lora_fusion(fuse_lora(cfg)), kernel_inlining(cfg.inline_kernels):
            result = trainer.train(resume_from_checkpoint=last)
    finally:
        if offload is not None:
            offload.remove()  # the model leaves fit as it came (its evaluation below has no backward anyway)
    seconds = time.perf_counter() - t0
    history = trainer.state.log_history
    log: dict[str, Any] = {
        "losses": [h["loss"] for h in history if "loss" in h],
        "loss_steps": [h["step"] for h in history if "loss" in h],
        "eval": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "steps": result.global_step,
        "seconds": seconds,
        "tokens_per_s": throughput.rate(),
        "tokens_per_s_median_step": throughput.median_rate(),
        "step_seconds": [round(t, 4) for t in throughput.step_seconds()],
        "config": asdict(cfg),
        "offloaded_bytes_per_forward": offload.stats["offloaded_bytes"] // max(offload.stats["forwards"], 1)
        if offload else 0,
        "int8_bytes_per_process": local_bytes(model),  # the int8 base this process holds: 1/N of it under FSDP2
        "int8_host_bytes_per_process": local_bytes(model, device="cpu") if cfg.device == "cuda" else 0,  # of it,
        # the shards --offload-layers keeps in host memory
    }
    if eval_set:
        loss = trainer.evaluate()["eval_loss"]
        log["eval_loss"] = loss
        log["eval_perplexity"] = math.exp(loss) if loss < 50 else math.inf
    if cfg.device == "cuda":
        steady = torch.cuda.max_memory_allocated()
        log["peak_memory_bytes"] = max(steady, throughput.peak_warmup or 0)
        if throughput.peak_warmup is not None:
            log["peak_memory_after_warmup_bytes"] = steady
    model.eval()
    return log


def dequantized_gguf_(model: nn.Module) -> None:
    """A model read from a .gguf file holds plain dequantized tensors but keeps transformers' GGUF marker, which
    makes the Trainer refuse it ("quantized with GGUF ... does not support training"); the marker goes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None and type(quantizer).__name__ == "GgufHfQuantizer":
        base.hf_quantizer = None
        base.is_quantized = False


def write_log(log: dict[str, Any], folder: Path) -> None:
    """loss.json and loss.png (training loss per step, eval loss where measured)."""
    write_json(folder / "loss.json", log)
    plot_losses(log, folder / "loss.png")


def plot_losses(log: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(log["loss_steps"], log["losses"], label="training loss")
    if log.get("eval"):
        ax.plot([e["step"] for e in log["eval"]], [e["loss"] for e in log["eval"]], "o-", label="eval loss")
    if log.get("eval_loss") is not None:
        ax.axhline(log["eval_loss"], ls="--", c="gray", label=f"final eval loss {log['eval_loss']:.4f}")
    ax.set(xlabel="optimizer step", ylabel="loss", title="quaff-fx finetune")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
