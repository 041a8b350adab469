"""Perplexity of FP32, naive W8A8 and Quaff presets on several held-out texts, in one run.

    python tools/accuracy.py [--model smollm2] [--texts A B ...] [--seq-len 256] [--json]

Calibration is always on the bundled Apache-2.0 text; the default held-out texts are the three bundled
ones (GPL-3, the Python language reference, the Vim user manual) and, where present, Debian's GFDL-1.3 and
MPL-2.0 licence texts. Baselines: naive W8A8, SmoothQuant α=0.5, LLM.int8-style decomposition.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from tabulate import tabulate

from collections import Counter

from quaff_fx import QuaffConfig, calibrate_text, capture, transform
from quaff_fx.baselines import llm_int8_, smoothquant_
from quaff_fx.data import heldout_paths, read_text, tokenize
from quaff_fx.evaluate import perplexity
from quaff_fx.hf import naive_w8a8_
from quaff_fx.model_loading import load_model

DEBIAN = Path("/usr/share/common-licenses")


def default_texts() -> list[Path]:
    return list(heldout_paths().values()) + [p for p in (DEBIAN / "GFDL-1.3", DEBIAN / "MPL-2.0") if p.is_file()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--texts", nargs="*", type=Path, default=None)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    fp = load_model(args.model)
    texts = {p.name: tokenize(fp.tokenizer, read_text(p)) for p in (args.texts or default_texts())}

    def evaluate(model) -> dict[str, float]:
        return {name: perplexity(model, ids, args.seq_len, 4)["perplexity"] for name, ids in texts.items()}

    rows = {"fp32": evaluate(fp.model)}
    naive = copy.deepcopy(fp.model)
    naive_w8a8_(naive)
    rows["w8a8 naive"] = evaluate(naive)
    del naive
    stats = None
    for label, config in (("quaff paper preset", QuaffConfig.preset("paper")),
                          ("quaff fast (top_abs 1%, no smoothing, nearest)", QuaffConfig.preset("fast")),
                          ("quaff fast + smoothing a=0.5 (shared)", QuaffConfig.preset("fast", smooth_alpha=0.5)),
                          ("quaff fast + smoothing auto", QuaffConfig.preset("fast", smooth_alpha="auto")),
                          ("quaff fast + gptq rounding", QuaffConfig.preset("fast", weight_rounding="gptq")),
                          ("quaff fast + smoothing a=0.5 (shared) + gptq rounding",
                           QuaffConfig.preset("fast", smooth_alpha=0.5, weight_rounding="gptq")),
                          ("quaff fast + smoothing a=0.5 per layer + gptq rounding",
                           QuaffConfig.preset("fast", smooth_alpha=0.5, smooth_shared=False, weight_rounding="gptq")),
                          ("quaff default (top_abs 1% + smoothing a=0.6 shared + gptq)", QuaffConfig.preset("default"))):
        model = copy.deepcopy(fp.model)
        gm = capture(model)
        stats = calibrate_text(gm, fp.tokenizer, None, config)
        result = transform(model, stats, config, gm=gm)
        channels = sum(len(l["outliers"]) for l in result.layers.values())
        rows[f"{label} ({channels} ch)"] = evaluate(model)
        if config.searches_smoothing:
            picked = Counter((n.rsplit(".", 1)[-1], r.get("smooth_alpha")) for n, r in
                             ((r["module"], r) for r in result.reports[0].rows if r.get("status") == "annotated"))
    for label, apply in (("smoothquant a=0.5", lambda m: smoothquant_(m, stats, 0.5, QuaffConfig().eligible)),
                         ("llm.int8 (|x|>6 in FP)", lambda m: llm_int8_(m, stats, QuaffConfig().eligible))):
        model = copy.deepcopy(fp.model)
        apply(model)
        rows[label] = evaluate(model)
    base = rows["fp32"]
    if args.json:
        print(json.dumps({"seq_len": args.seq_len, "perplexity": rows,
                          "auto_smoothing": [[k, a, n] for (k, a), n in sorted(picked.items(), key=str)]}, indent=1))
        return
    table = [[label] + [f"{v[t]:.3f} ({100 * (v[t] / base[t] - 1):+.2f}%)" for t in texts] for label, v in rows.items()]
    print(tabulate(table, headers=["model"] + list(texts)))
    print("\nsmoothing α chosen by the error search of 'smoothing auto' (layer kind, α, layers):",
          ", ".join(f"{k} {a}: {n}" for (k, a), n in sorted(picked.items(), key=str)))


if __name__ == "__main__":
    main()
