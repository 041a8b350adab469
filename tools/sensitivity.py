"""Where the W8A8 error comes from: each Linear type quantized alone, on one leave-one-source-out fold.

    python tools/sensitivity.py [--fold qa-debian-faq] [--batches 16] [--eval-batches 4] [--config default|fast]
                                [--types q_proj k_proj ...] [--json OUT]

Calibrates once on the corpus's other sources (as tools/select_defaults.py does for that fold), then for each
layer type quantizes only the Linears of that type with the chosen preset (everything else stays FP32) and measures
the perplexity delta vs FP32 on the source left out; 'all' quantizes every eligible Linear. Corpus texts only:
the held-out texts of tools/accuracy.py are never read.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from select_defaults import log, xtx_reused_across_candidates  # noqa: E402

from quaff_fx.config import QuaffConfig  # noqa: E402
from quaff_fx.corpus import corpus_sources, interleave, source_windows, to_batches  # noqa: E402
from quaff_fx.data import read_text, tokenize  # noqa: E402
from quaff_fx.evaluate import perplexity  # noqa: E402
from quaff_fx.model_loading import load_model  # noqa: E402
from quaff_fx.quantize import quantize_  # noqa: E402
from quaff_fx.sweep import calibration_data  # noqa: E402

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--fold", default="qa-debian-faq", help="the corpus source left out and evaluated on")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--config", default="default", help="the preset each type is quantized with")
    ap.add_argument("--types", nargs="+", default=list(TYPES), help="'all' (every type at once) always runs first")
    ap.add_argument("--device", default=None, help="run the model there (e.g. cuda); default: the CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    fp = load_model(args.model)
    if args.device:
        fp.model.to(args.device)
    texts = {s.name: tokenize(fp.tokenizer, read_text(s.path)) for s in corpus_sources()}
    held = texts[args.fold]
    others = [source_windows(ids, 256) for name, ids in texts.items() if name != args.fold]
    calib = calibration_data(to_batches(interleave(others), 2, args.batches, f"the sources but {args.fold}"))
    base = perplexity(fp.model, held, 256, 4, args.eval_batches)["perplexity"]
    preset = QuaffConfig.preset(args.config)
    rows, stats = {}, None
    with xtx_reused_across_candidates():
        for kind in ["all"] + [t for t in args.types if t != "all"]:  # 'all' first: its stats cover every type
            config = preset if kind == "all" else replace(preset, include=(f"*{kind}",))
            model = copy.deepcopy(fp.model)
            t0 = time.perf_counter()
            result = quantize_(model, config, calib, stats=stats)
            stats = stats or result.stats
            ppl = perplexity(model, held, 256, 4, args.eval_batches)["perplexity"]
            rows[kind] = {"perplexity": ppl, "delta": ppl / base - 1, "seconds": time.perf_counter() - t0}
            log(f"{args.fold}: {kind} alone {100 * rows[kind]['delta']:+.2f}% ({rows[kind]['seconds']:.0f} s)")
            del model
            if args.json:
                Path(args.json).write_text(json.dumps({"fold": args.fold, "batches": args.batches, "fp32": base,
                                                       "config": args.config, "rows": rows}, indent=1))
    print(f"fold {args.fold} (FP32 perplexity {base:.3f}), preset {args.config}, {args.batches} calibration batches")
    print(tabulate([[k, f"{r['perplexity']:.3f}", f"{100 * r['delta']:+.2f}%"] for k, r in rows.items()],
                   headers=["quantized alone", "perplexity", "delta"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
