"""The Trainer over a model that FSDP2 shards (``quaff_fx.distributed.shard_model``: the int8 base, W_o, the
input embedding and the adapters split across the ranks, one all-gather per decoder layer for compute).

The Hugging Face Trainer shards through accelerate's FSDP plugin, which exists for GPUs only and knows nothing of
integer parameters; here the model comes sharded and the Trainer is kept from wrapping it again (accelerate would
put DDP around it). Checkpoints hold whole tensors, written by rank 0 after every rank took part in gathering
them: the adapter as PEFT writes it (so ``--merge``, ``quaff-fx eval --adapter`` and a single-process resume read
it as any other), and the optimizer state as ``get_optimizer_state_dict`` gives it in full. Resuming broadcasts
them from rank 0 into each rank's shards: a run may resume on another number of processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from ..distributed import load_full_state_dict, world
from ..errors import QuaffError
from ..io import write_json
from .adapter import whole

OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.pt"  # the Trainer's names for them
MARK = "quaff_fsdp.json"  # in a checkpoint this Trainer wrote: its optimizer state is by parameter name, whole
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages ``model`` (``fully_shard`` made some module of it an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by state_dict name, whole and on the CPU. Under FSDP2 every rank must call it (one
    all-gather per parameter, in the same order everywhere); each gets the whole tensors."""
    return {name: whole(p).detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def unshard_(model: nn.Module) -> None:
    """Every FSDP2 unit of ``model`` gathers its parameters in full and keeps them: the model then merges and
    saves as one that was never sharded (``--merge``). Every rank must call it; each then holds the whole model."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()


def held_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``'s entries as its modules hold them now: after ``unshard_``, whole (FSDP2's
    state_dict hook would put the shards back in their place first)."""
    state = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, t in module._parameters.items():
            if t is not None:
                state[dot + name] = t.detach()
        for name, t in module._buffers.items():
            if t is not None and name not in module._non_persistent_buffers_set:
                state[dot + name] = t.detach()
    return state


def read_adapter_state(model: nn.Module, folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter PEFT wrote in ``folder`` under ``model``'s own parameter names (PEFT drops the adapter's name
    from them: ``lora_A.default.weight`` is saved as ``lora_A.weight``); every trainable parameter must be there."""
    from ..io import read_safetensors

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise QuaffError(f"checkpoint {str(folder)!r} has no {ADAPTER_WEIGHTS}; it cannot resume")
    saved = read_safetensors(path)[0]
    adapter = getattr(model, "active_adapter", "default")
    names = {n.replace(f".{adapter}", ""): n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(names) - set(saved))
    if missing:
        raise QuaffError(f"checkpoint {str(folder)!r} lacks {len(missing)} adapter tensors ({missing[0]}, ...): "
                         "it was written for another adapter configuration")
    return {names[k]: v for k, v in saved.items() if k in names}


class ShardedTrainer(Trainer):
    """``transformers.Trainer`` for a model that ``shard_model`` sharded: autocast and compilation from accelerate
    as for any model, no DDP around it; checkpoints of whole tensors (module docstring)."""

    def _wrap_model(self, model, training=True, dataloader=None):
        if training and not getattr(model, "_is_accelerate_prepared", False):
            # what accelerate does to every model (mixed-precision autocast, torch_compile) but the DDP wrapper;
            # marked prepared, so the Trainer's accelerator.prepare() passes it through
            return self.accelerator.prepare_model(model, evaluation_mode=True)
        return model

    def _move_model_to_device(self, model, device):
        if is_sharded(model):  # FSDP2 placed every shard: on the GPU, or on the host for --offload-layers, where
            return  # the Trainer's model.to(device) would pull them back (FSDP2 then refuses to train them)
        super()._move_model_to_device(model, device)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        state = adapter_state(self.model)  # every rank: the all-gathers
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole, on rank 0 only
        state = get_optimizer_state_dict(self.model, _torch_optimizer(self.optimizer), options=options)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            write_json(Path(output_dir) / MARK, {"optimizer": "full state dict by parameter name "
                                                 "(torch.distributed.checkpoint.state_dict)", "world_size": world()[1]})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        paths = [Path(checkpoint) / OPTIMIZER_NAME, Path(checkpoint) / SCHEDULER_NAME]
        for path in paths:
            if not path.is_file():
                raise QuaffError(f"checkpoint {checkpoint!r} has no {path.name}; it cannot resume")
        rank, size = world()
        state = torch.load(paths[0], map_location="cpu", weights_only=True) if rank == 0 else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=size > 1)
        set_optimizer_state_dict(self.model, _torch_optimizer(self.optimizer), state, options=options)
        self.lr_scheduler.load_state_dict(torch.load(paths[1], map_location="cpu", weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # every rank reads and checks it (only rank 0's is broadcast): a bad checkpoint fails every rank at once,
        # where rank 0 failing alone would leave the others waiting in the broadcast
        state = read_adapter_state(self.model, resume_from_checkpoint)
        load_full_state_dict(self.model, state if world()[0] == 0 else {}, strict=False)


def check_resumable(checkpoint: str | Path, distributed: str) -> None:
    """A checkpoint resumes under the --distributed it was written with: FSDP's keeps its optimizer state by
    parameter name (any number of processes), DDP's and one process's by position."""
    written = "fsdp" if (Path(checkpoint) / MARK).is_file() else "ddp"
    if written != distributed:
        raise QuaffError(f"checkpoint {str(checkpoint)!r} was written with --distributed {written}; resume it with "
                         f"--distributed {written}")


def _torch_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
