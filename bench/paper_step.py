"""How much the paper's code shrinks its own training steps: the clipping factor of its gradient accumulation.

In the AI-KD paper's ``train_main.py`` the whole student backbone requires grad, but the optimiser holds only
the quality head and the last 100 backbone tensors. ``optimizer.zero_grad()`` therefore never clears the other
tensors' gradients, and ``GradScaler.unscale_(optimizer)`` never unscales them: they accumulate the *scaled*
gradient (x 128 at the start) of every step. ``clip_grad_norm_(student.parameters(), 5)`` then measures that
growing pile too, and scales every real update by ``min(1, 5 / ||all gradients||)``. aikd clips only the
trainable tensors, so its nominal learning rate is its real one; this script measures how far apart they are.

Both steps run on the same synthetic faces and random, BatchNorm-calibrated teacher, each on its own copy of
the student, through the same number of steps; the paper-shaped one reproduces the paper's step exactly
(loss scale 128 emulated in float32, the accumulation, the clip over all parameters, SGD on the optimiser's
tensors) and follows its own trajectory.

    PYTHONPATH=src python bench/paper_step.py                       # r100 (the paper's), batch 8, 200 steps
    PYTHONPATH=src python bench/paper_step.py --arch r50 --steps 300

Only backbones with more than 100 parameter tensors accumulate anything (r18 and the narrow test models train
all of theirs).

The last line printed is one JSON object: ``factors`` (the paper's clipping factor at chosen steps),
``median_factor``, ``aikd_median_factor`` and the settings used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from aikd.config import load_config
from aikd.runtime import describe_cpu
from aikd.training.distill import AIKDTask
from aikd.training.train import TrainConfig, Trainer

LOSS_SCALE = 128.0  # the paper's GradScaler(init_scale=128); it grows only after the pretrain part
CLIP = 5.0


def make_trainer(arch: str, batch: int, steps: int, run_dir: Path) -> Trainer:
    """An ``aikd train`` trainer on synthetic faces with a random, BatchNorm-calibrated ``arch`` teacher."""
    overrides = [f"student.arch={arch}", f"data.batch_size={batch}", f"data.synthetic.count={batch * (steps + 2)}",
                 "data.val_fraction=0.01", "teacher.weights=none", "data.source=synthetic", "data.workers=0",
                 "train.amp=off", "teacher.cache=false"]
    return Trainer(load_config(TrainConfig, None, overrides), run_dir)


def paper_clip_factors(trainer: Trainer, steps: int) -> list[float]:
    """The clipping factor ``min(1, 5 / ||gradients||)`` of each of ``steps`` paper-shaped steps."""
    import copy

    student = copy.deepcopy(trainer.student).train()
    head = list(student.quality_head.parameters())
    backbone = [p for p in student.feature_extractor.parameters() if p.requires_grad]
    optimised = {id(p) for p in head + backbone}
    for parameter in student.feature_extractor.parameters():  # the paper's student: all of it requires grad ...
        parameter.requires_grad_(parameter is not student.feature_extractor.features.weight)
    optim = trainer.config.optim
    optimizer = torch.optim.SGD([  # ... but its optimiser holds the head and the last 100 tensors only
        {"params": head, "lr": optim.head_lr, "momentum": optim.head_momentum, "weight_decay": optim.head_weight_decay},
        {"params": backbone, "lr": optim.backbone_lr, "momentum": optim.backbone_momentum}])
    old = trainer.task
    task = AIKDTask(student, old.teacher, old.loss, old.amp_dtype, old.frozen_bn, old.amp_regions)  # same teacher
    factors = []
    for batch in _batches(trainer, steps):
        teacher = task.teacher_embedding(batch["aligned"])
        terms = task(batch["misaligned"], batch["quality"], teacher)
        optimizer.zero_grad()  # clears the optimiser's tensors only, as in the paper
        (terms["loss"] * LOSS_SCALE).backward()
        with torch.no_grad():
            for parameter in student.parameters():  # GradScaler.unscale_(optimizer): the optimiser's tensors only
                if id(parameter) in optimised and parameter.grad is not None:
                    parameter.grad /= LOSS_SCALE
        norm = float(nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], CLIP))
        factors.append(min(1.0, CLIP / (norm + 1e-6)))
        optimizer.step()
    return factors


def aikd_clip_factors(trainer: Trainer, steps: int) -> list[float]:
    """The clipping factor of aikd's own steps (the trainable tensors only, unscaled)."""
    factors = []
    trainer.task.train()
    for batch in _batches(trainer, steps):
        teacher = trainer.task.teacher_embedding(batch["aligned"])
        terms = trainer.task(batch["misaligned"], batch["quality"], teacher)
        trainer.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        norm = float(nn.utils.clip_grad_norm_(trainer.trainable, CLIP))
        factors.append(min(1.0, CLIP / (norm + 1e-6)))
        trainer.optimizer.step()
    return factors


def _batches(trainer: Trainer, steps: int):
    trainer.train_set.skip_aligned = None
    taken = 0
    epoch = 0
    while taken < steps:
        for batch in trainer._train_loader(epoch, 0):
            if taken == steps:
                return
            yield batch
            taken += 1
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r100", help="student/teacher architecture (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="faces per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="steps of each kind (default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"cpu: {describe_cpu()}", flush=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        paper = paper_clip_factors(make_trainer(args.arch, args.batch, args.steps, Path(folder) / "p"), args.steps)
        ours = aikd_clip_factors(make_trainer(args.arch, args.batch, args.steps, Path(folder) / "a"), args.steps)
    marks = sorted({s for s in (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, args.steps) if s <= args.steps})
    for step in marks:
        print(f"step {step:4d}: paper-shaped clipping factor {paper[step - 1]:.2e}, aikd {ours[step - 1]:.3f}",
              file=sys.stderr)
    result = {"arch": args.arch, "batch": args.batch, "steps": args.steps, "loss_scale": LOSS_SCALE,
              "factors": {str(s): round(paper[s - 1], 8) for s in marks},
              "median_factor": statistics.median(paper), "aikd_median_factor": statistics.median(ours),
              "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
