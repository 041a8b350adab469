"""The quaff-fx command end to end on a tiny local model folder, and its bad-input errors."""
import argparse
import contextlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from conftest import FAST

from quaff_fx.cli import build_parser, main
from quaff_fx.data import read_text
from quaff_fx.io import load_quantized, load_stats


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, tmp_path_factory):
    """One `quaff-fx calibrate` run (FAST options): the stats file and what the command printed."""
    stats = tmp_path_factory.mktemp("calibrated") / "stats.safetensors"
    out = io.StringIO()  # a module fixture cannot use capsys
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["calibrate", str(tiny_model_dir), "--out", str(stats), *FAST])
    assert code == 0
    return stats, out.getvalue()


def test_calibrate_then_inspect(calibrated, capsys):
    stats, out = calibrated
    assert stats.is_file() and "down_proj" in out and "Jaccard" in out
    code, out, _ = run(capsys, "inspect", stats, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["totals"]["layers"] == 14
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == set(summary["per_kind"])
    assert all(3 in row["channels"] for row in summary["layers"] if row["module"].endswith("q_proj"))


def test_transform_from_a_stats_file_rereads_the_batches_for_gptq(artifact, calibrated, tiny_model_dir, tmp_path,
                                                                   capsys):
    stats, _ = calibrated
    out = tmp_path / "from-stats"
    code, stdout, _ = run(capsys, "transform", tiny_model_dir, "--stats", stats, "--out", out, *FAST)
    assert code == 0 and "GPTQ rounding: 14 layers" in stdout
    same = (out / "model.safetensors").read_bytes() == (artifact / "model.safetensors").read_bytes()
    assert same  # as in one run
    other = tmp_path / "other.txt"
    other.write_text("some other calibration text " * 200)
    code, _, err = run(capsys, "transform", tiny_model_dir, "--stats", stats, "--calib", other, "--out",
                       tmp_path / "y", *FAST)
    assert code == 2 and "calibrated with text 'bundled corpus', the calibration given has 'other.txt'" in err
    assert not (tmp_path / "y").exists()


def test_the_artifact_loads_to_the_logits_of_the_same_quantize_in_process(artifact, tiny_model_dir):
    from quaff_fx import CalibrationConfig, OutlierConfig, QuaffConfig, quantize_
    from quaff_fx.model_loading import load_model

    assert sorted(p.name for p in artifact.iterdir()) == ["model.safetensors", "quaff.json", "stats.safetensors",
                                                          "tokenizer"]
    loaded = load_model(str(tiny_model_dir))
    cfg = QuaffConfig(outliers=OutlierConfig("mean_times", 10, 0.05))
    quantize_(loaded.model, cfg, CalibrationConfig(num_batches=2, batch_size=2, seq_len=64), loaded.tokenizer)
    back, manifest = load_quantized(artifact)
    ids = torch.randint(0, 256, (2, 30))
    assert torch.equal(back.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    assert manifest["version"] == 1 and len(manifest["layers"]) == 14
    # the default preset's per-group activation scales on down_proj, recorded per layer and restored
    assert {n: s["act_group"] for n, s in manifest["layers"].items()} == {
        n: 128 if n.endswith("down_proj") else 0 for n in manifest["layers"]}
    assert manifest["config"]["act_group"] == 128 and back.model.model.layers[1].mlp.down_proj.act_group == 128


def test_transform_is_deterministic(artifact, tiny_model_dir, tmp_path, capsys):
    again = tmp_path / "again"
    code, stdout, err = run(capsys, "transform", tiny_model_dir, "--out", again, *FAST)
    assert code == 0 and "rewrite_linear: 14 of 14" in stdout
    assert "quaff-fx: running the passes (GPTQ rounding)" in err  # a long phase announces itself (23.6)
    assert "more rows (--all-rows prints them all)" in stdout and "--json for all" not in stdout  # (23.8)
    for name in ("model.safetensors", "quaff.json", "stats.safetensors"):
        assert (again / name).read_bytes() == (artifact / name).read_bytes(), name


def test_eval_and_compare(artifact, tiny_model_dir, capsys):
    code, out, _ = run(capsys, "eval", artifact, "--seq-len", "64", "--max-batches", "2", "--json")
    res = json.loads(out)["results"]
    assert code == 0 and res[0]["model"] == "quaff" and res[0]["perplexity"] > 1
    code, out, _ = run(capsys, "eval", tiny_model_dir, "--compare", "--seq-len", "64", "--max-batches", "2", "--json",
                       "--preset", "fast", "--strategy", "mean_times", "--threshold", "10", "--max-ratio", "0.05")
    labels = [r["model"] for r in json.loads(out)["results"]]
    assert code == 0 and labels == ["fp32", "w8a8 naive", "quaff"]


def test_inspect_artifact(artifact, capsys):
    code, out, _ = run(capsys, "inspect", artifact)
    assert code == 0 and "14 QuaffLinear layers" in out and "rewrite_linear" in out


@pytest.mark.parametrize("argv,message", [
    (["calibrate", "/nonexistent/model", "--out", "{tmp}/s.st"], "neither 'smollm2' nor an existing file or folder"),
    (["calibrate", "{tmp}", "--out", "{tmp}/s.st"], "is not a Hugging Face model (it has no config.json)"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--data", "/nonexistent.txt"], "does not exist"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--calib", "{short}"], "no calibration window"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--data", "{empty}"], "is empty"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--threshold", "0"], "threshold must be > 0"),
    (["calibrate", "{model}", "--out", "{tmp}/s.st", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["calibrate", "{model}", "--out", "{tmp}/missing/s.st"], "does not exist"),
    (["transform", "{model}", "--out", "{tmp}/a", "--act-group", "-1"], "--act-group must be >= 0"),
    pytest.param(["transform", "{model}", "--out", "{tmp}/a", "--exclude", "*", *FAST], "no eligible Linear",
                 marks=pytest.mark.slow),  # a capture to fail: test_passes' fast test raises the same error
    (["inspect", "{tmp}/nothing"], "does not exist"),
    (["eval", "{tmp}"], "no config.json"),
])
def test_bad_input_is_one_clear_line(argv, message, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "empty.txt").write_text("  \n")
    subs = {"{tmp}": str(tmp_path), "{model}": str(tiny_model_dir), "{short}": str(tmp_path / "short.txt"),
            "{empty}": str(tmp_path / "empty.txt")}
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


@pytest.mark.slow  # end to end: a second model folder transformed (test_calibration refuses the stats in-process)
def test_stats_of_another_model_are_refused(artifact, tiny_model_dir, tmp_path, capsys):
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    other = tmp_path / "wide"
    tiny_llama(hidden_size=96).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    code, _, err = run(capsys, "transform", other, "--stats", artifact / "stats.safetensors", "--out", tmp_path / "x",
                       *FAST)
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
             (lambda d: (d / "quaff.json").unlink(), "nor a quaff-fx artifact (no quaff.json)|quaff.json' is missing"),
             (truncate, "does not match the checksum")]
    for edit, message in cases:
        folder = broken(edit)
        for command, expected in zip(("eval", "inspect"), (message.split("|") * 2)[:2]):
            code, _, err = run(capsys, command, folder)  # inspect makes the checks every loader makes (23.5)
            assert code == 2 and expected in err, (command, expected, err)


