"""quaff-fx export-onnx."""
from __future__ import annotations

import argparse
import json

from ..errors import QuaffError
from .common import check_out, phase


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export an artifact to ONNX, then check it in onnxruntime against PyTorch."""
    from ..io import is_artifact, load_quantized, read_manifest
    from ..onnx_export import VERDICTS, check_opset, compare_with_pytorch, export_onnx

    if not is_artifact(args.artifact):
        raise QuaffError(f"{args.artifact!r} is not a quaff-fx artifact folder (no quaff.json); "
                         "run `quaff-fx transform --out DIR` first")
    read_manifest(args.artifact)
    check_opset(args.opset)
    check_out(args.out, args.force)
    phase(f"loading {args.artifact}")
    loaded, _ = load_quantized(args.artifact)
    phase(f"exporting to ONNX opset {args.opset} and checking the file (minutes for SmolLM2)")
    out = export_onnx(loaded.model, args.out, args.opset, force=args.force)
    phase("running the export in onnxruntime beside PyTorch")
    check = compare_with_pytorch(loaded.model, out, _check_ids(loaded))
    result = {"out": str(out), "bytes": out.stat().st_size, "opset": args.opset, **check}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"wrote {out} ({result['bytes'] / 2**20:.1f} MiB, opset {args.opset}); passes onnx.checker (full)")
    print(f"onnxruntime vs PyTorch on {check['positions']} token positions: the top-1 token agrees at "
          f"{100 * check['top1_agreement']:.1f}%, max |logit diff| {check['max_abs_diff_vs_pytorch']:.3g} "
          f"(logits up to {check['logits_max_abs']:.3g}): {VERDICTS[check['verdict']]}")
    return 0


def _check_ids(loaded):
    """Two windows of 32 tokens of the bundled held-out text (random ids when the artifact has no tokenizer)."""
    import torch

    from ..data import read_text, tokenize

    if loaded.tokenizer is not None:
        ids = tokenize(loaded.tokenizer, read_text(None, "heldout"))
        if ids.numel() >= 64:
            return ids[:64].reshape(2, 32)
    vocab = int(loaded.model.config.vocab_size)
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the export-onnx command."""
    p = sub.add_parser("export-onnx",
                       help="export a Quaff artifact to ONNX (int8 MatMulInteger) and check it in onnxruntime")
    p.add_argument("artifact", help="artifact folder from `quaff-fx transform`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18..23)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_export_onnx)
