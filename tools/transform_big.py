"""Time the default transform of a big HF model folder on one device, with its peak memory (the README's 8B numbers).

    python tools/make_llama_folder.py /tmp/llama8b
    python tools/transform_big.py /tmp/llama8b --out /tmp/llama8b-quaff --device cuda

Prints the phases (load, capture, calibration, XᵀX, GPTQ, rewrite, save), the wall time, the peak GPU memory against
the bf16 weights and the peak host memory (RSS), and writes them as JSON to --json.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from quaff_fx import CalibrationConfig, QuaffConfig, quantize_
from quaff_fx.io import build_manifest, save_quantized
from quaff_fx.model_loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--preset", default="default")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    loaded = load_model(args.folder, getattr(torch, args.dtype), device=args.device)
    load_s = time.perf_counter() - t0
    weight_bytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    config = QuaffConfig.preset(args.preset)
    calibration = CalibrationConfig(num_batches=args.batches)
    result = quantize_(loaded.model, config, calibration, loaded.tokenizer, progress=True)
    result.timings = {"load": load_s, **result.timings}
    if args.out:
        with result.timed("save"):
            save_quantized(result.model, args.out, build_manifest(loaded.source, config, result.layers, result.reports),
                           result.stats, loaded.tokenizer, force=True)
    wall = time.perf_counter() - t_start
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"timings": {k: round(v, 1) for k, v in result.timings.items()}, "wall_s": round(wall, 1),
           "weights_gib": round(weight_bytes / 2**30, 2), "peak_gpu_gib": round(peak_gpu / 2**30, 2),
           "peak_gpu_vs_weights": round(peak_gpu / weight_bytes, 3), "peak_rss_gib": round(rss / 2**30, 2),
           "layers": len(result.layers),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    print(result.timing_text())
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
