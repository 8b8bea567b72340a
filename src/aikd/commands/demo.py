"""``aikd demo``: AI-KD on a real face-recognition model and real faces, end to end, with pictures.

    aikd demo --out demo_out            # writes demo_out/report.md (its time: docs/demo.md)

What it runs: :mod:`aikd.demo.run` (the library function :func:`~aikd.demo.run.run_demo`); this module parses the
command line and prints the headline figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aikd.commands.options import SEED, count
from aikd.demo.run import DEFAULT_FACES, MISALIGN

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd demo``."""
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: %(default)s)")
    parser.add_argument("--faces", type=count(2, 100), default=DEFAULT_FACES,
                        help="low-resolution LFW faces (scikit-image lfw_subset) besides the two sample photos; "
                             "half train, half are held out (default: %(default)s)")
    parser.add_argument("--epochs", type=count(1, 1000), default=None,
                        help="training epochs of the student (default: as configs/demo_dlib.yaml)")
    parser.add_argument("--misalign", type=float, default=MISALIGN, metavar="P",
                        help="landmark jitter U[-P, P] px of the student's training faces and of the held-out "
                             "faces' misaligned view (default: %(default)s, the paper's)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the split, degradations and training "
                                                            "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="empty an existing demo output folder first (refused for any other folder)")
    parser.add_argument("--compare", action="store_true",
                        help="afterwards, every FIQA technique that needs no download side by side on dlib-r29 "
                             "(aligned, misaligned, MTCNN-aligned), and the best one distilled: OUT/compare/ "
                             "(minutes more)")


def run(args: argparse.Namespace) -> int:
    """Run the demo; print where the report is and its headline figures."""
    from aikd.demo.run import DemoOptions, run_demo

    options = DemoOptions(args.out, args.faces, args.epochs, args.misalign, args.seed, args.overwrite, args.compare)
    summary = run_demo(options)
    print(f"\nreport: {options.out / 'report.md'} ({summary['seconds']:.0f} s)")
    for name in ("AI-KD", "certainty", "random"):
        print(f"  {name:<10} Spearman vs degradation {summary['spearman'][name]:+.3f}   "
              f"ERC pAUC (normalised, 30 %) {summary['pauc_normalised'][name]:.3f}")
    if args.compare:
        print(f"comparison of every technique: {options.out / 'compare' / 'comparison.md'}")
    return 0
