"""``aikd demo`` as a library function: AI-KD on a real face-recognition model and real faces, end to end.

    from aikd.demo.run import DemoOptions, run_demo
    summary = run_demo(DemoOptions(out=Path("demo_out")))     # under 3 minutes of CPU on 2 cores

Every step calls the library that the ``aikd`` commands call (the file pipeline, training, the report, the ONNX
export), so the demo exercises what users run:

1. photos: the sample photos installed packages ship (:mod:`aikd.demo.samples`: the astronaut, Grace Hopper and
   ``faces`` low-resolution LFW faces), and their faces detected (:mod:`aikd.pipeline.detection`);
2. each face with 21 degraded copies (blur, noise, JPEG, downscaling, under- and over-exposure, occlusion at three
   levels: :mod:`aikd.demo.degradations`), its identities split into training and held-out ones
   (:mod:`aikd.demo.showcase`);
3. labels: CR-FIQA's certainty ratio from identity centres with dlib's ResNet face descriptor (``dlib-r29``),
   rank-normalised (:mod:`aikd.pipeline.labelling`);
4. training (configs/demo_dlib.yaml): the AI-KD student (dlib-r29 + quality head) distilled from the frozen dlib
   teacher with misaligned faces (:mod:`aikd.training`);
5. the held-out faces: the student's qualities and the label technique's, each on aligned and on misaligned
   faces, and a random order (the label technique's first pass keeps the dlib-r29 embeddings of the aligned
   faces, ``certainty.embeddings.npz``: what the comparisons use);
6. the ERC of each (mated = degraded copy vs original, non-mated = different faces; :mod:`aikd.evaluation.report`);
7. the student exported to ONNX, with its parity check (:mod:`aikd.inference.export`);
8. the report: ``report.md`` with a contact sheet, quality vs degradation, the ERC and the alignment
   sensitivity, and ``summary.json`` with the figures.

The student is a demo model (a few hundred degraded copies of a few dozen faces). Production-grade scores come
from the paper's checkpoints or a run of ``configs/aikd_r100.yaml`` on a real training set; the report says so.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aikd.demo.steps import detect_faces, label_with, step_ok, train_student
from aikd.demo.steps import score_with as _score
from aikd.io import read_labels, read_landmarks, write_qualities
from aikd.pipeline.crops import CropOptions

__all__ = ["DEFAULT_FACES", "MISALIGN", "DemoOptions", "run_demo"]

MISALIGN = 3.0  # the paper's U[-3, 3] px per landmark coordinate
DEFAULT_FACES = 30
STEPS = 8


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs on.

    Attributes:
        out: the output folder.
        faces: low-resolution LFW faces (scikit-image lfw_subset) besides the two sample photos; half train, half
            are held out.
        epochs: training epochs of the student (``None``: as configs/demo_dlib.yaml).
        misalign: landmark jitter U[-P, P] px of the student's training faces and of the held-out faces'
            misaligned view (the paper's 3).
        seed: seed of the split, degradations and training.
        overwrite: empty an existing demo output folder first (refused for any other folder).
        compare: afterwards, every technique that needs no download side by side (:mod:`aikd.demo.compare`;
            minutes more: FaceQAN is slow).
    """

    out: Path = Path("demo_out")
    faces: int = DEFAULT_FACES
    epochs: int | None = None
    misalign: float = MISALIGN
    seed: int = 0
    overwrite: bool = False
    compare: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.faces <= 100:
            raise ValueError(f"--faces must be 2..100 (lfw_subset holds 100 faces), got {self.faces}")
        if not self.misalign >= 0:
            raise ValueError(f"--misalign must be >= 0 pixels, got {self.misalign}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")


