"""Training data for ``quaff-fx finetune``: rows read and checked without a tokenizer (a bad row fails before
the model loads), then tokenized into examples with labels (-100 where no loss is taken) and collated.

Formats: a plain text file (packed token windows); JSON (a list of objects), JSONL or CSV rows with ``text``,
``prompt`` + ``completion`` (loss on the completion only) or chat ``messages`` (the tokenizer's chat template,
loss on the assistant turns only); a folder saved with ``datasets.Dataset.save_to_disk``.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import read_text, tokenize, windows
from ..errors import QuaffError

IGNORE = -100  # the label PyTorch's cross entropy skips
ROW_FILES = (".json", ".jsonl", ".csv")


@dataclass(frozen=True)
class Row:
    """One checked training row: its kind ('text', 'prompt', 'chat') and where it came from (for messages)."""

    kind: str
    fields: dict[str, Any]
    where: str


def read_rows(path: str | Path | None) -> list[Row] | str:
    """The checked rows of a JSON/JSONL/CSV file or saved ``datasets`` folder, or the text of a plain text file
    (None: the bundled training text). A bad row raises a QuaffError naming the file, the line and the field."""
    if path is None:
        return read_text(None, "calibration")
    path = Path(path)
    if path.is_dir():
        return [check_row(r, f"{path}: row {i + 1}") for i, r in enumerate(_saved_dataset(path))]
    suffix = path.suffix.lower()
    if suffix not in ROW_FILES:
        return read_text(path, "training")
    text = read_text(path, "training")
    if suffix == ".jsonl":
        return [
            check_row(_json(line, f"{path}:{i + 1}"), f"{path}:{i + 1}")
            for i, line in enumerate(text.splitlines())
            if line.strip()
        ]
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [check_row(dict(r), f"{path}:{reader.line_num}") for r in reader]
    data = _json(text, str(path))
    if not isinstance(data, list):
        raise QuaffError(
            f"{path}: a JSON training file holds a list of objects (or use JSONL), got {type(data).__name__}"
        )
    return [check_row(r, f"{path}: item {i + 1}") for i, r in enumerate(data)]


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuaffError(f"{where}: not valid JSON ({exc.msg})") from None


def _saved_dataset(path: Path):
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise QuaffError(f"{str(path)!r} is not a folder saved with datasets' save_to_disk: {exc}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise QuaffError(f"{str(path)!r} holds splits {sorted(data)}, none named 'train'")
        data = data["train"]
    return data


def check_row(row: Any, where: str) -> Row:
    """One row as a Row; the first missing or mistyped field is an error that names it."""
    if not isinstance(row, dict):
        raise QuaffError(
            f"{where}: a row is an object with 'text', 'prompt'+'completion' or 'messages', got {type(row).__name__}"
        )
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise QuaffError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise QuaffError(f"{where}: field 'messages[{j}]' needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise QuaffError(f"{where}: field 'messages' has no assistant turn, so nothing to learn")
        return Row("chat", {"messages": msgs}, where)
    if "prompt" in row or "completion" in row:
        for field in ("prompt", "completion"):
            if not isinstance(row.get(field), str):
                raise QuaffError(f"{where}: field {field!r} is missing or not a string")
        if not row["completion"]:
            raise QuaffError(f"{where}: field 'completion' is empty")
        return Row("prompt", {"prompt": row["prompt"], "completion": row["completion"]}, where)
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        raise QuaffError(f"{where}: field 'text' is missing or empty (or give 'prompt'+'completion' or 'messages')")
    return Row("text", {"text": row["text"]}, where)


def encode_row(row: Row, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row; labels are -100 on tokens that take no loss (prompts, user turns)."""
    if row.kind == "text":
        return _segments(tokenizer, [(row.fields["text"], True)], eos=True)
    if row.kind == "prompt":
        return _segments(tokenizer, [(row.fields["prompt"], False), (row.fields["completion"], True)], eos=True)
    return _segments(tokenizer, chat_segments(tokenizer, row.fields["messages"], row.where), eos=False)


def chat_segments(tokenizer, messages: list[dict[str, str]], where: str = "chat") -> list[tuple[str, bool]]:
    """The conversation as rendered by the tokenizer's chat template, cut into (text, trained) pieces: an
    assistant turn's text is what its message adds to the rendering of the conversation up to its prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise QuaffError(f"{where}: chat 'messages' need a tokenizer with a chat template; this one has none")

    def render(msgs, prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise QuaffError(f"{where}: the chat template does not render turns as prefixes of each other")
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    full = render(messages, False)
    if full.startswith(done) and len(full) > len(done):
        pieces.append((full[len(done) :], False))
    return [(t, trained) for t, trained in pieces if t]


def _segments(tokenizer, pieces: list[tuple[str, bool]], eos: bool) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tokenize(tokenizer, text).tolist()
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def build_examples(
    source: list[Row] | str, tokenizer, seq_len: int, packing: bool, name: str
) -> list[dict[str, list[int]]]:
    """Examples of at most ``seq_len`` tokens. Text is cut into windows; rows are one example each (cut at
    ``seq_len``) or, with ``packing``, concatenated and cut into full windows."""
    if isinstance(source, str):
        win = windows(tokenize(tokenizer, source), seq_len)
        if win.shape[0] == 0:
            raise QuaffError(
                f"{name} has too few tokens for one window of {seq_len}; pass a longer text or a smaller --seq-len"
            )
        return [{"input_ids": w.tolist(), "labels": w.tolist()} for w in win]
    encoded = [encode_row(r, tokenizer) for r in source]
    if packing:
        ids = [t for e in encoded for t in e[0]]
        labels = [t for e in encoded for t in e[1]]
        n = len(ids) // seq_len
        if n == 0:
            raise QuaffError(
                f"{name} has {len(ids)} tokens, too few to pack one window of {seq_len}; use a smaller --seq-len"
            )
        examples = [
            {"input_ids": ids[i * seq_len : (i + 1) * seq_len], "labels": labels[i * seq_len : (i + 1) * seq_len]}
            for i in range(n)
        ]
    else:
        examples = [{"input_ids": i[:seq_len], "labels": lab[:seq_len]} for i, lab in encoded]
    kept = [e for e in examples if any(t != IGNORE for t in e["labels"][1:])]
    if not kept:
        raise QuaffError(f"{name}: no example has a trained token within --seq-len {seq_len}")
    return kept


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random ``fraction`` of the examples held out (at least one when fraction > 0)."""
    if fraction <= 0:
        return examples, []
    if not fraction < 1:
        raise QuaffError(f"--eval-split must be in [0, 1), got {fraction}")
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise QuaffError(f"--eval-split {fraction} leaves no training example of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class Collator:
    """Pads a batch to its longest example: input_ids with the pad id, labels with -100, an attention mask."""

    def __init__(self, pad_id: int | None) -> None:
        self.pad_id = pad_id if pad_id is not None else 0

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_id(tokenizer) -> int | None:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
