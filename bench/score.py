"""End-to-end scoring throughput (decode + preprocess + model) of each inference path against a naive baseline.

A folder of generated 112x112 JPEG "faces" is scored by

- ``naive``: PIL decode in the main thread, :class:`~aikd.models.Preprocessing`, the plain eager fp32 model
  (no folding, contiguous layout), one batch at a time;
- every path of :class:`aikd.inference.Engine` asked for, through the job runner ``aikd score`` uses
  (decode and preprocessing in worker threads, journal fsynced per batch): ``torch-fp32`` (the default:
  BatchNorm folded, channels_last), ``onnxruntime-fp32``, and ``torch-bf16`` (only where the CPU has native
  bf16 arithmetic, or when named with ``--paths``).

The model is an iResNet with random weights (fixed seed) and calibrated BatchNorm (uncalibrated random
iResNets explode; NOTES.md). Paths run interleaved, ``--repeats`` times; each figure is the median over
repeats, and each ratio the median of the per-repeat ratios (machines here are shared and noisy). Scores of
the first repeat are compared with the naive fp32 scores: max abs difference and Spearman correlation.
``fastest`` is the fastest path whose Spearman is at least 0.999.

    PYTHONPATH=src python bench/score.py                    # iResNet-100, batch 32, 64 images, 3 repeats
    PYTHONPATH=src python bench/score.py --arch r50 --images 128 --paths torch-fp32,onnxruntime-fp32

The last line printed is one JSON object (keys ``naive_img_s``, ``fp32_img_s``, ``fp32_ratio``,
``fp32_max_abs_diff``, ``fastest``, ``fastest_img_s``, ``fastest_ratio``, ``fastest_spearman``, ``paths``...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aikd.images import ImageInput
from aikd.inference import Engine
from aikd.jobs import ItemResult, run_job
from aikd.models import build_model, calibrate_batchnorm
from aikd.runtime import cpu_has_bf16, describe_cpu

PATHS = {
    "torch-fp32": {"backend": "torch", "precision": "fp32"},
    "onnxruntime-fp32": {"backend": "onnxruntime", "precision": "fp32"},
    "torch-bf16": {"backend": "torch", "precision": "bf16"},
}
SPEARMAN_BAR = 0.999


def make_faces(folder: Path, count: int, seed: int = 0) -> list[ImageInput]:
    """``count`` smooth random 112x112 RGB JPEGs (upsampled noise, so JPEG and the model see structure)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        face = Image.fromarray(small).resize((112, 112), Image.BILINEAR)
        path = folder / f"{i:05d}.jpg"
        face.save(path, quality=90)
        items.append(ImageInput(path, path.name))
    return items


def score_naive(model: torch.nn.Module, items: Sequence[ImageInput], batch_size: int) -> np.ndarray:
    """The baseline: decode in the main thread, preprocess, plain eager fp32 forward."""
    qualities = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            faces = [np.asarray(Image.open(item.path).convert("RGB")) for item in items[start:start + batch_size]]
            qualities.append(model(model.preprocessing(faces))[1].numpy())
    return np.concatenate(qualities)


