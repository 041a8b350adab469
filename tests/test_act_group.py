"""Per-group activation scales (``act_group``): one int8 scale per (token, group of G input channels) of an MLP
output projection's input. Kernels against the reference, the op under compile/export/autograd, the module's
artifact record, the config and the presets, the rewrite, scale fusion and the ONNX lowering."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import PLAIN, calibration_batches, quantize_tiny, tiny_llama

from quaff_fx import QuaffConfig, QuaffError, QuaffLinear
from quaff_fx.kernels import cpu, reference
from quaff_fx.kernels.cpu import int_mm
from quaff_fx.kernels.reference import quantize_groups, quantize_rows, scale_activations


def heavy_layer(k: int, n: int = 24, group: int = 0, outliers=(3, 50), zero_cols=(), seed: int = 0):
    """A smoothed QuaffLinear with outliers and a heavy-tailed input [2, 5, k] (``zero_cols`` all zero)."""
    g = torch.Generator().manual_seed(seed)
    w, bias = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(2, 5, k, generator=g) ** 3
    x[..., list(zero_cols)] = 0
    outliers = [c for c in outliers if c < k]
    x[..., outliers] *= 40
    q = QuaffLinear.from_weight(w, bias, outliers, x.abs().reshape(-1, k).amax(0), smooth_alpha=0.5,
                                act_group=group).eval()
    return q, x, w


def reference_of(q: QuaffLinear, x: torch.Tensor, group: int) -> torch.Tensor:
    """The float64 oracle on the layer's tensors (the smoothing's 1/s applied in front, as the op does)."""
    return reference.quaff_linear(x.reshape(-1, q.in_features) * q.inv_smooth, q.w_int8, q.w_scale, q.outlier_idx,
                                  q.act_scale, reference.correction_weight(q.w_outlier, q.act_scale), q.bias, group)


def test_quantize_groups_scales_each_group_and_zero_groups_get_scale_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 100, generator=g) * torch.tensor([1.0, 50.0, 0.01, 3.0]).repeat_interleave(25)[None, :100]
    x[:, 64:96] = 0  # the third group of 32 is all zero
    q, s = quantize_groups(x, 32)
    assert q.dtype == torch.int8 and q.shape == (4, 100) and s.shape == (4, 4)  # the last group has 4 columns
    assert torch.equal(s[:, 2], torch.ones(4)) and not q[:, 64:96].any()
    for grp, cols in ((0, slice(0, 32)), (1, slice(32, 64)), (3, slice(96, 100))):
        assert torch.allclose(s[:, grp], x[:, cols].abs().amax(1) / 127)
        assert bool((q[:, cols].abs().amax(1) == 127).all())  # each group uses the whole int8 range
    assert (q.float() * s.repeat_interleave(32, 1)[:, :100] - x).abs().max() <= s.max() / 2 + 1e-6
    rows_q, rows_s = quantize_rows(x)
    for group in (0, 100, 500):  # one group: quantize_rows's numbers, the scale shaped [M, 1]
        q1, s1 = quantize_groups(x, group)
        assert torch.equal(q1, rows_q) and torch.equal(s1, rows_s[:, None])


@pytest.mark.parametrize("k,group,zero_cols", [(100, 32, range(64, 96)),  # K not a multiple of G, a zero group
                                                (96, 128, ()),  # G > K: one group
                                                (130, 64, range(128, 130)),  # a last group of 2 columns, all zero
                                                (64, 16, range(0, 16))])
def test_cpu_kernel_is_exact_against_the_reference(k, group, zero_cols):
    """The op (cpu kernel: int8 GEMM per group, int32) against the float64 oracle, with outliers and smoothing."""
    q, x, _ = heavy_layer(k, group=group, zero_cols=zero_cols)
    y = q(x)
    ref = reference_of(q, x, group)
    assert y.shape == (2, 5, 24) and torch.isfinite(y).all()
    assert torch.allclose(y.reshape(-1, 24), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if group < k:  # the grouped arithmetic, not per-token's: the two differ on this input
        assert (ref - reference_of(q, x, 0)).abs().max() > 1e-3 * ref.abs().max()


def test_group_zero_is_the_per_token_path_bit_for_bit():
    """act_group 0 (and a group of K or more) gives exactly the numbers of the per-token kernel as it was."""
    q, x, _ = heavy_layer(96)
    x2 = x.reshape(-1, 96) * q.inv_smooth
    corr = reference.correction_weight(q.w_outlier, q.act_scale)

    def old_cpu():  # kernels/cpu.quaff_linear before act_group
        x_hat, x_hat_o = scale_activations(x2, q.outlier_idx, q.act_scale)
        qx, sx = quantize_rows(x_hat)
        out = int_mm(qx, q.w_int8.t()).float().mul_(sx[:, None]).mul_(q.w_scale[None, :].float())
        return out.addmm_(x_hat_o, corr.float().t()).add_(q.bias.float())

    def old_reference():
        x_hat, x_hat_o = scale_activations(x2, q.outlier_idx, q.act_scale)
        qx, sx = quantize_rows(x_hat)
        acc = qx.double() @ q.w_int8.double().t()
        out = (acc * sx.double()[:, None] * q.w_scale.double()[None, :]).float()
        return out + x_hat_o @ corr.float().t() + q.bias.float()

    args = (x2, q.w_int8, q.w_scale, q.outlier_idx, q.act_scale, corr, q.bias)
    for group in (0, 96, 1000):
        assert torch.equal(cpu.quaff_linear(*args, act_group=group), old_cpu())
        assert torch.equal(reference.quaff_linear(*args, act_group=group), old_reference())
    per_token = q(x)
    q.act_group = 96
    assert torch.equal(q(x), per_token)


def test_groups_beat_per_token_on_a_heavy_group():
    """A few channels up to 30x the others, by how much varying per token: one scale per token is set by them and
    crushes every other channel's resolution; per group of 64 only their own group's."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g)
    x = torch.randn(64, 256, generator=g)
    x[:, :8] *= torch.rand(64, 1, generator=g) * 30
    exact = x @ w.t()
    errs = {}
    for group in (0, 64):
        q = QuaffLinear.from_weight(w, None, act_group=group).eval()
        errs[group] = ((q(x) - exact).norm() / exact.norm()).item()
    assert errs[64] < 0.7 * errs[0], errs  # measured 0.0137 vs 0.0244 (the int8 weight's error is in both)


