"""Fine-tuning with the Trainer: data formats and label masking, resume, adapter reload, merge, bad data, the CLI."""

import json

import pytest
import torch
from conftest import TRAIN_IDS
from transformers import TrainerCallback

from quaff_fx import QuaffError
from quaff_fx.cli import main
from quaff_fx.data import read_text
from quaff_fx.finetune import FinetuneConfig, make_peft_model
from quaff_fx.training import TrainConfig, build_examples, fit, load_adapter, read_rows, save_adapter
from quaff_fx.training.adapter import scale_state
from quaff_fx.training.data import IGNORE, check_row, encode_row
from quaff_fx.transform import load_quantized

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SENTENCES = [s.strip() for s in read_text(None, "calibration").split(".") if len(s.split()) > 8][:40]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_rows():
    return [
        {"prompt": " ".join(s.split()[:3]) + " ->", "completion": " " + " ".join(s.split()[3:6])} for s in SENTENCES
    ]


def chat_rows():
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(s.split()[:2])},
                {"role": "assistant", "content": " ".join(s.split()[2:5])},
            ]
        }
        for s in SENTENCES
    ]


def test_prompt_tokens_take_no_loss(tiny_tokenizer):
    row = check_row({"prompt": "Licensed under", "completion": " the Apache License"}, "t:1")
    ids, labels = encode_row(row, tiny_tokenizer)
    n_prompt = len(tiny_tokenizer("Licensed under", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tiny_tokenizer.eos_token_id
    assert ids[n_prompt:-1] == tiny_tokenizer(" the Apache License", add_special_tokens=False)["input_ids"]


def test_chat_loss_on_assistant_turns_only(tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    try:
        msgs = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What license?"},
            {"role": "assistant", "content": "Apache"},
            {"role": "user", "content": "Version?"},
            {"role": "assistant", "content": "Two"},
        ]
        ids, labels = encode_row(check_row({"messages": msgs}, "t:1"), tiny_tokenizer)
    finally:
        tiny_tokenizer.chat_template = None

    def tok(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    assert [t for t, lab in zip(ids, labels) if lab != IGNORE] == tok("Apache</s>") + tok("Two</s>")
    assert len(ids) > len(tok("Apache</s>Two</s>")) + len(tok("What license?"))


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"prompt": "a"}\n', ":1: field 'completion' is missing"),
        ('{"text": "ok"}\n{"txt": "typo"}\n', ":2: field 'text' is missing"),
        ('{"text": "ok"}\nnot json\n', ":2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: field 'messages' has no assistant turn"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(QuaffError, match=message):
        read_rows(path)


def test_bad_csv_and_bad_data_in_the_cli_write_nothing(tiny_model_dir, tmp_path, capsys):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("prompt,completion\nhello,world\nno completion,\n")
    with pytest.raises(QuaffError, match=r"d.csv:3: field 'completion' is empty"):
        read_rows(csv_file)
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_model_dir), "--data", str(csv_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "d.csv:3: field 'completion' is empty" in err and "loading" not in err  # before the model loads
    assert not out.exists()


def test_options_checked_before_any_work(artifact, tiny_model_dir, tmp_path, capsys):
    """--peft ia3 --merge, an unknown --compile-mode, per-layer CUDA graphs, activation offload on the CPU and
    host-offloaded FSDP2 shards without FSDP2, in one process or beyond the layer count are refused at once; too
    long a --seq-len fails without leaving an empty folder (23.4)."""
    out = tmp_path / "x"
    assert main(["finetune", str(artifact), "--peft", "ia3", "--merge", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--merge works with --peft lora only" in err and "loading" not in err and not out.exists()
    assert main(["finetune", str(artifact), "--seq-len", "100000", "--out", str(out)]) == 2
    assert "too few tokens" in capsys.readouterr().err and not out.exists()
    assert main(["finetune", str(artifact), "--compile-mode", "fastest", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--compile-mode 'fastest': choose one of default, reduce-overhead" in err and "loading" not in err
    assert main(["finetune", str(artifact), "--compile-scope", "layers", "--compile-mode", "reduce-overhead",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CUDA graphs per layer" in err and "loading" not in err
    assert main(["finetune", str(artifact), "--offload-activations", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--offload-activations moves activations from the GPU" in err and "--device cuda (got cpu)" in err
    assert "loading" not in err
    assert main(["finetune", str(artifact), "--offload-layers", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--offload-layers 2 keeps FSDP2 shards in host memory: it needs --distributed fsdp (got ddp)" in err
    assert main(["finetune", str(artifact), "--offload-layers", "2", "--distributed", "fsdp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "launch several processes" in err and "loading" not in err
    for model in (artifact, tiny_model_dir):  # the layer count each declares, read before anything loads
        assert main(["finetune", str(model), "--offload-layers", "3", "--distributed", "fsdp", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--offload-layers 3: {str(model)!r} has 2 decoder layers" in err and "loading" not in err
    assert not out.exists()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _tiny_examples():
    win = TRAIN_IDS[: 24 * 32].view(24, 32)
    return [{"input_ids": w.tolist(), "labels": w.tolist()} for w in win]


@pytest.mark.slow  # end to end: three Trainer runs with checkpoints (train()'s resume: test_finetune)
def test_resume_continues_exactly(tmp_path, quantized_tiny):
    """Stopped after 2 of 4 steps and resumed: steps 3 and 4 lose what an uninterrupted run loses, and the
    outlier scales end where they would (the callback restored them)."""
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, save_every=2, lr_scheduler="cosine", progress=False)
    fcfg = FinetuneConfig(seq_len=32)
    full_model = make_peft_model(quantized_tiny(), fcfg)
    full = fit(full_model, _tiny_examples(), [], cfg, tmp_path / "full")["losses"]
    part_model = make_peft_model(quantized_tiny(), fcfg)
    fit(part_model, _tiny_examples(), [], cfg, tmp_path / "part", callbacks=[StopAt(2)])
    resumed_model = make_peft_model(quantized_tiny(), fcfg)
    resumed = fit(resumed_model, _tiny_examples(), [], cfg, tmp_path / "part", resume=True)["losses"]
    assert len(resumed) == 4 and resumed[2:] == pytest.approx(full[2:], abs=1e-5)  # the log carries steps 1-2 over
    for name, scale in scale_state(full_model).items():
        assert torch.allclose(scale_state(resumed_model)[name], scale, rtol=1e-6), name


def test_adapter_reload_reproduces_the_trained_logits(artifact, tmp_path):
    """load_adapter puts the trained outlier scales back: the logits are the trained model's, bit for bit,
    while PEFT's own loader (no scales) gives other logits (23.2)."""
    import peft

    loaded, _ = load_quantized(artifact)
    model = make_peft_model(loaded.model, FinetuneConfig(seq_len=32))
    fit(model, _tiny_examples(), [], TrainConfig(steps=2, batch_size=4, lr=1e-2, progress=False), tmp_path / "ck")
    probe = TRAIN_IDS[:64].view(2, 32)
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    folder = save_adapter(model, tmp_path / "adapter", str(artifact))
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(artifact)
    with torch.no_grad():
        reloaded = load_adapter(load_quantized(artifact)[0].model, folder)(input_ids=probe).logits
        plain = peft.PeftModel.from_pretrained(load_quantized(artifact)[0].model, str(folder))(input_ids=probe).logits
    assert torch.equal(reloaded, trained)
    assert not torch.allclose(plain, trained, atol=1e-4)


@pytest.mark.slow  # end to end: two trainings to a falling loss
def test_prompt_completion_and_chat_data_train_with_falling_loss(tiny_tokenizer, tmp_path, quantized_tiny):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    try:
        for rows in (prompt_rows(), chat_rows()):
            examples = build_examples(
                read_rows(write_jsonl(tmp_path / "d.jsonl", rows)), tiny_tokenizer, 64, False, "d"
            )
            model = make_peft_model(quantized_tiny(), FinetuneConfig(seq_len=32))
            cfg = TrainConfig(steps=10, batch_size=8, lr=2e-2, lr_scheduler="constant", progress=False)
            losses = fit(model, examples[:8], [], cfg, tmp_path / "ck", pad_id=0)["losses"]
            assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    finally:
        tiny_tokenizer.chat_template = None


@pytest.mark.slow  # end to end: train, merge, eval through the CLI
def test_cli_finetune_jsonl_merge_eval_and_adapter(artifact, tmp_path, capsys):
    """A prompt/completion JSONL on an artifact: adapter (with scales), loss.json/png, eval loss on the split,
    --merge writes an artifact with the artifact's config; eval ART --adapter DIR scores the adapter."""
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    out = tmp_path / "ft"
    argv = ["finetune", str(artifact), "--data", str(data), "--steps", "3", "--seq-len", "64", "--batch-size", "2",
            "--eval-split", "0.1", "--save-every", "2", "--out", str(out), "--json", "--merge"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["eval_loss"] > 0 and "4 held-out examples" in summary["eval_set"]
    written = {p.name for p in out.iterdir()}
    assert {"adapter", "checkpoints", "loss.json", "loss.png", "finetune.json", "merged"} <= written
    assert (out / "adapter" / "quaff_scales.safetensors").is_file()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((artifact / "quaff.json").read_text())
    assert json.loads((out / "merged" / "quaff.json").read_text())["config"] == manifest["config"]
    assert main(argv) == 2 and "pass --resume" in capsys.readouterr().err
    assert main(["eval", str(artifact), "--adapter", str(out / "adapter"), "--seq-len", "32", "--max-batches", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["model"] == "quaff+adapter"


def test_cli_prompt_tuning_finishes(artifact, tmp_path, capsys):
    """Prompt tuning used to crash in the final perplexity (virtual tokens in the logits, 23.1)."""
    out = tmp_path / "pt"
    assert main(["finetune", str(artifact), "--peft", "prompt", "--steps", "1", "--seq-len", "32", "--out", str(out),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_a_model_read_from_gguf_trains(tmp_path, quantized_tiny):
    """SmolLM2 comes from a .gguf file: transformers marks it quantized (GGUF) and the Trainer would refuse it."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model = quantized_tiny()
    model.hf_quantizer = GgufHfQuantizer.__new__(GgufHfQuantizer)
    model.is_quantized = True
    peft_model = make_peft_model(model, FinetuneConfig(seq_len=32))
    log = fit(peft_model, _tiny_examples(), [], TrainConfig(steps=1, batch_size=2, progress=False), tmp_path)
    assert log["steps"] == 1 and model.hf_quantizer is None


def test_the_chunked_loss_trains_as_the_models_own(tiny_tokenizer, tmp_path, quantized_tiny):
    """--loss chunked (the default on CUDA) gives the Trainer the losses of the model's own cross-entropy, with
    prompt tokens (label -100) left out just the same."""
    examples = build_examples(read_rows(write_jsonl(tmp_path / "d.jsonl", prompt_rows())), tiny_tokenizer, 64, False,
                              "d")[:8]
    losses = {}
    for loss in ("model", "chunked"):
        model = make_peft_model(quantized_tiny(), FinetuneConfig(seq_len=32))
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, progress=False, loss=loss)
        losses[loss] = fit(model, examples, [], cfg, tmp_path / loss, pad_id=0)["losses"]
    assert losses["chunked"] == pytest.approx(losses["model"], rel=1e-4)
    with pytest.raises(QuaffError, match="--loss"):
        TrainConfig(loss="fused")


def test_step_scale_sync_syncs_after_every_micro_batch(tmp_path, quantized_tiny, monkeypatch):
    """TrainConfig(scale_sync="step") calls sync_scales_ once after each micro-batch's forward and backward (2 steps
    of 2 accumulated micro-batches: 4 calls, after forwards 1-4), under scale_sync("step"); the default makes no
    call, and the mode is "forward" again after fit."""
    from quaff_fx import distributed
    from quaff_fx.quaff_linear import QuaffLinear
    from quaff_fx.training import trainer

    calls, forwards = [], []
    monkeypatch.setattr(trainer, "sync_scales_", lambda model: calls.append((distributed._SCALE_SYNC, len(forwards))))
    for mode in ("forward", "step"):
        model = make_peft_model(quantized_tiny(), FinetuneConfig(seq_len=32))
        layer = next(m for m in model.modules() if isinstance(m, QuaffLinear))
        layer.register_forward_pre_hook(lambda module, args: forwards.append(1) if module.training else None)
        calls.clear()
        forwards.clear()
        cfg = TrainConfig(steps=2, batch_size=2, grad_accum=2, lr=1e-2, progress=False, scale_sync=mode)
        fit(model, _tiny_examples()[:8], [], cfg, tmp_path / mode)
        assert calls == ([] if mode == "forward" else [("step", 1), ("step", 2), ("step", 3), ("step", 4)]), mode
        assert distributed._SCALE_SYNC == "forward"
    with pytest.raises(QuaffError, match="--scale-sync 'epoch'"):
        TrainConfig(scale_sync="epoch")


def test_throughput_reports_the_mean_and_the_median_step_after_the_warm_up():
    from quaff_fx.training.trainer import Throughput

    t = Throughput()
    # step ends at these times with 100 tokens a step: 3 warm-up steps (compilation), then 1 s steps and one 6 s hiccup
    for i, at in enumerate((30.0, 40.0, 41.0, 42.0, 43.0, 44.0, 50.0, 51.0)):
        t.tokens = 100 * (i + 1)
        t.marks.append((at, t.tokens))
    assert t.step_seconds() == [1.0, 1.0, 1.0, 6.0, 1.0]  # after the third step's end
    assert t.rate() == pytest.approx(500 / 10.0)  # the hiccup counts in the mean
    assert t.median_rate() == pytest.approx(100.0)  # not at the median step


@pytest.mark.slow  # two Trainer runs, one compiled
def test_compiled_training_with_the_fused_lora_gives_the_eager_losses(tiny_tokenizer, tmp_path, quantized_tiny):
    """--compile-mode reduce-overhead through the Trainer (on the CPU inductor compiles without CUDA graphs), and
    --compile-scope layers (each decoder layer compiled, the Trainer compiling nothing): the LoRA runs inside
    quaff::lora_linear there, and the losses are the eager run's."""
    from torch.profiler import profile

    from quaff_fx.distributed import decoder_layers

    examples = build_examples(read_rows(write_jsonl(tmp_path / "d.jsonl", prompt_rows())), tiny_tokenizer, 64, False,
                              "d")[:8]
    losses = {}
    for mode in ("eager", "reduce-overhead", "layers"):
        model = make_peft_model(quantized_tiny(), FinetuneConfig(seq_len=32))
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, progress=False, compile=mode != "eager",
                          compile_mode="reduce-overhead" if mode == "reduce-overhead" else "default",
                          compile_scope="layers" if mode == "layers" else "model")
        with profile() as prof:
            losses[mode] = fit(model, examples, [], cfg, tmp_path / mode, pad_id=0)["losses"]
        assert any(e.key == "quaff::lora_linear" for e in prof.key_averages())
        assert all((layer._compiled_call_impl is not None) == (mode == "layers") for layer in decoder_layers(model))
    assert losses["reduce-overhead"] == pytest.approx(losses["eager"], rel=1e-3)
    assert losses["layers"] == pytest.approx(losses["eager"], rel=1e-3)


def test_one_process_on_a_machine_of_several_gpus_trains_on_one(tmp_path, monkeypatch):
    """Without torchrun the Trainer would wrap the model in nn.DataParallel over every visible GPU (n_gpu = the
    device count), which a Quaff model does not survive (the replica's embedding stayed on cuda:0 in a run on
    2 H100s); quaff-fx's arguments keep one process on one GPU. CUDA is faked: the arguments only."""
    from quaff_fx.training.trainer import training_arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    args = training_arguments(TrainConfig(device="cuda", progress=False), tmp_path, False)
    assert args.device == torch.device("cuda", 0) and args.n_gpu == 1


def test_fit_offloads_each_training_forward_and_removes_its_hooks(tmp_path, quantized_tiny, monkeypatch):
    """TrainConfig(offload_activations=True) puts the offload hooks on for fit's training and takes them off after
    (on the CPU through the offloader's test mode: the option itself is refused there); the log counts the bytes
    offloaded per forward: each micro-batch's checkpointed layer inputs at least."""
    from quaff_fx.distributed import decoder_layers
    from quaff_fx.training import offload, trainer

    made = []

    def offloader(model):
        made.append(offload.offload_activations_(model, min_bytes=1024, allow_cpu=True))
        return made[-1]

    monkeypatch.setattr(trainer, "offload_activations_", offloader)
    model = make_peft_model(quantized_tiny(), FinetuneConfig(seq_len=32))
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, progress=False, gradient_checkpointing=True)
    cfg.offload_activations = True  # past the CPU refusal of __post_init__
    log = fit(model, _tiny_examples()[:8], [], cfg, tmp_path / "run")
    (off,) = made
    assert off.stats["forwards"] == 2 and off.handles == []
    hidden = model.get_base_model().config.hidden_size
    assert log["offloaded_bytes_per_forward"] >= len(decoder_layers(model)) * 4 * 32 * hidden * 4
    model.train()
    model(input_ids=TRAIN_IDS[:64].view(2, 32), labels=TRAIN_IDS[:64].view(2, 32)).loss.backward()
    assert off.stats["forwards"] == 2  # no hook left on the model
