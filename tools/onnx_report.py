"""ONNX export report for a Quaff artifact, in one run: file size against an FP32 export of the same
model, logits difference, held-out perplexity in onnxruntime vs PyTorch, and CPU latency of both.

    python tools/onnx_report.py ARTIFACT [--seq-len 256] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from quaff_fx.data import batches, read_text, tokenize
from quaff_fx.evaluate import perplexity
from quaff_fx.model_loading import load_model
from quaff_fx.onnx_export import export_onnx, onnx_perplexity
from quaff_fx.transform import load_quantized


def median_time(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="quaff-onnx-"))
    loaded, manifest = load_quantized(args.artifact)
    quaff_path = export_onnx(loaded.model, work / "quaff.onnx", force=True)
    source = manifest["source"]
    embedded = source.get("name") == "smollm2"
    fp = load_model(source["name"] if embedded else str(Path(source["path"]) / source.get("gguf_file", "")))
    ids = tokenize(loaded.tokenizer, read_text(None, "heldout"))
    session = ort.InferenceSession(str(quaff_path), providers=["CPUExecutionProvider"])
    pt_ppl = perplexity(loaded.model, ids, args.seq_len, 4)["perplexity"]
    ort_ppl = onnx_perplexity(quaff_path, ids, args.seq_len)
    probe = next(batches(ids, args.seq_len, 4))
    with torch.no_grad():
        ref = loaded.model(input_ids=probe).logits
        t_pt = median_time(lambda: loaded.model(input_ids=probe, use_cache=False))
    got = torch.from_numpy(session.run(["logits"], {"input_ids": probe.numpy()})[0])
    t_ort = median_time(lambda: session.run(["logits"], {"input_ids": probe.numpy()}))
    int8_bytes = sum(t.numel() for n, t in loaded.model.state_dict().items() if t.dtype == torch.int8)
    fp32_bytes = sum(p.numel() * 4 for p in fp.model.parameters())
    rows = [["ONNX file (Quaff)", f"{quaff_path.stat().st_size / 2**20:.1f} MiB"],
            ["int8 weight bytes", f"{int8_bytes / 2**20:.1f} MiB"],
            ["FP32 parameters (an FP32 export's size)", f"{fp32_bytes / 2**20:.1f} MiB"],
            ["size vs FP32", f"{quaff_path.stat().st_size / fp32_bytes:.2f}x"],
            ["max |logits diff| ORT vs PyTorch",
             f"{(got - ref).abs().max().item():.3g} (logits up to {ref.abs().max().item():.3g})"],
            ["held-out perplexity PyTorch / ORT",
             f"{pt_ppl:.4f} / {ort_ppl:.4f} ({100 * (ort_ppl / pt_ppl - 1):+.3f}%)"],
            [f"forward 4x{args.seq_len} PyTorch / ORT", f"{t_pt:.3f} s / {t_ort:.3f} s ({t_pt / t_ort:.2f}x)"]]
    print(tabulate(rows, headers=["measure", "value"]))


if __name__ == "__main__":
    main()
