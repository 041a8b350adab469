"""A fine-tuned adapter folder: PEFT's own files plus the outlier scales training moved. The scales belong
with the adapter: the int8 base computes with them, so a base without them is not the model that was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import QuaffError
from ..io import atomic_dir, read_json, read_safetensors, write_json
from ..quaff_linear import QuaffLinear

SCALES = "quaff_scales.safetensors"


def whole(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a sharded one (FSDP2's DTensor), else the tensor itself. A shard kept in host memory
    (``shard_model(offload_layers=N)``) is gathered on its mesh's device: NCCL has no CPU backend."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.device.type != t.device_mesh.device_type:
        t = t.to(t.device_mesh.device_type)
    return t.full_tensor()


def base_of(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scale_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The momentum-updated outlier scales by base-model layer name (PEFT's prefixes and wrappers removed)."""
    return {
        f"{_base_name(n)}.act_scale": whole(m.act_scale.detach()).float().cpu().clone()
        for n, m in base_of(model).named_modules()
        if isinstance(m, QuaffLinear) and m.outlier_idx.numel()
    }


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


def load_scales_(model: nn.Module, scales: dict[str, torch.Tensor], where: str) -> int:
    """Copy saved outlier scales into ``model``'s QuaffLinears; every layer named must exist and fit."""
    layers = {f"{_base_name(n)}.act_scale": m for n, m in base_of(model).named_modules() if isinstance(m, QuaffLinear)}
    for name, t in scales.items():
        layer = layers.get(name)
        if layer is None or layer.act_scale.shape != t.shape:
            raise QuaffError(
                f"{where}: outlier scales {name!r} do not fit this model; load the adapter on the artifact "
                "it was trained on"
            )
        with torch.no_grad():
            layer.act_scale.copy_(t)
    return len(scales)


def write_scales(model: nn.Module, path: Path) -> None:
    save_file(scale_state(model) or {"_none": torch.zeros(0)}, str(path))


def read_scales(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_safetensors(path)[0].items() if k != "_none"}


def save_adapter(
    model: nn.Module, folder: str | Path, base: str | None, force: bool = True, state_dict: dict | None = None
) -> Path:
    """Write the adapter of a PEFT ``model`` atomically: PEFT's files, ``quaff_scales.safetensors`` and an
    adapter_config.json whose base model is ``base`` (the artifact or model trained on; None when unknown).
    ``state_dict``: the adapter's tensors whole where the model's are shards (``training.fsdp.adapter_state``)."""
    with atomic_dir(folder, force) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        write_scales(model, tmp / SCALES)
        config = read_json(tmp / "adapter_config.json")
        config["base_model_name_or_path"] = base
        write_json(tmp / "adapter_config.json", config)
    return Path(folder)


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    """``model`` (a Quaff artifact's model, from ``load_quantized``) with the adapter in ``adapter_dir`` on top
    and the outlier scales trained with it: the fine-tuned model as it was at the end of training."""
    import peft

    from ..finetune import quiet_peft, register_quaff_lora

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise QuaffError(
            f"{str(folder)!r} is not an adapter folder (no adapter_config.json); pass OUT/adapter of a finetune"
        )
    config = peft.PeftConfig.from_pretrained(str(folder))
    register_quaff_lora(config)
    scales = read_scales(folder / SCALES) if (folder / SCALES).is_file() else {}
    try:
        with quiet_peft():
            wrapped = peft.PeftModel.from_pretrained(model, str(folder), config=config, is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise QuaffError(
            f"{str(folder)!r}: the adapter does not fit this model: {str(exc).splitlines()[0][:200]}"
        ) from None
    load_scales_(wrapped, scales, str(folder))
    wrapped.eval()
    return wrapped


def adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """What an adapter folder says about itself: PEFT type and base model."""
    config = read_json(Path(adapter_dir) / "adapter_config.json")
    return {"peft_type": config.get("peft_type"), "base_model": config.get("base_model_name_or_path")}


def save_merged(peft_model, folder: Path, source: dict, tokenizer, config: dict | None) -> None:
    """Merge the LoRA adapters into the int8 base (re-quantizing it) and write a Quaff artifact with the config
    actually used."""
    from ..config import QuaffConfig
    from ..io import build_manifest, save_quantized
    from ..quaff_linear import QuaffLinear
    from ..transform import layer_spec
    from .fsdp import held_state, is_sharded

    sharded = is_sharded(peft_model)  # unshard_ made its tensors whole; its state_dict() would give the shards
    merged = peft_model.merge_and_unload()
    layers = {n: layer_spec(m) for n, m in merged.named_modules() if isinstance(m, QuaffLinear)}
    manifest = build_manifest(source, QuaffConfig.from_dict(config), layers)
    state = held_state(merged) if sharded else None
    save_quantized(merged, folder, manifest, tokenizer=tokenizer, force=True, state=state)
