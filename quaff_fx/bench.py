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
from .models import load_model
from .transform import calibrate_text, transform


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
    config = QuaffConfig()
    quaff = copy.deepcopy(fp)
    gm = capture(quaff)
    stats = calibrate_text(gm, loaded.tokenizer, None, config)
    transform(quaff, stats, config, gm=gm)
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
        variants += [("fp32 compiled", hf(torch.compile(fp, fullgraph=True))),
                     ("quaff compiled, unfused", hf(torch.compile(quaff, backend=make_backend(passes=[]), fullgraph=True))),
                     ("quaff compiled, fused", hf(torch.compile(copy.deepcopy(quaff), backend="quaff", fullgraph=True)))]
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
