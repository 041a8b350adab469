"""Replace every annotated Linear node with a call to a QuaffLinear module."""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch
from torch.fx import GraphModule, Node
from torch.profiler import record_function

from quaff_fx.annotation import QuaffAnnotation, annotation_of
from quaff_fx.calibration import CalibrationStats
from quaff_fx.capture import META_KEY, LinearSite, find_linears, module_prefix, weight_and_bias
from quaff_fx.config import QuaffConfig
from quaff_fx.errors import QuaffError
from quaff_fx.hf import set_submodule
from quaff_fx.pipeline import QuaffPass, QuaffPassResult
from quaff_fx.quaff_linear import QuaffLinear
from quaff_fx.report import PassReport, quaff_bytes
from quaff_fx.rounding import chunks, default_budget, gather_xtx, gptq_round_many, seen_hessian


def round_gptq_(gm: GraphModule, sites: list[LinearSite], stats: CalibrationStats,
                build: Callable[[LinearSite], QuaffLinear],
                budget: int | None = None, offload: bool = False) -> tuple[int, dict[str, dict[str, float]]]:
    """Build (``build(site)``) and GPTQ-round the QuaffLinears of ``sites``, gathering XᵀX from the calibration
    batches a chunk of inputs at a time (at most ``budget`` bytes of it, default by device); the layers of a chunk
    are built when it comes and rounded together, batched by input width. Returns the chunks run and the seconds per
    layer (``xtx_s``: its share of its chunk's XᵀX gathering, ``gptq_s``: its share of building and rounding).
    ``offload``: each chunk's layers go to the CPU once rounded."""
    by_input: dict[Node, list[LinearSite]] = {}
    for site in sites:
        by_input.setdefault(site.input_node, []).append(site)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(by_input, key=order.__getitem__)
    device = weight_and_bias(gm, sites[0])[0].device
    parts = chunks(nodes, {n: by_input[n][0].in_features for n in nodes}, budget or default_budget(device))
    seconds: dict[str, dict[str, float]] = {}
    for part in parts:
        t0 = time.perf_counter()
        with record_function("quaff:xtx"):
            xtx = gather_xtx(gm, part, stats.batches)
        t1 = time.perf_counter()
        jobs = [(site, weight_and_bias(gm, site)[0], node) for node in part for site in by_input[node]]
        readers = Counter(node for _, _, node in jobs)
        for group in _batches(jobs):
            with record_function("quaff:gptq"):
                _round_group(group, build, xtx, readers, offload)
        n = len(jobs)
        del xtx, jobs
        xtx_s, gptq_s = (t1 - t0) / n, (time.perf_counter() - t1) / n
        seconds.update({site.module_name: {"xtx_s": xtx_s, "gptq_s": gptq_s} for x in part for site in by_input[x]})
    return len(parts), seconds


def _round_group(group: list, build: Callable[[LinearSite], QuaffLinear], xtx: dict[Node, torch.Tensor],
                 readers: Counter, offload: bool) -> None:
    """Build and round one batch of jobs (site, FP weight, input node); an input's last reader takes its XᵀX over."""
    mods = [build(site) for site, _, _ in group]
    seen = [w.detach().float() if m.inv_smooth is None else w.detach().float() / m.inv_smooth[None, :]
            for (_, w, _), m in zip(group, mods)]
    hessians = []
    for (_, _, node), m in zip(group, mods):
        readers[node] -= 1
        last = readers[node] == 0  # no second copy of the input's XᵀX: H of X̂ is written over it
        hessians.append(seen_hessian(xtx.pop(node) if last else xtx[node], m.input_scale(), inplace=last))
    codes = gptq_round_many(seen, hessians, [m.w_scale for m in mods])
    for mod, c in zip(mods, codes):
        mod.w_int8.copy_(c)
        if offload:
            mod.to("cpu")


GPTQ_BATCH_BYTES = 1 << 30  # float32 weight copies rounded at once (rows padded to the widest of the batch)


