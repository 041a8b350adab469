"""FSDP2 shards the int8 base; the outlier scales stay in sync under torch.compile. CPU, gloo, 2 processes.

Compiled runs use backend="aot_eager" (dynamo + AOTAutograd, the graph-capture path the scale collective has to
survive, without inductor's C++ compilation, which would take minutes on the CI's two cores)."""

import pytest
import torch
from conftest import TRAIN_IDS, plain_tiny
from test_distributed import run_ranks

from quaff_fx.data import windows
from quaff_fx.distributed import full_state_dict, global_mean, load_full_state_dict, local_bytes, shard_model, wrap
from quaff_fx.errors import QuaffError
from quaff_fx.finetune import FinetuneConfig, batch_for_step, make_peft_model
from quaff_fx.quaff_linear import QuaffLinear

CFG = FinetuneConfig(steps=3, seq_len=32, batch_size=4, lr=1e-2)
PROBE = TRAIN_IDS[:64].view(2, 32)  # the input on which merged models are compared


def _scales(model) -> list[list[float]]:
    return [m.act_scale.tolist() for m in model.modules() if isinstance(m, QuaffLinear) and m.act_scale.numel()]


def _train(model, net, rank: int = 0, size: int = 1) -> list[float]:
    """CFG.steps AdamW steps on this rank's slice of each global batch; the global mean loss per step."""
    win = windows(TRAIN_IDS, CFG.seq_len)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=CFG.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(CFG.steps):
        batch = batch_for_step(win, step, CFG)[rank::size]
        loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(global_mean(loss.item()))
    model.eval()
    return losses


def _probe_loss(model) -> float:
    with torch.no_grad():
        return model(input_ids=PROBE, labels=PROBE).loss.item()


def _merged_logits(state: dict[str, torch.Tensor]) -> list:
    """An unsharded model of the same architecture, loaded from ``state``, its LoRA merged into the int8 base."""
    fresh = make_peft_model(plain_tiny(), CFG)
    fresh.load_state_dict(state)  # strict: the gathered keys are the unsharded model's
    merged = fresh.merge_and_unload()
    with torch.no_grad():
        return merged(input_ids=PROBE).logits.tolist()


