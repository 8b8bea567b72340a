"""The AI-KD training loop: optimiser, schedule, validation, AMP, DDP, checkpoints, resume (``aikd train``).

Follows the training setup of Babnik et al., "AI-KD" (IWBF 2024) as released with the paper
(``train_config.yaml``, ``train_main.py``, ``utils.py``): one epoch, batch 64, SGD with two parameter
groups (quality head: lr 0.05, momentum 0.9, weight decay 5e-4; the last 100 backbone tensors: lr 0.05,
momentum 0.1), a LambdaLR stepped during the first 30% of the epoch only ("pretrain") with a sine warm-up
over its first half, gradient clipping at norm 5, fp16 AMP with a GradScaler (init scale 128, growth interval
= the pretrain steps) and validation every 10% of the epoch after the pretrain part.

Where the paper's code behaves otherwise than it reads, aikd follows what it does by default and names the
alternative (README, "differences from the paper's code"):

- ``train.ema``: the paper builds its EMA anew inside every validation, so its first update copies the
  student and ``aikd-best.pth`` is a plain student snapshot. ``none`` (default) validates and saves the
  student; ``running`` keeps a real EMA (``avg = 0.1 * avg + 0.9 * param`` at each validation) and
  validates and saves that.
- ``train.amp_regions``: ``paper`` (default) runs the trunk in fp32 and fc, features and the head under
  autocast; ``trunk`` the reverse (arcface_torch's mixed precision, much faster).
- a step with a non-finite loss or gradients is skipped, as the paper's GradScaler skips it (its BatchNorm
  statistics are put back too), counted in ``metrics.jsonl``; ``train.max_nonfinite_steps`` in a row stop.
- ``train.sync_bn``: under torchrun the student's BatchNorm (train mode) normalises over every process's
  faces (:mod:`aikd.models.batchnorm`), so 4 x 16 faces train like the paper's 64.

Launch::

    aikd train --config configs/aikd_r100.yaml --out runs/r100 data.images=/data/vggface2 ...
    torchrun --standalone --nproc_per_node=4 -m aikd train --config configs/aikd_r100.yaml --out runs/r100
    aikd train --resume runs/r100            # continues exactly where the last checkpoint left off

The run folder gets ``config.yaml`` (the resolved config), ``data_report.json`` (what the index skipped),
``metrics.jsonl`` / ``metrics.csv``, ``best.pt`` (the weights with the best validation quality loss),
``last.pt`` (the student plus everything needed to resume) and ``teacher_cache/``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm import tqdm

from aikd.config import config_to_dict, save_config
from aikd.evaluation.metrics import quality_metrics
from aikd.io import atomic_write, write_csv
from aikd.models import read_checkpoint, save_checkpoint
from aikd.models.batchnorm import synchronise_batchnorm
from aikd.models.forward import quality_forward
from aikd.runtime import (
    Distributed,
    autocast_dtype,
    deterministic_algorithms,
    join_torchrun,
    resolve_device,
    seed_everything,
)
from aikd.training.data import (
    VAL_STREAM,
    DataConfig,
    DistillationDataset,
    TrainingIndex,
    build_index,
    make_loader,
    split_by_label,
)
from aikd.training.distill import (
    NO_WEIGHTS,
    AIKDTask,
    LossConfig,
    StudentConfig,
    TeacherCache,
    TeacherConfig,
    build_task,
    cache_key,
    teacher_embeddings,
)

__all__ = [
    "LoopConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "clear_run",
    "lr_factor",
    "train",
]


# ------------------------------------------------------------------------------------------------ config
@dataclass
class OptimConfig:
    """SGD with the paper's two parameter groups, and its LR schedule."""

    head_lr: float = field(default=0.05, metadata={"help": "learning rate of the quality head"})
    head_momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the quality head"})
    head_weight_decay: float = field(default=5e-4, metadata={"help": "weight decay of the quality head"})
    backbone_lr: float = field(default=0.05, metadata={"help": "learning rate of the trainable backbone tensors"})
    backbone_momentum: float = field(default=0.1, metadata={"help": "SGD momentum of the backbone (paper: 0.1)"})
    backbone_weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the backbone (paper: 0)"})
    clip_grad_norm: float = field(default=5.0, metadata={"help": "clip the trainable gradients' norm (0: off)"})
    pretrain_fraction: float = field(default=0.3, metadata={"help": "share of an epoch the LR schedule runs over; "
                                                                     "validation starts after it"})
    warmup_fraction: float = field(default=0.5, metadata={"help": "share of the pretrain steps with sine LR "
                                                                   "warm-up"})

    def __post_init__(self) -> None:
        for name in ("head_lr", "backbone_lr", "head_momentum", "backbone_momentum", "head_weight_decay",
                     "backbone_weight_decay", "clip_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected 0 or more, got {getattr(self, name)}")
        for name in ("pretrain_fraction", "warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a value in [0, 1], got {getattr(self, name)}")


