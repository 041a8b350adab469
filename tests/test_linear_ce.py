"""The chunked linear + cross-entropy (quaff_fx.kernels.linear_ce) on the CPU: loss and gradient against the full
logits, and the HF causal-LM patch against the model's own loss on a tiny random Llama."""
import pytest
import torch
import torch.nn.functional as F

from quaff_fx.errors import QuaffError
from quaff_fx.kernels.linear_ce import fused_causal_lm_loss_, linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_matches_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 16, generator=g, dtype=torch.float64)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (13,), generator=g)
    labels[[2, 7]] = -100
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    ref = F.cross_entropy(h1 @ w.t(), labels)
    (ref * 3).backward()
    got = linear_cross_entropy(h2, w, labels, chunk)
    (got * 3).backward()
    assert torch.allclose(got, ref, rtol=1e-10)
    assert torch.allclose(h2.grad, h1.grad, rtol=1e-9, atol=1e-12)


def test_trainable_weight_is_refused():
    with pytest.raises(QuaffError, match="lm_head"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("num_items", [None, 23])
def test_patched_causal_lm_loss_equals_hf_loss(num_items):
    """Also with the Trainer's num_items_in_batch (the labelled tokens of all micro-batches and processes of a
    step): the sum over this batch divided by it, as HF's loss does, or DDP and gradient accumulation would
    scale the loss and gradients by the number of processes or micro-batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).double()
    model.lm_head.weight.requires_grad_(False)
    ids = torch.randint(0, 97, (2, 9))
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want = model(input_ids=ids, labels=ids, **extra).loss
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fused_causal_lm_loss_(model, chunk=5)
    out = model(input_ids=ids, labels=ids, **extra)
    assert out.logits is None and torch.allclose(out.loss.float(), want.float(), rtol=1e-6)  # HF: fp32 logits
    out.loss.backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-9 if num_items is None else 1e-7), n  # HF: fp32
    assert model(input_ids=ids).logits.shape == (2, 9, 97)  # no labels: the original forward
