"""ONNX export of a Quaff model: ``quaff::linear`` (and ``quaff::lora_linear``, an unmerged LoRA adapter on it)
lowered to standard ONNX ops.

Per layer: X̂ = X · 1/s / S (the smoothing's 1/s where the layer has one; S scattered over the input channels),
per-token symmetric int8 quantization
(ReduceMax, Div, Round, Clip, Cast), ``MatMulInteger`` with the int8 weight (an int8 initializer),
dequantization by the token and channel scales, the outlier correction ``MatMul(Gather(X̂), ((S-1)·W_o)ᵀ)``
and the bias. A layer with ``act_group`` G (per-group activation scales): X̂ and the int8 weight padded with zeros
to whole groups of G input channels (Pad), reshaped to [tokens, groups, G], quantized per group, one batched
``MatMulInteger`` over the groups, each group's product scaled by its step and summed (ReduceSum).
Batch and sequence axes are dynamic. Validated with ``onnx.checker`` (full check).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .capture import HFOutput
from .errors import QuaffError
from .io import check_target
from .quaff_linear import QuaffLinear

MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 18


def _translation(opset: int):
    import onnxscript
    from onnxscript import ir

    op = onnxscript.values.Opset("", opset)

    def const(value: float, like):
        return op.CastLike(op.Constant(value_float=value), like)

    def quantize(x):
        """Symmetric int8 over the last axis: (q int8, step), step = max|x| / 127 (1 where all zero), keepdims."""
        absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        step = op.Where(op.Greater(absmax, const(0.0, x)), op.Div(absmax, const(127.0, x)), const(1.0, x))
        q = op.Cast(op.Clip(op.Round(op.Div(x, step)), const(-127.0, x), const(127.0, x)), to=ir.DataType.INT8)
        return q, step

    def grouped_matmul(x, w_int8, k, group: int):
        """Σ_g step[:, g] · (q_g · w_gᵀ) for x [..., K] quantized per (row, group of ``group`` channels), as
        [rows, N]: x and W padded with zeros to whole groups, one batched MatMulInteger over the groups."""
        g = op.Constant(value_ints=[group])
        pad = op.Mod(op.Sub(g, op.Mod(k, g)), g)  # zeros to the next whole group (none when G divides K)
        n_groups = op.Div(op.Add(k, pad), g)
        minus_one = op.Constant(value_ints=[-1])  # the rows (a Reshape), the last axis (Pad's axes)
        pads = op.Concat(op.Constant(value_ints=[0]), pad, axis=0)
        xg = op.Reshape(op.Pad(x, pads, const(0.0, x), minus_one), op.Concat(minus_one, n_groups, g, axis=0))
        q, step = quantize(xg)  # [M, ng, G] int8, [M, ng, 1]
        wg = op.Reshape(op.Pad(w_int8, pads, op.Constant(value=ir.tensor(0, dtype=ir.DataType.INT8)),
                               op.Constant(value_ints=[1])),
                        op.Concat(op.Shape(w_int8, start=0, end=1), n_groups, g, axis=0))  # [N, ng, G]
        acc = op.MatMulInteger(op.Transpose(q, perm=[1, 0, 2]), op.Transpose(wg, perm=[1, 2, 0]))  # [ng, M, N]
        scaled = op.Mul(op.CastLike(acc, x), op.Transpose(step, perm=[1, 0, 2]))
        return op.ReduceSum(scaled, op.Constant(value_ints=[0]), keepdims=0)

    def quaff_linear(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias=None, prescaled=False,
                     exact_grad=False, inv_smooth=None, w_int8_t=None, act_group=0):
        k = op.Shape(w_int8, start=1, end=2)
        if not prescaled and inv_smooth is not None:  # the smoothing's 1/s (1 on the outlier channels)
            x = op.Mul(x, op.CastLike(inv_smooth, x))
        if not prescaled:
            ones = op.Expand(const(1.0, x), k)
            x = op.Div(x, op.ScatterElements(ones, outlier_idx, op.CastLike(act_scale, x), axis=0))
        if act_group:
            rows = grouped_matmul(x, w_int8, k, act_group)
            out_shape = op.Concat(op.Shape(x, start=0, end=-1), op.Shape(w_int8, start=0, end=1), axis=0)
            y = op.Mul(op.Reshape(rows, out_shape), op.CastLike(w_scale, x))
        else:
            q, step = quantize(x)
            acc = op.MatMulInteger(q, op.Transpose(w_int8, perm=[1, 0]))
            y = op.Mul(op.Mul(op.CastLike(acc, x), step), op.CastLike(w_scale, x))
        corr_w = op.Mul(op.CastLike(w_outlier, x), op.Sub(op.CastLike(act_scale, x), const(1.0, x)))
        y = op.Add(y, op.MatMul(op.Gather(x, outlier_idx, axis=-1), op.Transpose(corr_w, perm=[1, 0])))
        if bias is not None:
            y = op.Add(y, op.CastLike(bias, x))
        return y

    def lora_linear(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, lora_h, lora_b, bias=None,
                    prescaled=False, exact_grad=False, inv_smooth=None, w_int8_t=None, act_group=0):
        """quaff::lora_linear (an unmerged LoRA adapter on the layer): the layer's output + h · Bᵀ."""
        y = quaff_linear(x, w_int8, w_scale, outlier_idx, act_scale, w_outlier, bias, prescaled, exact_grad,
                         inv_smooth, w_int8_t, act_group)
        return op.Add(y, op.MatMul(op.CastLike(lora_h, x), op.Transpose(op.CastLike(lora_b, x), perm=[1, 0])))

    return {torch.ops.quaff.linear.default: quaff_linear, torch.ops.quaff.lora_linear.default: lora_linear}


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise QuaffError(f"opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")


