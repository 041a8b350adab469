"""torch.compile integration: a backend named "quaff" that runs a pass list over the graph torch.compile
captured, then hands it to inductor.

    model = quaff_fx.transform(model, stats).model      # QuaffLinear in place
    compiled = torch.compile(model, backend="quaff", fullgraph=True)

The default pass list fuses sibling Quaff layers (FuseScales) whose tensors are constant in the captured
graph (scales updated by momentum in training are not, and are left alone). Like inductor's freezing, the
fused weights are snapshots taken at compile time: recompile after changing the base weights in place.
``make_backend(passes)`` builds a backend with a pass list of your own (each ``(gm) -> PassResult``, or a
pass class taking ``constants=`` (like FuseScales), given uninstantiated, to receive the placeholder values).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.fx import GraphModule

from .pipeline import run_passes

LAST_REPORTS: list = []  # reports of the most recent compilation, for inspection and tests


def _default_passes(constants):
    from quaff_fx.passes import FuseScales

    return [FuseScales(constants=constants)]


def make_backend(passes: Sequence[Callable] | None = None, inner: str | Callable = "inductor") -> Callable:
    """A torch.compile backend: run ``passes`` (default: FuseScales) on the captured graph, then ``inner``."""

    def backend(gm: GraphModule, example_inputs: list) -> Callable:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        constants = {n: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor)}
        if passes is None:
            chosen = _default_passes(constants)
        else:
            chosen = [p(constants=constants) if _wants_constants(p) else p for p in passes]
        result = run_passes(gm, chosen)
        LAST_REPORTS[:] = result.reports
        out = result.graph_module
        if result.modified:
            # new constants (fused weights) have no dynamo source: hand on a plain GraphModule
            out = GraphModule(out, out.graph)
        if inner == "eager":
            return out.forward
        if callable(inner):
            return inner(out, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(out, example_inputs)

    return backend


def _wants_constants(p) -> bool:
    return isinstance(p, type) or getattr(p, "wants_constants", False)


quaff_backend = make_backend()
torch._dynamo.register_backend(quaff_backend, name="quaff")
