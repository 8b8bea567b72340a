"""The AI-KD objective: a frozen teacher, a student initialised from it, and the two-term loss.

Babnik et al., "AI-KD: Towards Alignment Invariant Face Image Quality Assessment Using Knowledge
Distillation", IWBF 2024, Sec. 3 and Eq. (1)-(3). The teacher ``M^t`` is a pretrained face-recognition
backbone; the student ``M^s`` is a copy of it followed by an MLP quality head (512 -> 1024 -> GELU -> 1).
For a face aligned properly (``x_i``) and misaligned (``x̂_i``)::

    e_i = M^t(x_i),  (ê_i, q̂_i) = M^s(x̂_i)
    L = SmoothL1_beta(q̂_i, q_i) + lambda * (1 - cos(e_i, ê_i)),  beta = 0.5, lambda = 1

so the student regresses the FIQA technique's label ``q_i`` from a misaligned face while keeping its
embedding where the teacher puts the properly aligned one.

Unlike the paper's public code, the teacher here is a separate frozen copy with the pretrained weights
loaded: ``requires_grad=False``, always in eval mode (also after ``task.train()``), run under
``torch.no_grad()``. Only the trainable set (the head and the last ``K`` backbone tensors, K = 100 as in
the paper) requires grad, so backward stops where the trainable part starts.

BatchNorm in frozen layers: the paper's student runs in train mode, so every BatchNorm of the student,
frozen layers included, normalises with batch statistics and updates its running statistics on the
misaligned faces. That is kept (``student.frozen_bn: train``): the running statistics then describe the
misaligned inputs the student is meant for. ``student.frozen_bn: eval`` keeps the teacher's statistics
in the frozen layers instead (an ablation).

Teacher embeddings are deterministic per face (the aligned view never changes), so :class:`TeacherCache`
keeps them in a memory-mapped file in the run folder and the teacher forward disappears from later epochs.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aikd.models import (
    Preprocessing,
    QualityHead,
    QualityModel,
    get_spec,
    load_fr_model,
    weights_fingerprint,
)
from aikd.models.checkpoint import NAMED_WEIGHTS
from aikd.models.forward import embed, quality_forward
from aikd.models.layout import to_training_layout

__all__ = [
    "AIKDTask",
    "apply_training_layout",
    "DistillationLoss",
    "LossConfig",
    "StudentConfig",
    "TeacherCache",
    "TeacherConfig",
    "build_task",
    "cache_key",
    "set_trainable",
    "teacher_embeddings",
]

NO_WEIGHTS = "none"


# ------------------------------------------------------------------------------------------------ config
@dataclass
class TeacherConfig:
    """The frozen face-recognition model whose embeddings the student keeps."""

    weights: str | None = field(default=None, metadata={"help": "FR model weights: arcface_torch backbone.pth, "
                                                                "an aikd checkpoint, dlib's .dat, `dlib` (dlib's "
                                                                "model as installed), or `none` (random, tests only)"})
    cache: bool = field(default=True, metadata={"help": "cache teacher embeddings per face (memory-mapped file)"})
    cache_dir: str | None = field(default=None, metadata={"help": "folder of the teacher cache (default: "
                                                                  "RUN_DIR/teacher_cache); safe to share"})

    def check(self) -> None:
        """Refuse to start without teacher weights, unless ``none`` is asked for explicitly."""
        if self.weights is None or not str(self.weights).strip():
            raise ValueError("teacher.weights: required: the face-recognition model to distil from (an "
                             "arcface_torch backbone.pth or an aikd checkpoint); `teacher.weights=none` starts "
                             "teacher and student from the same random weights (tests and demos only)")
        if self.weights != NO_WEIGHTS and self.weights not in NAMED_WEIGHTS and not Path(self.weights).is_file():
            raise ValueError(f"teacher.weights: {self.weights} is not a file (nor one of the named weights: "
                             f"{', '.join(NAMED_WEIGHTS)})")


@dataclass
class StudentConfig:
    """The student: a copy of the teacher's backbone plus a new quality head, and what of it trains."""

    arch: str | None = field(default=None, metadata={"help": "backbone architecture (r18 ... r200, tiny); default "
                                                             "read from the teacher weights"})
    head_hidden: int = field(default=1024, metadata={"help": "hidden width of the quality head (paper: 1024)"})
    trainable_tensors: int | Literal["all"] = field(
        default=100, metadata={"help": "train the last K parameter tensors of the backbone (paper: 100), or all"})
    frozen_bn: Literal["train", "eval"] = field(
        default="train", metadata={"help": "BatchNorm of frozen layers: train (update running stats, as the "
                                           "paper) or eval (keep the teacher's)"})
    channels_last: bool = field(default=True, metadata={"help": "NHWC memory format (faster convolutions); on the "
                                                                "CPU, narrow strided 1x1 convolutions train in NCHW "
                                                                "(a oneDNN bug, see aikd.models.layout)"})

    def __post_init__(self) -> None:
        if self.arch is not None:
            get_spec(self.arch)  # ValueError listing the known names
        if self.head_hidden < 1:
            raise ValueError(f"head_hidden: expected a positive width, got {self.head_hidden}")
        if isinstance(self.trainable_tensors, int) and self.trainable_tensors < 0:
            raise ValueError(f"trainable_tensors: expected 0 or more, or 'all', got {self.trainable_tensors}")


