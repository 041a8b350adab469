"""Quaff fine-tuning under torch.distributed: DDP or FSDP2 (``fully_shard``), launched by ``torchrun`` or
``accelerate launch`` (both set RANK, WORLD_SIZE, MASTER_ADDR/PORT; nothing else is needed).

Only the adapters train. Under DDP the int8 weights are replicated buffers. Under FSDP2 (``shard_model``)
the int8 weight and W_o of every QuaffLinear become frozen parameters first (``int8_parameters_``: FSDP2
shards parameters and replicates buffers), so each rank holds 1/world of them and each decoder layer
all-gathers its own for compute; the small per-row and per-outlier vectors (w_scale, act_scale, outlier_idx,
inv_smooth) stay replicated buffers. The outlier scales' momentum update takes max|X_o| over the whole global
batch, so every rank holds the same scales as a single process would, compiled or not; ``scale_sync`` says when:
in every QuaffLinear forward (``"forward"``, the default: ``global_max``, a functional all-reduce of k floats that
torch.compile traces) or once per micro-batch (``"step"``: ``sync_scales_``, one all-reduce of every layer's scales).
"""
from __future__ import annotations

import contextlib
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


def wrap(model: nn.Module, mode: str, **sharding) -> nn.Module:
    """DDP, or FSDP2 (``shard_model``, given ``sharding``: its ``prefetch``, ``shard_head``, ...)."""
    scale_group()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        # no buffer broadcast each forward: the int8 weights are buffers (the whole base, frozen and equal on every
        # rank from the start), and the outlier scales agree through global_max
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    if mode == "fsdp":
        return shard_model(model, **sharding)
    raise QuaffError(f"unknown distributed mode {mode!r}; use one of {', '.join(DISTRIBUTED)}")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and sum(1 for _ in module[0].parameters()) > 1:
            return list(module)
    return []


SCALE_SYNCS = ("forward", "step")  # when the ranks' outlier scales meet: scale_sync()
DISTRIBUTED = ("ddp", "fsdp")  # how several processes train: DDP replicates the model, FSDP2 shards it (shard_model)
_SCALE_SYNC = "forward"  # a SCALE_SYNCS mode, or "local" inside ``local_scales()``
_SCALE_GROUP = None  # the process group of the scale all-reduces, made by scale_group()


@contextlib.contextmanager
def _scale_sync_mode(mode: str):
    global _SCALE_SYNC
    previous, _SCALE_SYNC = _SCALE_SYNC, mode
    try:
        yield
    finally:
        _SCALE_SYNC = previous


def local_scales():
    """Inside the block, ``global_max`` is the identity and ``sync_scales_`` does nothing: each rank updates its
    outlier scales from its own batch, as a process of its own would (ranks that each train a whole model of their
    own, with no collective)."""
    return _scale_sync_mode("local")


def scale_sync(mode: str):
    """Inside the block, the ranks' outlier scales meet ``"forward"`` (in every QuaffLinear forward, before its
    matmul: ``global_max``) or once per ``"step"``: each forward updates the scales from this rank's batch alone,
    with no collective, and ``sync_scales_(model)`` after each micro-batch's backward makes them the global batch's.

    Why that is the global batch's update: S ← m·S + (1−m)·outlier_scale(max|X_o|) starts from the same S on every
    rank and is non-decreasing in max|X_o| (rounding included), so the maximum over ranks of their local updates is
    the update from the global max. It holds for one update: sync after every forward of a micro-batch (with
    gradient accumulation, after each micro-batch, not once per optimizer step). What differs from ``"forward"``:
    that micro-batch's forward quantized with each rank's local scales, so a layer after it sees slightly
    different activations than one process would (within int8 rounding); the update from them is exact."""
    if mode not in SCALE_SYNCS:
        raise QuaffError(f"unknown scale sync {mode!r}; use {' or '.join(SCALE_SYNCS)}")
    return _scale_sync_mode(mode)