@dataclass
class LoopConfig:
    """Length of the run, precision, validation, EMA, checkpoints, logging."""

    epochs: int = field(default=1, metadata={"help": "passes over the training faces (paper: 1)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop the run after this many steps (the "
                                                                   "schedule still follows the epoch length)"})
    amp: Literal["auto", "off", "fp16", "bf16", False] = field(
        default="auto", metadata={"help": "mixed precision: auto = fp16 on CUDA (paper), bf16 on CPUs with native "
                                          "bf16, else off (YAML reads a bare off as false: also off)"})
    init_scale: float = field(default=128.0, metadata={"help": "initial fp16 GradScaler scale (paper: 128)"})
    validate_every: float = field(default=0.1, metadata={"help": "validate every this share of an epoch, after "
                                                                  "the pretrain part (paper: 0.1)"})
    ema: Literal["none", "running"] = field(
        default="none", metadata={"help": "none: validate and save the student (what the paper's code does: its EMA "
                                          "is rebuilt at each validation, a copy of the student); running: a real "
                                          "EMA of the weights, updated at each validation"})
    ema_decay: float = field(default=0.1, metadata={"help": "running EMA: avg = decay * avg + (1 - decay) * param "
                                                             "at each validation (the paper's setting: 0.1)"})
    amp_regions: Literal["paper", "trunk"] = field(
        default="paper", metadata={"help": "what runs under autocast: paper = fc, features and the quality head, "
                                           "the trunk in fp32 (the paper's code); trunk = the convolutional trunk, "
                                           "fc/head in fp32 (arcface_torch's, faster)"})
    max_nonfinite_steps: int = field(
        default=20, metadata={"help": "a step whose loss is NaN/inf is skipped and counted (as the paper's "
                                      "GradScaler skips it); stop after this many in a row"})
    sync_bn: Literal["auto", True, False] = field(
        default="auto", metadata={"help": "synchronise BatchNorm statistics across torchrun processes: auto = on "
                                          "when several processes train BatchNorm in train mode"})
    select_on: Literal["aligned", "misaligned"] = field(
        default="aligned", metadata={"help": "best checkpoint by validation quality loss on aligned (paper) or "
                                             "misaligned faces"})
    checkpoint_every: int = field(default=1000, metadata={"help": "write last.pt every this many steps (0: only "
                                                                   "at the end)"})
    log_every: int = field(default=10, metadata={"help": "steps per metrics.jsonl record and progress update"})
    seed: int = field(default=0, metadata={"help": "seed of weights, data order and misalignment noise"})
    deterministic: bool = field(default=False, metadata={
        "help": "deterministic GPU kernels (cuDNN, cuBLAS): two runs, or a run and its resume, end bit for bit alike "
                "on one GPU, somewhat slower; the CPU is deterministic either way"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N (torchrun: the local GPU)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (rank 0)"})
    tensorboard: bool = field(default=True, metadata={"help": "also log to RUN_DIR/tensorboard when installed"})

    def __post_init__(self) -> None:
        if not isinstance(self.amp, str):  # YAML reads a bare `amp: off` / `train.amp=off` as false
            self.amp = "off"
        if self.epochs < 1:
            raise ValueError(f"epochs: expected at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: expected at least 1 (or null), got {self.max_steps}")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale: expected a positive value, got {self.init_scale}")
        if not 0 < self.validate_every <= 1:
            raise ValueError(f"validate_every: expected a share of an epoch in (0, 1], got {self.validate_every}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: expected a value in [0, 1), got {self.ema_decay}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps: expected at least 1, got {self.max_nonfinite_steps}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: expected a value in [0, 2**32), got {self.seed}")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise ValueError("checkpoint_every must be >= 0 and log_every >= 1, got "
                             f"{self.checkpoint_every} and {self.log_every}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}") from None


@dataclass
class TrainConfig:
    """Everything ``aikd train`` needs; ``aikd train --help-config`` lists every key."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def check_ready(self) -> None:
        """Checks that need the file system; raise ``ValueError`` naming the key before any work."""
        self.teacher.check()
        if self.teacher.weights == NO_WEIGHTS and self.student.arch is None:
            raise ValueError("student.arch: required with teacher.weights=none")
        self.data.check_sources()


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN or infinite for ``train.max_nonfinite_steps`` steps in a row; the last good
    checkpoint is left in place."""


@dataclass
class TrainResult:
    """How a run ended: ``status`` is ``"done"`` or ``"stopped"`` (by ``stop_after``)."""

    status: str
    step: int
    total_steps: int
    best: dict[str, Any] | None
    task: AIKDTask
    run_dir: Path
    rank: int = 0
    nonfinite_steps: int = 0


# -------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, warmup_end: int) -> float:
    """The paper's LambdaLR factor at scheduler step ``step``: ``sin(step / warmup_end * pi / 2)``, then 1.

    Step 0 has factor 0, so (as in the paper) the first update only fills the momentum buffers.
    """
    if step < warmup_end:
        return math.sin(step / warmup_end * math.pi / 2.0)
    return 1.0


@dataclass(frozen=True)
class Plan:
    """Step counts of a run, all per process."""

    steps_per_epoch: int
    total_steps: int
    pretrain_end: int
    warmup_end: int
    val_every: int

    @classmethod
    def make(cls, train_faces: int, batch_size: int, world_size: int, optim: OptimConfig, loop: LoopConfig) -> Plan:
        per_rank = math.ceil(train_faces / world_size)
        steps = per_rank // batch_size
        if steps < 1:
            raise ValueError(f"data.batch_size: {batch_size} is more than the {per_rank} training faces per "
                             "process; lower it or add faces")
        total = steps * loop.epochs if loop.max_steps is None else min(steps * loop.epochs, loop.max_steps)
        pretrain_end = int(steps * optim.pretrain_fraction)
        return cls(steps, total, pretrain_end, int(pretrain_end * optim.warmup_fraction),
                   max(1, int(loop.validate_every * steps)))

    def validates_at(self, step: int) -> bool:
        """The paper validates when ``step % val_every == 0`` once the pretrain part is over."""
        return step % self.val_every == 0 and step > self.pretrain_end


# --------------------------------------------------------------------------------------------- helpers
def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain data (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["words"].tolist()), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line, appended and flushed), ``metrics.csv`` (validations) and
    TensorBoard when installed. Only rank 0 keeps one."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path, self.csv_path = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        records = self._read() if resume_step is not None else []
        records = [r for r in records if r.get("step", 0) <= (resume_step or 0)]
        with atomic_write(self.path) as handle:  # drop what the interrupted run logged after its checkpoint
            handle.writelines(json.dumps(r) + "\n" for r in records)
        self.validations = [r for r in records if r.get("kind") == "val"]
        self.handle = open(self.path, "a", encoding="utf-8")  # append-only journal, flushed per record
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by the interruption: nothing after it is trustworthy
        return records

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, float) and key != "time":
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        if record["kind"] == "val":
            self.validations.append(record)
            header = list(self.validations[-1])
            write_csv(self.csv_path, header, [[r.get(k, "") for k in header] for r in self.validations])

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """One AI-KD run in one process (of possibly several under torchrun).

    Args:
        config: the resolved configuration.
        run_dir: the run folder.
        dist: this process's rank, world size and device.
        index: the faces (built from ``config.data`` when not given).
    """

    def __init__(self, config: TrainConfig, run_dir: Path, dist: Distributed | None = None,
                 index: TrainingIndex | None = None) -> None:
        dist = dist or Distributed(device=resolve_device(config.train.device, "train.device"))
        self.config, self.run_dir, self.dist = config, run_dir, dist
        loop, data = config.train, config.data
        seed_everything(loop.seed)
        self.amp_dtype = autocast_dtype(loop.amp, dist.device, "train.amp")
        self.task, teacher_id = build_task(config.teacher, config.student, config.loss, seed=loop.seed,
                                           amp_dtype=self.amp_dtype, amp_regions=loop.amp_regions)  # fails fast
        self.index = index if index is not None else build_index(data)
        train_positions, val_positions = split_by_label(self.index.labels, data.val_fraction)
        self.task.to(dist.device)
        self.student = self.task.student
        self.memory_format = torch.channels_last if config.student.channels_last else torch.contiguous_format
        self.model: nn.Module = self.task
        self.synchronised_bn = loop.sync_bn is True or (loop.sync_bn == "auto" and dist.world_size > 1)
        if self.synchronised_bn:  # each process sees 1/world_size of the batch: normalise over all of it
            synchronise_batchnorm(self.student)
        if dist.world_size > 1:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.task, device_ids=device_ids)
        preprocessing, misalignment = self.student.preprocessing, data.misalignment.build()
        self.train_set = DistillationDataset(self.index, train_positions, preprocessing, misalignment, loop.seed)
        self.val_set = DistillationDataset(self.index, val_positions, preprocessing, misalignment, loop.seed,
                                           VAL_STREAM)
        self.plan = Plan.make(len(train_positions), data.batch_size, dist.world_size, config.optim, loop)
        self._build_optimisation()
        self.cache = self._open_cache(teacher_id) if config.teacher.cache else None
        self.step, self.best, self.last_validated = 0, None, -1
        self.nonfinite_steps, self.nonfinite_in_a_row = 0, 0
        self.undecodable: set[int] = set()

    def _build_optimisation(self) -> None:
        optim, loop = self.config.optim, self.config.train
        head = list(self.student.quality_head.parameters())
        backbone = [p for p in self.student.feature_extractor.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": optim.head_lr, "momentum": optim.head_momentum,
                   "weight_decay": optim.head_weight_decay}]
        if backbone:
            groups.append({"params": backbone, "lr": optim.backbone_lr, "momentum": optim.backbone_momentum,
                           "weight_decay": optim.backbone_weight_decay})
        self.trainable = head + backbone
        self.optimizer = torch.optim.SGD(groups)
        factor = partial(lr_factor, warmup_end=self.plan.warmup_end)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [factor] * len(groups))
        self.scaler = None
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.dist.device.type, init_scale=loop.init_scale,
                                               growth_interval=max(1, self.plan.pretrain_end))
        decay = loop.ema_decay
        # The paper's SWALR(swa_lr=0.05) "EMA scheduler" anneals the LR towards 0.05, which it already is: a no-op,
        # left out. Buffers (BatchNorm statistics) are copied from the student at each update (use_buffers=False).
        self.ema = None
        if loop.ema == "running":
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.student, avg_fn=lambda average, current, count: decay * average + (1.0 - decay) * current)
            self.ema.requires_grad_(False)

    def _open_cache(self, teacher_id: str) -> TeacherCache:
        folder = Path(self.config.teacher.cache_dir or self.run_dir / "teacher_cache")
        key = cache_key(teacher_id, self.index.fingerprint(), self.student.preprocessing, amp=self.amp_dtype,
                        device=self.dist.device.type, layout=self.memory_format,
                        regions=self.config.train.amp_regions)
        dim = int(self.student.preprocessing.embedding_size)
        if self.dist.is_main:
            TeacherCache(folder, len(self.index), dim, key, create=True)
        self.dist.barrier()
        return TeacherCache(folder, len(self.index), dim, key, create=False)

    # ------------------------------------------------------------------------------------------ training
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on a batch from :func:`aikd.training.data.collate_pairs`; returns the loss terms.

        A batch whose loss (on any rank) or whose gradients are not finite changes nothing: no update, and
        the BatchNorm statistics its forward pass moved are put back. It is counted; ``train.max_nonfinite_steps``
        of them in a row stop the run (:class:`TrainingDiverged`).
        """
        device = self.dist.device
        self._note_replaced(batch)
        teacher = teacher_embeddings(self.task, batch, device, self.cache, self.memory_format)
        misaligned = batch["misaligned"].to(device, non_blocking=True).contiguous(memory_format=self.memory_format)
        quality = batch["quality"].to(device, non_blocking=True)
        statistics = [buffer.clone() for buffer in self.student.buffers()]
        terms = self.model(misaligned, quality, teacher)
        values = self._reduce(terms)
        self.optimizer.zero_grad(set_to_none=True)
        finite = all(math.isfinite(v) for v in values.values())
        loss = terms["loss"] if finite else terms["loss"] * 0.0  # DDP still needs its backward
        clip = self.config.optim.clip_grad_norm or math.inf
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable, clip)
            self.scaler.step(self.optimizer)  # as the paper's: skips the update when the gradients are not finite
            self.scaler.update()
            finite = finite and self.scaler.get_scale() >= scale  # the scale shrinks exactly on a skipped step
        else:
            loss.backward()
            norm = nn.utils.clip_grad_norm_(self.trainable, clip)
            finite = finite and bool(torch.isfinite(norm))
            if finite:
                self.optimizer.step()
        if not finite:
            self._skip(values, statistics)
        else:
            self.nonfinite_in_a_row = 0
        self.step += 1
        if self.step < self.plan.pretrain_end:  # the paper steps its LambdaLR during the pretrain part only
            self.scheduler.step()
        return values

    def _note_replaced(self, batch: dict[str, torch.Tensor]) -> None:
        """Faces whose image could not be decoded (another face stood in): warn once each, list them in the run
        folder (``undecodable_images.csv``)."""
        found = [int(p) for p in batch.get("replaced", torch.zeros(0)).tolist() if p >= 0 and p not in self.undecodable]
        for position in found:
            self.undecodable.add(position)
            name = str(self.index.names[position])
            print(f"aikd train: warning: {name}: the image cannot be decoded; another face stood in for it "
                  f"(listed in {self.run_dir / 'undecodable_images.csv'})", file=sys.stderr)
        if found and self.dist.is_main:
            write_csv(self.run_dir / "undecodable_images.csv", ["path"],
                      [[str(self.index.names[p])] for p in sorted(self.undecodable)])

    def _reduce(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        names = ("loss", "quality_loss", "consistency_loss")
        stacked = torch.stack([terms[name].detach().float() for name in names])
        if self.dist.world_size > 1:
            torch_dist.all_reduce(stacked)  # a NaN on any rank reaches every rank, so all skip together
            stacked /= self.dist.world_size
        return dict(zip(names, stacked.tolist(), strict=True))

    @torch.no_grad()
    def _skip(self, values: dict[str, float], statistics: list[torch.Tensor]) -> None:
        """Undo what a non-finite step changed (gradients, BatchNorm statistics), count it, stop after too many."""
        self.optimizer.zero_grad(set_to_none=True)
        for buffer, saved in zip(self.student.buffers(), statistics, strict=True):
            buffer.copy_(saved)
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        limit = self.config.train.max_nonfinite_steps
        what = f"loss {values['loss']}" if not math.isfinite(values["loss"]) else "non-finite gradients"
        if self.dist.is_main:
            print(f"aikd train: warning: step {self.step + 1}: {what}; step skipped ({self.nonfinite_in_a_row} in a "
                  f"row, {self.nonfinite_steps} in all; the run stops after {limit} in a row)", file=sys.stderr)
        if self.nonfinite_in_a_row >= limit:
            last = self.run_dir / "last.pt"
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"{limit} steps in a row had a non-finite loss or gradients (step {self.step + 1}: "
                                   f"quality loss {values['quality_loss']}, consistency loss "
                                   f"{values['consistency_loss']}); training stopped and {kept}. Lower optim.*_lr "
                                   "or use train.amp=off")

    def _train_loader(self, epoch: int, start_batch: int) -> Any:
        data = self.config.data
        if self.cache is not None:
            self.train_set.skip_aligned = self.cache.filled_mask()
        return make_loader(self.train_set, data.batch_size, shuffle=True, seed=self.config.train.seed, epoch=epoch,
                           rank=self.dist.rank, world_size=self.dist.world_size, start_batch=start_batch,
                           workers=data.workers, drop_last=True, pin_memory=self.dist.device.type == "cuda")

    def fit(self, stop_after: int | None = None) -> str:
        """Train until the planned number of steps (``"done"``) or ``stop_after`` steps (``"stopped"``)."""
        plan, loop = self.plan, self.config.train
        log = MetricsLog(self.run_dir, self.step, loop.tensorboard) if self.dist.is_main else None
        bar = tqdm(total=plan.total_steps, initial=self.step, desc="aikd train", dynamic_ncols=True,
                   disable=not (self.dist.is_main and loop.progress), file=sys.stderr)
        sums, started, window, counted = np.zeros(3), time.perf_counter(), 0, 0
        try:
            self.task.train()
            while self.step < plan.total_steps:
                epoch, start_batch = divmod(self.step, plan.steps_per_epoch)
                for batch in self._train_loader(epoch, start_batch):
                    values = self.train_step(batch)
                    window += 1
                    if all(math.isfinite(v) for v in values.values()):  # skipped steps are counted apart
                        sums += [values["loss"], values["quality_loss"], values["consistency_loss"]]
                        counted += 1
                    bar.update(1)
                    if self.step % loop.log_every == 0 or self.step == plan.total_steps:
                        rate = window * len(batch["index"]) * self.dist.world_size / (time.perf_counter() - started)
                        self._log_train(log, bar, sums / counted if counted else np.full(3, np.nan), rate, epoch)
                        sums, started, window, counted = np.zeros(3), time.perf_counter(), 0, 0
                    paused = time.perf_counter()
                    if plan.validates_at(self.step):
                        self.validate(log)
                    if loop.checkpoint_every and self.step % loop.checkpoint_every == 0:
                        self.save_last()
                    started += time.perf_counter() - paused  # throughput counts training steps only
                    if stop_after is not None and self.step >= stop_after:
                        self.save_last()
                        return "stopped"
                    if self.step >= plan.total_steps:
                        break
            if self.last_validated != self.step:
                self.validate(log)
            self.save_last()
            return "done"
        finally:
            bar.close()
            if log is not None:
                log.close()

    def _log_train(self, log: MetricsLog | None, bar: tqdm, means: np.ndarray, rate: float, epoch: int) -> None:
        bar.set_postfix(loss=f"{means[0]:.4f}", q=f"{means[1]:.4f}", cos=f"{means[2]:.4f}", pairs_s=f"{rate:.1f}")
        if log is not None:
            lrs = [group["lr"] for group in self.optimizer.param_groups]
            log.write({"kind": "train", "step": self.step, "epoch": epoch, "loss": float(means[0]),
                       "quality_loss": float(means[1]), "consistency_loss": float(means[2]),
                       "lr_head": float(lrs[0]), "lr_backbone": float(lrs[-1]), "pairs_per_s": float(rate),
                       "nonfinite_steps": self.nonfinite_steps, "time": time.time()})

    # ---------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def predict_validation(self, model: nn.Module) -> tuple[np.ndarray, ...]:
        """(aligned qualities, misaligned qualities, labels) of the validation faces, gathered from all ranks."""
        data, device = self.config.data, self.dist.device
        loader = make_loader(self.val_set, data.val_batch_size, shuffle=False, seed=self.config.train.seed,
                             rank=self.dist.rank, world_size=self.dist.world_size, workers=data.workers)
        rows = []
        for batch in loader:
            faces = [batch[key].to(device).contiguous(memory_format=self.memory_format)
                     for key in ("aligned", "misaligned")]
            predicted = [quality_forward(model, view, self.amp_dtype, self.config.train.amp_regions)[1].double().cpu()
                         for view in faces]
            rows.append(torch.stack([batch["index"].double(), *predicted, batch["quality"].double()], dim=1))
        table = torch.cat(rows).to(device)
        if self.dist.world_size > 1:
            parts = [torch.empty_like(table) for _ in range(self.dist.world_size)]
            torch_dist.all_gather(parts, table)
            table = torch.cat(parts)
        table = table.cpu().numpy()
        _, first = np.unique(table[:, 0], return_index=True)  # DistributedSampler repeats faces to even out ranks
        table = table[first]
        return table[:, 1], table[:, 2], table[:, 3]

    def sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics, as DDP does before each forward.

        DDP broadcasts buffers at the start of a forward, so after the last step each rank holds its own
        update; validation, the EMA and checkpoints all use rank 0's.
        """
        if self.dist.world_size > 1:
            for buffer in self.student.buffers():
                torch_dist.broadcast(buffer, src=0)

    def validate(self, log: MetricsLog | None) -> dict[str, float]:
        """Validate the student (or, with ``train.ema=running``, the updated EMA), and keep it as ``best.pt``
        when its quality loss improved."""
        self.sync_buffers()
        if self.ema is not None:
            self.ema.update_parameters(self.student)
            model, weights = self.ema.module.eval(), "ema"
        else:
            model, weights = self.student.eval(), "student"
        try:
            metrics = quality_metrics(*self.predict_validation(model), beta=self.config.loss.beta)
        finally:
            self.task.train()  # back to the training modes (the teacher stays in eval mode)
        self.last_validated = self.step
        key = f"quality_loss_{self.config.train.select_on}"
        improved = self.best is None or metrics[key] < self.best[key]
        if improved:
            self.best = {"step": self.step, **metrics}
        if self.dist.is_main:
            if improved:
                save_checkpoint(self.run_dir / "best.pt", model, self.student.arch, self.student.preprocessing,
                                extra={"kind": "best", "weights": weights, "step": self.step, "validation": metrics,
                                       "selected_on": key, "config": config_to_dict(self.config)})
            if log is not None:
                log.write({"kind": "val", "step": self.step, "best": improved, **metrics, "time": time.time()})
        self.dist.barrier()
        return metrics

    # ----------------------------------------------------------------------------------------- checkpoints
    def training_state(self) -> dict[str, Any]:
        """Everything besides the student's weights that resuming needs, as tensors and plain data."""
        epoch, batch = divmod(self.step, self.plan.steps_per_epoch)
        return {"kind": "training_state", "step": self.step, "epoch": epoch, "batch_in_epoch": batch,
                "total_steps": self.plan.total_steps, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "nonfinite_steps": self.nonfinite_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_state(), "best": self.best, "last_validated": self.last_validated,
                "config": config_to_dict(self.config)}

    def save_last(self) -> None:
        """Write ``last.pt`` (student weights + training state) atomically; rank 0 only."""
        self.sync_buffers()
        if self.cache is not None:
            self.cache.flush()
        if self.dist.is_main:
            save_checkpoint(self.run_dir / "last.pt", self.student, self.student.arch, self.student.preprocessing,
                            extra=self.training_state())
        self.dist.barrier()

    def load_last(self) -> None:
        """Restore the student and the training state from ``RUN_DIR/last.pt``."""
        path = self.run_dir / "last.pt"
        if not path.exists():
            raise ValueError(f"--resume: {path} not found: the run wrote no checkpoint yet; start it again")
        weights, meta = read_checkpoint(path)
        state = meta.get("extra", {})
        if state.get("kind") != "training_state":
            raise ValueError(f"--resume: {path} holds no training state")
        self.student.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"--resume: {path} was trained without a running EMA; resume with train.ema=none")
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.best, self.last_validated = int(state["step"]), state["best"], int(state["last_validated"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))


