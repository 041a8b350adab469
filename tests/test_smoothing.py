"""The smoothing search behind smooth_alpha="auto": measured per input during calibration, stored with the
stats, picked by the annotate pass, shared by siblings so that fusion still applies."""
import pytest
import torch
from conftest import copy_captured
from quaff_fx.passes import AnnotateOutliers, FuseScales, RewriteLinear, annotations

from quaff_fx import OutlierConfig, QuaffConfig, QuaffError, QuaffLinear, calibrate, run_passes
from quaff_fx.config import SMOOTH_GRID
from quaff_fx.io import load_stats, save_stats
from quaff_fx.smoothing import pick_alpha

CFG = QuaffConfig.preset("fast", outliers=OutlierConfig("top_abs", max_ratio=0.05), smooth_alpha="auto")


def data(n=2):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(n)]


def stats_of(gm, **kw):
    return calibrate(gm, data(), CFG.outliers, CFG.eligible, n_batches=2, **{"smooth_grid": SMOOTH_GRID, **kw})


@pytest.fixture(scope="module")
def searched(_captured_llama):
    """The tiny Llama's stats with the smoothing search, gathered once for this module (tests only read them)."""
    return stats_of(copy_captured(_captured_llama)[1])


def test_search_is_recorded_deterministic_and_shared_by_siblings(captured_llama, searched):
    a, b = searched, stats_of(captured_llama()[1])  # a second search of the same model gives the same errors
    assert a.info["smooth_grid"] == list(SMOOTH_GRID) and a.info["smooth_rows"] == 64
    for name, layer in a.layers.items():
        assert layer.smooth_error.shape == (len(SMOOTH_GRID),) and torch.isfinite(layer.smooth_error).all()
        assert torch.equal(layer.smooth_error, b.layers[name].smooth_error)
    q, k = a.layers["model.layers.0.self_attn.q_proj"], a.layers["model.layers.0.self_attn.k_proj"]
    assert torch.equal(q.smooth_error, k.smooth_error)  # q/k/v read one input: one measurement, one α


def test_auto_picks_the_least_error_and_siblings_fuse(captured_llama, searched):
    stats = searched
    _, gm = captured_llama()
    run_passes(gm, [AnnotateOutliers(stats, CFG), RewriteLinear(CFG)])
    ann = annotations(gm)
    for name, a in ann.items():
        errors = stats.layers[name].smooth_error
        alpha = None if a.smooth is None else a.smooth.alpha
        assert alpha == pick_alpha(errors, SMOOTH_GRID)
        assert float(errors[SMOOTH_GRID.index(alpha)]) == float(errors.min())
    mods = {n: gm.get_submodule(f"model.{n}") for n in ann}
    q, v = mods["model.layers.0.self_attn.q_proj"], mods["model.layers.0.self_attn.v_proj"]
    assert (q.inv_smooth is None) == (v.inv_smooth is None)
    if q.inv_smooth is not None:
        assert torch.equal(q.inv_smooth, v.inv_smooth)
    ids = torch.randint(0, 256, (2, 9))
    before = gm(ids)
    result = FuseScales()(gm)
    assert sum(r["status"] == "fused" for r in result.report.rows) == 4  # q/k/v and gate/up of both layers
    gm.recompile()
    assert (gm(ids) - before).abs().max() <= 0.01 * before.abs().max()


def test_auto_reduces_the_layer_error_against_no_smoothing(searched):
    stats = searched
    # grid[0] is None (no smoothing). down_proj reads the uneven MLP activations: some α cuts its error by over
    # 10% (0.63-0.69 of it measured); inputs whose heavy channels are all outliers (scaled, not smoothed) may tie
    ratio = {name: float(layer.smooth_error.min() / layer.smooth_error[0]) for name, layer in stats.layers.items()}
    assert all(r <= 0.9 for name, r in ratio.items() if name.endswith("down_proj")), ratio


