"""Accuracy sweep: FP32, naive W8A8, SmoothQuant (α), LLM.int8-style decomposition and Quaff over a grid of
strategies and budgets, on several held-out texts, in one run (``quaff-fx sweep``, ``tools/sweep.py``)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from .calibration import calibrate
from .capture import capture
from .config import OutlierConfig, QuaffConfig
from .data import batches, count_batches, read_text, tokenize
from .evaluate import perplexity
from .hf import naive_w8a8_
from .transform import transform


def sweep(model, tokenizer, texts: dict[str, Path | None], strategies: list[str], ratios: list[float],
          alphas: list[float], calib: Path | None = None, seq_len: int = 256, batch_size: int = 2, max_batches: int = 4,
          eval_batches: int | None = None, progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per method: perplexity and its delta vs FP32 on each text, FP channels kept, FP column bytes."""
    evals = {name: tokenize(tokenizer, read_text(path, "heldout")) for name, path in texts.items()}
    calib_ids = tokenize(tokenizer, read_text(calib, "calibration"))

    def evaluate(m) -> dict[str, float]:
        return {name: perplexity(m, ids, seq_len, 4, eval_batches)["perplexity"] for name, ids in evals.items()}

    def stats_for(m, cfg: QuaffConfig):
        gm = capture(m)
        n = count_batches(calib_ids, seq_len, batch_size, max_batches)
        return gm, calibrate(gm, batches(calib_ids, seq_len, batch_size, max_batches, "calibration text"), cfg.outliers,
                             cfg.eligible, n_batches=n, **cfg.calibration_options())

    rows = [{"method": "fp32", "channels": 0, "fp_bytes": 0, "perplexity": evaluate(model)}]
    base = QuaffConfig.preset("fast")
    naive = copy.deepcopy(model)
    naive_w8a8_(naive, base)
    rows.append({"method": "w8a8 naive", "channels": 0, "fp_bytes": 0, "perplexity": evaluate(naive)})
    del naive
    from .baselines import llm_int8_, smoothquant_

    _, max_stats = stats_for(model, base)
    for alpha in alphas:
        m = copy.deepcopy(model)
        smoothquant_(m, max_stats, alpha, base.eligible)
        rows.append({"method": f"smoothquant a={alpha}", "channels": 0, "fp_bytes": 0, "perplexity": evaluate(m)})
        progress(f"smoothquant {alpha} done")
    m = copy.deepcopy(model)
    kept = llm_int8_(m, max_stats, base.eligible)
    rows.append({"method": "llm.int8 (|x|>6 in FP)", "channels": kept, "fp_bytes": _fp_bytes(m), "perplexity": evaluate(m)})
    default = QuaffConfig.preset("default")
    top = default.outliers
    grid = ([(f"quaff {s} {r:g}", QuaffConfig.preset("fast", outliers=OutlierConfig(s, 100.0, r))) for s in strategies for r in ratios]
            + [(f"quaff {top.strategy} {top.max_ratio:g} + smoothing a={a}", QuaffConfig.preset("fast", smooth_alpha=a)) for a in alphas]
            + [(f"quaff {top.strategy} {top.max_ratio:g} + smoothing a=auto", QuaffConfig.preset("fast", smooth_alpha="auto")),
               ("quaff default (+ smoothing a=0.6 + gptq)", default)])
    for label, cfg in grid:
        m = copy.deepcopy(model)
        gm, stats = stats_for(m, cfg)
        result = transform(m, stats, cfg, gm=gm)
        rows.append({"method": label, "channels": sum(len(l["outliers"]) for l in result.layers.values()),
                     "fp_bytes": _fp_bytes(m), "perplexity": evaluate(m)})
        progress(f"{label} done")
    fp = rows[0]["perplexity"]
    for r in rows:
        r["delta"] = {t: r["perplexity"][t] / fp[t] - 1 for t in fp}
    return rows


def _fp_bytes(model) -> int:
    from .quaff_linear import QuaffLinear

    return sum(m.w_outlier.numel() * m.w_outlier.element_size() for m in model.modules() if isinstance(m, QuaffLinear))


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Perplexity delta vs FP channels kept, one marker per method and text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows[1:]:
        for text, d in r["delta"].items():
            ax.scatter(r["channels"], 100 * d, s=18)
            ax.annotate(r["method"], (r["channels"], 100 * d), fontsize=6)
    ax.set(xlabel="FP outlier channels kept (all layers)", ylabel="perplexity vs FP32 (%)", title="W8A8 accuracy vs outlier budget")
    ax.axhline(1.0, ls="--", c="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
