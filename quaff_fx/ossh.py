"""Outlier spatial stability (the paper's OSSH): do the outlier channels found by calibration stay the
outliers while the model is fine-tuned?

During training, every ``every`` steps, each QuaffLinear's input of that step is reduced to max|x| per
channel; its top-k channels (k = the layer's calibrated outlier count) are compared with the calibrated
set: recall = |calibrated ∩ now| / |calibrated|, Jaccard = |∩| / |∪|.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .quaff_linear import QuaffLinear


class OutlierTracker:
    """Forward hooks on every QuaffLinear with outliers; ``record(step)`` closes a step's observation."""

    def __init__(self, model: torch.nn.Module, every: int = 1):
        self.every = every
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, QuaffLinear) and m.outlier_idx.numel()}
        self.calibrated = {n: set(m.outlier_idx.tolist()) for n, m in self.layers.items()}
        self.current: dict[str, torch.Tensor] = {}
        self.history: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]

    def _hook(self, name: str):
        def observe(module, args):
            x = args[0].detach()
            amax = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            prev = self.current.get(name)
            self.current[name] = amax if prev is None else torch.maximum(prev, amax)
        return observe

    def record(self, step: int, loss: float | None = None) -> None:
        if step % self.every == 0:
            for name, amax in self.current.items():
                calib = self.calibrated[name]
                now = set(amax.topk(len(calib)).indices.tolist())
                inter = len(calib & now)
                self.history[name].append({"step": step, "recall": inter / len(calib),
                                           "jaccard": inter / len(calib | now),
                                           "channels": sorted(now)})
        self.current.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def summary(self) -> dict[str, Any]:
        """Per layer kind: mean recall/Jaccard over layers, at each recorded step and overall."""
        kinds: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for name, rows in self.history.items():
            for r in rows:
                kinds[_kind(name)][r["step"]].append(r["jaccard"])
        per_kind = {k: {"steps": sorted(v), "jaccard": [sum(v[s]) / len(v[s]) for s in sorted(v)]}
                    for k, v in kinds.items()}
        all_j = [r["jaccard"] for rows in self.history.values() for r in rows]
        all_r = [r["recall"] for rows in self.history.values() for r in rows]
        return {"layers": len(self.history), "mean_jaccard": sum(all_j) / max(len(all_j), 1),
                "mean_recall": sum(all_r) / max(len(all_r), 1), "per_kind": per_kind,
                "per_layer": {n: rows for n, rows in self.history.items()}}


def _kind(name: str) -> str:
    """q_proj, down_proj, ...: the layer's own name, past PEFT's ``.base_layer`` wrapper."""
    parts = [p for p in name.split(".") if p != "base_layer"]
    return parts[-1]


def plot(summary: dict[str, Any], path: str | Path, layer: str | None = None) -> Path:
    """PNG: left, mean Jaccard per layer kind over steps; right, one layer's outlier channels per step
    (the calibrated ones drawn as lines), like the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, series in sorted(summary["per_kind"].items()):
        left.plot(series["steps"], series["jaccard"], marker="o", ms=3, label=kind)
    left.set(xlabel="training step", ylabel="Jaccard vs calibrated outliers", ylim=(0, 1.05),
             title=f"outlier stability (mean Jaccard {summary['mean_jaccard']:.2f}, "
                   f"recall {summary['mean_recall']:.2f})")
    left.legend(fontsize=8)
    per_layer = summary["per_layer"]
    if per_layer:
        layer = layer if layer in per_layer else max(per_layer, key=lambda n: len(per_layer[n][0]["channels"]))
        for r in per_layer[layer]:
            right.scatter([r["step"]] * len(r["channels"]), r["channels"], s=6, c="tab:red")
        right.set(xlabel="training step", ylabel="outlier channel index", title=layer)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
