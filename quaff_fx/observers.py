"""Observers as forward pre-hooks on the live model: calibration and XᵀX gathering run the model itself (eager,
at device speed), not the captured graph node by node. The captured graph still names the layers and tells which
ones read one input (siblings); ``capture`` records the model it captured (a weak reference) for this.

A run can stop early: a hook raises ``StopRun`` once the last layer it waits for has seen its input, and the rest
of the forward is skipped (XᵀX of the first layers of a deep model costs a fraction of a forward).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.fx import GraphModule

from .capture import META_KEY, LinearSite, on_device


class StopRun(Exception):
    """Raised by a hook when the run has given every observer what it needs."""


def live_model(gm: GraphModule, sites: list[LinearSite]) -> nn.Module | None:
    """The model ``gm`` was captured from, if it is still alive and still has every site as an FP Linear of the
    same shape (else None: the caller runs the graph instead)."""
    from .hf import fp_linear

    ref = gm.meta.get(META_KEY, {}).get("source")
    model = ref() if ref is not None else None
    if model is None:
        return None
    for site in sites:
        try:
            wb = fp_linear(model.get_submodule(site.module_name))
        except AttributeError:
            return None
        if wb is None or tuple(wb[0].shape) != (site.out_features, site.in_features):
            return None
    return model


@contextmanager
def input_hooks(model: nn.Module, observers: Mapping[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Call ``observers[name](x)`` with the input of module ``name`` on every forward, while in the block."""
    handles = [model.get_submodule(name).register_forward_pre_hook(_hook(fn)) for name, fn in observers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(fn: Callable[[torch.Tensor], None]):
    def pre_hook(module: nn.Module, args: tuple) -> None:
        fn(args[0])

    return pre_hook


@torch.no_grad()
def run(model: nn.Module, batch: Any, device: torch.device) -> None:
    """One forward of ``model`` on a calibration batch (as the captured graph takes it), in eval mode, no KV cache;
    a ``StopRun`` from a hook ends it early."""
    was_training = model.training
    model.eval()
    try:
        x = on_device(batch, device)
        if _takes_input_ids(model):
            kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
            model(input_ids=x, **kwargs)
        else:
            model(x)
    except StopRun:
        pass
    finally:
        model.train(was_training)


def _takes_input_ids(model: nn.Module) -> bool:
    from .capture import is_hf_model

    return is_hf_model(model)