# ---------------------------------------------------------------------------------------------- entry
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "data_report.json",
             "undecodable_images.csv")


def clear_run(run_dir: str | os.PathLike) -> None:
    """Remove what a run wrote in ``run_dir`` (never other files; the teacher cache stays: it is keyed).

    Raises:
        ValueError: ``run_dir`` holds files that no aikd run writes: it is not a run folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    foreign = [p.name for p in run_dir.iterdir() if p.name not in (*RUN_FILES, "tensorboard", "teacher_cache")
               and not p.name.startswith(".")]
    if foreign:
        raise ValueError(f"--overwrite: {run_dir} holds files no aikd run writes ({', '.join(sorted(foreign)[:3])}); "
                         "not clearing it: choose another --out")
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    index: TrainingIndex | None = None,
    dist: Distributed | None = None,
) -> TrainResult:
    """Run (or resume) AI-KD training in ``run_dir``; under torchrun every process calls this.

    Args:
        config: the configuration (checked before any work).
        run_dir: the run folder (created; a new run refuses a folder that already holds one).
        resume: continue from ``run_dir/last.pt``.
        stop_after: stop after this many steps with a checkpoint, as if interrupted.
        index: use these faces instead of building the index from ``config.data``.
        dist: this process's place in a torchrun job (default: join it, from the environment).

    Raises:
        ValueError: a bad configuration or input, naming the key or the file.
        TrainingDiverged: the loss became NaN/inf.
    """
    config.check_ready()
    run_dir = Path(run_dir)
    dist = dist or join_torchrun(config.train.device, "train.device")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out: {run_dir} is a file, not a run folder")
    if not resume and (run_dir / "config.yaml").exists():
        raise ValueError(f"--out: {run_dir} already holds a run; continue it with --resume {run_dir}, start it "
                         "over with --overwrite, or choose another folder")
    if resume and not (run_dir / "last.pt").exists():
        if dist.is_main:  # killed before its first checkpoint: nothing to continue from, nothing lost by restarting
            print(f"aikd train: {run_dir} has no checkpoint yet; starting the run from step 0 with its config",
                  file=sys.stderr)
        resume = False
    dist.barrier()  # every rank has looked before rank 0 writes anything
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, run_dir, dist, index)
    if resume:
        trainer.load_last()
    if dist.is_main:
        save_config(config, run_dir / "config.yaml")
        with atomic_write(run_dir / "data_report.json") as handle:
            json.dump(trainer.index.report.to_dict(), handle, indent=2)
        print(f"aikd train: {trainer.index.report.summary()}", file=sys.stderr)
        print(f"aikd train: {len(trainer.train_set)} training / {len(trainer.val_set)} validation faces, "
              f"{trainer.plan.total_steps} steps of {config.data.batch_size} x {dist.world_size}, "
              f"device {dist.device}, amp {str(trainer.amp_dtype or 'off').replace('torch.', '')}", file=sys.stderr)
    with deterministic_algorithms(config.train.deterministic):
        status = trainer.fit(stop_after)
    return TrainResult(status, trainer.step, trainer.plan.total_steps, trainer.best, trainer.task, run_dir, dist.rank,
                       trainer.nonfinite_steps)
