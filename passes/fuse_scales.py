"""Scale fusion: Quaff layers that read one input share one outlier set, one scale vector and one
quantized activation; optionally a norm before them absorbs 1/S (inference only).

Siblings are concatenated into one QuaffLinear (one int8 GEMM over N_q + N_k + N_v outputs) followed by a
split. That was chosen over "quantize once, GEMM three times" because it also turns three small GEMMs into
one larger one (better use of the int8 units) and needs no new op: the activation is scaled, quantized and
its outlier columns gathered once instead of once per member. The outlier set is the union of the members';
where a channel was an outlier for only some members, the others' correction columns come from their
dequantized int8 weight, so each member computes at least as precisely as before. A channel's scale is the
largest of its members' scales (any S >= 1 keeps the correction exact; a larger one shrinks the outlier more).

Works on exported graphs (``call_module`` QuaffLinear nodes) and on the graphs torch.compile hands its
backends (``quaff::linear`` calls whose tensors are placeholders with known constant values).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from quaff_fx.capture import META_KEY, attr, module_prefix
from quaff_fx.errors import QuaffError
from quaff_fx.pipeline import QuaffPass, QuaffPassResult
from quaff_fx.quaff_linear import QuaffLinear
from quaff_fx.report import PassReport

QUAFF_OPS = (torch.ops.quaff.linear.default, torch.ops.quaff.linear)  # torch.compile's graphs hold the packet


@dataclass
class QuaffSite:
    node: Node
    module: QuaffLinear  # the node's module, or a view over the op's constant arguments
    name: str


def quaff_sites(gm: GraphModule, constants: dict[Node, torch.Tensor] | None = None) -> list[QuaffSite]:
    """Every Quaff layer of the graph whose tensors are known."""
    prefix, sites = module_prefix(gm), []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mod := gm.get_submodule(node.target), QuaffLinear):
            sites.append(QuaffSite(node, mod, _module_name(node) or node.target[len(prefix):]))
        elif node.op == "call_function" and node.target in QUAFF_OPS:
            args = op_arguments(node)[1:]  # from_parts takes them in the op's order
            values = [_constant(gm, a, constants or {}) if isinstance(a, Node) else a for a in args]
            if all(v is not None for v, a in zip(values, args) if a is not None):  # every tensor given is known
                sites.append(QuaffSite(node, QuaffLinear.from_parts(*values), _op_site_name(gm, args[0], node)))
    return sites


def _module_name(node: Node) -> str | None:
    """The module name a pass recorded on the node (its QuaffAnnotation, or a fused node's record)."""
    meta = node.meta.get(META_KEY)
    return getattr(meta, "module", None) or (meta.get("module") if isinstance(meta, dict) else None)


def _op_site_name(gm: GraphModule, w_int8: Node, node: Node) -> str:
    """The module a quaff::linear call came from: the path of its int8 weight attribute, when it has one."""
    if w_int8.op == "get_attr" and w_int8.target.endswith(".w_int8"):
        name = w_int8.target[: -len(".w_int8")]
        prefix = module_prefix(gm)
        return name[len(prefix):] if prefix and name.startswith(prefix) else name
    return node.name


_OP_PARAMS = ("x", "w_int8", "w_scale", "outlier_idx", "act_scale", "w_outlier", "bias", "prescaled", "exact_grad",
              "inv_smooth", "w_int8_t", "act_group")
_OP_DEFAULTS = {"bias": None, "prescaled": False, "exact_grad": False, "inv_smooth": None, "w_int8_t": None,
                "act_group": 0}


def op_arguments(node: Node) -> list[Any]:
    """The twelve arguments of a quaff::linear call, positional, defaults filled in (export drops them)."""
    given = dict(zip(_OP_PARAMS, node.args)) | dict(node.kwargs)
    return [given.get(p, _OP_DEFAULTS.get(p)) for p in _OP_PARAMS]


def _constant(gm: GraphModule, arg: Any, constants: dict[Node, torch.Tensor]) -> torch.Tensor | None:
    if not isinstance(arg, Node):
        return None
    if arg.op == "get_attr":
        return attr(gm, arg.target)
    if arg.op == "placeholder" and arg in constants and not _mutated(arg):
        return constants[arg]
    return None


def _mutated(node: Node) -> bool:
    """Whether the graph writes into ``node`` (a scale updated by momentum is no constant)."""
    for user in node.users:
        name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
        if user.args and user.args[0] is node and name.endswith("_") and not name.startswith("_"):
            return True
    return False


def fuse_modules(members: list[QuaffLinear]) -> QuaffLinear:
    """One QuaffLinear computing all ``members`` (same input) side by side, with the union outlier set and their
    activation group size (members of different group sizes are refused: one quantization cannot serve both)."""
    first = members[0]
    if len({m.act_group for m in members}) > 1:
        raise QuaffError(f"cannot fuse layers of different act_group ({sorted({m.act_group for m in members})}): "
                         "they quantize their shared input differently; fuse only layers of one act_group")
    scale: dict[int, float] = {}
    for m in members:
        for c, s in zip(m.outlier_idx.tolist(), m.act_scale.tolist()):
            scale[c] = max(scale.get(c, 1.0), s)
    union = torch.tensor(sorted(scale), dtype=torch.long)
    has_bias = any(m.bias is not None for m in members)
    fused = QuaffLinear(first.in_features, sum(m.out_features for m in members), union.numel(), has_bias,
                        first.w_outlier.dtype, first.w_int8.device, first.momentum, first.exact_grad,
                        smoothed=first.inv_smooth is not None, act_group=first.act_group)
    with torch.no_grad():
        if first.inv_smooth is not None:  # _fusable: every member divides x by the same s
            fused.inv_smooth.copy_(first.inv_smooth)
        fused.w_int8.copy_(torch.cat([m.w_int8 for m in members]))
        fused.w_scale.copy_(torch.cat([m.w_scale for m in members]))
        fused.outlier_idx.copy_(union)
        fused.w_outlier.copy_(torch.cat([_columns(m, union) for m in members]))
        fused.act_scale.copy_(torch.tensor([scale[c] for c in union.tolist()], dtype=torch.float32))
        if has_bias:
            biases = [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=fused.bias.dtype)
                      for m in members]
            fused.bias.copy_(torch.cat(biases))
    return fused.int8_backward_(first.w_int8_t is not None).train(first.training)


