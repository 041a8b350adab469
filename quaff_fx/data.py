"""Text → batches of token windows. Bundled texts ship in ``quaff_fx/data`` (see its README)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from .errors import QuaffError

BUNDLED = {"calibration": "apache-2.0.txt", "heldout": "gpl-3.0.txt"}
# held-out texts from three different sources (legal text, language reference, software manual)
HELDOUT = ("gpl-3.0.txt", "python-reference.txt", "vim-user-manual.txt")


def bundled_text_path(kind: str = "calibration") -> Path:
    """Path of a bundled text: 'calibration' (Apache-2.0) or 'heldout' (GPL-3)."""
    return Path(str(resources.files("quaff_fx") / "data" / BUNDLED[kind]))


def heldout_paths() -> dict[str, Path]:
    """The bundled held-out texts, by file name."""
    root = resources.files("quaff_fx") / "data"
    return {name: Path(str(root / name)) for name in HELDOUT}


def read_text(path: str | Path | None, kind: str = "calibration") -> str:
    """Read a UTF-8 text file (the bundled one when ``path`` is None); empty text is an error."""
    path = bundled_text_path(kind) if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuaffError(f"text file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise QuaffError(f"text file {str(path)!r} is a folder, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QuaffError(f"cannot read text file {str(path)!r}: {exc}") from None
    if not text.strip():
        raise QuaffError(f"text file {str(path)!r} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D LongTensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] covering ``ids`` in order; the tail that does not fill one is dropped."""
    if seq_len < 2:
        raise QuaffError(f"sequence length must be >= 2, got {seq_len}")
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, max_batches: int | None = None,
            source: str = "text") -> Iterator[torch.Tensor]:
    """Consecutive batches [batch_size, seq_len] of windows; a text too short for one batch is an error."""
    if batch_size < 1:
        raise QuaffError(f"batch size must be >= 1, got {batch_size}")
    win = windows(ids, seq_len)
    n_batches = win.shape[0] // batch_size
    if n_batches == 0:
        raise QuaffError(f"{source} has {ids.numel()} tokens, too few for one batch of {batch_size} x {seq_len}; "
                         "pass a longer text or a smaller --seq-len/--batch-size")
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for i in range(n_batches):
        yield win[i * batch_size:(i + 1) * batch_size]


def count_batches(ids: torch.Tensor, seq_len: int, batch_size: int, max_batches: int | None) -> int:
    n = (ids.numel() // seq_len) // batch_size
    return n if max_batches is None else min(n, max_batches)
