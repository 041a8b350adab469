"""Accuracy sweep: FP32, naive W8A8, SmoothQuant (α), LLM.int8-style decomposition and Quaff over a grid of
strategies and budgets, on several held-out texts, in one run (``quaff-fx sweep``, ``tools/sweep.py``)."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import OutlierConfig, QuaffConfig
from .corpus import BUNDLED, calibration_batches, interleave, source_windows, to_batches
from .data import read_text, tokenize
from .evaluate import perplexity
from .quantize import CalibrationConfig, quantize_


def sweep(model, tokenizer, texts: dict[str, Path | None], strategies: list[str], ratios: list[float],
          alphas: list[float], calib: Path | None = None, seq_len: int = 256, batch_size: int = 2,
          max_batches: int = 16, eval_batches: int | None = None,
          progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per method: perplexity and its delta vs FP32 on each text, their mean and worst text, FP channels,
    FP column bytes. Calibration: ``calib`` (a text or dataset) or, when None, the bundled corpus; ``max_batches``
    batches of ``batch_size`` x ``seq_len`` tokens."""
    from .baselines import LLMInt8Config, NaiveW8A8Config, SmoothQuantConfig

    evals = {name: tokenize(tokenizer, read_text(path, "heldout")) for name, path in texts.items()}
    batches = calibration_batches(tokenizer, (calib,) if calib else (BUNDLED,), max_batches, batch_size, seq_len)
    calib_data = calibration_data(batches)

    def evaluate(m) -> dict[str, float]:
        return {name: perplexity(m, ids, seq_len, 4, eval_batches)["perplexity"] for name, ids in evals.items()}

    rows = [{"method": "fp32", "channels": 0, "fp_bytes": 0, "perplexity": evaluate(model)}]
    default = QuaffConfig.preset("default")
    top = default.outliers
    fast, name = QuaffConfig.preset("fast"), f"quaff {top.strategy} {top.max_ratio:g}"
    grid = ([("w8a8 naive", NaiveW8A8Config())] + [(f"smoothquant a={a}", SmoothQuantConfig(alpha=a)) for a in alphas]
            + [("llm.int8 (|x|>6 in FP)", LLMInt8Config())]
            + [(f"quaff {s} {r:g}", replace(fast, outliers=OutlierConfig(s, 100.0, r)))
               for s in strategies for r in ratios]
            + [(f"{name} + smoothing a={a}", replace(fast, smooth_alpha=a)) for a in alphas]
            + [(f"{name} + smoothing a=auto", replace(fast, smooth_alpha="auto")),
               (f"quaff default (+ smoothing a={default.smooth_alpha} + {default.weight_rounding})", default)])
    for label, cfg in grid:
        m = copy.deepcopy(model)
        result = quantize_(m, cfg, calib_data)
        channels = sum(len(layer.get("outliers", ())) for layer in result.layers.values())
        rows.append({"method": label, "channels": channels, "fp_bytes": fp_column_bytes(m), "perplexity": evaluate(m)})
        progress(f"{label} done")
        del m
    fp = rows[0]["perplexity"]
    for r in rows:
        r["delta"] = {t: r["perplexity"][t] / fp[t] - 1 for t in fp}
        r.update(summarize(r["delta"]))
    return rows


def summarize(deltas: dict[str, float]) -> dict[str, Any]:
    """Mean delta over the texts and the worst text: {"mean": m, "worst": [text, delta]}."""
    worst = max(deltas, key=deltas.get)
    return {"mean": sum(deltas.values()) / len(deltas), "worst": [worst, deltas[worst]]}


def leave_one_source_out(model, sources: dict[str, torch.Tensor], candidates: dict[str, QuaffConfig], num_batches: int,
                         batch_size: int = 2, seq_len: int = 256, eval_batches: int | None = 4,
                         always: dict[str, torch.Tensor] | None = None, folds: list[str] | None = None,
                         progress: Callable[[str], None] = print) -> dict[str, Any]:
    """For each source (token ids by name): calibrate on the windows of all the others (and of ``always``), mixed as
    the bundled corpus is, quantize with each candidate and measure the perplexity delta on the left-out source.
    Candidates with the same outlier selection share one calibration; ``folds`` limits the sources left out.
    Returns per-fold deltas and timings, the mean and worst fold of each candidate, and the candidate chosen (least
    mean delta, then least worst)."""
    results: dict[str, dict[str, Any]] = {}
    for held in folds or list(sources):
        held_ids = sources[held]
        others = [source_windows(ids, seq_len) for name, ids in {**sources, **(always or {})}.items() if name != held]
        calib = calibration_data(to_batches(interleave(others), batch_size, num_batches, f"the sources but {held}"))
        fp = perplexity(model, held_ids, seq_len, 4, eval_batches)["perplexity"]
        fold: dict[str, Any] = {"calib_tokens": calib.num_batches * batch_size * seq_len, "calib_s": 0.0,
                                "delta": {}, "transform_s": {}}
        for group in _by_outlier_config(candidates).values():
            stats = None  # the group's first candidate calibrates (a searching one first), the others reuse its stats
            for label, cfg in sorted(group.items(), key=lambda item: not item[1].searches_smoothing):
                m = copy.deepcopy(model)
                result = quantize_(m, cfg, calib, stats=stats)
                stats = result.stats
                fold["calib_s"] += result.timings.get("calibration", 0.0)
                fold["transform_s"][label] = sum(t for phase, t in result.timings.items() if phase != "calibration")
                fold["delta"][label] = perplexity(m, held_ids, seq_len, 4, eval_batches)["perplexity"] / fp - 1
                progress(f"{held}: {label} {100 * fold['delta'][label]:+.2f}%")
                del m
        results[held] = fold
    summary = {label: summarize({h: f["delta"][label] for h, f in results.items()}) for label in candidates}
    chosen = min(candidates, key=lambda c: (round(summary[c]["mean"], 6), summary[c]["worst"][1]))
    return {"folds": results, "summary": summary, "chosen": chosen}


def _by_outlier_config(candidates: dict[str, QuaffConfig]) -> dict[OutlierConfig, dict[str, QuaffConfig]]:
    groups: dict[OutlierConfig, dict[str, QuaffConfig]] = {}
    for label, cfg in candidates.items():
        groups.setdefault(cfg.outliers, {})[label] = cfg
    return groups


def calibration_data(batches: list[torch.Tensor]):
    """A CalibrationConfig over exactly these batches."""
    return CalibrationConfig(token_batches=tuple(batches), num_batches=len(batches))


def fp_column_bytes(model) -> int:
    """Bytes of the FP outlier weight columns of every QuaffLinear of ``model``."""
    from .quaff_linear import QuaffLinear

    return sum(m.w_outlier.numel() * m.w_outlier.element_size() for m in model.modules() if isinstance(m, QuaffLinear))


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Perplexity delta vs FP channels kept, one marker per method and text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows[1:]:
        for d in r["delta"].values():
            ax.scatter(r["channels"], 100 * d, s=18)
            ax.annotate(r["method"], (r["channels"], 100 * d), fontsize=6)
    ax.set(xlabel="FP outlier channels kept (all layers)", ylabel="perplexity vs FP32 (%)",
           title="W8A8 accuracy vs outlier budget")
    ax.axhline(1.0, ls="--", c="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
