"""The ``quaff-fx`` command: calibrate, inspect, transform, eval."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from .errors import QuaffError


def _progress(desc: str, total: int | None):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


def _add_outlier_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("outlier selection")
    g.add_argument("--preset", default="default", help="default (top_abs 1%% + smoothing 0.6 shared by siblings + GPTQ "
                   "rounding; 'accurate' is the same) | fast (top_abs 1%%, no smoothing, round to nearest: no XᵀX pass) | "
                   "paper (mean_times, threshold 100, 1%%, plain)")
    g.add_argument("--strategy", default=None, help="top_abs | mean_times | zscore | static (overrides the preset)")
    g.add_argument("--threshold", type=float, default=None, help="mean_times: multiple of mean|x|; zscore: z bound (default 100)")
    g.add_argument("--max-ratio", type=float, default=None, help="per-layer cap on outlier channels, fraction of inputs (default 0.01)")
    g.add_argument("--channels", default="", help="static strategy: comma-separated channel list")
    g.add_argument("--include", action="append", help="fnmatch pattern of module names to quantize (repeatable; default all)")
    g.add_argument("--exclude", action="append", help="fnmatch pattern of module names to leave alone (repeatable; default lm_head, embeddings)")
    g.add_argument("--smooth-alpha", default=None,
                   help="SmoothQuant-style smoothing of the non-outlier channels: off | a number in (0, 1) | "
                        "auto (per input, chosen by the calibration's error search)")
    g.add_argument("--smooth-per-layer", action="store_true", default=None,
                   help="with smoothing: each layer its own factor instead of one per input (siblings then cannot be fused)")
    g.add_argument("--weight-rounding", choices=("nearest", "gptq"), default=None,
                   help="int8 weight rounding: nearest | gptq (error-compensated with XᵀX of the calibration batches; the default preset's)")


def _add_calibration_options(p: argparse.ArgumentParser, data_flag: str) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument(data_flag, dest="data", default=None, help="calibration text file (default: the bundled apache-2.0.txt)")
    g.add_argument("--batches", type=int, default=4, help="calibration batches (default 4)")
    g.add_argument("--batch-size", type=int, default=2, help="windows per batch (default 2)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")


def _add_training_options(p: argparse.ArgumentParser, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--data", default=None, help="training text (default: the bundled apache-2.0.txt)")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g})")


def _config(args: argparse.Namespace):
    from .config import DEFAULT_EXCLUDE, OutlierConfig, QuaffConfig

    try:
        channels = tuple(int(c) for c in args.channels.split(",") if c.strip()) if args.channels else ()
    except ValueError:
        raise QuaffError(f"--channels must be a comma-separated list of integers, got {args.channels!r}") from None
    base = OutlierConfig.preset(args.preset)
    outliers = OutlierConfig(args.strategy or base.strategy, base.threshold if args.threshold is None else args.threshold,
                             base.max_ratio if args.max_ratio is None else args.max_ratio, channels)
    given = {k: v for k, v in (("weight_rounding", args.weight_rounding),
                               ("smooth_shared", None if args.smooth_per_layer is None else False)) if v is not None}
    return QuaffConfig.preset(args.preset, outliers=outliers, include=tuple(args.include or ("*",)),
                              exclude=tuple(args.exclude or DEFAULT_EXCLUDE), **given, **_smoothing(args.smooth_alpha))


def _smoothing(value: str | None) -> dict:
    """--smooth-alpha as a config field (nothing when not given: the preset decides)."""
    if value is None:
        return {}
    if value in ("auto", "off"):
        return {"smooth_alpha": None if value == "off" else "auto"}
    try:
        return {"smooth_alpha": float(value)}
    except ValueError:
        raise QuaffError(f"--smooth-alpha must be auto, off or a number in (0, 1), got {value!r}") from None


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise QuaffError(f"--{n.replace('_', '-')} must be >= 1, got {v}")


def _check_out(path: str | None, force: bool) -> None:
    """Refuse early, before minutes of work, to overwrite an output or to write into a missing folder."""
    from .io import check_target

    if path is not None:
        check_target(path, force)


def _load_and_calibrate(args: argparse.Namespace, config):
    from .capture import capture
    from .data import read_text
    from .model_loading import load_model
    from .transform import calibrate_text

    read_text(args.data, "calibration")  # a bad text file fails now, not after the model has loaded
    loaded = load_model(args.model)
    t0 = time.perf_counter()
    gm = capture(loaded.model)
    t1 = time.perf_counter()
    stats = calibrate_text(gm, loaded.tokenizer, args.data, config, args.seq_len, args.batch_size, args.batches,
                           _progress("calibrating", args.batches))
    t2 = time.perf_counter()
    stats.info["model"] = loaded.source.get("name")
    timing = {"capture_s": round(t1 - t0, 2), "calibrate_s": round(t2 - t1, 2)}
    return loaded, gm, stats, timing


# -- commands ---------------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    from .io import save_stats

    _check_positive(args, "batches", "batch_size", "seq_len")
    config = _config(args)
    _check_out(args.out, args.force)
    _, _, stats, timing = _load_and_calibrate(args, config)
    save_stats(stats, args.out, force=args.force)
    summary = stats_summary(stats)
    if args.json:
        print(json.dumps({**summary, **timing, "out": args.out}, indent=1))
    else:
        print(render_stats_summary(summary))
        print(f"capture {timing['capture_s']} s, calibration {timing['calibrate_s']} s ({stats.info['batches']} batches); stats written to {args.out}")
    return 0


def stats_summary(stats) -> dict[str, Any]:
    """Per-layer outliers, per-kind totals and the overlap of the outlier sets of the two halves."""
    from .outliers import jaccard

    layers, kinds = [], defaultdict(lambda: {"layers": 0, "outliers": 0, "channels": 0, "jaccard": []})
    for name, layer in stats.layers.items():
        chosen = stats.outliers(name)
        halves = [stats.half_outliers(name, h) for h in (0, 1)]
        # a layer with no outlier in either half says nothing about stability
        j = jaccard(*halves) if stats.info.get("batches", 0) > 1 and (halves[0].numel() or halves[1].numel()) else None
        layers.append({"module": name, "in_features": layer.in_features, "outliers": chosen.numel(),
                       "channels": chosen.tolist(), "max_mean_ratio": round(layer.max_mean_ratio(), 2), "halves_jaccard": j})
        k = kinds[name.rsplit(".", 1)[-1]]
        k["layers"] += 1
        k["outliers"] += chosen.numel()
        k["channels"] += layer.in_features
        if j is not None:
            k["jaccard"].append(j)
    per_kind = {kind: {"layers": v["layers"], "outliers": v["outliers"], "outlier_ratio": v["outliers"] / max(v["channels"], 1),
                       "mean_halves_jaccard": (sum(v["jaccard"]) / len(v["jaccard"])) if v["jaccard"] else None}
                for kind, v in kinds.items()}
    js = [l["halves_jaccard"] for l in layers if l["halves_jaccard"] is not None]
    return {"outlier_config": stats.metadata()["outlier_config"], "info": stats.info, "layers": layers, "per_kind": per_kind,
            "totals": {"layers": len(layers), "outliers": sum(l["outliers"] for l in layers),
                       "mean_halves_jaccard": sum(js) / len(js) if js else None}}


def render_stats_summary(summary: dict[str, Any], all_layers: bool = False) -> str:
    from tabulate import tabulate

    def f(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else v)

    out = []
    if all_layers:
        out.append(tabulate([[l["module"], l["in_features"], l["outliers"], l["max_mean_ratio"], f(l["halves_jaccard"]),
                              ",".join(map(str, l["channels"][:8])) + (",..." if len(l["channels"]) > 8 else "")]
                             for l in summary["layers"]],
                            headers=["module", "in", "outliers", "max/mean", "jaccard(halves)", "channels"]))
    out.append(tabulate([[k, v["layers"], v["outliers"], f"{100 * v['outlier_ratio']:.2f}%", f(v["mean_halves_jaccard"])]
                         for k, v in summary["per_kind"].items()],
                        headers=["layer kind", "layers", "outlier channels", "of inputs", "jaccard(halves)"]))
    t = summary["totals"]
    oc = summary["outlier_config"]
    out.append(f"{t['layers']} layers, {t['outliers']} outlier channels ({oc['strategy']}, threshold {oc['threshold']}, "
               f"max_ratio {oc['max_ratio']}); outlier sets of the two halves of the batches overlap by "
               f"Jaccard (layers with outliers) {f(t['mean_halves_jaccard'])} on average")
    return "\n\n".join(out)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .io import load_stats, read_manifest

    path = Path(args.path)
    if path.is_dir():
        manifest = read_manifest(path)
        return _inspect_artifact(manifest, args)
    if args.graph or args.dot or args.fuse:
        raise QuaffError("--graph, --dot and --fuse need an artifact folder from `quaff-fx transform`, not a stats file")
    if not path.exists():
        raise QuaffError(f"{args.path!r} does not exist")
    summary = stats_summary(load_stats(path))
    print(json.dumps(summary, indent=1) if args.json else render_stats_summary(summary, all_layers=True))
    return 0


def _inspect_artifact(manifest: dict[str, Any], args: argparse.Namespace) -> int:
    from .report import PassReport

    if args.graph or args.dot or args.fuse:
        return _inspect_graph(args)
    if args.json:
        print(json.dumps({k: manifest[k] for k in ("source", "config", "layers", "reports") if k in manifest}, indent=1))
        return 0
    print(f"quaff-fx artifact of {manifest.get('source', {}).get('name')} ({manifest['model_config'].get('model_type')}), "
          f"{len(manifest['layers'])} QuaffLinear layers")
    for r in manifest.get("reports", []):
        print(PassReport(r["pass"], r["rows"], r.get("notes", [])).to_table())
    return 0


def _inspect_graph(args: argparse.Namespace) -> int:
    """Load the artifact, capture it, optionally fuse, and show the graph."""
    from .capture import capture
    from .graphview import graph_summary, graph_text, write_dot
    from .passes import FuseScales
    from .transform import load_quantized

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
        print(f"\n{summary['nodes']} nodes, {summary['quaff_nodes']} quaff nodes (marked ◆)" + (f"; drawing written to {args.dot}" if args.dot else ""))
    else:
        print(f"{summary['nodes']} nodes, {summary['quaff_nodes']} quaff nodes; drawing written to {args.dot}")
    return 0


def cmd_transform(args: argparse.Namespace) -> int:
    from .io import load_stats, save_quantized
    from .transform import transform

    _check_positive(args, "batches", "batch_size", "seq_len")
    config = _config(args)
    _check_out(args.out, args.force)
    if args.stats:
        from .capture import capture
        from .model_loading import load_model

        stats = load_stats(args.stats)
        loaded = load_model(args.model)
        if config.weight_rounding == "gptq":
            from .transform import restore_batches_

            restore_batches_(stats, loaded.tokenizer, args.data)
        gm, timing = capture(loaded.model), {}
    else:
        loaded, gm, stats, timing = _load_and_calibrate(args, config)
    t0 = time.perf_counter()
    result = transform(loaded.model, stats, config, gm=gm)
    timing["passes_s"] = round(time.perf_counter() - t0, 2)
    manifest = {"source": loaded.source, "config": config.to_dict(), "layers": result.layers,
                "reports": [r.to_dict() for r in result.reports]}
    if args.out:
        save_quantized(result.model, args.out, manifest, stats, loaded.tokenizer, force=args.force)
    if args.json:
        print(json.dumps({"reports": manifest["reports"], **timing, "out": args.out}, indent=1))
    else:
        for r in result.reports:
            print(r.to_table(max_rows=None if args.all_rows else 12), end="\n\n")
        print(f"passes {timing['passes_s']} s" + (f"; artifact written to {args.out}" if args.out else "; no --out given, nothing written"))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import read_text, tokenize
    from .evaluate import perplexity

    _check_positive(args, "batch_size", "seq_len", "max_batches")
    text = read_text(args.text, "heldout")
    models = _eval_models(args)
    tokenizer = models[0][2]
    if tokenizer is None:
        raise QuaffError("the artifact has no tokenizer folder; it cannot be evaluated on text")
    ids = tokenize(tokenizer, text)
    rows = []
    for label, model, _ in models:
        r = perplexity(model, ids, args.seq_len, args.batch_size, args.max_batches, source=f"text {args.text or '(bundled gpl-3.0.txt)'}")
        rows.append({"model": label, **r})
    base = rows[0]["perplexity"]
    for r in rows:
        r["delta_vs_first"] = r["perplexity"] / base - 1.0
    if args.json:
        print(json.dumps({"text": args.text or "gpl-3.0.txt (bundled)", "seq_len": args.seq_len, "results": rows}, indent=1))
    else:
        from tabulate import tabulate

        print(tabulate([[r["model"], f"{r['perplexity']:.4f}", f"{100 * r['delta_vs_first']:+.2f}%", r["tokens"]] for r in rows],
                       headers=["model", "perplexity", "vs " + rows[0]["model"], "tokens"]))
    return 0


def _eval_models(args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    """(label, model, tokenizer) to evaluate: the one given, or with --compare FP32, naive W8A8 and Quaff."""
    from .model_loading import load_model
    from .transform import load_quantized

    target = Path(args.model) if args.model else None
    if target is not None and target.is_dir() and (target / "quaff.json").exists():
        loaded, manifest = load_quantized(target)
        if not args.compare:
            return [("quaff", loaded.model, loaded.tokenizer)]
        source = manifest.get("source", {})
        base_name = source.get("name") if source.get("name") == "smollm2" else str(Path(source["path"]) / source.get("gguf_file", ""))
        fp = load_model(base_name)
        return _compare_set(fp, args, quaff_model=loaded.model, tokenizer=loaded.tokenizer or fp.tokenizer)
    fp = load_model(args.model)
    if not args.compare:
        return [("fp32", fp.model, fp.tokenizer)]
    return _compare_set(fp, args)


def _compare_set(fp, args: argparse.Namespace, quaff_model=None, tokenizer=None):
    import copy

    from .capture import capture
    from .hf import naive_w8a8_
    from .transform import calibrate_text, transform

    config = _config(args)
    naive = copy.deepcopy(fp.model)
    naive_w8a8_(naive, config)
    if quaff_model is None:
        quaff_model = copy.deepcopy(fp.model)
        gm = capture(quaff_model)
        stats = calibrate_text(gm, fp.tokenizer, args.calib, config, 256, 2, 4, _progress("calibrating", 4))
        transform(quaff_model, stats, config, gm=gm)
    return [("fp32", fp.model, tokenizer or fp.tokenizer), ("w8a8 naive", naive, None), ("quaff", quaff_model, None)]


def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import read_text, tokenize
    from .finetune import FinetuneConfig, make_peft_model, perplexity_of, save_adapter, train

    from .distributed import init_from_env

    cfg = FinetuneConfig(args.peft, args.steps, args.batch_size, args.seq_len, args.lr, args.rank, args.alpha,
                         args.virtual_tokens, args.checkpoint_every, args.seed)
    rank, size = init_from_env()  # torchrun / accelerate launch set the environment; one process otherwise
    out = Path(args.out)
    if out.exists() and not (args.resume or args.force) and not (size > 1 and rank > 0):
        raise QuaffError(f"{args.out!r} exists; pass --resume to continue its training or --force to start over")
    _check_out(args.out, force=True)  # the folder it goes in must exist
    text = read_text(args.data, "calibration")
    heldout = read_text(args.eval_text, "heldout")
    model, tokenizer, source = _finetune_base(args)
    ids = tokenize(tokenizer, text)
    if rank == 0:
        if args.force and out.exists() and not args.resume:
            import shutil

            shutil.rmtree(out)
        out.mkdir(exist_ok=True)
    peft_model = make_peft_model(model, cfg)
    log = train(peft_model, ids, cfg, out, resume=args.resume, progress=_progress(f"finetune {cfg.peft}", cfg.steps) if rank == 0 else None,
                distributed="ddp" if size > 1 else None)
    log["heldout_perplexity"] = perplexity_of(peft_model, tokenize(tokenizer, heldout), cfg.seq_len)
    log["trainable_parameters"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log["world_size"] = size
    if rank > 0:
        return 0  # rank 0 writes and reports
    save_adapter(peft_model, out, log, {"source": source, "quantized": not args.fp32, "finetune": log["config"]})
    if args.merge:
        _save_merged(peft_model, out / "merged", source, tokenizer, cfg)
    losses = log["losses"]
    summary = {"steps": len(losses), "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "heldout_perplexity": log["heldout_perplexity"], "seconds": round(log["seconds"], 2),
               "trainable_parameters": log["trainable_parameters"], "out": args.out}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{cfg.peft} on {'fp32' if args.fp32 else 'quaff int8'} base: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} "
              f"in {summary['steps']} steps ({summary['seconds']} s), held-out perplexity {summary['heldout_perplexity']:.3f}; "
              f"{summary['trainable_parameters']} trainable parameters; adapter, loss.json and loss.svg in {args.out}")
    return 0


def _finetune_base(args: argparse.Namespace):
    """The model to train: an artifact as saved, or a model quantized here (or left FP32 with --fp32)."""
    from .model_loading import load_model
    from .transform import load_quantized

    target = Path(args.model) if args.model else None
    if target is not None and target.is_dir() and (target / "quaff.json").exists():
        if args.fp32:
            raise QuaffError("--fp32 needs a model, not a quantized artifact")
        loaded, manifest = load_quantized(target)
        return loaded.model, loaded.tokenizer, {"artifact": str(target.resolve()), **manifest.get("source", {})}
    loaded = load_model(args.model)
    if not args.fp32:
        from .capture import capture
        from .transform import calibrate_text, transform

        config = _config(args)
        gm = capture(loaded.model)
        stats = calibrate_text(gm, loaded.tokenizer, None, config, progress=_progress("calibrating", 4))
        transform(loaded.model, stats, config, gm=gm)
    return loaded.model, loaded.tokenizer, loaded.source


def _save_merged(peft_model, folder: Path, source: dict, tokenizer, cfg) -> None:
    from .config import QuaffConfig
    from .io import save_quantized
    from .quaff_linear import QuaffLinear
    from .transform import layer_spec

    if cfg.peft != "lora":
        raise QuaffError("--merge works with --peft lora only")
    merged = peft_model.merge_and_unload()
    layers = {n: layer_spec(m) for n, m in merged.named_modules() if isinstance(m, QuaffLinear)}
    save_quantized(merged, folder, {"source": source, "config": QuaffConfig().to_dict(), "layers": layers, "reports": []},
                   tokenizer=tokenizer, force=True)


def cmd_ossh(args: argparse.Namespace) -> int:
    """LoRA fine-tuning with every QuaffLinear's outliers tracked against the calibrated ones."""
    from tabulate import tabulate

    from .data import read_text, tokenize
    from .finetune import FinetuneConfig, make_peft_model, train
    from .io import write_json
    from .ossh import OutlierTracker, plot

    cfg = FinetuneConfig("lora", args.steps, args.batch_size, args.seq_len, args.lr)
    _check_out(args.out, args.force)
    text = read_text(args.data, "calibration")
    args.fp32 = False
    model, tokenizer, _ = _finetune_base(args)
    peft_model = make_peft_model(model, cfg)
    tracker = OutlierTracker(peft_model, every=args.every)
    try:
        log = train(peft_model, tokenize(tokenizer, text), cfg, progress=_progress("ossh", cfg.steps),
                    on_step=lambda step, loss: tracker.record(step, loss))
    finally:
        tracker.close()
    summary = tracker.summary()
    summary["losses"] = log["losses"]
    out = Path(args.out)
    plot(summary, out)
    write_json(out.with_suffix(".json"), summary)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_layer"}, indent=1))
    else:
        print(tabulate([[k, f"{sum(v['jaccard']) / len(v['jaccard']):.3f}", f"{min(v['jaccard']):.3f}", f"{v['jaccard'][-1]:.3f}"]
                        for k, v in sorted(summary["per_kind"].items())],
                       headers=["layer kind", "mean Jaccard", "min", "last step"]))
        print(f"{summary['layers']} layers over {cfg.steps} steps: mean Jaccard {summary['mean_jaccard']:.3f}, "
              f"mean recall {summary['mean_recall']:.3f}; plot {out}, data {out.with_suffix('.json')}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export an artifact to ONNX, then check it in onnxruntime against PyTorch."""
    import torch

    from .io import read_manifest
    from .onnx_export import check_opset, export_onnx, onnx_logits
    from .transform import load_quantized

    path = Path(args.artifact)
    if not path.is_dir() or not (path / "quaff.json").is_file():
        raise QuaffError(f"{args.artifact!r} is not a quaff-fx artifact folder (no quaff.json); run `quaff-fx transform --out DIR` first")
    read_manifest(path)
    check_opset(args.opset)
    _check_out(args.out, args.force)
    loaded, _ = load_quantized(path)
    out = export_onnx(loaded.model, args.out, args.opset, force=args.force)
    ids = torch.randint(0, int(loaded.model.config.vocab_size), (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
    got = onnx_logits(out, ids)
    result = {"out": str(out), "bytes": out.stat().st_size, "opset": args.opset,
              "max_abs_diff_vs_pytorch": float((got - ref).abs().max()), "logits_max_abs": float(ref.abs().max())}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"wrote {out} ({result['bytes'] / 2**20:.1f} MiB, opset {args.opset}); passes onnx.checker (full); "
              f"onnxruntime vs PyTorch logits: max |diff| {result['max_abs_diff_vs_pytorch']:.3g} (logits up to {result['logits_max_abs']:.3g})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .model_loading import load_model
    from .sweep import plot, sweep

    from .data import heldout_paths, read_text

    texts = {Path(t).name: Path(t) for t in args.texts} if args.texts else heldout_paths()
    for t in texts.values():
        read_text(t, "heldout")  # a bad text fails before the model loads
    loaded = load_model(args.model)
    rows = sweep(loaded.model, loaded.tokenizer, texts, args.strategies, args.ratios, args.alphas, args.calib,
                 seq_len=args.seq_len, eval_batches=args.eval_batches, progress=lambda m: print(m, file=sys.stderr))
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    names = list(rows[0]["perplexity"])
    print(tabulate([[r["method"], r["channels"], f"{r['fp_bytes'] / 2**10:.0f} KiB"]
                    + [f"{r['perplexity'][t]:.3f} ({100 * r['delta'][t]:+.2f}%)" for t in names] for r in rows],
                   headers=["method", "FP channels", "FP columns"] + names))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .bench import bench_inference, bench_train

    _check_positive(args, "batch", "seq_len", "repeats")
    if args.train:
        rows = bench_train(args.model, args.batch, args.seq_len, args.repeats, profile=args.profile,
                           progress=lambda m: print(m, file=sys.stderr))
        if args.json:
            print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "threads": torch_threads(), "rows": rows}, indent=1))
            return 0
        print(f"one LoRA training step (r=8 on every quantized layer kind), batch {args.batch} x {args.seq_len} tokens, "
              f"{torch_threads()} threads, median of {args.repeats} after a warm-up step; peak RSS during the steps")
        print(tabulate([[r["variant"], f"{r['seconds']:.3f}", f"{r['speedup_vs_fp32']:.2f}x", f"{r['peak_rss'] / 2**20:.0f} MiB",
                         f"{r['peak_memory_vs_fp32']:.2f}x"] for r in rows],
                       headers=["variant", "s/step", "speed vs fp32", "peak memory", "memory vs fp32"]))
        for r in rows:
            if "profile" in r:
                print(f"\nprofile of one {r['variant']} step:\n{r['profile']}")
        return 0
    rows = bench_inference(args.model, args.batch, args.seq_len, args.repeats, compiled=not args.no_compile,
                           progress=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "threads": torch_threads(), "rows": rows}, indent=1))
    else:
        print(f"forward of batch {args.batch} x {args.seq_len} tokens, {torch_threads()} threads, median of {args.repeats}")
        print(tabulate([[r["variant"], f"{r['seconds']:.3f}", f"{r['speedup_vs_fp32_eager']:.2f}x"] for r in rows],
                       headers=["variant", "seconds", "speed vs fp32 eager"]))
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quaff-fx", description="Quaff outlier-scaled int8 quantization as graph passes.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "'smollm2' (default, the embedded SmolLM2-135M-Instruct), a .gguf file or a Hugging Face model folder"

    p = sub.add_parser("calibrate", help="record per-channel activation statistics of every Linear")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    _add_calibration_options(p, "--data")
    _add_outlier_options(p)
    p.add_argument("--out", required=True, help="stats file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("inspect", help="summarise a stats file or a quantized artifact")
    p.add_argument("path", help="stats file or artifact folder")
    p.add_argument("--json", action="store_true")
    p.add_argument("--graph", action="store_true", help="artifact: print the captured graph, quaff nodes marked ◆")
    p.add_argument("--quaff-only", action="store_true", help="with --graph: only the quaff nodes")
    p.add_argument("--fuse", action="store_true", help="with --graph/--dot: apply scale fusion and norm folding first")
    p.add_argument("--dot", metavar="FILE", help="artifact: write a Graphviz drawing (.dot; .svg/.png need graphviz)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("transform", help="calibrate, annotate outliers, rewrite Linear -> QuaffLinear, save")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    _add_calibration_options(p, "--calib")
    _add_outlier_options(p)
    p.add_argument("--stats", help="reuse a stats file from `quaff-fx calibrate` instead of calibrating")
    p.add_argument("--out", help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--all-rows", action="store_true", help="print every row of the reports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("eval", help="perplexity on held-out text; --compare: FP32 vs naive W8A8 vs Quaff")
    p.add_argument("model", nargs="?", default=None, help=model_help + ", or an artifact folder")
    p.add_argument("--text", default=None, help="held-out text (default: the bundled gpl-3.0.txt)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="evaluate FP32, naive W8A8 and Quaff in one run")
    p.add_argument("--calib", default=None, help="with --compare on a model: calibration text (default bundled)")
    _add_outlier_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("finetune", help="PEFT fine-tuning (LoRA, IA3, prompt, prefix) on the int8 Quaff base")
    p.add_argument("model", nargs="?", default=None, help=model_help + ", or an artifact folder")
    _add_training_options(p, lr=2e-4)
    p.add_argument("--eval-text", default=None, help="held-out text for the final perplexity (default: bundled gpl-3.0.txt)")
    p.add_argument("--peft", default="lora", help="lora | ia3 | prompt | prefix (default lora)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=16, help="LoRA alpha")
    p.add_argument("--virtual-tokens", type=int, default=16, help="prompt/prefix tuning length")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="quaff-finetune", help="output folder (default quaff-finetune)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--force", action="store_true", help="start over in an existing --out")
    p.add_argument("--fp32", action="store_true", help="fine-tune the unquantized model (the baseline)")
    p.add_argument("--merge", action="store_true", help="LoRA: also save the merged, re-quantized model in OUT/merged")
    _add_outlier_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("ossh", help="track outlier channels during LoRA fine-tuning against the calibrated ones")
    p.add_argument("model", nargs="?", default=None, help=model_help + ", or an artifact folder")
    _add_training_options(p, lr=1e-3)
    p.add_argument("--every", type=int, default=1, help="record every N steps")
    p.add_argument("--out", default="ossh.png", help="PNG plot (the data goes beside it as .json)")
    p.add_argument("--force", action="store_true")
    _add_outlier_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ossh)

    p = sub.add_parser("export-onnx", help="export a Quaff artifact to ONNX (int8 MatMulInteger) and check it in onnxruntime")
    p.add_argument("artifact", help="artifact folder from `quaff-fx transform`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("sweep", help="accuracy of FP32, naive, SmoothQuant, LLM.int8 and Quaff settings on several texts")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--texts", nargs="*", default=None, help="held-out texts (default: the three bundled ones)")
    p.add_argument("--calib", default=None, help="calibration text (default: the bundled apache-2.0.txt)")
    p.add_argument("--strategies", nargs="*", default=["top_abs", "mean_times"])
    p.add_argument("--ratios", nargs="*", type=float, default=[0.005, 0.01, 0.02])
    p.add_argument("--alphas", nargs="*", type=float, default=[0.5])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate on at most this many batches of each text")
    p.add_argument("--plot", default=None, help="PNG of perplexity delta vs outlier budget")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="time FP32 vs Quaff forward (eager, fused, compiled) side by side")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--train", action="store_true", help="time one LoRA training step instead (each variant in its own process)")
    p.add_argument("--profile", action="store_true", help="with --train: print the op profile of a Quaff eager step")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return args.func(args)
    except QuaffError as exc:
        print(f"quaff-fx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quaff-fx: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
