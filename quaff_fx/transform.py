"""The main workflow: calibrate a captured model, run the passes, swap the result into the live model,
load an artifact back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from .calibration import CalibrationStats, calibrate
from .capture import META_KEY, capture, module_prefix
from .config import QuaffConfig
from .data import batches, count_batches, read_text, tokenize
from .errors import QuaffError
from .hf import quantize_model_, quaff_skeleton_, set_submodule
from .io import load_state_checked, read_manifest
from .model_loading import LoadedModel
from .quaff_linear import QuaffLinear
from .pipeline import run_passes
from .report import PassReport


@dataclass
class TransformResult:
    model: nn.Module  # the live model, its Linears swapped for QuaffLinears
    graph_module: GraphModule  # the rewritten graph
    reports: list[PassReport]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # module name -> annotation


def default_passes(stats: CalibrationStats, config: QuaffConfig, fuse: bool = False, fold_norms: bool = False) -> list:
    """annotate → rewrite (→ fuse, for graphs run for inference or handed to a compiler)."""
    from quaff_fx.passes import AnnotateOutliers, FuseScales, RewriteLinear

    passes = [AnnotateOutliers(stats, config), RewriteLinear(config, stats)]
    return passes + [FuseScales(fold_norms=fold_norms)] if fuse or fold_norms else passes


def calibrate_text(gm: GraphModule, tokenizer, text_path: str | Path | None, config: QuaffConfig, seq_len: int = 256,
                   batch_size: int = 2, max_batches: int | None = 4, progress: Callable | None = None) -> CalibrationStats:
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
        raise QuaffError("the calibration stats do not record their text and windows; GPTQ rounding cannot re-read them: "
                         "calibrate in the same run, or use --weight-rounding nearest")
    if info["text"] != name:
        raise QuaffError(f"the stats were calibrated on {info['text']!r}, not {name!r}: pass that text (--calib) for GPTQ "
                         "rounding, or use --weight-rounding nearest")
    ids = tokenize(tokenizer, read_text(text_path, "calibration"))
    stats.batches = list(batches(ids, int(info["seq_len"]), int(info["batch_size"]), int(info["batches"]), f"calibration text {name}"))
    return stats


def transform(model: nn.Module, stats: CalibrationStats, config: QuaffConfig | None = None,
              gm: GraphModule | None = None, passes: Sequence | None = None) -> TransformResult:
    """Capture ``model`` (unless ``gm`` is given), run the passes (default: annotate → rewrite), and
    put the graph's QuaffLinears into the live model, in place."""
    config = config or QuaffConfig(outliers=stats.outlier_config)
    gm = capture(model) if gm is None else gm
    result = run_passes(gm, default_passes(stats, config) if passes is None else passes)
    layers = adopt_from_graph_(model, result.graph_module, config, stats)
    stats.gptq_codes.clear()  # references to int8 buffers, only needed until the live model has its layers
    if not layers:
        raise QuaffError("the model has no eligible Linear layer: nothing was quantized (check --include/--exclude)")
    return TransformResult(model, result.graph_module, result.reports, layers)


def adopt_from_graph_(model: nn.Module, gm: GraphModule, config: QuaffConfig, stats: CalibrationStats | None = None) -> dict[str, dict[str, Any]]:
    """Install the rewritten graph's QuaffLinear modules in ``model`` (one object serves both). Layers the
    graph fused are built for the live model from their annotations (the live model keeps them apart)."""
    prefix, layers = module_prefix(gm), {}
    for node in gm.graph.nodes:
        meta = node.meta.get(META_KEY, {})
        if meta.get("fused") and meta.get("member_annotations"):
            members = {a["module"]: a for a in meta["member_annotations"] if a}
            quantize_model_(model, members, config, stats)
            layers.update({n: layer_spec(model.get_submodule(n), a) for n, a in members.items()})
            continue
        if node.op != "call_module" or not meta.get("rewritten"):
            continue
        module = gm.get_submodule(node.target)
        module.train(model.training)  # one object serves both: it follows the live model's mode
        set_submodule(model, node.target[len(prefix):], module)
        layers[meta["module"]] = layer_spec(module, meta)
    return layers


def layer_spec(module: QuaffLinear, annotation: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an artifact records of one layer: enough to build its empty QuaffLinear before loading."""
    return {"in_features": module.in_features, "out_features": module.out_features, "outliers": module.outlier_idx.tolist(),
            "max_mean_ratio": (annotation or {}).get("max_mean_ratio"), "momentum": module.momentum,
            "exact_grad": module.exact_grad, "smoothed": module.inv_smooth is not None}


def load_quantized(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[LoadedModel, dict[str, Any]]:
    """Load an artifact folder written by ``quaff-fx transform``: the HF model with its QuaffLinears,
    the tokenizer, and the manifest. Needs no calibration data and no original weights."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        return _load_quantized(folder, manifest, dtype)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise QuaffError(f"{str(folder)!r}: the artifact's manifest is malformed ({type(exc).__name__}: {exc})") from None


def _load_quantized(folder: Path, manifest: dict[str, Any], dtype: torch.dtype | None) -> tuple[LoadedModel, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(manifest["model_config"])
    try:
        hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except (KeyError, ValueError, TypeError) as exc:
        raise QuaffError(f"{str(folder)!r}: cannot rebuild the model config ({exc})") from None
    state = load_state_checked(folder, manifest)
    dtype = dtype or _weights_dtype(state)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    quaff_skeleton_(model, manifest["layers"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise QuaffError(f"{str(folder)!r}: the weights do not fit the model: {str(exc).splitlines()[0]}") from None
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer")) if (folder / "tokenizer").is_dir() else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QuaffError(f"{str(folder / 'tokenizer')!r} cannot be loaded: {str(exc).splitlines()[0][:200]}") from None
    return LoadedModel(model, tokenizer, dict(manifest.get("source", {}))), manifest


def _weights_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    for t in state.values():
        if t.is_floating_point() and t.dim() == 2:
            return t.dtype
    return torch.float32
