"""The bundled calibration corpus, deterministic mixing of calibration data, and leave-one-source-out selection."""
from __future__ import annotations

import json

import pytest
import torch

from quaff_fx.config import PRESETS, OutlierConfig, QuaffConfig
from quaff_fx.corpus import (
    BUNDLED,
    DEFAULT_BATCHES,
    DEFAULT_TEXT,
    calibration_batches,
    calibration_windows,
    corpus_dir,
    corpus_sources,
    describe,
    interleave,
    source_windows,
    spread_order,
    to_batches,
)
from quaff_fx.data import read_text, tokenize
from quaff_fx.errors import QuaffError
from quaff_fx.sweep import leave_one_source_out, summarize
from tests.conftest import tiny_llama


def test_corpus_manifest_lists_every_file_with_genre_and_licence():
    sources = corpus_sources()
    assert len(sources) >= 6
    assert len({s.genre.split(" (")[0] for s in sources}) >= 5  # prose, docs, code, Q&A, changelog, legal
    for s in sources:
        assert s.path.is_file() and s.path.stat().st_size > 1000, s.name
        assert s.licence and s.origin
    on_disk = {p.name for p in corpus_dir().glob("*.txt")}
    assert on_disk <= {s.path.name for s in sources}  # no unlisted text ships
    total = sum(s.path.stat().st_size for s in sources)
    assert total <= 1 << 20, f"corpus is {total} bytes, over 1 MB"
    json.loads((corpus_dir() / "sources.json").read_text())


def test_spread_order_is_a_permutation_whose_prefixes_cover_the_text():
    order = spread_order(50)
    assert sorted(order) == list(range(50))
    assert max(order[:5]) - min(order[:5]) > 25  # the first few windows come from all over the text, not its start


def test_interleave_is_round_robin_and_drops_exhausted_groups():
    a, b = torch.zeros(3, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    assert interleave([a, b])[:, 0].tolist() == [0, 1, 0, 0]
    with pytest.raises(QuaffError, match="shorter than one window"):
        interleave([torch.zeros(0, 4, dtype=torch.long)])


def test_bundled_corpus_mixes_every_source_deterministically(tiny_tokenizer):
    first = calibration_batches(tiny_tokenizer, (BUNDLED,), num_batches=7, batch_size=1, seq_len=64)
    again = calibration_batches(tiny_tokenizer, (BUNDLED,), num_batches=7, batch_size=1, seq_len=64)
    assert len(first) == 7 and all(torch.equal(x, y) for x, y in zip(first, again))
    # one window from each of the 7 sources in turn, each source's first window being its first tokens
    for source, batch in zip(corpus_sources(), first):
        assert torch.equal(batch[0], tokenize(tiny_tokenizer, read_text(source.path))[:64]), source.name


def test_the_default_is_the_bundled_corpus(tiny_tokenizer):
    """An empty spec calibrates on the corpus (every source in turn), as 'bundled' does, DEFAULT_BATCHES by default."""
    from quaff_fx import CalibrationConfig

    got = calibration_batches(tiny_tokenizer, (), num_batches=4, batch_size=2, seq_len=64)
    want = calibration_batches(tiny_tokenizer, (BUNDLED,), num_batches=4, batch_size=2, seq_len=64)
    assert [b.shape for b in got] == [(2, 64)] * 4 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert describe(()) == DEFAULT_TEXT == describe((BUNDLED,)) == "bundled corpus"
    assert CalibrationConfig().num_batches == DEFAULT_BATCHES == 4 and CalibrationConfig().describe() == DEFAULT_TEXT


def test_user_text_and_bundled_corpus_share_half_and_half(tiny_tokenizer, tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("quaff calibration text of the user " * 400)
    win = calibration_windows(tiny_tokenizer, (mine, "bundled"), seq_len=32)
    own = calibration_windows(tiny_tokenizer, (mine,), seq_len=32)
    assert torch.equal(win[0::2][: own.shape[0]], own)  # every other window is the user's, in its own order
    corpus = calibration_windows(tiny_tokenizer, (), seq_len=32)
    assert torch.equal(win[1:2 * own.shape[0]:2], corpus[: own.shape[0]])


def test_dataset_file_is_read_by_its_text_column(tiny_tokenizer, tmp_path):
    rows = tmp_path / "data.jsonl"
    texts = [f"row number {i} of the user's dataset. " * 20 for i in range(20)]
    rows.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)))
    batches = calibration_batches(tiny_tokenizer, (rows,), num_batches=2, batch_size=2, seq_len=32)
    expected = source_windows(tokenize(tiny_tokenizer, "\n\n".join(texts)), 32)
    assert len(batches) == 2 and torch.equal(torch.cat(batches), expected[:4])
    bad = tmp_path / "nums.csv"
    bad.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(QuaffError, match="no text column"):
        calibration_batches(tiny_tokenizer, (bad,))


