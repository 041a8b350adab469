"""Side-by-side timings, reported as ratios from one run (``quaff-fx bench``, ``tools/bench.py``).

Inference: one forward of a causal LM at batch × length, for FP32 eager, FP32 compiled, Quaff eager,
Quaff eager with fused scales (captured graph, siblings fused, norms folded), Quaff compiled without
fusion and Quaff compiled with the "quaff" backend (fusion). Each variant is warmed up (compilation
included there), then timed ``repeats`` times; the median is reported.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch

from .backend import make_backend
from .capture import capture
from .config import QuaffConfig
from .errors import QuaffError
from .model_loading import load_model
from .quantize import CalibrationConfig, quantize_


def _time(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), first


def bench_inference(model_name: str | None = None, batch: int = 4, seq_len: int = 256, repeats: int = 5,
                    warmup: int = 2, compiled: bool = True, progress=print) -> list[dict]:
    loaded = load_model(model_name)
    fp = loaded.model
    quaff = copy.deepcopy(fp)
    quantize_(quaff, QuaffConfig(), CalibrationConfig(), loaded.tokenizer)
    from quaff_fx.passes import FuseScales

    fused_graph = capture(quaff)
    FuseScales(fold_norms=True)(fused_graph)
    fused_graph.recompile()
    ids = torch.randint(0, int(fp.config.vocab_size), (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def hf(model) -> Callable[[], object]:
        return lambda: model(input_ids=ids, use_cache=False).logits

    variants: list[tuple[str, Callable[[], object]]] = [
        ("fp32 eager", hf(fp)), ("quaff eager", hf(quaff)), ("quaff eager, fused", lambda: fused_graph(ids))]
    if compiled:
        unfused = make_backend(passes=[])
        variants += [("fp32 compiled", hf(torch.compile(fp, fullgraph=True))),
                     ("quaff compiled, unfused", hf(torch.compile(quaff, backend=unfused, fullgraph=True))),
                     ("quaff compiled, fused", hf(torch.compile(copy.deepcopy(quaff), backend="quaff",
                                                                fullgraph=True)))]
    rows = []
    with torch.inference_mode():
        for label, fn in variants:
            median, first = _time(fn, warmup, repeats)
            rows.append({"variant": label, "seconds": median, "warmup_seconds": first})
            progress(f"{label}: {median:.3f} s")
            torch._dynamo.reset() if "compiled" in label else None
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_fp32_eager"] = base / r["seconds"]
    return rows


# -- training -------------------------------------------------------------------------------------------
TRAIN_VARIANTS = ("fp32 eager", "fp32 compiled", "bf16 autocast", "quaff eager", "quaff compiled")


class _PeakRSS:
    """Samples this process's resident memory every few ms while active: the peak of a phase."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def train_step_variant(variant: str, model_name: str | None, batch: int, seq_len: int, steps: int,
                       profile: bool = False) -> dict:
    """Time ``steps`` LoRA training steps of one variant (after a warm-up step) and its peak memory."""
    import gc

    from .finetune import FinetuneConfig, make_peft_model

    loaded = load_model(model_name)
    model = loaded.model
    if variant.startswith("quaff"):
        quantize_(model, QuaffConfig(), CalibrationConfig(), loaded.tokenizer)
    gc.collect()
    peft_model = make_peft_model(model, FinetuneConfig(rank=8))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    fn = torch.compile(peft_model) if variant.endswith("compiled") else peft_model
    ids = torch.randint(0, int(model.config.vocab_size), (batch, seq_len), generator=torch.Generator().manual_seed(0))
    peft_model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16 autocast"):
            loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    warmup = time.perf_counter() - t0
    times = []
    with _PeakRSS() as mem:
        base = mem.peak
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    tensors = list(model.parameters()) + list(model.buffers())
    result = {"variant": variant, "seconds": statistics.median(times), "warmup_seconds": warmup,
              "rss_before_steps": base, "peak_rss": mem.peak,
              "model_bytes": sum(t.numel() * t.element_size() for t in tensors)}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return result


def bench_train(model_name: str | None = None, batch: int = 4, seq_len: int = 256, steps: int = 3,
                variants: tuple[str, ...] = TRAIN_VARIANTS, profile: bool = False, progress=print) -> list[dict]:
    """Each variant in its own process (so peak memory is its own), one after the other, in one run."""
    import json
    import subprocess
    import sys

    rows = []
    for v in variants:
        cmd = [sys.executable, "-m", "quaff_fx.bench", v, str(model_name or "smollm2"), str(batch), str(seq_len),
               str(steps), "1" if profile and v == "quaff eager" else "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise QuaffError(f"bench variant {v!r} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        progress(f"{v}: {rows[-1]['seconds']:.3f} s/step, peak {rows[-1]['peak_rss'] / 2**20:.0f} MiB")
    base = rows[0]
    for r in rows:
        r["speedup_vs_fp32"] = base["seconds"] / r["seconds"]
        r["peak_memory_vs_fp32"] = r["peak_rss"] / base["peak_rss"]
    return rows


if __name__ == "__main__":  # one training variant, for bench_train's subprocesses
    import json
    import sys

    variant, name, b, s, n, prof = sys.argv[1:7]
    torch.manual_seed(0)
    model_name = None if name == "smollm2" else name
    print(json.dumps(train_step_variant(variant, model_name, int(b), int(s), int(n), prof == "1")))
