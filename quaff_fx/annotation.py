"""The typed annotation passes leave on a Linear node (``node.meta["quaff"]``): what the annotate pass chose for
the layer, as tensors, and, once built, the QuaffLinear itself, so that later passes and the live-model swap take
it from the graph. Layers reading one input share one ``SmoothSpec`` object (PT2E's SharedQuantizationSpec idea):
the shared smoothing is one thing, not equal copies."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from .capture import META_KEY

if TYPE_CHECKING:
    from .quaff_linear import QuaffLinear


@dataclass(eq=False)
class SmoothSpec:
    """SmoothQuant-style smoothing of one input: strength ``alpha`` and the weight side ``w_max`` (max|W| per input
    column over every layer reading the input; None: each layer uses its own weight)."""

    alpha: float
    w_max: torch.Tensor | None = None

    def same_as(self, other: "SmoothSpec | None") -> bool:
        return other is not None and self.alpha == other.alpha and _same(self.w_max, other.w_max)


@dataclass(eq=False)
class QuaffAnnotation:
    """One annotated Linear: its outlier channels, the calibrated max|x| of every input channel, the smoothing
    (shared by siblings) and whether GPTQ rounds it; ``layer`` is its QuaffLinear once a pass built it."""

    module: str
    outliers: torch.Tensor  # [k] int64
    act_max: torch.Tensor  # [in] float32
    max_mean_ratio: float
    smooth: SmoothSpec | None = None
    gptq: bool = False
    layer: "QuaffLinear | None" = field(default=None, repr=False)
    rewritten: bool = False

    def same_choice(self, other: Any) -> bool:
        """Whether ``other`` records the same choice (the built layer and the rewrite state aside)."""
        if not isinstance(other, QuaffAnnotation):
            return False
        smooth = (self.smooth is None and other.smooth is None) or (
            self.smooth is not None and self.smooth.same_as(other.smooth))
        return (self.module == other.module and self.gptq == other.gptq and self.max_mean_ratio == other.max_mean_ratio
                and smooth and _same(self.outliers, other.outliers) and _same(self.act_max, other.act_max))

    def summary(self) -> dict[str, Any]:
        """Plain values for reports and JSON (no tensors beyond short lists)."""
        return {"module": self.module, "outliers": self.outliers.tolist(), "max_mean_ratio": self.max_mean_ratio,
                "smooth_alpha": None if self.smooth is None else self.smooth.alpha, "gptq": self.gptq}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))


def annotation_of(node: Node) -> QuaffAnnotation | None:
    """The node's QuaffAnnotation, if a pass annotated it."""
    ann = node.meta.get(META_KEY)
    return ann if isinstance(ann, QuaffAnnotation) else None
