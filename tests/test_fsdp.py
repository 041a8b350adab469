"""FSDP2 shards the int8 base; the outlier scales stay in sync under torch.compile, synced in every forward or once
per step (``scale_sync``). CPU, gloo, 2 processes.

Compiled runs use backend="aot_eager" (dynamo + AOTAutograd, the graph-capture path the scale collective has to
survive, without inductor's C++ compilation, which would take minutes on the CI's two cores)."""

import pytest
import torch
from conftest import TRAIN_IDS, plain_tiny
from test_distributed import run_ranks

from quaff_fx.data import windows
from quaff_fx.distributed import (
    decoder_layers,
    full_state_dict,
    global_mean,
    load_full_state_dict,
    local_bytes,
    scale_sync,
    shard_model,
    sync_scales_,
    wrap,
)
from quaff_fx.errors import QuaffError
from quaff_fx.finetune import FinetuneConfig, batch_for_step, make_peft_model
from quaff_fx.quaff_linear import QuaffLinear

CFG = FinetuneConfig(steps=3, seq_len=32, batch_size=4, lr=1e-2)
PROBE = TRAIN_IDS[:64].view(2, 32)  # the input on which merged models are compared


def _scales(model) -> list[list[float]]:
    return [m.act_scale.tolist() for m in model.modules() if isinstance(m, QuaffLinear) and m.act_scale.numel()]


def _train(model, net, rank: int = 0, size: int = 1, sync=None) -> tuple[list[float], list]:
    """CFG.steps AdamW steps on this rank's slice of each global batch, ``sync(model)`` after each backward; the
    global mean loss per step and the scales after each step."""
    win = windows(TRAIN_IDS, CFG.seq_len)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=CFG.lr, weight_decay=0.0)
    model.train()
    losses, scales = [], []
    for step in range(CFG.steps):
        batch = batch_for_step(win, step, CFG)[rank::size]
        loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        if sync is not None:
            sync(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(global_mean(loss.item()))
        scales.append(_scales(model))
    model.eval()
    return losses, scales


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
    if mode == "fsdp+head":  # the head sharded too (its own unit), its weight read by the chunked loss
        from quaff_fx.kernels.linear_ce import fused_causal_lm_loss_

        fused_causal_lm_loss_(model, "chunked")
    sharding = {"shard_head": mode == "fsdp+head", "offload_layers": 1 if mode == "fsdp+host" else 0}
    net = shard_model(model, **sharding) if mode.startswith("fsdp") else wrap(model, "ddp")
    if mode == "fsdp+host":  # the Trainer moves its model to its device: that must leave FSDP2's placement (a
        from quaff_fx.training.fsdp import ShardedTrainer  # model.to("meta") would lose every weight)

        ShardedTrainer._move_model_to_device(ShardedTrainer.__new__(ShardedTrainer), model, torch.device("meta"))
    out["bytes_after"] = local_bytes(model)
    if mode.startswith("fsdp"):  # the head: whole on every rank unless shard_head; each layer prefetches the next
        head = model.get_output_embeddings()
        out["head_sharded"] = hasattr(head.weight, "full_tensor")
        layers = decoder_layers(model)
        states = [u._get_fsdp_state() for u in layers + ([head] if out["head_sharded"] else [])]
        out["forward_prefetch"] = [s._states_to_forward_prefetch == states[i + 1:i + 2] for i, s in enumerate(states)]
        out["host_units"] = [type(s._fsdp_param_group.offload_policy).__name__ == "CPUOffloadPolicy"
                             for s in states[:len(layers)]]
    traced = []
    if mode.endswith("compile"):
        net = torch.compile(net, backend=_recording_aot_eager(traced))
    out["losses"], _ = _train(model, net, rank, size)
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
    return _single("model")


@pytest.fixture(scope="module")
def single_chunked():
    """The same with the chunked loss, what ``fsdp+head`` trains with (its gradients differ from HF's loss's in
    rounding, which 3 steps at lr 1e-2 carry into the scales)."""
    return _single("chunked")


def _single(loss: str) -> dict:
    model = make_peft_model(plain_tiny(), CFG)
    if loss == "chunked":
        from quaff_fx.kernels.linear_ce import fused_causal_lm_loss_

        fused_causal_lm_loss_(model, "chunked")
    losses, step_scales = _train(model, model)
    merged = model.merge_and_unload()
    with torch.no_grad():
        logits = merged(input_ids=PROBE).logits
    return {"losses": torch.tensor(losses), "scales": _scales(merged), "logits": logits, "bytes": local_bytes(merged),
            "step_scales": step_scales}


def _close(a, b, **tol) -> bool:
    return torch.allclose(torch.tensor(a), torch.as_tensor(b), **tol)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "fsdp+compile", "ddp+compile", "fsdp+head", "fsdp+host"])
