"""Replace every annotated Linear node with a call to a QuaffLinear module."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from quaff_fx.capture import META_KEY, find_linears, module_prefix, weight_and_bias
from quaff_fx.calibration import CalibrationStats
from quaff_fx.config import QuaffConfig
from quaff_fx.errors import QuaffError
from quaff_fx.hf import set_submodule
from quaff_fx.modules import QuaffLinear
from quaff_fx.pipeline import QuaffPass, QuaffPassResult
from quaff_fx.report import PassReport, quaff_bytes
from quaff_fx.rounding import gptq_round, seen_hessian


def build_quaff_linear(weight: torch.Tensor, bias: torch.Tensor | None, annotation: dict[str, Any], config: QuaffConfig,
                       stats: CalibrationStats | None = None) -> QuaffLinear:
    """The QuaffLinear for one annotated layer; shared by the graph rewrite and the live-model swap.
    ``stats`` supplies XᵀX where the annotation asks for GPTQ rounding."""
    act_max = None
    if "act_max_all" in annotation:
        act_max = torch.tensor(annotation["act_max_all"])
    elif annotation["outliers"]:
        act_max = torch.zeros(weight.shape[1])
        act_max[annotation["outliers"]] = torch.tensor(annotation["act_max"])
    smooth = annotation.get("smooth_alpha") if "act_max_all" in annotation else None
    w_max = torch.tensor(annotation["smooth_w_max"]) if smooth is not None and "smooth_w_max" in annotation else None
    mod = QuaffLinear.from_weight(weight, bias, annotation["outliers"], act_max, config.weight_granularity,
                                  config.momentum, config.exact_grad, smooth, w_max)
    if annotation.get("gptq"):
        layer = stats.layers.get(annotation["module"]) if stats is not None else None
        if layer is None or layer.hessian is None:
            raise QuaffError(f"layer {annotation['module']!r} asks for GPTQ rounding but no calibration XᵀX was given")
        h = seen_hessian(layer.hessian, mod.inv_smooth, mod.outlier_idx, mod.act_scale)
        seen_weight = weight.detach().float() if mod.inv_smooth is None else weight.detach().float() / mod.inv_smooth[None, :]
        mod.w_int8.copy_(gptq_round(seen_weight, h.to(weight.device), mod.w_scale))
    return mod


class RewriteLinear(QuaffPass):
    """Each annotated ``aten.linear`` / ``nn.Linear`` node becomes ``call_module`` on a QuaffLinear installed
    at the Linear's own path; the FP weight is dropped from the graph module."""

    name = "rewrite_linear"

    def __init__(self, config: QuaffConfig | None = None, stats: CalibrationStats | None = None):
        self.config, self.stats = config or QuaffConfig(), stats

    def call(self, gm: GraphModule) -> QuaffPassResult:
        report = PassReport(self.name)
        prefix = module_prefix(gm)
        for site in find_linears(gm):
            annotation = site.node.meta.get(META_KEY)
            if not annotation or "outliers" not in annotation:
                continue
            weight, bias = weight_and_bias(gm, site)
            quaff = build_quaff_linear(weight, bias, annotation, self.config, self.stats)
            # an exported graph was captured in eval mode (and cannot be switched); an fx graph keeps its mode
            quaff.train(gm.training and gm.meta.get(META_KEY, {}).get("capture") == "fx")
            path = prefix + site.module_name
            set_submodule(gm, path, quaff)
            node = site.node
            if node.op == "call_function":
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(path, (site.input_node,))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                dead = [a for a in node.args if isinstance(a, torch.fx.Node) and a is not site.input_node]
                gm.graph.erase_node(node)
                for a in dead:
                    if not a.users:
                        gm.graph.erase_node(a)
                node = new
            node.meta[META_KEY] = {**annotation, "rewritten": True}
            k = len(annotation["outliers"])
            before = weight.numel() * weight.element_size()
            after = quaff_bytes(site.in_features, site.out_features, k, weight.element_size())
            report.add(node=node.name, module=site.module_name, in_features=site.in_features, out_features=site.out_features,
                       outliers=k, bytes_before=before, bytes_after=after, bytes_saved=before - after,
                       outlier_bytes=k * site.out_features * weight.element_size(), status="rewritten")
        modified = bool(report.rows)
        if modified:
            gm.graph.eliminate_dead_code()
        return QuaffPassResult(gm, modified, report)
