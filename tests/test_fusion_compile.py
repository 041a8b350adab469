"""Scale fusion, the default pipeline, the torch.compile backend and compiled training."""
import copy

import pytest
import torch
from conftest import PLAIN, calibration_batches, make_tiny, quaff_modules, quantize_tiny, tiny_llama
from quaff_fx.passes import FuseScales
from quaff_fx.passes.fuse_scales import op_arguments

from quaff_fx import QuaffConfig, QuaffLinear, calibrate, capture, default_passes, run_passes
from quaff_fx.backend import LAST_REPORTS, make_backend
from quaff_fx.hf import register_peft

GROUPS = {
    "llama": {"q_proj,k_proj,v_proj": 2, "gate_proj,up_proj": 2},
    "qwen2": {"q_proj,k_proj,v_proj": 2, "gate_proj,up_proj": 2},
    "phi3": {},  # qkv_proj and gate_up_proj are fused in the model already: nothing to group
}


def quantized_graph(arch, passes_fuse=False, fold=False, captured_llama=None):
    """The tiny ``arch`` model and its graph after the default passes; the Llama from the ``captured_llama`` factory."""
    model, gm = captured_llama() if arch == "llama" else (lambda m: (m, capture(m)))(make_tiny(arch))
    stats = calibrate(gm, calibration_batches(), PLAIN.outliers, PLAIN.eligible, n_batches=2)
    result = run_passes(gm, default_passes(stats, PLAIN, fuse=passes_fuse, fold_norms=fold))
    return model, result


# qwen2 groups as llama does: one more capture, slow
@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow), "phi3"])
def test_fusion_groups_and_numerics(arch, captured_llama):
    _, unfused = quantized_graph(arch, captured_llama=captured_llama)
    gm = unfused.graph_module
    ids = torch.randint(0, 256, (2, 21))
    before = gm(ids).detach()
    n_before = len(quaff_modules(gm))
    fused = copy.deepcopy(gm)
    result = FuseScales()(fused)
    groups = {}
    for row in result.report.rows:
        groups[row["members"]] = groups.get(row["members"], 0) + 1
    assert groups == GROUPS[arch]
    fused.recompile()
    n_fused = sum(len(r["members"].split(",")) - 1 for r in result.report.rows)
    assert len(quaff_modules(fused)) == n_before - n_fused
    if arch != "phi3":
        mod = fused.get_submodule("model.model.layers.0.self_attn.fused_q_proj_k_proj_v_proj")
        assert mod.out_features == 64 + 32 + 32
    after = fused(ids)
    # the union outlier set and the shared scale only change rounding: within 1% of the logits' range
    assert (after - before).abs().max() <= 0.01 * before.abs().max()
    assert FuseScales()(fused).modified is False


def test_norm_folding_removes_the_division_and_keeps_outputs(captured_llama):
    model, result = quantized_graph("llama", passes_fuse=True, captured_llama=captured_llama)
    gm = result.graph_module
    ids = torch.randint(0, 256, (2, 21))
    fused_out = gm(ids).detach()
    folded = FuseScales(fold_norms=True)(gm)
    gm.recompile()
    assert len([r for r in folded.report.rows if "folded_into" in r]) == 4  # input and post-attention norms, 2 layers
    prescaled = [m for m in quaff_modules(gm) if m.prescaled]
    assert len(prescaled) == 4
    assert torch.allclose(gm(ids), fused_out, atol=1e-4, rtol=1e-4)
    # the live model's modules are untouched by folding
    assert not any(m.prescaled for m in model.modules() if isinstance(m, QuaffLinear))


def _quantize_graph(model):
    gm = capture(model)
    stats = calibrate(gm, [torch.randint(0, 256, (2, 16))], PLAIN.outliers, PLAIN.eligible)
    return run_passes(gm, default_passes(stats, PLAIN, fuse=True)).graph_module


def test_layernorm_folding_on_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64)).eval()
    gm = _quantize_graph(model)
    ids = torch.randint(0, 256, (2, 12))
    before = gm(ids).detach()
    result = FuseScales(fold_norms=True)(gm)
    gm.recompile()
    folded = [r for r in result.report.rows if "folded_into" in r]
    assert len(folded) == 4  # pre-attention and pre-MLP LayerNorm (weight and bias), 2 layers
    assert torch.allclose(gm(ids), before, atol=1e-4, rtol=1e-4)


def test_no_folding_where_the_norm_also_feeds_the_residual():
    """BERT is post-LN: a LayerNorm's output is the next block's input *and* its residual."""
    gm = _quantize_graph(make_tiny("bert"))
    ids = torch.randint(0, 256, (2, 12))
    before = gm(ids).detach()
    assert FuseScales(fold_norms=True)(gm).modified is False
    assert torch.equal(gm(ids), before)


@pytest.fixture()
def quantized_llama(quantized_tiny):
    return quantized_tiny()


def quaff_backend(inner: str):
    """The "quaff" backend as registered (FuseScales, then inductor), or its passes in front of aot_eager: the same
    capture, passes and AOTAutograd without inductor's C++ code generation (tens of seconds on 2 cores: slow)."""
    if inner == "inductor":
        return "quaff"
    from torch._dynamo.backends.registry import lookup_backend

    return make_backend(inner=lookup_backend(inner))


