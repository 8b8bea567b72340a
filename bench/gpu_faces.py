"""Real faces for the GPU checks: degraded copies of real face crops, in memory or as a folder of varied JPEGs.

The faces come from files that installed packages ship, plus the three aligned LFW crops of ``shared/data/faces``
where that folder is found (``$AIKD_SHARED_DATA/faces``), so nothing has to travel to a GPU machine but them:

- the 100 faces of scikit-image's ``lfw_subset()`` (25x25 grey tight crops, enlarged to 112x112);
- each face degraded by every kind and level of :mod:`aikd.demo.degradations` (blur, noise, JPEG, downscaling,
  under- and over-exposure, occlusion; levels 0-3), as ``aikd demo`` degrades its faces, so a quality model sees a
  real spread of qualities.

:func:`degraded_faces` gives the ladder in memory (the GPU tests rank it at each precision); :func:`write_jpegs`
writes ``count`` 112x112 JPEGs, each a random degraded copy moved by a small random similarity transform and saved
at a random JPEG quality (the scoring benchmark's folder: no two files alike).

    PYTHONPATH=src python bench/gpu_faces.py /tmp/faces --count 8192
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from aikd.align import ALIGNED_SIZE, ARCFACE_TEMPLATE
from aikd.demo.degradations import KINDS, LEVELS, degrade

LFW_SUBSET_FACES = 100


def shared_faces_dir() -> Path | None:
    """``$AIKD_SHARED_DATA/faces``, else ``shared/data/faces`` beside a folder above this file; ``None`` if absent."""
    if os.environ.get("AIKD_SHARED_DATA"):
        candidates = [Path(os.environ["AIKD_SHARED_DATA"]) / "faces"]
    else:
        candidates = [parent / "shared" / "data" / "faces" for parent in Path(__file__).resolve().parents]
    return next((c for c in candidates if c.is_dir() and any(c.glob("*.jpg"))), None)


def base_faces(lfw_subset: int = LFW_SUBSET_FACES) -> dict[str, np.ndarray]:
    """112x112 RGB uint8 face crops: the shared aligned LFW crops (where found) and ``lfw_subset`` of
    scikit-image's faces, keyed by name."""
    from skimage import data

    faces = {}
    shared = shared_faces_dir()
    for path in sorted(shared.glob("*.jpg")) if shared is not None else []:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        faces[path.stem] = cv2.resize(rgb, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA)
    for index, face in enumerate(data.lfw_subset()[:lfw_subset]):
        gray = np.clip(np.rint(face * 255.0), 0, 255).astype(np.uint8)
        large = cv2.resize(gray, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_CUBIC)
        faces[f"lfw_{index:03d}"] = np.repeat(large[:, :, None], 3, axis=2)
    return faces


def degraded_faces(lfw_subset: int = LFW_SUBSET_FACES, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every base face at level 0 and degraded by every kind at levels 1..3.

    Returns:
        (keys ``name/kind/level``, (N, 112, 112, 3) uint8 faces, (N,) levels).
    """
    rng = np.random.default_rng(seed)
    keys, faces, levels = [], [], []
    for name, face in base_faces(lfw_subset).items():
        keys.append(f"{name}/original/0")
        faces.append(face)
        levels.append(0)
        for kind in KINDS:
            for level in range(1, LEVELS + 1):
                keys.append(f"{name}/{kind}/{level}")
                faces.append(degrade(face, kind, level, ARCFACE_TEMPLATE, rng))
                levels.append(level)
    return keys, np.stack(faces), np.asarray(levels)


def _jitter(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``face`` moved by a small random similarity (shift up to 4 px, rotation up to 8 degrees, scale +-5 %),
    mirrored half of the time."""
    angle, scale = rng.uniform(-8, 8), rng.uniform(0.95, 1.05)
    matrix = cv2.getRotationMatrix2D((ALIGNED_SIZE / 2, ALIGNED_SIZE / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-4, 4, 2)
    moved = cv2.warpAffine(face, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), borderMode=cv2.BORDER_REFLECT)
    return moved[:, ::-1] if rng.random() < 0.5 else moved


def _write_share(args: tuple[Path, int, int, int]) -> int:
    folder, start, stop, seed = args
    faces = base_faces()
    names = sorted(faces)
    kinds = ["original", *KINDS]
    rng = np.random.default_rng([seed, start])
    for index in range(start, stop):
        face = faces[names[rng.integers(len(names))]]
        kind = kinds[rng.integers(len(kinds))]
        if kind != "original":
            face = degrade(face, kind, int(rng.integers(1, LEVELS + 1)), ARCFACE_TEMPLATE, rng)
        image = Image.fromarray(np.ascontiguousarray(_jitter(face, rng)))
        image.save(folder / f"{index:06d}.jpg", quality=int(rng.integers(70, 96)))
    return stop - start


def write_jpegs(folder: Path, count: int, seed: int = 0, processes: int | None = None) -> int:
    """Write ``count`` varied 112x112 face JPEGs ``000000.jpg`` ... into ``folder``; returns ``count``."""
    folder.mkdir(parents=True, exist_ok=True)
    processes = max(1, min(processes or os.cpu_count() or 1, count))
    bounds = np.linspace(0, count, processes + 1).astype(int)
    shares = [(folder, int(a), int(b), seed) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if processes == 1:
        return sum(map(_write_share, shares))
    # spawn, not fork: the caller may hold threads (torch's, a decoder's) that a forked child would inherit locked.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_write_share, shares))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the JPEGs go")
    parser.add_argument("--count", type=int, default=8192, help="JPEGs to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choices (default: %(default)s)")
    parser.add_argument("--processes", type=int, help="writer processes (default: one per core)")
    args = parser.parse_args(argv)
    written = write_jpegs(args.folder, args.count, args.seed, args.processes)
    print(f"wrote {written} face JPEGs to {args.folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
