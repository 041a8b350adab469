import pytest
import torch
from conftest import make_tiny
from torch import nn

from quaff_fx import QuaffError, capture, find_linears


def eager(model, ids):
    out = model(input_ids=ids, use_cache=False) if hasattr(model, "generate") else model(input_ids=ids)
    return out[0]


# a decoder and an encoder in the fast tests; the other families (captured in test_architectures too) slow
@pytest.mark.parametrize("arch", ["llama", "bert", *(pytest.param(a, marks=pytest.mark.slow) for a in ("qwen2", "phi3",
                                                                                                       "gpt2"))])
def test_captured_graph_matches_eager_at_several_shapes(arch):
    model = make_tiny(arch)
    gm = capture(model)
    for batch, seq in [(1, 1), (1, 7), (3, 16), (2, 45)]:
        ids = torch.randint(0, 256, (batch, seq))
        assert (gm(ids) - eager(model, ids)).abs().max().item() <= 1e-4, (arch, batch, seq)


def test_every_linear_is_named_with_its_module_and_shape(llama):
    sites = {s.module_name: s for s in find_linears(capture(llama))}
    expected = {n: m for n, m in llama.named_modules() if isinstance(m, nn.Linear)}
    assert set(sites) == set(expected)
    for name, mod in expected.items():
        assert (sites[name].in_features, sites[name].out_features) == (mod.in_features, mod.out_features)
        assert sites[name].node.target == torch.ops.aten.linear.default


def test_phi3_fused_projections_are_found():
    names = {s.module_name for s in find_linears(capture(make_tiny("phi3")))}
    assert "model.layers.0.self_attn.qkv_proj" in names and "model.layers.0.mlp.gate_up_proj" in names


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ShapeBranch(TwoLayer):
    """fx cannot branch on a traced shape; export can."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h) if x.shape[0] > 1 else self.fc2(-h)


class DataDependent(TwoLayer):
    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h) if h.sum() > 0 else self.fc2(-h)


def test_plain_module_goes_through_fx():
    model = TwoLayer()
    gm = capture(model)
    assert gm.meta["quaff"]["capture"] == "fx"
    assert [(s.module_name, s.node.op) for s in find_linears(gm)] == [("fc1", "call_module"), ("fc2", "call_module")]
    x = torch.randn(4, 16)
    assert torch.equal(gm(x), model(x))


def test_module_fx_cannot_trace_falls_back_to_export():
    with pytest.raises(QuaffError, match="pass example_inputs"):
        capture(ShapeBranch())
    model = ShapeBranch()
    gm = capture(model, example_inputs=(torch.randn(2, 16),))
    assert gm.meta["quaff"]["capture"] == "export"
    assert [s.module_name for s in find_linears(gm)] == ["fc1", "fc2"]
    x = torch.randn(2, 16)
    assert torch.allclose(gm(x), model(x))


def test_uncapturable_module_is_a_clear_error():
    with pytest.raises(QuaffError, match="torch.export could not capture DataDependent"):
        capture(DataDependent(), example_inputs=(torch.randn(2, 16),))
