"""Calibration: stream batches through the model and record, for every Linear input and per channel, max|x|,
mean|x| and how often the channel was an outlier (on the model's device). The captured graph names the layers;
the live model runs with observers as forward pre-hooks (``quaff_fx.observers``); only when the live model is gone
is the graph run node by node. Activations are not kept, except a few sampled rows per input when the smoothing
search needs them."""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from .capture import LinearSite, device_of, find_linears, on_device
from .config import OutlierConfig
from .errors import QuaffError
from .observers import input_hooks, live_model, run
from .outliers import batch_counts, select

STATS_FORMAT = "quaff-fx/calibration-stats"
STATS_VERSION = 1
HALVES = 2  # counts are kept per half of the batches, to measure outlier stability between them


@dataclass
class LayerStats:
    """Running per-channel statistics of one Linear's input."""

    in_features: int
    out_features: int
    max_abs: torch.Tensor  # [C] float32
    sum_abs: torch.Tensor  # [C] float64
    counts: torch.Tensor  # [HALVES, C] int64: outlier counts in the first and second half of the batches
    tokens: int = 0
    smooth_error: torch.Tensor | None = None  # [len(info["smooth_grid"])] float64: output error per smoothing α

    @classmethod
    def empty(cls, in_features: int, out_features: int) -> "LayerStats":
        return cls(in_features, out_features, torch.zeros(in_features), torch.zeros(in_features, dtype=torch.float64),
                   torch.zeros(HALVES, in_features, dtype=torch.long))

    def to_(self, device: torch.device | str) -> "LayerStats":
        """Move the running statistics to ``device`` (in place)."""
        self.max_abs, self.sum_abs, self.counts = (t.to(device) for t in (self.max_abs, self.sum_abs, self.counts))
        return self

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / max(self.tokens, 1)).float()

    @property
    def total_counts(self) -> torch.Tensor:
        return self.counts.sum(0)

    def max_mean_ratio(self) -> float:
        """max|x| over mean|x|, both over all channels: how heavy the layer's outliers are."""
        mean = float(self.sum_abs.sum()) / max(self.tokens * self.in_features, 1)
        return float(self.max_abs.max()) / mean if mean > 0 else 0.0