def test_op_compiles_exports_and_keeps_its_backward():
    q, x, _ = heavy_layer(100, group=32)
    torch.library.opcheck(torch.ops.quaff.linear.default,
                          (x.requires_grad_(), q.w_int8, q.w_scale, q.outlier_idx, q.act_scale, q.w_outlier, q.bias,
                           False, False, q.inv_smooth, None, 32))
    x = x.detach()
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    assert torch.allclose(compiled(x), q(x))
    ep = torch.export.export(q, (x,))
    calls = [n for n in ep.graph.nodes if n.target == torch.ops.quaff.linear.default]
    assert len(calls) == 1 and 32 in calls[0].args
    assert torch.allclose(ep.module()(x), q(x))
    grads = {}
    for group in (32, 0):  # grad_X comes from the int8 weight: the group size does not enter it
        q.act_group = group
        xg = x.clone().requires_grad_()
        q(xg).backward(torch.ones(2, 5, 24))
        grads[group] = xg.grad
    assert torch.equal(grads[32], grads[0])


def test_module_records_act_group_and_old_specs_load_as_per_token():
    from quaff_fx.hf import quaff_skeleton_
    from quaff_fx.transform import layer_spec

    q, x, _ = heavy_layer(100, group=32)
    assert "act_group=32" in repr(q) and "act_group" not in repr(heavy_layer(100)[0])
    spec = layer_spec(q)
    assert spec["act_group"] == 32
    model = torch.nn.Sequential(torch.nn.Linear(100, 24), torch.nn.Linear(100, 24))
    old = {k: v for k, v in spec.items() if k != "act_group"}  # an artifact written before act_group
    quaff_skeleton_(model, {"0": spec, "1": old})
    assert (model[0].act_group, model[1].act_group) == (32, 0)
    model[0].load_state_dict(q.state_dict())
    assert torch.equal(model[0](x), q(x))
    parts = QuaffLinear.from_parts(q.w_int8, q.w_scale, q.outlier_idx, q.act_scale, q.w_outlier, q.bias,
                                   inv_smooth=q.inv_smooth, act_group=32)
    assert torch.equal(parts(x), q(x))
    with pytest.raises(QuaffError, match="act_group 'x'"):
        quaff_skeleton_(torch.nn.Sequential(torch.nn.Linear(100, 24)), {"0": {**spec, "act_group": "x"}})
    with pytest.raises(QuaffError, match="act_group must be an integer >= 0"):
        QuaffLinear(8, 4, act_group=-1)


