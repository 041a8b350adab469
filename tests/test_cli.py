"""The quaff-fx command end to end on a tiny local model folder, and its bad-input errors."""
import json
import shutil

import pytest
import torch

from conftest import FAST
from quaff_fx.cli import main
from quaff_fx.transform import load_quantized



def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_calibrate_then_inspect(tiny_model_dir, tmp_path, capsys):
    stats = tmp_path / "stats.safetensors"
    code, out, _ = run(capsys, "calibrate", tiny_model_dir, "--out", stats, *FAST)
    assert code == 0 and stats.is_file()
    assert "down_proj" in out and "Jaccard" in out
    code, out, _ = run(capsys, "inspect", stats, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["totals"]["layers"] == 14
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == set(summary["per_kind"])
    assert all(3 in l["channels"] for l in summary["layers"] if l["module"].endswith("q_proj"))


def test_transform_from_a_stats_file_rereads_the_batches_for_gptq(artifact, tiny_model_dir, tmp_path, capsys):
    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(tiny_model_dir), "--out", str(stats), *FAST]) == 0
    out = tmp_path / "from-stats"
    code, stdout, _ = run(capsys, "transform", tiny_model_dir, "--stats", stats, "--out", out, *FAST)
    assert code == 0 and "GPTQ rounding: 14 layers" in stdout
    assert (out / "model.safetensors").read_bytes() == (artifact / "model.safetensors").read_bytes()  # same as in one run
    other = tmp_path / "other.txt"
    other.write_text("some other calibration text " * 200)
    code, _, err = run(capsys, "transform", tiny_model_dir, "--stats", stats, "--calib", other, "--out", tmp_path / "y", *FAST)
    assert code == 2 and "calibrated on 'apache-2.0.txt (bundled)', not 'other.txt'" in err and not (tmp_path / "y").exists()


def test_transform_writes_an_artifact_that_loads_to_the_same_logits(tiny_model_dir, tmp_path, capsys):
    from quaff_fx.capture import capture
    from quaff_fx.config import OutlierConfig, QuaffConfig
    from quaff_fx.model_loading import load_model
    from quaff_fx.transform import calibrate_text, transform

    out = tmp_path / "art"
    code, stdout, _ = run(capsys, "transform", tiny_model_dir, "--out", out, *FAST)
    assert code == 0 and "rewrite_linear: 14 of 14" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "quaff.json", "stats.safetensors", "tokenizer"]
    # the same transform in-process, then compare with the artifact loaded back
    loaded = load_model(str(tiny_model_dir))
    cfg = QuaffConfig(outliers=OutlierConfig("mean_times", 10, 0.05))
    gm = capture(loaded.model)
    stats = calibrate_text(gm, loaded.tokenizer, None, cfg, 64, 2, 2)
    transform(loaded.model, stats, cfg, gm=gm)
    back, manifest = load_quantized(out)
    ids = torch.randint(0, 256, (2, 30))
    assert torch.equal(back.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    assert manifest["version"] == 1 and len(manifest["layers"]) == 14


def test_transform_is_deterministic(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert main(["transform", str(tiny_model_dir), "--out", str(d), *FAST]) == 0
    for name in ("model.safetensors", "quaff.json", "stats.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_eval_and_compare(artifact, tiny_model_dir, capsys):
    code, out, _ = run(capsys, "eval", artifact, "--seq-len", "64", "--json")
    res = json.loads(out)["results"]
    assert code == 0 and res[0]["model"] == "quaff" and res[0]["perplexity"] > 1
    code, out, _ = run(capsys, "eval", tiny_model_dir, "--compare", "--seq-len", "64", "--json", "--strategy", "mean_times", "--threshold", "10", "--max-ratio", "0.05")
    labels = [r["model"] for r in json.loads(out)["results"]]
    assert code == 0 and labels == ["fp32", "w8a8 naive", "quaff"]


def test_inspect_artifact(artifact, capsys):
    code, out, _ = run(capsys, "inspect", artifact)
    assert code == 0 and "14 QuaffLinear layers" in out and "rewrite_linear" in out


@pytest.mark.parametrize("argv,message", [
    (["calibrate", "/nonexistent/model", "--out", "{tmp}/s.st"], "neither 'smollm2' nor an existing file or folder"),
    (["calibrate", "{tmp}", "--out", "{tmp}/s.st"], "is not a Hugging Face model (it has no config.json)"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--data", "/nonexistent.txt"], "does not exist"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--data", "{short}"], "too few for one batch"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--data", "{empty}"], "is empty"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--threshold", "0"], "threshold must be > 0"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["calibrate", "{model}", "--out", "{tmp}/missing/s.st"], "does not exist"),
    (["transform", "{model}", "--out", "{tmp}/a", "--exclude", "*", *FAST], "no eligible Linear"),
    (["inspect", "{tmp}/nothing"], "does not exist"),
    (["eval", "{tmp}"], "no config.json"),
])
def test_bad_input_is_one_clear_line(argv, message, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "empty.txt").write_text("  \n")
    subs = {"{tmp}": str(tmp_path), "{model}": str(tiny_model_dir), "{short}": str(tmp_path / "short.txt"), "{empty}": str(tmp_path / "empty.txt")}
    argv = [a for a in argv]
    for i, a in enumerate(argv):
        for k, v in subs.items():
            a = a.replace(k, v)
        argv[i] = a
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("quaff-fx: error: ") == 1 and message in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "s.st").exists() and not (tmp_path / "a").exists()