def export_onnx(model: torch.nn.Module, out: str | Path, opset: int = DEFAULT_OPSET, seq_len: int = 16,
                force: bool = False) -> Path:
    """Export a Hugging Face model holding QuaffLinear layers (input_ids -> logits) to ``out``."""
    import onnx

    out = Path(out)
    check_opset(opset)
    if not any(isinstance(m, QuaffLinear) for m in model.modules()):
        raise QuaffError("the model has no QuaffLinear layer: it is not a Quaff model (run `quaff-fx transform` first)")
    check_target(out, force)
    model.eval()
    wrapper = HFOutput(model).eval()
    ids = torch.randint(0, int(model.config.vocab_size), (2, seq_len), generator=torch.Generator().manual_seed(0))
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=int(
        getattr(model.config, "max_position_embeddings", 4096)))
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(wrapper, (ids,), dynamo=True, opset_version=opset, input_names=["input_ids"],
                                        output_names=["logits"], dynamic_shapes=({0: batch, 1: seq},),
                                        custom_translation_table=_translation(opset), optimize=False, verbose=False)
            _optimize(program.model)
        program.save(str(tmp), external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)
        tmp.replace(out)
    except QuaffError:
        raise
    except Exception as exc:
        raise QuaffError(f"ONNX export failed: {str(exc).splitlines()[0][:300]}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _optimize(model) -> None:
    """onnxscript's optimizer (what ``optimize=True`` runs) without its pattern rewriter: functions inlined,
    constants folded, unused nodes removed, constants lifted to initializers, duplicates and common subexpressions
    merged. The rewriter's matcher took 470 of the 560 s of SmolLM2's export (cProfile); what it rewrites (casts,
    identity reshapes, fusions) onnxruntime's own graph optimizer does when it loads the model."""
    from onnx_ir.passes import common
    from onnxscript import optimizer

    common.InlinePass()(model)
    optimizer.fold_constants(model)
    for step in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
                 common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
                 common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass()):
        step(model)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's noise that says nothing about this model: "torchvision is not installed" (one log line per
    vision op it would register) and FutureWarnings of torch internals."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def compare_with_pytorch(model: torch.nn.Module, path: str | Path, ids: torch.Tensor) -> dict[str, Any]:
    """onnxruntime's logits against PyTorch's on ``ids``, with a verdict a person can act on.

    "match": every logit within 1e-3 of the logit scale. "agree": larger differences, but the greedy (top-1)
    token is the same at ≥ 99% of positions: int8 activation quantization rounds a value that sits on a rounding
    tie differently after a float reordering, and one step of int8 moves a logit visibly without changing what
    the model predicts. "differ": the exported graph computes something else."""
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    got = onnx_logits(path, ids).float()
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    if diff <= 1e-3 * max(1.0, scale):
        verdict = "match"
    elif top1 >= 0.99:
        verdict = "agree"
    else:
        verdict = "differ"
    return {"max_abs_diff_vs_pytorch": diff, "logits_max_abs": scale, "top1_agreement": top1,
            "positions": int(ids.numel()), "verdict": verdict}


VERDICTS = {"match": "the export matches PyTorch",
            "agree": "the export agrees with PyTorch (int8 rounding ties move single logits; "
                     "the predicted tokens are the same)",
            "differ": "the export DIFFERS from PyTorch: do not use it; please report this model"}


def onnx_logits(path: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """Run the exported model in onnxruntime (CPU) on ``ids``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])


def onnx_perplexity(path: str | Path, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 4,
                    max_batches: int | None = None) -> float:
    """Perplexity of the exported model in onnxruntime, in the same windows as ``evaluate.perplexity``."""
    import math

    import onnxruntime as ort
    import torch.nn.functional as F

    from .data import batches

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    total, count = 0.0, 0
    for batch in batches(ids, seq_len, batch_size, max_batches):
        logits = torch.from_numpy(session.run(["logits"], {"input_ids": batch.numpy()})[0])
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
