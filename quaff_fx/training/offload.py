"""Activation offload: the activations a decoder's layers save for backward (with activation checkpointing, each
layer's input) go to pinned host memory during the forward and come back, one layer ahead, during the backward.

With gradient checkpointing the peak of a LoRA step on a quantized base is at the end of the forward, and what is
there is the int8 base (which FSDP2 shards), the loss, and the checkpointed inputs of every layer (batch × length ×
hidden each, 1 GiB for Llama-3-8B at 2 × 2048): those do not shrink with more GPUs, but they can leave the GPU. The
copies run on a side stream, so the forward does not wait for them (the caching allocator keeps an offloaded tensor's
memory until its copy is done, ``record_stream``); the backward's copy of layer i - 1's input is started when layer
i's is used, so it overlaps layer i's backward. torchtune's ``OffloadActivations`` does the same for its recipes;
this one is scoped to the decoder of a Hugging Face model and keeps parameters and buffers where they are.

    offload = offload_activations_(model)   # before training; the hooks live on the decoder module
    ...
    offload.remove()
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import QuaffError

MIN_BYTES = 1 << 20  # smaller saved tensors (RoPE tables, masks, norms' statistics) stay on the device


class _Stash:
    """One offloaded tensor: its host copy, its device copy once fetched back, and the stash packed before it (the
    one the backward needs next). Stashes link only backwards, so each is freed, its pinned buffer with it, as soon
    as autograd lets its saved tensor go (a cycle would leave them to the garbage collector: new pinned memory,
    which is slow to allocate, every step)."""

    __slots__ = ("host", "device", "copied", "fetched", "on_device", "previous", "__weakref__")

    def __init__(self, previous: "_Stash | None", device: torch.device) -> None:
        self.previous, self.device = previous, device
        self.host = self.copied = self.fetched = self.on_device = None


class ActivationOffload:
    """``saved_tensors_hooks`` that move saved activations of at least ``min_bytes`` to the host (never a tensor
    whose id is in ``keep``: the model's buffers); ``prefetch``:
    how many earlier stashes each unpack starts fetching back. On a device other than CUDA the "host copy" is a
    plain copy on that device (the bookkeeping, for tests; no memory is saved)."""

    def __init__(self, keep: set[int], min_bytes: int = MIN_BYTES, prefetch: int = 1) -> None:
        self.keep, self.min_bytes, self.prefetch = keep, min_bytes, prefetch
        self.last: _Stash | None = None  # during a forward: the stash packed last
        self.stream = None
        self.stats = {"forwards": 0, "offloaded": 0, "offloaded_bytes": 0}
        self._hooks = None
        self.handles: list = []  # the decoder's module hooks (offload_activations_), for remove()

    def remove(self) -> None:
        """Off for good: the decoder's hooks go (a forward in flight keeps its stashes)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def begin(self) -> None:
        """A new forward: the hooks on."""
        self.last = None
        self.stats["forwards"] += 1
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()

    def end(self) -> None:
        self.last = None  # autograd holds the stashes now
        if self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            hooks.__exit__(None, None, None)

    def _offloadable(self, t: torch.Tensor) -> bool:
        # a plain tensor: not a parameter (FSDP2's unsharded ones included) nor a DTensor; not a buffer (``keep``)
        return (type(t) is torch.Tensor and t.is_floating_point() and id(t) not in self.keep
                and t.is_contiguous() and t.numel() * t.element_size() >= self.min_bytes)

    def pack(self, t: torch.Tensor):
        if not self._offloadable(t):
            return t
        stash = self.last = _Stash(self.last, t.device)
        if t.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written
            with torch.cuda.stream(self.stream):
                stash.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                stash.host.copy_(t, non_blocking=True)
                stash.copied = self.stream.record_event()
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        else:
            stash.host = t.detach().clone()
        self.stats["offloaded"] += 1
        self.stats["offloaded_bytes"] += t.numel() * t.element_size()
        return stash

    def unpack(self, stash):
        if not isinstance(stash, _Stash):
            return stash
        self._fetch(stash)
        earlier = stash.previous
        for _ in range(self.prefetch):  # the backward reaches the earlier layers next
            if earlier is None:
                break
            self._fetch(earlier)
            earlier = earlier.previous
        t, stash.on_device = stash.on_device, None  # a second unpack (retain_graph) fetches again
        if stash.fetched is not None:
            current = torch.cuda.current_stream(stash.device)
            current.wait_event(stash.fetched)
            t.record_stream(current)
        return t

    def _fetch(self, stash: _Stash) -> None:
        if stash.on_device is not None:
            return
        if stash.copied is None:  # not CUDA
            stash.on_device = stash.host
            return
        with torch.cuda.stream(self.stream):  # after its own copy out: the same stream
            stash.on_device = stash.host.to(stash.device, non_blocking=True)
            stash.fetched = self.stream.record_event()


def decoder(model: nn.Module) -> nn.Module:
    """The module that holds the decoder layers' ``nn.ModuleList`` (a Hugging Face model's ``model.model``)."""
    from ..distributed import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise QuaffError(f"activation offload: found no decoder layers (an nn.ModuleList of blocks) in "
                         f"{type(model).__name__}")
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and layers[0] in list(child):
                return module
    raise QuaffError("activation offload: the decoder layers' list has no parent module")


def offload_activations_(model: nn.Module, min_bytes: int = MIN_BYTES, prefetch: int = 1,
                         allow_cpu: bool = False) -> ActivationOffload:
    """Offload what the decoder's forward saves for backward (see the module's docstring); hooks on the decoder
    module, on in training with gradients only. Parameters and buffers stay (the buffers' ids, taken now). Returns the
    offloader (its ``stats`` count what went). On a CPU model it is refused unless ``allow_cpu`` (tests)."""
    device = next(model.parameters()).device
    if device.type != "cuda" and not allow_cpu:
        raise QuaffError(f"--offload-activations moves activations from the GPU to host memory; the model is on "
                         f"{device.type}")
    offload = ActivationOffload({id(t) for t in model.buffers()}, min_bytes, prefetch)
    module = decoder(model)

    def before(_module, _args):
        if _module.training and torch.is_grad_enabled():
            offload.begin()

    def after(_module, _args, _output):
        offload.end()

    offload.handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after, always_call=True)]
    return offload
