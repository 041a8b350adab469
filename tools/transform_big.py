"""Time the default transform of a big HF model folder on one device, with its peak memory (the README's 8B numbers).

    python tools/make_llama_folder.py /tmp/llama8b
    python tools/transform_big.py /tmp/llama8b --out /tmp/llama8b-quaff --device cuda

Prints the phases (load, capture, calibration, XᵀX, GPTQ, rewrite, save), the wall time, the peak GPU memory against
the bf16 weights (``torch.cuda.max_memory_allocated``, load and save included) and the peak host memory (RSS), and
writes them as JSON to --json. ``--snapshot FILE`` (CUDA) also records the allocator's history and writes the
snapshot (https://pytorch.org/memory_viz), with the phase and the largest live blocks at the peak printed.

A CPU proxy of the same measurement (no GPU needed), ``--cpu-peak``: the peak of live CPU tensor bytes (the profiler's
allocation events, load included) against the weights, and the ``quaff:<phase>`` span where it was reached (GPTQ's
factorisations in float32 there, as on a GPU; the CPU's default is float64). The XᵀX
chunk and GPTQ batch budgets are absolute bytes; ``--budget-scale`` scales them with the model (an 8B-shaped Llama of
hidden 256 is (256/4096)² of the 8B's XᵀX, so 0.0039 keeps the 8B's proportions):

    python tools/make_llama_folder.py /tmp/llama-proxy --hidden 256 --intermediate 896 --heads 8 --kv-heads 2 \\
        --vocab 8192
    python tools/transform_big.py /tmp/llama-proxy --device cpu --cpu-peak --budget-scale 0.0039
"""
from __future__ import annotations

import argparse
import bisect
import gc
import importlib
import json
import resource
import sys
import time
import weakref
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from quaff_fx import CalibrationConfig, QuaffConfig, quantize_, rounding
from quaff_fx import quantize as quantize_module
from quaff_fx.corpus import DEFAULT_BATCHES
from quaff_fx.io import build_manifest, save_quantized
from quaff_fx.model_loading import load_model

