"""``aikd export``: a quality model as ONNX (with its preprocessing in the metadata), checked against torch.

    aikd export --checkpoint runs/r100/best.pt -o aikd.onnx
    aikd score faces/ --checkpoint aikd.onnx -o scores.csv      # onnxruntime, preprocessing from the file

See :mod:`aikd.export` for the graph, the metadata and the parity check.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from aikd.export import OPSET, check_onnx, export_onnx, relative_difference
from aikd.io import atomic_write

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd export``."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="quality model checkpoint (aikd or paper)")
    parser.add_argument("--arch", help="backbone architecture when the checkpoint does not record it (e.g. r100)")
    parser.add_argument("-o", "--output", type=Path, default=Path("aikd.onnx"), help="ONNX file (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version (default: %(default)s)")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="export the plain graph with its BatchNorm nodes instead of the folded one")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest acceptable |quality(onnx) - quality(torch)| / max(1, max |quality(torch)|): "
                             "absolute for qualities in [0, 1], relative for larger ones (default: %(default)s)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the onnx.checker and onnxruntime parity check")


def run(args: argparse.Namespace) -> int:
    """``aikd export``: write the ONNX file, check it, print the parity; 1 if parity exceeds the tolerance."""
    from aikd.models import load_quality_model

    model = load_quality_model(args.checkpoint, arch=args.arch)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ValueError("aikd export needs the onnx package (pip install 'aikd[onnx]')") from None
    buffer = io.BytesIO()
    export_onnx(model, buffer, fold=args.fold, opset=args.opset)
    data = buffer.getvalue()
    if args.check:
        worst = check_onnx(model, data)
        difference = relative_difference(worst, "quality")
        print(f"parity with torch (fp32, random faces): max |quality diff| {worst['quality']:.3g} "
              f"(qualities up to {worst['quality_scale']:.3g}; {difference:.3g} of max(1, that)), "
              f"max |embedding diff| {worst['embedding']:.3g}", file=sys.stderr)
        if not difference <= args.tolerance:
            print(f"aikd export: error: quality differs by {worst['quality']:.3g}, {difference:.3g} relative to "
                  f"max(1, max |quality| = {worst['quality_scale']:.3g}) > --tolerance {args.tolerance}; "
                  f"{args.output} not written", file=sys.stderr)
            return 1
    with atomic_write(args.output, "wb") as handle:
        handle.write(data)
    print(f"wrote {args.output} ({len(data) / 1e6:.1f} MB, opset {args.opset}, inputs image[N,3,"
          f"{model.preprocessing.input_size[0]},{model.preprocessing.input_size[1]}] -> embedding, quality)",
          file=sys.stderr)
    return 0