def _columns(module: QuaffLinear, channels: torch.Tensor) -> torch.Tensor:
    """Weight columns [N, len(channels)]: the FP copy where the module kept one, else the dequantized int8."""
    cols = (module.w_int8.index_select(1, channels).float() * module.w_scale[:, None]).to(module.w_outlier.dtype)
    own = {c: i for i, c in enumerate(module.outlier_idx.tolist())}
    for j, c in enumerate(channels.tolist()):
        if c in own:
            cols[:, j] = module.w_outlier[:, own[c]]
    return cols


class FuseScales(QuaffPass):
    """Fuse sibling Quaff layers; with ``fold_norms`` (inference with frozen scales) fold 1/S into an
    RMSNorm weight (``mul(weight, x)``) or a LayerNorm's weight and bias that feeds only one Quaff layer.
    ``constants`` maps placeholders to their tensors (what a torch.compile backend is given)."""

    name = "fuse_scales"

    def __init__(self, fold_norms: bool = False, constants: dict[Node, torch.Tensor] | None = None):
        self.fold_norms, self.constants = fold_norms, constants

    def call(self, gm: GraphModule) -> QuaffPassResult:
        report = PassReport(self.name)
        groups: dict[Node, list[QuaffSite]] = {}
        for site in quaff_sites(gm, self.constants):
            groups.setdefault(site.node.args[0], []).append(site)
        for x, siblings in groups.items():
            if len({s.module.act_group for s in siblings}) > 1:
                report.notes.append(f"{', '.join(s.name for s in siblings)} read one input with different act_group "
                                    f"({', '.join(str(s.module.act_group) for s in siblings)}): only siblings of "
                                    "one act_group are fused")
            for members in _classes(siblings):
                if len(members) > 1:
                    self._fuse(gm, x, members, report)
        if self.fold_norms:
            for site in quaff_sites(gm, self.constants):
                self._fold(gm, site, report)
        modified = bool(report.rows)
        if modified:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
        return QuaffPassResult(gm, modified, report)

    def _fuse(self, gm: GraphModule, x: Node, members: list[QuaffSite], report: PassReport) -> None:
        mods = [s.module for s in members]
        fused = fuse_modules(mods)
        parent, leaves = _fused_name(members)
        path = f"{module_prefix(gm)}{parent}.fused_{'_'.join(leaves)}" if parent else f"_quaff_fused_{'_'.join(leaves)}"
        gm.add_submodule(path, fused)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = min((s.node for s in members), key=order.__getitem__)
        with gm.graph.inserting_before(first):
            new = gm.graph.call_module(path, (x,))
            sizes = [m.out_features for m in mods]
            split = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (new, sizes, -1))
            parts = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(members))]
        member_annotations = [site.node.meta.get(META_KEY) for site in members]
        for site, part in zip(members, parts):
            part.meta = dict(site.node.meta)
            site.node.replace_all_uses_with(part)
            gm.graph.erase_node(site.node)
        module_name = path[len(module_prefix(gm)):] if path.startswith(module_prefix(gm)) else path
        new.meta[META_KEY] = {"fused": True, "module": module_name, "members": [s.name for s in members],
                              "member_annotations": member_annotations,
                              "outliers": fused.outlier_idx.tolist()}
        before = sum(_bytes(m) for m in mods)
        report.add(node=new.name, module=module_name, in_features=fused.in_features, out_features=fused.out_features,
                   members=",".join(leaves), outliers=fused.outlier_idx.numel(), act_group=fused.act_group,
                   ops_removed=len(members) - 1,
                   bytes_before=before, bytes_after=_bytes(fused), bytes_saved=before - _bytes(fused), status="fused")

    def _fold(self, gm: GraphModule, site: QuaffSite, report: PassReport) -> None:
        module, node, norm = site.module, site.node, site.node.args[0]
        if module.prescaled or module.training or not module.outlier_idx.numel() or len(norm.users) != 1:
            return
        targets = _norm_params(gm, norm, module.in_features, self.constants or {})
        if targets is None:
            return
        inv = module.input_scale()  # the norm absorbs the smoothing too
        for arg_pos, tensor in targets:
            name = f"_quaff_folded_{norm.name}_{arg_pos}"
            gm.register_buffer(name, (tensor.detach().float() * inv.to(tensor.device)).to(tensor.dtype))
            with gm.graph.inserting_before(norm):
                norm.update_arg(arg_pos, gm.graph.get_attr(name))
        if node.op == "call_module":
            owned = _graph_owned(module)
            owned.prescaled = True
            owned._buffers["inv_smooth"] = None  # folded into the norm with 1/S
            gm.add_submodule(node.target, owned)
        else:
            args = op_arguments(node)
            args[_OP_PARAMS.index("prescaled")], args[_OP_PARAMS.index("inv_smooth")] = True, None  # folded with 1/S
            node.args, node.kwargs = tuple(args), {}
        report.add(node=node.name, module=site.name, in_features=module.in_features, out_features=module.out_features,
                   outliers=module.outlier_idx.numel(), act_group=module.act_group, ops_removed=1,
                   folded_into=norm.name,
                   bytes_before=0, bytes_after=0, bytes_saved=0, status="fused")