transform_module = importlib.import_module("quaff_fx.transform")  # the module: quaff_fx.transform is the function
_library_timed, _library_adopt = quantize_module.timed, transform_module.adopt_from_graph_


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--preset", default="default")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES)
    p.add_argument("--json", default=None)
    p.add_argument("--snapshot", default=None, help="CUDA: write the allocator's memory snapshot here (.pickle)")
    p.add_argument("--cpu-peak", action="store_true", help="CPU proxy: peak of live tensor bytes vs the weights")
    p.add_argument("--budget-scale", type=float, default=1.0, help="scale the XᵀX chunk and GPTQ batch budgets")
    args = p.parse_args()
    quantize_module.timed = _timed_with_peak  # Timer looks it up by name: every phase of quantize_ reports its peak
    transform_module.adopt_from_graph_ = _adopt_with_peak
    if args.budget_scale != 1.0:
        _scale_budgets(args.budget_scale)
    if args.snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    if args.cpu_peak:
        rounding.CPU_FLOAT64_MAX_WIDTH = 0  # float32 factorisations: a GPU's memory
    profiler = _cpu_profiler() if args.cpu_peak else nullcontext()
    t_start = time.perf_counter()
    with profiler:
        t0 = time.perf_counter()
        loaded = load_model(args.folder, getattr(torch, args.dtype), device=args.device)
        load_s = time.perf_counter() - t0
        _phase_peak("load")
        weight_bytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        config = QuaffConfig.preset(args.preset)
        calibration = CalibrationConfig(num_batches=args.batches)
        result = quantize_(loaded.model, config, calibration, loaded.tokenizer, progress=True)
        result.timings = {"load": load_s, **result.timings}
        if args.out:
            with result.timed("save"):
                save_quantized(result.model, args.out,
                               build_manifest(loaded.source, config, result.layers, result.reports),
                               result.stats, loaded.tokenizer, force=True)
    wall = time.perf_counter() - t_start
    _phase_peak("after")
    peak_gpu = max(PHASE_PEAKS.values(), default=0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"timings": {k: round(v, 1) for k, v in result.timings.items()}, "wall_s": round(wall, 1),
           "weights_gib": round(weight_bytes / 2**30, 2), "peak_gpu_gib": round(peak_gpu / 2**30, 2),
           "peak_gpu_vs_weights": round(peak_gpu / weight_bytes, 3), "peak_rss_gib": round(rss / 2**30, 2),
           "peak_gpu_gib_by_phase": {k: round(v / 2**30, 2) for k, v in PHASE_PEAKS.items()},
           "layers": len(result.layers), "budget_scale": args.budget_scale,
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    if args.cpu_peak:
        out["cpu_peak"] = _cpu_peak(profiler, weight_bytes)
    if args.snapshot:
        out["gpu_peak"] = _gpu_peak(args.snapshot, weight_bytes)
    print(result.timing_text())
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


PHASE_PEAKS: dict[str, int] = {}  # CUDA: peak bytes allocated within each phase (the peak is reset after each)


def _phase_peak(phase: str) -> None:
    """Note the CUDA peak since the last call under ``phase`` and print it at once (a run cut short keeps its lines)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated()
        PHASE_PEAKS[phase] = max(PHASE_PEAKS.get(phase, 0), peak)
        now = torch.cuda.memory_allocated()
        print(f"transform_big: {phase}: peak {peak / 2**30:.2f} GiB, now {now / 2**30:.2f} GiB", file=sys.stderr,
              flush=True)
        torch.cuda.reset_peak_memory_stats()


@contextmanager
def _timed_with_peak(timings: dict[str, float], phase: str) -> Iterator[None]:
    """quantize_'s phase timer, also noting each phase's CUDA peak (which phase sets the transform's peak)."""
    _phase_peak("between phases")
    with _library_timed(timings, phase):
        yield
    _phase_peak(phase)


def _adopt_with_peak(model, gm):
    """The swap into the live model, its peak apart from the passes' (XᵀX, GPTQ, rewrite) before it."""
    _phase_peak("passes (XᵀX, GPTQ, rewrite)")
    fp = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    layers = _library_adopt(model, gm)
    gc.collect()
    alive = [w() for w in fp if w() is not None]
    print(f"transform_big: FP Linear weights alive after the swap: {len(alive)} of {len(fp)} (lm_head and others not "
          f"quantized included); holders of one: {_holders(alive[-1]) if alive else '-'}", file=sys.stderr, flush=True)
    del alive
    _phase_peak("swap into the live model")
    return layers


def _holders(tensor: torch.Tensor) -> list[str]:
    """What refers to ``tensor`` (types, and the keys of dicts holding it): where a leaked FP weight is kept."""
    out = []
    for ref in gc.get_referrers(tensor):
        if isinstance(ref, dict):
            keys = [k for k, v in ref.items() if v is tensor][:2]
            out.append(f"dict{keys}")
        elif not isinstance(ref, list) or len(ref) < 10_000:
            out.append(type(ref).__name__)
    return out[:8]


def _scale_budgets(scale: float) -> None:
    """The XᵀX chunk budget (both devices) and the GPTQ batch budget times ``scale`` (a proxy of a bigger model)."""
    from quaff_fx.passes import rewrite_linear

    rounding.GPTQ_MEMORY = int(rounding.GPTQ_MEMORY_CUDA * scale)
    rounding.GPTQ_MEMORY_CUDA = int(rounding.GPTQ_MEMORY_CUDA * scale)
    rewrite_linear.GPTQ_BATCH_BYTES = int(rewrite_linear.GPTQ_BATCH_BYTES * scale)


def _cpu_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


def _cpu_peak(prof, weight_bytes: int) -> dict:
    """Peak live CPU bytes from the profiler's allocation events (all allocations made while profiling, the model's
    load included), where it was reached, and the maximum within each ``quaff:<phase>`` span."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [(e["ts"], e["args"]["Total Allocated"]) for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    spans = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("quaff:")]
    memory.sort()
    times = [t for t, _ in memory]
    ts, peak = max(memory, key=lambda m: m[1])
    at = [e["name"] for e in spans if e["ts"] <= ts <= e["ts"] + e["dur"]]
    by_phase: dict[str, float] = {}
    for e in spans:  # the allocation events inside the span: a slice of the time-sorted events
        lo, hi = bisect.bisect_left(times, e["ts"]), bisect.bisect_right(times, e["ts"] + e["dur"])
        if lo < hi:
            inside = max(m for _, m in memory[lo:hi])
            by_phase[e["name"]] = max(by_phase.get(e["name"], 0.0), round(inside / weight_bytes, 3))
    return {"peak_mib": round(peak / 2**20, 1), "peak_vs_weights": round(peak / weight_bytes, 3),
            "at": at or ["outside quantize_ (load or save)"], "max_vs_weights_by_phase": by_phase}


def _gpu_peak(path: str, weight_bytes: int) -> dict:
    """Write the CUDA allocator's snapshot to ``path``; return the peak replayed from its trace and the largest
    blocks alive then (size and the innermost quaff-fx frame that allocated them)."""
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    with open(path, "wb") as f:
        import pickle

        pickle.dump(snapshot, f)
    events = [e for trace in snapshot["device_traces"] for e in trace]
    peak, peak_index = _replay(events)
    live = _replay(events[: peak_index + 1], keep=True)
    largest = sorted(((size, _frame(event)) for size, event in live.values()), key=lambda x: -x[0])[:12]
    return {"traced_peak_gib": round(peak / 2**30, 2), "traced_peak_vs_weights": round(peak / weight_bytes, 3),
            "note": "traced from the start of recording: blocks allocated before it are not counted",
            "largest_at_peak": [f"{size / 2**20:.0f} MiB {where}" for size, where in largest]}


def _replay(events: list[dict], keep: bool = False):
    """Replay the allocator's alloc / free_completed events: (peak bytes, index of the event that reached it), or
    with ``keep`` the blocks still alive at the end (address -> (size, alloc event))."""
    live: dict[int, tuple[int, dict]] = {}
    used, peak, peak_index = 0, 0, -1
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event)
            used += event["size"]
            if used > peak:
                peak, peak_index = used, i
        elif event["action"] == "free_completed" and event["addr"] in live:
            used -= live.pop(event["addr"])[0]
    return live if keep else (peak, peak_index)


def _frame(event: dict) -> str:
    frames = event.get("frames") or []
    ours = [f for f in frames if "quaff_fx" in f.get("filename", "") or "/passes/" in f.get("filename", "")]
    f = (ours or frames or [{}])[0]
    return f"{f.get('filename', '?').rsplit('/', 1)[-1]}:{f.get('line', '?')} {f.get('name', '')}"


if __name__ == "__main__":
    main()