@pytest.mark.slow  # seconds of the fast tier's 2-minute budget
def test_inspect_graph_marks_quaff_nodes_and_draws(artifact, tmp_path, capsys):
    code, out, _ = run(capsys, "inspect", artifact, "--graph")
    marked = [line for line in out.splitlines() if line.startswith("◆")]
    assert code == 0 and len(marked) == 14 and all("quaff.linear" in line for line in marked)
    code, out, _ = run(capsys, "inspect", artifact, "--graph", "--quaff-only", "--fuse")
    marked = [line for line in out.splitlines() if line.startswith("◆")]
    assert code == 0 and len(marked) == 14 - 6  # q/k/v and gate/up fused in 2 layers
    dot = tmp_path / "g.dot"
    code, out, _ = run(capsys, "inspect", artifact, "--dot", dot, "--json")
    assert code == 0 and json.loads(out)["quaff_nodes"] == 14
    text = dot.read_text()
    assert text.startswith("digraph") and text.count("#ffb347") == 14
    code, _, err = run(capsys, "inspect", artifact / "stats.safetensors", "--graph")
    assert code == 2 and "need an artifact folder" in err


@pytest.mark.slow
def test_sweep_runs_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    code, out, _ = run(capsys, "sweep", tiny_model_dir, "--seq-len", "64", "--ratios", "0.05", "--strategies",
                       "top_abs", "--alphas", "0.5", "--plot", plot, "--json", "--eval-batches", "1")
    rows = json.loads(out)
    assert code == 0 and [r["method"] for r in rows] == [
        "fp32", "w8a8 naive", "smoothquant a=0.5", "llm.int8 (|x|>6 in FP)", "quaff top_abs 0.05",
        "quaff top_abs 0.01 + smoothing a=0.5", "quaff top_abs 0.01 + smoothing a=auto",
        "quaff default (+ smoothing a=0.6 + gptq)"]
    assert set(rows[0]["delta"]) == {"gpl-3.0.txt", "python-reference.txt", "vim-user-manual.txt"}
    assert all(d == 0.0 for d in rows[0]["delta"].values())
    assert all(p > 1 for r in rows for p in r["perplexity"].values())
    assert rows[-4]["channels"] > 0 and rows[-1]["channels"] > 0 and plot.read_bytes()[:4] == b"\x89PNG"


