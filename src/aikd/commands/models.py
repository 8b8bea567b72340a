"""``aikd models``: every registered architecture with its blocks, width, size, cost and preprocessing.

    aikd models
    aikd models --json
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
    """``aikd models``: print every registered architecture with its size and cost."""
    rows = [describe(name) for name in list_models()]
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<10} {'blocks':<13} {'width':>5} {'params':>9} {'GMACs':>6} {'GFLOPs':>7}  description")
    for row in rows:
        blocks = "-".join(str(n) for n in row["blocks"])
        params = f"{row['parameters'] / 1e6:.2f} M"
        print(f"{row['name']:<10} {blocks:<13} {row['width']:>5} {params:>9} {row['gmacs']:>6.2f} "
              f"{row['gflops']:>7.2f}  {row['description']}")
    head_params = sum(p.numel() for p in QualityHead().parameters())
    print(f"\nparams: backbone only (the quality head adds {head_params / 1e6:.2f} M on a 512-D embedding); GMACs: "
          "multiply-accumulates per face at the model's input size (insightface's \"GFLOPs\"); GFLOPs = 2 x GMACs")
    for preprocessing in {Preprocessing.from_dict(row["preprocessing"]) for row in rows}:
        names = ", ".join(row["name"] for row in rows if row["preprocessing"] == preprocessing.to_dict())
        print(f"preprocessing ({names}): {_describe_preprocessing(preprocessing)}")
    return 0


def _describe_preprocessing(preprocessing: Preprocessing) -> str:
    height, width = preprocessing.input_size
    pairs = list(zip(preprocessing.mean, preprocessing.std, strict=True))
    scale = ", ".join(f"(x/255-{m:g})/{s:g}" for m, s in pairs)
    if len(set(pairs)) == 1:
        scale = f"(x/255-{preprocessing.mean[0]:g})/{preprocessing.std[0]:g} per channel"
    return (f"{height}x{width} {preprocessing.channel_order}, {scale}, "
            f"embedding {preprocessing.embedding_size}")
