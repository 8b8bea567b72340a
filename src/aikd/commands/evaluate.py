"""``aikd evaluate``: EDC/ERC curves, pAUC tables and plots for face image quality (FIQA) methods.

    aikd evaluate --scores aikd.csv crfiqa.csv --embeddings lfw_arcface.npz --pairs pairs.txt -o report/
    aikd evaluate --embeddings adience.npz --pairs adience.csv --protocol identity --oracle -o report/
    aikd evaluate --suite suite.yaml -o report/

The report, its outputs and the suite format: :mod:`aikd.evaluation.report`; the metrics:
:mod:`aikd.evaluation.metrics`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from aikd.commands.options import count
from aikd.evaluation import metrics as ev
from aikd.evaluation import protocols, report
from aikd.pipeline.outputs import check_new_file, claimed_files

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aikd evaluate``."""
    parser.add_argument("--scores", nargs="+", type=Path, metavar="CSV",
                        help="quality score files, one per FIQA method (CSV path,quality)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="method names (default: score file stems)")
    parser.add_argument("--embeddings", type=Path, metavar="NPZ", help="face-recognition embeddings (.npz)")
    parser.add_argument("--pairs", type=Path, metavar="FILE",
                        help="protocol file; may be left out with --protocol identity (all embedded images, "
                             "identity = parent folder)")
    parser.add_argument("--protocol", choices=protocols.PROTOCOLS, default="auto",
                        help="protocol file format (default: guessed from the file)")
    parser.add_argument("--lfw-pattern", default=protocols.LFW_PATTERN,
                        help="image name in LFW-style pairs, fields {name} and {n} (default: %(default)s)")
    parser.add_argument("--identity-column", default="identity", help="identity column of an identity CSV")
    parser.add_argument("--suite", type=Path, metavar="YAML",
                        help="several FR models and datasets (format: the aikd.evaluation.report module docstring)")
    parser.add_argument("--dataset", help="dataset name in outputs (default: from the pairs file name)")
    parser.add_argument("--fr-model", help="FR model name in outputs (default: embeddings file stem)")
    parser.add_argument("--fmr", nargs="+", type=float, metavar="FMR",
                        help=f"target false match rates (default: {ev.DEFAULT_FMR:g})")
    parser.add_argument("--discard-limit", nargs="+", type=float, metavar="D",
                        help=f"upper ends of the pAUC (default: {ev.DEFAULT_DISCARD_LIMIT:g})")
    parser.add_argument("--threshold", choices=("fixed", "recomputed", "both"),
                        help="threshold convention (default: both)")
    parser.add_argument("--oracle", action="store_true",
                        help="add the theoretical-best curve to the CSV files as a method (needs no scores)")
    parser.add_argument("--skip-bad-pairs", action="store_true",
                        help="skip bad protocol lines and unknown images (reported on stderr); default: fail")
    parser.add_argument("--max-points", type=count(2, 1_000_000), default=2000, help="most points per curve in erc.csv")
    parser.add_argument("--no-plots", action="store_true", help="write the CSV files and tables only")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace files of an earlier report in the folder")


def _job_from_args(args: argparse.Namespace) -> report.Job:
    if args.embeddings is None:
        raise ValueError("--embeddings is required (or give --suite)")
    if args.pairs is None and args.protocol != "identity":
        raise ValueError("--pairs is required, except with --protocol identity (all embedded images)")
    scores = list(args.scores or [])
    names = list(args.names) if args.names else [path.stem for path in scores]
    if len(names) != len(scores):
        raise ValueError(f"--names gives {len(names)} names for {len(scores)} score files")
    if len(set(names)) != len(names) or report.ORACLE in names:
        raise ValueError(f"method names must differ and not be {report.ORACLE!r}: {', '.join(names)}")
    dataset = args.dataset or report.dataset_name(args.pairs, args.embeddings)
    return report.Job(args.fr_model or args.embeddings.stem, dataset, args.embeddings, args.pairs,
               dict(zip(names, scores, strict=True)), args.protocol, args.lfw_pattern, args.identity_column)


def run(args: argparse.Namespace) -> int:
    """Evaluate, then write erc.csv, pauc.csv, plots and tables into ``args.output``."""
    if args.suite is not None:
        if args.scores or args.embeddings or args.pairs:
            raise ValueError("--suite lists the files itself; leave out --scores, --embeddings and --pairs")
        jobs, suite = report.load_suite(args.suite)
    else:
        jobs, suite = [_job_from_args(args)], {}
    settings = report.Settings.make(args.fmr, args.discard_limit, args.threshold, args.oracle,
                                    not args.skip_bad_pairs, suite)
    inputs = [path for job in jobs for path in (job.embeddings, job.pairs, *job.scores.values()) if path]
    rows, written = _write(jobs, settings, args, inputs + ([args.suite] if args.suite else []), suite.get("source"))
    print(report.summary(rows))
    print(f"wrote {len(written)} files to {args.output}", file=sys.stderr)
    return 0


def _write(jobs: list[report.Job], settings: report.Settings, args: argparse.Namespace, inputs: list[Path],
           sources: dict[str, str] | None) -> tuple[list[tuple], list[Path]]:
    """The report, written into a staging folder inside -o, then moved into place under the output policy: no
    file replaced without --overwrite, never one of the inputs (a score file named tables.md in -o included)."""
    output: Path = args.output
    if output.exists() and not output.is_dir():
        raise ValueError(f"-o {output} is a file; -o names the folder the report is written to")
    for name in ("erc.csv", "pauc.csv"):  # known before any work: refuse at once
        check_new_file(output / name, "-o", args.overwrite, inputs)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".aikd-evaluate-", dir=output) as staging:
        rows, staged = report.write_report(jobs, settings, Path(staging), args.max_points, plots=not args.no_plots,
                                           sources=sources)
        targets = [output / path.relative_to(staging) for path in staged]
        with claimed_files([("-o", target) for target in targets], args.overwrite, inputs):
            for source, target in zip(staged, targets, strict=True):
                os.replace(source, target)
    return rows, targets
