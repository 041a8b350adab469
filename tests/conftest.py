"""Shared fixtures: tiny random-init models of several architectures, a tiny model folder with its own
tokenizer (trained here on the bundled text), and the real SmolLM2 for the slow tests."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from quaff_fx import OutlierConfig, QuaffConfig, QuaffLinear, calibrate, capture, transform

_DEFAULT_THREADS = torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fast tests run torch on one thread: on the tiny models a second intra-op thread only spin-waits (12 LoRA
    steps took 3 s of CPU on one thread and 12-25 s on two, measured on a 2-core machine). Slow tests (SmolLM2, the
    golden artifact) keep torch's default, so their numbers are made as before. Set before the test's fixtures are
    built."""
    torch.set_num_threads(_DEFAULT_THREADS if item.get_closest_marker("slow") else 1)


VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_key_value_heads": 2, **overrides})).eval()
    _plant_outliers(model)
    return model


def _plant_outliers(model: torch.nn.Module) -> None:
    """Give the residual stream a few heavy channels, as trained LLMs have, so outlier selection has work."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[:, 3] *= 60
        emb[:, 17] *= 40


# the one table of tiny random models, one per architecture family the README lists (keep them small: seconds)
TINY = {
    "llama": lambda: tiny_llama(),
    "llama-tied-bias": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True,
                                                            attention_bias=True, mlp_bias=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, num_key_value_heads=2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, num_key_value_heads=2)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**COMMON, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                                               eos_token_id=2)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=512,
                                            word_embed_proj_dim=64)),
    "bert": lambda: BertModel(BertConfig(**COMMON)),
}


def make_tiny(arch: str) -> torch.nn.Module:
    """A tiny random-init model of ``arch`` (a key of TINY), in eval mode, the same on every call."""
    torch.manual_seed(0)
    return TINY[arch]().eval()


def quaff_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's call_module nodes of QuaffLinear layers."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuaffLinear)]


def quaff_modules(gm: torch.fx.GraphModule) -> list[QuaffLinear]:
    """The QuaffLinear layers the graph calls, in graph order."""
    return [gm.get_submodule(n.target) for n in quaff_nodes(gm)]


# plain Quaff (no smoothing, nearest rounding, top 5% outliers): the mechanics under test, in seconds
PLAIN = QuaffConfig.preset("fast", outliers=OutlierConfig("top_abs", max_ratio=0.05))
# a fixed stream of tiny-vocabulary tokens for training tests
TRAIN_IDS = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(11))


def calibration_batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """``n`` random token batches [2, 16] of the tiny vocabulary, the same on every call."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(n)]


def quantize_tiny(model: torch.nn.Module, config: QuaffConfig = PLAIN, batches: list[torch.Tensor] | None = None,
                  n_batches: int | None = None) -> torch.nn.Module:
    """``model`` quantized in place, step by step: capture, calibrate on ``batches`` (default two), transform."""
    gm = capture(model)
    stats = calibrate(gm, calibration_batches() if batches is None else batches, config.outliers, config.eligible,
                      n_batches=n_batches)
    transform(model, stats, config, gm=gm)
    return model


def plain_tiny() -> torch.nn.Module:
    """The model of the fine-tuning tests: a tiny Llama quantized with PLAIN on one batch. Where a fixture can
    serve, take ``quantized_tiny`` instead (built once); this builds it anew (for spawned ranks)."""
    return quantize_tiny(tiny_llama(), PLAIN, calibration_batches(1, seed=1))


@pytest.fixture(scope="session")
def _plain_tiny() -> tuple[torch.nn.Module, torch.Tensor]:
    model = plain_tiny()
    return model, torch.get_rng_state()


@pytest.fixture()
def quantized_tiny(_plain_tiny):
    """A factory of tiny Llamas quantized with PLAIN: each call a fresh copy of one model quantized once per run,
    and the global RNG as building it leaves it (PEFT draws its initial adapter weights from it)."""
    model, rng_state = _plain_tiny

    def make() -> torch.nn.Module:
        torch.set_rng_state(rng_state)
        return copy.deepcopy(model)

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from quaff_fx.data import read_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([read_text(None, "calibration")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A local Hugging Face model folder (config, safetensors weights, tokenizer) of a tiny Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


# CLI options that make a transform take seconds on the tiny model (mean_times 10: channels 3 and 17 stand out)
FAST = ["--batches", "2", "--batch-size", "2", "--seq-len", "64", "--strategy", "mean_times", "--threshold", "10",
        "--max-ratio", "0.05"]


@pytest.fixture(scope="session")
def artifact(tiny_model_dir, tmp_path_factory):
    """One artifact folder of the tiny Llama (default preset with FAST), built once per test run by the CLI.
    Tests must not change it: copy it first (``shutil.copytree``)."""
    from quaff_fx.cli import main

    out = tmp_path_factory.mktemp("artifact") / "tiny-quaff"
    assert main(["transform", str(tiny_model_dir), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture()
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def _captured_llama() -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    model = tiny_llama()
    return model, capture(model)


@pytest.fixture()
def captured_llama(_captured_llama):
    """A factory of (tiny_llama(), its captured graph) pairs: each call a copy of one pair captured once per run
    (torch.export takes about 1.5 s of CPU a call, most of a fast test's time). The copy's graph shares the copy's
    parameters, and its live-model reference points at the copy (deepcopy would keep the original's)."""
    return lambda: copy_captured(_captured_llama)


def copy_captured(pair: tuple[torch.nn.Module, torch.fx.GraphModule]) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """A deep copy of (model, its captured graph) whose graph calibrates through the copied model."""
    from quaff_fx.capture import META_KEY

    model, gm = copy.deepcopy(pair)
    gm.meta[META_KEY]["source"] = weakref.ref(model)  # deepcopy keeps a weakref to the original
    return model, gm


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (slow tests only); tests take a deepcopy before changing it."""
    from quaff_fx.model_loading import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory):
    """The SmolLM2 default artifact, `quaff-fx transform --out DIR` (QuaffConfig(), the default calibration), built
    once per run (slow tests only: minutes). test_golden compares its bytes, test_smollm2 evaluates it."""
    from quaff_fx.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-quaff"
    assert main(["transform", "--out", str(out)]) == 0
    return out


@pytest.fixture()
def fresh(request):
    return lambda m: copy.deepcopy(m)
