"""Model → GraphModule.

Hugging Face models go through ``torch.export`` (non-strict, dynamic batch and sequence, logits out,
no KV cache): ``torch.fx.symbolic_trace`` cannot trace them and transformers 5 has no fx tracer.
Plain modules go through ``torch.fx.symbolic_trace``, falling back to export when fx cannot trace.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .errors import QuaffError

WRAPPER_PREFIX = "model."
META_KEY = "quaff"  # namespace of everything quaff-fx writes into node.meta and gm.meta


class HFOutput(nn.Module):
    """Calls a Hugging Face model without a cache and returns its first output (logits or hidden states)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

        self.kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, **self.kwargs)[0]


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


@dataclass(frozen=True)
class LinearSite:
    """One Linear in a captured graph: its node, the qualified name of its module, its shape."""

    node: Node
    module_name: str
    in_features: int
    out_features: int
    has_bias: bool
    transposed: bool = False  # weight stored [in, out] (GPT-2's Conv1D: addmm(bias, x, W))

    @property
    def input_node(self) -> Node:
        return self.node.args[1] if self.transposed else self.node.args[0]


def capture(model: nn.Module, example_inputs: Sequence[Any] | None = None, dynamic: bool = True) -> GraphModule:
    """Capture ``model`` as a GraphModule that computes what the model computes.

    Hugging Face models take ``input_ids`` [batch, seq] and return logits (or the last hidden state for
    encoders). Other modules need ``example_inputs`` only when fx cannot trace them.
    """
    if is_hf_model(model):
        return _capture_hf(model, example_inputs, dynamic)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as fx_error:  # fx fails on data-dependent control flow: try export
        if example_inputs is None:
            raise QuaffError(f"torch.fx could not trace {type(model).__name__} ({fx_error}); pass example_inputs so "
                             "torch.export can") from None
        gm = _export(model, tuple(example_inputs), None, prefix="")
        gm.meta[META_KEY]["source"] = weakref.ref(model)
        return gm
    gm.meta[META_KEY] = {"capture": "fx", "prefix": "", "source": weakref.ref(model)}
    return gm


def _capture_hf(model: nn.Module, example_inputs: Sequence[Any] | None, dynamic: bool) -> GraphModule:
    if example_inputs is None:
        vocab = int(getattr(model.config, "vocab_size", 100))
        example_inputs = (torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)),)
    example_inputs = tuple(t.to(device_of(model)) for t in example_inputs)
    shapes = None
    config = model.config
    limit = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 4096)
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        seq = torch.export.Dim("seq", min=1, max=limit)
        shapes = ({0: batch, 1: seq},)
    was_training = model.training
    model.eval()
    try:
        try:
            gm = _export(HFOutput(model), example_inputs, shapes, prefix=WRAPPER_PREFIX)
        except QuaffError as exc:
            if shapes is None:
                raise
            gm = _export(HFOutput(model), example_inputs, None, prefix=WRAPPER_PREFIX)
            shape = "x".join(str(d) for d in example_inputs[0].shape)
            why = str(exc.__cause__ or exc).splitlines()[0][:160]
            note = f"dynamic shapes did not export ({why}); captured for {shape} inputs"
            print(f"quaff-fx: note: {note}", file=sys.stderr)
            gm.meta[META_KEY]["static_shape_note"] = note
        gm.meta[META_KEY].update(max_seq_len=limit, source=weakref.ref(model))
        return gm
    finally:
        model.train(was_training)


def _export(module: nn.Module, args: tuple, shapes: Any, prefix: str) -> GraphModule:
    try:
        ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise QuaffError(f"torch.export could not capture {type(module).__name__}: {str(exc).splitlines()[0]}") from exc
    gm = ep.module()
    gm.meta[META_KEY] = {"capture": "export", "prefix": prefix}
    return gm


def on_device(batch: Any, device: torch.device) -> Any:
    """A calibration batch moved to ``device`` (a tensor; other batches are passed as they are)."""
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def module_prefix(gm: GraphModule) -> str:
    return gm.meta.get(META_KEY, {}).get("prefix", "")


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def find_linears(gm: GraphModule) -> list[LinearSite]:
    """Every Linear of the graph, matched by op and target: ``aten.linear`` / ``F.linear`` on a
    parameter, or ``call_module`` on an ``nn.Linear``."""
    prefix = module_prefix(gm)
    sites = []
    for node in gm.graph.nodes:
        site = _linear_site(gm, node, prefix)
        if site is not None:
            sites.append(site)
    return sites


LINEAR_TARGETS = (torch.ops.aten.linear.default, torch.nn.functional.linear, torch.ops.aten.addmm.default)


def unmatched_linears(gm: GraphModule) -> list[Node]:
    """Linear-like nodes that are not layers quaff-fx can quantize (a computed weight, say); reported, left alone."""
    matched = {s.node for s in find_linears(gm)}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS and n not in matched]


def quaff_sites(gm: GraphModule) -> list[LinearSite]:
    """The nodes that already call a QuaffLinear (after the rewrite)."""
    from .quaff_linear import QuaffLinear

    prefix = module_prefix(gm)
    return [LinearSite(n, _strip(n.target, prefix), m.in_features, m.out_features, m.bias is not None)
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(m := gm.get_submodule(n.target), QuaffLinear)]


def _linear_site(gm: GraphModule, node: Node, prefix: str) -> LinearSite | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.Linear:
            return LinearSite(node, _strip(node.target, prefix), mod.in_features, mod.out_features,
                              mod.bias is not None)
        return None
    if node.op == "call_function" and node.target == torch.ops.aten.addmm.default:
        return _addmm_site(gm, node, prefix)
    if node.op != "call_function" or node.target not in (torch.ops.aten.linear.default, torch.nn.functional.linear):
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(weight, Node) or weight.op != "get_attr" or not weight.target.endswith(".weight"):
        return None  # a linear on a computed weight is no layer we can quantize
    w = attr(gm, weight.target)
    if w.dim() != 2:
        return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    module_name = _strip(weight.target[: -len(".weight")], prefix)
    return LinearSite(node, module_name, int(w.shape[1]), int(w.shape[0]), bias is not None)


def _addmm_site(gm: GraphModule, node: Node, prefix: str) -> LinearSite | None:
    """``addmm(bias, x, W)`` on parameters of one module: a Linear whose weight is stored [in, out]."""
    if len(node.args) != 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias, weight = node.args[0], node.args[2]
    if not all(isinstance(a, Node) and a.op == "get_attr" for a in (bias, weight)):
        return None
    if not weight.target.endswith(".weight"):
        return None
    module = weight.target[: -len(".weight")]
    w = attr(gm, weight.target)
    if bias.target != module + ".bias" or w.dim() != 2:
        return None
    return LinearSite(node, _strip(module, prefix), int(w.shape[0]), int(w.shape[1]), True, transposed=True)


def attr(gm: GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` node's dotted target names."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def weight_and_bias(gm: GraphModule, site: LinearSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The FP weight [out, in] and bias of a Linear site."""
    node = site.node
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return mod.weight, mod.bias
    if site.transposed:
        return attr(gm, node.args[2].target).t(), attr(gm, node.args[0].target)
    weight = attr(gm, node.args[1].target)
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias = attr(gm, bias_node.target) if isinstance(bias_node, Node) and bias_node.op == "get_attr" else None
    return weight, bias
