"""The ``quaff-fx`` command: one module per group of commands, each with ``register(subparsers)``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import QuaffError
from . import evaluate, export, quantize, train

GROUPS = (quantize, evaluate, train, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quaff-fx", description="Quaff outlier-scaled int8 quantization as graph passes.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return args.func(args)
    except QuaffError as exc:
        print(f"quaff-fx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quaff-fx: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130

