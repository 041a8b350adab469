"""Outlier-channel selection strategies.

Two steps, so that memory stays bounded during calibration: ``batch_counts`` reduces one batch of a
Linear's inputs to a per-channel count of how often each channel was an outlier, and ``select`` turns
the counts summed over batches into the layer's outlier channels (most frequent first, capped).
"""
from __future__ import annotations

import torch

from .config import OutlierConfig


def batch_counts(x: torch.Tensor, cfg: OutlierConfig) -> torch.Tensor:
    """Per-channel outlier counts [C] (int64) for one batch ``x`` [tokens, C] of a Linear's inputs.

    mean_times and zscore count tokens (as the original Quaff code does), top_abs counts 1 per batch for
    each of the ``cap`` channels with the largest max|x|, static marks the user's channels.
    """
    channels = x.shape[-1]
    ax = x.abs()
    if cfg.strategy == "mean_times":
        return (ax > ax.mean() * cfg.threshold).sum(0)
    if cfg.strategy == "zscore":
        std = x.std().clamp_min(torch.finfo(x.dtype).tiny)
        return ((x - x.mean()).abs() / std > cfg.threshold).sum(0)
    counts = torch.zeros(channels, dtype=torch.long, device=x.device)
    if cfg.strategy == "top_abs":
        k = min(cfg.cap(channels), channels)
        if k > 0:
            counts[ax.amax(0).topk(k).indices] = 1
        return counts
    static = [c for c in cfg.channels if c < channels]
    counts[static] = 1
    return counts


def select(counts: torch.Tensor, max_abs: torch.Tensor, cfg: OutlierConfig) -> torch.Tensor:
    """Outlier channels (ascending int64) from summed ``counts`` [C]: channels with a count above zero,
    the most frequent kept up to the per-layer cap (ties go to the larger max|x|, then the lower index).
    The static strategy keeps the user's list whole."""
    channels = counts.numel()
    if cfg.strategy == "static":
        return torch.tensor(sorted({c for c in cfg.channels if c < channels}), dtype=torch.long)
    candidates = torch.nonzero(counts > 0).flatten()
    if candidates.numel() == 0:
        return candidates
    keys = sorted(candidates.tolist(), key=lambda c: (-int(counts[c]), -float(max_abs[c]), c))
    return torch.tensor(sorted(keys[: cfg.cap(channels)]), dtype=torch.long)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two channel sets; two empty sets agree fully (1.0)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)
