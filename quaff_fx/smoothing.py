"""Per-input choice of the smoothing strength α by measured error (the ``smooth_alpha="auto"`` default).

Quaff's scaling handles the few outlier channels; SmoothQuant-style smoothing of the other channels
(x / s, W · s, s = max|X|^α / max|W|^(1−α)) trades activation range for weight range. Which α is best
differs from layer to layer (on SmolLM2 the q/k/v and gate/up inputs want strong smoothing, some o_proj
and down_proj inputs none at all), so no single α holds everywhere. During calibration a few rows of
each Linear input are kept; afterwards, for each input and each α of the grid (None: no smoothing),
the layers reading that input are quantized exactly as the rewrite would and their outputs compared
with the FP outputs on those rows. The relative error Σ‖Y_q − Y‖² / Σ‖Y‖² is stored per layer in the
calibration stats; the annotate pass picks the α with the smallest one. Layers that read the same
input (q/k/v, gate/up) are measured together and share one s, so they can still be fused.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.fx import GraphModule, Node

from .capture import LinearSite, weight_and_bias
from .config import OutlierConfig
from .quaff_linear import QuaffLinear


def sibling_groups(sites: Sequence[LinearSite]) -> dict[Node, list[LinearSite]]:
    """Sites grouped by the node they read (q/k/v share one input, gate/up another)."""
    groups: dict[Node, list[LinearSite]] = {}
    for site in sites:
        groups.setdefault(site.input_node, []).append(site)
    return groups


def group_weights(gm: GraphModule, members: Sequence[LinearSite]) -> list[torch.Tensor]:
    return [weight_and_bias(gm, s)[0].detach() for s in members]


def column_max(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max|W| per input column over every layer of a group: the weight side of the shared s."""
    return torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)


@torch.no_grad()
def smoothing_errors(gm: GraphModule, members: Sequence[LinearSite], rows: torch.Tensor, act_max: torch.Tensor,
                     outliers: torch.Tensor, cfg_grid: Sequence[float | None],
                     weight_granularity: str = "channel") -> torch.Tensor:
    """Relative output error [len(grid)] of the group's layers, quantized as QuaffLinears with each α, on ``rows``."""
    weights = group_weights(gm, members)
    w_max = column_max(weights)
    x = rows.to(device=weights[0].device, dtype=weights[0].dtype)
    refs = [x @ w.t() for w in weights]
    norm = sum(float(r.float().pow(2).sum()) for r in refs) or 1.0
    errors = []
    for alpha in cfg_grid:
        err = 0.0
        for w, ref in zip(weights, refs):
            q = QuaffLinear.from_weight(w, None, outliers, act_max, weight_granularity, smooth_alpha=alpha,
                                        smooth_w_max=w_max if alpha is not None else None).eval()
            err += float((q(x) - ref).float().pow(2).sum())
        errors.append(err / norm)
    return torch.tensor(errors, dtype=torch.float64)


def pick_alpha(errors: torch.Tensor, grid: Sequence[float | None]) -> float | None:
    """The α of the smallest error (the first one on a tie: no smoothing wins ties)."""
    return grid[int(torch.argmin(errors))]


def search(gm: GraphModule, sites: Sequence[LinearSite], stats, rows: dict[Node, torch.Tensor], cfg: OutlierConfig,
           grid: Sequence[float | None]) -> None:
    """Fill ``stats.layers[name].smooth_error`` for every calibrated site, one measurement per input."""
    for node, members in sibling_groups(sites).items():
        if node not in rows:
            continue
        first = stats.layers[members[0].module_name]
        outliers = stats.outliers(members[0].module_name, cfg)
        errors = smoothing_errors(gm, members, rows[node], first.max_abs, outliers, grid)
        for s in members:
            stats.layers[s.module_name].smooth_error = errors.clone()
