"""GPTQ rounding: the blocked, layer-batched implementation against the plain column loop; XᵀX in float32 against
float64; XᵀX from the live model's hooks against the graph."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from quaff_fx import find_linears
from quaff_fx.kernels.reference import QMAX, quantize_weight
from quaff_fx.rounding import gather_xtx, gptq_round, gptq_round_many


def column_loop(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """GPTQ as first written (OBQ order, no blocks): round a column, spread its error over every later column."""
    w, h = weight.double().clone(), hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = torch.clamp(torch.round(w[:, i] / scale), -QMAX, QMAX)
        e = (w[:, i] - q[:, i] * scale) / hinv[i, i]
        w[:, i:] -= e[:, None] * hinv[i, i:][None, :]
    return q.to(torch.int8)


def layer(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(64, cols, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, cols, dtype=torch.float64)
    x[:, 5] = 0.0  # a channel that never fires
    _, scale = quantize_weight(w.float(), "channel")
    return w, x.t() @ x, scale.double()


def test_blocked_gptq_equals_the_column_loop():
    for rows, cols, block in ((24, 40, 16), (8, 130, 128), (5, 33, 7)):
        w, h, scale = layer(rows, cols, rows + cols)
        blocked = gptq_round(w, h, scale, block=block, dtype=torch.float64)
        assert torch.equal(blocked, column_loop(w, h, scale)), (rows, cols, block)


def test_layers_rounded_together_equal_each_alone():
    layers = [layer(rows, 48, seed) for seed, rows in enumerate((16, 40, 7))]
    together = gptq_round_many([w for w, _, _ in layers], [h.clone() for _, h, _ in layers],  # consumed
                               [s for _, _, s in layers], block=16, dtype=torch.float64)
    for (w, h, s), codes in zip(layers, together):
        assert codes.shape == w.shape and torch.equal(codes, gptq_round(w, h, s, block=16, dtype=torch.float64))


def test_float32_gptq_stays_close_to_float64_and_beats_round_to_nearest():
    w, h, scale = layer(32, 96, 3)
    q64, q32 = gptq_round(w, h, scale, dtype=torch.float64), gptq_round(w, h, scale)
    assert (q64 != q32).float().mean() < 0.01  # a rare rounding tie may flip
    nearest = torch.clamp(torch.round(w / scale[:, None]), -QMAX, QMAX)

    def err(q):
        d = w - q.double() * scale[:, None]
        return float(torch.einsum("ni,ij,nj->", d, h, d))

    assert err(q32) < 0.8 * err(nearest)


def test_xtx_in_float32_from_the_live_model_matches_float64(captured_llama):
    llama, gm = captured_llama()
    sites = [s for s in find_linears(gm) if s.module_name != "lm_head"]
    nodes = list(dict.fromkeys(s.input_node for s in sites))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)]
    live = gather_xtx(gm, nodes, batches)  # forward pre-hooks on the live model, float32
    gm.meta["quaff"]["source"] = None  # as if the live model were gone: the graph, node by node
    graph = gather_xtx(gm, nodes[:3], batches)
    for n in nodes:
        site = next(s for s in sites if s.input_node is n)
        xs: list[torch.Tensor] = []
        handle = llama.get_submodule(site.module_name).register_forward_pre_hook(lambda m, a: xs.append(a[0]))
        with torch.no_grad():
            for b in batches:
                llama(input_ids=b, use_cache=False)
        handle.remove()
        x64 = torch.cat([x.reshape(-1, x.shape[-1]).double() for x in xs])
        ref = x64.t() @ x64
        assert live[n].dtype == torch.float32
        assert torch.allclose(live[n].double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), site.module_name
        if n in graph:
            assert torch.allclose(graph[n].double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert len(live) == len(nodes) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_on_the_gpu_matches_the_cpu():
    w, h, scale = layer(64, 256, 1)
    cpu = gptq_round(w, h, scale)
    gpu = gptq_round(w.cuda(), h.cuda(), scale.cuda())
    assert gpu.device.type == "cuda" and (gpu.cpu() != cpu).float().mean() < 0.01


def _peak_live_bytes(prof) -> int:
    """Peak of the CPU bytes allocated while ``prof`` recorded (its allocation events) and not yet freed."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
        events = json.loads((Path(tmp) / "trace.json").read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


@pytest.mark.slow  # seconds of the fast tier's 2-minute budget
def test_quantize_holds_the_weights_and_one_layers_working_set(monkeypatch):
    """The default transform of a Llama whose down_proj XᵀX (1024², float32) dwarfs the rest: at its peak it holds
    the FP weights, the int8 layers built so far and GPTQ's working set of one layer (its XᵀX turned into H of X̂ in
    place, the Cholesky factors, the weight copy), not a second Hessian or code buffer (7.8 XᵀX before); and no FP
    weight of a quantized layer outlives the swap."""
    import weakref

    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from quaff_fx import CalibrationConfig, OutlierConfig, QuaffConfig, QuaffLinear, quantize_, rounding

    monkeypatch.setattr(rounding, "GPTQ_MEMORY", 1)  # XᵀX of one input at a time
    monkeypatch.setattr(rounding, "CPU_FLOAT64_MAX_WIDTH", 0)  # float32, as on a GPU (float64: 5.4 XᵀX)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    g = torch.Generator().manual_seed(0)
    calibration = CalibrationConfig(token_batches=tuple(torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        fp = [weakref.ref(m.weight) for n, m in model.named_modules()
              if type(m) is torch.nn.Linear and "lm_head" not in n]
        result = quantize_(model, QuaffConfig(outliers=OutlierConfig("top_abs", max_ratio=0.02)), calibration)
    int8 = sum(m.w_int8.numel() for m in model.modules() if isinstance(m, QuaffLinear))
    xtx = 1024**2 * 4
    assert len(result.layers) == 28
    assert _peak_live_bytes(prof) - weights - int8 <= 4 * xtx  # 3.4 measured
    assert [r for r in fp if r() is not None] == []


@pytest.mark.parametrize("max_width, expected", [(64, torch.float64), (32, torch.float32)])
def test_cpu_factorisations_in_float64_up_to_the_width_limit(monkeypatch, max_width, expected):
    """On the CPU the O(K³) factorisations run in float64 for inputs up to CPU_FLOAT64_MAX_WIDTH wide, in float32
    (as on a GPU) above it; the column steps stay in the asked dtype either way."""
    from quaff_fx import rounding

    seen = []
    cholesky_ex = torch.linalg.cholesky_ex

    def spy(h, *args, **kwargs):
        seen.append(h.dtype)
        return cholesky_ex(h, *args, **kwargs)

    monkeypatch.setattr(rounding, "CPU_FLOAT64_MAX_WIDTH", max_width)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    w, h, s = layer(16, 48, 0)
    codes = gptq_round(w.float(), h.float(), s.float())
    assert seen == [expected] and codes.dtype == torch.int8 and codes.shape == (16, 48)


@pytest.mark.slow  # seconds of the fast tier's 2-minute budget
def test_the_swap_frees_each_fp_weight_as_it_replaces_it(monkeypatch):
    """With the cyclic GC off, as when it has not run for a while: each FP weight is freed by the swap that replaces
    its layer, before the next layer comes in (torch.export leaves a garbage cycle holding every parameter; the
    transform collects it first, else a GPU holds the whole FP model and all the int8 layers at once)."""
    import gc
    import importlib
    import weakref

    from quaff_fx import CalibrationConfig, QuaffConfig, quantize_

    transform_module = importlib.import_module("quaff_fx.transform")
    model = tiny_llama()
    fp = {n: weakref.ref(m.weight) for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    alive_after_install = []
    install = transform_module._install

    def counting_install(model, name, module, annotation):
        spec = install(model, name, module, annotation)
        alive_after_install.append(sum(r() is not None for r in fp.values()))
        return spec

    monkeypatch.setattr(transform_module, "_install", counting_install)
    batches = tuple(torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2))
    gc.collect()
    gc.disable()
    try:
        quantize_(model, QuaffConfig(), CalibrationConfig(token_batches=batches))
    finally:
        gc.enable()
    assert alive_after_install == list(range(len(fp) - 1, -1, -1))
