"""AI-KD training throughput: pairs per second of the ``aikd train`` step against the paper-shaped step.

The paper-shaped step is what the AI-KD paper's code does for every batch: the teacher embeds the aligned
faces, the student embeds the misaligned ones and predicts their quality, backward computes gradients for every
backbone tensor (all require grad there) and SGD updates the head and the last 100 tensors, contiguous layout;
float32 on the CPU, and on a GPU the paper's AMP (fp16 autocast over the embedding layers and the head, the trunk
in float32, a GradScaler with init scale 128). aikd's step (:meth:`Trainer.train_step`) trains only the head and
the last 100 backbone tensors (so backward stops early), runs channels-last, and uses the ``--amp`` precision
(``auto``: fp16 on CUDA, bf16 where the CPU has native bf16) over the ``--regions`` it is given (``paper``, as
``aikd train`` by default; ``trunk``, arcface_torch's mixed precision). It is timed twice per region:

- ``first_epoch``: the teacher runs for the batch, as in the paper's schedule (one epoch: every batch is new);
- ``cached``: the teacher embeddings come from the cache, as in later epochs and resumed runs.

All steps run in this process on the same batch, interleaved, after warm-up; the figures are medians (on a GPU
each timed step ends with a device synchronisation). Weights are random with calibrated BatchNorm (see NOTES.md);
data loading is not timed. On a GPU each kind of step is then run once more alone for its peak device memory.

    PYTHONPATH=src python bench/train.py                      # iResNet-50, batch 8
    PYTHONPATH=src python bench/train.py --arch r100 --batch 16 --repeats 7
    PYTHONPATH=src python bench/train.py --arch r100 --batch 64 --device cuda --regions paper,trunk

The last line printed is one JSON object with keys ``arch``, ``batch``, ``paper_pairs_per_s``,
``first_epoch_pairs_per_s``, ``first_epoch_ratio``, ``cached_pairs_per_s``, ``cached_ratio`` (ratios against the
paper-shaped step; with ``trunk`` among the regions also ``first_epoch_trunk_...`` and ``cached_trunk_...``),
``peak_rss_mb``, on a GPU ``peak_gpu_mb`` (per kind of step) and ``gpu``, and the settings used.
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
from aikd.models.forward import embed, quality_forward
from aikd.runtime import cpu_has_bf16, describe_cpu
from aikd.training.distill import teacher_embeddings
from aikd.training.train import TrainConfig, Trainer

LOSS_SCALE = 128.0  # the paper's GradScaler(init_scale=128)


def make_trainer(arch: str, batch: int, trainable: str, amp: str, run_dir: Path, device: str = "auto") -> Trainer:
    """An ``aikd train`` trainer on synthetic faces with a random, BatchNorm-calibrated ``arch`` teacher."""
    overrides = [f"student.arch={arch}", f"student.trainable_tensors={trainable}", f"train.amp={amp}",
                 f"data.batch_size={batch}", f"data.synthetic.count={batch * 4}", "data.val_fraction=0.25",
                 "teacher.weights=none", "data.source=synthetic", "data.workers=0", "optim.pretrain_fraction=0",
                 f"train.device={device}"]
    config = load_config(TrainConfig, None, overrides)
    return Trainer(config, run_dir)


def paper_step_fn(trainer: Trainer, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The paper's step: teacher forward, gradients for the whole student, SGD on the head and the last 100
    backbone tensors, contiguous layout; float32 on the CPU, the paper's AMP on a GPU (fp16 over the embedding
    layers and the head, the trunk in float32, a GradScaler)."""
    device = trainer.dist.device
    teacher = copy.deepcopy(trainer.task.teacher).to(memory_format=torch.contiguous_format).eval()
    backbone = copy.deepcopy(trainer.task.student.feature_extractor).to(memory_format=torch.contiguous_format)
    head = QualityHead(trainer.task.student.quality_head.in_features).to(device)
    student = QualityModel(backbone, head).train()
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name != "feature_extractor.features.weight")  # frozen in insightface itself
    updated = [*head.parameters(), *list(backbone.parameters())[-100:]]
    optimizer = torch.optim.SGD([p for p in updated if p.requires_grad], lr=1e-4, momentum=0.9)
    amp = torch.float16 if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", init_scale=LOSS_SCALE) if amp is not None else None
    aligned, misaligned, quality = (batch[key].to(device) for key in ("aligned", "misaligned", "quality"))

    def step() -> None:
        with torch.no_grad():
            target = embed(teacher, aligned, amp, "paper")
        embedding, predicted = quality_forward(student, misaligned, amp, "paper")
        loss = F.smooth_l1_loss(predicted, quality, beta=0.5) + (1 - F.cosine_similarity(embedding, target)).mean()
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
            return
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def cached_batch(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The first training batch with aligned faces, and again once its teacher embeddings are cached."""
    first = next(iter(trainer._train_loader(0, 0)))
    teacher_embeddings(trainer.task, first, trainer.dist.device, trainer.cache, trainer.memory_format)
    again = next(iter(trainer._train_loader(0, 0)))  # the loader now skips the cached aligned views
    assert again["aligned"].shape[0] == 0
    return first, again


def seconds(step: Callable[[], None], device: torch.device) -> float:
    """Wall time of ``step``; on a GPU from an idle device to the end of the step's last kernel."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def peak_gpu_mb(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Peak device memory (MB allocated by tensors) of one step of each kind, run alone."""
    peaks = {}
    for name, step in steps.items():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peaks[name] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def aikd_steps(trainer: Trainer, with_aligned: dict, cached: dict, regions: list[str]
               ) -> dict[str, Callable[[], None]]:
    """aikd's step for each autocast region setting: on a new batch (``first_epoch``) and from the cache."""
    cache = trainer.cache
    steps = {}

    def with_regions(region: str, batch: dict, use_cache: bool) -> Callable[[], None]:
        def step() -> None:
            trainer.task.amp_regions = region
            trainer.cache = cache if use_cache else None  # no cache: the teacher embeds the aligned faces
            try:
                trainer.train_step(batch)
            finally:
                trainer.cache = cache
        return step

    for region in regions:
        suffix = "" if region == "paper" else f"_{region}"
        steps[f"first_epoch{suffix}"] = with_regions(region, with_aligned, False)
        steps[f"cached{suffix}"] = with_regions(region, cached, True)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r50", help="backbone architecture (default r50)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--trainable", default="100", help="trainable backbone tensors of the aikd step")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                        help="autocast of the aikd step (auto: fp16 on CUDA, bf16 on CPUs with native bf16)")
    parser.add_argument("--regions", default="paper", help="comma-separated autocast regions of the aikd step: "
                        "paper (aikd train's default), trunk (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each kind (median)")
    args = parser.parse_args()
    regions = args.regions.split(",")
    if not set(regions) <= {"paper", "trunk"}:
        parser.error(f"--regions: paper and/or trunk, got {args.regions}")
    print(f"cpu: {describe_cpu()}", flush=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        trainer = make_trainer(args.arch, args.batch, args.trainable, args.amp, Path(folder), args.device)
        device = trainer.dist.device
        with_aligned, cached = cached_batch(trainer)
        steps = {"paper": paper_step_fn(trainer, with_aligned),
                 **aikd_steps(trainer, with_aligned, cached, regions)}
        trainer.task.train()
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for name, step in steps.items():
                times[name].append(seconds(step, device))
            print(", ".join(f"{name} {t[-1]:.3f} s" for name, t in times.items()), flush=True)
        peaks = peak_gpu_mb(steps) if device.type == "cuda" else None
    rates = {name: args.batch / statistics.median(t) for name, t in times.items()}
    ratios = {name: statistics.median(p / o for p, o in zip(times["paper"], t, strict=True))
              for name, t in times.items()}
    result = {"arch": args.arch, "batch": args.batch, "paper_pairs_per_s": round(rates["paper"], 3)}
    for name in steps:
        if name != "paper":
            result[f"{name}_pairs_per_s"] = round(rates[name], 3)
            result[f"{name}_ratio"] = round(ratios[name], 3)
    result.update({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "trainable_tensors": args.trainable, "amp": str(trainer.amp_dtype or "off"),
                   "regions": regions, "channels_last": True, "threads": torch.get_num_threads(),
                   "cpu_native_bf16": cpu_has_bf16(), "device": str(device)})
    if peaks is not None:
        result.update({"peak_gpu_mb": peaks, "gpu": torch.cuda.get_device_name(device)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