@dataclass
class CalibrationStats:
    """Statistics of every calibrated Linear, keyed by module name, and how they were gathered."""

    layers: dict[str, LayerStats]
    outlier_config: OutlierConfig
    info: dict[str, Any] = field(default_factory=dict)  # batches, seq_len, data source, model name, seconds
    # in memory only, never saved: the calibration batches, from which GPTQ rounding gathers XᵀX chunk by chunk
    # (see quaff_fx.rounding)
    batches: list[Any] | None = field(default=None, repr=False)

    def outliers(self, name: str, cfg: OutlierConfig | None = None) -> torch.Tensor:
        """Outlier channels of layer ``name`` under ``cfg`` (default: the calibration's own config)."""
        layer = self.layers[name]
        return select(layer.total_counts, layer.max_abs, self._check(cfg))

    def half_outliers(self, name: str, half: int, cfg: OutlierConfig | None = None) -> torch.Tensor:
        layer = self.layers[name]
        return select(layer.counts[half], layer.max_abs, self._check(cfg))

    def _check(self, cfg: OutlierConfig | None) -> OutlierConfig:
        """Counts are only valid for the strategy and threshold they were gathered with."""
        if cfg is None:
            return self.outlier_config
        ours = self.outlier_config
        if cfg.strategy != "static" and (cfg.strategy, cfg.threshold) != (ours.strategy, ours.threshold):
            if not (cfg.strategy == ours.strategy == "top_abs"):
                raise QuaffError(f"calibration stats were gathered with strategy {ours.strategy!r} threshold "
                                 f"{ours.threshold}; strategy {cfg.strategy!r} threshold {cfg.threshold} needs a new "
                                 "calibration")
        return cfg

    # -- serialisation: tensors for safetensors, metadata for JSON -------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.max_abs"] = layer.max_abs.contiguous()
            out[f"{name}.sum_abs"] = layer.sum_abs.contiguous()
            out[f"{name}.counts"] = layer.counts.contiguous()
            if layer.smooth_error is not None:
                out[f"{name}.smooth_error"] = layer.smooth_error.contiguous()
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "outlier_config": {**self.outlier_config.__dict__, "channels": list(self.outlier_config.channels)},
            "info": self.info,
            "layers": {name: {"in_features": layer.in_features, "out_features": layer.out_features,
                              "tokens": layer.tokens}
                       for name, layer in self.layers.items()},
        }

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   where: str = "stats") -> "CalibrationStats":
        if meta.get("format") != STATS_FORMAT:
            raise QuaffError(f"{where} is not a quaff-fx calibration stats file (format {meta.get('format')!r})")
        if meta.get("version") != STATS_VERSION:
            raise QuaffError(f"{where} has stats format version {meta.get('version')!r}; this quaff-fx reads "
                             f"version {STATS_VERSION}")
        try:
            saved = meta["outlier_config"]
            cfg = OutlierConfig(**{**saved, "channels": tuple(saved.get("channels", ()))})
            layers = {}
            for name, m in meta["layers"].items():
                c = int(m["in_features"])
                expect = {"max_abs": ((c,), torch.float32), "sum_abs": ((c,), torch.float64),
                          "counts": ((HALVES, c), torch.int64)}
                parts = {}
                for key, (shape, dtype) in expect.items():
                    t = tensors.get(f"{name}.{key}")
                    if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                        got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                        raise QuaffError(f"{where}: tensor '{name}.{key}' should be {shape} {dtype}, is {got}")
                    parts[key] = t
                smooth = tensors.get(f"{name}.smooth_error")
                grid = meta.get("info", {}).get("smooth_grid")
                if smooth is not None and (grid is None or tuple(smooth.shape) != (len(grid),)
                                           or smooth.dtype != torch.float64):
                    raise QuaffError(f"{where}: tensor '{name}.smooth_error' should be ({len(grid or ())},) float64 "
                                     f"(one error per smoothing α of the info's smooth_grid), is {tuple(smooth.shape)} "
                                     f"{smooth.dtype}")
                layers[name] = LayerStats(c, int(m["out_features"]), parts["max_abs"], parts["sum_abs"],
                                          parts["counts"], int(m["tokens"]), smooth)
        except (KeyError, TypeError, ValueError) as exc:
            raise QuaffError(f"{where}: malformed stats metadata ({exc!r})") from None
        return cls(layers, cfg, dict(meta.get("info", {})))

    def check_matches(self, sites: Iterable[LinearSite]) -> None:
        """Stats must fit the model they are applied to: same layers, same widths."""
        by_name = {s.module_name: s for s in sites}
        for name, layer in self.layers.items():
            site = by_name.get(name)
            if site is None:
                raise QuaffError(f"calibration stats name layer {name!r}, which the model does not have")
            if site.in_features != layer.in_features:
                raise QuaffError(f"calibration stats for {name!r} have {layer.in_features} channels, the layer has "
                                 f"{site.in_features} inputs")

    def to_json(self) -> str:
        return json.dumps(self.metadata(), indent=1)


class _Recorder:
    """Feeds each observed Linear's input to its LayerStats (on the input's device) and samples rows per input."""

    def __init__(self, stats: dict[str, LayerStats], cfg: OutlierConfig, rows_per_batch: int = 0):
        self.stats, self.cfg, self.rows_per_batch = stats, cfg, rows_per_batch
        self.half, self.batch_index = 0, 0
        self.batch_of: dict[Node, int] = {}  # the last batch each input node was sampled in (siblings share an input)
        self.rows: dict[Node, list[torch.Tensor]] = {}  # sampled input rows per input node, for the smoothing search

    def record(self, name: str, input_node: Node, x: torch.Tensor) -> None:
        layer = self.stats[name]
        x2d = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x2d).all():
            raise QuaffError(f"the input of {name!r} holds NaN or Inf during calibration; check the model and the "
                             "calibration text")
        if layer.max_abs.device != x2d.device:
            layer.to_(x2d.device)
        ax = x2d.abs()
        torch.maximum(layer.max_abs, ax.amax(0), out=layer.max_abs)
        layer.sum_abs += ax.sum(0, dtype=torch.float64)
        layer.counts[self.half] += batch_counts(x2d, self.cfg)
        layer.tokens += x2d.shape[0]
        if self.rows_per_batch and self.batch_of.get(input_node) != self.batch_index:  # once per input and batch
            self.batch_of[input_node] = self.batch_index
            self.rows.setdefault(input_node, []).append(_spread_rows(x, self.rows_per_batch))


