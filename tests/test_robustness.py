"""Hostile inputs and damaged artifacts: a correct result or one clear QuaffError, never a crash deep
inside, never silent NaN. Property-based tests of the quantizers and the op."""
import json
import random
import shutil

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from quaff_fx import OutlierConfig, QuaffError, QuaffLinear, calibrate
from quaff_fx.cli import main
from quaff_fx.evaluate import perplexity
from quaff_fx.io import load_quantized
from quaff_fx.kernels import reference

# -- property-based: quantizers and the op ---------------------------------------------------------------
shapes = st.tuples(st.integers(1, 40), st.integers(1, 80))
magnitudes = st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e4])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, magnitude=magnitudes, seed=st.integers(0, 10_000))
def test_quantize_rows_error_is_at_most_half_a_step(shape, magnitude, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * magnitude
    q, scale = reference.quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - x).abs()
    assert (err <= scale[:, None] * 0.5 + 1e-6 * magnitude).all()


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 24), k=st.integers(2, 64), n=st.integers(1, 48), magnitude=magnitudes,
       n_out=st.integers(0, 3), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_op_matches_reference_and_error_bound(m, k, n, magnitude, n_out, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g) * magnitude
    idx = torch.randperm(k, generator=g)[: min(n_out, k)]
    x[:, idx] *= 50
    x = x.clamp(-1e3, 1e3) if dtype == torch.float16 else x  # inputs the dtype can hold
    q = QuaffLinear.from_weight(w, None, idx, act_max=x.abs().amax(0)).eval()
    y = q(x.to(dtype)).float()
    ref = reference.quaff_linear(x.to(dtype).float(), q.w_int8, q.w_scale, q.outlier_idx, q.act_scale,
                                 reference.correction_weight(q.w_outlier, q.act_scale))
    exact = x.to(dtype).float() @ w.t()
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    subnormal = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0 ** -24}[dtype]  # fp16's finest step
    assert torch.isfinite(y).all()
    assert torch.allclose(y, ref, atol=tol * ref.abs().max().item() + subnormal, rtol=tol)
    # the int8 error bound: each token's half-step times sum|W|, plus sum|x| times each row's half-step
    xd = x.to(dtype).float()
    x_hat, _ = reference.scale_activations(xd, q.outlier_idx, q.act_scale)
    bound = (x_hat.abs().amax(1, keepdim=True) / 127 * 0.5) * w.abs().sum(1)[None, :] \
        + xd.abs().sum(1, keepdim=True) * (q.w_scale * 0.5)[None, :]
    assert ((y - exact).abs() <= bound * 1.01 + tol * exact.abs().max() + subnormal).all()


def test_non_contiguous_and_tiny_inputs():
    lin = torch.nn.Linear(32, 16)
    q = QuaffLinear.from_linear(lin, [3]).eval()
    x = torch.randn(16, 4, 32).transpose(0, 1)  # non-contiguous
    assert not x.is_contiguous()
    assert torch.allclose(q(x), q(x.contiguous()))
    one = torch.randn(1, 1, 32)
    assert q(one).shape == (1, 1, 16) and torch.isfinite(q(one)).all()
    assert torch.equal(q(torch.zeros(2, 32)), lin.bias.detach().expand(2, 16).float())  # all-zero tokens


def test_extreme_thresholds(captured_llama):
    _, gm = captured_llama()
    data = [torch.randint(0, 256, (2, 16))]
    none = calibrate(gm, data, OutlierConfig("mean_times", threshold=1e9))
    assert all(none.outliers(n).numel() == 0 for n in none.layers)
    every = calibrate(gm, data, OutlierConfig("mean_times", threshold=1e-9, max_ratio=0.1))
    assert all(every.outliers(n).numel() == int(layer.in_features * 0.1) for n, layer in every.layers.items())


def test_sequence_past_the_model_limit_is_refused(llama):
    ids = torch.randint(0, 256, (4096,))
    with pytest.raises(QuaffError, match="past the model's limit of 512"):
        perplexity(llama, ids, seq_len=1024)


def test_nan_weights_are_reported_not_silently_evaluated():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuaffError, match="NaN or Inf logits"):
        perplexity(model, torch.randint(0, 256, (512,)), seq_len=64)


@pytest.mark.slow  # end to end: the CLI loads the model (test_cli's fast bad-input cases end in the same message)
def test_one_token_text_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "one.txt").write_text("the")
    argv = ["calibrate", str(tiny_model_dir), "--calib", str(tmp_path / "one.txt"), "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "no calibration window" in capsys.readouterr().err


# -- damaged artifacts ------------------------------------------------------------------------------------
def _damaged(artifact, tmp_path, name, mutate):
    copy = tmp_path / f"d{random.random():.12f}"
    shutil.copytree(artifact, copy)
    path = copy / name
    path.write_bytes(mutate(bytearray(path.read_bytes())))
    return copy


def test_fuzzed_artifacts_raise_only_quaff_errors(artifact, tmp_path):
    rng = random.Random(1234)

    def flip(data):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        return bytes(data)

    def scramble(data):
        for _ in range(20):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    def truncate(data):
        return bytes(data[: rng.randrange(len(data))])

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_quantized(artifact)[0].model(input_ids=ids).logits
    loaded_anyway = 0
    for name in ("model.safetensors", "quaff.json"):
        for mutate in (flip, scramble, truncate):
            for _ in range(4):
                broken = _damaged(artifact, tmp_path, name, mutate)
                try:
                    back, _ = load_quantized(broken)
                except QuaffError:
                    continue
                # a JSON byte flip can leave the manifest valid and meaningful (whitespace, a digit of a
                # recorded report number): then the model must load and equal the original
                assert name == "quaff.json"
                with torch.no_grad():
                    assert torch.equal(back.model(input_ids=ids).logits, expected)
                loaded_anyway += 1
    assert loaded_anyway < 12  # most damage to the manifest is caught, not shrugged off


def test_hand_edited_shapes_are_caught(artifact, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "quaff.json").read_text())
    first = next(iter(manifest["layers"]))
    manifest["layers"][first]["in_features"] = 65
    (copy / "quaff.json").write_text(json.dumps(manifest))
    with pytest.raises(QuaffError, match="does not match"):
        load_quantized(copy)
    manifest["layers"][first]["in_features"] = 64
    manifest["tensors"][next(iter(manifest["tensors"]))]["dtype"] = "int8"
    (copy / "quaff.json").write_text(json.dumps(manifest))
    with pytest.raises(QuaffError, match="says"):
        load_quantized(copy)


def test_interrupted_write_leaves_nothing(tmp_path):
    from quaff_fx.io import atomic_dir

    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