def test_two_ranks_match_one_process(mode, request):
    single = request.getfixturevalue("single_chunked" if mode == "fsdp+head" else "single")
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
    if mode.startswith("fsdp"):
        assert results[0]["head_sharded"] == (mode == "fsdp+head")
        assert all(results[0]["forward_prefetch"]), results[0]["forward_prefetch"]
        # offload_layers=1 of 2: one layer's shards in host memory (FSDP2's CPUOffloadPolicy), the other's not
        assert sorted(results[0]["host_units"]) == ([False, True] if mode == "fsdp+host" else [False, False])
    # merged from the state gathered off the shards; a re-quantization may flip an int8 rounding, hence the tolerance
    assert _close(results[0]["merged"], single["logits"], atol=5e-2), mode
    if mode == "fsdp":
        for out in results.values():
            assert out["resumed_scales"] == out["scales"] and out["resumed_bytes"] * 2 == single["bytes"]
            assert out["resumed_probe_loss"] == pytest.approx(out["probe_loss"], rel=1e-6)


STEP_MODES = ("ddp", "fsdp+compile")  # eager DDP and compiled FSDP2, in one pair of processes


def _run_step_sync(rank: int, size: int) -> dict:
    """Each of STEP_MODES under ``scale_sync("step")``, ``sync_scales_`` after each backward: losses, the scales
    after each step, and the scale all-reduces of the forwards (eager: calls of the functional all_reduce that
    ``global_max`` makes; compiled: all-reduces traced into the graphs). Then, as a control of the count, one
    forward under the default ``scale_sync("forward")``."""
    from torch.distributed import _functional_collectives as funcol

    all_reduce, calls = funcol.all_reduce, []

    def counted(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    funcol.all_reduce = counted  # this spawned process's own module
    out = {}
    for mode in STEP_MODES:
        model = make_peft_model(plain_tiny(), CFG)
        net = shard_model(model) if mode.startswith("fsdp") else wrap(model, "ddp")
        traced = []
        if mode.endswith("compile"):
            net = torch.compile(net, backend=_recording_aot_eager(traced))
        with scale_sync("step"):
            losses, step_scales = _train(model, net, rank, size, sync=sync_scales_)
        out[mode] = {"losses": losses, "step_scales": step_scales, "forward_all_reduces": len(calls),
                     "traced_all_reduces": sum(traced)}
        calls.clear()
    with torch.no_grad():
        model.train()(input_ids=PROBE)  # the last model, not compiled: every layer's scales all-reduced in forward
    out["forward_mode_all_reduces"] = len(calls)
    return out


EXACT_LAYERS = 3  # layer 0's q, k, v: their input (the first norm of the embeddings) comes before any QuaffLinear


@pytest.mark.slow  # spawns processes and compiles: 20-30 s on two cores
def test_scales_synced_once_per_step_equal_one_process(single):
    """Under scale_sync("step") no forward all-reduces, and after each step's sync both ranks hold one process's
    scales on the global batch: bit for bit where a layer's input comes before any QuaffLinear. Elsewhere within
    1e-3 of themselves (measured: 4e-4 after 3 steps): each rank's forward quantized with its local scales, so a
    later layer sees activations that differ within int8 rounding from one process's, and the adapters' steps
    differ as much. The losses move with the same rounding (measured: 1.6e-5; 1e-4 asked)."""
    results = run_ranks(_run_step_sync)
    for mode in STEP_MODES:
        assert results[0][mode]["step_scales"] == results[1][mode]["step_scales"], mode  # one all-reduced max
        for rank, out in ((r, results[r][mode]) for r in results):
            assert out["forward_all_reduces"] == 0 and out["traced_all_reduces"] == 0, (mode, rank, out)
            assert _close(out["losses"], single["losses"], atol=1e-4, rtol=0), (mode, rank, out["losses"])
            for step, (mine, ref) in enumerate(zip(out["step_scales"], single["step_scales"], strict=True)):
                assert mine[:EXACT_LAYERS] == ref[:EXACT_LAYERS], (mode, rank, step)
                assert len(mine) == len(ref) > EXACT_LAYERS
                for a, b in zip(mine, ref):
                    assert _close(a, b, rtol=1e-3, atol=0), (mode, rank, step, a, b)
    for out in results.values():
        assert out["forward_mode_all_reduces"] == len(single["scales"])  # the count sees a forward's all-reduces


def test_the_max_of_local_scale_updates_is_the_global_batch_update(quantized_tiny):
    """What scale_sync("step") rests on: from equal scales, the elementwise max of two ranks' momentum updates on
    their halves of a batch is, bit for bit, the update on the whole batch; then the next step starts equal again.
    No collective: the two ranks are two copies of a layer in one process, where sync_scales_ does nothing."""
    import copy

    layer = next(m for m in quantized_tiny().modules() if isinstance(m, QuaffLinear) and m.outlier_idx.numel())
    ranks, whole = [copy.deepcopy(layer).train() for _ in range(2)], copy.deepcopy(layer).train()
    assert sync_scales_(whole) == 0  # one process
    g = torch.Generator().manual_seed(5)
    with torch.no_grad(), scale_sync("step"):
        for _ in range(3):
            x = torch.randn(4, 16, layer.in_features, generator=g) * torch.rand(4, 1, 1, generator=g) * 200
            for rank, part in zip(ranks, x.chunk(2)):
                rank(part)
            assert not torch.equal(ranks[0].act_scale, ranks[1].act_scale)  # the halves' maxima differ
            synced = torch.maximum(ranks[0].act_scale, ranks[1].act_scale)
            for rank in ranks:
                rank.act_scale.copy_(synced)
            whole(x)
            assert torch.equal(synced, whole.act_scale)


def test_scale_sync_takes_forward_or_step():
    with pytest.raises(QuaffError, match="unknown scale sync 'epoch'; use forward or step"):
        scale_sync("epoch")


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


def test_more_host_layers_than_layers_is_refused_before_sharding(quantized_tiny):
    model = make_peft_model(quantized_tiny(), CFG)
    with pytest.raises(QuaffError, match="offload_layers=3: the model has 2 decoder layers"):
        shard_model(model, offload_layers=3)
    assert not any(name.endswith("w_int8") for name, _ in model.named_parameters())  # nothing was changed


def test_the_host_layers_are_the_last_ones():
    """offload_layers takes the last layers (their backward runs first), not layers spread over the stack."""
    from quaff_fx.distributed import host_layers

    assert list(host_layers(4, 2)) == [2, 3]
    assert list(host_layers(32, 20)) == list(range(12, 32))
    assert list(host_layers(3, 0)) == [] and list(host_layers(3, 3)) == [0, 1, 2]


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
def test_the_embedding_and_head_are_units_of_their_own_only_when_untied(tied):
    """shard_model gives the input embedding and the lm_head each their own FSDP2 unit; tied, they share one
    weight, which would then be a parameter of two units, so both stay in the root's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quaff_fx.distributed import _untied

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert _untied(model, "get_input_embeddings") is (None if tied else model.model.embed_tokens)
    assert _untied(model, "get_output_embeddings") is (None if tied else model.lm_head)


def test_whole_gathers_a_host_shard_on_its_mesh_device():
    """FSDP2's CPUOffloadPolicy (``offload_layers``) leaves DTensors on a CUDA mesh with their shards in host memory,
    and NCCL has no CPU backend (a checkpoint's adapter failed so on 2 H100s): ``whole`` moves such a shard to its
    mesh's device before the all-gather, and leaves one already there. A stand-in DTensor records the calls."""
    import types

    from quaff_fx.training.adapter import whole

    calls = []

    class Shard:
        device_mesh = types.SimpleNamespace(device_type="cuda")

        def __init__(self, device: str):
            self.device = torch.device(device)

        def to(self, device):
            calls.append(("to", device))
            return Shard(device)

        def full_tensor(self):
            calls.append(("gather on", self.device.type))
            return torch.ones(2)

    assert whole(Shard("cpu")).tolist() == [1.0, 1.0]
    assert calls == [("to", "cuda"), ("gather on", "cuda")]
    calls.clear()
    whole(Shard("cuda"))
    assert calls == [("gather on", "cuda")]
