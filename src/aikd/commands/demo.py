"""``aikd demo``: the whole pipeline on sample photos that ship with installed packages, in a minute.

    aikd demo --out demo_out

1. photos: the astronaut (scikit-image, public domain) and Grace Hopper (matplotlib), each also blurred,
   noisy, low-resolution and dark, written to ``OUT/photos``;
2. ``aikd detect`` -> ``OUT/landmarks.csv``;
3. ``aikd align`` -> ``OUT/aligned`` (proper) and ``OUT/misaligned`` (landmarks jittered by U[-3, 3] px);
4. ``aikd train`` on the built-in synthetic data source (``configs/tiny.yaml``: a tiny iResNet learns to
   regress how degraded a synthetic face is, in seconds on a CPU) -> ``OUT/run``;
5. ``aikd score`` of the aligned crops, the misaligned crops and the photos as they come;
6. ``aikd export`` -> ``OUT/model.onnx`` with its parity check;
7. a summary table (``OUT/summary.md``): quality per photo, aligned vs misaligned.

The tiny model has seen only synthetic faces and random (not face-recognition) weights: its scores show
the pipeline working, not a real quality model. For real scores, train from a real FR backbone
(``configs/aikd_r100.yaml``) or load the paper's released checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from aikd.io import atomic_write, read_labels

__all__ = ["add_arguments", "make_sample_photos", "run"]

DEGRADATIONS = ("original", "blurred", "noisy", "lowres", "dark")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd demo``."""
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of the tiny model (default: as configs/tiny.yaml)")
    parser.add_argument("--overwrite", action="store_true",
                        help="empty an existing demo output folder first (refused for any other folder)")


def _sample_photos() -> dict[str, np.ndarray]:
    from skimage import data

    photos = {"astronaut": data.astronaut()}
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            encoded = np.frombuffer(handle.read(), np.uint8)
        photos["grace_hopper"] = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    except (ImportError, OSError):  # matplotlib is an optional extra
        pass
    return photos


def _degrade(photo: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    if how == "blurred":
        return cv2.GaussianBlur(photo, (0, 0), sigmaX=4.0)
    if how == "noisy":
        return np.clip(photo + rng.normal(0, 40, photo.shape), 0, 255).astype(np.uint8)
    if how == "lowres":
        height, width = photo.shape[:2]
        small = cv2.resize(photo, (width // 8, height // 8), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    if how == "dark":
        return (255.0 * (photo / 255.0) ** 2.5 * 0.5).astype(np.uint8)
    return photo


def make_sample_photos(folder: Path, seed: int = 0) -> list[Path]:
    """Write each sample photo and its degraded versions as PNG; returns the paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, photo in _sample_photos().items():
        for how in DEGRADATIONS:
            path = folder / f"{name}_{how}.png"
            ok, encoded = cv2.imencode(".png", cv2.cvtColor(_degrade(photo, how, rng), cv2.COLOR_RGB2BGR))
            if not ok:
                raise RuntimeError(f"cannot encode {path}")
            with atomic_write(path, "wb") as handle:
                handle.write(encoded.tobytes())
            paths.append(path)
    return paths


def _step(title: str, argv: list[str], allowed: tuple[int, ...] = (0,)) -> None:
    from aikd.cli import main

    print(f"\n== {title}\n$ aikd {' '.join(argv)}", file=sys.stderr, flush=True)
    code = main(argv)
    if code not in allowed:
        raise ValueError(f"demo step '{title}' failed with exit status {code} (its error is printed above)")


def _read_scores(path: Path) -> dict[str, float]:
    return read_labels(path).as_dict()


def _tiny_config() -> Path:
    """configs/tiny.yaml of the source tree this package runs from."""
    path = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo needs configs/tiny.yaml from the aikd source tree")
    return path


def _summary(out: Path) -> str:
    aligned = _read_scores(out / "scores_aligned.csv")
    misaligned = _read_scores(out / "scores_misaligned.csv")
    as_is = _read_scores(out / "scores_as_is.csv")
    lines = ["| photo | quality (aligned) | quality (misaligned) | difference | quality (photo as it comes) |",
             "|---|---|---|---|---|"]
    keys = sorted(set(aligned) | set(as_is), key=lambda k: (k.split("_")[0], DEGRADATIONS.index(_how(k))))
    for key in keys:
        a, m, p = aligned.get(key), misaligned.get(key), as_is.get(key)
        diff = f"{abs(a - m):.4f}" if a is not None and m is not None else "-"
        lines.append(f"| {key} | {_fmt(a)} | {_fmt(m)} | {diff} | {_fmt(p)} |")
    both = [k for k in aligned if k in misaligned]
    if both:
        sensitivity = float(np.mean([abs(aligned[k] - misaligned[k]) for k in both]))
        lines.append(f"\nalignment sensitivity mean |q(aligned) - q(misaligned)| = {sensitivity:.4f} "
                     f"over {len(both)} faces")
    return "\n".join(lines) + "\n"


def _how(key: str) -> str:
    stem = Path(key).stem
    return next((how for how in DEGRADATIONS if stem.endswith(how)), "original")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    """Run every step; each is a real ``aikd`` command, so the demo exercises what users run."""
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to run the demo there again")
        if not (out / "photos").is_dir() or not (out / "landmarks.csv").exists():
            raise ValueError(f"{out} does not look like an aikd demo folder; --overwrite empties only those, "
                             "choose another --out")
        shutil.rmtree(out)
    photos = out / "photos"
    make_sample_photos(photos)
    print(f"wrote {len(list(photos.glob('*.png')))} sample photos to {photos}", file=sys.stderr)
    _step("find faces and landmarks", ["detect", str(photos), "-o", str(out / "landmarks.csv")], (0, 1))
    for name, extra in (("aligned", []), ("misaligned", ["--misalign", "3", "--seed", "0"])):
        _step(f"{name} crops", ["align", str(photos), "--landmarks", str(out / "landmarks.csv"),
                                "-o", str(out / name), *extra], (0, 1))
    overrides = [f"train.max_steps={args.steps}"] if args.steps else []
    _step("train a tiny AI-KD model on synthetic faces",
          ["train", "--config", str(_tiny_config()), "--out", str(out / "run"), *overrides])
    checkpoint = str(out / "run" / "best.pt")
    for name, folder in (("aligned", out / "aligned"), ("misaligned", out / "misaligned"), ("as_is", photos)):
        _step(f"score {name}", ["score", str(folder), "--checkpoint", checkpoint,
                                "-o", str(out / f"scores_{name}.csv")], (0, 1))
    _step("export to ONNX", ["export", "--checkpoint", checkpoint, "-o", str(out / "model.onnx")])
    table = _summary(out)
    with atomic_write(out / "summary.md") as handle:
        handle.write("# aikd demo\n\nTiny model trained on synthetic faces: the scores show the pipeline, "
                     "not a real quality model.\n\n" + table)
    print("\n" + table + f"\nall outputs in {out}/ (summary.md, scores_*.csv, run/, model.onnx)")
    return 0
