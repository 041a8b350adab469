"""The vocabulary projection and the cross-entropy loss without the full logits: ``linear_cross_entropy`` takes
the last hidden states and the (frozen) lm_head weight and computes the loss chunk by chunk of tokens, the
gradient of the hidden states made in the same pass (as Liger Kernel's fused linear cross-entropy does), so
neither the [tokens, vocab] logits nor their gradient exist at once: the peak is one chunk's fp32 logits.

``fused_causal_lm_loss_(model)`` patches a Hugging Face causal LM (Llama, Mistral, Qwen2, ...: a ``model``
body and an ``lm_head``) so that its forward with ``labels`` returns this loss and no logits; ``impl="liger"``
uses Liger Kernel's ``LigerFusedLinearCrossEntropyLoss`` instead (it must import). The lm_head weight gets no
gradient here (LoRA and Quaff fine-tuning leave it frozen); a trainable lm_head is refused.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..errors import QuaffError


class _ChunkedLinearCE(torch.autograd.Function):
    """CE(h · Wᵀ, labels) summed over labelled tokens, divided by their count or by ``divisor`` (the Trainer's
    ``num_items_in_batch``); grad_h made chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int,
                divisor: torch.Tensor | None):
        valid_all = labels != ignore_index
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 logits for bf16/fp16/fp32 inputs
        count = valid_all.sum().clamp(min=1) if divisor is None else divisor.to(h.device, acc)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk):  # in place where it can: one chunk's fp32 logits are the peak
            logits = (h[s:s + chunk] @ w.t()).to(acc)
            lab, valid = labels[s:s + chunk], valid_all[s:s + chunk]
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe[:, None]).squeeze(1)
            total = total + ((lse - target) * valid).sum()
            if grad_h is not None:  # d/dlogits = softmax - onehot, rows of unlabelled tokens zero
                p = logits.sub_(lse[:, None]).exp_()
                p.scatter_add_(1, safe[:, None], -torch.ones_like(p[:, :1]))
                p.mul_(valid[:, None])
                grad_h[s:s + chunk] = (p.to(h.dtype) @ w).to(h.dtype)
                del p  # the logits' storage: freed before the next chunk's
            del logits
        ctx.save_for_backward(grad_h, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, count = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * (grad_out / count).to(grad_h.dtype)
        return gh, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 512,
                         ignore_index: int = -100, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden`` [T, H] · ``weight`` [V, H]ᵀ against ``labels`` [T] (``ignore_index``
    skipped), in chunks of ``chunk`` tokens; the weight gets no gradient. ``num_items_in_batch`` (the Trainer's
    count of labelled tokens over the micro-batches of a step and over the processes): the sum is divided by it
    instead of by this batch's count, as transformers' own causal-LM loss does; the Trainer relies on that for
    gradient accumulation and for DDP (it multiplies the loss by the number of processes)."""
    if weight.requires_grad:
        raise QuaffError("linear_cross_entropy: the lm_head weight is trainable; freeze it (LoRA leaves it frozen) "
                         "or use the model's own loss")
    divisor = None if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    return _ChunkedLinearCE.apply(hidden, weight, labels, chunk, ignore_index, divisor)


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise QuaffError(f"impl='liger' needs liger-kernel ({e}); pip install liger-kernel, "
                         "or use impl='chunked'") from e
    return LigerFusedLinearCrossEntropyLoss()


def fused_causal_lm_loss_(model: nn.Module, impl: str = "chunked", chunk: int = 512) -> nn.Module:
    """Make the HF causal LM inside ``model`` (PEFT wrappers are looked through) compute its loss without the
    full logits; ``impl``: 'chunked' (this module) or 'liger'. Calls without ``labels`` keep the original
    forward. Returns the patched causal LM."""
    # the module that owns lm_head (PEFT's wrappers forward attribute lookups, so hasattr would find them first)
    lm = next((m for m in model.modules() if "lm_head" in m._modules and "model" in m._modules), None)
    if lm is None:
        raise QuaffError(f"fused_causal_lm_loss_: {type(model).__name__} holds no causal LM with .model and .lm_head")
    if impl not in ("chunked", "liger"):
        raise QuaffError(f"fused_causal_lm_loss_: impl {impl!r}; use 'chunked' or 'liger'")
    liger = _liger_loss() if impl == "liger" else None
    original = lm.forward

    def causal_lm_loss(head, h, target, num_items_in_batch=None):  # a method of lm_head: under FSDP2 it gathers
        if liger is None:  # the weight (shard_model)
            return linear_cross_entropy(h, head.weight, target, chunk, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is None:
            return liger(head.weight, h, target)
        return liger(head.weight, h, target) * ((target != -100).sum() / num_items_in_batch)  # its mean, rescaled

    lm.lm_head.causal_lm_loss = types.MethodType(causal_lm_loss, lm.lm_head)

    def forward(self, input_ids=None, labels=None, attention_mask=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("use_cache", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        h = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
        target = labels[:, 1:].reshape(-1)
        loss = self.lm_head.causal_lm_loss(h, target, num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    lm.forward = types.MethodType(forward, lm)
    return lm
