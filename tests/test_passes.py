import copy
import json

import pytest
import torch
from conftest import quaff_nodes
from quaff_fx.passes import AnnotateOutliers, RewriteLinear, annotations

from quaff_fx import OutlierConfig, QuaffConfig, QuaffError, QuaffLinear, calibrate, capture, run_passes, transform
from quaff_fx.hf import quantize_model_, register_peft
from quaff_fx.pipeline import QuaffPassResult

# plain Quaff: the mechanics under test
CFG = QuaffConfig.preset("fast", outliers=OutlierConfig("mean_times", threshold=10, max_ratio=0.05))


def data(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(n)]


@pytest.fixture()
def calibrated(captured_llama):
    llama, gm = captured_llama()
    return llama, gm, calibrate(gm, data(), CFG.outliers, CFG.eligible, n_batches=4)


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target == target)


def test_annotate_marks_eligible_linears_and_reports(calibrated):
    _, gm, stats = calibrated
    result = AnnotateOutliers(stats, CFG)(gm)
    assert isinstance(result, QuaffPassResult) and result.modified
    ann = annotations(gm)
    assert len(ann) == 14 and "lm_head" not in ann
    q_ann = ann["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q_ann.outliers, stats.outliers("model.layers.0.self_attn.q_proj")) and 3 in q_ann.outliers
    assert torch.equal(q_ann.act_max, stats.layers["model.layers.0.self_attn.q_proj"].max_abs) and q_ann.layer is None
    rows = {r["module"]: r for r in result.report.rows}
    assert rows["lm_head"]["status"] == "skipped: excluded by config"
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["bytes_before"] == 64 * 64 * 4 and q["bytes_saved"] == q["bytes_before"] - q["bytes_after"] > 0
    data_json = json.loads(result.report.to_json())
    assert data_json["totals"]["transformed"] == 14 and data_json["totals"]["skipped"] == 1
    table = result.report.to_table()
    assert "model.layers.1.mlp.down_proj" in table and "annotated" in table and "% of the int8 weights" in table
    annotated = [r for r in rows.values() if r["status"] == "annotated"]
    assert data_json["totals"]["int8_weight_bytes"] == sum(r["in_features"] * r["out_features"] for r in annotated)
    assert AnnotateOutliers(stats, CFG)(gm).modified is False  # idempotent
    # the annotation (and a layer built on it) is kept
    assert annotations(gm)["model.layers.0.self_attn.q_proj"] is q_ann


def test_rewrite_replaces_linear_nodes_and_drops_fp_weights(calibrated):
    model, gm, stats = calibrated
    reference = copy.deepcopy(model)
    assert count(gm, torch.ops.aten.linear.default) == 15
    result = run_passes(gm, [AnnotateOutliers(stats, CFG), RewriteLinear(CFG)])
    gm = result.graph_module
    assert count(gm, torch.ops.aten.linear.default) == 1  # lm_head stays
    assert len(quaff_nodes(gm)) == 14
    assert not any(n.op == "get_attr" and n.target.endswith("q_proj.weight") for n in gm.graph.nodes)
    assert not any(name.endswith("q_proj.weight") for name, _ in gm.named_parameters())
    ids = torch.randint(0, 256, (2, 24))
    fp = reference(input_ids=ids, use_cache=False).logits
    assert (gm(ids) - fp).abs().max() / fp.abs().max() < 0.05
    again = run_passes(gm, [AnnotateOutliers(stats, CFG), RewriteLinear(CFG)])
    assert not again.modified and count(again.graph_module, torch.ops.aten.linear.default) == 1


def test_graph_route_and_live_module_swap_give_the_same_logits(calibrated):
    model, gm, stats = calibrated
    twin = copy.deepcopy(model)
    result = transform(model, stats, CFG, gm=gm)
    ann = annotations(result.graph_module)
    assert all(ann[n].layer is model.get_submodule(n) for n in result.layers)  # the graph's modules, on the annotations
    quantize_model_(twin, ann, CFG)  # built independently from the annotations
    ids = torch.randint(0, 256, (3, 20))
    graph = result.graph_module(ids)
    live = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(twin(input_ids=ids, use_cache=False).logits, live)
    # the exported graph decomposes attention differently: fp32 rounding may flip an int8 rounding
    assert torch.allclose(graph, live, atol=2e-3), (graph - live).abs().max()
    assert isinstance(model.model.layers[0].mlp.down_proj, QuaffLinear)
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_include_exclude_patterns(captured_llama):
    cfg = QuaffConfig(outliers=CFG.outliers, include=("*mlp*",), exclude=("lm_head", "*down_proj"))
    llama, gm = captured_llama()
    stats = calibrate(gm, data(1), cfg.outliers, cfg.eligible)
    result = transform(llama, stats, cfg, gm=gm)
    assert sorted(result.layers) == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                     "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_nothing_eligible_is_a_clear_error(captured_llama):
    cfg = QuaffConfig(outliers=CFG.outliers, exclude=("*",))
    llama, gm = captured_llama()
    stats = calibrate(gm, data(1), cfg.outliers)
    with pytest.raises(QuaffError, match="no eligible Linear"):
        transform(llama, stats, cfg, gm=gm)


def test_user_pass_runs_in_order(calibrated):
    _, gm, stats = calibrated
    seen = []

    def count_quaff(g):
        seen.append(len(quaff_nodes(g)))

    result = run_passes(gm, [AnnotateOutliers(stats, CFG), count_quaff, RewriteLinear(CFG), count_quaff])
    assert seen == [0, 14]
    assert [r.pass_name for r in result.reports] == ["annotate_outliers", "count_quaff", "rewrite_linear",
                                                     "count_quaff"]


def test_rewritten_model_trains_a_lora_adapter(calibrated):
    from peft import LoraConfig, get_peft_model

    model, gm, stats = calibrated
    transform(model, stats, CFG, gm=gm)
    peft_model = get_peft_model(model, register_peft(LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    frozen = model.model.layers[0].mlp.down_proj.base_layer.w_int8.clone()
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    losses = []
    peft_model.train()
    for _ in range(8):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert torch.equal(model.model.layers[0].mlp.down_proj.base_layer.w_int8, frozen)


def test_linear_on_a_computed_weight_is_listed_and_left_alone():
    from torch import nn

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.raw = nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            return torch.nn.functional.linear(self.fc(x), self.raw * 2)

    model = Computed()
    gm = capture(model)  # fx: call_module fc, and F.linear on a computed weight
    stats = calibrate(gm, [torch.randn(4, 16)], CFG.outliers)
    result = run_passes(gm, [AnnotateOutliers(stats, CFG), RewriteLinear(CFG)])
    rows = result.reports[0].rows
    assert [r["status"] for r in rows] == ["annotated", "skipped: not a Linear on a parameter (e.g. a computed weight)"]
    x = torch.randn(3, 16)
    assert (result.graph_module(x) - model(x)).abs().max() <= 0.02 * model(x).abs().max()
