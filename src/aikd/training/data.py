"""Training data of AI-KD: the index of (image, landmarks, label), the validation split, the paired dataset.

Babnik et al., "AI-KD" (IWBF 2024), Sec. 3: every training face is used twice, properly aligned with its
five landmarks (``x_i``, the teacher's input) and misaligned by jittering every landmark coordinate with
``U[-3, 3]`` pixels before alignment (``x̂_i``, the student's input); ``q_i`` is the quality label of the
FIQA technique being distilled.

* :func:`read_index` joins an image folder, a landmarks file and a labels file (CSV or the official AI-KD
  pickles) and reports by count, with examples, every entry it cannot train on. It keeps names, landmarks
  and labels as numpy arrays (no per-entry Python objects) and indexes VGGFace2-sized sets (3.3 M faces)
  in well under a minute.
* :func:`split_by_label` is the paper code's validation split: sort by label, every k-th item validates.
* :class:`DistillationDataset` yields ``(aligned, misaligned, quality, index)``. The misalignment noise is
  fresh every time a face is drawn, yet a pure function of ``(seed, epoch, index)``, so runs are
  reproducible and resumable; the input landmarks are never modified (the paper code jitters them in
  place, so its noise accumulates over epochs).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from aikd.align import Misalignment, valid_landmarks
from aikd.images import IMAGE_SUFFIXES, ImageError, load_image
from aikd.io import log_repeated, read_label_arrays, read_landmark_arrays
from aikd.names import match_names, strictly_increasing
from aikd.preprocessing import Preprocessing
from aikd.training.synthetic import SyntheticFaces

__all__ = [
    "DataConfig",
    "DistillationDataset",
    "IndexReport",
    "MisalignmentConfig",
    "SyntheticConfig",
    "TrainingIndex",
    "build_index",
    "collate_pairs",
    "make_loader",
    "read_index",
    "split_by_label",
]

EXAMPLES = 5  # names shown per problem in an index report


# ------------------------------------------------------------------------------------------------ config
@dataclass
class MisalignmentConfig:
    """Landmark noise applied before aligning the student's view (see :class:`aikd.align.Misalignment`)."""

    max_shift: float = field(default=3.0, metadata={"help": "p of the paper: each landmark coordinate moves by "
                                                              "U[-p, p] source pixels"})
    rotation: float = field(default=0.0, metadata={"help": "extra rotation of all points, U[-r, r] degrees "
                                                             "(0: off, as in the paper)"})
    scale: float = field(default=0.0, metadata={"help": "extra scaling of all points by 1 + U[-s, s] (0: off)"})
    translation: float = field(default=0.0, metadata={"help": "extra shift of all points, U[-t, t] pixels (0: off)"})

    def __post_init__(self) -> None:
        self.build()  # raises ValueError naming the field

    def build(self) -> Misalignment:
        return Misalignment(self.max_shift, self.rotation, self.scale, self.translation)