def test_artifact_round_trip_keeps_act_group(llama, tmp_path):
    from quaff_fx import CalibrationConfig, quantize_
    from quaff_fx.io import build_manifest, config_of, load_quantized, save_quantized

    cfg = dataclasses.replace(PLAIN, act_group=48)  # 128 MLP channels: groups of 48, 48 and 32
    result = quantize_(llama, cfg, CalibrationConfig(token_batches=tuple(calibration_batches(1))))
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = llama(input_ids=ids).logits
    out = save_quantized(llama, tmp_path / "art", build_manifest({"kind": "test"}, cfg, result.layers, result.reports))
    back, manifest = load_quantized(out)
    assert config_of(manifest) == cfg
    groups = {n: m.act_group for n, m in back.model.named_modules() if isinstance(m, QuaffLinear)}
    assert groups == {n: 48 if n.endswith("down_proj") else 0 for n in groups} and len(groups) == 14
    assert torch.equal(back.model(input_ids=ids).logits, expected)


def test_config_presets_validation_and_round_trip():
    default = QuaffConfig()
    assert default.act_group == 128 and QuaffConfig.preset("default") == default
    assert default.act_group_layers == ("down_proj", "fc2", "dense_4h_to_h", "w2")
    assert QuaffConfig.preset("fast").act_group == 0 and QuaffConfig.preset("paper").act_group == 0
    assert default.act_group_of("model.layers.0.mlp.down_proj") == 128
    assert default.act_group_of("model.decoder.layers.1.fc2") == 128
    assert default.act_group_of("model.layers.0.block_sparse_moe.experts.3.w2") == 128
    for other in ("model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj", "lm_head", "x.fw2", "down_proj2"):
        assert default.act_group_of(other) == 0, other
    gpt2 = QuaffConfig(act_group=64, act_group_layers=("mlp.c_proj",))  # dotted suffixes pick the MLP's c_proj only
    assert gpt2.act_group_of("transformer.h.0.mlp.c_proj") == 64
    assert gpt2.act_group_of("transformer.h.0.attn.c_proj") == 0
    for bad in (-1, 1.5, True, "128", None):
        with pytest.raises(QuaffError, match="act_group must be an integer >= 0"):
            QuaffConfig(act_group=bad)
    for bad in ("down_proj", ("",), (3,)):
        with pytest.raises(QuaffError, match="act_group_layers must be a tuple"):
            QuaffConfig(act_group_layers=bad)
    cfg = QuaffConfig(act_group=64, act_group_layers=("down_proj", "mlp.c_proj"))
    assert QuaffConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in default.to_dict().items() if k not in ("act_group", "act_group_layers")}
    assert QuaffConfig.from_dict(old).act_group == 0  # written before per-group scales: per token


def planted_llama() -> torch.nn.Module:
    """A tiny Llama (intermediate 512: four groups of 128) whose tokens 0..63 carry a residual direction that only
    the gate/up rows of MLP channels 0..127 read: down_proj's input then has a heavy first group on those tokens
    and not on the others, which one scale per token serves badly and static smoothing cannot even out."""
    model = tiny_llama(intermediate_size=512)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 9] = 0
        emb[:64, 9] = 20.0
        for layer in model.model.layers:
            up, gate = layer.mlp.up_proj.weight, layer.mlp.gate_proj.weight
            up[:, 9], gate[:, 9] = 0, 0
            up[:128, 9] = torch.randn(128, generator=g)
            gate[:128, 9] = torch.randn(128, generator=g).abs()  # SiLU passes them: the product is large
    return model


