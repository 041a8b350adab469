"""Option groups, checks and helpers shared by the quaff-fx commands."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..corpus import DEFAULT_BATCHES
from ..errors import QuaffError

MODEL_HELP = "'smollm2' (default, the embedded SmolLM2-135M-Instruct), a .gguf file or a Hugging Face model folder"


def progress(desc: str, total: int | None):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


def add_outlier_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("outlier selection")
    g.add_argument("--preset", default="default",
                   help="default (top_abs 1%% + smoothing 0.6 shared by siblings + GPTQ rounding; 'accurate' is the "
                        "same) | fast (top_abs 1%%, no smoothing, round to nearest: no XᵀX pass) | "
                        "paper (mean_times, threshold 100, 1%%, plain)")
    g.add_argument("--strategy", default=None, help="top_abs | mean_times | zscore | static (overrides the preset)")
    g.add_argument("--threshold", type=float, default=None,
                   help="mean_times: multiple of mean|x|; zscore: z bound (default 100; top_abs and static ignore it)")
    g.add_argument("--max-ratio", type=float, default=None,
                   help="per-layer cap on outlier channels, fraction of inputs (default 0.01)")
    g.add_argument("--channels", default="", help="static strategy: comma-separated channel list")
    g.add_argument("--include", action="append",
                   help="fnmatch pattern of module names to quantize (repeatable; default all)")
    g.add_argument("--exclude", action="append",
                   help="fnmatch pattern of module names to leave alone (repeatable; default lm_head, embeddings)")
    g.add_argument("--smooth-alpha", default=None,
                   help="SmoothQuant-style smoothing of the non-outlier channels: off | a number in (0, 1) | "
                        "auto (per input, chosen by the calibration's error search)")
    g.add_argument("--smooth-per-layer", action="store_true", default=None,
                   help="with smoothing: each layer its own factor instead of one per input "
                        "(siblings then cannot be fused)")
    g.add_argument("--act-group", type=int, default=None, metavar="N",
                   help="activation scales of the MLP output projections (down_proj, fc2, dense_4h_to_h, w2): one per "
                        "(token, group of N input channels); 0 = per token (the default preset's 128; fast and "
                        "paper: 0)")
    g.add_argument("--weight-rounding", choices=("nearest", "gptq"), default=None,
                   help="int8 weight rounding: nearest | gptq (error-compensated with XᵀX of the calibration "
                        "batches; the default preset's)")


def add_calibration_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", dest="calib", action="append", default=None, metavar="TEXT",
                   help="calibration text file or dataset (.jsonl/.json/.csv/.parquet, a saved datasets folder) or "
                        "'bundled'; repeatable, each an equal share of the windows"
                        " (default: the bundled calibration corpus, 'bundled')")
    g.add_argument("--data", dest="calib", action="append", help=argparse.SUPPRESS)  # calibrate's old name
    g.add_argument("--batches", type=int, default=DEFAULT_BATCHES, help="calibration batches")
    g.add_argument("--batch-size", type=int, default=2, help="windows per batch")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per window")


def calibration_config(args: argparse.Namespace, **overrides):
    """The CalibrationConfig the calibration options describe; each text is checked now, before the model loads."""
    from ..corpus import BUNDLED, DATASET_SUFFIXES
    from ..data import read_text
    from ..quantize import CalibrationConfig

    texts = tuple(getattr(args, "calib", None) or ())
    for item in texts:
        path = Path(item)
        if item == BUNDLED and not path.exists():
            continue
        if path.suffix in DATASET_SUFFIXES or path.is_dir():
            if not path.exists():
                raise QuaffError(f"calibration dataset {item!r} does not exist")
            continue
        read_text(path, "calibration")  # missing, unreadable or empty: one clear error now
    fields = {"texts": texts, "device": device_of(args)}
    if hasattr(args, "batches"):  # the command has the calibration group (eval's --seq-len is its own window)
        fields.update(num_batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len)
    return CalibrationConfig(**{**fields, **overrides})


def add_device_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs; auto = CUDA when available")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the model's floating weights (default: float32; an artifact: as saved)")


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def device_of(args: argparse.Namespace):
    """The torch.device ``--device`` names (auto: CUDA when available); a missing GPU is a clear error."""
    import torch

    choice = getattr(args, "device", "auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise QuaffError("--device cuda: no CUDA device is available; use --device cpu (or auto)")
    return torch.device(choice)


def dtype_of(args: argparse.Namespace):
    """The torch dtype ``--dtype`` names, or None when not given (a model loads in float32, an artifact as saved)."""
    import torch

    name = getattr(args, "dtype", None)
    return None if name is None else getattr(torch, DTYPES[name])


def phase(message: str) -> None:
    """One line on stderr before a phase that takes a while, so a long quiet wait has a name."""
    print(f"quaff-fx: {message}", file=sys.stderr, flush=True)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for options with a real default (not None/False/"", not already named in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, "", argparse.SUPPRESS) or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """The parser of one command: option defaults shown in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def add_training_options(p: argparse.ArgumentParser, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--data", default=None, help="training text (default: the bundled apache-2.0.txt)")
    g.add_argument("--steps", type=int, default=20, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=4, help="windows per step")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    g.add_argument("--lr", type=float, default=lr, help="learning rate")


def quaff_config(args: argparse.Namespace):
    from ..config import DEFAULT_EXCLUDE, OutlierConfig, QuaffConfig

    try:
        channels = tuple(int(c) for c in args.channels.split(",") if c.strip()) if args.channels else ()
    except ValueError:
        raise QuaffError(f"--channels must be a comma-separated list of integers, got {args.channels!r}") from None
    base = OutlierConfig.preset(args.preset)
    outliers = OutlierConfig(args.strategy or base.strategy,
                             base.threshold if args.threshold is None else args.threshold,
                             base.max_ratio if args.max_ratio is None else args.max_ratio, channels)
    if args.act_group is not None and args.act_group < 0:
        raise QuaffError(f"--act-group must be >= 0 (0: per token), got {args.act_group}")
    given = {k: v for k, v in (("weight_rounding", args.weight_rounding), ("act_group", args.act_group),
                               ("smooth_shared", None if args.smooth_per_layer is None else False)) if v is not None}
    return QuaffConfig.preset(args.preset, outliers=outliers, include=tuple(args.include or ("*",)),
                              exclude=tuple(args.exclude or DEFAULT_EXCLUDE), **given, **_smoothing(args.smooth_alpha))


def _smoothing(value: str | None) -> dict:
    """--smooth-alpha as a config field (nothing when not given: the preset decides)."""
    if value is None:
        return {}
    if value in ("auto", "off"):
        return {"smooth_alpha": None if value == "off" else "auto"}
    try:
        return {"smooth_alpha": float(value)}
    except ValueError:
        raise QuaffError(f"--smooth-alpha must be auto, off or a number in (0, 1), got {value!r}") from None


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise QuaffError(f"--{n.replace('_', '-')} must be >= 1, got {v}")


def check_out(path: str | None, force: bool) -> None:
    """Refuse early, before minutes of work, to overwrite an output or to write into a missing folder."""
    from ..io import check_target

    if path is not None:
        check_target(path, force)


def load_model_for(args: argparse.Namespace):
    """Load ``args.model`` in ``--dtype`` onto ``--device``, with a phase message."""
    import torch

    from ..model_loading import load_model

    device = device_of(args)
    phase(f"loading {args.model or 'smollm2'} ({getattr(args, 'dtype', None) or 'float32'}, {device})")
    loaded = load_model(args.model, dtype_of(args) or torch.float32)
    loaded.model.to(device)
    return loaded


def quantize_loaded(loaded, config, calibration, stats=None):
    """``quantize_`` on a loaded model (its tokenizer), phases announced on stderr."""
    from ..quantize import quantize_

    return quantize_(loaded.model, config, calibration, tokenizer=loaded.tokenizer, stats=stats, progress=True)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
