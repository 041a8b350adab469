"""Fine-tuning on a Quaff model: every PEFT method, the Trainer, resume, merge, the CLI."""

import json
import math

import pytest
import torch
from conftest import TRAIN_IDS

from quaff_fx import QuaffError, QuaffLinear
from quaff_fx.cli import main
from quaff_fx.finetune import FinetuneConfig, make_peft_model, train


@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("ia3", 0.3), ("prompt", 0.3), ("prefix", 5e-2)])
def test_each_peft_method_trains_with_falling_loss(method, lr, quantized_tiny):
    model = quantized_tiny()
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("w_int8")}
    cfg = FinetuneConfig(peft=method, steps=12, batch_size=4, seq_len=32, lr=lr)
    peft_model = make_peft_model(model, cfg)
    # a fixed batch, so the fall is the method's doing, not the data's
    fixed = TRAIN_IDS[: 4 * 32].view(1, -1).expand(1, -1)
    log = train(peft_model, fixed.flatten().repeat(4), cfg)
    losses = log["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses
    for n, b in model.named_buffers():
        if n.endswith("w_int8"):
            assert torch.equal(b, frozen[n.replace("base_model.model.", "").replace(".base_layer", "")])


def test_scales_follow_momentum_in_training(quantized_tiny):
    model = quantized_tiny()
    before = model.model.layers[0].self_attn.q_proj.act_scale.clone()
    train(make_peft_model(model, FinetuneConfig(steps=3, seq_len=32)), TRAIN_IDS, FinetuneConfig(steps=3, seq_len=32))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.act_scale, before)


def test_resume_gives_the_same_next_losses(tmp_path, quantized_tiny):
    cfg = FinetuneConfig(steps=4, seq_len=32, checkpoint_every=2)
    full = train(make_peft_model(quantized_tiny(), cfg), TRAIN_IDS, cfg)["losses"]
    half = FinetuneConfig(steps=2, seq_len=32, checkpoint_every=2)
    train(make_peft_model(quantized_tiny(), half), TRAIN_IDS, half, out=tmp_path)
    resumed = train(make_peft_model(quantized_tiny(), cfg), TRAIN_IDS, cfg, out=tmp_path, resume=True)["losses"]
    assert len(resumed) == 4
    assert resumed[:2] == full[:2] or torch.allclose(torch.tensor(resumed[:2]), torch.tensor(full[:2]))
    assert torch.allclose(torch.tensor(resumed[2:]), torch.tensor(full[2:]), atol=1e-5)


def test_hf_trainer_runs_unchanged(tmp_path, quantized_tiny):
    from transformers import Trainer, TrainingArguments

    model = make_peft_model(quantized_tiny(), FinetuneConfig())
    data = [{"input_ids": w, "labels": w} for w in TRAIN_IDS[: 16 * 32].view(16, 32)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 4 and len(losses) == 4 and all(math.isfinite(v) for v in losses)


def test_lora_merge_requantizes_and_matches_unmerged(quantized_tiny):
    cfg = FinetuneConfig(steps=6, seq_len=32, lr=2e-2)
    peft_model = make_peft_model(quantized_tiny(), cfg)
    train(peft_model, TRAIN_IDS, cfg)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert isinstance(merged_model.model.layers[0].self_attn.q_proj, QuaffLinear)
    assert (merged - unmerged).abs().max() <= 0.02 * unmerged.abs().max()


def test_bad_finetune_config():
    with pytest.raises(QuaffError, match="unknown PEFT method 'dora'"):
        FinetuneConfig(peft="dora")
    with pytest.raises(QuaffError, match="learning rate must be > 0"):
        FinetuneConfig(lr=0)


@pytest.mark.slow  # end to end: load, calibrate, train, plot, through the CLI
def test_cli_finetune_saves_adapter_and_refuses_to_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", str(tiny_model_dir), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--out", str(out),
            "--save-every", "2", "--json", "--calib-batches", "2", "--calib-seq-len", "64", "--preset", "fast"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["eval_perplexity"] > 1
    names = {p.name for p in out.iterdir()}
    assert {"adapter", "checkpoints", "loss.json", "loss.png", "finetune.json"} <= names
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "finetune.json").read_text())["quaff_config"]["weight_rounding"] == "nearest"
    assert main(argv) == 2 and "pass --resume" in capsys.readouterr().err


@pytest.mark.slow  # end to end: load, calibrate, train, plot, through the CLI
def test_ossh_tracks_outliers_and_plots(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ossh.png"
    assert main(["ossh", str(tiny_model_dir), "--steps", "4", "--seq-len", "32", "--batch-size", "2", "--out", str(out),
                 "--json", "--max-ratio", "0.05"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["layers"] == 14 and all(len(rows) == 4 for rows in data["per_layer"].values())
    assert 0.0 <= summary["mean_jaccard"] <= 1.0
    # the planted residual-stream outliers (channels 3 and 17) stay outliers of q_proj throughout
    q = data["per_layer"]["base_model.model.model.layers.0.self_attn.q_proj.base_layer"]
    assert all({3, 17} <= set(r["channels"]) for r in q)
