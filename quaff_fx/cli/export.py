"""quaff-fx export-onnx."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import QuaffError
from .common import check_out


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export an artifact to ONNX, then check it in onnxruntime against PyTorch."""
    import torch

    from ..io import read_manifest
    from ..onnx_export import check_opset, export_onnx, onnx_logits
    from ..transform import load_quantized

    path = Path(args.artifact)
    if not path.is_dir() or not (path / "quaff.json").is_file():
        raise QuaffError(f"{args.artifact!r} is not a quaff-fx artifact folder (no quaff.json); run `quaff-fx transform --out DIR` first")
    read_manifest(path)
    check_opset(args.opset)
    check_out(args.out, args.force)
    loaded, _ = load_quantized(path)
    out = export_onnx(loaded.model, args.out, args.opset, force=args.force)
    ids = torch.randint(0, int(loaded.model.config.vocab_size), (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
    got = onnx_logits(out, ids)
    result = {"out": str(out), "bytes": out.stat().st_size, "opset": args.opset,
              "max_abs_diff_vs_pytorch": float((got - ref).abs().max()), "logits_max_abs": float(ref.abs().max())}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"wrote {out} ({result['bytes'] / 2**20:.1f} MiB, opset {args.opset}); passes onnx.checker (full); "
              f"onnxruntime vs PyTorch logits: max |diff| {result['max_abs_diff_vs_pytorch']:.3g} (logits up to {result['logits_max_abs']:.3g})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the export-onnx commands."""
    p = sub.add_parser("export-onnx", help="export a Quaff artifact to ONNX (int8 MatMulInteger) and check it in onnxruntime")
    p.add_argument("artifact", help="artifact folder from `quaff-fx transform`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export_onnx)