def _classes(siblings: list[QuaffSite]) -> list[list[QuaffSite]]:
    """The siblings split into groups that can be fused (same flags, same smoothing), in graph order."""
    classes: list[list[QuaffSite]] = []
    for site in siblings:
        for members in classes:
            if _fusable(members[0].module, site.module):
                members.append(site)
                break
        else:
            classes.append([site])
    return classes


def _fusable(a: QuaffLinear, b: QuaffLinear) -> bool:
    """Whether two layers of one input can be one: the same flags, activation group size and smoothing factor."""
    def flags(m: QuaffLinear) -> tuple:
        return (m.w_outlier.dtype, m.momentum, m.exact_grad, m.prescaled, m.in_features, m.training, m.w_int8_t is None,
                m.act_group)

    sa, sb = a.inv_smooth, b.inv_smooth
    return flags(a) == flags(b) and (sa is None) == (sb is None) and (sa is None or torch.equal(sa, sb))


def _fused_name(members: list[QuaffSite]) -> tuple[str, list[str]]:
    """The common parent of the members' module names and their leaf names."""
    parts = [s.name.rpartition(".") for s in members]
    parents = {p[0] for p in parts}
    return (parents.pop() if len(parents) == 1 else ""), [p[2] for p in parts]


def _norm_params(gm: GraphModule, norm: Node, width: int, constants) -> list[tuple[int, torch.Tensor]] | None:
    """(argument position, tensor) of the per-channel parameters of an RMSNorm ``mul(weight, x)`` or a
    ``layer_norm(x, shape, weight, bias)`` node; None for anything else."""
    def param(arg) -> torch.Tensor | None:
        t = _constant(gm, arg, constants)
        return t if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == width else None

    if norm.op != "call_function":
        return None
    if norm.target == torch.ops.aten.mul.Tensor:
        found = [(i, t) for i, t in ((i, param(a)) for i, a in enumerate(norm.args[:2])) if t is not None]
        return found if len(found) == 1 else None
    if norm.target == torch.ops.aten.layer_norm.default and len(norm.args) >= 4:
        found = [(i, param(norm.args[i])) for i in (2, 3)]
        return found if all(t is not None for _, t in found) else None
    return None


def _graph_owned(module: QuaffLinear) -> QuaffLinear:
    """A QuaffLinear of the graph's own that shares ``module``'s tensors but not its flags."""
    owned = copy.copy(module)
    owned._buffers, owned._parameters = dict(module._buffers), dict(module._parameters)
    owned._modules = dict(module._modules)
    return owned


def _bytes(module: QuaffLinear) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers())
