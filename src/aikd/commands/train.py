"""``aikd train``: distil a FIQA technique into an alignment-invariant quality model (AI-KD).

    aikd train --config configs/aikd_r100.yaml --out runs/r100 data.images=/data/vggface2 ...
    torchrun --standalone --nproc_per_node=4 -m aikd train --config configs/aikd_r100.yaml --out runs/r100
    aikd train --resume runs/r100            # continues exactly where the last checkpoint left off
    aikd train --help-config                 # every key, its type, default and meaning

The loop, its configuration and its outputs: :mod:`aikd.training.train`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aikd.commands.options import count
from aikd.config import describe_config, load_config
from aikd.runtime import distributed
from aikd.training.train import TrainConfig, TrainingDiverged, clear_run, train

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd train``."""
    parser.add_argument("--config", help="YAML config (e.g. configs/aikd_r100.yaml, configs/tiny.yaml)")
    parser.add_argument("--out", help="run folder: config.yaml, metrics, best.pt, last.pt")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt "
                                                            "(its config.yaml, updated by any key=value)")
    parser.add_argument("--stop-after", type=count(1, 10**9), metavar="STEPS",
                        help="stop with a checkpoint after this many steps in all (continue with --resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the run in --out over: its checkpoints, metrics and config are replaced (the "
                             "teacher cache, keyed by teacher and faces, is kept)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.head_lr=0.01")


def run(args: argparse.Namespace) -> int:
    """``aikd train``."""
    if args.help_config:
        print("\n".join(describe_config(TrainConfig)))
        return 0
    if args.resume:
        if args.config or (args.out and Path(args.out) != Path(args.resume)):
            raise ValueError("--resume RUN_DIR continues a run with its own config.yaml; leave out --config/--out")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ValueError(f"--resume: {run_dir} holds no run (no config.yaml)")
        config = load_config(TrainConfig, run_dir / "config.yaml", args.overrides)
    else:
        if not args.config or not args.out:
            raise ValueError("give --config CONFIG.yaml and --out RUN_DIR (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        config = load_config(TrainConfig, args.config, args.overrides)
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after: expected a positive number of steps, got {args.stop_after}")
    config.check_ready()  # before joining a torchrun job: a bad key fails at once on every rank
    if args.overwrite:
        if args.resume:
            raise ValueError("--resume and --overwrite contradict each other; pass one")
        clear_run(run_dir)
    try:
        with distributed(config.train.device, "train.device") as dist:
            result = train(config, run_dir, resume=bool(args.resume), stop_after=args.stop_after, dist=dist)
    except TrainingDiverged as err:
        print(f"aikd train: error: {err}", file=sys.stderr)
        return 1
    if result.rank != 0:
        return 0
    if result.status == "stopped":
        print(f"aikd train: stopped after step {result.step} of {result.total_steps}; continue with "
              f"aikd train --resume {run_dir}", file=sys.stderr)
    elif result.best is not None:
        weights = "EMA" if config.train.ema == "running" else "student"
        print(f"aikd train: done, {result.step} steps; best.pt from step {result.best['step']} ({weights} weights), "
              f"validation quality loss {result.best['quality_loss_aligned']:.4f} aligned / "
              f"{result.best['quality_loss_misaligned']:.4f} misaligned", file=sys.stderr)
    if result.nonfinite_steps:
        print(f"aikd train: warning: {result.nonfinite_steps} step(s) had a non-finite loss or gradients and were "
              "skipped (metrics.jsonl: nonfinite_steps)", file=sys.stderr)
    return 0