def test_too_little_calibration_data_names_the_fix():
    with pytest.raises(QuaffError, match="too few for one batch of 4"):
        to_batches(torch.zeros(3, 8, dtype=torch.long), 4)


def test_presets_by_name_unchanged():
    assert set(PRESETS) == {"default", "accurate", "fast", "paper"}
    assert QuaffConfig.preset("accurate") == QuaffConfig.preset("default") == QuaffConfig()
    fast, paper = QuaffConfig.preset("fast"), QuaffConfig.preset("paper")
    assert (fast.smooth_alpha, fast.weight_rounding, fast.act_group) == (None, "nearest", 0)
    assert fast.outliers == OutlierConfig("top_abs", 100.0, 0.01)
    assert (paper.smooth_alpha, paper.weight_rounding, paper.act_group) == (None, "nearest", 0)
    assert paper.outliers == OutlierConfig("mean_times", 100.0, 0.01)
    default = QuaffConfig()
    assert default.weight_rounding == "gptq" and default.smooth_shared and default.outliers.strategy == "top_abs"
    assert default.act_group == 128 and default.act_group_layers == ("down_proj", "fc2", "dense_4h_to_h", "w2")


def test_summarize_reports_mean_and_worst_text():
    assert summarize({"a": 0.01, "b": 0.03, "c": -0.01}) == {"mean": pytest.approx(0.01), "worst": ["b", 0.03]}


@pytest.mark.slow  # end to end: the corpus selection experiment, one calibration per source
def test_leave_one_source_out_on_a_tiny_model():
    torch.manual_seed(0)
    sources = {f"s{i}": torch.randint(0, 256, (400,)) for i in range(3)}
    candidates = {"plain": QuaffConfig.preset("fast"), "smoothed": QuaffConfig.preset("fast", smooth_alpha=0.5)}
    seen = []
    run = leave_one_source_out(tiny_llama(), sources, candidates, num_batches=2, batch_size=2, seq_len=32,
                               eval_batches=1,
                               always={"extra": torch.randint(0, 256, (200,))}, progress=seen.append)
    assert list(run["folds"]) == ["s0", "s1", "s2"] and len(seen) == 6
    fold = run["folds"]["s1"]
    assert fold["calib_tokens"] == 2 * 2 * 32 and set(fold["delta"]) == set(candidates)
    for label in candidates:  # the summary is the folds' mean and worst, and the choice the least mean
        deltas = {h: f["delta"][label] for h, f in run["folds"].items()}
        assert run["summary"][label] == summarize(deltas)
    assert run["chosen"] == min(candidates, key=lambda c: run["summary"][c]["mean"])
    assert any(d != 0 for d in fold["delta"].values())  # quantization changed the model


def test_corpus_tokenized_once_per_tokenizer_and_batches_are_copies(tiny_tokenizer):
    """The default calibration tokenizes the corpus files once per tokenizer; the batches it returns share no memory
    with that cache (writing into one does not change the next call's)."""
    from quaff_fx import corpus

    first = calibration_batches(tiny_tokenizer, (), num_batches=2, batch_size=2, seq_len=64)
    cached = dict(corpus._SOURCE_IDS[tiny_tokenizer])
    assert {s.path for s in corpus_sources()} <= set(cached)
    assert all(torch.equal(ids, tokenize(tiny_tokenizer, read_text(p))) for p, ids in cached.items())
    want = [b.clone() for b in first]
    first[0].fill_(0)
    again = calibration_batches(tiny_tokenizer, (), num_batches=2, batch_size=2, seq_len=64)
    assert all(torch.equal(a, w) for a, w in zip(again, want))