def _recording_aot_eager(counts: list[int]):
    """aot_eager that first counts the all-reduces dynamo put in each graph (the scale sync, traced, not skipped)."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm: torch.fx.GraphModule, example_inputs):
        counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "all_reduce" in str(n.target)))
        return lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def _run(rank: int, size: int, mode: str) -> dict:
    model = make_peft_model(plain_tiny(), CFG)
    out = {"bytes_before": local_bytes(model)}
    net = shard_model(model) if mode.startswith("fsdp") else wrap(model, "ddp")
    out["bytes_after"] = local_bytes(model)
    traced = []
    if mode.endswith("compile"):
        net = torch.compile(net, backend=_recording_aot_eager(traced))
    out["losses"] = _train(model, net, rank, size)
    out["scales"] = _scales(model)
    out["traced_all_reduces"] = sum(traced)
    state = full_state_dict(model)
    if mode == "fsdp":
        fresh = shard_model(make_peft_model(plain_tiny(), CFG))  # resume: rank 0's whole state into shards
        load_full_state_dict(fresh, state if rank == 0 else {})
        out["resumed_scales"] = _scales(fresh)
        out["probe_loss"], out["resumed_probe_loss"] = _probe_loss(model), _probe_loss(fresh)
        out["resumed_bytes"] = local_bytes(fresh)
    if rank == 0:
        out["int8_dtype"] = str(state[next(k for k in state if k.endswith("w_int8"))].dtype)
        out["merged"] = _merged_logits(state)
    return out


@pytest.fixture(scope="module")
def single():
    """One process, the whole global batch: losses, scales and merged logits to compare the ranks with."""
    model = make_peft_model(plain_tiny(), CFG)
    losses = _train(model, model)
    merged = model.merge_and_unload()
    with torch.no_grad():
        logits = merged(input_ids=PROBE).logits
    return {"losses": torch.tensor(losses), "scales": _scales(merged), "logits": logits, "bytes": local_bytes(merged)}


def _close(a, b, **tol) -> bool:
    return torch.allclose(torch.tensor(a), torch.as_tensor(b), **tol)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "fsdp+compile", "ddp+compile"])
def test_two_ranks_match_one_process(mode, single):
    results = run_ranks(_run, mode)
    for rank, out in results.items():
        assert out["bytes_before"] == single["bytes"]
        if mode.startswith("fsdp"):  # each rank holds its half of every int8 weight (dim 0 split evenly here)
            assert out["bytes_after"] * 2 == single["bytes"], (rank, out["bytes_after"], single["bytes"])
        else:
            assert out["bytes_after"] == single["bytes"]
        assert _close(out["losses"], single["losses"], atol=2e-3, rtol=1e-3), (mode, rank, out["losses"], single)
        assert len(out["scales"]) == len(single["scales"]) > 0
        for mine, ref in zip(out["scales"], single["scales"]):
            assert _close(mine, ref, rtol=1e-5), (mode, rank, mine, ref)
    assert results[0]["scales"] == results[1]["scales"]  # bit-identical across ranks: one all-reduced max
    if mode.endswith("compile"):  # one per layer with outliers, in the forward graph(s)
        assert results[0]["traced_all_reduces"] >= len(single["scales"]), results[0]["traced_all_reduces"]
    assert results[0]["int8_dtype"] == "torch.int8"
    # merged from the state gathered off the shards; a re-quantization may flip an int8 rounding, hence the tolerance
    assert _close(results[0]["merged"], single["logits"], atol=5e-2), mode
    if mode == "fsdp":
        for out in results.values():
            assert out["resumed_scales"] == out["scales"] and out["resumed_bytes"] * 2 == single["bytes"]
            assert out["resumed_probe_loss"] == pytest.approx(out["probe_loss"], rel=1e-6)


def test_state_dict_keys_and_merge_unchanged_by_int8_parameters(quantized_tiny):
    """int8_parameters_ turns buffers into frozen parameters: same state_dict, same outputs, LoRA merge still works."""
    from quaff_fx.distributed import int8_parameters_

    plain = make_peft_model(quantized_tiny(), CFG)
    converted = make_peft_model(quantized_tiny(), CFG)
    assert int8_parameters_(converted) == int8_parameters_(converted) > 0  # idempotent
    layer = next(m for m in converted.modules() if isinstance(m, QuaffLinear))
    assert isinstance(layer.w_int8, torch.nn.Parameter) and layer.w_int8.dtype == torch.int8
    assert not layer.w_int8.requires_grad
    assert "w_int8" not in dict(layer.named_buffers())
    a, b = plain.state_dict(), converted.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # parameters list before buffers
    trainable = {n for n, p in converted.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in plain.named_parameters() if p.requires_grad}
    assert all("lora" in n for n in trainable)
    for model in (plain, converted):
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    with torch.no_grad():
        ref = plain.merge_and_unload()(input_ids=PROBE).logits
        got = converted.merge_and_unload()(input_ids=PROBE).logits
        unmerged = make_peft_model(quantized_tiny(), CFG)(input_ids=PROBE).logits
    assert torch.equal(ref, got)
    assert not torch.equal(ref, unmerged)  # the merge did something


def test_int8_backward_copy_is_refused_before_sharding(quantized_tiny):
    from quaff_fx import int8_backward_
    from quaff_fx.distributed import int8_parameters_

    model = quantized_tiny()
    int8_backward_(model)
    with pytest.raises(QuaffError, match="int8_backward_"):
        int8_parameters_(model)


def test_gradient_checkpointing_updates_the_scales_once_per_step(quantized_tiny):
    """The recomputation in backward runs the forward again; the momentum update must not run twice."""
    batch = TRAIN_IDS[:128].view(4, 32)
    scales = []
    for checkpointing in (False, True):
        base = quantized_tiny()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = make_peft_model(base, CFG).train()
        model(input_ids=batch, labels=batch).loss.backward()
        scales.append(_scales(model))
    assert scales[0] == scales[1]


def test_the_fsdp2_parameter_shim_keeps_integer_tensors_gradient_free():
    """torch < 2.12's FSDP2 builds ``nn.Parameter(int8 dtensor)`` with the gradient on; the shim's Parameter
    keeps integer tensors frozen, float ones as asked, and is what isinstance checks see as nn.Parameter."""
    from quaff_fx.distributed import _Parameter

    p = _Parameter(torch.zeros(3, dtype=torch.int8))
    assert isinstance(p, torch.nn.Parameter) and not p.requires_grad and p.dtype == torch.int8
    f = _Parameter(torch.zeros(3))
    assert isinstance(f, _Parameter) and f.requires_grad
    assert not isinstance(torch.zeros(3), _Parameter)


@pytest.mark.parametrize("tied", [False, True])
def test_the_input_embedding_is_a_unit_of_its_own_only_when_untied(tied):
    """shard_model gives the input embedding its own FSDP2 unit; a tied lm_head shares its weight, which would
    then be a parameter of two units, so a tied embedding stays in the root's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quaff_fx.distributed import _untied_input_embeddings

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert _untied_input_embeddings(model) is (None if tied else model.model.embed_tokens)
