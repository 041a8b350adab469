"""PEFT's LoRA on a QuaffLinear computed inside the base op (quaff::lora_linear) against PEFT's own path."""
import peft
import pytest
import torch
from torch import nn

from quaff_fx.hf import fused_lora, register_peft
from quaff_fx.quaff_linear import QuaffLinear


class Two(nn.Module):
    """A per-token layer (bias, smoothing, outliers) feeding a per-group one (act_group 32)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        act_max = torch.rand(96, generator=g) * 4 + 1
        self.q_proj = QuaffLinear.from_weight(torch.randn(64, 96, generator=g) * 0.1, torch.randn(64, generator=g),
                                              [3, 7], act_max=act_max, smooth_alpha=0.5)
        self.down_proj = QuaffLinear.from_weight(torch.randn(40, 64, generator=g) * 0.1, None, [1],
                                                 act_max=torch.full((64,), 5.0), act_group=32)

    def forward(self, x):
        return self.down_proj(torch.relu(self.q_proj(x)))


def lora_model(dtype=torch.float32, **lora):
    torch.manual_seed(0)
    model = Two().to(dtype)
    config = register_peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], **lora))
    pm = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.2)  # B starts at 0 in PEFT: the term would vanish
    return pm.train()


def step(pm, x, fused: bool):
    fused_lora(fused)
    try:
        for p in pm.parameters():
            p.grad = None
        y = pm(x)
        y.float().square().mean().backward()
        return y.detach(), {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    finally:
        fused_lora(True)


def lora_ops(pm, x) -> list[str]:
    from torch.profiler import profile

    with profile() as prof:
        pm(x)
    return sorted({e.key for e in prof.key_averages() if e.key.startswith("quaff::")})


def test_fused_equals_peft_in_fp32():
    pm, x = lora_model(), torch.randn(2, 5, 96)
    scales = {n: b.clone() for n, b in pm.named_buffers() if n.endswith("act_scale")}
    y0, g0 = step(pm, x, fused=False)
    for n, b in pm.named_buffers():
        if n.endswith("act_scale"):
            b.copy_(scales[n])  # the same scales for the second forward (training updates them)
    y1, g1 = step(pm, x, fused=True)
    assert torch.allclose(y0, y1, atol=1e-5, rtol=1e-5)
    assert set(g0) == set(g1) and len(g0) == 4
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n
    assert "quaff::lora_linear" in lora_ops(pm, x)


def test_bf16_activations_keep_fp32_adapters_and_their_gradients():
    """Mixed precision: the adapter runs in the activations' dtype, the weights and their gradients stay fp32."""
    pm, x = lora_model(torch.bfloat16), torch.randn(2, 5, 96).to(torch.bfloat16)
    y0, g0 = step(pm, x, fused=False)
    y1, g1 = step(pm, x, fused=True)
    assert y1.dtype == torch.bfloat16
    assert (y0.float() - y1.float()).abs().max() <= 0.05 * y0.float().abs().max()
    for n in g0:
        assert g1[n].dtype == torch.float32
        assert torch.allclose(g0[n], g1[n], atol=0.05 * g0[n].abs().max().item(), rtol=0.05), n


@pytest.mark.parametrize("case", ["dora", "lora bias", "disabled", "two adapters", "merged"])
def test_what_is_not_a_plain_lora_goes_through_peft(case):
    x = torch.randn(2, 5, 96)
    pm = lora_model(use_dora=case == "dora", lora_bias=case == "lora bias")
    want = pm(x).detach()
    if case == "disabled":
        with pm.disable_adapter():
            assert "quaff::lora_linear" not in lora_ops(pm, x)
        return
    if case == "two adapters":
        pm.add_adapter("other", register_peft(peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"])))
        pm.base_model.set_adapter(["default", "other"])
    if case == "merged":
        pm.merge_adapter()
        assert torch.allclose(pm(x).detach(), want, atol=0.05 * want.abs().max().item())
    assert "quaff::lora_linear" not in lora_ops(pm, x)


@pytest.mark.slow
def test_compiles_without_graph_break_and_matches_eager():
    pm, x = lora_model().eval(), torch.randn(2, 5, 96)
    want = pm(x)
    explained = torch._dynamo.explain(pm)(x)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(pm, fullgraph=True)(x), want, atol=1e-5)


def test_opcheck():
    q = Two().q_proj.train()
    x = torch.randn(3, 96, requires_grad=True)
    h = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(64, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.quaff.lora_linear.default,
                          (x, q.w_int8, q.w_scale, q.outlier_idx, q.act_scale, q.w_outlier, h, b, q.bias, False, False,
                           q.inv_smooth, None, 0))


def test_the_trainer_fuses_on_the_cpu_and_under_cuda_graphs_only(tmp_path):
    from quaff_fx.errors import QuaffError
    from quaff_fx.hf import _FUSED_LORA, lora_fusion
    from quaff_fx.training.trainer import TrainConfig, fuse_lora, training_arguments

    assert fuse_lora(TrainConfig(device="cpu"))
    assert not fuse_lora(TrainConfig(device="cuda", compile=True))  # plain compile: PEFT's forward, less host time
    assert not fuse_lora(TrainConfig(device="cuda"))
    graphs = TrainConfig(device="cpu", compile=True, compile_mode="reduce-overhead")
    assert fuse_lora(TrainConfig(device="cuda", compile=True, compile_mode="reduce-overhead"))
    assert training_arguments(graphs, tmp_path, False).torch_compile_mode == "reduce-overhead"
    assert training_arguments(TrainConfig(compile=True), tmp_path, False).torch_compile_mode is None
    with pytest.raises(QuaffError, match="--compile-mode 'fastest'"):
        TrainConfig(compile=True, compile_mode="fastest")
    assert fuse_lora(TrainConfig(device="cuda", compile=True, inline_kernels=True))  # no host cost per op call
    with lora_fusion(False):
        assert not _FUSED_LORA["enabled"]
    assert _FUSED_LORA["enabled"]


def test_compile_scope_layers_is_checked_and_compiles_no_whole_model(tmp_path):
    from torch import nn

    from quaff_fx.errors import QuaffError
    from quaff_fx.training.trainer import TrainConfig, compile_layers_, training_arguments

    layers = TrainConfig(compile=True, compile_scope="layers")
    assert not training_arguments(layers, tmp_path, False).torch_compile  # the layers are compiled, not the model
    assert training_arguments(TrainConfig(compile=True), tmp_path, False).torch_compile
    with pytest.raises(QuaffError, match="--compile-scope 'graph': choose one of model, layers"):
        TrainConfig(compile=True, compile_scope="graph")
    with pytest.raises(QuaffError, match="CUDA graphs per layer"):
        TrainConfig(compile=True, compile_scope="layers", compile_mode="reduce-overhead")
    with pytest.raises(QuaffError, match="found no decoder layers .* in Linear"):
        compile_layers_(nn.Linear(4, 4), "default")
