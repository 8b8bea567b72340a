"""``aikd calibrate``: relate quality scores to the FNMR a face recogniser is expected to have -> ``calib.json``.

    aikd calibrate --scores scores.csv --embeddings emb.npz --pairs pairs.txt --fmr 1e-3 -o calib.json
    aikd calibrate --scores scores.csv --embeddings emb.npz --pairs pairs.txt --target-fnmr 0.01 -o calib.json
    aikd calibrate --scores scores.csv --embeddings emb.npz --pairs pairs.txt --checkpoint best.pt \\
        -o best_calibrated.pt                       # the checkpoint carries its calibration (and its ONNX export)
    aikd score faces/ --checkpoint best.pt --calibration calib.json -o scores.csv   # + expected_fnmr, quality_100

The evaluation set is read as ``aikd evaluate`` reads it (any protocol). The method, the file format and what
``quality_100`` means (a 0-100 scale specific to this calibration set): :mod:`aikd.evaluation.calibration`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aikd.commands.options import SEED, count
from aikd.evaluation import calibration as cal
from aikd.evaluation import metrics as ev
from aikd.evaluation import protocols, report
from aikd.pipeline.outputs import claimed_files

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aikd calibrate``."""
    data = parser.add_argument_group("calibration set (read as aikd evaluate reads it)")
    data.add_argument("--scores", type=Path, metavar="CSV", help="quality scores of the set (aikd score's file)")
    data.add_argument("--embeddings", type=Path, metavar="NPZ", help="the FR model's embeddings of the set (.npz)")
    data.add_argument("--pairs", type=Path, metavar="FILE",
                      help="protocol file; may be left out with --protocol identity (identity = parent folder)")
    data.add_argument("--protocol", choices=protocols.PROTOCOLS, default="auto",
                      help="protocol file format (default: guessed from the file)")
    data.add_argument("--lfw-pattern", default=protocols.LFW_PATTERN,
                      help="image name in LFW-style pairs, fields {name} and {n} (default: %(default)s)")
    data.add_argument("--identity-column", default="identity", help="identity column of an identity CSV")
    data.add_argument("--skip-bad-pairs", action="store_true",
                      help="skip bad protocol lines and unknown images (reported on stderr); default: fail")
    data.add_argument("--dataset", help="dataset name recorded (default: from the pairs file name)")
    data.add_argument("--fr-model", help="FR model name recorded (default: embeddings file stem)")
    fit = parser.add_argument_group("fit")
    fit.add_argument("--fmr", type=float, default=ev.DEFAULT_FMR,
                     help="target FMR of the fixed threshold (default: %(default)g); the set needs at least "
                          "10/FMR non-mated comparisons")
    fit.add_argument("--bootstrap", type=count(0, 100_000), default=cal.DEFAULT_BOOTSTRAP,
                     help="bootstrap replicates over identities for the band (default: %(default)s; 0: none)")
    fit.add_argument("--confidence", type=float, default=cal.DEFAULT_CONFIDENCE,
                     help="level of the band and intervals (default: %(default)s)")
    fit.add_argument("--seed", type=SEED, default=0, help="seed of the bootstrap and the held-out split")
    fit.add_argument("--holdout", type=float, default=cal.DEFAULT_HOLDOUT,
                     help="share of identities held out for the reliability diagram (default: %(default)s)")
    fit.add_argument("--bins", type=count(1, 10_000), default=cal.DEFAULT_BINS,
                     help="quantile bins of the reliability diagram (default: %(default)s)")
    fit.add_argument("--target-fnmr", type=float, metavar="F",
                     help="recommend the reject threshold whose kept mated comparisons reach FNMR F at the FMR")
    out = parser.add_argument_group("outputs")
    out.add_argument("--calibration", type=Path, metavar="JSON",
                     help="an existing calibration to put into --checkpoint (instead of fitting one)")
    out.add_argument("--checkpoint", type=Path,
                     help="quality model checkpoint: write it with the calibration to -o (e.g. best_calibrated.pt)")
    out.add_argument("--arch", help="backbone architecture when the checkpoint does not record it")
    out.add_argument("--plot", type=Path, metavar="DIR",
                     help="folder of the reliability plot (PNG and SVG; default: beside -o)")
    out.add_argument("--no-plots", action="store_true", help="write no plot")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output (and plots)")
    out.add_argument("--force", action="store_true",
                     help="attach a calibration fitted on another quality model's scores to --checkpoint anyway "
                          "(refused without it; recorded in the file, and every use of it warns)")
    out.add_argument("-o", "--output", type=Path, required=True,
                     help="calibration file (calib.json), or with --checkpoint the calibrated checkpoint. "
                          "expected_fnmr and quality_100 are specific to this FR model, FMR and set")