def test_stats_of_another_model_are_refused(artifact, tiny_model_dir, tmp_path, capsys):
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    other = tmp_path / "wide"
    tiny_llama(hidden_size=96).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    code, _, err = run(capsys, "transform", other, "--stats", artifact / "stats.safetensors", "--out", tmp_path / "x")
    assert code == 2 and "have 64 channels, the layer has 96 inputs" in err and not (tmp_path / "x").exists()


def test_existing_output_is_not_overwritten_without_force(artifact, tiny_model_dir, capsys):
    before = (artifact / "quaff.json").read_bytes()
    code, _, err = run(capsys, "transform", tiny_model_dir, "--out", artifact, *FAST)
    assert code == 2 and "pass --force" in err
    assert (artifact / "quaff.json").read_bytes() == before


def test_bad_artifacts(artifact, tmp_path, capsys):
    def broken(edit):
        copy = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        shutil.copytree(artifact, copy)
        edit(copy)
        return copy

    def set_version(d):
        m = json.loads((d / "quaff.json").read_text())
        m["version"] = 7
        (d / "quaff.json").write_text(json.dumps(m))

    def other_format(d):
        m = json.loads((d / "quaff.json").read_text())
        m["format"] = "something-else"
        (d / "quaff.json").write_text(json.dumps(m))

    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    cases = [(set_version, "format version 7"), (other_format, "not a quaff-fx model artifact"),
             (lambda d: (d / "model.safetensors").unlink(), "model.safetensors' is missing"),
             (lambda d: (d / "quaff.json").unlink(), "nor a quaff-fx artifact (no quaff.json)"),
             (truncate, "does not match the checksum")]
    for edit, message in cases:
        code, _, err = run(capsys, "eval", broken(edit))
        assert code == 2 and message in err, (message, err)


def test_inspect_graph_marks_quaff_nodes_and_draws(artifact, tmp_path, capsys):
    code, out, _ = run(capsys, "inspect", artifact, "--graph")
    marked = [l for l in out.splitlines() if l.startswith("◆")]
    assert code == 0 and len(marked) == 14 and all("quaff.linear" in l for l in marked)
    code, out, _ = run(capsys, "inspect", artifact, "--graph", "--quaff-only", "--fuse")
    marked = [l for l in out.splitlines() if l.startswith("◆")]
    assert code == 0 and len(marked) == 14 - 6  # q/k/v and gate/up fused in 2 layers
    dot = tmp_path / "g.dot"
    code, out, _ = run(capsys, "inspect", artifact, "--dot", dot, "--json")
    assert code == 0 and json.loads(out)["quaff_nodes"] == 14
    text = dot.read_text()
    assert text.startswith("digraph") and text.count("#ffb347") == 14
    code, _, err = run(capsys, "inspect", artifact / "stats.safetensors", "--graph")
    assert code == 2 and "need an artifact folder" in err


def test_sweep_runs_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    code, out, _ = run(capsys, "sweep", tiny_model_dir, "--seq-len", "64", "--ratios", "0.05", "--strategies", "top_abs",
                       "--alphas", "0.5", "--plot", plot, "--json",
                       "--eval-batches", "1")
    rows = json.loads(out)
    assert code == 0 and [r["method"] for r in rows] == ["fp32", "w8a8 naive", "smoothquant a=0.5", "llm.int8 (|x|>6 in FP)",
                                                          "quaff top_abs 0.05", "quaff top_abs 0.01 + smoothing a=0.5",
                                                          "quaff top_abs 0.01 + smoothing a=auto",
                                                          "quaff default (+ smoothing a=0.6 + gptq)"]
    assert set(rows[0]["delta"]) == {"gpl-3.0.txt", "python-reference.txt", "vim-user-manual.txt"}
    assert all(d == 0.0 for d in rows[0]["delta"].values()) and all(p > 1 for r in rows for p in r["perplexity"].values())
    assert rows[-4]["channels"] > 0 and rows[-1]["channels"] > 0 and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra", [["--preset", "fast"], ["--smooth-per-layer", "--weight-rounding", "gptq"]])
def test_transform_with_smoothing_saves_and_loads(tiny_model_dir, tmp_path, capsys, extra):
    out = tmp_path / "smooth"
    assert main(["transform", str(tiny_model_dir), "--out", str(out), *FAST, "--smooth-alpha", "0.5", *extra]) == 0
    capsys.readouterr()
    loaded, manifest = load_quantized(out)
    assert all(spec["smoothed"] for spec in manifest["layers"].values())
    assert manifest["config"]["weight_rounding"] == ("nearest" if "fast" in extra else "gptq")
    attn = loaded.model.model.layers[0].self_attn
    q = attn.q_proj
    assert q.inv_smooth is not None and not torch.equal(q.inv_smooth, torch.ones_like(q.inv_smooth))
    assert torch.equal(q.inv_smooth, attn.k_proj.inv_smooth) == ("fast" in extra)  # shared unless per layer
    assert main(["eval", str(out), "--seq-len", "64", "--json"]) == 0