def test_default_config_groups_down_proj_and_beats_per_token_on_a_heavy_tailed_mlp_input():
    fp = planted_llama()
    model = quantize_tiny(copy.deepcopy(fp), QuaffConfig(), calibration_batches(4))
    groups = {n: m.act_group for n, m in model.named_modules() if isinstance(m, QuaffLinear)}
    assert len(groups) == 14
    assert all(g == (128 if n.endswith("down_proj") else 0) for n, g in groups.items()), groups
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact = fp(input_ids=ids).logits
        grouped = model(input_ids=ids).logits
        for m in model.modules():  # the int8 codes and scales do not depend on act_group: only the forward does
            if isinstance(m, QuaffLinear):
                m.act_group = 0
        per_token = model(input_ids=ids).logits
    err_grouped, err_token = ((grouped - exact).norm() / exact.norm()).item(), (
        (per_token - exact).norm() / exact.norm()).item()
    assert err_grouped < 0.8 * err_token, (err_grouped, err_token)  # measured 0.018 vs 0.034


def test_rewrite_report_shows_act_group_and_naive_stays_per_token(captured_llama):
    from quaff_fx import calibrate, default_passes, run_passes
    from quaff_fx.hf import naive_w8a8_

    cfg = dataclasses.replace(PLAIN, act_group=32)
    model, gm = captured_llama()
    stats = calibrate(gm, calibration_batches(), cfg.outliers, cfg.eligible, n_batches=2)
    result = run_passes(gm, default_passes(stats, cfg))
    for report in result.reports:
        rows = [r for r in report.rows if r.get("status") in ("annotated", "rewritten")]
        assert rows and all(r["act_group"] == (32 if r["module"].endswith("down_proj") else 0) for r in rows)
        assert "act_group" in report.to_table()
    naive = tiny_llama()
    naive_w8a8_(naive, cfg)
    assert all(m.act_group == 0 for m in naive.modules() if isinstance(m, QuaffLinear))


def test_fusion_keeps_act_group_and_skips_siblings_of_another():
    from quaff_fx.passes import FuseScales
    from quaff_fx.passes.fuse_scales import fuse_modules

    from quaff_fx import calibrate, capture, default_passes, run_passes

    def rewritten(cfg):
        model = tiny_llama()
        gm = capture(model)
        stats = calibrate(gm, calibration_batches(), cfg.outliers, cfg.eligible, n_batches=2)
        return run_passes(gm, default_passes(stats, cfg)).graph_module

    ids = torch.randint(0, 256, (2, 21))
    gm = rewritten(dataclasses.replace(PLAIN, act_group=32, act_group_layers=("gate_proj", "up_proj", "v_proj")))
    before = gm(ids).detach()
    result = FuseScales()(gm)
    gm.recompile()
    fused = {r["members"]: r["act_group"] for r in result.report.rows}
    assert fused == {"gate_proj,up_proj": 32, "q_proj,k_proj": 0}  # v_proj (32) is left out of q/k (0)
    assert any("v_proj" in note and "act_group" in note for note in result.report.notes)
    mlp = gm.get_submodule("model.model.layers.0.mlp.fused_gate_proj_up_proj")
    assert mlp.act_group == 32
    assert (gm(ids) - before).abs().max() <= 0.01 * before.abs().max()
    q, _, _ = heavy_layer(64, group=16)
    with pytest.raises(QuaffError, match="different act_group"):
        fuse_modules([q, heavy_layer(64, seed=1)[0]])


def test_onnx_lowering_of_the_group_path(tmp_path):
    """The translation of quaff::linear with act_group (Pad to whole groups, a batched MatMulInteger) in
    onnxruntime against the op, on a K that groups do not divide and dynamic batch/sequence axes."""
    import onnx
    import onnxruntime as ort

    from quaff_fx.onnx_export import DEFAULT_OPSET, _quiet_exporter, _translation

    q, x, _ = heavy_layer(100, group=32, zero_cols=range(64, 96))
    dims = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=512)},)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(q, (x,), dynamo=True, opset_version=DEFAULT_OPSET, dynamic_shapes=dims,
                                    custom_translation_table=_translation(DEFAULT_OPSET), verbose=False)
    path = tmp_path / "layer.onnx"
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    assert {"Pad", "MatMulInteger", "ReduceSum"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for xs in (x, torch.randn(3, 7, 100, generator=torch.Generator().manual_seed(3)) ** 3):
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: xs.numpy()})[0])
        with torch.no_grad():
            ref = q(xs)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