def test_stats_keep_the_search_and_old_stats_are_refused_for_auto(captured_llama, searched, tmp_path):
    stats = searched
    save_stats(stats, tmp_path / "s.safetensors")
    back = load_stats(tmp_path / "s.safetensors")
    for name, layer in stats.layers.items():
        assert torch.equal(back.layers[name].smooth_error, layer.smooth_error)
    _, gm = captured_llama()
    bare = calibrate(gm, data(), CFG.outliers, CFG.eligible, n_batches=2)
    assert all(layer.smooth_error is None for layer in bare.layers.values())
    with pytest.raises(QuaffError, match="no smoothing search.*--smooth-alpha off"):
        AnnotateOutliers(bare, CFG)(gm)
    off = QuaffConfig.preset("fast", outliers=CFG.outliers)
    run_passes(gm, [AnnotateOutliers(bare, off), RewriteLinear(off)])
    assert all(m.inv_smooth is None for m in gm.modules() if isinstance(m, QuaffLinear))


def test_presets_by_name_and_bad_smoothing():
    assert QuaffConfig.preset("default") == QuaffConfig() == QuaffConfig.preset("accurate")  # the dataclass defaults
    default = QuaffConfig()
    assert (default.smooth_alpha, default.smooth_shared, default.weight_rounding) == (0.6, True, "gptq")
    assert default.outliers == OutlierConfig("top_abs", 100.0, 0.01)
    fast, paper = QuaffConfig.preset("fast"), QuaffConfig.preset("paper")
    assert (fast.smooth_alpha, fast.smooth_shared, fast.weight_rounding) == (None, True, "nearest")
    assert fast.outliers == default.outliers
    assert paper.smooth_alpha is None and paper.weight_rounding == "nearest"
    assert paper.outliers == OutlierConfig("mean_times", 100.0, 0.01)
    assert QuaffConfig.preset("fast", smooth_alpha=0.3).smooth_alpha == 0.3
    with pytest.raises(QuaffError, match="unknown preset 'best'"):
        QuaffConfig.preset("best")
    for bad in (1.5, 0.0, "sometimes", True):
        with pytest.raises(QuaffError, match="smooth_alpha must be 'auto', None"):
            QuaffConfig(smooth_alpha=bad)


def test_gptq_rounding_lowers_the_output_error_of_correlated_inputs():
    from quaff_fx.kernels.reference import quantize_weight
    from quaff_fx.rounding import gptq_round

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=g) @ torch.randn(48, 96, generator=g)  # correlated channels
    w = torch.randn(40, 96, generator=g)
    nearest, scale = quantize_weight(w)
    gptq = gptq_round(w, x.double().t() @ x.double(), scale)

    def err(q):  # the output error of the rounded weight on x
        return float((x @ (w - q.float() * scale[:, None]).t()).pow(2).sum())

    assert gptq.dtype == torch.int8 and gptq.abs().max() <= 127
    assert err(gptq) < 0.7 * err(nearest)


