"""The ``quaff-fx`` command: one module per group of commands, each with ``register(subparsers)``."""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import QuaffError
from . import evaluate, export, quantize, train
from .common import CommandParser

GROUPS = (quantize, evaluate, train, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quaff-fx",
                                     description="Quaff outlier-scaled int8 quantization as graph passes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors become one line and exit 2, a closed pipe (``| head``) a quiet exit 0."""
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # peft imports bitsandbytes where it is installed, which then warns of optional CPU kernels it could not
        # load; quaff-fx does not use it (only tools/gpu_step_bench.py's QLoRA baseline does)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away is noticed here, inside the handler, not at exit
        return code
    except QuaffError as exc:
        print(f"quaff-fx: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("quaff-fx: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """The reader of our output closed the pipe (``| head``): that is no error. Point stdout at /dev/null so the
    interpreter's final flush does not raise again (the recipe of Python's signal documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is not a file descriptor (captured in tests): nothing is left to flush into the pipe
