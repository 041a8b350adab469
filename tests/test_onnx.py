"""ONNX export of Quaff models, checked in onnxruntime."""
import subprocess
import sys

import onnx
import pytest
import torch

from quaff_fx.cli import main
from quaff_fx.io import load_quantized
from quaff_fx.onnx_export import export_onnx, onnx_logits


@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory):
    """`quaff-fx export-onnx` of the session artifact, run as a user runs it (its own process): the one export
    of the fast tests; the file and the finished process."""
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "quaff_fx.cli", "export-onnx", str(artifact), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow  # end to end: the ONNX export in its own process
def test_export_matches_pytorch_and_stores_int8_weights(artifact, exported):
    from quaff_fx import QuaffLinear

    loaded, _ = load_quantized(artifact)
    layers = [m for m in loaded.model.modules() if isinstance(m, QuaffLinear)]
    assert layers and all(m.inv_smooth is not None for m in layers)  # the default preset: 1/s inside each op
    path, _ = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulInteger", "Round", "ReduceMax"} <= ops
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 14
    for batch, seq in [(1, 5), (3, 40)]:  # dynamic axes
        ids = torch.randint(0, 256, (batch, seq))
        with torch.no_grad():
            ref = loaded.model(input_ids=ids).logits
        got = onnx_logits(path, ids)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-3 * max(1.0, ref.abs().max().item())


def test_cli_export_and_bad_inputs(artifact, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli.onnx"  # the successful export: test_cli_export_is_quiet_names_its_phases_and_judges
    out.write_bytes(b"")
    assert main(["export-onnx", str(tiny_model_dir), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not a quaff-fx artifact folder" in capsys.readouterr().err
    assert main(["export-onnx", str(artifact), "--out", str(tmp_path / "y.onnx"), "--opset", "9"]) == 2
    assert "opset 9 is not supported" in capsys.readouterr().err
    assert main(["export-onnx", str(artifact), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_plain_model_is_refused(tmp_path):
    from conftest import tiny_llama

    from quaff_fx import QuaffError

    with pytest.raises(QuaffError, match="not a Quaff model"):
        export_onnx(tiny_llama(), tmp_path / "z.onnx")
    assert not (tmp_path / "z.onnx").exists()


def test_export_gives_a_verdict_on_the_logit_difference(artifact, tmp_path, monkeypatch):
    """A max logit difference alone means nothing to a user: the check says match, agree or differ (23.7)."""
    import quaff_fx.onnx_export as onnx_export

    loaded, _ = load_quantized(artifact)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
    bumped = ref.clone()
    bumped[0, 3, ref[0, 3].argmin()] += 0.5  # a visible move that leaves the predicted token alone
    shuffled = ref[..., torch.randperm(ref.shape[-1], generator=torch.Generator().manual_seed(0))]
    for got, verdict in [(ref, "match"), (bumped, "agree"), (shuffled, "differ")]:
        monkeypatch.setattr(onnx_export, "onnx_logits", lambda path, ids, got=got: got)
        check = onnx_export.compare_with_pytorch(loaded.model, tmp_path / "unused.onnx", ids)
        assert check["verdict"] == verdict, (verdict, check)


@pytest.mark.slow  # end to end: the ONNX export in its own process
def test_cli_export_is_quiet_names_its_phases_and_judges(artifact, exported):
    """As a user runs it: no torchvision or FutureWarning noise, a line per phase, a verdict (23.6, 23.7, 23.8)."""
    out, proc = exported
    assert "torchvision" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert "passes onnx.checker" in proc.stdout and out.is_file()
    assert proc.stderr.splitlines() == [
        f"quaff-fx: loading {artifact}",
        "quaff-fx: exporting to ONNX opset 18 and checking the file (minutes for SmolLM2)",
        "quaff-fx: running the export in onnxruntime beside PyTorch"]
    assert "the top-1 token agrees at 100.0%" in proc.stdout and "the export matches PyTorch" in proc.stdout


@pytest.mark.slow  # one more export
def test_an_unmerged_lora_adapter_exports_and_matches_pytorch(artifact, tmp_path):
    """PEFT's LoRA on the QuaffLinears runs as quaff::lora_linear; its lowering adds h · Bᵀ to the layer's output."""
    import peft

    from quaff_fx.hf import register_peft

    loaded, _ = load_quantized(artifact)
    config = register_peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    model = peft.get_peft_model(loaded.model, config).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at 0: the term would vanish
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (ref - plain).abs().max() > 1e-2  # the adapter changes the logits
    path = export_onnx(model, tmp_path / "lora.onnx")
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "MatMulInteger" for n in graph.node) >= 14
    got = onnx_logits(path, ids)
    assert (got - ref).abs().max() <= 1e-3 * max(1.0, ref.abs().max().item())
