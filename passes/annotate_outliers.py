"""Annotate every eligible Linear node with its outlier channels (``node.meta["quaff"]``)."""
from __future__ import annotations

from torch.fx import GraphModule

from quaff_fx.annotation import QuaffAnnotation, SmoothSpec, annotation_of
from quaff_fx.calibration import CalibrationStats
from quaff_fx.capture import META_KEY, find_linears, quaff_sites, unmatched_linears
from quaff_fx.config import QuaffConfig
from quaff_fx.errors import QuaffError
from quaff_fx.pipeline import QuaffPass, QuaffPassResult
from quaff_fx.report import PassReport, quaff_bytes
from quaff_fx.smoothing import column_max, group_weights, pick_alpha, sibling_groups


class AnnotateOutliers(QuaffPass):
    """Reads calibration stats, picks each layer's outlier channels with the config's strategy, and
    records them with their max|x| on the Linear node. Layers that are excluded or have no stats are
    listed in the report and left alone."""

    name = "annotate_outliers"

    def __init__(self, stats: CalibrationStats, config: QuaffConfig | None = None):
        self.stats, self.config = stats, config or QuaffConfig(outliers=stats.outlier_config)

    def call(self, gm: GraphModule) -> QuaffPassResult:
        report, modified = PassReport(self.name), False
        sites = find_linears(gm)
        self.stats.check_matches(sites + quaff_sites(gm))
        dtype_bytes = _dtype_bytes(gm)
        calibrated = [s for s in sites if self.config.eligible(s.module_name) and s.module_name in self.stats.layers]
        groups = sibling_groups(calibrated)
        shared: dict = {}  # input node -> the group's one SmoothSpec (siblings share the object)
        for site in sites:
            row = {"node": site.node.name, "module": site.module_name, "in_features": site.in_features,
                   "out_features": site.out_features}
            layer = self.stats.layers.get(site.module_name)
            if not self.config.eligible(site.module_name):
                report.add(**row, status="skipped: excluded by config")
                continue
            if layer is None:
                report.add(**row, status="skipped: no calibration stats")
                continue
            outliers = self.stats.outliers(site.module_name, self.config.outliers)
            gptq = self.config.weight_rounding == "gptq"
            if gptq and self.stats.batches is None:
                raise QuaffError("GPTQ rounding (the default) gathers XᵀX from the calibration batches, which "
                                 "these stats do not hold (read from a file, or calibrated with keep_batches=False): "
                                 "calibrate in the same run (quaff-fx transform does; with --stats it re-reads "
                                 "--calib), or use --weight-rounding nearest")
            alpha = self._alpha(site.module_name)
            smooth = None
            if alpha is not None and self.config.smooth_shared:
                smooth = shared.get(site.input_node)
                if smooth is None or smooth.alpha != alpha:
                    group_max = column_max(group_weights(gm, groups[site.input_node]))
                    smooth = shared[site.input_node] = SmoothSpec(alpha, group_max)
            elif alpha is not None:
                smooth = SmoothSpec(alpha)
            annotation = QuaffAnnotation(site.module_name, outliers, layer.max_abs, layer.max_mean_ratio(), smooth,
                                         gptq)
            if not annotation.same_choice(annotation_of(site.node)):
                site.node.meta[META_KEY] = annotation
                modified = True
            k = outliers.numel()
            before = site.in_features * site.out_features * dtype_bytes
            after = quaff_bytes(site.in_features, site.out_features, k, dtype_bytes)
            report.add(**row, outliers=k, outlier_ratio=k / site.in_features, max_mean_ratio=annotation.max_mean_ratio,
                       smooth_alpha="off" if alpha is None else alpha,
                       act_group=self.config.act_group_of(site.module_name),
                       bytes_before=before, bytes_after=after, bytes_saved=before - after,
                       outlier_bytes=k * site.out_features * dtype_bytes, status="annotated",
                       outlier_channels=outliers.tolist())
        for node in unmatched_linears(gm):
            report.add(node=node.name, module="",
                       status="skipped: not a Linear on a parameter (e.g. a computed weight)")
        return QuaffPassResult(gm, modified, report)

    def _alpha(self, name: str) -> float | None:
        """The layer's smoothing α: the config's, or with "auto" the one of least measured error."""
        if not self.config.searches_smoothing:
            return self.config.smooth_alpha
        errors = self.stats.layers[name].smooth_error
        if errors is None:
            raise QuaffError(f"the calibration stats have no smoothing search for {name!r} (gathered with "
                             "smooth_grid=None or by an older quaff-fx): calibrate again, or choose smoothing yourself "
                             "(--smooth-alpha off or a number)")
        return pick_alpha(errors, self.stats.info["smooth_grid"])


def _dtype_bytes(gm: GraphModule) -> int:
    for p in gm.parameters():
        return p.element_size()
    return 4


def annotations(gm: GraphModule) -> dict[str, QuaffAnnotation]:
    """module name -> annotation, for every annotated node of ``gm`` (rewritten or not)."""
    return {a.module: a for n in gm.graph.nodes if (a := annotation_of(n)) is not None}
