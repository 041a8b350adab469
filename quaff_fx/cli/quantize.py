"""quaff-fx calibrate, transform and inspect."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..calibration_report import render_stats_summary, stats_summary
from ..errors import QuaffError
from .common import (
    MODEL_HELP,
    add_calibration_options,
    add_device_options,
    add_outlier_options,
    calibration_config,
    check_out,
    check_positive,
    load_model_for,
    phase,
    progress,
    quaff_config,
    quantize_loaded,
)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Stats only: capture and calibrate (``quantize_``'s calibration phase), no rewrite."""
    from types import SimpleNamespace

    from ..capture import capture
    from ..io import save_stats
    from ..quantize import Timer, calibrate_model

    check_positive(args, "batches", "batch_size", "seq_len")
    config = quaff_config(args)
    check_out(args.out, args.force)
    calibration = calibration_config(args)
    loaded = load_model_for(args)
    timer = Timer()
    with timer("capture"):
        gm = capture(loaded.model)
    reporter = SimpleNamespace(say=phase, wrap=lambda it: progress("calibrating", calibration.num_batches)(it))
    stats = calibrate_model(loaded.model, gm, config, calibration, loaded.tokenizer, reporter, timer)
    stats.info["model"] = loaded.source.get("name")
    save_stats(stats, args.out, force=args.force)
    summary = stats_summary(stats)
    timings = {phase_name: round(s, 2) for phase_name, s in timer.timings.items()}
    if args.json:
        print(json.dumps({**summary, "timings": timings, "out": args.out}, indent=1))
        return 0
    print(render_stats_summary(summary))
    print(f"capture {timings['capture']} s, calibration {timings['calibration']} s "
          f"({stats.info['batches']} batches of {stats.info['text']}); stats written to {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..io import load_stats

    path = Path(args.path)
    if path.is_dir():
        return _inspect_artifact(path, args)
    if args.graph or args.dot or args.fuse:
        raise QuaffError("--graph, --dot and --fuse need an artifact folder from `quaff-fx transform`, "
                         "not a stats file")
    if not path.exists():
        raise QuaffError(f"{args.path!r} does not exist")
    summary = stats_summary(load_stats(path))
    print(json.dumps(summary, indent=1) if args.json else render_stats_summary(summary, all_layers=True))
    return 0


def _inspect_artifact(folder: Path, args: argparse.Namespace) -> int:
    """The artifact's layers and pass reports (or its graph); the weights are checked against their checksum first."""
    from ..io import check_weights, read_manifest
    from ..report import PassReport

    manifest = read_manifest(folder)
    check_weights(folder, manifest)
    if args.graph or args.dot or args.fuse:
        return _inspect_graph(args)
    if args.json:
        shown = ("source", "config", "layers", "reports")
        print(json.dumps({k: manifest[k] for k in shown if k in manifest}, indent=1))
        return 0
    print(f"quaff-fx artifact of {manifest.get('source', {}).get('name')} "
          f"({manifest['model_config'].get('model_type')}), {len(manifest['layers'])} QuaffLinear layers")
    for r in manifest.get("reports", []):
        print(PassReport(r["pass"], r["rows"], r.get("notes", [])).to_table())
    return 0


def _inspect_graph(args: argparse.Namespace) -> int:
    """Load the artifact, capture it, optionally fuse, and show the graph."""
    from ..capture import capture
    from ..graphview import graph_summary, graph_text, write_dot
    from ..io import load_quantized
    from ..passes import FuseScales

    loaded, _ = load_quantized(args.path)
    gm = capture(loaded.model)
    fused = FuseScales(fold_norms=True)(gm) if args.fuse else None
    gm.recompile()
    if args.dot:
        write_dot(gm, args.dot)
    summary = graph_summary(gm)
    if args.json:
        print(json.dumps({**summary, "fused": fused.report.to_dict() if fused else None, "dot": args.dot}, indent=1))
    elif args.graph:
        print(graph_text(gm, quaff_only=args.quaff_only))
        drawn = f"; drawing written to {args.dot}" if args.dot else ""
        print(f"\n{summary['nodes']} nodes, {summary['quaff_nodes']} quaff nodes (marked ◆){drawn}")
    else:
        print(f"{summary['nodes']} nodes, {summary['quaff_nodes']} quaff nodes; drawing written to {args.dot}")
    return 0


def cmd_transform(args: argparse.Namespace) -> int:
    from ..io import build_manifest, load_stats, save_quantized

    check_positive(args, "batches", "batch_size", "seq_len")
    config = quaff_config(args)
    check_out(args.out, args.force)
    calibration = calibration_config(args)
    stats = load_stats(args.stats) if args.stats else None
    loaded = load_model_for(args)
    result = quantize_loaded(loaded, config, calibration, stats)
    result.stats.info.setdefault("model", loaded.source.get("name"))
    manifest = build_manifest(loaded.source, config, result.layers, [r.without_timings() for r in result.reports])
    if args.out:
        phase(f"writing {args.out}")
        with result.timed("save"):
            save_quantized(result.model.cpu(), args.out, manifest, result.stats, loaded.tokenizer, force=args.force)
    if args.json:
        timings = dict(result.timing_rows())
        print(json.dumps({"reports": manifest["reports"], "timings": timings, "out": args.out}, indent=1))
        return 0
    for r in result.reports:
        print(r.to_table(max_rows=None if args.all_rows else 12), end="\n\n")
    written = f"artifact written to {args.out}" if args.out else "no --out given, nothing written"
    print(f"{result.timing_text()}; {written}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the calibrate, inspect, transform commands."""
    p = sub.add_parser("calibrate", help="record per-channel activation statistics of every Linear")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_calibration_options(p)
    add_outlier_options(p)
    add_device_options(p)
    p.add_argument("--out", required=True, help="stats file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("inspect", help="summarise a stats file or a quantized artifact")
    p.add_argument("path", help="stats file or artifact folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--graph", action="store_true", help="artifact: print the captured graph, quaff nodes marked ◆")
    p.add_argument("--quaff-only", action="store_true", help="with --graph: only the quaff nodes")
    p.add_argument("--fuse", action="store_true", help="with --graph/--dot: apply scale fusion and norm folding first")
    p.add_argument("--dot", metavar="FILE", help="artifact: write a Graphviz drawing (.dot; .svg/.png need graphviz)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("transform", help="calibrate, annotate outliers, rewrite Linear -> QuaffLinear, save")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_calibration_options(p)
    add_outlier_options(p)
    add_device_options(p)
    p.add_argument("--stats", help="reuse a stats file from `quaff-fx calibrate` instead of calibrating")
    p.add_argument("--out", help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--all-rows", action="store_true", help="print every row of the reports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_transform)
