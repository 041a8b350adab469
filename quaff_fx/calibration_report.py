"""What a calibration found, for people and machines: per-layer outlier channels, per-kind totals, and
how stable the outlier sets are (the Jaccard overlap of the sets chosen on the two halves of the batches)."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from .calibration import CalibrationStats
from .outliers import jaccard

# strategies whose outlier choice depends on OutlierConfig.threshold (top_abs and static ignore it)
THRESHOLD_STRATEGIES = ("mean_times", "zscore")


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10`` (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def stats_summary(stats: CalibrationStats) -> dict[str, Any]:
    """Per-layer outliers (layers in natural order), per-kind totals and the overlap of the two halves' sets."""
    layers, kinds = [], defaultdict(lambda: {"layers": 0, "outliers": 0, "channels": 0, "jaccard": []})
    for name in sorted(stats.layers, key=natural_key):
        layer = stats.layers[name]
        chosen = stats.outliers(name)
        halves = [stats.half_outliers(name, h) for h in (0, 1)]
        # a layer with no outlier in either half says nothing about stability
        stable = stats.info.get("batches", 0) > 1 and (halves[0].numel() or halves[1].numel())
        j = jaccard(*halves) if stable else None
        layers.append({"module": name, "in_features": layer.in_features, "outliers": chosen.numel(),
                       "channels": chosen.tolist(), "max_mean_ratio": round(layer.max_mean_ratio(), 2),
                       "halves_jaccard": j})
        k = kinds[name.rsplit(".", 1)[-1]]
        k["layers"] += 1
        k["outliers"] += chosen.numel()
        k["channels"] += layer.in_features
        if j is not None:
            k["jaccard"].append(j)
    per_kind = {kind: {"layers": v["layers"], "outliers": v["outliers"],
                       "outlier_ratio": v["outliers"] / max(v["channels"], 1),
                       "mean_halves_jaccard": _mean(v["jaccard"])}
                for kind, v in kinds.items()}
    js = [row["halves_jaccard"] for row in layers if row["halves_jaccard"] is not None]
    return {"outlier_config": stats.metadata()["outlier_config"], "info": stats.info, "layers": layers,
            "per_kind": per_kind,
            "totals": {"layers": len(layers), "outliers": sum(row["outliers"] for row in layers),
                       "mean_halves_jaccard": _mean(js)}}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(v: Any) -> Any:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else v)


def describe_outlier_config(oc: dict[str, Any]) -> str:
    """``top_abs, max_ratio 0.01``: the threshold only where the strategy uses one."""
    parts = [oc["strategy"]]
    if oc["strategy"] in THRESHOLD_STRATEGIES:
        parts.append(f"threshold {oc['threshold']}")
    parts.append(f"max_ratio {oc['max_ratio']}")
    return ", ".join(parts)


def render_stats_summary(summary: dict[str, Any], all_layers: bool = False) -> str:
    """The summary as tables: every layer (``all_layers``), then per layer kind, then one line of totals."""
    from tabulate import tabulate

    out = []
    if all_layers:
        out.append(tabulate([[row["module"], row["in_features"], row["outliers"], row["max_mean_ratio"],
                              _fmt(row["halves_jaccard"]), _channels(row["channels"])] for row in summary["layers"]],
                            headers=["module", "in", "outliers", "max/mean", "jaccard(halves)", "channels"]))
    out.append(tabulate([[k, v["layers"], v["outliers"], f"{100 * v['outlier_ratio']:.2f}%",
                          _fmt(v["mean_halves_jaccard"])] for k, v in summary["per_kind"].items()],
                        headers=["layer kind", "layers", "outlier channels", "of inputs", "jaccard(halves)"]))
    t = summary["totals"]
    out.append(f"{t['layers']} layers, {t['outliers']} outlier channels "
               f"({describe_outlier_config(summary['outlier_config'])}); outlier sets of the two halves of the "
               f"batches overlap by Jaccard (layers with outliers) {_fmt(t['mean_halves_jaccard'])} on average")
    return "\n\n".join(out)


def _channels(channels: list[int], shown: int = 8) -> str:
    return ",".join(map(str, channels[:shown])) + (",..." if len(channels) > shown else "")
