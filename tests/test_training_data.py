"""Training data for ``quaff-fx finetune``, the cases test_training.py leaves open: packed rows keep their label
masking and padding takes no loss; a bad row in --data or --eval-data ends in one line, exit 2, nothing written."""

import json

import pytest

from quaff_fx.cli import main
from quaff_fx.training import build_examples, read_rows
from quaff_fx.training.data import IGNORE, Collator, encode_row

ROWS = [{"prompt": f"Question {i}: what is licensed?", "completion": f" The work, part {i}."} for i in range(12)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_packing_keeps_prompt_tokens_masked(tiny_tokenizer, tmp_path):
    """Packed windows are the rows' (ids, labels) laid end to end and cut every 16 tokens: the prompts' -100s travel
    with their tokens, and a window with nothing to learn (all prompt) is left out."""
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", ROWS))
    encoded = [encode_row(r, tiny_tokenizer) for r in rows]
    ids = [t for e in encoded for t in e[0]]
    labels = [t for e in encoded for t in e[1]]
    cuts = [slice(16 * k, 16 * (k + 1)) for k in range(len(ids) // 16)]
    expected = [{"input_ids": ids[c], "labels": labels[c]} for c in cuts if any(t != IGNORE for t in labels[c][1:])]
    packed = build_examples(rows, tiny_tokenizer, 16, True, "d")
    assert packed == expected
    assert 0 < len(packed) < len(cuts)  # this tokenizer's long prompts fill some windows alone
    assert any(IGNORE in e["labels"] for e in packed)  # masking survives the packing


def test_padding_takes_no_loss():
    batch = Collator(pad_id=7)([{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},
                                {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("bad_in", ["--data", "--eval-data"])
def test_a_bad_row_ends_in_one_line_before_the_model_loads(tiny_model_dir, tmp_path, capsys, bad_in):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "no completion here"}])
    data, eval_data = (bad, good) if bad_in == "--data" else (good, bad)
    out = tmp_path / "ft"
    argv = ["finetune", str(tiny_model_dir), "--data", str(data), "--eval-data", str(eval_data), "--out", str(out)]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{bad}:2: field 'completion' is missing" in lines[0], lines
    assert not out.exists()
