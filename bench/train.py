"""AI-KD training throughput: pairs per second of the ``aikd train`` step against the paper-shaped step.

The paper-shaped step is what the AI-KD paper's code does for every batch: the teacher embeds the aligned
faces, the student embeds the misaligned ones and predicts their quality, backward computes gradients for every
backbone tensor (all require grad there) and SGD updates the head and the last 100 tensors, float32, contiguous
layout. aikd's step (:meth:`Trainer.train_step`) trains only the head and the last 100 backbone tensors (so
backward stops early), runs channels-last, and uses bf16 autocast where the CPU has native bf16. It is timed
twice:

- ``first_epoch``: the teacher runs for the batch, as in the paper's schedule (one epoch: every batch is new);
- ``cached``: the teacher embeddings come from the cache, as in later epochs and resumed runs.

All steps run in this process on the same batch, interleaved, after warm-up; the figures are medians.
Weights are random with calibrated BatchNorm (see NOTES.md); data loading is not timed.

    PYTHONPATH=src python bench/train.py                      # iResNet-50, batch 8
    PYTHONPATH=src python bench/train.py --arch r100 --batch 16 --repeats 7

The last line printed is one JSON object with keys ``arch``, ``batch``, ``paper_pairs_per_s``,
``first_epoch_pairs_per_s``, ``first_epoch_ratio``, ``cached_pairs_per_s``, ``cached_ratio`` (ratios against the
paper-shaped step) and ``peak_rss_mb`` (and the settings used).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from aikd.config import load_config
from aikd.models import QualityHead, QualityModel
from aikd.runtime import cpu_has_bf16, describe_cpu
from aikd.training.distill import teacher_embeddings
from aikd.training.train import TrainConfig, Trainer


def make_trainer(arch: str, batch: int, trainable: str, amp: str, run_dir: Path) -> Trainer:
    """An ``aikd train`` trainer on synthetic faces with a random, BatchNorm-calibrated ``arch`` teacher."""
    overrides = [f"student.arch={arch}", f"student.trainable_tensors={trainable}", f"train.amp={amp}",
                 f"data.batch_size={batch}", f"data.synthetic.count={batch * 4}", "data.val_fraction=0.25",
                 "teacher.weights=none", "data.source=synthetic", "data.workers=0", "optim.pretrain_fraction=0"]
    config = load_config(TrainConfig, None, overrides)
    return Trainer(config, run_dir)


def paper_step_fn(trainer: Trainer, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The paper's step: teacher forward, gradients for the whole student, SGD on the head and the last 100
    backbone tensors, float32, contiguous layout."""
    teacher = copy.deepcopy(trainer.task.teacher).to(memory_format=torch.contiguous_format).eval()
    backbone = copy.deepcopy(trainer.task.student.feature_extractor).to(memory_format=torch.contiguous_format)
    head = QualityHead(trainer.task.student.quality_head.in_features)
    student = QualityModel(backbone, head).train()
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name != "feature_extractor.features.weight")  # frozen in insightface itself
    updated = [*head.parameters(), *list(backbone.parameters())[-100:]]
    optimizer = torch.optim.SGD([p for p in updated if p.requires_grad], lr=1e-4, momentum=0.9)
    aligned, misaligned, quality = batch["aligned"], batch["misaligned"], batch["quality"]

    def step() -> None:
        with torch.no_grad():
            target = teacher(aligned)
        embedding, predicted = student(misaligned)
        loss = F.smooth_l1_loss(predicted, quality, beta=0.5) + (1 - F.cosine_similarity(embedding, target)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def cached_batch(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The first training batch with aligned faces, and again once its teacher embeddings are cached."""
    first = next(iter(trainer._train_loader(0, 0)))
    teacher_embeddings(trainer.task, first, trainer.dist.device, trainer.cache, trainer.memory_format)
    again = next(iter(trainer._train_loader(0, 0)))  # the loader now skips the cached aligned views
    assert again["aligned"].shape[0] == 0
    return first, again


def seconds(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r50", help="backbone architecture (default r50)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--trainable", default="100", help="trainable backbone tensors of the aikd step")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"], help="autocast of the aikd step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each kind (median)")
    args = parser.parse_args()
    print(f"cpu: {describe_cpu()}", flush=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        trainer = make_trainer(args.arch, args.batch, args.trainable, args.amp, Path(folder))
        with_aligned, cached = cached_batch(trainer)
        paper = paper_step_fn(trainer, with_aligned)
        trainer.task.train()
        cache = trainer.cache

        def first_epoch() -> None:  # no cache: the teacher embeds the aligned faces, as for every new batch
            trainer.cache = None
            try:
                trainer.train_step(with_aligned)
            finally:
                trainer.cache = cache

        def with_cache() -> None:
            trainer.train_step(cached)

        steps = {"paper": paper, "first_epoch": first_epoch, "cached": with_cache}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for name, step in steps.items():
                times[name].append(seconds(step))
            print(", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items()), flush=True)
    rates = {name: args.batch / statistics.median(t) for name, t in times.items()}
    ratios = {name: statistics.median(p / o for p, o in zip(times["paper"], t, strict=True))
              for name, t in times.items()}
    result = {"arch": args.arch, "batch": args.batch, "paper_pairs_per_s": round(rates["paper"], 3),
              "first_epoch_pairs_per_s": round(rates["first_epoch"], 3),
              "first_epoch_ratio": round(ratios["first_epoch"], 3),
              "cached_pairs_per_s": round(rates["cached"], 3), "cached_ratio": round(ratios["cached"], 3),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "trainable_tensors": args.trainable, "amp": str(trainer.amp_dtype or "off"),
              "channels_last": True, "threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_bf16()}
    print(json.dumps(result))

if __name__ == "__main__":
    main()
