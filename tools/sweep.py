"""Accuracy sweep (same as `quaff-fx sweep`): python tools/sweep.py --texts A B C [--plot sweep.png]"""
import sys

from quaff_fx.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
