"""AI-KD training throughput: pairs per second of the ``aikd train`` step against a naive distillation step.

The naive step is what a straightforward AI-KD implementation does for every batch: the teacher embeds the
aligned faces, the student (every parameter trainable) embeds the misaligned ones and predicts their
quality, and backward runs through the whole student. The ``aikd train`` step (:meth:`Trainer.train_step`)
takes the teacher embeddings from the cache, trains only the head and the last 100 backbone tensors (so
backward stops early), runs channels-last, and uses bf16 autocast where the CPU has native bf16.

Both steps run in this process on the same batch, interleaved, after warm-up; the figures are medians.
Weights are random with calibrated BatchNorm (see NOTES.md); data loading is not timed.

    PYTHONPATH=src python bench/train.py                      # iResNet-50, batch 8
    PYTHONPATH=src python bench/train.py --arch r100 --batch 16 --repeats 7

The last line printed is one JSON object with keys ``arch``, ``batch``, ``pairs_per_s``,
``naive_pairs_per_s``, ``ratio`` and ``peak_rss_mb`` (and the settings used).
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
from aikd.distill import teacher_embeddings
from aikd.models import QualityHead, QualityModel
from aikd.runtime import cpu_has_bf16, describe_cpu
from aikd.train import TrainConfig, Trainer


def make_trainer(arch: str, batch: int, trainable: str, amp: str, run_dir: Path) -> Trainer:
    """An ``aikd train`` trainer on synthetic faces with a random, BatchNorm-calibrated ``arch`` teacher."""
    overrides = [f"student.arch={arch}", f"student.trainable_tensors={trainable}", f"train.amp={amp}",
                 f"data.batch_size={batch}", f"data.synthetic.count={batch * 4}", "data.val_fraction=0.25",
                 "teacher.weights=none", "data.source=synthetic", "data.workers=0", "optim.pretrain_fraction=0"]
    config = load_config(TrainConfig, None, overrides)
    return Trainer(config, run_dir)


def naive_step_fn(trainer: Trainer, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A straightforward step: teacher forward, whole student trainable, float32, contiguous layout."""
    teacher = copy.deepcopy(trainer.task.teacher).to(memory_format=torch.contiguous_format).eval()
    backbone = copy.deepcopy(trainer.task.student.feature_extractor).to(memory_format=torch.contiguous_format)
    head = QualityHead(trainer.task.student.quality_head.in_features)
    student = QualityModel(backbone, head).train()
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name != "feature_extractor.features.weight")  # frozen in insightface itself
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
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
        naive = naive_step_fn(trainer, with_aligned)
        trainer.task.train()

        def ours() -> None:
            trainer.train_step(cached)

        for _ in range(args.warmup):
            naive()
            ours()
        naive_times, our_times = [], []
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            naive_times.append(seconds(naive))
            our_times.append(seconds(ours))
            print(f"naive {naive_times[-1]:.2f} s, aikd {our_times[-1]:.2f} s", flush=True)
    naive_rate = args.batch / statistics.median(naive_times)
    rate = args.batch / statistics.median(our_times)
    result = {"arch": args.arch, "batch": args.batch, "pairs_per_s": round(rate, 3),
              "naive_pairs_per_s": round(naive_rate, 3), "ratio": round(rate / naive_rate, 3),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "trainable_tensors": args.trainable, "amp": str(trainer.amp_dtype or "off"),
              "channels_last": True, "teacher_cache": True, "threads": torch.get_num_threads(),
              "cpu_native_bf16": cpu_has_bf16()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
