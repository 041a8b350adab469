"""The quaff ops and QuaffLinear against the plain-PyTorch reference."""
import pytest
import torch
from torch import nn

from quaff_fx.kernels import reference
from quaff_fx.quaff_linear import QuaffLinear


def layer_and_input(k=96, n=40, dtype=torch.float32, outliers=(5, 11, 60), seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype)
    x = torch.randn(3, 7, k, dtype=dtype)
    x[..., list(outliers)] *= 50
    act_max = x.float().abs().reshape(-1, k).amax(0)
    return lin, x, QuaffLinear.from_linear(lin, list(outliers), act_max=act_max).eval()


def op_args(q, x):
    return (x, q.w_int8, q.w_scale, q.outlier_idx, q.act_scale, q.w_outlier, q.bias, q.prescaled, q.exact_grad)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_op_matches_reference(dtype, tol):
    lin, x, q = layer_and_input(dtype=dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (3, 7, 40)
    ref = reference.quaff_linear(x.reshape(-1, 96), q.w_int8, q.w_scale, q.outlier_idx, q.act_scale,
                                 reference.correction_weight(q.w_outlier, q.act_scale), q.bias)
    assert torch.allclose(y.reshape(-1, 40).float(), ref, atol=tol, rtol=tol)


def test_quaff_is_close_to_fp_and_beats_naive_w8a8_on_outliers():
    lin, x, q = layer_and_input()
    exact = lin(x)
    naive = QuaffLinear.from_linear(lin).eval()(x)
    err_quaff, err_naive = (q(x) - exact).abs().max(), (naive - exact).abs().max()
    assert err_quaff < 0.25 * err_naive
    assert err_quaff / exact.abs().max() < 0.02


def test_correction_is_exact_without_rounding():
    """X̂ W + X̂_o ((S_o - 1) W_o) == X W when nothing is rounded."""
    torch.manual_seed(0)
    x, w = torch.randn(10, 32, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
    idx = torch.tensor([2, 9, 30])
    s = torch.tensor([3.0, 7.5, 1.25], dtype=torch.float64)
    x_hat = x.clone()
    x_hat[:, idx] = x[:, idx] / s
    x_hat_o = x_hat[:, idx]
    got = x_hat @ w.t() + x_hat_o @ (w[:, idx] * (s - 1)).t()
    assert torch.allclose(got, x @ w.t(), atol=1e-12)
    # and the reference builds X̂ and X̂_o the same way
    ref_hat, ref_hat_o = reference.scale_activations(x, idx, s)
    assert torch.allclose(ref_hat.double(), x_hat, atol=1e-6) and torch.allclose(ref_hat_o.double(), x_hat_o, atol=1e-6)


def test_all_channels_outliers_still_computes_x_w():
    lin, x, _ = layer_and_input(outliers=())
    every = list(range(96))
    q = QuaffLinear.from_linear(lin, every, act_max=x.abs().reshape(-1, 96).amax(0)).eval()
    assert (q(x) - lin(x)).abs().max() / lin(x).abs().max() < 0.02


def test_integer_inputs_are_exact():
    """Weights that are int8 already and activations on the int8 grid go through with no error."""
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (24, 48)).float()
    w[:, 0] = 127  # every row's absmax is 127: scale 1
    x = torch.randint(-127, 128, (5, 48)).float()
    x[:, 1] = 127
    q = QuaffLinear.from_weight(w, None).eval()
    assert torch.equal(q(x), x @ w.t())


def test_opcheck():
    _, x, q = layer_and_input()
    torch.library.opcheck(torch.ops.quaff.linear.default, op_args(q, x.requires_grad_()))
    torch.library.opcheck(torch.ops.quaff.quantize_rows.default, (torch.randn(4, 9),))
    torch.library.opcheck(torch.ops.quaff.linear_grad_input.default, (torch.randn(6, 40), q.w_int8, q.w_scale, False))
    lin, x, _ = layer_and_input()  # smoothed, with the transposed int8 copy: the op's last two arguments
    s = QuaffLinear.from_weight(lin.weight, lin.bias, [5, 11, 60], x.abs().reshape(-1, 96).amax(0), smooth_alpha=0.5)
    s.int8_backward_()
    torch.library.opcheck(torch.ops.quaff.linear.default, op_args(s, x.requires_grad_()) + (s.inv_smooth, s.w_int8_t))
    torch.library.opcheck(torch.ops.quaff.linear_grad_input.default,
                          (torch.randn(6, 40), s.w_int8, s.w_scale, False, s.inv_smooth, s.w_int8_t))


@pytest.mark.parametrize("exact,tol", [(True, 1e-2), (False, 3e-2)])  # the weight is int8 either way
def test_grad_input_against_reference_and_fp(exact, tol):
    lin, x, q = layer_and_input()
    q.exact_grad = exact
    x = x.clone().requires_grad_()
    grad_out = torch.randn(3, 7, 40)
    q(x).backward(grad_out)
    ref = reference.grad_input(grad_out.reshape(-1, 40), q.w_int8, q.w_scale, exact).reshape(x.shape)
    assert torch.allclose(x.grad, ref, atol=1e-4, rtol=1e-4)
    fp = grad_out @ lin.weight
    assert (x.grad - fp).abs().max() / fp.abs().max() < tol


def test_bias_grad_when_bias_trains():
    _, x, q = layer_and_input()
    q.bias.requires_grad_(True)
    grad_out = torch.randn(3, 7, 40)
    q(x).backward(grad_out)
    assert torch.allclose(q.bias.grad, grad_out.reshape(-1, 40).sum(0), atol=1e-5)


def test_bf16_backward_runs():
    _, x, q = layer_and_input(dtype=torch.bfloat16)
    x = x.clone().requires_grad_()
    q(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_momentum_updates_scales_in_training_and_freezes_them_in_eval():
    lin, x, q = layer_and_input()
    before = q.act_scale.clone()
    q.eval()(x * 4)
    assert torch.equal(q.act_scale, before)
    q.train()(x * 4)
    batch = reference.outlier_scale((x * 4).abs().reshape(-1, 96).amax(0)[q.outlier_idx], q.w_outlier)
    assert torch.allclose(q.act_scale, 0.9 * before + 0.1 * batch)


def test_zero_weight_column_gives_finite_output():
    lin, x, _ = layer_and_input()
    with torch.no_grad():
        lin.weight[:, 5] = 0
    q = QuaffLinear.from_linear(lin, [5, 11], act_max=x.abs().reshape(-1, 96).amax(0)).eval()
    assert torch.isfinite(q.act_scale).all() and torch.isfinite(q(x)).all()
    assert (q(x) - lin(x)).abs().max() / lin(x).abs().max() < 0.05


def test_weight_is_dropped_and_per_tensor_is_an_option():
    lin, x, q = layer_and_input()
    assert "weight" not in dict(q.named_parameters()) and "weight" not in dict(q.named_buffers())
    assert q.w_int8.dtype == torch.int8 and q.w_outlier.shape == (40, 3)
    pt = QuaffLinear.from_linear(lin, [5], weight_granularity="tensor")
    assert torch.unique(pt.w_scale).numel() == 1
    assert "outliers=3" in repr(q) and "int8" in repr(q)


def test_compile_fullgraph_and_export_see_one_op():
    _, x, q = layer_and_input()
    compiled = torch.compile(q, fullgraph=True)
    assert torch.allclose(compiled(x), q(x))
    ep = torch.export.export(q, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.quaff.linear.default) == 1


def test_smoothing_keeps_x_w_and_merges():
    lin, x, _ = layer_and_input()
    act_max = x.abs().reshape(-1, 96).amax(0)
    q = QuaffLinear.from_linear(lin, [5, 11, 60], act_max=act_max)
    s = QuaffLinear.from_weight(lin.weight, lin.bias, [5, 11, 60], act_max, smooth_alpha=0.5).eval()
    exact = lin(x)
    assert (s(x) - exact).abs().max() / exact.abs().max() < 0.02

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(s.weight, lin.weight) < 0.02
    assert torch.equal(s.inv_smooth[[5, 11, 60]], torch.ones(3))  # Quaff's scaling owns the outliers
    delta = torch.randn(40, 96) * 0.01
    s.add_delta_(delta)
    assert rel(s.weight, lin.weight + delta) < 0.02
    assert "smoothed" in repr(s) and q.inv_smooth is None


@pytest.mark.parametrize("exact", [True, False])
def test_smoothed_grad_input_is_grad_through_w(exact):
    """1/s is applied inside the op, so its backward must multiply grad_X by 1/s: the gradient of the smoothed
    layer is grad · W (W the layer's dequantized weight, 1/s included), close to the FP layer's."""
    lin, x, _ = layer_and_input()
    s = QuaffLinear.from_weight(lin.weight, lin.bias, [5, 11, 60], x.abs().reshape(-1, 96).amax(0), smooth_alpha=0.5)
    s.exact_grad = exact
    x = x.clone().requires_grad_()
    grad_out = torch.randn(3, 7, 40)
    s(x).backward(grad_out)
    assert torch.allclose(x.grad, grad_out @ s.weight, atol=(5e-3 if exact else 2e-2) * x.grad.abs().max().item())
    fp = grad_out @ lin.weight
    assert (x.grad - fp).abs().max() / fp.abs().max() < 3e-2


def test_int8_backward_copy_is_kept_in_step_and_not_saved():
    lin, x, q = layer_and_input()
    assert q.w_int8_t is None and "int8 backward" not in repr(q)
    q.int8_backward_()
    assert torch.equal(q.w_int8_t, q.w_int8.t()) and q.w_int8_t.is_contiguous() and "int8 backward" in repr(q)
    assert "w_int8_t" not in q.state_dict()
    q.add_delta_(torch.randn(40, 96) * 0.05)  # a merged update re-quantizes W: the copy follows
    assert torch.equal(q.w_int8_t, q.w_int8.t())
    x = x.clone().requires_grad_()
    q.train()(x).sum().backward()  # on CPU the copy is not read: the same gradient as without it
    g1 = x.grad.clone()
    x.grad = None
    q.int8_backward_(False)(x).sum().backward()
    assert q.w_int8_t is None and torch.equal(x.grad, g1)


def test_int8_backward_helper_and_fused_siblings_keep_the_copy():
    from quaff_fx.passes.fuse_scales import fuse_modules

    from quaff_fx import int8_backward_

    lin, x, q = layer_and_input()
    lin2, _, q2 = layer_and_input(seed=1)
    model = nn.Sequential(q, nn.ReLU(), q2)
    assert int8_backward_(model) == 2 and q.w_int8_t is not None and q2.w_int8_t is not None
    fused = fuse_modules([q, q2])
    assert torch.equal(fused.w_int8_t, fused.w_int8.t())
    assert fuse_modules([q.int8_backward_(False), q2.int8_backward_(False)]).w_int8_t is None
    assert int8_backward_(model, enable=False) == 2 and q.w_int8_t is None


def test_input_scale_is_what_the_op_multiplies_x_by():
    """X̂ = x · input_scale() (1/s of the smoothing off the outliers, 1/S_o on them): the reference fed that X̂
    gives the op's output."""
    lin, x, _ = layer_and_input()
    s = QuaffLinear.from_weight(lin.weight, None, [5, 11, 60], x.abs().reshape(-1, 96).amax(0), smooth_alpha=0.5).eval()
    d = s.input_scale()
    assert torch.allclose(d[[5, 11, 60]], 1.0 / s.act_scale) and torch.equal(d[:5], s.inv_smooth[:5])
    assert s.input_scale(torch.float64).dtype == torch.float64
    x2 = x.reshape(-1, 96)
    # x2 * d is scaled already: the reference divides it by 1
    ref = reference.quaff_linear(x2 * d, s.w_int8, s.w_scale, s.outlier_idx, torch.ones(3),
                                 reference.correction_weight(s.w_outlier, s.act_scale))
    assert torch.allclose(s(x).reshape(-1, 40), ref, atol=1e-4, rtol=1e-4)


def test_inline_kernels_switch_turns_the_compile_caches_off_and_back():
    """ops.inline_kernels(True) changes what a compiled graph is, which the compile caches' keys do not see: they are
    off while it is on, and back as they were after; off is the default."""
    from torch._functorch import config as aot_config
    from torch._inductor import config as inductor_config

    from quaff_fx import ops

    assert not ops.kernels_inlined()
    before = (aot_config.enable_autograd_cache, inductor_config.fx_graph_cache)
    ops.inline_kernels(True)
    try:
        assert ops.kernels_inlined()
        assert (aot_config.enable_autograd_cache, inductor_config.fx_graph_cache) == (False, False)
        ops.inline_kernels(True)  # twice: the saved settings stay the first ones
    finally:
        ops.inline_kernels(False)
    assert (aot_config.enable_autograd_cache, inductor_config.fx_graph_cache) == before
    assert not ops.kernels_inlined()
