"""Perplexity of a causal LM on a text, in non-overlapping windows, and the models a comparison evaluates."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .data import batches
from .errors import QuaffError


def logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable batch -> logits for a HF causal LM or a captured GraphModule."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    return lambda ids: model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 4, max_batches: int | None = None,
               source: str = "evaluation text") -> dict[str, float]:
    """exp(mean next-token NLL) over every window of ``seq_len`` tokens of ``ids``."""
    check_seq_len(model, seq_len)
    fn = logits_fn(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total, count = 0.0, 0
    try:
        device = _device_of(model)
        for batch in batches(ids, seq_len, batch_size, max_batches, source):
            batch = batch.to(device)
            logits = fn(batch).float()
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
    finally:
        if was_training:
            model.train()
    if not math.isfinite(total):
        raise QuaffError(f"the model produced NaN or Inf logits on the {source}; its weights or inputs are broken")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


def _device_of(model) -> torch.device:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def text_label(path: str | Path | None, kind: str = "heldout") -> str:
    """How a printed number names its text: the file name, or the bundled text's name marked (bundled)."""
    from .data import BUNDLED

    return Path(path).name if path else f"{BUNDLED[kind]} (bundled)"


def describe_perplexity(text: str, seq_len: int, tokens: int) -> str:
    """The words that make two perplexities comparable: which text, which window, how many tokens scored."""
    return f"perplexity on {text}, windows of {seq_len} tokens ({tokens} tokens scored)"


def comparison_set(fp_model: torch.nn.Module, config, calibration=None, tokenizer=None,
                   quaff_model: torch.nn.Module | None = None,
                   progress: bool | Callable = False) -> list[tuple[str, torch.nn.Module]]:
    """(label, model) of the comparison ``eval --compare`` prints: the FP model, naive W8A8 of a copy (every
    eligible Linear int8, no outlier handling) and Quaff (``quaff_model``, or ``quantize_`` of a copy with
    ``config`` on ``calibration``)."""
    import copy

    from .baselines import NaiveW8A8Config
    from .quantize import quantize_

    naive = copy.deepcopy(fp_model)
    quantize_(naive, NaiveW8A8Config(include=config.include, exclude=config.exclude), calibration, tokenizer)
    if quaff_model is None:
        quaff_model = quantize_(copy.deepcopy(fp_model), config, calibration, tokenizer, progress=progress).model
    return [("fp32", fp_model), ("w8a8 naive", naive), ("quaff", quaff_model)]


def check_seq_len(model, seq_len: int) -> None:
    """Windows longer than the model's position limit would fail deep inside it: refuse them here."""
    config = getattr(model, "config", None)
    check_seq_limit(seq_len, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None))


def check_seq_limit(seq_len: int, limit: int | None) -> None:
    if limit is not None and seq_len > int(limit):
        raise QuaffError(f"sequence length {seq_len} is past the model's limit of {limit} positions; "
                         "pass a smaller --seq-len")
