"""``aikd export``: a quality model as ONNX (with its preprocessing in the metadata), checked against torch.

    aikd export --checkpoint runs/r100/best.pt -o aikd.onnx
    aikd score faces/ --checkpoint aikd.onnx -o scores.csv      # onnxruntime, preprocessing from the file
    aikd export --checkpoint runs/r100/best.pt --int8 --calibration-images aligned/ -o aikd.int8.onnx
    aikd export --checkpoint aikd.onnx --int8 --calibration-images aligned/ -o aikd.int8.onnx   # from an export

The graph and its parity check: :mod:`aikd.inference.export`; its metadata: :mod:`aikd.inference.onnx_format`;
int8: :mod:`aikd.inference.quantize`.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from aikd.inference.export import check_onnx, export_onnx, relative_difference
from aikd.inference.onnx_format import OPSET
from aikd.inference.quantize import CALIBRATION_METHODS, MIN_FACES, SPEARMAN_BAR
from aikd.io import atomic_write
from aikd.pipeline.outputs import claimed_files

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd export``."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="quality model checkpoint (aikd or paper)")
    parser.add_argument("--arch", help="backbone architecture when the checkpoint does not record it (e.g. r100)")
    parser.add_argument("-o", "--output", type=Path, default=Path("aikd.onnx"), help="ONNX file (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="export the plain graph with its BatchNorm nodes instead of the folded one")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest acceptable |quality(onnx) - quality(torch)| / max(1, max |quality(torch)|): "
                             "absolute for qualities in [0, 1], relative for larger ones (default: %(default)s)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the onnx.checker and onnxruntime parity check")
    group = parser.add_argument_group("int8 (static quantisation with onnxruntime; see aikd.inference.quantize)")
    group.add_argument("--int8", action="store_true",
                       help="write an int8 graph, calibrated on --calibration-images; --checkpoint may then also "
                            "be an fp32 ONNX file from aikd export")
    group.add_argument("--calibration-images", type=Path, metavar="DIR",
                       help=f"face crops aligned for the model (aikd align writes them), at least {MIN_FACES}, "
                            "a few hundred of varied quality best; a quarter is held out to measure agreement")
    group.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="percentile",
                       help="how activation ranges are read off the calibration faces (default: %(default)s)")
    group.add_argument("--min-spearman", type=float, default=SPEARMAN_BAR,
                       help="warn (here and whenever the file is used) when the int8 qualities rank the held-out "
                            "faces with a Spearman correlation against fp32 below this (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """``aikd export``: write the ONNX file, check it, print the parity; 1 if parity exceeds the tolerance."""
    _check_int8_arguments(args)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ValueError("aikd export needs the onnx package (pip install 'aikd[onnx]')") from None
    inputs = [args.checkpoint, *(_images(args.calibration_images) if args.calibration_images else [])]
    with claimed_files([("-o", args.output)], args.overwrite, inputs):
        if args.checkpoint.suffix.lower() == ".onnx":
            data = _read_onnx(args.checkpoint)
        else:
            data = _export_checked(args)
            if data is None:
                return 1
        if args.int8:
            data = _quantise(data, args)
        with atomic_write(args.output, "wb") as handle:
            handle.write(data)
    import onnx

    from aikd.inference.onnx_format import metadata_from_properties

    proto = onnx.load_model_from_string(data)  # parsed once for both the metadata and the opset
    metadata = metadata_from_properties({e.key: e.value for e in proto.metadata_props}, str(args.output))
    height, width = metadata["preprocessing"].input_size
    opset = max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    print(f"wrote {args.output} ({len(data) / 1e6:.1f} MB, {metadata['precision']}, opset {opset}, inputs "
          f"image[N,3,{height},{width}] -> {', '.join(metadata['outputs'])})", file=sys.stderr)
    return 0


def _images(folder: Path) -> list[Path]:
    """The calibration images (an output must be none of them)."""
    from aikd.images import collect_inputs

    try:
        return [item.path for item in collect_inputs([folder])]
    except ValueError:
        return []  # no images: --int8 says so with its own message


def _check_int8_arguments(args: argparse.Namespace) -> None:
    if args.int8 and args.calibration_images is None:
        raise ValueError("--int8 needs --calibration-images DIR: aligned face crops to calibrate on")
    if not args.int8 and args.calibration_images is not None:
        raise ValueError("--calibration-images is for --int8; add --int8 or drop it")
    if args.checkpoint.suffix.lower() == ".onnx" and not args.int8:
        raise ValueError(f"--checkpoint {args.checkpoint}: already an ONNX file; --int8 quantises one, "
                         "otherwise export from a torch checkpoint")


def _read_onnx(path: Path) -> bytes:
    """An fp32 aikd export to quantise; refused (naming the file) when it is not one."""
    from aikd.inference.onnx_format import read_metadata

    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"--checkpoint {path}: cannot read ({err.strerror})") from None
    read_metadata(data, str(path))  # not ONNX, or not from aikd export: a ValueError naming the file
    return data


def _export_checked(args: argparse.Namespace) -> bytes | None:
    """The checkpoint as an fp32 graph, its parity with torch checked; ``None`` when parity fails."""
    from aikd.models import load_quality_model

    model = load_quality_model(args.checkpoint, arch=args.arch)
    buffer = io.BytesIO()
    export_onnx(model, buffer, fold=args.fold, opset=args.opset)
    data = buffer.getvalue()
    if not args.check:
        return data
    worst = check_onnx(model, data)
    difference = relative_difference(worst, "quality")
    print(f"parity with torch (fp32, random faces): max |quality diff| {worst['quality']:.3g} "
          f"(qualities up to {worst['quality_scale']:.3g}; {difference:.3g} of max(1, that)), "
          f"max |embedding diff| {worst['embedding']:.3g}", file=sys.stderr)
    if not difference <= args.tolerance:
        print(f"aikd export: error: quality differs by {worst['quality']:.3g}, {difference:.3g} relative to "
              f"max(1, max |quality| = {worst['quality_scale']:.3g}) > --tolerance {args.tolerance}; "
              f"{args.output} not written", file=sys.stderr)
        return None
    return data


def _quantise(data: bytes, args: argparse.Namespace) -> bytes:
    """The fp32 graph quantised to int8; prints the agreement, and a warning when it is below the bar."""
    from aikd.inference.quantize import QuantizeOptions, int8_warning, quantize_onnx
    from aikd.runtime import cpu_has_vnni

    options = QuantizeOptions(method=args.calibration_method, min_spearman=args.min_spearman)
    print(f"int8: calibrating on {args.calibration_images} ({options.method}) ...", file=sys.stderr, flush=True)
    result = quantize_onnx(data, args.calibration_images, options, source=str(args.checkpoint))
    print(f"int8 vs fp32: {result.agreement.summary()}; calibrated on {result.calibration_faces} faces",
          file=sys.stderr)
    from aikd.inference.onnx_format import read_metadata

    warning = int8_warning(read_metadata(result.graph), str(args.output))
    if warning:
        print(f"aikd export: warning: {warning}", file=sys.stderr)
    if not cpu_has_vnni():
        print("note: this CPU has no VNNI (8-bit dot products accumulated in 32 bits): int8 runs, with less gain "
              "than on CPUs that have it", file=sys.stderr)
    return result.graph