class _GraphObserver(Interpreter):
    """Runs the graph node by node and records each observed Linear's input (when the live model is gone)."""

    def __init__(self, gm: GraphModule, observed: dict[Node, tuple[str, Node]], recorder: _Recorder):
        super().__init__(gm)
        self.observed, self.recorder = observed, recorder

    def run_node(self, n: Node) -> Any:
        seen = self.observed.get(n)
        if seen is not None:
            self.recorder.record(seen[0], seen[1], self.env[seen[1]])
        return super().run_node(n)


def _spread_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of x (as [tokens, C], fp32, CPU) spread evenly over its tokens: deterministic, no RNG."""
    x2d = x.detach().reshape(-1, x.shape[-1])
    idx = torch.linspace(0, x2d.shape[0] - 1, min(n, x2d.shape[0]), device=x2d.device).round().long()
    return x2d.index_select(0, idx).float().cpu()


def calibrate(gm: GraphModule, batches: Iterable[torch.Tensor], cfg: OutlierConfig | None = None,
              layer_filter=None, n_batches: int | None = None, progress=None,
              smooth_grid: Sequence[float | None] | None = None, sample_rows: int = 512,
              keep_batches: bool = True) -> CalibrationStats:
    """Run ``batches`` through ``gm`` and collect per-channel statistics of every Linear input.

    ``layer_filter(module_name) -> bool`` picks the layers (default: all). ``n_batches`` (if known)
    splits the batches into two halves for the stability measure; ``progress`` wraps the iterable.
    ``smooth_grid``: the smoothing strengths whose output error is measured per layer on ``sample_rows``
    rows of its input (see ``quaff_fx.smoothing``; what ``smooth_alpha="auto"`` chooses from, usually
    ``config.SMOOTH_GRID``); None (the default) skips it. ``keep_batches``: keep the batches on the stats
    (in memory, as given) for GPTQ rounding, which gathers XᵀX from them during the rewrite.
    """
    cfg = cfg or OutlierConfig()
    sites = [s for s in find_linears(gm) if layer_filter is None or layer_filter(s.module_name)]
    if not sites:
        raise QuaffError("the model has no eligible Linear layer to calibrate (check --include/--exclude)")
    stats = {s.module_name: LayerStats.empty(s.in_features, s.out_features) for s in sites}
    per_batch = -(-sample_rows // max(n_batches or 1, 1)) if smooth_grid else 0
    recorder = _Recorder(stats, cfg, per_batch)
    model = live_model(gm, sites)
    if model is not None:  # an ordinary run of the live model, observers as forward pre-hooks
        per_layer = {s.module_name: partial(recorder.record, s.module_name, s.input_node) for s in sites}
        hooks = input_hooks(model, per_layer)
        runner, device = partial(run, model), device_of(model)
    else:
        observer = _GraphObserver(gm, {s.node: (s.module_name, s.input_node) for s in sites}, recorder)
        hooks, runner, device = nullcontext(), lambda batch, dev: observer.run(on_device(batch, dev)), device_of(gm)
    seen, kept = 0, []
    iterable = progress(batches) if progress else batches
    with torch.no_grad(), hooks:
        for i, batch in enumerate(iterable):
            if keep_batches:
                kept.append(batch)
            recorder.half = 0 if n_batches is None or i < max(n_batches // 2, 1) else 1
            recorder.batch_index = i
            runner(batch, device)
            seen += 1
    for layer in stats.values():
        layer.to_("cpu")
    if seen == 0:
        raise QuaffError("calibration got no batch")
    result = CalibrationStats(stats, cfg, {"batches": seen}, kept if keep_batches else None)
    if smooth_grid:
        from . import smoothing

        rows = {node: torch.cat(parts)[:sample_rows] for node, parts in recorder.rows.items()}
        smoothing.search(gm, sites, result, rows, cfg, list(smooth_grid))
        most_rows = max((len(r) for r in rows.values()), default=0)
        result.info.update({"smooth_grid": list(smooth_grid), "smooth_rows": min(sample_rows, most_rows)})
    return result
