"""Outlier spatial stability during LoRA fine-tuning (same as `quaff-fx ossh`): python tools/ossh.py [--steps 40]"""
import sys

from quaff_fx.cli import main

if __name__ == "__main__":
    sys.exit(main(["ossh", *sys.argv[1:]]))
