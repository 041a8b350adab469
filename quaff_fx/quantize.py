"""``quantize_(model, config, calibration)``: the one entry point of the whole job, in the spirit of torchao's
``quantize_``. The config's type picks a handler (``register_quantize_handler``): ``QuaffConfig`` runs
capture → calibration → passes (annotate → GPTQ rounding → rewrite) → swap into the live model; the baselines
(``NaiveW8A8Config``, ``SmoothQuantConfig``, ``LLMInt8Config``, see ``quaff_fx.baselines``) are handled by the
same verb. The CLI, bench, sweep and tools call this and never re-assemble the sequence themselves.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from .calibration import CalibrationStats
from .config import QuaffConfig
from .corpus import DEFAULT_BATCHES
from .errors import QuaffError
from .report import PassReport

PHASES = ("load", "capture", "calibration", "xtx", "gptq", "rewrite", "save")  # the transform report's order
PHASE_NAMES = {"xtx": "XᵀX", "gptq": "GPTQ"}


@dataclass(frozen=True)
class CalibrationConfig:
    """What the calibration runs: ``token_batches`` (ready [batch, seq] LongTensors) or token windows of ``texts``
    (text files, datasets or 'bundled' for the calibration corpus, see ``quaff_fx.corpus``; empty: the
    bundled corpus), at most
    ``num_batches`` batches of ``batch_size`` x ``seq_len``. ``device``: where the model runs (None: where it is)."""

    texts: tuple[str, ...] = ()
    token_batches: tuple[torch.Tensor, ...] | None = None
    num_batches: int | None = DEFAULT_BATCHES  # of texts; () = the bundled corpus (README, Accuracy)
    batch_size: int = 2
    seq_len: int = 256
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(str(t) for t in self.texts))
        if self.token_batches is not None:
            object.__setattr__(self, "token_batches", tuple(self.token_batches))
        for name in ("batch_size", "seq_len", "num_batches"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise QuaffError(f"CalibrationConfig.{name} must be >= 1, got {v}")

    def batches(self, tokenizer=None) -> list[torch.Tensor]:
        """The calibration batches (on the CPU; the calibration moves each to the model's device)."""
        if self.token_batches is not None:
            out = list(self.token_batches)[: self.num_batches]
            if not out:
                raise QuaffError("CalibrationConfig.token_batches is empty: pass at least one [batch, seq] LongTensor")
            return out
        if tokenizer is None:
            raise QuaffError("calibrating on texts needs the tokenizer: quantize_(..., tokenizer=tok), "
                             "or pass token_batches")
        from .corpus import calibration_batches

        return calibration_batches(tokenizer, self.texts, self.num_batches, self.batch_size, self.seq_len)

    def describe(self) -> str:
        """How the stats record their calibration data."""
        if self.token_batches is not None:
            return "token batches"
        from .corpus import describe

        return describe(self.texts)

    def info(self, batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        """What the stats record of their calibration data (and what reusing them for GPTQ checks)."""
        shape = tuple(batches[0].shape) if batches and isinstance(batches[0], torch.Tensor) else (0, 0)
        return {"seq_len": int(shape[-1]), "batch_size": int(shape[0]), "batches": len(batches),
                "tokens": sum(int(b.numel()) for b in batches if isinstance(b, torch.Tensor)), "text": self.describe()}


@dataclass
class QuantizeResult:
    """What ``quantize_`` did: the live model (changed in place), the rewritten graph (None for the baselines that
    swap modules directly), the pass reports, the layer specs an artifact records, the stats and the time per phase."""

    model: nn.Module
    graph_module: GraphModule | None
    reports: list[PassReport]
    layers: dict[str, dict[str, Any]]
    stats: CalibrationStats | None
    timings: dict[str, float] = field(default_factory=dict)  # phase (PHASES) -> seconds

    def timed(self, phase: str):
        """Add the caller's phases (load, save) to ``timings``: ``with result.timed("save"): save_quantized(...)``."""
        return timed(self.timings, phase)

    def timing_rows(self) -> list[tuple[str, float]]:
        """(phase, seconds) in PHASES order, the phases that ran; extra phases after."""
        order = [p for p in PHASES if p in self.timings] + [p for p in self.timings if p not in PHASES]
        return [(PHASE_NAMES.get(p, p), round(self.timings[p], 2)) for p in order]

    def timing_text(self) -> str:
        """One line: ``load 1.2 s · capture 3.4 s · ... · total 9.9 s``."""
        rows = self.timing_rows()
        return " · ".join(f"{p} {s:.1f} s" for p, s in rows) + f" · total {sum(s for _, s in rows):.1f} s"


Handler = Callable[..., QuantizeResult]
_HANDLERS: dict[type, Handler] = {}


def register_quantize_handler(config_type: type) -> Callable[[Handler], Handler]:
    """Register ``handler(model, config, calibration, tokenizer, stats, progress, timer) -> QuantizeResult`` for
    configs of ``config_type`` (torchao's ``register_quantize_module_handler`` shape)."""

    def register(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler

    return register


class Timer:
    """Seconds per phase, summed."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, phase: str):
        return timed(self.timings, phase)


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[phase]``; a profiler sees the block as ``quaff:<phase>``."""
    t0 = time.perf_counter()
    try:
        with torch.profiler.record_function(f"quaff:{phase}"):
            yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t0


def quantize_(model: nn.Module, config: Any = None, calibration: CalibrationConfig | None = None, tokenizer=None, *,
              stats: CalibrationStats | None = None, progress: bool | Callable = False) -> QuantizeResult:
    """Quantize ``model`` in place as ``config`` says (default ``QuaffConfig()``) and return what was done.

    ``calibration``: the data (default ``CalibrationConfig()``: the bundled corpus, which needs ``tokenizer``);
    ``stats``: reuse saved calibration stats instead of calibrating (GPTQ rounding still reads the batches of
    ``calibration`` for XᵀX). ``progress``: True prints phase lines on stderr; a callable wraps the batch iterable.
    """
    config = QuaffConfig() if config is None else config
    handler = next((h for t, h in _HANDLERS.items() if isinstance(config, t)), None)
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise QuaffError(f"quantize_ has no handler for {type(config).__name__}; pass one of {known} "
                         "(or register one with register_quantize_handler)")
    calibration = calibration or CalibrationConfig()
    if calibration.device is not None:
        model.to(calibration.device)
    timer = Timer()
    result = handler(model, config, calibration, tokenizer, stats, _progress(progress), timer)
    result.timings = {**timer.timings, **result.timings}
    return result


def _progress(progress: bool | Callable) -> Callable:
    """A phase reporter with a ``wrap`` for iterables: quiet, stderr lines, or the caller's iterable wrapper."""
    if callable(progress):
        return _Progress(lambda message: None, progress)
    return _Progress((lambda m: print(f"quaff-fx: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None),
                     lambda it: it)


@dataclass
class _Progress:
    say: Callable[[str], None]
    wrap: Callable


def calibrate_model(model: nn.Module, gm: GraphModule, config: QuaffConfig, calibration: CalibrationConfig, tokenizer,
                    progress, timer: Timer, **options: Any) -> CalibrationStats:
    """Calibrate the captured ``gm`` of ``model`` on ``calibration``'s batches (the calibration phase)."""
    from .calibration import calibrate

    batches = calibration.batches(tokenizer)
    _check_seq_len(gm, batches)
    progress.say(f"calibrating on {len(batches)} batch(es) of {calibration.describe()}")
    opts = {**config.calibration_options(), **options}
    with timer("calibration"):
        stats = calibrate(gm, progress.wrap(batches), config.outliers, config.eligible, n_batches=len(batches), **opts)
    stats.info.update(calibration.info(batches))
    return stats


def _check_seq_len(gm: GraphModule, batches: Sequence[torch.Tensor]) -> None:
    from .capture import META_KEY
    from .evaluate import check_seq_limit

    if batches and isinstance(batches[0], torch.Tensor) and batches[0].dim() == 2:
        check_seq_limit(int(batches[0].shape[1]), gm.meta.get(META_KEY, {}).get("max_seq_len"))


def restore_batches_(stats: CalibrationStats, calibration: CalibrationConfig, tokenizer) -> CalibrationStats:
    """Give stats read from a file their calibration batches again (GPTQ gathers XᵀX from them): ``calibration``
    must describe the data the stats were gathered on (same text, window length and batch size)."""
    batches = calibration.batches(tokenizer)
    ours, theirs = calibration.info(batches), stats.info
    for key in ("text", "seq_len", "batch_size"):
        if key in theirs and theirs[key] != ours[key]:
            raise QuaffError(f"the stats were calibrated with {key} {theirs[key]!r}, the calibration given has "
                             f"{ours[key]!r}: "
                             "pass the same calibration data for GPTQ rounding, or use weight_rounding='nearest'")
    stats.batches = batches[: int(theirs.get("batches", len(batches)))]
    return stats


@register_quantize_handler(QuaffConfig)
def _quantize_quaff(model: nn.Module, config: QuaffConfig, calibration: CalibrationConfig, tokenizer,
                    stats: CalibrationStats | None, progress, timer: Timer) -> QuantizeResult:
    from .capture import capture
    from .transform import transform

    progress.say("capturing the graph")
    with timer("capture"):
        gm = capture(model)
    if stats is None:
        stats = calibrate_model(model, gm, config, calibration, tokenizer, progress, timer)
    elif config.weight_rounding == "gptq" and stats.batches is None:
        restore_batches_(stats, calibration, tokenizer)
    progress.say("running the passes" + (" (GPTQ rounding)" if config.weight_rounding == "gptq" else ""))
    t0 = time.perf_counter()
    result = transform(model, stats, config, gm=gm)
    passes_s = time.perf_counter() - t0
    split = pass_timings(result.reports)
    timer.timings.update(split)
    timer.timings["rewrite"] = max(passes_s - sum(split.values()), 0.0)
    return QuantizeResult(result.model, result.graph_module, result.reports, result.layers, stats)


def pass_timings(reports: Sequence[PassReport]) -> dict[str, float]:
    """Seconds the passes' reports record per phase (``xtx_s``/``gptq_s`` columns of their rows)."""
    out: dict[str, float] = {}
    for report in reports:
        for row in report.rows:
            for phase in ("xtx", "gptq"):
                if f"{phase}_s" in row:
                    out[phase] = out.get(phase, 0.0) + float(row[f"{phase}_s"])
    return out


from . import baselines  # noqa: E402,F401  (registers the baseline handlers)
