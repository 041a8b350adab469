"""Quaff fine-tuning under torch.distributed: DDP or FSDP2 (``fully_shard``), launched by ``torchrun`` or
``accelerate launch`` (both set RANK, WORLD_SIZE, MASTER_ADDR/PORT; nothing else is needed).

The int8 weights, their scales and W_o are buffers: replicated, never sharded or reduced. Only the
adapters train. The outlier scales' momentum update takes max|X_o| over the whole global batch (an
all-reduce of k floats), so every rank holds the same scales as a single process would.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .errors import QuaffError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group a launcher described in the environment (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def wrap(model: nn.Module, mode: str) -> nn.Module:
    """DDP, or FSDP2 with one shard group per decoder layer and one for the rest."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=None if not torch.cuda.is_available() else [torch.cuda.current_device()])
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    raise QuaffError(f"unknown distributed mode {mode!r}; use ddp or fsdp")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and sum(1 for _ in module[0].parameters()) > 1:
            return list(module)
    return []


def global_max_(t: torch.Tensor) -> torch.Tensor:
    """In place: the maximum of ``t`` over all ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def global_mean(value: float) -> float:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()
    return value
