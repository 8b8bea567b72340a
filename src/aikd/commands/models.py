"""``aikd models``: every registered architecture with its family, input, size and cost.

    aikd models
    aikd models --json

Each row: the input the model takes (size, colour order, normalisation, embedding size), its parameters and
GFLOPs per face (counted on the meta device: nothing is allocated). Forward speed on this machine:
``python bench/models.py``.
"""

from __future__ import annotations

import argparse
import json

from aikd.models import Preprocessing, QualityHead, list_models
from aikd.models.registry import describe

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd models``."""
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args: argparse.Namespace) -> int:
    """``aikd models``: print every registered architecture with its input, size and cost."""
    rows = [describe(name) for name in list_models()]
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<21} {'family':<9} {'input':<7} {'colour':<6} {'normalisation':<16} {'emb':>4} "
          f"{'params':>9} {'GFLOPs':>7}  description")
    for row in rows:
        preprocessing = Preprocessing.from_dict(row["preprocessing"])
        height, width = preprocessing.input_size
        params = f"{row['parameters'] / 1e6:.2f} M"
        print(f"{row['name']:<21} {row['family']:<9} {f'{height}x{width}':<7} {preprocessing.channel_order:<6} "
              f"{normalisation(preprocessing):<16} {preprocessing.embedding_size:>4} {params:>9} "
              f"{row['gflops']:>7.2f}  {row['description']}")
    head_params = sum(p.numel() for p in QualityHead().parameters())
    print(f"\nparams: backbone only (the quality head adds {head_params / 1e6:.2f} M); GFLOPs = 2 x the "
          "multiply-accumulates of convolutions, linear layers and attention per face (insightface's \"GFLOPs\" "
          "are the multiply-accumulates); faces are aligned to the ArcFace five-point template scaled to the input, "
          "except where a model records its own (dlib-r29); forward speed on this machine: python bench/models.py")
    return 0


def normalisation(preprocessing: Preprocessing) -> str:
    """The input arithmetic on 0..255 pixels, e.g. ``(x/255-0.5)/0.5`` or ``x/255``."""
    pairs = list(zip(preprocessing.mean, preprocessing.std, strict=True))
    if len(set(pairs)) > 1:
        return " ".join(f"(x/255-{m:g})/{s:g}" for m, s in pairs)
    mean, std = pairs[0]
    if mean == 0 and std == 1:
        return "x/255"
    return f"(x/255-{mean:g})/{std:g}"
