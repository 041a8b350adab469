"""The real SmolLM2-135M-Instruct (slow: a model load, the default transform through the CLI, a few minutes)."""
import copy

import pytest
import torch

from quaff_fx import QuaffConfig, capture, load_quantized
from quaff_fx.data import read_text, tokenize
from quaff_fx.evaluate import perplexity
from quaff_fx.hf import naive_w8a8_

pytestmark = pytest.mark.slow


def test_capture_matches_eager(smollm2):
    gm = capture(smollm2.model)
    sites = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(sites) == 211  # 30 layers x 7 + lm_head
    for batch, seq in [(1, 5), (2, 64)]:
        ids = torch.randint(0, 49152, (batch, seq))
        with torch.no_grad():
            diff = (gm(ids) - smollm2.model(input_ids=ids, use_cache=False).logits).abs().max().item()
        assert diff <= 1e-4, (batch, seq, diff)


@pytest.fixture(scope="module")
def quaff_smollm2(smollm2_artifact):
    """The default (QuaffConfig() calibrated on the default data) as the CLI writes it, loaded back."""
    loaded, manifest = load_quantized(smollm2_artifact)
    assert len(manifest["layers"]) == 210
    return loaded.model


def test_quaff_keeps_perplexity_and_beats_naive_w8a8(smollm2, quaff_smollm2):
    config = QuaffConfig()
    ids = tokenize(smollm2.tokenizer, read_text(None, "heldout"))
    fp = perplexity(smollm2.model, ids, 256, 4)["perplexity"]
    naive = copy.deepcopy(smollm2.model)
    naive_w8a8_(naive, config)
    naive_ppl = perplexity(naive, ids, 256, 4)["perplexity"]
    del naive
    quaff_ppl = perplexity(quaff_smollm2, ids, 256, 4)["perplexity"]
    assert quaff_ppl < naive_ppl
    assert quaff_ppl / fp - 1 <= 0.01, (fp, naive_ppl, quaff_ppl)  # default preset: +0.06% (per token +0.50%)


def test_onnx_export_keeps_perplexity(smollm2, quaff_smollm2, tmp_path):
    from quaff_fx.onnx_export import export_onnx, onnx_perplexity

    path = export_onnx(quaff_smollm2, tmp_path / "smollm2.onnx")
    ids = tokenize(smollm2.tokenizer, read_text(None, "heldout"))
    torch_ppl = perplexity(quaff_smollm2, ids, 256, 4, max_batches=3)["perplexity"]
    onnx_ppl = onnx_perplexity(path, ids, 256, 4, max_batches=3)
    assert abs(onnx_ppl / torch_ppl - 1) <= 0.005, (torch_ppl, onnx_ppl)
    assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in smollm2.model.parameters())
