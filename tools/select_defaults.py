"""Choose the default calibration settings out of sample: leave-one-source-out over the bundled corpus.

    python tools/select_defaults.py [--model smollm2] [--batches 32] [--candidates 0.4 0.5 0.6 0.7 auto 0.6/0.02]
                                    [--eval-batches 4] [--json OUT]

For each source of the corpus (quaff_fx/data/corpus) in turn: calibrate on the others, mixed as the default
calibration mixes them, quantize with each candidate (the preset 'default' with smoothing α, or α/outlier ratio),
and measure the perplexity delta vs FP32 on the left-out source. The candidate with the least mean delta over
the folds wins (ties: the least worst fold). Several ``--batches`` values repeat this per calibration size (tokens
vs accuracy vs calibration and transform time). The Apache-2.0 text (legal, 2k tokens: too short to evaluate on)
stays in every fold's calibration. The texts that README's accuracy table reports are never read here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from contextlib import contextmanager

import torch
from tabulate import tabulate

from quaff_fx.config import OutlierConfig, QuaffConfig
from quaff_fx.corpus import corpus_sources
from quaff_fx.data import read_text, tokenize
from quaff_fx.errors import QuaffError
from quaff_fx.model_loading import load_model
from quaff_fx.sweep import leave_one_source_out

ALWAYS = ("apache-2.0",)  # in every fold's calibration, never a fold


def candidate(spec: str) -> QuaffConfig:
    """'0.6' → preset default with smoothing α 0.6; 'auto'; '0.6/0.02' → α 0.6 and top_abs 2% outliers."""
    alpha, _, ratio = spec.partition("/")
    try:
        smooth = alpha if alpha == "auto" else float(alpha)
        overrides = {"outliers": OutlierConfig(max_ratio=float(ratio))} if ratio else {}
    except ValueError:
        raise QuaffError(f"candidate {spec!r} is not 'ALPHA', 'auto' or 'ALPHA/RATIO'") from None
    return QuaffConfig.preset("default", smooth_alpha=smooth, **overrides)


@contextmanager
def xtx_reused_across_candidates():
    """GPTQ gathers XᵀX from the FP graph before rewriting it, so it does not depend on the candidate: within one fold
    (same calibration batches) gather it once and hand the same sums to every candidate's rewrite. Selection only."""
    from quaff_fx.passes import rewrite_linear

    gather, cache = rewrite_linear.gather_xtx, {}

    def cached(gm, nodes, batches):
        digest = hashlib.sha1(torch.cat([b.reshape(-1) for b in batches]).numpy().tobytes()).hexdigest()
        if cache.get("digest") != digest:  # a new fold: forget the last one's sums
            cache.clear()
            cache["digest"] = digest
        missing = [n for n in nodes if n.name not in cache]
        if missing:
            cache.update({n.name: h for n, h in gather(gm, missing, batches).items()})
        return {n: cache[n.name].clone() for n in nodes}

    rewrite_linear.gather_xtx = cached
    try:
        yield
    finally:
        rewrite_linear.gather_xtx = gather


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", nargs="+", type=int, default=[32], help="calibration batches of 2 x 256 tokens")
    ap.add_argument("--candidates", nargs="+", default=["0.4", "0.5", "0.6", "0.7", "auto"])
    ap.add_argument("--eval-batches", type=int, default=4, help="evaluate on the first N batches of 4 x 256 tokens")
    ap.add_argument("--folds", nargs="*", default=None, help="leave out only these sources (default: each in turn)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="run the model there (e.g. cuda); default: the CPU")
    ap.add_argument("--json", default=None, help="write every fold's numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = {spec: candidate(spec) for spec in args.candidates}
    fp = load_model(args.model)
    if args.device:
        fp.model.to(args.device)
    texts = {s.name: tokenize(fp.tokenizer, read_text(s.path)) for s in corpus_sources()}
    always = {n: texts.pop(n) for n in ALWAYS}
    runs = {}
    for n in args.batches:
        with xtx_reused_across_candidates():
            runs[n] = leave_one_source_out(fp.model, texts, candidates, n, eval_batches=args.eval_batches,
                                           always=always, folds=args.folds,
                                           progress=lambda m, n=n: log(f"[{n} batches] {m}"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"candidates": args.candidates, "eval_batches": args.eval_batches, "runs": runs}, f, indent=1)
    for n, run in runs.items():
        folds = run["folds"]
        print(f"\ncalibration {n} batches x 2 x 256 tokens (of the other sources); chosen: {run['chosen']}")
        summary = run["summary"]
        rows = []
        for c in candidates:
            worst_text, worst = summary[c]["worst"]
            rows.append([c] + [f"{100 * f['delta'][c]:+.2f}%" for f in folds.values()]
                        + [f"{100 * summary[c]['mean']:+.2f}%", f"{worst_text} {100 * worst:+.2f}%",
                           f"{sum(f['transform_s'][c] for f in folds.values()) / len(folds):.0f} s"])
        print(tabulate(rows, headers=["candidate"] + list(folds) + ["mean", "worst", "transform"]))
        print(f"calibration time per fold: {sum(f['calib_s'] for f in folds.values()) / len(folds):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
