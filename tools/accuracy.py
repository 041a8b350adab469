"""Perplexity of FP32, naive W8A8, SmoothQuant α 0.5 and Quaff's default on held-out texts, in one run.

    python tools/accuracy.py [--model smollm2] [--texts A B ...] [--batches N] [--eval-batches N] [--json]

Calibration: the bundled corpus (quaff_fx/data/corpus), ``--batches`` x 2 x 256 tokens mixed over its sources,
as the defaults calibrate; one row also shows the previous calibration (the Apache-2.0 text alone, 4 x 2 x 256).
Held-out texts (default ``REPORTED``): seven texts from sources that neither the calibration corpus nor the
selection of the defaults (tools/select_defaults.py, leave-one-source-out over the corpus) ever read.
Each row gives the perplexity delta vs FP32 on every text, the mean and the worst text (``quaff-fx sweep`` has
the other presets and baselines).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from tabulate import tabulate

from quaff_fx import QuaffConfig
from quaff_fx.baselines import NaiveW8A8Config, SmoothQuantConfig
from quaff_fx.corpus import BUNDLED, DEFAULT_BATCHES, calibration_batches
from quaff_fx.data import batches, bundled_text_path, read_text, tokenize
from quaff_fx.evaluate import perplexity
from quaff_fx.model_loading import load_model
from quaff_fx.quantize import quantize_
from quaff_fx.sweep import calibration_data, fp_column_bytes, summarize

DATA = bundled_text_path().parent
# held-out texts reported in the README: legal (FSF x2), docs (Python, Vim), Q&A (Python FAQ), code (CPython),
# changelog (bash)
REPORTED = ("gpl-3.0.txt", "gfdl-1.3.txt", "python-reference.txt", "vim-user-manual.txt", "python-faq.txt",
            "python-stdlib-code.txt", "bash-changes.txt")


def quantized(model, config, calib: list | None = None, stats=None):
    """A quantized copy of ``model`` calibrated on the batches ``calib`` (or with ``stats``), and quantize_'s result."""
    model = copy.deepcopy(model)
    return model, quantize_(model, config, calibration_data(calib) if calib else None, stats=stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--texts", nargs="*", type=Path, default=None)
    ap.add_argument("--batches", type=int, default=DEFAULT_BATCHES, help="calibration batches of 2 x 256 tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=None, help="at most this many batches of 4 windows per text")
    ap.add_argument("--previous", action="store_true", help="also the default on the previous calibration (Apache-2.0)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    fp = load_model(args.model)
    paths = args.texts or [DATA / name for name in REPORTED]
    texts = {p.name: tokenize(fp.tokenizer, read_text(p)) for p in paths}

    def evaluate(model) -> dict[str, float]:
        return {n: perplexity(model, ids, args.seq_len, 4, args.eval_batches)["perplexity"] for n, ids in texts.items()}

    rows, info = {"fp32": evaluate(fp.model)}, {}
    rows["w8a8 naive"] = evaluate(quantized(fp.model, NaiveW8A8Config())[0])
    corpus = calibration_batches(fp.tokenizer, (BUNDLED,), args.batches, 2, args.seq_len)
    apache = list(batches(tokenize(fp.tokenizer, read_text(None)), args.seq_len, 2, 4))
    stats = None
    window = f"x 2 x {args.seq_len}"
    previous = f"quaff default, previous calibration (apache-2.0 alone, {len(apache)} {window})"
    runs = [(previous, apache)] if args.previous else []
    for label, calib in runs + [(f"quaff default, corpus {len(corpus)} {window}", corpus)]:
        model, result = quantized(fp.model, QuaffConfig(), calib)
        stats = result.stats
        rows[label] = evaluate(model)
        info[label] = {**{phase: round(t, 1) for phase, t in result.timings.items()},
                       "fp_column_bytes": fp_column_bytes(model)}
        del model
    # SmoothQuant on the corpus calibration's max|x| (the last stats above)
    rows["smoothquant a=0.5"] = evaluate(quantized(fp.model, SmoothQuantConfig(alpha=0.5), corpus, stats)[0])
    base = rows["fp32"]
    deltas = {label: {t: v[t] / base[t] - 1 for t in texts} for label, v in rows.items()}
    if args.json:
        summary = {k: summarize(d) for k, d in deltas.items()}
        print(json.dumps({"seq_len": args.seq_len, "eval_batches": args.eval_batches,
                          "calibration_batches": len(corpus), "perplexity": rows, "delta": deltas,
                          "summary": summary, "timings": info}, indent=1))
        return
    table = []
    for label, v in rows.items():
        s = summarize(deltas[label])
        table.append([label] + [f"{v[t]:.3f} ({100 * deltas[label][t]:+.2f}%)" for t in texts]
                     + [f"{100 * s['mean']:+.2f}%", f"{s['worst'][0]} {100 * s['worst'][1]:+.2f}%"])
    print(tabulate(table, headers=["model"] + list(texts) + ["mean", "worst"]))
    for label, t in info.items():
        phases = ", ".join(f"{p} {v} s" for p, v in t.items() if p != "fp_column_bytes")
        print(f"{label}: {phases}; FP outlier columns {t['fp_column_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
