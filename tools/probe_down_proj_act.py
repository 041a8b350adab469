"""Probe for issue 22 (not a default): how down_proj's input is quantized, leave-one-source-out over the corpus.

    python tools/probe_down_proj_act.py [--candidates default group128 group64 w8a16-down] [--folds ...]
                                        [--json tools/results/down_proj_act_loso.json]

Every candidate is the preset 'default' (same outliers, smoothing α 0.6, GPTQ rounding from the same FP XᵀX); only
the forward of the down_proj layers differs, patched in after ``quantize_`` (PROBE PATCH below; the library is not
changed):
  default     per-token int8 activations (the library's quaff::linear)
  groupG      per token AND per group of G consecutive input channels: one int8 scale per (token, group); each group's
              int32 partial products are scaled by its own activation scale and summed (what a kernel does in its K
              loop): y[t,n] = s_w[n] · Σ_g s_x[t,g] · Σ_{k∈g} xq[t,k] wq[n,k]
  w8a16-down  no activation quantization: the int8 weight dequantized, the activation kept in fp32 (the bound)
Outlier scaling (X̂ = X·inv_smooth/S, the FP correction X̂_o ((S_o − 1) W_o)ᵀ) is the library's in every candidate.
Calibration 16 × 2 × 256 tokens of the other sources + Apache-2.0, eval 4 × 4 × 256 tokens of the source left out,
as tools/probe_down_proj_budget.py. Result of one run: tools/results/down_proj_act_loso.json.
"""
from __future__ import annotations

import argparse
import json
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from select_defaults import ALWAYS, log, xtx_reused_across_candidates
from tabulate import tabulate

import quaff_fx.sweep
from quaff_fx.config import QuaffConfig
from quaff_fx.corpus import corpus_sources
from quaff_fx.data import read_text, tokenize
from quaff_fx.kernels.reference import correction_weight, quantize_rows, scale_activations
from quaff_fx.model_loading import load_model
from quaff_fx.quaff_linear import QuaffLinear
from quaff_fx.sweep import leave_one_source_out, summarize

MODES = {"default": "token", "group128": 128, "group64": 64, "w8a16-down": None}


# ---- PROBE PATCH: down_proj's activation quantization (eval only; nothing here changes the library) ----------------

@dataclass(frozen=True)
class DownProjActConfig(QuaffConfig):
    """The default preset plus how down_proj's input is quantized: 'token' (the library), G (groups of G channels)
    or None (not at all). quantize_ dispatches on isinstance, so this is a QuaffConfig to it."""

    down_proj_act: str | int | None = "token"


