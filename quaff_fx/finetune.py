"""Parameter-efficient fine-tuning on a Quaff model: PEFT adapters on top, the int8 base frozen, the outlier
scales following their momentum update. The Hugging Face Trainer runs the training (quaff_fx.training);
this module chooses the adapter and trains on token windows of a text.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .data import windows
from .errors import QuaffError
from .quaff_linear import QuaffLinear

METHODS = ("lora", "ia3", "prompt", "prefix")
BNB_LINEARS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' layers: the QLoRA / 8-bit baselines' targets


@dataclass
class FinetuneConfig:
    peft: str = "lora"
    steps: int = 20
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 2e-4
    rank: int = 8
    alpha: int = 16
    virtual_tokens: int = 16
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.peft not in METHODS:
            raise QuaffError(f"unknown PEFT method {self.peft!r}; choose one of {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "seq_len", "rank", "virtual_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise QuaffError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise QuaffError(f"learning rate must be > 0, got {self.lr}")


def target_modules(model: nn.Module) -> list[str]:
    """Leaf names of the Quaff layers (q_proj, ...), or of the Linears (bitsandbytes' too) when there are none."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QuaffLinear)}
    if not leaves:
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                  if (type(m) is nn.Linear or type(m).__name__ in BNB_LINEARS) and "lm_head" not in n}
    return sorted(leaves)


def register_quaff_lora(config):
    """A LoRA config learns to put its adapters on QuaffLinears (merge re-quantizes); other configs pass."""
    if (
        getattr(config, "peft_type", None) is not None
        and str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type) == "LORA"
    ):
        from .hf import register_peft

        register_peft(config)
    return config


def peft_config(model: nn.Module, cfg: FinetuneConfig):
    """The PEFT config of ``cfg.peft`` for ``model``'s layers."""
    import peft

    targets = target_modules(model)
    if cfg.peft == "lora":
        return register_quaff_lora(
            peft.LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
            )
        )
    if cfg.peft == "ia3":
        ff = [t for t in targets if t in ("down_proj", "fc2", "dense_4h_to_h", "c_proj")]
        attn = [t for t in targets if t in ("k_proj", "v_proj", "qkv_proj", "query_key_value")]
        return peft.IA3Config(target_modules=attn + ff, feedforward_modules=ff, task_type="CAUSAL_LM")
    if cfg.peft == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.virtual_tokens, task_type="CAUSAL_LM")
    return peft.PrefixTuningConfig(num_virtual_tokens=cfg.virtual_tokens, task_type="CAUSAL_LM")


def make_peft_model(model: nn.Module, cfg: FinetuneConfig):
    import peft

    torch.manual_seed(cfg.seed)
    with quiet_peft():
        return peft.get_peft_model(model, peft_config(model, cfg))


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT asks every model for transformers' deprecated ``is_gradient_checkpointing``: a FutureWarning that is
    not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def batch_for_step(win: torch.Tensor, step: int, cfg: FinetuneConfig) -> torch.Tensor:
    """The batch of ``step``: windows in a per-epoch permutation drawn from the seed (a reference order for
    hand-written loops such as the FSDP tests'; the Trainer draws its own)."""
    per_epoch = max(win.shape[0] // cfg.batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(win.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    idx = order[(i * cfg.batch_size) % win.shape[0] :][: cfg.batch_size]
    if idx.numel() < cfg.batch_size:
        idx = torch.cat([idx, order[: cfg.batch_size - idx.numel()]])
    return win[idx]


def train(
    model,
    ids: torch.Tensor,
    cfg: FinetuneConfig,
    out: Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    distributed: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a PEFT model) on windows of ``ids`` for ``cfg.steps`` steps with the Trainer; returns the
    loss log. Checkpoints go to ``out``/checkpoints (none without ``out``). Under torch.distributed the Trainer
    runs DDP: each process takes its part of the global batch of ``cfg.batch_size`` windows."""
    import tempfile

    from .distributed import world
    from .training.trainer import StepHook, TrainConfig, fit

    _, size = world()
    if cfg.batch_size % size:
        raise QuaffError(f"batch size {cfg.batch_size} does not split over {size} processes")
    win = windows(ids, cfg.seq_len)
    if win.shape[0] < 1:
        raise QuaffError(f"training text has {ids.numel()} tokens, too few for one window of {cfg.seq_len}")
    if not any(p.requires_grad for p in model.parameters()):
        raise QuaffError("the model has no trainable parameter: nothing to fine-tune")
    examples = [{"input_ids": w.tolist(), "labels": w.tolist()} for w in win]
    tcfg = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size // size,
        lr=cfg.lr,
        lr_scheduler="constant",
        save_every=cfg.checkpoint_every,
        seed=cfg.seed,
        progress=progress,
        device=next(model.parameters()).device.type,
        distributed=distributed or "ddp",
    )
    hooks = [StepHook(on_step)] if on_step is not None else []
    with tempfile.TemporaryDirectory(prefix="quaff-train-") as scratch:
        folder = Path(out) / "checkpoints" if out is not None else Path(scratch)
        log = fit(model, examples, [], tcfg, folder, resume=resume, callbacks=hooks)
    if any(not math.isfinite(v) for v in log["losses"]):
        raise QuaffError(f"the loss became non-finite ({log['losses']}); lower the learning rate")
    log["config"] = asdict(cfg)
    return log


@torch.no_grad()
def perplexity_of(model, ids: torch.Tensor, seq_len: int, batch_size: int = 4) -> float:
    """Perplexity of windows of ``ids`` from the model's own loss (labels = inputs): right for every PEFT
    method, prompt tuning included (PEFT masks the virtual tokens' positions in the labels)."""
    win = windows(ids, seq_len)
    if win.shape[0] == 0:
        return math.nan
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, win.shape[0], batch_size):
        batch = win[i : i + batch_size].to(device)
        total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
    model.train(was_training)
    return math.exp(total / win.shape[0])