def test_xtx_is_gathered_once_per_input_from_the_fp_graph(captured_llama):
    from quaff_fx.capture import find_linears
    from quaff_fx.rounding import chunks, gather_xtx

    llama, gm = captured_llama()
    sites = {s.module_name: s for s in find_linears(gm)}
    q, k = sites["model.layers.0.self_attn.q_proj"], sites["model.layers.0.self_attn.k_proj"]
    assert q.input_node is k.input_node
    xtx = gather_xtx(gm, [q.input_node], data())
    seen = []
    def keep_input(module, args, output):
        seen.append(args[0].reshape(-1, 64).double())

    hook = llama.model.layers[0].self_attn.q_proj.register_forward_hook(keep_input)
    with torch.no_grad():
        for batch in data():
            llama(input_ids=batch)
    hook.remove()
    x = torch.cat(seen)
    ref = x.t() @ x
    # each batch counted once
    assert torch.allclose(xtx[q.input_node].double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    nodes = [q.input_node, sites["model.layers.0.mlp.down_proj"].input_node,
             sites["model.layers.1.self_attn.q_proj"].input_node]
    widths = {nodes[0]: 64, nodes[1]: 128, nodes[2]: 64}
    assert chunks(nodes, widths, budget=(64 * 64 + 128 * 128) * 4) == [nodes[:2], nodes[2:]]
    # a single input wider than the budget still goes alone
    assert chunks(nodes, widths, budget=1) == [[n] for n in nodes]


@pytest.mark.slow  # seconds of the fast tier's 2-minute budget
def test_transform_with_gptq_rounding_is_independent_of_the_chunking(captured_llama):
    from quaff_fx import default_passes, transform

    gptq_cfg = QuaffConfig.preset("fast", outliers=CFG.outliers, weight_rounding="gptq")
    llama, gm = captured_llama()
    stats = calibrate(gm, data(), CFG.outliers, CFG.eligible, n_batches=2)
    assert len(stats.batches) == 2 and "batches" not in str(stats.metadata()["layers"])  # kept in memory, not saved
    ids = torch.randint(0, 256, (2, 12))
    ref = llama(input_ids=ids).logits
    (nearest_model, nearest_gm), (gptq_model, gptq_gm), (small_model, small_gm) = (captured_llama() for _ in range(3))
    transform(nearest_model, stats, QuaffConfig.preset("fast", outliers=CFG.outliers), gm=nearest_gm)
    result = transform(gptq_model, stats, gptq_cfg, gm=gptq_gm)
    assert any("GPTQ rounding: 14 layers, XᵀX gathered in 1 chunk" in n for r in result.reports for n in r.notes)
    small = default_passes(stats, gptq_cfg, fuse=True)
    small[1].gptq_memory = 64 * 64 * 4  # one input per chunk (float32 XᵀX): 8 partial runs per batch
    fused = transform(small_model, stats, gptq_cfg, passes=small, gm=small_gm)
    assert any("in 8 chunk(s)" in n for r in fused.reports for n in r.notes)
    assert not hasattr(stats, "gptq_codes")  # no side channel: the rounded layers travel on the graph's annotations
    a, b = nearest_model.model.layers[0].mlp.down_proj, gptq_model.model.layers[0].mlp.down_proj
    assert torch.equal(a.w_scale, b.w_scale) and not torch.equal(a.w_int8, b.w_int8)
    for name, mod in gptq_model.named_modules():  # chunking does not change the result; fused layers' live twins agree
        if isinstance(mod, QuaffLinear):
            assert torch.equal(mod.w_int8, small_model.get_submodule(name).w_int8), name
    assert (gptq_model(input_ids=ids).logits - ref).abs().max() <= 0.05 * ref.abs().max()
    bare = calibrate(gm, data(), CFG.outliers, CFG.eligible, n_batches=2, keep_batches=False)
    with pytest.raises(QuaffError, match="GPTQ rounding .* gathers XᵀX from the calibration batches"):
        transform(llama, bare, gptq_cfg, gm=gm)
    with pytest.raises(QuaffError, match="weight_rounding must be"):
        QuaffConfig(weight_rounding="stochastic")


def test_per_layer_smoothing_differs_between_siblings_and_is_not_fused(captured_llama, searched):
    stats = searched
    shared = QuaffConfig.preset("fast", outliers=CFG.outliers, smooth_alpha=0.5)
    own = QuaffConfig.preset("fast", outliers=CFG.outliers, smooth_alpha=0.5, smooth_shared=False)
    graphs = {}
    for key, cfg in (("shared", shared), ("own", own)):
        _, gm = captured_llama()
        run_passes(gm, [AnnotateOutliers(stats, cfg), RewriteLinear(cfg)])
        graphs[key] = gm

    def attn(gm, leaf):
        return gm.get_submodule(f"model.model.layers.0.self_attn.{leaf}")

    assert torch.equal(attn(graphs["shared"], "q_proj").inv_smooth, attn(graphs["shared"], "k_proj").inv_smooth)
    assert not torch.equal(attn(graphs["own"], "q_proj").inv_smooth, attn(graphs["own"], "k_proj").inv_smooth)
    assert sum(r["status"] == "fused" for r in FuseScales()(graphs["shared"]).report.rows) == 4
    assert not FuseScales()(graphs["own"]).modified
