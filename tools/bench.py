"""Benchmark entry point (same as `quaff-fx bench`): python tools/bench.py [--batch 4] [--seq-len 256] ..."""
import sys

from quaff_fx.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