def grouped_int8_matmul(x_hat: torch.Tensor, w_int8: torch.Tensor, group: int) -> torch.Tensor:
    """Σ_g s_x[t,g] · Σ_{k∈g} xq[t,k] wq[n,k] for x_hat [M, K] (fp32), w_int8 [N, K]; no weight scale. A group's
    integer partial sum is at most 127² · G < 2²⁴ for G ≤ 1024, so the fp32 batched GEMM computes it exactly."""
    m, k = x_hat.shape
    n = w_int8.shape[0]
    if k % group:
        raise ValueError(f"{k} input channels do not split into groups of {group}")
    q, s_x = quantize_rows(x_hat.reshape(m, k // group, group))  # q [M, g, G] int8, s_x [M, g]
    partial = torch.bmm(q.float().transpose(0, 1), w_int8.float().reshape(n, k // group, group).permute(1, 2, 0))
    return (partial * s_x.t()[:, :, None]).sum(0)  # [g, M, N] → [M, N]


def down_proj_forward(self: QuaffLinear, x: torch.Tensor) -> torch.Tensor:
    """quaff::linear's arithmetic (ops.linear + kernels.cpu.quaff_linear) with the activation quantization replaced
    as ``self.probe_act`` says (a group size, or None: fp32)."""
    if self.training or self.prescaled:
        raise RuntimeError("the probe's down_proj forward is for eval of an unfused (not prescaled) layer only")
    x2 = x.reshape(-1, x.shape[-1]).float()
    if self.inv_smooth is not None:
        x2 = x2 * self.inv_smooth
    x_hat, x_hat_o = scale_activations(x2, self.outlier_idx, self.act_scale)
    if self.probe_act is None:
        out = x_hat @ (self.w_int8.float() * self.w_scale[:, None]).t()
    else:
        out = grouped_int8_matmul(x_hat, self.w_int8, self.probe_act) * self.w_scale[None, :]
    if self.outlier_idx.numel():
        out = out + x_hat_o @ correction_weight(self.w_outlier, self.act_scale).float().t()
    if self.bias is not None:
        out = out + self.bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def patch_down_proj_(model: torch.nn.Module, act: int | None) -> int:
    """Give every QuaffLinear named *.down_proj of ``model`` the probe's forward; returns how many layers."""
    layers = [m for name, m in model.named_modules() if name.endswith("down_proj") and isinstance(m, QuaffLinear)]
    for m in layers:
        m.probe_act = act
        m.forward = types.MethodType(down_proj_forward, m)
    return len(layers)


def check_patch(model: torch.nn.Module) -> float:
    """The probe's forward with one group spanning all inputs is per-token quantization: it must match the library's
    op on the first down_proj (a heavy-tailed random input); returns the max relative difference."""
    layer = next(m for name, m in model.named_modules() if name.endswith("down_proj") and isinstance(m, QuaffLinear))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, layer.in_features, generator=gen) ** 3
    ours = types.SimpleNamespace(**{a: getattr(layer, a) for a in (
        "training", "prescaled", "inv_smooth", "outlier_idx", "act_scale", "w_int8", "w_scale", "w_outlier", "bias",
        "out_features")}, probe_act=layer.in_features)
    with torch.no_grad():
        lib, probe = QuaffLinear.forward(layer, x), down_proj_forward(ours, x)
    return float((lib - probe).abs().max() / lib.abs().max())


@contextmanager
def down_proj_act_patched():
    """sweep.leave_one_source_out calls quantize_ per candidate: after it, patch that candidate's down_proj layers."""
    quantize = quaff_fx.sweep.quantize_

    def quantize_then_patch(model, config, *args, **kwargs):
        result = quantize(model, config, *args, **kwargs)
        act = getattr(config, "down_proj_act", "token")
        if act != "token":
            err = check_patch(model)
            if err > 1e-5:
                raise RuntimeError(f"the probe's per-token path differs from quaff::linear by {err:.2e} (relative)")
            log(f"  down_proj act {act}: {patch_down_proj_(model, act)} layers patched (check {err:.1e})")
        return result

    quaff_fx.sweep.quantize_ = quantize_then_patch
    try:
        yield
    finally:
        quaff_fx.sweep.quantize_ = quantize

# ---- end of PROBE PATCH ----------------------------------------------------------------------------------------------


def candidates(labels: list[str]) -> dict[str, DownProjActConfig]:
    base = QuaffConfig.preset("default", act_group=0)  # per token in the library: the probe's patch does the rest
    same = {f.name: getattr(base, f.name) for f in fields(QuaffConfig)}
    return {label: DownProjActConfig(**same, down_proj_act=MODES[label]) for label in labels}


def write(path: str, labels: list[str], folds: dict, wall_s: float) -> None:
    summary = {c: summarize({h: f["delta"][c] for h, f in folds.items()}) for c in labels}
    out = {"what": "issue 22 probe: down_proj's activation quantization (per token = default; per token and per group "
                   "of G input channels; none, W8A16), preset default otherwise, leave-one-source-out over the "
                   "corpus's six sources (calibration 16 x 2 x 256 tokens of the other sources + Apache-2.0, eval "
                   "4 x 4 x 256 tokens of the source left out), SmolLM2-135M on the CPU, 2 threads; "
                   "python tools/probe_down_proj_act.py",
           "deltas": {h: {c: round(f["delta"][c], 5) for c in labels} for h, f in folds.items()},
           "mean": {c: round(summary[c]["mean"], 5) for c in labels},
           "worst": {c: summary[c]["worst"] for c in labels},
           "calib_s": {h: round(f["calib_s"], 1) for h, f in folds.items()},
           "transform_s": {h: {c: round(t, 1) for c, t in f["transform_s"].items()} for h, f in folds.items()},
           "wall_s": round(wall_s)}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def table(labels: list[str], folds: dict) -> str:
    rows = []
    for c in labels:
        s = summarize({h: f["delta"][c] for h, f in folds.items()})
        rows.append([c] + [f"{100 * f['delta'][c]:+.2f}%" for f in folds.values()]
                    + [f"{100 * s['mean']:+.2f}%", f"{s['worst'][0]} {100 * s['worst'][1]:+.2f}%"])
    return tabulate(rows, headers=["down_proj act"] + list(folds) + ["mean", "worst"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--folds", nargs="*", default=None, help="leave out only these sources (default: each in turn)")
    ap.add_argument("--json", default="down_proj_act.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cands = candidates(args.candidates)
    t0 = time.perf_counter()
    fp = load_model(None)
    texts = {s.name: tokenize(fp.tokenizer, read_text(s.path)) for s in corpus_sources()}
    always = {n: texts.pop(n) for n in ALWAYS}
    folds: dict = {}
    with xtx_reused_across_candidates(), down_proj_act_patched():
        for held in args.folds or list(texts):  # one fold at a time, so that the JSON grows as folds finish
            run = leave_one_source_out(fp.model, texts, cands, 16, eval_batches=4, always=always, folds=[held],
                                       progress=lambda m: log(f"[{time.perf_counter() - t0:.0f} s] {m}"))
            folds.update(run["folds"])
            write(args.json, args.candidates, folds, time.perf_counter() - t0)
    print(table(args.candidates, folds))
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
