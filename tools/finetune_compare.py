"""LoRA fine-tuning of the same model on the same data for the same steps, FP32 base vs Quaff int8 base,
in one run: the endpoints of both loss curves and the held-out perplexity after training.

    python tools/finetune_compare.py [--steps 20] [--model smollm2] [finetune options...]
"""
import json
import sys
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from tabulate import tabulate

from quaff_fx.cli import main as cli


def run(extra: list[str]) -> dict:
    out = StringIO()
    with redirect_stdout(out):
        code = cli(["finetune", *extra, "--json"])
    if code != 0:
        sys.exit(code)
    return json.loads(out.getvalue())


def main() -> None:
    args = sys.argv[1:]
    work = Path(tempfile.mkdtemp(prefix="quaff-ft-"))
    fp = run([*args, "--fp32", "--out", str(work / "fp32")])
    q = run([*args, "--out", str(work / "quaff")])
    rows = []
    for key in ("first_loss", "last_loss", "heldout_perplexity"):
        rows.append([key, f"{fp[key]:.4f}", f"{q[key]:.4f}", f"{100 * (q[key] / fp[key] - 1):+.2f}%"])
    print(tabulate(rows, headers=["", "FP32 base", "Quaff base", "Quaff vs FP32"]))


if __name__ == "__main__":
    main()
