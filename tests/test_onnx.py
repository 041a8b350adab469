"""ONNX export of Quaff models, checked in onnxruntime."""
import onnx
import pytest
import torch

from quaff_fx.cli import main
from quaff_fx.onnx_export import export_onnx, onnx_logits
from quaff_fx.transform import load_quantized

def test_export_matches_pytorch_and_stores_int8_weights(artifact, tmp_path):
    loaded, _ = load_quantized(artifact)
    from quaff_fx import QuaffLinear

    layers = [m for m in loaded.model.modules() if isinstance(m, QuaffLinear)]
    assert layers and all(m.inv_smooth is not None for m in layers)  # the default preset: 1/s inside each op
    path = export_onnx(loaded.model, tmp_path / "m.onnx")
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
    out = tmp_path / "cli.onnx"
    assert main(["export-onnx", str(artifact), "--out", str(out)]) == 0
    assert "passes onnx.checker" in capsys.readouterr().out and out.is_file()
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