def global_max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``t`` over all ranks (``t`` itself in one process, inside ``local_scales`` or
    under ``scale_sync("step")``). A functional collective: torch.compile traces it into the graph, where
    ``dist.all_reduce`` would break the graph or have to be skipped."""
    if _SCALE_SYNC == "forward" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(t, "max", _SCALE_GROUP or dist.group.WORLD)
    return t


@torch.no_grad()
def sync_scales_(model: nn.Module) -> int:
    """Every QuaffLinear's outlier scales (act_scale) become their maximum over the ranks: one all-reduce of one
    flat buffer on ``scale_group()``, for ``scale_sync("step")``, after each micro-batch's backward. Every rank
    must call it. Returns the number of layers synced: 0 in one process or inside ``local_scales``."""
    from .quaff_linear import QuaffLinear

    if _SCALE_SYNC == "local" or world()[1] == 1:
        return 0
    scales = [m.act_scale for m in model.modules() if isinstance(m, QuaffLinear) and m.act_scale.numel()]
    if not scales:
        return 0
    flat = torch.cat([s.float() for s in scales])
    dist.all_reduce(flat, dist.ReduceOp.MAX, group=scale_group())
    for scale, synced in zip(scales, flat.split([s.numel() for s in scales])):
        scale.copy_(synced)
    return len(scales)


def scale_group():
    """A process group of all ranks for the outlier scales' all-reduces alone (made once; every rank must call
    it, as ``wrap`` and ``shard_model`` do). On NCCL a group is a communicator with its own stream, so these
    k-float all-reduces, one per QuaffLinear forward, do not queue behind FSDP2's all-gathers or DDP's gradient
    buckets on the default group, with the layer's compute waiting on them."""
    global _SCALE_GROUP
    if _SCALE_GROUP is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _SCALE_GROUP = dist.new_group(list(range(dist.get_world_size())))
    return _SCALE_GROUP


def global_mean(value: float) -> float:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()
    return value


SHARDED_TENSORS = ("w_int8", "w_outlier")  # per QuaffLinear: what FSDP2 shards (the rest is O(in + out), replicated)


def int8_parameters_(model: nn.Module) -> int:
    """Re-register each QuaffLinear's int8 weight and W_o as frozen parameters (``requires_grad=False``) so that
    FSDP2 shards them; names, and so state_dict keys, stay the same. Idempotent; returns the number of layers.
    Call it before ``fully_shard`` where something else shards the model (accelerate's FSDP2 plugin, the Trainer)."""
    from .quaff_linear import QuaffLinear

    layers = [m for m in model.modules() if isinstance(m, QuaffLinear)]
    for module in layers:
        if module.w_int8_t is not None:
            raise QuaffError("a QuaffLinear keeps the transposed int8 copy of int8_backward_, which FSDP2 would "
                             "replicate in full; call int8_backward_(model, False) before sharding")
        for name in SHARDED_TENSORS:
            if name in module._buffers:
                module.register_parameter(name, nn.Parameter(module._buffers.pop(name), requires_grad=False))
    return len(layers)


class _FrozenIntegerSafeParameter(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, nn.Parameter)


class _Parameter(metaclass=_FrozenIntegerSafeParameter):
    """``nn.Parameter`` that leaves an integer tensor without gradient (``nn.Parameter(int8)`` raises otherwise)."""

    def __new__(cls, data=None, requires_grad: bool = True):
        if data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return nn.Parameter(data, requires_grad)


def _fsdp2_integer_parameters() -> None:
    """FSDP2 before torch 2.12 builds each sharded parameter as ``nn.Parameter(dtensor)`` (gradient on) and only
    then copies ``requires_grad``, which fails for the frozen int8 weights ("only Tensors of floating point dtype
    can require gradients"). Where that is the code, its module gets a ``Parameter`` that keeps integer tensors
    gradient-free; later versions pass ``requires_grad`` and are left alone."""
    import inspect
    import types

    from torch.distributed.fsdp._fully_shard import _fsdp_param

    if "requires_grad=param.requires_grad" in inspect.getsource(_fsdp_param.FSDPParam._init_sharded_param):
        return
    if isinstance(_fsdp_param.nn, types.ModuleType):
        names = [k for k in dir(nn) if k != "Parameter" and not k.startswith("__")]
        _fsdp_param.nn = types.SimpleNamespace(**{k: getattr(nn, k) for k in names}, Parameter=_Parameter)