# per-layer smoothing with GPTQ in the fast tests; the shared smoothing the artifact fixture (default preset) has slow
@pytest.mark.parametrize("extra", [pytest.param(["--preset", "fast"], marks=pytest.mark.slow),
                                   ["--smooth-per-layer", "--weight-rounding", "gptq"]])
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
    assert main(["eval", str(out), "--seq-len", "64", "--max-batches", "1", "--json"]) == 0


# -- issue 23: what a new user trips on ---------------------------------------------------------------------
@pytest.mark.slow  # end to end: a second process (imports torch)
def test_a_closed_pipe_ends_quietly_with_exit_0(artifact):
    """`quaff-fx inspect ... | head`: the reader goes away; no BrokenPipeError traceback, exit 0 (23.3)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "quaff_fx.cli", "inspect", str(artifact / "stats.safetensors")],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_long_phases_announce_themselves(artifact, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """eval and bench name the phase they start on stderr (transform: test_transform_is_deterministic) (23.6)."""
    code, _, err = run(capsys, "eval", artifact, "--seq-len", "64", "--max-batches", "1")
    assert code == 0 and "quaff-fx: perplexity of quaff on gpl-3.0.txt (bundled)" in err
    import quaff_fx.bench

    seen = []

    def fake_bench(*args, **kwargs):  # records what the user had been told when the silent minute starts
        seen.append(capsys.readouterr().err)
        return [{"variant": "fp32 eager", "seconds": 1.0, "speedup_vs_fp32_eager": 1.0}]

    monkeypatch.setattr(quaff_fx.bench, "bench_inference", fake_bench)
    assert main(["bench", str(tiny_model_dir), "--no-compile"]) == 0
    assert "quaff-fx: loading the model, quantizing a copy" in seen[0]


def test_eval_names_its_text_and_window(artifact, capsys):
    """A printed perplexity says which text, which window and how many tokens (23.7)."""
    code, out, _ = run(capsys, "eval", artifact, "--seq-len", "64", "--max-batches", "2")
    assert code == 0 and "perplexity on gpl-3.0.txt (bundled), windows of 64 tokens (504 tokens scored)" in out


def test_help_shows_defaults():
    """--help states the defaults of the numbers a user sets (23.8)."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, options in [("finetune", ["--steps", "--batch-size", "--seq-len", "--rank", "--alpha"]),
                             ("transform", ["--batches", "--batch-size", "--seq-len"]),
                             ("eval", ["--seq-len", "--batch-size"])]:
        parser = commands[command]
        text = " ".join(parser.format_help().split())  # argparse wraps lines
        for option in options:
            action = next(a for a in parser._actions if option in a.option_strings)
            metavar = action.metavar or action.dest.upper()
            shown = re.search(rf" {option} {metavar} [^\[]*?\(default: {re.escape(str(action.default))}\)", text)
            assert shown, (command, option, action.default)