@dataclass
class LossConfig:
    """The two terms of the AI-KD loss."""

    beta: float = field(default=0.5, metadata={"help": "SmoothL1 beta of the quality term (paper: 0.5)"})
    consistency_weight: float = field(default=1.0, metadata={"help": "lambda of the 1 - cos(e, ê) term (paper: 1)"})

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta: expected a positive value, got {self.beta}")
        if not self.consistency_weight >= 0:
            raise ValueError(f"consistency_weight: expected 0 or more, got {self.consistency_weight}")


# -------------------------------------------------------------------------------------------------- loss
class DistillationLoss(nn.Module):
    """``SmoothL1_beta(q̂, q) + lambda * mean(1 - cos(e, ê))``, computed in float32 whatever the inputs."""

    def __init__(self, beta: float = 0.5, consistency_weight: float = 1.0) -> None:
        super().__init__()
        self.beta, self.consistency_weight = beta, consistency_weight

    def forward(
        self,
        predicted_quality: torch.Tensor,
        quality: torch.Tensor,
        student_embedding: torch.Tensor,
        teacher_embedding: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Returns ``loss`` (the total), ``quality_loss`` and ``consistency_loss``."""
        quality_loss = F.smooth_l1_loss(predicted_quality.float(), quality.float(), beta=self.beta)
        cosine = F.cosine_similarity(student_embedding.float(), teacher_embedding.float(), dim=1)
        consistency_loss = (1.0 - cosine).mean()
        loss = quality_loss + self.consistency_weight * consistency_loss
        return {"loss": loss, "quality_loss": quality_loss, "consistency_loss": consistency_loss}


# -------------------------------------------------------------------------------------------------- task
class AIKDTask(nn.Module):
    """Student + frozen teacher + loss: ``task(misaligned, quality, teacher_embedding)`` gives the loss terms.

    Args:
        student: the quality model being trained.
        teacher: the frozen face-recognition backbone (a separate object from the student's backbone).
        loss: the AI-KD loss.
        amp_dtype: autocast dtype (``None``: float32).
        frozen_bn: ``"train"`` or ``"eval"``: the mode of BatchNorm layers without trainable parameters.
        amp_regions: what runs under autocast (:func:`embed`).
    """

    def __init__(
        self,
        student: QualityModel,
        teacher: nn.Module,
        loss: DistillationLoss,
        amp_dtype: torch.dtype | None = None,
        frozen_bn: str = "train",
        amp_regions: str = "paper",
    ) -> None:
        super().__init__()
        if any(p is q for p in teacher.parameters() for q in student.parameters()):
            raise ValueError("the teacher shares parameters with the student; give it its own frozen copy")
        self.student, self.teacher, self.loss = student, teacher, loss
        self.amp_dtype, self.frozen_bn, self.amp_regions = amp_dtype, frozen_bn, amp_regions
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> AIKDTask:
        """Set the student's mode; the teacher stays in eval mode always."""
        super().train(mode)
        self.teacher.eval()
        if mode and self.frozen_bn == "eval":
            for module in self.student.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
        return self

    @torch.no_grad()
    def teacher_embedding(self, aligned: torch.Tensor) -> torch.Tensor:
        """``e_i = M^t(x_i)`` for properly aligned faces, float32, without a graph."""
        return embed(self.teacher, aligned, self.amp_dtype, self.amp_regions)

    def forward(
        self, misaligned: torch.Tensor, quality: torch.Tensor, teacher_embedding: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms for a batch of misaligned faces, their labels and the teacher's embeddings."""
        student_embedding, predicted_quality = quality_forward(self.student, misaligned, self.amp_dtype,
                                                               self.amp_regions)
        terms = self.loss(predicted_quality, quality, student_embedding, teacher_embedding)
        terms["predicted_quality"] = predicted_quality.detach()
        return terms


def set_trainable(student: QualityModel, last_tensors: int | str = 100) -> tuple[list[nn.Parameter], ...]:
    """Freeze the student except the head and the last ``last_tensors`` backbone parameter tensors.

    As the paper's optimiser (``list(backbone.parameters())[-100:]``, which takes every tensor of a backbone
    with fewer than 100); tensors the architecture itself freezes (insightface's ``features.weight``) stay
    frozen.

    Returns:
        (head parameters, trainable backbone parameters), for the optimiser's two groups.
    """
    backbone = list(student.feature_extractor.parameters())
    for parameter in backbone:  # the first call sees the architecture's own choice; later calls keep it
        if not hasattr(parameter, "_aikd_arch_frozen"):
            parameter._aikd_arch_frozen = not parameter.requires_grad
    fixed = {id(p) for p in backbone if p._aikd_arch_frozen}
    count = len(backbone) if last_tensors == "all" else min(int(last_tensors), len(backbone))
    chosen = {id(p) for p in backbone[len(backbone) - count:]}  # the paper's [-K:]: all of them when K > len
    trainable = []
    for parameter in backbone:
        parameter.requires_grad_(id(parameter) in chosen and id(parameter) not in fixed)
        if parameter.requires_grad:
            trainable.append(parameter)
    head = list(student.quality_head.parameters())
    for parameter in head:
        parameter.requires_grad_(True)
    return head, trainable


# ------------------------------------------------------------------------------------------------- build
def build_task(
    teacher: TeacherConfig,
    student: StudentConfig,
    loss: LossConfig,
    *,
    seed: int = 0,
    amp_dtype: torch.dtype | None = None,
    amp_regions: str = "paper",
) -> tuple[AIKDTask, str]:
    """The AI-KD task: teacher weights loaded once, copied into a frozen teacher and a trainable student.

    Returns:
        (task, teacher fingerprint).
    """
    teacher.check()
    if teacher.weights == NO_WEIGHTS and student.arch is None:
        raise ValueError("student.arch: required with teacher.weights=none (there are no weights to read it "
                         "from)")
    try:
        loaded = load_fr_model(teacher.weights, student.arch, seed=seed)
    except ValueError as err:
        raise ValueError(f"teacher.weights: {err}") from None
    backbone, arch, preprocessing = loaded.backbone, loaded.arch, loaded.preprocessing
    embedding_size = preprocessing.embedding_size
    fingerprint = weights_fingerprint(backbone)
    frozen_teacher = copy.deepcopy(backbone).eval()
    torch.manual_seed(seed + 1)
    head = QualityHead(embedding_size, student.head_hidden)
    model = QualityModel(copy.deepcopy(backbone), head, arch=arch, preprocessing=preprocessing)
    set_trainable(model, student.trainable_tensors)
    task = AIKDTask(model, frozen_teacher, DistillationLoss(loss.beta, loss.consistency_weight), amp_dtype,
                    student.frozen_bn, amp_regions)
    apply_training_layout(task, student.channels_last)
    return task, fingerprint


def apply_training_layout(task: AIKDTask, channels_last: bool = True) -> list[str]:
    """The memory layout training uses, in place: channels_last if asked, except the student's convolutions
    whose channels_last backward oneDNN gets wrong (:mod:`aikd.models.layout`), which train in NCHW.

    Returns:
        Names of the student's convolutions that train in NCHW.
    """
    switched = to_training_layout(task.student, channels_last)
    if channels_last:
        task.teacher.to(memory_format=torch.channels_last)  # never differentiated: every layer is safe
    return switched


# ------------------------------------------------------------------------------------------------- cache
class TeacherCache:
    """Teacher embeddings of every face, kept in a memory-mapped float32 (N, D) file plus a filled mask.

    The file names carry a key (a hash of the teacher weights, the index and how the teacher runs), so a
    cache made with another teacher, other faces or another precision is never read. Several processes
    (DDP ranks) may write disjoint rows; a row's mask byte is set after the row, so an interrupted run
    leaves at worst rows marked empty.

    Args:
        folder: where the files live.
        count: number of faces (rows).
        dim: embedding size.
        key: hex string identifying what the embeddings depend on.
        create: create the files if absent (rank 0); other ranks open existing files only.
    """

    def __init__(self, folder: str | Path, count: int, dim: int, key: str, create: bool = True) -> None:
        folder = Path(folder)
        self.count, self.dim, self.key = count, dim, key
        self.values_path = folder / f"teacher-{key[:24]}-{count}x{dim}.f32"
        self.filled_path = folder / f"teacher-{key[:24]}-{count}x{dim}.filled"
        exists = self.values_path.exists() and self.filled_path.exists()
        if not exists and not create:
            raise FileNotFoundError(f"{self.values_path}: teacher cache not created")
        if not exists:
            folder.mkdir(parents=True, exist_ok=True)
            np.memmap(self.values_path, np.float32, "w+", shape=(count, dim)).flush()
            np.memmap(self.filled_path, np.uint8, "w+", shape=(count,)).flush()
        self.values = np.memmap(self.values_path, np.float32, "r+", shape=(count, dim))
        self.filled = np.memmap(self.filled_path, np.uint8, "r+", shape=(count,))

    def filled_mask(self) -> np.ndarray:
        """A copy of the mask: which faces have a cached embedding."""
        return np.asarray(self.filled, dtype=bool).copy()

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(filled mask of ``positions``, their rows; rows not filled are undefined)."""
        return self.filled[positions].astype(bool), np.asarray(self.values[positions])

    def store(self, positions: np.ndarray, embeddings: np.ndarray) -> None:
        self.values[positions] = embeddings
        self.filled[positions] = 1

    def flush(self) -> None:
        self.values.flush()
        self.filled.flush()


def cache_key(teacher: str, index: str, preprocessing: Preprocessing, **how: Any) -> str:
    """Hash of everything a teacher embedding depends on: teacher and index fingerprints, preprocessing, and
    how the teacher runs (``how``: e.g. autocast dtype, device type, memory format)."""
    text = f"{teacher}|{index}|{preprocessing.to_dict()}|{sorted((k, str(v)) for k, v in how.items())}"
    return hashlib.sha256(text.encode()).hexdigest()


def teacher_embeddings(
    task: AIKDTask, batch: dict[str, torch.Tensor], device: torch.device, cache: TeacherCache | None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """``e_i`` for every row of a batch: from the cache where filled, else from the teacher (then cached).

    Raises:
        RuntimeError: a row has neither a cached embedding nor an aligned image.
    """
    positions = batch["index"].numpy()
    size = len(positions)
    rows = batch["aligned_rows"].numpy()
    if cache is None:
        missing = np.ones(size, dtype=bool)
        out = None
    else:
        filled, cached = cache.lookup(positions)
        missing = ~filled
        out = torch.from_numpy(cached).to(device, non_blocking=True)
    if not missing.any():
        return out
    have_image = np.zeros(size, dtype=bool)
    have_image[rows] = True
    if (missing & ~have_image).any():
        row = int(np.flatnonzero(missing & ~have_image)[0])
        raise RuntimeError(f"face {positions[row]} has no cached teacher embedding and no aligned image")
    aligned = batch["aligned"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    computed = task.teacher_embedding(aligned)
    if out is None and len(rows) == size and (rows == np.arange(size)).all():
        return computed
    out = torch.empty(size, computed.shape[1], device=device) if out is None else out
    out[torch.from_numpy(rows).to(device)] = computed
    if cache is not None:
        wanted = missing[rows]
        cache.store(positions[rows][wanted], computed[torch.from_numpy(wanted).to(device)].cpu().numpy())
    return out

