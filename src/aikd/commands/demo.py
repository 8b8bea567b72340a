"""``aikd demo``: AI-KD on a real face-recognition model and real faces, end to end, with pictures.

    aikd demo --out demo_out            # under 3 minutes of CPU on 2 cores; writes demo_out/report.md

Every step is a real ``aikd`` command (run in-process), so the demo exercises what users run:

1. photos: the sample photos installed packages ship (:mod:`aikd.demo.samples`: the astronaut, Grace Hopper and
   ``--faces`` low-resolution LFW faces), and ``aikd detect`` finds their faces;
2. each face with 21 degraded copies (blur, noise, JPEG, downscaling, under- and over-exposure, occlusion at three
   levels: :mod:`aikd.demo.degradations`), its identities split into training and held-out ones (:mod:`aikd.demo.showcase`);
3. labels: ``aikd label --method certainty`` (CR-FIQA's certainty ratio from identity centres) with dlib's ResNet
   face descriptor (``--weights dlib``, the ``dlib-r29`` architecture), rank-normalised with ``--method import``;
4. ``aikd train --config configs/demo_dlib.yaml``: the AI-KD student (dlib-r29 + quality head) distilled from
   the frozen dlib teacher with misaligned faces;
5. the held-out faces: ``aikd score`` with the student and ``aikd label`` with the label technique, each on
   aligned and on misaligned faces, and a random order (the label technique's first pass keeps the dlib-r29
   embeddings of the aligned faces, ``certainty.embeddings.npz``: what the comparisons use);
6. ``aikd evaluate``: the ERC of each (mated = degraded copy vs original, non-mated = different faces);
7. ``aikd export`` of the student to ONNX, with its parity check;
8. the report: ``report.md`` with a contact sheet, quality vs degradation, the ERC and the alignment
   sensitivity, and ``summary.json`` with the figures.

The student is a demo model (a few hundred degraded copies of a few dozen faces). Production-grade scores come
from the paper's checkpoints or a run of ``configs/aikd_r100.yaml`` on a real training set; the report says so.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from aikd.io import read_labels, read_landmarks, write_qualities

__all__ = ["add_arguments", "run"]

MISALIGN = 3.0  # the paper's U[-3, 3] px per landmark coordinate
DEFAULT_FACES = 30
STEPS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd demo``."""
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: %(default)s)")
    parser.add_argument("--faces", type=int, default=DEFAULT_FACES,
                        help="low-resolution LFW faces (scikit-image lfw_subset) besides the two sample photos; "
                             "half train, half are held out (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of the student (default: as configs/demo_dlib.yaml)")
    parser.add_argument("--misalign", type=float, default=MISALIGN, metavar="P",
                        help="landmark jitter U[-P, P] px of the student's training faces and of the held-out "
                             "faces' misaligned view (default: %(default)s, the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, degradations and training "
                                                            "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="empty an existing demo output folder first (refused for any other folder)")


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


def _aikd(argv: list[str], allowed: tuple[int, ...] = (0,)) -> None:
    from aikd.cli import main

    print(f"$ aikd {' '.join(argv)}", file=sys.stderr, flush=True)
    code = main(argv)
    if code not in allowed:
        raise ValueError(f"demo step 'aikd {argv[0]}' failed with exit status {code} (its error is printed above)")


def _config() -> Path:
    """configs/demo_dlib.yaml of the source tree this package runs from."""
    path = Path(__file__).resolve().parents[3] / "configs" / "demo_dlib.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo needs configs/demo_dlib.yaml from the aikd source tree")
    return path


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to run the demo there again")
        if not (out / "photos").is_dir() or not (out / "landmarks.csv").exists():
            raise ValueError(f"{out} does not look like an aikd demo folder; --overwrite empties only those, "
                             "choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _photos(out: Path, faces: int, steps: _Steps) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sample photos written to OUT/originals, and the landmarks ``aikd detect`` finds in them."""
    from aikd.demo.samples import lfw_subset_faces, sample_photos
    from aikd.demo.showcase import write_png

    steps.next("sample photos and their faces")
    photos = {**sample_photos(), **lfw_subset_faces(faces)}
    folder = out / "originals"
    for name, photo in photos.items():
        write_png(folder / f"{name}.png", photo)
    _aikd(["detect", str(folder), "-o", str(out / "originals_landmarks.csv")], allowed=(0, 1))
    table = read_landmarks(out / "originals_landmarks.csv")
    landmarks = {Path(name).stem: points for name, points in zip(table.paths, table.landmarks, strict=True)
                 if np.isfinite(points).all()}
    missing = sorted(set(photos) - set(landmarks))
    if missing:
        print(f"no face found in {len(missing)} photo(s), left out: {', '.join(missing)}", file=sys.stderr)
    return {name: photos[name] for name in landmarks}, landmarks


def run(args: argparse.Namespace) -> int:
    """Run every step; see the module docstring."""
    from aikd.runtime import describe_cpu
    from aikd.demo.showcase import split_identities, write_face_set, write_pairs

    if not 2 <= args.faces <= 100:
        raise ValueError(f"--faces must be 2..100 (lfw_subset holds 100 faces), got {args.faces}")
    if not args.misalign >= 0:
        raise ValueError(f"--misalign must be >= 0 pixels, got {args.misalign}")
    out: Path = args.out
    _prepare_folder(out, args.overwrite)
    steps = _Steps()
    photos, landmarks = _photos(out, args.faces, steps)
    steps.next("degraded copies, split into training and held-out faces")
    training, held_out = split_identities(sorted(photos), seed=args.seed)
    keys = write_face_set(photos, landmarks, {"train": training, "heldout": held_out}, out / "photos",
                          out / "landmarks.csv", seed=args.seed)
    print(f"{len(keys['train'])} training images of {len(training)} faces, {len(keys['heldout'])} held-out images "
          f"of {len(held_out)} faces", file=sys.stderr)
    lm, train, heldout = str(out / "landmarks.csv"), str(out / "photos" / "train"), str(out / "photos" / "heldout")

    steps.next("labels: CR-FIQA certainty with dlib's face recogniser (dlib-r29)")
    _aikd(["label", train, "--method", "certainty", "--weights", "dlib", "--landmarks", lm,
           "-o", str(out / "labels" / "certainty.csv")])
    _aikd(["label", train, "--method", "import", "--labels", str(out / "labels" / "certainty.csv"),
           "--normalise", "rank", "-o", str(out / "labels" / "train.csv")])

    steps.next("train the AI-KD student (dlib-r29 + quality head) on misaligned faces")
    overrides = [f"train.seed={args.seed}", f"data.misalignment.max_shift={args.misalign}",
                 *([f"train.epochs={args.epochs}"] if args.epochs else [])]
    _aikd(["train", "--config", str(_config()), "--out", str(out / "run"), f"data.images={train}",
           f"data.landmarks={lm}", f"data.labels={out / 'labels' / 'train.csv'}", *overrides])

    steps.next("held-out faces: the student's and the label technique's qualities, aligned and misaligned")
    _held_out(out, heldout, lm, keys["heldout"], args.seed, args.misalign)

    steps.next("ERC with aikd evaluate")
    mated, nonmated = write_pairs(keys["heldout"], out / "heldout" / "pairs.csv")
    h = out / "heldout"
    _aikd(["evaluate", "--scores", str(h / "aikd.csv"), str(h / "aikd_misaligned.csv"), str(h / "certainty.csv"),
           str(h / "certainty_misaligned.csv"), str(h / "random.csv"),
           "--names", "AI-KD", "AI-KD (misaligned)", "certainty", "certainty (misaligned)", "random",
           "--embeddings", str(h / "certainty.embeddings.npz"), "--pairs", str(h / "pairs.csv"), "--threshold", "fixed",
           "--dataset", "held-out", "--fr-model", "dlib-r29", "-o", str(out / "erc")])

    steps.next("export the student to ONNX")
    _aikd(["export", "--checkpoint", str(out / "run" / "best.pt"), "-o", str(out / "model.onnx")])

    steps.next("report")
    facts = {"training_images": len(keys["train"]), "training_identities": len(training),
             "heldout_images": len(keys["heldout"]), "heldout_identities": len(held_out),
             "copies_per_face": len(keys["heldout"]) // len(held_out) - 1, "misalign": args.misalign,
             "mated_pairs": mated, "nonmated_pairs": nonmated, "seed": args.seed, "cpu": describe_cpu()}
    summary = _report(out, keys["heldout"], heldout, lm, facts, steps)
    print(f"\nreport: {out / 'report.md'} ({summary['seconds']:.0f} s)")
    for name in ("AI-KD", "certainty", "random"):
        print(f"  {name:<10} Spearman vs degradation {summary['spearman'][name]:+.3f}   "
              f"ERC pAUC (normalised, 30 %) {summary['pauc_normalised'][name]:.3f}")
    return 0


def _held_out(out: Path, heldout: str, landmarks: str, keys: list[str], seed: int, misalign: float) -> None:
    h = out / "heldout"
    crop = ["--landmarks", landmarks]
    misaligned = [*crop, "--misalign", f"{misalign:g}", "--seed", str(seed + 1)]
    checkpoint = str(out / "run" / "best.pt")
    _aikd(["score", heldout, "--checkpoint", checkpoint, *crop, "-o", str(h / "aikd.csv")])
    _aikd(["score", heldout, "--checkpoint", checkpoint, *misaligned, "-o", str(h / "aikd_misaligned.csv")])
    _aikd(["label", heldout, "--method", "certainty", "--weights", "dlib", *crop, "-o", str(h / "certainty.csv")])
    _aikd(["label", heldout, "--method", "certainty", "--weights", "dlib", *misaligned,
           "-o", str(h / "certainty_misaligned.csv")])
    write_qualities(h / "random.csv", keys, np.random.default_rng(seed + 2).random(len(keys)))


def _report(out: Path, keys: list[str], heldout: str, landmarks: str, facts: dict, steps: _Steps) -> dict:
    import yaml

    from aikd.images import load_image
    from aikd.models import get_spec
    from aikd.demo.showcase import Method, read_fnmr0, read_pauc, write_report

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
    pauc = read_pauc(out / "erc" / "pauc.csv")
    facts["fnmr0"] = read_fnmr0(out / "erc" / "pauc.csv")

    def timing() -> dict:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        return {"step_seconds": steps.done(), "seconds": round(steps.elapsed(), 1), "load_average": load}

    return write_report(out, keys, methods, crop, erc_plot, pauc, facts, timing)
