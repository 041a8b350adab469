"""Replace every annotated Linear node with a call to a QuaffLinear module."""
from __future__ import annotations

import json
import time
from typing import Any

import torch
from torch.fx import GraphModule, Node

from quaff_fx.capture import META_KEY, LinearSite, find_linears, module_prefix, weight_and_bias
from quaff_fx.calibration import CalibrationStats
from quaff_fx.config import QuaffConfig
from quaff_fx.errors import QuaffError
from quaff_fx.hf import set_submodule
from quaff_fx.quaff_linear import QuaffLinear
from quaff_fx.pipeline import QuaffPass, QuaffPassResult
from quaff_fx.report import PassReport, quaff_bytes
from quaff_fx.rounding import GPTQ_MEMORY, chunks, gather_xtx, gptq_round, seen_hessian


def build_quaff_linear(weight: torch.Tensor, bias: torch.Tensor | None, annotation: dict[str, Any], config: QuaffConfig,
                       stats: CalibrationStats | None = None, round_gptq: bool = True) -> QuaffLinear:
    """The QuaffLinear for one annotated layer; shared by the graph rewrite and the live-model swap. Where the
    annotation asks for GPTQ rounding, the int8 codes the graph rewrite rounded for this layer are taken from
    ``stats`` (``round_gptq=False``: left at round-to-nearest, for the caller to round)."""
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
    if annotation.get("gptq") and round_gptq:
        key, codes = (stats.gptq_codes.get(annotation["module"]) if stats is not None else None) or (None, None)
        if key != _codes_key(annotation, config):
            raise QuaffError(f"layer {annotation['module']!r} asks for GPTQ rounding, which the graph rewrite does (it needs the "
                             "graph to gather XᵀX): run RewriteLinear with these stats first, or use weight_rounding='nearest'")
        mod.w_int8.copy_(codes)
    return mod


def _codes_key(annotation: dict[str, Any], config: QuaffConfig) -> str:
    """What the rounded codes depend on: the annotation (outliers, scales, smoothing) and the weight granularity."""
    return json.dumps([{k: v for k, v in annotation.items() if k != "rewritten"}, config.weight_granularity], sort_keys=True)


def round_gptq_(gm: GraphModule, layers: list[tuple[LinearSite, torch.Tensor, QuaffLinear]], stats: CalibrationStats,
                budget: int = GPTQ_MEMORY) -> tuple[int, dict[str, dict[str, float]]]:
    """GPTQ-round the int8 weights of ``layers`` (site, FP weight, its QuaffLinear) in place, gathering XᵀX from
    the calibration batches on the not yet rewritten ``gm`` a chunk of inputs at a time; returns the chunks run and
    the seconds per layer (``xtx_s``: its share of its chunk's XᵀX gathering, ``gptq_s``: its rounding)."""
    by_input: dict[Node, list[tuple[LinearSite, torch.Tensor, QuaffLinear]]] = {}
    for layer in layers:
        by_input.setdefault(layer[0].input_node, []).append(layer)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(by_input, key=order.__getitem__)
    parts = chunks(nodes, {n: by_input[n][0][0].in_features for n in nodes}, budget)
    seconds: dict[str, dict[str, float]] = {}
    for part in parts:
        t0 = time.perf_counter()
        xtx = gather_xtx(gm, part, stats.batches)
        share = (time.perf_counter() - t0) / sum(len(by_input[n]) for n in part)
        for node in part:
            h_x = xtx.pop(node)
            for site, weight, mod in by_input[node]:
                t1 = time.perf_counter()
                h = seen_hessian(h_x, mod.input_scale(torch.float64))
                seen = weight.detach().float() if mod.inv_smooth is None else weight.detach().float() / mod.inv_smooth[None, :]
                mod.w_int8.copy_(gptq_round(seen, h.to(weight.device), mod.w_scale))
                seconds[site.module_name] = {"xtx_s": share, "gptq_s": time.perf_counter() - t1}
            del h_x
    return len(parts), seconds


class RewriteLinear(QuaffPass):
    """Each annotated ``aten.linear`` / ``nn.Linear`` node becomes ``call_module`` on a QuaffLinear installed
    at the Linear's own path; the FP weight is dropped from the graph module."""

    name = "rewrite_linear"

    def __init__(self, config: QuaffConfig | None = None, stats: CalibrationStats | None = None, gptq_memory: int = GPTQ_MEMORY):
        self.config, self.stats, self.gptq_memory = config or QuaffConfig(), stats, gptq_memory

    def call(self, gm: GraphModule) -> QuaffPassResult:
        report = PassReport(self.name)
        prefix = module_prefix(gm)
        todo = []
        for site in find_linears(gm):
            annotation = site.node.meta.get(META_KEY)
            if annotation and "outliers" in annotation:
                weight, bias = weight_and_bias(gm, site)
                todo.append((site, annotation, weight, build_quaff_linear(weight, bias, annotation, self.config, round_gptq=False)))
        gptq = [(site, weight, quaff) for site, annotation, weight, quaff in todo if annotation.get("gptq")]
        if gptq:  # before any node is rewritten: XᵀX comes from the FP graph, whatever the chunking
            if self.stats is None or self.stats.batches is None:
                raise QuaffError("GPTQ rounding needs calibration stats that kept their batches (see AnnotateOutliers)")
            chunks_run, seconds = round_gptq_(gm, gptq, self.stats, self.gptq_memory)
            report.notes.append(f"GPTQ rounding: {len(gptq)} layers, XᵀX gathered in {chunks_run} chunk(s) of at most "
                                f"{self.gptq_memory >> 20} MiB")
            self.stats.gptq_codes.update({site.module_name: (_codes_key(site.node.meta[META_KEY], self.config), quaff.w_int8)
                                          for site, _, quaff in gptq})
        else:
            seconds = {}
        for site, annotation, weight, quaff in todo:
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
                       outlier_bytes=k * site.out_features * weight.element_size(), status="rewritten",
                       **{k: round(v, 4) for k, v in seconds.get(site.module_name, {}).items()})
        modified = bool(report.rows)
        if modified:
            gm.graph.eliminate_dead_code()
        return QuaffPassResult(gm, modified, report)