# inductor end to end: the C++ compile of a whole model (tens of seconds on 2 cores)
BACKEND_INNERS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("inner", BACKEND_INNERS)
def test_quaff_backend_fuses_and_matches_eager(quantized_llama, inner):
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        eager = quantized_llama(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(quantized_llama, backend=quaff_backend(inner), fullgraph=True)
        out = compiled(input_ids=ids, use_cache=False).logits
    fused = [r for rep in LAST_REPORTS for r in rep.rows if r["status"] == "fused"]
    assert len(fused) == 4
    assert (out - eager).abs().max() <= 0.01 * eager.abs().max()
    torch._dynamo.reset()


def test_no_graph_breaks(quantized_llama):
    ids = torch.randint(0, 256, (2, 19))
    explanation = torch._dynamo.explain(quantized_llama)(input_ids=ids, use_cache=False)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_backend_with_user_passes_runs_them_in_order(quantized_llama):
    seen = []

    def first(gm):
        seen.append("first")

    def second(gm):
        seen.append(sum(1 for n in gm.graph.nodes if n.op == "call_module"))

    backend = make_backend([first, FuseScales, second], inner="eager")
    with torch.no_grad():
        compiled = torch.compile(quantized_llama, backend=backend, fullgraph=True)
        compiled(input_ids=torch.randint(0, 256, (1, 8)), use_cache=False)
    assert seen == ["first", 4]  # four fused modules appear as call_module after FuseScales
    torch._dynamo.reset()


@pytest.mark.parametrize("inner", BACKEND_INNERS)
def test_compiled_lora_training_step_fullgraph(quantized_llama, inner):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(quantized_llama, register_peft(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    model.train()
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, backend=quaff_backend(inner), fullgraph=True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()
    loss_e = eager_model(input_ids=ids, labels=ids).loss
    loss_e.backward()
    assert abs(loss_c.item() - loss_e.item()) < 1e-3
    grads_c = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads_e = {n: p.grad for n, p in eager_model.named_parameters() if p.requires_grad}
    assert grads_c.keys() == grads_e.keys() and all(g is not None for g in grads_c.values())
    for n in grads_c:
        assert torch.allclose(grads_c[n], grads_e[n], atol=1e-3, rtol=1e-2), n
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def _smoothed_llama():
    cfg = QuaffConfig.preset("default", outliers=PLAIN.outliers)
    return quantize_tiny(tiny_llama(), cfg, n_batches=2)


@pytest.fixture()
def smoothed_llama(_smoothed_llama):
    """A tiny Llama transformed with the default preset (smoothed, GPTQ-rounded): a copy of one built per module."""
    return copy.deepcopy(_smoothed_llama)


def test_default_preset_smoothed_siblings_fuse_in_op_level_graphs(smoothed_llama):
    """With the default preset every layer's op multiplies x by its 1/s (an op argument, with 1/S): in an exported
    (or compiled) graph siblings read one x, and FuseScales fuses those whose 1/s agree."""
    model = smoothed_llama
    assert all(m.inv_smooth is not None for m in model.modules() if isinstance(m, QuaffLinear))
    ops = capture(model)  # the live model exported: quaff ops inlined, 1/s an argument of each
    calls = [n for n in ops.graph.nodes if n.target == torch.ops.quaff.linear.default]
    assert calls and all(op_arguments(n)[9] is not None for n in calls)
    ids = torch.randint(0, 256, (2, 13))
    before = ops(ids).detach()
    result = FuseScales()(ops)
    assert sum(r["status"] == "fused" for r in result.report.rows) == 4
    ops.recompile()
    assert (ops(ids) - before).abs().max() <= 0.01 * before.abs().max()
    other = copy.deepcopy(model)
    other.model.layers[0].self_attn.k_proj.inv_smooth.mul_(2.0)  # a different 1/s: k_proj must stay apart
    result = FuseScales()(capture(other))
    fused = sorted(r["members"] for r in result.report.rows if r["status"] == "fused")
    # k_proj of layer 0 alone
    assert fused == ["gate_proj,up_proj", "gate_proj,up_proj", "q_proj,k_proj,v_proj", "q_proj,v_proj"]


def test_norms_absorb_the_smoothing_with_the_scales(smoothed_llama):
    """Default preset (smoothed): folding puts 1/s and 1/S into the norm before the fused q/k/v and gate/up, and
    the folded layers stop applying 1/s themselves (else x would be divided by s twice)."""
    model = smoothed_llama
    ops = capture(model.eval())
    ids = torch.randint(0, 256, (2, 13))
    before = ops(ids).detach()
    result = FuseScales(fold_norms=True)(ops)
    ops.recompile()
    folded = [r for r in result.report.rows if "folded_into" in r]
    assert len(folded) == 4  # input and post-attention norms, 2 layers
    prescaled = [m for m in quaff_modules(ops) if m.prescaled]
    assert len(prescaled) == 4 and all(m.inv_smooth is None for m in prescaled)
    assert (ops(ids) - before).abs().max() <= 0.01 * before.abs().max()
