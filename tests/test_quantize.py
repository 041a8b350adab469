"""quantize_: the one entry point; Quaff and the baselines as configs; timings; the config round trip."""
from __future__ import annotations

import copy

import pytest
import torch

from quaff_fx import (
    CalibrationConfig,
    LLMInt8Config,
    NaiveW8A8Config,
    OutlierConfig,
    QuaffConfig,
    QuaffError,
    QuaffLinear,
    SmoothQuantConfig,
    quantize_,
)

OUTLIERS = OutlierConfig("mean_times", threshold=10.0, max_ratio=0.05)


def calib(n: int = 2, seed: int = 0) -> CalibrationConfig:
    g = torch.Generator().manual_seed(seed)
    return CalibrationConfig(token_batches=tuple(torch.randint(0, 256, (2, 16), generator=g) for _ in range(n)))


def test_quantize_default_preset_swaps_layers_and_reports_phases(llama):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    ref = llama(input_ids=ids).logits
    result = quantize_(llama, QuaffConfig.preset("default", outliers=OUTLIERS), calib())
    assert result.model is llama and len(result.layers) == 14
    assert all(isinstance(llama.get_submodule(n), QuaffLinear) for n in result.layers)
    assert {"capture", "calibration", "xtx", "gptq", "rewrite"} <= set(result.timings)
    assert all(s >= 0 for s in result.timings.values())
    with result.timed("save"):
        pass
    assert [p for p, _ in result.timing_rows()] == ["capture", "calibration", "XᵀX", "GPTQ", "rewrite", "save"]
    assert result.stats.info["batches"] == 2 and result.stats.info["text"] == "token batches"
    assert 3 in result.layers["model.layers.0.self_attn.q_proj"]["outliers"]  # the planted channel
    assert (llama(input_ids=ids).logits - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.slow  # seconds of the fast tier's 2-minute budget
def test_saved_stats_give_the_same_model_as_calibrating(llama):
    cfg = QuaffConfig.preset("default", outliers=OUTLIERS)
    first, second = copy.deepcopy(llama), copy.deepcopy(llama)
    stats = quantize_(first, cfg, calib()).stats
    stats.batches = None  # as read from a file: GPTQ re-reads the calibration batches
    quantize_(second, cfg, calib(), stats=stats)
    for name, mod in first.named_modules():
        if isinstance(mod, QuaffLinear):
            assert torch.equal(mod.w_int8, second.get_submodule(name).w_int8), name
    with pytest.raises(QuaffError, match="calibrated with batch_size"):
        stats.batches = None
        quantize_(copy.deepcopy(llama), cfg, CalibrationConfig(token_batches=(torch.zeros(1, 16, dtype=torch.long),)),
                  stats=stats)


def test_baselines_are_configs_of_the_same_verb(llama):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    ref = llama(input_ids=ids).logits
    outs, results = {}, {}
    for cfg in (NaiveW8A8Config(), SmoothQuantConfig(alpha=0.5), LLMInt8Config(threshold=6.0)):
        m = copy.deepcopy(llama)
        results[type(cfg).__name__] = result = quantize_(m, cfg, calib())
        assert len(result.layers) == 14, cfg
        assert type(m.model.layers[0].mlp.up_proj) is not torch.nn.Linear
        outs[type(cfg).__name__] = (m(input_ids=ids).logits - ref).abs().max()
    # LLM.int8 keeps the planted heavy channels in FP: it is the closest of the three
    assert outs["LLMInt8Config"] < outs["NaiveW8A8Config"]
    assert 3 in results["LLMInt8Config"].layers["model.layers.0.self_attn.q_proj"]["outliers"]
    with pytest.raises(QuaffError, match="no handler for dict"):
        quantize_(llama, {"alpha": 0.5}, calib())


def test_calibration_config_checks_its_inputs(tiny_tokenizer):
    with pytest.raises(QuaffError, match="batch_size must be >= 1"):
        CalibrationConfig(batch_size=0)
    with pytest.raises(QuaffError, match="needs the tokenizer"):
        CalibrationConfig().batches(None)
    batches = CalibrationConfig(num_batches=3, batch_size=2, seq_len=32).batches(tiny_tokenizer)
    assert len(batches) == 3 and all(tuple(b.shape) == (2, 32) for b in batches)


def test_config_round_trips_with_its_format_version():
    cfg = QuaffConfig.preset("paper", smooth_alpha="auto", exclude=("lm_head",))
    data = cfg.to_dict()
    assert data["format_version"] == 1 and QuaffConfig.from_dict(data) == cfg
    old = {k: v for k, v in data.items() if k != "format_version"}  # artifacts written before the version field
    assert QuaffConfig.from_dict(old) == cfg
    with pytest.raises(QuaffError, match="format version 2"):
        QuaffConfig.from_dict({**data, "format_version": 2})