def _batches(jobs: list) -> list[list]:
    """Jobs (site, FP weight, input node) of one weight shape rounded together (no padding), at most
    ``GPTQ_BATCH_BYTES`` of weight copies and Hessians per batch (a single larger layer alone)."""
    out: list[list] = []
    by_shape: dict[tuple[int, int], list] = {}
    for job in jobs:
        by_shape.setdefault(tuple(job[1].shape), []).append(job)
    for (rows, width), group in by_shape.items():
        per_layer = (rows * width + width * width) * 4 * 3
        size = max(1, GPTQ_BATCH_BYTES // per_layer)
        out += [group[i:i + size] for i in range(0, len(group), size)]
    return out


class RewriteLinear(QuaffPass):
    """Each annotated ``aten.linear`` / ``nn.Linear`` node becomes ``call_module`` on a QuaffLinear installed
    at the Linear's own path; the FP weight is dropped from the graph module. The QuaffLinear is built from the
    node's annotation (``QuaffLinear.from_annotation``), GPTQ-rounded where it asks, and kept on the annotation
    (``annotation.layer``): the live-model swap takes it from there. ``offload``: keep the built layers on the CPU
    until the swap (on a GPU, the FP model and all its int8 layers never share its memory)."""

    name = "rewrite_linear"

    def __init__(self, config: QuaffConfig | None = None, stats: CalibrationStats | None = None,
                 gptq_memory: int | None = None,
                 offload: bool = False):
        self.config, self.stats, self.gptq_memory, self.offload = config or QuaffConfig(), stats, gptq_memory, offload

    def call(self, gm: GraphModule) -> QuaffPassResult:
        report = PassReport(self.name)
        todo = [(site, a) for site in find_linears(gm) if (a := annotation_of(site.node)) is not None]
        gptq = [(site, a) for site, a in todo if a.gptq]
        seconds: dict[str, dict[str, float]] = {}
        if gptq:  # before any node is rewritten: XᵀX comes from the FP model, whatever the chunking
            if self.stats is None or self.stats.batches is None:
                raise QuaffError("GPTQ rounding needs calibration stats that kept their batches (see AnnotateOutliers)")
            device = weight_and_bias(gm, gptq[0][0])[0].device
            budget = self.gptq_memory or default_budget(device)
            build = {site.node: a for site, a in gptq}
            chunks_run, seconds = round_gptq_(gm, [site for site, _ in gptq], self.stats,
                                              lambda site: self._build(gm, site, build[site.node]), budget,
                                              self.offload)
            report.notes.append(f"GPTQ rounding: {len(gptq)} layers, XᵀX gathered in {chunks_run} chunk(s) of at most "
                                f"{budget >> 20} MiB")
        for site, annotation in todo:
            if not annotation.gptq:
                self._build(gm, site, annotation)
            weight = weight_and_bias(gm, site)[0]
            self._rewrite(gm, site, annotation)
            k = annotation.outliers.numel()
            before = weight.numel() * weight.element_size()
            after = quaff_bytes(site.in_features, site.out_features, k, weight.element_size())
            report.add(node=site.node.name, module=site.module_name, in_features=site.in_features,
                       out_features=site.out_features,
                       outliers=k, bytes_before=before, bytes_after=after, bytes_saved=before - after,
                       outlier_bytes=k * site.out_features * weight.element_size(),
                       act_group=annotation.layer.act_group, status="rewritten",
                       **{key: round(v, 4) for key, v in seconds.get(site.module_name, {}).items()})
        modified = bool(report.rows)
        if modified:
            gm.graph.eliminate_dead_code()
        return QuaffPassResult(gm, modified, report)

    def _build(self, gm: GraphModule, site: LinearSite, annotation: QuaffAnnotation) -> QuaffLinear:
        """The layer's QuaffLinear (rounded to nearest), on its annotation; on the CPU with ``offload`` unless GPTQ
        still has to round it (round_gptq_ offloads it after)."""
        weight, bias = weight_and_bias(gm, site)
        annotation.layer = QuaffLinear.from_annotation(weight, bias, annotation, self.config)
        if self.offload and not annotation.gptq:
            annotation.layer.to("cpu")
        return annotation.layer

    def _rewrite(self, gm: GraphModule, site: LinearSite, annotation: QuaffAnnotation) -> None:
        quaff = annotation.layer
        # an exported graph was captured in eval mode (and cannot be switched); an fx graph keeps its mode
        quaff.train(gm.training and gm.meta.get(META_KEY, {}).get("capture") == "fx")
        path = module_prefix(gm) + site.module_name
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
        annotation.rewritten = True
        node.meta[META_KEY] = annotation
