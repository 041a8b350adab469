"""The bundled calibration corpus and deterministic mixing of calibration text.

The corpus (``quaff_fx/data/corpus``, manifest ``sources.json``: file, genre, origin, licence) holds a few
sources of different kinds of writing, so a Hessian and smoothing factors estimated from it do not fit only
one genre. Calibration windows are drawn from every source in turn (round robin), and from each source at
positions spread over the whole text, so any prefix of the windows (a small ``num_batches``) is balanced.

A calibration spec is a list of items, each one equal share of the windows:
    ``"bundled"`` (or an empty list)  the bundled corpus (itself mixed source by source)
    a text file                       UTF-8 text
    a dataset                         ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a ``datasets.save_to_disk``
                                      folder; its ``text`` column (or first string column), rows joined
so ``("mine.txt", "bundled")`` is half the user's text and half the corpus. Everything is deterministic: no RNG.
"""
from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .data import read_text, tokenize
from .errors import QuaffError

BUNDLED = "bundled"
DEFAULT_TEXT = "bundled corpus"  # what an empty spec calibrates on (the corpus: README, Accuracy)
DEFAULT_BATCHES = 4  # of 2 x 256 tokens: chosen leave-one-source-out within the CPU time targets (README, Accuracy)
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_GOLDEN = 0.6180339887498949  # golden-ratio stride: a low-discrepancy order of window positions


@dataclass(frozen=True)
class Source:
    """One text of the bundled corpus."""

    name: str  # file stem, e.g. "prose-devils-dictionary"
    path: Path
    genre: str
    origin: str
    licence: str


def corpus_dir() -> Path:
    return Path(str(resources.files("quaff_fx") / "data" / "corpus"))


def corpus_sources() -> list[Source]:
    """The bundled corpus's sources, in manifest order."""
    folder = corpus_dir()
    manifest = json.loads((folder / "sources.json").read_text(encoding="utf-8"))
    return [Source(Path(s["file"]).stem, (folder / s["file"]).resolve(), s["genre"], s["origin"], s["licence"])
            for s in manifest["sources"]]


def spread_order(n: int) -> list[int]:
    """Indices 0..n-1 in an order whose every prefix is spread over the whole range (deterministic)."""
    return sorted(range(n), key=lambda i: (i * _GOLDEN) % 1.0)


def source_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of one source, in ``spread_order``."""
    n = ids.numel() // seq_len
    win = ids[: n * seq_len].view(n, seq_len)
    return win[spread_order(n)] if n else win


def interleave(groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """Round robin over groups of windows (one from each in turn; exhausted groups drop out)."""
    groups = [g for g in groups if g.shape[0]]
    if not groups:
        raise QuaffError("no calibration window: every calibration text is shorter than one window; pass a longer text "
                         "or a smaller --seq-len")
    longest = max(g.shape[0] for g in groups)
    rows = [g[i] for i in range(longest) for g in groups if i < g.shape[0]]
    return torch.stack(rows)


def corpus_windows(tokenizer, seq_len: int, exclude: Sequence[str] = (),
                   only: Sequence[str] | None = None) -> torch.Tensor:
    """The bundled corpus as interleaved windows; ``exclude``/``only`` name sources (file stems) to leave out/keep."""
    sources = corpus_sources()
    names = {s.name for s in sources}
    unknown = sorted((set(exclude) | set(only or ())) - names)
    if unknown:
        raise QuaffError(f"unknown corpus source(s) {', '.join(unknown)}; the corpus has {', '.join(sorted(names))}")
    kept = [s for s in sources if s.name not in exclude and (only is None or s.name in only)]
    return interleave([source_windows(source_ids(tokenizer, s.path), seq_len) for s in kept])


_SOURCE_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {corpus file: token ids}


def source_ids(tokenizer, path: Path) -> torch.Tensor:
    """The token ids of a bundled corpus file, tokenized once per tokenizer (the files never change; every default
    calibration reads all of them)."""
    try:
        cache = _SOURCE_IDS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: no cache
        return tokenize(tokenizer, read_text(path))
    if path not in cache:
        cache[path] = tokenize(tokenizer, read_text(path))
    return cache[path]


def read_dataset(path: Path) -> str:
    """The text column of a local dataset (rows joined by blank lines)."""
    import datasets

    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            data = data[next(iter(data))] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise QuaffError(f"cannot read calibration dataset {str(path)!r}: {str(exc).splitlines()[0][:200]}") from None
    columns = ["text"] if "text" in data.column_names else [
        c for c, f in data.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not columns:
        raise QuaffError(f"calibration dataset {str(path)!r} has no text column "
                         f"(columns: {', '.join(data.column_names)}); "
                         "give it a 'text' column")
    text = "\n\n".join(t for t in data[columns[0]] if t)
    if not text.strip():
        raise QuaffError(f"calibration dataset {str(path)!r}: its {columns[0]!r} column is empty")
    return text


def item_windows(tokenizer, item: str | Path, seq_len: int) -> torch.Tensor:
    """Windows of one calibration item: 'bundled', a text file or a dataset."""
    if str(item) == BUNDLED and not Path(item).exists():
        return corpus_windows(tokenizer, seq_len)
    path = Path(item)
    is_dataset = path.is_dir() or path.suffix in DATASET_SUFFIXES
    return source_windows(tokenize(tokenizer, read_dataset(path) if is_dataset else read_text(path)), seq_len)


def calibration_windows(tokenizer, texts: Sequence[str | Path] = (), seq_len: int = 256) -> torch.Tensor:
    """All calibration windows [n, seq_len] of a spec (see the module doc), interleaved item by item."""
    if seq_len < 2:
        raise QuaffError(f"sequence length must be >= 2, got {seq_len}")
    return interleave([item_windows(tokenizer, t, seq_len) for t in (texts or (BUNDLED,))])


def to_batches(windows: torch.Tensor, batch_size: int, num_batches: int | None = None,
               source: str = "calibration data") -> list[torch.Tensor]:
    """Consecutive batches [batch_size, seq_len] of ``windows``, at most ``num_batches``."""
    if batch_size < 1:
        raise QuaffError(f"batch size must be >= 1, got {batch_size}")
    n = windows.shape[0] // batch_size if num_batches is None else min(windows.shape[0] // batch_size, num_batches)
    if n == 0:
        raise QuaffError(f"{source} has {windows.shape[0]} windows of {windows.shape[1]} tokens, too few for one batch "
                         f"of {batch_size}; pass more text or a smaller --seq-len/--batch-size")
    return [windows[i * batch_size:(i + 1) * batch_size] for i in range(n)]


def calibration_batches(tokenizer, texts: Sequence[str | Path] = (), num_batches: int | None = None,
                        batch_size: int = 2,
                        seq_len: int = 256) -> list[torch.Tensor]:
    """Token batches [batch_size, seq_len] for calibration from a spec. Empty: the default, the bundled corpus."""
    texts = tuple(texts) or (BUNDLED,)
    return to_batches(calibration_windows(tokenizer, texts, seq_len), batch_size, num_batches, describe(texts))


def describe(texts: Sequence[str | Path] = ()) -> str:
    """How stats record their calibration data: file names, 'bundled corpus' for the corpus."""
    texts = tuple(texts) or (BUNDLED,)
    return " + ".join("bundled corpus" if str(t) == BUNDLED else Path(t).name for t in texts)
