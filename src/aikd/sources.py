"""How input photos become 112x112 model inputs: as they come, aligned by landmarks, or detected first.

Shared by ``score``, ``embed`` and ``label``:

- default: the image is taken as it comes and resized to 112x112 (AI-KD is alignment-invariant; for
  FR embeddings this assumes already aligned crops, hence ``--aligned`` as an explicit synonym);
- ``--landmarks FILE``: five-point alignment with landmarks from a CSV/pickle, matched by image key;
- ``--detect``: landmarks from the face detector (most confident face);
- ``--misalign P --seed S``: the landmarks are jittered by U[-P, P] px before alignment, with noise
  determined by (seed, image key) alone, so resuming or sharding a run does not change it.
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from aikd.align import ALIGNED_SIZE, align_face, as_landmarks, misalign
from aikd.images import ImageInput, match_landmarks
from aikd.io import read_landmarks

__all__ = ["add_source_arguments", "make_prepare", "resize_to"]

Prepare = Callable[[np.ndarray, ImageInput], np.ndarray]


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--landmarks``, ``--detect``, ``--aligned``, ``--misalign`` and ``--seed`` to ``parser``."""
    group = parser.add_argument_group("how faces are cropped")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--landmarks", type=Path, metavar="FILE",
                           help="align each image with its 5 landmarks from FILE (CSV path,x1,y1,...,x5,y5 "
                                "or the official pickle); images without landmarks are reported as errors")
    exclusive.add_argument("--detect", action="store_true",
                           help="detect the most confident face and align it (needs the detect extra)")
    exclusive.add_argument("--aligned", action="store_true",
                           help="inputs are already aligned crops (the default: resized to 112x112 as they come)")
    group.add_argument("--detector", default="retinaface", help="detector for --detect (default: %(default)s)")
    group.add_argument("--detect-threshold", type=float, default=0.5, metavar="T",
                       help="detector confidence threshold (default: %(default)s)")
    group.add_argument("--misalign", type=float, default=0.0, metavar="P",
                       help="jitter every landmark coordinate by U[-P, P] px before aligning (default: 0)")
    group.add_argument("--seed", type=int, default=0, help="seed of the misalignment noise (default: 0)")


def resize_to(image: np.ndarray, size: int | tuple[int, int] = ALIGNED_SIZE) -> np.ndarray:
    """Resize to ``size`` (a side, or (height, width)): area filter when shrinking, bilinear when enlarging.

    Returns ``image`` itself when it already has that size.
    """
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] > height or image.shape[1] > width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)


def _jitter(landmarks: np.ndarray, key: str, max_shift: float, seed: int) -> np.ndarray:
    if max_shift <= 0:
        return landmarks
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    return misalign(landmarks, rng, max_shift=max_shift)


def make_prepare(args: argparse.Namespace, items: Sequence[ImageInput]) -> Prepare:
    """The per-image preparation the source options ask for (runs in the decode worker threads)."""
    if args.misalign < 0:
        raise ValueError(f"--misalign must be >= 0 pixels, got {args.misalign}")
    if args.misalign > 0 and not (args.landmarks or args.detect):
        raise ValueError("--misalign jitters landmarks: it needs --landmarks FILE or --detect")
    if args.landmarks is not None:
        table = read_landmarks(args.landmarks)
        matched, missing = match_landmarks(items, table.paths, table.landmarks)
        by_key = {item.key: matched[i] for i, item in enumerate(items)}
        missing_keys = {items[i].key for i in missing}
        source = str(args.landmarks)

        def prepare(image: np.ndarray, item: ImageInput) -> np.ndarray:
            if item.key in missing_keys:
                raise ValueError(f"no landmarks for this image in {source}")
            landmarks = as_landmarks(by_key[item.key])
            return align_face(image, _jitter(landmarks, item.key, args.misalign, args.seed))

        return prepare
    if args.detect:
        from aikd.detect import thread_local_detector

        detector_for_thread = thread_local_detector(args.detector, single_threaded=getattr(args, "workers", 0) > 0,
                                                    score_threshold=args.detect_threshold)

        def prepare(image: np.ndarray, item: ImageInput) -> np.ndarray:
            faces = detector_for_thread().detect(image)
            if not faces:
                raise ValueError("no face found")
            landmarks = as_landmarks(faces[0].landmarks)
            return align_face(image, _jitter(landmarks, item.key, args.misalign, args.seed))

        return prepare
    return lambda image, item: resize_to(image)
