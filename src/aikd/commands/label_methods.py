"""The per-technique options of ``aikd label`` (a helper of :mod:`aikd.commands.label`, not a command).

Every technique's settings are a typed dataclass (``Labeler.Options``, :mod:`aikd.labelers`): ``--option KEY=VALUE``
(repeatable) sets any of its fields, checked against them (an unknown key gets the closest known one, a bad value
its type). The dedicated flags of the first techniques (``--passes``, ``--include-self``, ``--labels`` ...) still
work and mean the same fields; a key set both ways to different values is an error, and a flag of another technique
is ignored (as it always was) with a note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aikd.pipeline.labelling import LabelOptions

__all__ = ["add_method_arguments", "label_options"]

# Dedicated flags -> the settings field each sets, per technique.
FLAGS = {"serfiq": {"passes": "passes", "dropout": "dropout", "rescale": "rescale", "rescale_alpha": "alpha",
                    "rescale_r": "r"},
         "certainty": {"include_self": "include_self"},
         "import": {"labels": "labels", "labels_column": "column", "normalise": "normalise"}}


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """``--option`` and the dedicated flags of serfiq, certainty and import."""
    group = parser.add_argument_group("technique settings")
    group.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a setting of --method (repeatable), e.g. faceqan: epsilon, iterations, copies, exponent, "
                            "images_per_pass, fold; grafiqs: variant (image, block1..block4); sddfiqa: rounds, pairs; "
                            "serfiq: passes, dropout, rescale, alpha, r; certainty: include_self, epsilon "
                            "(docs/fiqa.md lists them with the authors' defaults)")
    group.add_argument("--identity-column", metavar="COL",
                       help="certainty, sddfiqa: identities from column COL of the CSV list(s) given as INPUT "
                            "(default: the parent folder of each image)")
    serfiq = parser.add_argument_group("serfiq (also --option passes=T ...)")
    serfiq.add_argument("--passes", type=int, metavar="T", help="stochastic forward passes per image (default: 100)")
    serfiq.add_argument("--dropout", type=float, metavar="P",
                        help="dropout probability before the embedding layer (default: 0.5)")
    serfiq.add_argument("--rescale", action="store_true", default=None,
                        help="quality = sigmoid(alpha * (q - r)), the authors' stretch of ArcFace's narrow range")
    serfiq.add_argument("--rescale-alpha", type=float, metavar="ALPHA", help="alpha of --rescale (default: 130)")
    serfiq.add_argument("--rescale-r", type=float, metavar="R", help="r of --rescale (default: 0.88)")
    parser.add_argument_group("certainty").add_argument(
        "--include-self", action="store_true", default=None,
        help="count each image in its own identity centre (default: leave it out)")
    imported = parser.add_argument_group("import")
    imported.add_argument("--labels", type=Path, metavar="FILE",
                          help="labels to import: CSV with a path column, or the official pickle {name: score}")
    imported.add_argument("--labels-column", default="quality", metavar="COL",
                          help="label column of a CSV labels file (default: %(default)s)")
    imported.add_argument("--normalise", choices=("none", "minmax", "rank"), default="none",
                          help="none; minmax: (q-min)/(max-min); rank: tie-averaged rank/(N-1) (default: none)")


def label_options(args: argparse.Namespace) -> LabelOptions:
    """The :class:`~aikd.pipeline.labelling.LabelOptions` of the command line."""
    from aikd.labelers import method_options
    from aikd.pipeline.labelling import LabelOptions, identities_from_lists

    method = args.method
    given = {field: getattr(args, flag) for flag, field in FLAGS.get(method, {}).items()}
    unused = [f"--{flag.replace('_', '-')}" for name, flags in FLAGS.items() if name != method for flag in flags
              if getattr(args, flag) not in (None, "quality", "none")]
    if unused:  # ignored, as they always were; said so
        print(f"note: {', '.join(unused)} is a setting of another technique; --method {method} ignores it",
              file=sys.stderr)
    identities = None
    if args.identity_column:
        if method not in ("certainty", "sddfiqa"):
            raise ValueError(f"--identity-column is for --method certainty or sddfiqa, not {method}")
        identities = identities_from_lists(args.inputs, args.identity_column)
    if method == "import" and args.labels is None:
        settings = None
    else:
        settings = method_options(method, args.option, given, defaults={"seed": args.seed})
    named = {"serfiq": "serfiq", "certainty": "certainty", "import": "imported"}.get(method, "settings")
    return LabelOptions(method, args.weights, args.arch, args.seed, args.batch_size, identities=identities,
                        **{named: settings})
