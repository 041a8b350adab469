"""Activation offload (quaff_fx.training.offload): what the decoder saves for backward leaves and comes back
unchanged, parameters and buffers stay, the backward fetches one layer ahead; refused where it cannot work.

On the CPU the "host copy" is a copy on the same device: these tests check the bookkeeping and the numbers; the
memory it saves on a GPU is measured by tools/fsdp_bench.py --offload (README)."""

import pytest
import torch
from conftest import TRAIN_IDS

from quaff_fx.distributed import decoder_layers
from quaff_fx.errors import QuaffError
from quaff_fx.finetune import FinetuneConfig, make_peft_model
from quaff_fx.training import offload as offload_module
from quaff_fx.training.offload import offload_activations_
from quaff_fx.training.trainer import TrainConfig

CFG = FinetuneConfig(steps=1, seq_len=32, batch_size=4)
BATCH = TRAIN_IDS[:128].view(4, 32)


def _spy_pack(off, record) -> None:
    """``record(tensor, stash)`` for each saved tensor the offloader takes, in the order it takes them."""
    pack = off.pack

    def spy(t):
        out = pack(t)
        if out is not t:
            record(t, out)
        return out

    off.pack = spy


def _step(model, offload: bool, record=None):
    """One forward and backward with gradient checkpointing; (loss, LoRA gradients, the offloader). ``record``:
    given to ``_spy_pack``."""
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    off = offload_activations_(model, min_bytes=1024, allow_cpu=True) if offload else None
    if off is not None and record is not None:
        _spy_pack(off, record)
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, off


def test_offloaded_step_equals_the_step_without(quantized_tiny):
    loss, grads, _ = _step(make_peft_model(quantized_tiny(), CFG), offload=False)
    packed = []
    model = make_peft_model(quantized_tiny(), CFG)
    loss_off, grads_off, off = _step(model, offload=True, record=lambda t, stash: packed.append(t))
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], grads_off[name]), name
    # each checkpointed layer's input went (batch x length x hidden); no parameter or buffer did
    hidden = model.get_base_model().config.hidden_size
    layers = len(decoder_layers(model))
    inputs = [t for t in packed if t.shape == (4, 32, hidden)]
    assert len(inputs) >= layers, [tuple(t.shape) for t in packed]
    state = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    assert not any(id(t) in state or isinstance(t, torch.nn.Parameter) for t in packed)
    assert off.stats["forwards"] == 1 and off.stats["offloaded"] == len(packed)
    assert off.stats["offloaded_bytes"] == sum(t.numel() * t.element_size() for t in packed)


def test_the_backward_fetches_the_previous_stash_with_each_one(quantized_tiny, monkeypatch):
    """Unpacking stash i starts fetching stash i - 1 (prefetch=1): the backward reaches earlier layers next."""
    fetched, order = [], {}  # order: a stash's place in the forward, by id (the stashes live through the backward)
    real = offload_module.ActivationOffload._fetch

    def spy(self, stash):
        fetched.append((order[id(stash)], stash.on_device is not None))
        return real(self, stash)

    monkeypatch.setattr(offload_module.ActivationOffload, "_fetch", spy)
    record = lambda t, stash: order.setdefault(id(stash), len(order))  # noqa: E731
    _, _, off = _step(make_peft_model(quantized_tiny(), CFG), offload=True, record=record)
    n = off.stats["offloaded"]
    assert n >= 2
    # the backward unpacks the stashes last to first: the first one is fetched when asked, with the one before it;
    # each later one was already on its way, and asking for it starts the one before
    expected = [(n - 1, False), (n - 2, False)] + [x for i in range(n - 2, 0, -1) for x in ((i, True), (i - 1, False))]
    expected += [(0, True)]
    assert fetched == expected


def test_no_offload_outside_training_or_once_removed(quantized_tiny):
    model = make_peft_model(quantized_tiny(), CFG)
    off = offload_activations_(model, min_bytes=1024, allow_cpu=True)
    model.eval()
    with torch.no_grad():
        model(input_ids=BATCH)
    model.train()
    with torch.no_grad():
        model(input_ids=BATCH)
    assert off.stats == {"forwards": 0, "offloaded": 0, "offloaded_bytes": 0}
    model(input_ids=BATCH, labels=BATCH).loss.backward()
    assert off.stats["forwards"] == 1 and off._hooks is None
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # the hooks ended with the forward
    off.remove()
    model(input_ids=BATCH, labels=BATCH).loss.backward()
    assert off.stats["forwards"] == 1  # removed: no more offload


def test_refused_where_it_cannot_work(quantized_tiny):
    model = make_peft_model(quantized_tiny(), CFG)
    with pytest.raises(QuaffError, match="GPU to host memory; the model is on cpu"):
        offload_activations_(model)
    with pytest.raises(QuaffError, match="--offload-activations .* needs --device cuda"):
        TrainConfig(offload_activations=True)
    with pytest.raises(QuaffError, match="--compile-scope layers"):
        TrainConfig(offload_activations=True, device="cuda", compile=True)
    with pytest.raises(QuaffError, match="no decoder layers"):
        offload_activations_(torch.nn.Sequential(torch.nn.Linear(2, 2)), allow_cpu=True)


def test_offload_around_compiled_layers(quantized_tiny):
    """Each decoder layer compiled (--compile-scope layers; aot_eager: the capture path, no C++ build): the same
    loss and gradients as the compiled step without offload."""
    from quaff_fx.training.trainer import compile_layers_

    results = []
    for offload in (False, True):
        torch._dynamo.reset()
        model = make_peft_model(quantized_tiny(), CFG)
        compile_layers_(model, backend="aot_eager")
        results.append(_step(model, offload))
    (loss, grads, _), (loss_off, grads_off, off) = results
    assert torch.equal(loss, loss_off) and off.stats["offloaded"] >= 2
    assert all(torch.equal(grads[n], grads_off[n]) for n in grads)


def test_each_stash_is_freed_when_autograd_lets_it_go(quantized_tiny):
    """No reference cycle: with the garbage collector off, every stash (and so its pinned host buffer) is gone once
    the backward has used it; a cycle would keep them to the next collection and make every step pin new memory."""
    import gc
    import weakref

    model = make_peft_model(quantized_tiny(), CFG)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    off = offload_activations_(model, min_bytes=1024, allow_cpu=True)
    stashes = []
    _spy_pack(off, lambda t, stash: stashes.append(weakref.ref(stash)))
    model.train()
    gc.collect()
    gc.disable()
    try:
        loss = model(input_ids=BATCH, labels=BATCH).loss
        assert len(stashes) >= 2 and all(r() is not None for r in stashes)
        loss.backward()
        del loss
        assert [r() for r in stashes] == [None] * len(stashes)
    finally:
        gc.enable()


def test_a_forward_that_fails_leaves_no_hook_on(quantized_tiny):
    """A bad batch fails inside the decoder (a token id past the vocabulary): the saved-tensor hooks end with it,
    and the next forward works and offloads again."""
    model = make_peft_model(quantized_tiny(), CFG)
    off = offload_activations_(model, min_bytes=1024, allow_cpu=True)
    model.train()
    vocab = model.get_base_model().config.vocab_size
    with pytest.raises(IndexError):
        model(input_ids=torch.full((1, 8), vocab + 5))
    assert off._hooks is None and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    model(input_ids=BATCH, labels=BATCH).loss.backward()
    assert off.stats["forwards"] == 2 and off.stats["offloaded"] > 0