def score_with_engine(engine: Engine, items: Sequence[ImageInput], batch_size: int, workers: int,
                      scratch: Path) -> np.ndarray:
    """What ``aikd score`` does per batch: threaded decode + preprocessing, engine forward, journal."""
    output = scratch / f"scores-{time.monotonic_ns()}.csv"

    def process(batch: list[np.ndarray], batch_items: list[ImageInput]) -> list[ItemResult]:
        _, qualities = engine(batch)
        return [ItemResult(rows=[[float(q)]]) for q in qualities]

    results = run_job(items, process, output, batch_size=batch_size, workers=workers,
                      prepare=lambda image, item: engine.prepare(image), desc="bench")
    return np.array([results[item.key].rows[0][0] for item in items], dtype=np.float32)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks (ties get their average rank)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        ordinal = np.empty(len(x))
        ordinal[np.argsort(x, kind="stable")] = np.arange(len(x))
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, weights=ordinal) / counts)[inverse]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def timed(run: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = calibrate_batchnorm(build_model(args.arch), batches=4, batch_size=8, seed=args.seed).eval()
    names = args.paths.split(",") if args.paths else [n for n in PATHS if n != "torch-bf16" or cpu_has_bf16()]
    unknown = sorted(set(names) - set(PATHS))
    if unknown:
        raise SystemExit(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}")
    with tempfile.TemporaryDirectory(prefix="aikd-bench-") as tmp:
        scratch = Path(tmp)
        items = make_faces(scratch / "faces", args.images, args.seed)
        engines, setup = {}, {}
        for name in names:
            start = time.perf_counter()
            engines[name] = Engine(model, device="cpu", **PATHS[name])
            setup[name] = time.perf_counter() - start
        # Warm-up: one batch through every path (allocator, oneDNN primitive caches, onnxruntime arenas).
        score_naive(model, items[: args.batch_size], args.batch_size)
        for engine in engines.values():
            score_with_engine(engine, items[: args.batch_size], args.batch_size, args.workers, scratch)
        rates: dict[str, list[float]] = {name: [] for name in ["naive", *names]}
        scores: dict[str, np.ndarray] = {}
        for repeat in range(args.repeats):
            result, seconds = timed(lambda: score_naive(model, items, args.batch_size))
            scores.setdefault("naive", result)
            rates["naive"].append(len(items) / seconds)
            for name in names:
                result, seconds = timed(lambda e=engines[name]: score_with_engine(
                    e, items, args.batch_size, args.workers, scratch))
                scores.setdefault(name, result)
                rates[name].append(len(items) / seconds)
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{n} {r[-1]:.2f} img/s" for n, r in rates.items()), file=sys.stderr, flush=True)
    return summarise(args, names, rates, scores, setup)


def summarise(args: argparse.Namespace, names: list[str], rates: dict[str, list[float]],
              scores: dict[str, np.ndarray], setup: dict[str, float]) -> dict:
    naive = scores["naive"]
    paths = {}
    for name in names:
        ratios = [r / n for r, n in zip(rates[name], rates["naive"], strict=True)]
        paths[name] = {
            "img_s": round(statistics.median(rates[name]), 3),
            "ratio": round(statistics.median(ratios), 3),
            "max_abs_diff": float(np.abs(scores[name] - naive).max()),
            "mean_abs_diff": float(np.abs(scores[name] - naive).mean()),
            "spearman": round(spearman(scores[name], naive), 6),
            "setup_s": round(setup[name], 2),
        }
    good = [name for name in names if paths[name]["spearman"] >= SPEARMAN_BAR] or names
    fastest = max(good, key=lambda name: paths[name]["img_s"])
    fp32 = paths.get("torch-fp32") or paths[names[0]]
    return {
        "arch": args.arch, "batch_size": args.batch_size, "images": args.images, "repeats": args.repeats,
        "workers": args.workers, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "cpu_bf16": cpu_has_bf16(),
        "naive_img_s": round(statistics.median(rates["naive"]), 3),
        "fp32_img_s": fp32["img_s"], "fp32_ratio": fp32["ratio"], "fp32_max_abs_diff": fp32["max_abs_diff"],
        "fastest": fastest, "fastest_img_s": paths[fastest]["img_s"], "fastest_ratio": paths[fastest]["ratio"],
        "fastest_spearman": paths[fastest]["spearman"],
        "fastest_max_abs_diff": paths[fastest]["max_abs_diff"],
        "paths": paths,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r100", help="registered architecture (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="faces per forward (default: %(default)s)")
    parser.add_argument("--images", type=int, default=64, help="generated faces scored per repeat "
                        "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="decode threads of the engine paths "
                        "(default: %(default)s)")
    parser.add_argument("--paths", help=f"comma-separated subset of {', '.join(PATHS)} (default: all, bf16 "
                        "only with native CPU support)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and images (default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"cpu: {describe_cpu()}", flush=True)
    result = measure(args)
    for name, figures in result["paths"].items():
        print(f"{name:18s} {figures['img_s']:7.2f} img/s  {figures['ratio']:5.2f}x naive  "
              f"max|diff| {figures['max_abs_diff']:.2e}  spearman {figures['spearman']:.5f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
