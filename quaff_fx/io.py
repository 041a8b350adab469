"""Artifacts: safetensors for tensors, JSON for metadata, a format version in each, atomic writes.

Stats file: one ``.safetensors`` whose header metadata holds the stats JSON under "quaff".
Model folder: ``quaff.json`` (format, version, load recipe, HF config, quaff config, layer specs,
reports), ``model.safetensors`` (the rewritten model's state; tied tensors stored once), ``stats.safetensors``,
and ``tokenizer/``. Loading never unpickles and checks every tensor against the JSON before use.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .calibration import CalibrationStats
from .errors import QuaffError

MODEL_FORMAT = "quaff-fx/model"
MODEL_VERSION = 1
MANIFEST = "quaff.json"
WEIGHTS = "model.safetensors"
SHARD = "model-{:05d}-of-{:05d}.safetensors"
SHARD_BYTES = 2 << 30  # weights larger than this are written as shards of about this size
STATS = "stats.safetensors"


# -- atomic writes ----------------------------------------------------------------------------------
def check_target(path: str | Path, force: bool) -> None:
    """An output may be written: it does not exist (or ``force``) and its folder does."""
    path = Path(path)
    if path.exists() and not force:
        raise QuaffError(f"{str(path)!r} exists; pass --force (force=True) to overwrite it")
    if not path.resolve().parent.is_dir():
        raise QuaffError(f"folder {str(path.resolve().parent)!r} does not exist")


@contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename, on error
    it is removed, so an interrupted write leaves no half artifact and the old one intact."""
    path = Path(path)
    check_target(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the artifact is an ordinary folder
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) create files 0600; an artifact is ordinary files
            if f.is_file():
                f.chmod(_file_mode())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_file(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp makes it 0600; an artifact's files are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode() -> int:
    """0666 less the process umask: the mode ``open()`` would have given the file (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True)
    _atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QuaffError(f"{str(path)!r} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuaffError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise QuaffError(f"{str(path)!r} does not hold a JSON object")
    return data


def read_safetensors(path: Path,
                     device: str | torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; any damage becomes a QuaffError."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise QuaffError(f"{str(path)!r} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path), device=str(device or "cpu")), meta
    except Exception as exc:  # safetensors raises several types on damaged files; all mean the same here
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QuaffError(f"{str(path)!r} is not a readable safetensors file: {why}") from None


# -- calibration stats ------------------------------------------------------------------------------
def save_stats(stats: CalibrationStats, path: str | Path, force: bool = False) -> None:
    path = Path(path)
    check_target(path, force)
    _atomic_file(path, lambda tmp: _write_stats(stats, tmp))


def _write_stats(stats: CalibrationStats, path: str | Path) -> None:
    """The stats tensors, with their JSON metadata in the safetensors header under "quaff"."""
    save_file(stats.to_tensors(), str(path), metadata={"quaff": json.dumps(stats.metadata(), sort_keys=True)})


def load_stats(path: str | Path) -> CalibrationStats:
    tensors, meta = read_safetensors(Path(path))
    try:
        header = json.loads(meta["quaff"])
    except (KeyError, json.JSONDecodeError):
        raise QuaffError(f"{str(path)!r} is a safetensors file but holds no quaff-fx calibration stats") from None
    if not isinstance(header, dict):
        raise QuaffError(f"{str(path)!r}: malformed stats header")
    return CalibrationStats.from_parts(header, tensors, where=str(path))


# -- quantized models -------------------------------------------------------------------------------
def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied tensors (one storage, several names) are stored once; the other names become aliases."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous()
    return unique, aliases


def save_quantized(model: nn.Module, out: str | Path, manifest: dict[str, Any], stats: CalibrationStats | None = None,
                   tokenizer=None, force: bool = False, shard_bytes: int = SHARD_BYTES,
                   state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a quantized HF model as an artifact folder; ``manifest`` holds source, config, layers, reports. The
    weights go to ``model.safetensors``, or, past ``shard_bytes``, to shards ``model-0000i-of-0000n.safetensors``
    (tensors may stay on the GPU: each is copied to the host as its shard is written). ``state``: the model's
    tensors by state_dict name, where ``model.state_dict()`` would not give them whole (an FSDP2 model)."""
    state, aliases = _dedupe(model.state_dict() if state is None else state)
    full = {**manifest, "format": MODEL_FORMAT, "version": MODEL_VERSION, "aliases": aliases,
            "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for n, t in state.items()},
            "model_config": model.config.to_dict() if hasattr(model, "config") else None}
    with atomic_dir(out, force) as tmp:
        shards = _shards(state, shard_bytes)
        if len(shards) == 1:
            save_file(state, str(tmp / WEIGHTS))
            full["weights_sha256"] = sha256(tmp / WEIGHTS)
        else:
            full["shards"] = {}
            for i, names in enumerate(shards):
                name = SHARD.format(i + 1, len(shards))
                save_file({n: state[n] for n in names}, str(tmp / name))
                full["shards"][name] = {"sha256": sha256(tmp / name), "tensors": names}
        if stats is not None:
            _write_stats(stats, tmp / STATS)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_json(tmp / MANIFEST, full)
    return Path(out)


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Tensor names split, in order, into runs of at most ``limit`` bytes (a larger tensor alone)."""
    out: list[list[str]] = [[]]
    used = 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        if out[-1] and used + size > limit:
            out.append([])
            used = 0
        out[-1].append(name)
        used += size
    return out


def is_artifact(folder: str | Path | None) -> bool:
    """A folder holding a ``quaff.json``: what every command treats as a quaff-fx artifact (``read_manifest``
    then checks its format and version). None or "" (no model named) is not one."""
    if not folder:
        return False
    folder = Path(folder)
    return folder.is_dir() and (folder / MANIFEST).is_file()


def build_manifest(source: dict[str, Any], config, layers: dict[str, dict[str, Any]], reports=()) -> dict[str, Any]:
    """The caller's part of an artifact's manifest (``save_quantized`` adds format, version, tensors and checksum):
    where the model came from, the QuaffConfig, the layer specs and the pass reports."""
    return {"source": dict(source), "config": config.to_dict(), "layers": layers,
            "reports": [r if isinstance(r, dict) else r.to_dict() for r in reports]}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise QuaffError(f"{str(folder)!r} is not a quaff-fx artifact folder")
    manifest = read_json(folder / MANIFEST)
    if manifest.get("format") != MODEL_FORMAT:
        raise QuaffError(f"{str(folder)!r} is not a quaff-fx model artifact (format {manifest.get('format')!r})")
    if manifest.get("version") != MODEL_VERSION:
        raise QuaffError(f"{str(folder)!r} has artifact format version {manifest.get('version')!r}; this quaff-fx "
                         f"reads version {MODEL_VERSION}")
    for key in ("model_config", "layers", "tensors", "config"):
        if not isinstance(manifest.get(key), dict):
            raise QuaffError(f"{str(folder / MANIFEST)!r} lacks its {key!r} section")
    return manifest


def sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files(manifest: dict[str, Any]) -> dict[str, str | None]:
    """The artifact's weight files with the checksum the manifest recorded for each."""
    shards = manifest.get("shards")
    if isinstance(shards, dict) and shards:
        return {name: spec.get("sha256") if isinstance(spec, dict) else None for name, spec in shards.items()}
    return {WEIGHTS: manifest.get("weights_sha256")}


def check_weights(folder: str | Path, manifest: dict[str, Any]) -> None:
    """The weights file(s) exist and have the checksums the manifest recorded (a flipped bit is caught here)."""
    folder = Path(folder)
    for name, digest in weight_files(manifest).items():
        if not (folder / name).is_file():
            raise QuaffError(f"{str(folder / name)!r} is missing")
        if digest != sha256(folder / name):
            raise QuaffError(f"{str(folder / name)!r} does not match the checksum in {MANIFEST}: "
                             "the file is damaged or was edited")


def load_state_checked(folder: Path, manifest: dict[str, Any],
                       device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The artifact's tensors, each checked against the manifest's shape and dtype; aliases filled in.
    The weights file must have the checksum the manifest recorded (a flipped bit is caught here)."""
    check_weights(folder, manifest)
    state = {}
    for name in weight_files(manifest):
        state.update(read_safetensors(folder / name, device)[0])
    expected = manifest["tensors"]
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise QuaffError(f"the weights of {str(folder)!r} do not match {MANIFEST}: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, spec in expected.items():
        t = state[name]
        if list(t.shape) != list(spec.get("shape", [])) or str(t.dtype).removeprefix("torch.") != spec.get("dtype"):
            raise QuaffError(f"tensor {name!r} is {tuple(t.shape)} {t.dtype}, {MANIFEST} says {spec}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise QuaffError(f"tensor {name!r} in {str(folder)!r} holds NaN or Inf")
    for alias, source in manifest.get("aliases", {}).items():
        if source not in state:
            raise QuaffError(f"alias {alias!r} points at {source!r}, which the artifact does not hold")
        state[alias] = state[source]
    return state


def config_of(manifest: dict[str, Any]):
    """The QuaffConfig an artifact was made with (``QuaffConfig.from_dict`` of its manifest's ``config``)."""
    from .config import QuaffConfig

    return QuaffConfig.from_dict(manifest["config"])


def load_quantized(folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load an artifact folder written by ``save_quantized``: (LoadedModel with the HF model and its QuaffLinears and
    the tokenizer, the manifest). Needs no calibration data and no original weights. ``device``: where the model is
    built and its tensors loaded (default the CPU); ``dtype``: the FP dtype (default: the saved one)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        return _load_quantized(folder, manifest, dtype, device)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise QuaffError(f"{str(folder)!r}: the artifact's manifest is malformed "
                         f"({type(exc).__name__}: {exc})") from None


def _load_quantized(folder: Path, manifest: dict[str, Any], dtype: torch.dtype | None,
                    device) -> tuple[Any, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hf import quaff_skeleton_
    from .model_loading import LoadedModel

    config = config_of(manifest)
    cfg = dict(manifest["model_config"])
    try:
        hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except (KeyError, ValueError, TypeError) as exc:
        raise QuaffError(f"{str(folder)!r}: cannot rebuild the model config ({exc})") from None
    state = load_state_checked(folder, manifest, device)
    dtype = dtype or _weights_dtype(state)
    with torch.device(device or "cpu"):  # built where it will run: no second copy on the host
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    quaff_skeleton_(model, manifest["layers"], config.weight_granularity)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise QuaffError(f"{str(folder)!r}: the weights do not fit the model: {str(exc).splitlines()[0]}") from None
    model.eval()
    try:
        tokenizer_dir = folder / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir.is_dir() else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QuaffError(f"{str(folder / 'tokenizer')!r} cannot be loaded: {str(exc).splitlines()[0][:200]}") from None
    return LoadedModel(model, tokenizer, dict(manifest.get("source", {}))), manifest


def _weights_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    for t in state.values():
        if t.is_floating_point() and t.dim() == 2:
            return t.dtype
    return torch.float32