@dataclass
class SyntheticConfig:
    """The synthetic face source (:class:`aikd.training.synthetic.SyntheticFaces`)."""

    count: int = field(default=512, metadata={"help": "number of synthetic faces"})
    image_size: int = field(default=144, metadata={"help": "side of the synthetic images in pixels (>= 64)"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic faces and their labels"})

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError(f"count: expected at least 2 faces, got {self.count}")
        if self.image_size < 64:
            raise ValueError(f"image_size: expected at least 64 pixels, got {self.image_size}")


@dataclass
class DataConfig:
    """Where the training faces, their landmarks and their quality labels come from, and how they are batched."""

    source: Literal["files", "synthetic"] = field(
        default="files", metadata={"help": "files: images + landmarks + labels; synthetic: generated faces"})
    images: str | None = field(default=None, metadata={"help": "image root; names in the landmarks and labels "
                                                                 "files are relative to it"})
    landmarks: str | None = field(default=None, metadata={"help": "landmarks file: CSV path,x1,y1,...,x5,y5 or "
                                                                    "the official pickle {name: (det, lmk)}"})
    labels: str | None = field(default=None, metadata={"help": "quality labels: CSV path,quality or the official "
                                                                "pickle {name: score}"})
    label_column: str = field(default="quality", metadata={"help": "column of the labels CSV holding the score"})
    check_images: bool = field(default=True, metadata={"help": "walk the image root once and drop entries "
                                                                "whose file is missing"})
    val_fraction: float = field(default=0.01, metadata={"help": "share of faces used for validation (paper: 1%, "
                                                                 "every k-th face by label)"})
    batch_size: int = field(default=64, metadata={"help": "training pairs per step and process (paper: 64)"})
    val_batch_size: int = field(default=64, metadata={"help": "faces per validation batch"})
    workers: int = field(default=4, metadata={"help": "DataLoader worker processes (0: load in the main "
                                                       "process)"})
    misalignment: MisalignmentConfig = field(default_factory=MisalignmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction: expected a value in (0, 0.5), got {self.val_fraction}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected at least 2 (BatchNorm needs two faces), got {self.batch_size}")
        if self.val_batch_size < 1:
            raise ValueError(f"val_batch_size: expected at least 1, got {self.val_batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers: expected 0 or more, got {self.workers}")

    def check_sources(self) -> None:
        """Raise ``ValueError`` naming the key when a file source lacks or cannot find its inputs."""
        if self.source != "files":
            return
        for key in ("images", "landmarks", "labels"):
            value = getattr(self, key)
            if not value:
                raise ValueError(f"data.{key}: required when data.source is 'files' (or use data.source=synthetic)")
            path = Path(value)
            if not path.exists():
                raise ValueError(f"data.{key}: {path} does not exist")
            if key == "images" and not path.is_dir():
                raise ValueError(f"data.images: {path} is not a folder")


# ------------------------------------------------------------------------------------------------- index
@dataclass
class IndexReport:
    """What joining images, landmarks and labels found.

    Attributes:
        usable: entries kept for training and validation.
        counts: problem -> number of names affected (problems with no names are left out).
        examples: problem -> up to :data:`EXAMPLES` affected names.
    """

    usable: int
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    PROBLEMS = {
        "duplicate_landmarks": "names listed more than once in the landmarks file (first kept)",
        "duplicate_labels": "names listed more than once in the labels file (first kept)",
        "no_landmarks": "images or labels without landmarks",
        "no_label": "images or landmarks without a label",
        "no_image": "labels without an image file",
        "bad_label": "NaN or infinite labels",
        "bad_landmarks": "unusable landmarks (NaN/inf, coincident or collinear points)",
    }

    def add(self, problem: str, names: np.ndarray) -> None:
        """Count ``names`` under ``problem`` (added to what it already holds) and keep the first examples."""
        if len(names):
            self.counts[problem] = self.counts.get(problem, 0) + int(len(names))
            examples = self.examples.setdefault(problem, [])
            examples.extend(str(name) for name in names[:EXAMPLES - len(examples)])

    def summary(self) -> str:
        """One line per problem, e.g. ``no_label: 3 images or landmarks without a label (e.g. a.jpg, b.jpg)``."""
        lines = [f"{self.usable} usable faces"]
        for problem, count in self.counts.items():
            examples = ", ".join(self.examples[problem])
            lines.append(f"  skipped {count} {self.PROBLEMS[problem]} ({problem}; e.g. {examples})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"usable": self.usable, "counts": dict(self.counts), "examples": dict(self.examples)}


@dataclass
class TrainingIndex:
    """The faces AI-KD trains on.

    Attributes:
        names: (N,) numpy unicode array of image names relative to ``image_root``.
        landmarks: (N, 5, 2) float32 landmarks in source-image pixels.
        labels: (N,) float64 quality labels.
        image_root: folder the names are relative to (``None`` for synthetic faces).
        report: what was skipped while joining.
        synthetic: the generator that draws the images, for a synthetic index.
    """

    names: np.ndarray
    landmarks: np.ndarray
    labels: np.ndarray
    image_root: Path | None
    report: IndexReport
    synthetic: SyntheticFaces | None = None

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, position: int) -> Path:
        if self.image_root is None:
            return Path(str(self.names[position]))
        return self.image_root / str(self.names[position])

    def load_image(self, position: int) -> np.ndarray:
        """Decode face ``position`` as an (H, W, 3) RGB uint8 array; a bad file raises ``ValueError`` naming it."""
        if self.synthetic is not None:
            return self.synthetic.load_image(position)
        path = self.image_path(position)
        try:
            return load_image(path)
        except ImageError as err:
            raise ValueError(f"{path}: {err} (remove it from the labels file, or fix it, and --resume)") from None

    def fingerprint(self) -> str:
        """SHA-256 of what the aligned views depend on: names, landmarks, and the synthetic generator."""
        digest = hashlib.sha256(b"aikd-index-v1")
        digest.update(self.synthetic.fingerprint().encode() if self.synthetic is not None else b"files")
        digest.update(str(len(self)).encode())
        digest.update(np.ascontiguousarray(self.landmarks, dtype=np.float32).tobytes())
        digest.update("\n".join(self.names.tolist()).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()


def build_index(config: DataConfig) -> TrainingIndex:
    """The index a :class:`DataConfig` describes: the files it names, or synthetic faces."""
    if config.source == "synthetic":
        faces = SyntheticFaces(config.synthetic.count, config.synthetic.image_size, config.synthetic.seed)
        labels = faces.labels.astype(np.float64)
        return TrainingIndex(faces.names, faces.landmarks, labels, None, IndexReport(len(faces)), faces)
    config.check_sources()
    return read_index(config.images, config.landmarks, config.labels, config.label_column, config.check_images)


def read_index(
    images: str | os.PathLike,
    landmarks: str | os.PathLike,
    labels: str | os.PathLike,
    label_column: str = "quality",
    check_images: bool = True,
) -> TrainingIndex:
    """Join an image folder, a landmarks file and a labels file into a :class:`TrainingIndex`.

    Names are joined by aikd's one name policy (:mod:`aikd.names`: exact, normalised, then whole trailing
    path components matching one name), so a landmarks file written relative to another root (``vggface2/
    n001/1.jpg``) still finds ``n001/1.jpg`` in the labels and the folder; an index entry keeps the image's
    path relative to ``images``. Entries without landmarks, without a label, without an image file (when
    ``check_images``), with a NaN/inf label or with unusable landmarks are left out and reported in
    ``index.report``; the kept entries are sorted by name.

    Args:
        images: image root folder.
        landmarks: CSV ``path,x1,y1,...,x5,y5`` or the official pickle ``{name: (detection, landmarks)}``.
        labels: CSV ``path,<label_column>`` or the official pickle ``{name: score}``.
        label_column: CSV column holding the quality score.
        check_images: walk ``images`` once (one ``os.scandir`` per folder) and drop names without a file.

    Raises:
        ValueError: a file is unreadable or unsafe (a pickle asking for code), or no usable face remains.
    """
    landmark_names, points = _read_landmarks(Path(landmarks))
    label_names, scores = _read_labels(Path(labels), label_column)
    report = IndexReport(0)
    landmark_names, points = _first_occurrences(landmark_names, points, report, "duplicate_landmarks", landmarks)
    label_names, scores = _first_occurrences(label_names, scores, report, "duplicate_labels", labels)
    files = _walk_images(Path(images)) if check_images else None
    found = match_names(landmark_names, label_names)
    label_at = _one_to_one(found, report, landmark_names, "duplicate_landmarks")
    has_label = label_at >= 0
    labelled = np.zeros(len(label_names), dtype=bool)
    labelled[label_at[has_label]] = True
    no_landmarks, no_label = label_names[~labelled], landmark_names[found < 0]
    names, points, scores = _kept(landmark_names, has_label), _kept(points, has_label), scores[label_at[has_label]]
    del found, label_at, has_label, labelled
    if files is None:
        del landmark_names, label_names  # no longer needed: millions of names
    keep = np.ones(len(names), dtype=bool)
    if files is not None:
        file_at = _one_to_one(match_names(names, files), report, names, "duplicate_landmarks")
        has_file = file_at >= 0
        report.add("no_image", names[~has_file])
        keep &= has_file
        names = np.where(has_file, files[np.maximum(file_at, 0)], names)  # the file's own path, as stored
        imaged = np.zeros(len(files), dtype=bool)
        imaged[file_at[has_file]] = True
        imaged[match_names(files, landmark_names) >= 0] = True
        bare = files[~imaged]  # image files that no landmark names
        no_landmarks = np.union1d(no_landmarks, bare)
        no_label = np.union1d(no_label, bare[match_names(bare, label_names) < 0])
    report.add("no_landmarks", np.unique(no_landmarks))
    report.add("no_label", np.unique(no_label))
    finite = np.isfinite(scores)
    report.add("bad_label", names[keep & ~finite])
    keep &= finite
    usable = _valid_landmarks(points)
    report.add("bad_landmarks", names[keep & ~usable])
    keep &= usable
    report.usable = int(keep.sum())
    if report.usable == 0:
        raise ValueError(f"no usable training faces in {landmarks} + {labels} (images in {images}):\n"
                         f"{report.summary()}")
    names, points, scores = _kept(names, keep), _kept(points, keep), _kept(scores, keep)
    if not strictly_increasing(names):
        order = np.argsort(names, kind="stable")
        names, points, scores = names[order], points[order], scores[order]
    return TrainingIndex(names, np.asarray(points, dtype=np.float32), np.asarray(scores, dtype=np.float64),
                         Path(images), report)


def _kept(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``values[keep]``, without a copy when every row is kept (millions of names are hundreds of MB)."""
    return values if bool(np.all(keep)) else values[keep]


def _valid_landmarks(points: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """:func:`aikd.align.valid_landmarks` a chunk of faces at a time: its float64 work arrays stay small."""
    usable = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), chunk):
        usable[start:start + chunk] = valid_landmarks(points[start:start + chunk])
    return usable


def _read_landmarks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    names, points = read_landmark_arrays(path)
    return names, np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)


def _read_labels(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    names, scores = read_label_arrays(path, column)  # a pickle has no columns: the reader ignores ``column``
    return names, np.asarray(scores, dtype=np.float64)


def _first_occurrences(
    names: np.ndarray, values: np.ndarray, report: IndexReport, problem: str, source: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique names with the values of their first occurrence; repeated names are reported (and warned
    about, naming ``source``, as every reader of these files does). Names already sorted and unique (as such files
    are usually written) are taken as they are: no sorted copy of millions of names."""
    if strictly_increasing(names):
        return names, values
    unique, first = np.unique(names, return_index=True)
    if len(unique) < len(names):
        repeated = np.ones(len(names), dtype=bool)
        repeated[first] = False
        twice = np.unique(names[repeated])
        report.add(problem, twice)
        log_repeated(twice.tolist(), source)
    return unique, values[first]


def _one_to_one(rows: np.ndarray, report: IndexReport, names: np.ndarray, problem: str) -> np.ndarray:
    """``rows`` with every row after its first use set to -1: two names standing for one entry (``a.jpg`` and
    ``./a.jpg``) are one face, the first kept and the others reported."""
    rows = rows.copy()
    found = np.flatnonzero(rows >= 0)
    _, first = np.unique(rows[found], return_index=True)
    repeated = np.setdiff1d(found, found[first], assume_unique=True)
    rows[repeated] = -1
    report.add(problem, names[repeated])
    return rows


def _walk_images(root: Path) -> np.ndarray:
    """Sorted relative POSIX paths of the image files under ``root``: one ``os.scandir`` per real folder, each
    folder's names made an array at once (no Python string per image kept)."""
    found: list[np.ndarray] = []
    pending = [("", os.fspath(root))]
    walked: set[str] = set()  # real folders: links are followed, each real folder once (no loops)
    while pending:
        prefix, folder = pending.pop()
        real = os.path.realpath(folder)
        if real in walked:
            continue
        walked.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise ValueError(f"data.images: cannot list {folder} ({err.strerror})") from None
        here = []
        for entry in entries:
            if entry.is_dir():
                pending.append((f"{prefix}{entry.name}/", entry.path))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                here.append(prefix + entry.name)
        if here:
            found.append(np.array(here, dtype=str))
    if not found:
        return np.zeros(0, dtype="<U1")
    files = np.concatenate(found)
    del found
    return files if strictly_increasing(files) else np.unique(files)


# ------------------------------------------------------------------------------------------------- split
def split_by_label(labels: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The AI-KD validation split: sort faces by label and let every k-th one validate (k = 1 / fraction).

    Returns:
        (train positions, validation positions), each sorted ascending; together they cover every face once.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    count = len(labels)
    if count < 2:
        raise ValueError(f"need at least 2 faces to split into training and validation, got {count}")
    step = max(2, int(round(1.0 / val_fraction)))
    order = np.argsort(np.asarray(labels), kind="stable")
    val = np.sort(order[::step])
    train = np.setdiff1d(np.arange(count), val, assume_unique=True)
    return train, val


# ------------------------------------------------------------------------------------------------ dataset
TRAIN_STREAM, VAL_STREAM = 0, 1  # separate noise streams for training and validation draws


class DistillationDataset(Dataset):
    """Pairs of views of the same face: aligned (teacher) and misaligned (student), with label and index.

    Args:
        index: the faces.
        positions: index positions this dataset covers (e.g. the training part of the split).
        preprocessing: the model's input preprocessing (size, scaling, channel order).
        misalignment: the landmark noise of the student's view.
        seed: base of the noise; the landmarks of a draw come from ``(seed, stream, epoch, index position)``.
        stream: :data:`TRAIN_STREAM` or :data:`VAL_STREAM` (validation draws one fixed misalignment).

    An item is a dict: ``misaligned`` and ``aligned`` (3, H, W) float32 tensors, ``quality`` (float32
    scalar tensor), ``index`` (the index position, int64) and ``replaced`` (int64: the position of a face
    whose image could not be decoded and that this one stands in for, else -1). ``aligned`` is left out for
    positions marked in :attr:`skip_aligned` (their teacher embedding is cached).

    A face whose image cannot be decoded (the index checked names, not pixels) does not stop training: the
    next face of the dataset stands in for it, and ``replaced`` tells the trainer, which reports it.
    """

    def __init__(
        self,
        index: TrainingIndex,
        positions: np.ndarray,
        preprocessing: Preprocessing,
        misalignment: Misalignment,
        seed: int = 0,
        stream: int = TRAIN_STREAM,
    ) -> None:
        height, width = preprocessing.input_size
        if height != width:
            raise ValueError(f"aligned faces are square; the model's input size is {height}x{width}")
        self.index, self.positions = index, np.asarray(positions, dtype=np.int64)
        self.preprocessing, self.misalignment = preprocessing, misalignment
        self.seed, self.stream, self.epoch = int(seed), int(stream), 0
        self.skip_aligned: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh misalignments: the noise of an item depends on the epoch (training stream only)."""
        self.epoch = int(epoch)

    def misaligned_landmarks(self, position: int) -> np.ndarray:
        """The student's landmarks for face ``position`` in the current epoch (the index is not modified)."""
        epoch = self.epoch if self.stream == TRAIN_STREAM else 0
        rng = np.random.default_rng([self.seed, self.stream, epoch, int(position)])
        return self.misalignment.sample(self.index.landmarks[position], rng)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        position, image, replaced = self._decodable(item)
        misaligned = self.preprocessing.align(image, self.misaligned_landmarks(position))
        sample = {
            "misaligned": self.preprocessing.to_tensor(misaligned)[0],
            "quality": torch.tensor(self.index.labels[position], dtype=torch.float32),
            "index": torch.tensor(position, dtype=torch.int64),
            "replaced": torch.tensor(replaced, dtype=torch.int64),
        }
        if self.skip_aligned is None or not self.skip_aligned[position]:
            aligned = self.preprocessing.align(image, self.index.landmarks[position])
            sample["aligned"] = self.preprocessing.to_tensor(aligned)[0]
        return sample

    def _decodable(self, item: int, attempts: int = 16) -> tuple[int, np.ndarray, int]:
        """(position, image, replaced): face ``item``, or the next decodable one standing in for it."""
        first = int(self.positions[item])
        for step in range(min(attempts, len(self.positions))):
            position = int(self.positions[(item + step) % len(self.positions)])
            try:
                return position, self.index.load_image(position), (first if step else -1)
            except ValueError as err:
                error = err
        raise ValueError(f"{attempts} faces in a row cannot be decoded, e.g. {error}; check data.images")


def collate_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items; ``aligned`` holds only the items that have it, ``aligned_rows`` says which rows they are."""
    batch = {key: torch.stack([item[key] for item in items]) for key in ("misaligned", "quality", "index", "replaced")}
    rows = [row for row, item in enumerate(items) if "aligned" in item]
    batch["aligned_rows"] = torch.tensor(rows, dtype=torch.int64)
    if rows:
        batch["aligned"] = torch.stack([items[row]["aligned"] for row in rows])
    else:
        batch["aligned"] = torch.zeros((0, *items[0]["misaligned"].shape), dtype=items[0]["misaligned"].dtype)
    return batch


class _SkipSampler(Sampler[int]):
    """The indices of ``base`` after the first ``skip``: resuming in the middle of an epoch."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, max(0, int(skip))

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: DistillationDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over this process's share of ``dataset`` (:class:`DistributedSampler`), from ``start_batch``.

    The order is a function of ``(seed, epoch)`` only, so a resumed run sees the same batches. Training
    drops the last incomplete batch: a batch of one face cannot be normalised by the student's BatchNorm.
    """
    dataset.set_epoch(epoch)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_SkipSampler(sampler, start_batch * batch_size),
        num_workers=workers,
        collate_fn=collate_pairs,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=False,
    )