def test_calibrate_and_transform_take_the_same_calibration_option(tiny_model_dir, tmp_path, capsys):
    """One name, --calib, for the calibration text; calibrate's old --data still works, unlisted (23.8)."""
    for command in ("calibrate", "transform"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--calib TEXT" in text and "--data" not in text, command
    assert build_parser().parse_args(["calibrate", "--data", "a.txt", "--out", "s"]).calib == ["a.txt"]
    text_file = tmp_path / "calib.txt"
    text_file.write_text(read_text(None, "heldout"))
    stats = tmp_path / "stats.safetensors"
    code, out, err = run(capsys, "calibrate", tiny_model_dir, "--out", stats, "--calib", text_file, "--batches", "2",
                         "--seq-len", "64", "--max-ratio", "0.05")
    assert code == 0 and load_stats(stats).info["text"] == "calib.txt", err
    # top_abs ignores the threshold: printing "threshold 100.0" for it misleads (23.8)
    assert "(top_abs, max_ratio 0.05)" in out and "threshold" not in out


def test_the_summary_names_the_threshold_where_it_is_used(calibrated):
    assert "(mean_times, threshold 10.0, max_ratio 0.05)" in calibrated[1]


class _Stack(torch.nn.Module):
    """Eleven Linears named layers.0 .. layers.10: enough for text order (0, 1, 10, 2) to differ."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(11)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_stats_layers_are_listed_in_natural_order(tmp_path):
    """inspect STATS lists layers 0, 1, 2, ..., 10, not 0, 1, 10, 2 (safetensors sorts names as text) (23.8)."""
    from quaff_fx import QuaffConfig, calibrate, capture
    from quaff_fx.calibration_report import stats_summary
    from quaff_fx.io import save_stats

    config = QuaffConfig.preset("fast")
    g = torch.Generator().manual_seed(0)
    stats = calibrate(capture(_Stack()), [torch.randn(4, 8, generator=g) for _ in range(2)], config.outliers,
                      config.eligible, n_batches=2)
    save_stats(stats, tmp_path / "s.safetensors")
    layers = [row["module"] for row in stats_summary(load_stats(tmp_path / "s.safetensors"))["layers"]]
    assert layers == [f"layers.{i}" for i in range(11)]


def test_written_files_have_ordinary_modes(artifact, calibrated):
    """Artifacts and stats files are readable by the group and others as any file the user writes (23.8)."""
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    files = [calibrated[0], *(p for p in artifact.rglob("*") if p.is_file())]
    assert {str(p.relative_to(p.parent.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
            if stat.S_IMODE(p.stat().st_mode) != expected} == {}


@pytest.mark.slow  # end to end: a whole transform to print its table
def test_all_rows_prints_every_row(tiny_model_dir, capsys):
    """The option the cut-table hint names does what it says (23.8)."""
    code, out, _ = run(capsys, "transform", tiny_model_dir, *FAST, "--preset", "fast", "--all-rows")
    assert code == 0 and "more rows" not in out and out.count(" rewritten") == 14


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "calibrate", tiny_model_dir, "--out", tmp_path / "s.st", "--device", "cuda", *FAST)
    assert code == 2 and "--device cuda: no CUDA device is available" in err and not (tmp_path / "s.st").exists()
