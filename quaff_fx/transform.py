"""The main workflow: calibrate a captured model, run the passes, swap the result into the live model,
load an artifact back."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn
from torch.fx import GraphModule

from .annotation import QuaffAnnotation, annotation_of
from .calibration import CalibrationStats, calibrate
from .capture import META_KEY, capture, module_prefix
from .config import QuaffConfig
from .data import batches, count_batches, read_text, tokenize
from .errors import QuaffError
from .hf import set_submodule
from .io import load_quantized  # noqa: F401  (its old home; it lives in io beside save_quantized)
from .pipeline import run_passes
from .quaff_linear import QuaffLinear
from .report import PassReport


@dataclass
class TransformResult:
    model: nn.Module  # the live model, its Linears swapped for QuaffLinears
    graph_module: GraphModule  # the rewritten graph
    reports: list[PassReport]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # module name -> annotation


def default_passes(stats: CalibrationStats, config: QuaffConfig, fuse: bool = False, fold_norms: bool = False,
                   offload: bool = False) -> list:
    """annotate → rewrite (→ fuse, for graphs run for inference or handed to a compiler). ``offload``: the rewrite
    keeps the built layers on the CPU until they are swapped into the live model (see RewriteLinear)."""
    from quaff_fx.passes import AnnotateOutliers, FuseScales, RewriteLinear

    passes = [AnnotateOutliers(stats, config), RewriteLinear(config, stats, offload=offload)]
    return passes + [FuseScales(fold_norms=fold_norms)] if fuse or fold_norms else passes


def calibrate_text(gm: GraphModule, tokenizer, text_path: str | Path | None, config: QuaffConfig, seq_len: int = 256,
                   batch_size: int = 2, max_batches: int | None = 4,
                   progress: Callable | None = None) -> CalibrationStats:
    """Calibrate ``gm`` on token windows of a text file (the bundled calibration text when None)."""
    from .evaluate import check_seq_limit

    check_seq_limit(seq_len, gm.meta.get(META_KEY, {}).get("max_seq_len"))
    ids = tokenize(tokenizer, read_text(text_path, "calibration"))
    source = f"calibration text {str(text_path) if text_path else '(bundled apache-2.0.txt)'}"
    n = count_batches(ids, seq_len, batch_size, max_batches)
    stats = calibrate(gm, batches(ids, seq_len, batch_size, max_batches, source), config.outliers, config.eligible,
                      n_batches=n, progress=progress, **config.calibration_options())
    stats.info.update({"seq_len": seq_len, "batch_size": batch_size, "tokens": n * seq_len * batch_size,
                       "text": calibration_text_name(text_path)})
    return stats


def calibration_text_name(text_path: str | Path | None) -> str:
    """How the stats record their calibration text (``info["text"]``), and how ``restore_batches_`` matches it."""
    return Path(text_path).name if text_path else "apache-2.0.txt (bundled)"


def restore_batches_(stats: CalibrationStats, tokenizer, text_path: str | Path | None) -> CalibrationStats:
    """Give stats read from a file their calibration batches again (GPTQ rounding gathers XᵀX from them): the
    same text, windows and batch count the stats record. ``text_path`` None: the bundled calibration text."""
    info, name = stats.info, calibration_text_name(text_path)
    if not all(k in info for k in ("seq_len", "batch_size", "batches", "text")):
        raise QuaffError("the calibration stats do not record their text and windows; GPTQ rounding cannot re-read "
                         "them: calibrate in the same run, or use --weight-rounding nearest")
    if info["text"] != name:
        raise QuaffError(f"the stats were calibrated on {info['text']!r}, not {name!r}: pass that text (--calib) "
                         "for GPTQ rounding, or use --weight-rounding nearest")
    ids = tokenize(tokenizer, read_text(text_path, "calibration"))
    stats.batches = list(batches(ids, int(info["seq_len"]), int(info["batch_size"]), int(info["batches"]),
                                 f"calibration text {name}"))
    return stats


def transform(model: nn.Module, stats: CalibrationStats, config: QuaffConfig | None = None,
              gm: GraphModule | None = None, passes: Sequence | None = None) -> TransformResult:
    """Capture ``model`` (unless ``gm`` is given), run the passes (default: annotate → rewrite), and
    put the graph's QuaffLinears into the live model, in place."""
    config = config or QuaffConfig(outliers=stats.outlier_config)
    gm = capture(model) if gm is None else gm
    offload = next(model.parameters()).device.type == "cuda"  # the FP model and all its int8 layers never share the GPU
    result = run_passes(gm, default_passes(stats, config, offload=offload) if passes is None else passes)
    # Garbage reference cycles still hold the FP weights (every torch.export leaves one: a recursive closure over a
    # set of the model's parameters); collected now, each weight the swap replaces is freed there and then, not at
    # the next cyclic GC (on a GPU the whole FP model outlived the swap beside its int8 layers: 1.45x the bf16
    # weights at 8B)
    gc.collect()
    layers = adopt_from_graph_(model, result.graph_module)
    if not layers:
        raise QuaffError("the model has no eligible Linear layer: nothing was quantized (check --include/--exclude)")
    return TransformResult(model, result.graph_module, result.reports, layers)


def adopt_from_graph_(model: nn.Module, gm: GraphModule) -> dict[str, dict[str, Any]]:
    """Install the rewritten graph's QuaffLinear modules in ``model`` (one object serves both). Layers the graph
    fused were built by the rewrite before the fusion; their annotations keep them, and the live model (which keeps
    them apart) takes those."""
    prefix, layers = module_prefix(gm), {}
    for node in gm.graph.nodes:
        meta = node.meta.get(META_KEY)
        if isinstance(meta, dict) and meta.get("fused"):
            for member in meta.get("member_annotations") or ():
                if isinstance(member, QuaffAnnotation):
                    layers[member.module] = _install(model, member.module, _built(member), member)
            continue
        annotation = annotation_of(node)
        if node.op == "call_module" and annotation is not None and annotation.rewritten:
            built = gm.get_submodule(node.target)
            layers[annotation.module] = _install(model, node.target[len(prefix):], built, annotation)
    return layers


def _built(annotation: QuaffAnnotation) -> QuaffLinear:
    if annotation.layer is None:
        raise QuaffError(f"layer {annotation.module!r} was fused before RewriteLinear built it: run RewriteLinear "
                         "before FuseScales")
    return annotation.layer


def _install(model: nn.Module, name: str, module: QuaffLinear, annotation: QuaffAnnotation) -> dict[str, Any]:
    """Put ``module`` in the live model in place of layer ``name``, on that layer's device (the rewrite may have kept
    it on the CPU); the FP layer is released then, one layer at a time."""
    old = model.get_submodule(name)
    device = next(iter([*old.parameters(), *old.buffers()]), module.w_int8).device
    module.to(device).train(model.training)  # one object serves both: it follows the live model's mode
    set_submodule(model, name, module)
    return layer_spec(module, annotation)


def layer_spec(module: QuaffLinear, annotation: QuaffAnnotation | None = None) -> dict[str, Any]:
    """What an artifact records of one layer: enough to build its empty QuaffLinear before loading."""
    return {"in_features": module.in_features, "out_features": module.out_features,
            "outliers": module.outlier_idx.tolist(),
            "max_mean_ratio": None if annotation is None else annotation.max_mean_ratio, "momentum": module.momentum,
            "exact_grad": module.exact_grad, "smoothed": module.inv_smooth is not None,
            "weight_granularity": module.weight_granularity, "act_group": module.act_group}
