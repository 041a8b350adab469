"""Parameter-efficient fine-tuning on a Quaff model: PEFT adapters on top, the int8 base frozen, the
outlier scales following their momentum update. A plain PyTorch loop with checkpoints that resume
exactly (data order is a function of the seed and the step), adapters saved as safetensors.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

from .data import windows
from .errors import QuaffError
from .io import read_json, read_safetensors, write_json
from .quaff_linear import QuaffLinear

METHODS = ("lora", "ia3", "prompt", "prefix")


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
    """Leaf names of the quantized layers (q_proj, v_proj, ...), or of the Linears when none is quantized."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QuaffLinear)}
    if not leaves:
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n}
    return sorted(leaves)


def peft_config(model: nn.Module, cfg: FinetuneConfig):
    """The PEFT config of ``cfg.peft`` for ``model``'s layers."""
    import peft

    targets = target_modules(model)
    if cfg.peft == "lora":
        from .hf import register_peft

        return register_peft(peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
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
    return peft.get_peft_model(model, peft_config(model, cfg))


def batch_for_step(win: torch.Tensor, step: int, cfg: FinetuneConfig) -> torch.Tensor:
    """The batch of ``step``: windows in a per-epoch permutation drawn from the seed (resumable)."""
    per_epoch = max(win.shape[0] // cfg.batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(win.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    idx = order[(i * cfg.batch_size) % win.shape[0]:][: cfg.batch_size]
    if idx.numel() < cfg.batch_size:
        idx = torch.cat([idx, order[: cfg.batch_size - idx.numel()]])
    return win[idx]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a sharded one (FSDP2's DTensor), else the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p.detach()).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def scale_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The momentum-updated outlier scales: they change in training and belong with the adapter."""
    return {f"{n}.act_scale": m.act_scale.detach().clone() for n, m in model.named_modules() if isinstance(m, QuaffLinear)}


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name, t in tensors.items():
        target = params.get(name, buffers.get(name))
        if target is None or target.shape != t.shape:
            raise QuaffError(f"{what}: tensor {name!r} does not fit the model")
        with torch.no_grad():
            target.copy_(t)


def save_checkpoint(folder: Path, model, opt: torch.optim.Optimizer, step: int, losses: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(folder / "adapter.safetensors"))
    save_file(scale_state(model) or {"_empty": torch.zeros(0)}, str(folder / "scales.safetensors"))
    state = opt.state_dict()
    tensors = {f"{idx}.{k}": _full(v).contiguous() for idx, s in state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    save_file(tensors or {"_empty": torch.zeros(0)}, str(folder / "optimizer.safetensors"))
    write_json(folder / "state.json", {"step": step, "losses": losses, "param_groups": state["param_groups"],
                                       "state_keys": {str(i): sorted(s) for i, s in state["state"].items()}})


def load_checkpoint(folder: Path, model, opt: torch.optim.Optimizer | None = None) -> tuple[int, list[float]]:
    """Adapter weights and scales into ``model``; the optimizer state into ``opt`` when given."""
    meta = read_json(folder / "state.json")
    _load_into(model, read_safetensors(folder / "adapter.safetensors")[0], str(folder))
    _load_into(model, {k: v for k, v in read_safetensors(folder / "scales.safetensors")[0].items() if k != "_empty"}, str(folder))
    if opt is not None:
        load_optimizer(folder, opt)
    return int(meta["step"]), list(meta["losses"])


def load_optimizer(folder: Path, opt: torch.optim.Optimizer) -> None:
    meta = read_json(folder / "state.json")
    tensors = read_safetensors(folder / "optimizer.safetensors")[0]
    state = {int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return ckpts[-1] if ckpts else None


def train(model, ids: torch.Tensor, cfg: FinetuneConfig, out: Path | None = None, resume: bool = False,
          progress: Callable | None = None, on_step: Callable[[int, float], None] | None = None,
          distributed: str | None = None) -> dict[str, Any]:
    """Train ``model`` (a PEFT model) on windows of ``ids`` for ``cfg.steps`` steps; returns the loss log.

    Under torch.distributed (``distributed`` = "ddp" or "fsdp") each rank takes its slice of the same global
    batch of ``cfg.batch_size`` windows; the logged loss is the global one; rank 0 writes checkpoints."""
    from .distributed import global_mean, world, wrap

    rank, size = world()
    if cfg.batch_size % size:
        raise QuaffError(f"batch size {cfg.batch_size} does not split over {size} processes")
    win = windows(ids, cfg.seq_len)
    if win.shape[0] < 1:
        raise QuaffError(f"training text has {ids.numel()} tokens, too few for one window of {cfg.seq_len}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QuaffError("the model has no trainable parameter: nothing to fine-tune")
    step, losses = 0, []
    ckpt = latest_checkpoint(out) if resume and out is not None else None
    if ckpt is not None and distributed == "fsdp" and size > 1:
        raise QuaffError("resuming under FSDP is not supported yet; resume with DDP or in one process")
    if ckpt is not None:
        step, losses = load_checkpoint(ckpt, model)  # before wrapping: DDP then broadcasts rank 0's state
    net = wrap(model, distributed) if distributed and size > 1 else model
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    if ckpt is not None:
        load_optimizer(ckpt, opt)
    model.train()
    steps = range(step, cfg.steps)
    bar = progress(steps) if progress else steps
    t0 = time.perf_counter()
    for s in bar:
        batch = batch_for_step(win, s, cfg)[rank::size]
        loss = net(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise QuaffError(f"the loss became {loss.item()} at step {s}; lower --lr")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(global_mean(loss.item()))
        if on_step is not None:
            on_step(s, losses[-1])
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if out is not None and rank == 0 and ((s + 1) % cfg.checkpoint_every == 0 or s + 1 == cfg.steps):
            save_checkpoint(out / "checkpoints" / f"step-{s + 1:06d}", model, opt, s + 1, losses)
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}


def save_adapter(model, out: Path, log: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Adapter (PEFT's safetensors + config), the trained scales, the loss log and its plot."""
    model.save_pretrained(str(out / "adapter"))
    save_file(scale_state(model) or {"_empty": torch.zeros(0)}, str(out / "quaff_scales.safetensors"))
    write_json(out / "loss.json", log)
    write_json(out / "finetune.json", manifest)
    (out / "loss.svg").write_text(loss_svg(log["losses"]))


def loss_svg(losses: list[float], width: int = 640, height: int = 320) -> str:
    """A plain SVG line plot of the loss per step (no plotting library needed)."""
    if not losses:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>"
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    n = max(len(losses) - 1, 1)
    pts = " ".join(f"{40 + (width - 60) * i / n:.1f},{20 + (height - 50) * (hi - v) / span:.1f}" for i, v in enumerate(losses))
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='11'>"
            f"<rect width='100%' height='100%' fill='white'/><polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{pts}'/>"
            f"<text x='40' y='14'>loss per step: {losses[0]:.3f} → {losses[-1]:.3f} ({len(losses)} steps)</text>"
            f"<text x='2' y='24'>{hi:.2f}</text><text x='2' y='{height - 28}'>{lo:.2f}</text></svg>")


def perplexity_of(model, ids: torch.Tensor, seq_len: int) -> float:
    from .evaluate import perplexity

    return perplexity(model, ids, seq_len, 4)["perplexity"] if ids.numel() >= 2 * seq_len else math.nan
