"""Artifacts: sharded save and load, the device option, the config and weight granularity recorded and read back."""
from __future__ import annotations

import json

import pytest
import torch

from quaff_fx import CalibrationConfig, OutlierConfig, QuaffConfig, QuaffError, QuaffLinear, quantize_
from quaff_fx.io import build_manifest, config_of, load_quantized, save_quantized

CFG = QuaffConfig.preset("fast", outliers=OutlierConfig("mean_times", threshold=10.0, max_ratio=0.05),
                         weight_granularity="tensor")


@pytest.fixture()
def quantized(llama):
    batches = (torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)),)
    result = quantize_(llama, CFG, CalibrationConfig(token_batches=batches))
    return llama, build_manifest({"kind": "test"}, CFG, result.layers, result.reports)


def test_sharded_artifact_round_trips(quantized, tmp_path):
    model, manifest = quantized
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=ids).logits
    out = save_quantized(model, tmp_path / "art", manifest, shard_bytes=40_000)
    files = sorted(p.name for p in out.glob("model*.safetensors"))
    saved = json.loads((out / "quaff.json").read_text())
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert "weights_sha256" not in saved
    assert sorted(saved["shards"]) == files
    back, back_manifest = load_quantized(out)
    assert torch.equal(back.model(input_ids=ids).logits, expected)
    assert config_of(back_manifest) == CFG  # the config the artifact was made with, read back with from_dict
    q = back.model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuaffLinear) and q.weight_granularity == "tensor"  # recorded, not guessed
    q.add_delta_(torch.randn(q.out_features, q.in_features) * 1e-3)
    assert bool((q.w_scale == q.w_scale[0]).all())  # a merge keeps one scale per tensor
    damaged = out / files[1]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    with pytest.raises(QuaffError, match="does not match the checksum"):
        load_quantized(out)


def test_small_artifact_stays_one_file_and_loads_onto_a_device(quantized, tmp_path):
    model, manifest = quantized
    out = save_quantized(model, tmp_path / "art", manifest)
    assert [p.name for p in out.glob("model*.safetensors")] == ["model.safetensors"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    back, _ = load_quantized(out, device=device)
    assert {p.device.type for p in back.model.parameters()} | {b.device.type for b in back.model.buffers()} == {device}
    ids = torch.randint(0, 256, (1, 6), device=device)
    assert back.model(input_ids=ids).logits.shape == (1, 6, 256)
    half, _ = load_quantized(out, dtype=torch.bfloat16, device="cpu")
    assert half.model.model.layers[0].mlp.up_proj.w_outlier.dtype == torch.bfloat16
