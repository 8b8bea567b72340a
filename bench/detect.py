"""Face-detection throughput on the CPU: images per second at 112 px and at 640 px.

Two real photos shipped with installed packages (scikit-image's astronaut, matplotlib's grace_hopper.jpg),
resized so their longer side is 112 or 640 pixels, are detected one at a time, as a detection run over a
folder does. Each repeat times ``--number`` detections; the figure is the median over ``--repeats``.

    PYTHONPATH=src python bench/detect.py                       # retinaface, the default detector
    PYTHONPATH=src python bench/detect.py --detector mtcnn --repeats 7

The last line printed is one JSON object with keys ``img_s_112`` and ``img_s_640`` (and ``detector``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

import cv2
import numpy as np

from aikd.demo.samples import sample_photos
from aikd.detectors import DETECTORS, Detector, get_detector
from aikd.runtime import describe_cpu

SIZES = (112, 640)


def load_photos() -> list[np.ndarray]:
    """The astronaut (512x512) and Grace Hopper (600x512) photos, RGB uint8 (:mod:`aikd.demo.samples`)."""
    return list(sample_photos().values())


def resize_longer_side(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` scaled (aspect kept) so that its longer side is ``size`` pixels."""
    height, width = image.shape[:2]
    factor = size / max(height, width)
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (round(width * factor), round(height * factor)), interpolation=interpolation)


def images_per_second(detector: Detector, images: Sequence[np.ndarray], number: int, repeats: int) -> float:
    """Median over ``repeats`` of ``number`` single-image detections per second (after one warm-up pass)."""
    for image in images:
        detector.detect(image)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k in range(number):
            detector.detect(images[k % len(images)])
        rates.append(number / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", default="retinaface", choices=sorted(DETECTORS))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    parser.add_argument(
        "--number", type=int, default=0, help="detections per repeat (0: 200 at 112 px, 20 at 640 px)"
    )
    args = parser.parse_args(argv)
    print(f"cpu: {describe_cpu()}", flush=True)

    detector = get_detector(args.detector)
    photos = load_photos()
    print(f"detector: {detector!r}; opencv {cv2.__version__}, numpy {np.__version__}")
    result: dict[str, object] = {"detector": args.detector}
    for size in SIZES:
        images = [resize_longer_side(photo, size) for photo in photos]
        found = sum(bool(detector.detect(image)) for image in images)
        number = args.number or (200 if size <= 112 else 20)
        rate = images_per_second(detector, images, number, args.repeats)
        shapes = ", ".join(f"{image.shape[1]}x{image.shape[0]}" for image in images)
        print(f"{size:4d} px ({shapes}): {rate:8.1f} img/s  ({1000 / rate:6.2f} ms/img, faces found in "
              f"{found}/{len(images)} photos, median of {args.repeats} x {number})")
        result[f"img_s_{size}"] = round(rate, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