def _options(args: argparse.Namespace) -> cal.CalibrationOptions:
    return cal.CalibrationOptions(fmr=args.fmr, bootstrap=args.bootstrap, seed=args.seed,
                                  confidence=args.confidence, holdout=args.holdout, bins=args.bins,
                                  target_fnmr=args.target_fnmr)


def _check_usage(args: argparse.Namespace) -> None:
    if args.calibration is not None:
        if args.checkpoint is None:
            raise ValueError("--calibration puts an existing calibration into a checkpoint: give --checkpoint")
        if args.scores or args.embeddings or args.pairs or args.target_fnmr is not None:
            raise ValueError("--calibration is used as it is: leave out --scores, --embeddings, --pairs and "
                             "--target-fnmr (or fit a new one without --calibration)")
        return
    if args.scores is None or args.embeddings is None:
        raise ValueError("--scores and --embeddings are required (or give --calibration with --checkpoint)")
    if args.pairs is None and args.protocol != "identity":
        raise ValueError("--pairs is required, except with --protocol identity (all embedded images)")


def _fit(args: argparse.Namespace, options: cal.CalibrationOptions) -> cal.Calibration:
    dataset = args.dataset or report.dataset_name(args.pairs, args.embeddings)
    fr_model = args.fr_model or args.embeddings.stem
    job = report.Job(fr_model, dataset, args.embeddings, args.pairs, {"quality": args.scores}, args.protocol,
                     args.lfw_pattern, args.identity_column)
    loaded = report.read_job(job, strict=not args.skip_bad_pairs)
    data = cal.calibration_set(loaded, "quality", options.fmr)
    info = {"fr_model": {"name": fr_model, "fingerprint": cal.run_record(args.embeddings).get("model"),
                         "embeddings": str(args.embeddings)},
            "dataset": dataset,
            "quality_model": _quality_model(args.scores)}
    return cal.calibrate(data, options, info)


def _quality_model(scores: Path) -> dict[str, str | None]:
    """Which quality model gave ``scores`` (its run record): the model's fingerprint and, for an exported graph,
    that of the torch weights it came from."""
    record = cal.run_record(scores)
    info = {"fingerprint": record.get("model"), "scores": str(scores)}
    if record.get("weights"):
        info["weights_fingerprint"] = record["weights"]
    return info


def _write_checkpoint(checkpoint: Path, arch: str | None, calibration: cal.Calibration, output: Path,
                      force: bool = False) -> None:
    """``checkpoint`` written to ``output`` carrying ``calibration``; refused when the calibration was fitted on
    another quality model's scores, unless ``force`` (then the file records that it was forced)."""
    from aikd.models import load_quality_model, read_checkpoint, save_checkpoint, weights_fingerprint

    model = load_quality_model(checkpoint, arch=arch)
    fingerprint = weights_fingerprint(model)
    if not cal.same_quality_model(calibration, [fingerprint]):
        if not force:
            raise ValueError(f"the calibration was fitted on scores of another quality model "
                             f"({calibration.quality_model_fingerprint}) than {checkpoint} ({fingerprint}): its "
                             "expected FNMR would not hold for this model's scores; calibrate this model, or pass "
                             "--force to attach it anyway (recorded in the file)")
        calibration = cal.forced(calibration, fingerprint)
    _, meta = read_checkpoint(checkpoint)
    extra = {**meta.get("extra", {}), "calibration": calibration.to_dict()}
    save_checkpoint(output, model, model.arch, model.preprocessing, extra)


def run(args: argparse.Namespace) -> int:
    """Fit (or take) a calibration, write it (or the calibrated checkpoint) and the reliability plot."""
    options = _options(args)
    _check_usage(args)
    output: Path = args.output
    inputs = [p for p in (args.scores, args.embeddings, args.pairs, args.calibration, args.checkpoint) if p]
    stem = (args.plot if args.plot is not None else output.parent) / f"{output.stem}.reliability"
    plots = [] if args.no_plots else [("--plot", stem.with_suffix(f"{stem.suffix}.{kind}")) for kind in ("png", "svg")]
    with claimed_files([("-o", output), *plots], args.overwrite, inputs):
        calibration = cal.load_calibration(args.calibration) if args.calibration else _fit(args, options)
        if args.checkpoint is not None:
            _write_checkpoint(args.checkpoint, args.arch, calibration, output, args.force)
        else:
            calibration.save(output)
        written = [output]
        if plots:
            written += cal.plot_reliability(calibration, stem)
    print(cal.summary(calibration))
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