def shard_model(model: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                prefetch: int = 1, shard_head: bool = False, offload_layers: int = 0) -> nn.Module:
    """FSDP2: the int8 weights as frozen parameters, then ``fully_shard`` on every decoder layer (one all-gather
    per layer for compute), on the untied input embedding, and on the root (the final norm, a tied embedding and
    head; an untied frozen head stays whole, below). ``mesh``: a 1-D DeviceMesh (default:
    all ranks on this device type). A ``MixedPrecisionPolicy`` never casts a non-float parameter: int8 stays int8.
    ``prefetch``: each layer starts the all-gathers of the next ``prefetch`` layers (the previous ones in backward)
    when it starts, so they overlap its compute even when the host runs behind the GPU (FSDP2's own, implicit
    prefetch issues a layer's all-gather only when the host reaches that layer); 0 leaves FSDP2's.
    ``shard_head``: an untied, frozen lm_head is sharded as a unit of its own; by default it stays whole on every
    rank (FSDP2 ignores it): sharded, it saves half its size at rest, but gathering it for the loss costs twice
    its size at the step's peak (FSDP2's all-gather buffer next to the whole weight it copies into), and the loss
    is where the peak is (measured at 8B on 2 H100s: README). ``offload_layers``: the last that many decoder
    layers keep their shards (the int8 base, the adapters and, through the optimizer, their state) in pinned host
    memory (FSDP2's ``CPUOffloadPolicy``): copied to the GPU for each all-gather (on FSDP2's copy-in stream, behind
    the previous layer's compute), gradients back to the host, the optimizer steps them there (a fused AdamW, the
    Trainer's default: one kernel per device). The lever for the per-GPU memory that sharding alone cannot reach;
    measured at 8B on 2 H100s (README, "Two GPUs"). The last layers because their backward runs first: with all
    layers offloaded, the step's end waits for the first layer's gradients to reach the host."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise QuaffError(f"found no decoder layers (an nn.ModuleList of blocks) in {type(model).__name__} to shard")
    if not 0 <= offload_layers <= len(layers):
        raise QuaffError(f"offload_layers={offload_layers}: the model has {len(layers)} decoder layers")
    int8_parameters_(model)
    _fsdp2_integer_parameters()
    scale_group()
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    host = host_layers(len(layers), offload_layers)
    for i, layer in enumerate(layers):
        fully_shard(layer, **options, **({"offload_policy": _host_policy()} if i in host else {}))
    # the input embedding its own unit where untied: gathered for its forward only, not for the whole step as the
    # root's parameters are (the root keeps them whole from its forward to the end of backward)
    embedding = _untied(model, "get_input_embeddings")
    if embedding is not None:
        fully_shard(embedding, **options)
    head = _untied(model, "get_output_embeddings")
    root = dict(options)
    if head is not None and not (shard_head or any(p.requires_grad for p in head.parameters())):
        root["ignored_params"], head = set(head.parameters()), None  # whole on every rank, outside FSDP2
    if head is not None:
        fully_shard(head, **options)
        if hasattr(head, "causal_lm_loss"):  # kernels.linear_ce's loss reads the weight outside head.forward
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(head, "causal_lm_loss")
            if hasattr(head, "set_unshard_in_backward"):  # that loss makes its gradient in forward: the backward
                head.set_unshard_in_backward(False)  # needs no weight, and no all-gather at its start
    fully_shard(model, **root)
    if prefetch > 0:  # an explicit prefetch is also freed at once after its copy-out, where FSDP2 keeps an implicit
        # one's all-gather buffer until the next unit's copy-out
        _prefetch(layers + ([head] if head is not None else []), prefetch)
    return model


def host_layers(count: int, offload_layers: int) -> range:
    """The indices of the decoder layers whose shards ``shard_model(offload_layers=...)`` keeps on the host: the last
    ones. Their backward comes first, so their gradients are on the host before the backward ends and the optimizer
    step waits for none of them (with layer 0 there, measured at 8B on 2 H100s, the step's end waited: README)."""
    return range(count - offload_layers, count)


def _host_policy():
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())


def _prefetch(units: list[nn.Module], n: int) -> None:
    """Each FSDP2 unit of ``units`` (in forward order) starts the all-gathers of the next ``n`` in forward and of
    the ``n`` before it in backward."""
    for i, unit in enumerate(units):
        unit.set_modules_to_forward_prefetch(units[i + 1:i + 1 + n])
        unit.set_modules_to_backward_prefetch(units[max(i - n, 0):i][::-1])


def _untied(model: nn.Module, getter: str) -> nn.Module | None:
    """The module ``model.<getter>()`` returns (the input embedding, the output head), where it shares no
    parameter with the rest (a tied lm_head would be a parameter of two units)."""
    get = getattr(model, getter, None)
    module = get() if callable(get) else None
    if module is None:
        return None
    own = {id(p) for p in module.parameters()}
    members = set(module.modules())
    others = {id(p) for m in model.modules() if m not in members for p in m.parameters(recurse=False)}
    return module if own and not own & others else None


def local_bytes(model: nn.Module, dtype: torch.dtype = torch.int8, device: str | None = None) -> int:
    """Bytes of ``dtype`` tensors (parameters and buffers) that this rank holds: its shards under FSDP2;
    ``device``: of those on that device type only ("cuda", or "cpu": host-offloaded shards)."""
    tensors = [_local(t) for t in list(model.parameters()) + list(model.buffers()) if t.dtype == dtype]
    return sum(t.numel() * t.element_size() for t in tensors if device is None or t.device.type == device)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) model, whole and on CPU, under its usual state_dict key; on rank 0 only
    under FSDP2 (the other ranks get {} but must call it too: it all-gathers one tensor at a time)."""
    if world()[1] == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a whole state dict, given on rank 0 ({} elsewhere), into a sharded model: each rank keeps its shard
    (resuming from ``full_state_dict``'s checkpoint). ``strict=False`` loads a part (adapters and scales).
    ``state`` is left as it was (the loader would put the shards in its place)."""
    if world()[1] == 1:
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(model, dict(state), options=options)
