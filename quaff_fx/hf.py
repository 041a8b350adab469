"""The rewrite applied to a live model by module swap, driven by the graph's annotations, so that
``generate()``, PEFT and the Trainer keep working on the Hugging Face model itself."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .annotation import QuaffAnnotation
from .config import MOMENTUM, QuaffConfig, check_act_group
from .errors import QuaffError
from .quaff_linear import QuaffLinear


def fp_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of an nn.Linear or a transformers Conv1D (weight stored [in, out]); else None."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return module.weight.t(), module.bias
    return None


def eligible_linears(model: nn.Module, config: QuaffConfig) -> list[str]:
    """Names of the Linear (and Conv1D) modules of ``model`` the config would quantize."""
    return [n for n, m in model.named_modules() if fp_linear(m) is not None and config.eligible(n)]


def quantize_model_(model: nn.Module, annotations: dict[str, QuaffAnnotation], config: QuaffConfig) -> list[str]:
    """Replace each annotated nn.Linear of ``model`` by a QuaffLinear built from its annotation, in place; returns
    the names. Where an annotation asks for GPTQ rounding, the int8 codes are those of the layer the graph rewrite
    built (``annotation.layer``): GPTQ needs the graph's XᵀX."""
    swapped = []
    for name, annotation in annotations.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise QuaffError(f"annotation names layer {name!r}, which the model does not have") from None
        if isinstance(linear, QuaffLinear):
            continue
        wb = fp_linear(linear)
        if wb is None:
            raise QuaffError(f"layer {name!r} is a {type(linear).__name__}, not an nn.Linear")
        layer = QuaffLinear.from_annotation(wb[0], wb[1], annotation, config)
        if annotation.gptq:
            if annotation.layer is None:
                raise QuaffError(f"layer {name!r} asks for GPTQ rounding, which the graph rewrite does (it gathers "
                                 "XᵀX): run RewriteLinear on the annotated graph first, or use "
                                 "weight_rounding='nearest'")
            layer.w_int8.copy_(annotation.layer.w_int8)
        set_submodule(model, name, layer.train(linear.training))
        swapped.append(name)
    return swapped


def naive_w8a8_(model: nn.Module, config: QuaffConfig | None = None) -> list[str]:
    """The baseline: the same int8 scheme with no outlier handling and per-token activation scales, on every
    eligible Linear (``config``'s act_group is not applied: naive W8A8 stays the per-token baseline)."""
    config = dataclasses.replace(config or QuaffConfig(), act_group=0)
    names = eligible_linears(model, config)
    no_outliers = {n: QuaffAnnotation(n, torch.zeros(0, dtype=torch.long), torch.zeros(0), 0.0) for n in names}
    return quantize_model_(model, no_outliers, config)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def quaff_skeleton_(model: nn.Module, layers: dict[str, dict[str, Any]], granularity: str = "channel") -> None:
    """Put empty QuaffLinears of the recorded shapes in place, ready for ``load_state_dict``. ``granularity``: the
    weight granularity of layers whose spec does not record it (artifacts written before it did: the config's).
    A spec without ``act_group`` was written before per-group activation scales existed: per token (0)."""
    for name, spec in layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise QuaffError(f"artifact names layer {name!r}, which the model does not have") from None
        wb = fp_linear(linear)
        if wb is None or tuple(wb[0].shape) != (spec["out_features"], spec["in_features"]):
            raise QuaffError(f"artifact layer {name!r} ({spec['in_features']}x{spec['out_features']}) does not "
                             f"match the model's {linear}")
        weight, bias = wb
        act_group = spec.get("act_group", 0)
        try:
            check_act_group(act_group)
        except QuaffError:
            raise QuaffError(f"artifact layer {name!r} has act_group {act_group!r}; an integer >= 0 was expected "
                             "(the manifest is damaged or was edited)") from None
        set_submodule(model, name, QuaffLinear(spec["in_features"], spec["out_features"], len(spec["outliers"]),
                                               bias is not None, weight.dtype, weight.device,
                                               spec.get("momentum", MOMENTUM), spec.get("exact_grad", False),
                                               spec.get("smoothed", False),
                                               spec.get("weight_granularity", granularity),
                                               act_group).train(linear.training))


def register_peft(peft_config):
    """Let PEFT put LoRA adapters on QuaffLinear targets (the base stays int8 and frozen) with a merge that
    re-quantizes; returns the config. Without it PEFT's merge would write into a dequantized copy."""
    peft_config._register_custom_module({QuaffLinear: _quaff_lora_class()})
    return peft_config


_FUSED_LORA = {"enabled": True}


def fused_lora(enabled: bool = True) -> None:
    """Whether PEFT's LoRA layers on QuaffLinears compute their adapter inside the base op (the default; on CUDA
    h · Bᵀ is added in the int8 GEMM's epilogue, with A and B cast to the activations' dtype: mixed precision,
    the adapter weights and their optimizer state keep their own dtype) or as PEFT does (an [M, N] LoRA output
    added to the base output, the adapter run in its weights' dtype). On an H100 the fused op's kernels are
    faster, but its host time per call is larger: it pays off where CUDA graphs take the launches off the CPU
    (torch.compile mode "reduce-overhead"); under plain torch.compile the 8B step was slower (README)."""
    _FUSED_LORA["enabled"] = bool(enabled)


@contextmanager
def lora_fusion(enabled: bool) -> Iterator[None]:
    """``fused_lora(enabled)`` for the block, the previous choice restored after it."""
    before = _FUSED_LORA["enabled"]
    fused_lora(enabled)
    try:
        yield
    finally:
        _FUSED_LORA["enabled"] = before


def _quaff_lora_class():
    from peft.tuners import lora

    class QuaffLoraLinear(lora.Linear):
        """LoRA on a QuaffLinear: the adapter fused into the base op (``fused_lora``) where the layer is a plain
        LoRA (one active adapter, no DoRA or other variant, no bias on B, not merged); merging adds B·A·scaling
        to the weight and re-quantizes it."""

        def _fusable_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
            if not _FUSED_LORA["enabled"] or args or kwargs or self.disable_adapters or self.merged:
                return None
            active = [a for a in self.active_adapters if a in self.lora_A]
            if len(active) != 1 or not x.is_floating_point():
                return None
            name = active[0]
            if name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False):
                return None
            a, b = self.lora_A[name], self.lora_B[name]
            if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)) or b.bias is not None:
                return None
            return name

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            name = self._fusable_adapter(x, args, kwargs)
            if name is None:
                return super().forward(x, *args, **kwargs)
            h = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight.to(x.dtype)) * self.scaling[name]
            return self.get_base_layer()(x, lora=(h, self.lora_B[name].weight.to(x.dtype)))

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            base = self.get_base_layer()
            for name in check_adapters_to_merge(self, adapter_names):
                if name in self.lora_A:
                    delta = self.get_delta_weight(name)
                    if safe_merge and not torch.isfinite(delta).all():
                        raise QuaffError(f"adapter {name!r} has non-finite weights; not merged")
                    base.add_delta_(delta)
                    self.merged_adapters.append(name)

        def unmerge(self) -> None:
            raise QuaffError("a merge into an int8 QuaffLinear re-quantizes the weight and cannot be undone; "
                             "reload the base")

    return QuaffLoraLinear
