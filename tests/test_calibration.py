import pytest
import torch
from torch import nn

from quaff_fx import (
    CalibrationStats,
    OutlierConfig,
    QuaffConfig,
    QuaffError,
    calibrate,
    capture,
    load_stats,
    save_stats,
)
from quaff_fx.outliers import batch_counts, jaccard, select


def batches(n=4, b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (b, s), generator=g) for _ in range(n)]


def inputs_by_hooks(model, data):
    """What the eager model feeds each Linear: the ground truth for the stats."""
    seen = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            seen.setdefault(name, []).append(x)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def test_stats_record_max_mean_and_tokens_of_every_linear_input(captured_llama):
    llama, gm = captured_llama()
    data = batches()
    stats = calibrate(gm, data, n_batches=4)
    truth = inputs_by_hooks(llama, data)
    assert set(stats.layers) == set(truth)
    for name, x in truth.items():
        layer = stats.layers[name]
        assert layer.tokens == x.shape[0] == 4 * 2 * 16
        assert torch.allclose(layer.max_abs, x.abs().amax(0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(layer.mean_abs, x.abs().mean(0), rtol=1e-4, atol=1e-6)


def test_planted_outlier_channels_are_found_and_stable_across_halves(captured_llama):
    _, gm = captured_llama()
    cfg = OutlierConfig("mean_times", threshold=10, max_ratio=0.04)  # cap: 2 of 64
    stats = calibrate(gm, batches(), cfg, n_batches=4)
    q = stats.outliers("model.layers.0.self_attn.q_proj")
    counts = stats.layers["model.layers.0.self_attn.q_proj"].total_counts
    assert q.tolist() == [3, 17] and set(counts.topk(2).indices.tolist()) == {3, 17}
    assert stats.layers["model.layers.0.self_attn.q_proj"].counts.sum(1).gt(0).all()  # both halves counted
    q_name = "model.layers.0.self_attn.q_proj"
    assert jaccard(stats.half_outliers(q_name, 0), stats.half_outliers(q_name, 1)) == 1.0


def test_layer_filter_skips_lm_head_by_default(captured_llama):
    _, gm = captured_llama()
    stats = calibrate(gm, batches(2), layer_filter=QuaffConfig().eligible)
    assert "lm_head" not in stats.layers and len(stats.layers) == 14


def synthetic(tokens=64, channels=200):
    torch.manual_seed(0)
    x = torch.randn(tokens, channels)
    x[:, 7] *= 500
    x[: tokens // 2, 50] *= 300
    x[:3, 90] *= 150
    return x


def test_mean_times_counts_tokens_and_select_keeps_most_frequent_under_the_cap():
    x = synthetic()
    cfg = OutlierConfig("mean_times", threshold=100, max_ratio=0.01)  # cap: 2 of 200
    counts = batch_counts(x, cfg)
    assert counts[7] > counts[50] > 0 and counts[1] == 0
    chosen = select(counts, x.abs().amax(0), cfg)
    assert chosen.tolist() == [7, 50]


def test_top_abs_zscore_and_static():
    x = synthetic()
    top = OutlierConfig("top_abs", max_ratio=0.015)  # 3 channels
    assert set(select(batch_counts(x, top), x.abs().amax(0), top).tolist()) == {7, 50, 90}
    z = OutlierConfig("zscore", threshold=20, max_ratio=0.05)
    assert 7 in select(batch_counts(x, z), x.abs().amax(0), z).tolist()
    st = OutlierConfig("static", channels=(4, 9, 1000))
    assert select(batch_counts(x, st), x.abs().amax(0), st).tolist() == [4, 9]  # 1000 is past this layer's width


def test_selection_breaks_ties_by_max_abs_then_lower_index():
    cfg = OutlierConfig("mean_times", threshold=5, max_ratio=0.02)  # cap: 2 of 100 channels
    counts = torch.zeros(100, dtype=torch.long)
    counts[[10, 20, 30, 40]] = 3  # four channels as often outliers, two may stay
    max_abs = torch.ones(100)
    max_abs[30] = 9.0  # the larger max|x| wins a tie of counts
    assert select(counts, max_abs, cfg).tolist() == [10, 30]  # then the lower index
    counts[40] = 4  # more often an outlier beats a larger max|x|
    assert select(counts, max_abs, cfg).tolist() == [30, 40]


@pytest.mark.parametrize("kwargs,message", [
    ({"threshold": 0}, "threshold must be > 0"),
    ({"threshold": -3}, "threshold must be > 0"),
    ({"strategy": "magic"}, "unknown outlier strategy 'magic'"),
    ({"max_ratio": 2}, "max_ratio must lie in"),
    ({"strategy": "static"}, "needs a list of channels"),
])
def test_bad_outlier_config(kwargs, message):
    with pytest.raises(QuaffError, match=message):
        OutlierConfig(**kwargs)


def test_stats_roundtrip_and_version_check(captured_llama, tmp_path):
    _, gm = captured_llama()
    stats = calibrate(gm, batches(2), OutlierConfig(threshold=10), n_batches=2)
    path = tmp_path / "stats.safetensors"
    save_stats(stats, path)
    back = load_stats(path)
    assert back.outlier_config == stats.outlier_config and back.info == stats.info
    for name, layer in stats.layers.items():
        assert torch.equal(back.layers[name].counts, layer.counts)
        assert torch.equal(back.layers[name].max_abs, layer.max_abs)
        assert torch.equal(back.outliers(name), stats.outliers(name))
    with pytest.raises(QuaffError, match="exists; pass --force"):
        save_stats(stats, path)
    meta = stats.metadata()
    meta["version"] = 99
    with pytest.raises(QuaffError, match="version 99"):
        CalibrationStats.from_parts(meta, stats.to_tensors())


def test_stats_for_another_model_are_refused(captured_llama):
    from conftest import tiny_llama
    from quaff_fx.passes import AnnotateOutliers

    _, gm = captured_llama()
    stats = calibrate(gm, batches(1))
    wider = capture(tiny_llama(hidden_size=96))
    with pytest.raises(QuaffError, match="have 64 channels, the layer has 96 inputs"):
        AnnotateOutliers(stats)(wider)


def test_other_strategy_needs_new_calibration(captured_llama):
    _, gm = captured_llama()
    stats = calibrate(gm, batches(1))
    with pytest.raises(QuaffError, match="needs a new calibration"):
        stats.outliers("model.layers.0.mlp.up_proj", OutlierConfig("zscore", threshold=3))


def test_nan_activations_are_reported_with_the_layer(captured_llama):
    llama, gm = captured_llama()
    with torch.no_grad():
        llama.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(QuaffError, match="model.layers.0.self_attn.q_proj.*NaN"):
        calibrate(gm, batches(1))


def test_presets():
    assert OutlierConfig.preset("paper") == OutlierConfig("mean_times", 100.0, 0.01)
    assert OutlierConfig.preset("default") == OutlierConfig() == OutlierConfig("top_abs", 100.0, 0.01)
    with pytest.raises(QuaffError, match="unknown preset 'best'"):
        OutlierConfig.preset("best")


def test_calibration_runs_the_live_model_with_hooks_and_agrees_with_the_graph(captured_llama, monkeypatch):
    def graph_run(self, node):
        raise AssertionError("graph run")

    cfg = OutlierConfig("mean_times", threshold=10, max_ratio=0.04)
    llama, gm = captured_llama()
    with monkeypatch.context() as m:  # the live model is there: the graph is never run node by node
        m.setattr(torch.fx.Interpreter, "run_node", graph_run)
        live = calibrate(gm, batches(), cfg, n_batches=4, smooth_grid=(None, 0.5))
    # hooks removed, model kept
    assert all(isinstance(m, nn.Linear) for n, m in llama.named_modules() if n.endswith("proj"))
    assert not any(m._forward_pre_hooks for m in llama.modules())
    gm.meta["quaff"]["source"] = None  # as if the model were gone: the graph is run instead
    graph = calibrate(gm, batches(), cfg, n_batches=4, smooth_grid=(None, 0.5))
    assert set(live.layers) == set(graph.layers)
    for name, layer in live.layers.items():
        other = graph.layers[name]
        assert layer.max_abs.device.type == "cpu" and torch.equal(layer.counts, other.counts), name
        assert torch.allclose(layer.max_abs, other.max_abs, rtol=1e-5) and layer.tokens == other.tokens
        assert torch.allclose(layer.smooth_error, other.smooth_error, rtol=1e-3, atol=1e-7), name
