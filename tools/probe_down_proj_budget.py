"""Probe for issue 22 (not a default): a bigger outlier budget for down_proj only, leave-one-source-out over the corpus.

    python tools/probe_down_proj_budget.py [OUT.json]

The config has one outlier budget for every layer, so the probe calibrates each candidate with its budget (the
per-batch top-k counts) and caps every layer but down_proj at 1% when the annotation picks the channels
(``CalibrationStats.outliers`` wrapped here). Result of one run: tools/results/down_proj_budget_loso.json.
"""
import json
import sys
from dataclasses import replace

from select_defaults import ALWAYS, log, xtx_reused_across_candidates

from quaff_fx.calibration import CalibrationStats
from quaff_fx.config import OutlierConfig, QuaffConfig
from quaff_fx.corpus import corpus_sources
from quaff_fx.data import read_text, tokenize
from quaff_fx.model_loading import load_model
from quaff_fx.sweep import leave_one_source_out

_outliers = CalibrationStats.outliers


def outliers(self, name, cfg=None):
    """Every layer but down_proj keeps at most 1% of its inputs as outliers, whatever the candidate's budget."""
    if cfg is not None and not name.endswith("down_proj") and cfg.max_ratio > 0.01:
        cfg = replace(cfg, max_ratio=0.01)
    return _outliers(self, name, cfg)


def main() -> None:
    CalibrationStats.outliers = outliers
    cands = {"default": QuaffConfig.preset("default"),
             "down 2%": QuaffConfig.preset("default", outliers=OutlierConfig("top_abs", max_ratio=0.02)),
             "down 4%": QuaffConfig.preset("default", outliers=OutlierConfig("top_abs", max_ratio=0.04))}
    fp = load_model(None)
    texts = {s.name: tokenize(fp.tokenizer, read_text(s.path)) for s in corpus_sources()}
    always = {n: texts.pop(n) for n in ALWAYS}
    with xtx_reused_across_candidates():
        run = leave_one_source_out(fp.model, texts, cands, 16, eval_batches=4, always=always, progress=log)
    with open(sys.argv[1] if len(sys.argv) > 1 else "down_proj_budget.json", "w") as f:
        json.dump(run, f, indent=1, default=str)
    for c in cands:
        deltas = {h: f"{100 * f['delta'][c]:+.2f}%" for h, f in run["folds"].items()}
        print(c, deltas, f"mean {100 * run['summary'][c]['mean']:+.3f}%")


if __name__ == "__main__":
    main()