class _Steps:
    """Prints each step's title with its number and the time so far."""

    def __init__(self) -> None:
        self.started, self.number, self.seconds = time.perf_counter(), 0, {}
        self._title, self._since = "", self.started

    def next(self, title: str) -> None:
        self._close()
        self.number += 1
        self._title, self._since = title, time.perf_counter()
        print(f"\n== [{self.number}/{STEPS}] {title}  ({self.elapsed():.0f} s so far)", file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self._title:
            self.seconds[self._title] = round(time.perf_counter() - self._since, 1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def done(self) -> dict[str, float]:
        self._close()
        self._title = ""
        return dict(self.seconds)


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to run the demo there again")
        if not (out / "photos").is_dir() or not (out / "landmarks.csv").exists():
            raise ValueError(f"{out} does not look like an aikd demo folder; --overwrite empties only those, "
                             "choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _label(images: Path, output: Path, crop: CropOptions | None, method: str = "certainty",
           labels: Path | None = None) -> None:
    """``aikd label --method certainty --weights dlib`` (or ``--method import --labels L --normalise rank``)."""
    from aikd.pipeline.labelling import LabelOptions

    if method == "import":
        from aikd.labelers.imported import ImportOptions

        options = LabelOptions("import", imported=ImportOptions(labels, "quality", "rank"))
    else:
        options = LabelOptions("certainty", weights="dlib", seed=crop.seed)
    label_with(images, output, crop, options)


def _train(out: Path, train: Path, landmarks: Path, labels: Path, options: DemoOptions) -> None:
    """``aikd train --config configs/demo_dlib.yaml`` with the demo's data and seed, into ``OUT/run``."""
    train_student(out / "run", train, landmarks, labels, options)




def _evaluate(out: Path, heldout: Path) -> None:
    """``aikd evaluate`` of the five orders of the held-out faces (ERC, fixed threshold)."""
    from aikd.evaluation import protocols, report

    names = ["AI-KD", "AI-KD (misaligned)", "certainty", "certainty (misaligned)", "random"]
    files = ["aikd", "aikd_misaligned", "certainty", "certainty_misaligned", "random"]
    job = report.Job("dlib-r29", "held-out", heldout / "certainty.embeddings.npz", heldout / "pairs.csv",
                     {name: heldout / f"{file}.csv" for name, file in zip(names, files, strict=True)},
                     "auto", protocols.LFW_PATTERN, "identity")
    settings = report.Settings.make(None, None, "fixed", False, True, {})
    rows, _ = report.write_report([job], settings, out / "erc", 2000, plots=True)
    print(report.summary(rows))


def _export(checkpoint: Path, output: Path) -> None:
    """``aikd export`` of the student, with its parity check."""
    from aikd.inference.export import check_onnx, export_onnx, relative_difference
    from aikd.models import load_quality_model

    model = load_quality_model(checkpoint)
    export_onnx(model, output)
    worst = check_onnx(model, output)
    print(f"parity with torch (fp32, random faces): max |quality diff| {worst['quality']:.3g}, max |embedding "
          f"diff| {worst['embedding']:.3g}", file=sys.stderr)
    if not relative_difference(worst, "quality") <= 1e-4:
        raise ValueError(f"the ONNX export of {checkpoint} differs from torch by {worst['quality']:.3g}")


def _photos(out: Path, faces: int, steps: _Steps) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sample photos written to OUT/originals, and the landmarks detection finds in them."""
    from aikd.demo.samples import lfw_subset_faces, sample_photos
    from aikd.demo.showcase import write_png

    steps.next("sample photos and their faces")
    photos = {**sample_photos(), **lfw_subset_faces(faces)}
    folder = out / "originals"
    for name, photo in photos.items():
        write_png(folder / f"{name}.png", photo)
    step_ok("detect", detect_faces(folder, out / "originals_landmarks.csv"), allowed=(0, 1))
    table = read_landmarks(out / "originals_landmarks.csv")
    landmarks = {Path(name).stem: points for name, points in zip(table.paths, table.landmarks, strict=True)
                 if np.isfinite(points).all()}
    missing = sorted(set(photos) - set(landmarks))
    if missing:
        print(f"no face found in {len(missing)} photo(s), left out: {', '.join(missing)}", file=sys.stderr)
    return {name: photos[name] for name in landmarks}, landmarks


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run every step (see the module docstring); returns the summary written to ``summary.json``."""
    from aikd.demo.showcase import split_identities, write_face_set, write_pairs
    from aikd.runtime import describe_cpu

    out = options.out
    _prepare_folder(out, options.overwrite)
    steps = _Steps()
    photos, landmarks = _photos(out, options.faces, steps)
    steps.next("degraded copies, split into training and held-out faces")
    training, held_out = split_identities(sorted(photos), seed=options.seed)
    keys = write_face_set(photos, landmarks, {"train": training, "heldout": held_out}, out / "photos",
                          out / "landmarks.csv", seed=options.seed)
    print(f"{len(keys['train'])} training images of {len(training)} faces, {len(keys['heldout'])} held-out images "
          f"of {len(held_out)} faces", file=sys.stderr)
    lm, train, heldout = out / "landmarks.csv", out / "photos" / "train", out / "photos" / "heldout"
    aligned = CropOptions(landmarks=lm)

    steps.next("labels: CR-FIQA certainty with dlib's face recogniser (dlib-r29)")
    _label(train, out / "labels" / "certainty.csv", aligned)
    _label(train, out / "labels" / "train.csv", None, "import", out / "labels" / "certainty.csv")

    steps.next("train the AI-KD student (dlib-r29 + quality head) on misaligned faces")
    _train(out, train, lm, out / "labels" / "train.csv", options)

    steps.next("held-out faces: the student's and the label technique's qualities, aligned and misaligned")
    _held_out(out, heldout, lm, keys["heldout"], options.seed, options.misalign)

    steps.next("ERC with aikd evaluate")
    mated, nonmated = write_pairs(keys["heldout"], out / "heldout" / "pairs.csv")
    _evaluate(out, out / "heldout")

    steps.next("export the student to ONNX")
    _export(out / "run" / "best.pt", out / "model.onnx")

    steps.next("report")
    facts = {"training_images": len(keys["train"]), "training_identities": len(training),
             "heldout_images": len(keys["heldout"]), "heldout_identities": len(held_out),
             "copies_per_face": len(keys["heldout"]) // len(held_out) - 1, "misalign": options.misalign,
             "mated_pairs": mated, "nonmated_pairs": nonmated, "seed": options.seed, "cpu": describe_cpu()}
    summary = _report(out, keys["heldout"], str(heldout), str(lm), facts, steps)
    if options.compare:
        summary = _compare(out, keys["heldout"], options, summary)
    return summary


def _compare(out: Path, keys: list[str], options: DemoOptions, summary: dict[str, Any]) -> dict[str, Any]:
    """``--compare``: every technique side by side (:mod:`aikd.demo.compare`), added to the summary and report."""
    import json

    from aikd.demo.compare import run_comparison
    from aikd.io import atomic_write

    print("\n== comparison of the FIQA techniques on dlib-r29 (--compare)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    comparison = run_comparison(out, keys, options)
    summary = {**summary, "comparison": comparison, "compare_seconds": round(time.perf_counter() - started, 1)}
    with atomic_write(out / "summary.json") as handle:
        json.dump(summary, handle, indent=2)
    with open(out / "report.md", "a", encoding="utf-8") as handle:
        handle.write("\n## All techniques side by side\n\nSee [compare/comparison.md](compare/comparison.md) "
                     f"(`aikd demo --compare`, {summary['compare_seconds']:.0f} s more).\n")
    return summary


def _held_out(out: Path, heldout: Path, landmarks: Path, keys: list[str], seed: int, misalign: float) -> None:
    h = out / "heldout"
    aligned = CropOptions(landmarks=landmarks)
    misaligned = CropOptions(landmarks=landmarks, misalign=misalign, seed=seed + 1)
    checkpoint = out / "run" / "best.pt"
    _score(heldout, checkpoint, aligned, h / "aikd.csv")
    _score(heldout, checkpoint, misaligned, h / "aikd_misaligned.csv")
    _label(heldout, h / "certainty.csv", aligned)
    _label(heldout, h / "certainty_misaligned.csv", misaligned)
    write_qualities(h / "random.csv", keys, np.random.default_rng(seed + 2).random(len(keys)))


def _report(out: Path, keys: list[str], heldout: str, landmarks: str, facts: dict, steps: _Steps) -> dict:
    import yaml

    from aikd.demo.showcase import Method, write_report
    from aikd.evaluation import report
    from aikd.images import load_image
    from aikd.models import get_spec

    def qualities(name: str) -> np.ndarray:
        table = read_labels(out / "heldout" / f"{name}.csv").as_dict()
        return np.array([table[key] for key in keys], dtype=np.float64)

    methods = [Method("AI-KD", qualities("aikd"), qualities("aikd_misaligned")),
               Method("certainty", qualities("certainty"), qualities("certainty_misaligned")),
               Method("random", qualities("random"))]
    preprocessing = get_spec("dlib-r29").preprocessing
    table = read_landmarks(landmarks)
    points = dict(zip(table.paths, table.landmarks, strict=True))

    def crop(key: str) -> np.ndarray:
        return preprocessing.align(load_image(Path(heldout) / key), points[f"heldout/{key}"])

    config = yaml.safe_load((out / "run" / "config.yaml").read_text())
    facts = {**facts, "trainable_tensors": config["student"]["trainable_tensors"]}
    erc_plot = next((out / "erc").glob("edc_*fixed.png"))
    pauc = report.read_pauc(out / "erc" / "pauc.csv")
    facts["fnmr0"] = report.read_fnmr0(out / "erc" / "pauc.csv")

    def timing() -> dict:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        return {"step_seconds": steps.done(), "seconds": round(steps.elapsed(), 1), "load_average": load}

    return write_report(out, keys, methods, crop, erc_plot, pauc, facts, timing)
