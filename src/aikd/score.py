"""Quality scores of face images from an AI-KD model: ``aikd score`` and :func:`score_images`.

    aikd score faces/ --checkpoint aikd-best.pth --arch r100 -o scores.csv
    aikd score photos/ --checkpoint best.pt --detect -o scores.pkl --embeddings emb.npz
    torchrun --nproc_per_node=4 -m aikd score faces/ --checkpoint best.pt -o scores.csv   # one shard per rank

AI-KD (Babnik et al., IWBF 2024) is trained to be alignment invariant, so faces are scored as they come
(any crop, resized to 112x112) unless ``--landmarks`` or ``--detect`` asks for five-point alignment first.

Outputs, in input order: CSV ``path,quality``; ``--format pickle``, the official AI-KD ``{path: score}``
dict; or ``--format jsonl``, one ``{"path": ..., "quality": ...}`` object per line. Scores are written as
the shortest decimal that reads back to the same float32, so every format round-trips exactly. Images that
cannot be used are listed with a reason in ``OUT_STEM.errors.csv``; the run goes on (exit status 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aikd.images import ImageError, ImageInput, add_input_arguments, collect_inputs, load_image
from aikd.inference import (
    Engine,
    add_inference_arguments,
    batch_size_from_args,
    engine_from_args,
    l2_normalise,
)
from aikd.io import atomic_write, load_embeddings, safe_pickle_load, save_embeddings, write_csv
from aikd.jobs import ItemResult, check_output, finish_sharded, run_job
from aikd.runtime import distributed, resolve_device
from aikd.sources import add_source_arguments, make_prepare

__all__ = ["FORMATS", "add_arguments", "read_scores", "run", "score_images", "write_scores"]

FORMATS = ("csv", "pickle", "jsonl")
_SUFFIX_FORMATS = {".csv": "csv", ".pkl": "pickle", ".pickle": "pickle", ".p": "pickle", ".jsonl": "jsonl"}


# ------------------------------------------------------------------------------------------- Python API
def score_images(
    model: nn.Module,
    images: Any,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    *,
    precision: str = "fp32",
    backend: str = "torch",
    fold: bool = True,
    workers: int = 2,
    return_embeddings: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Quality scores of face images, as ``aikd score`` computes them (same preprocessing, same engine).

    Args:
        model: a :class:`~aikd.models.QualityModel` (not modified; it may even be in train mode).
        images: an image or a sequence of images; each a path, an (H, W, 3) RGB uint8 array or a PIL image.
            An (N, H, W, 3) uint8 array is N images. Faces are taken as they come and resized to 112x112.
        batch_size: faces per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; ``None`` runs where the model's weights are.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :class:`~aikd.inference.Engine`).
        backend: ``"torch"`` or ``"onnxruntime"``.
        fold: fold BatchNorm into the convolutions (exact).
        workers: threads decoding and preparing images.
        return_embeddings: also return the L2-normalised embeddings.

    Returns:
        float32 qualities (N,), and (N, D) float32 embeddings when ``return_embeddings``.

    Raises:
        ValueError: an image cannot be read or is not an RGB uint8 image; the message names it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
    from aikd.models import QualityModel

    if not isinstance(model, QualityModel):
        raise ValueError(f"score_images needs a QualityModel (backbone + quality head), got {type(model).__name__}")
    engine = _cached_engine(model, device, precision, backend, fold)
    images = _as_list(images)

    def prepare(index: int) -> np.ndarray:
        return engine.prepare(_as_rgb(images[index], index))

    qualities, embeddings = [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(images), batch_size):
            batch = list(pool.map(prepare, range(start, min(start + batch_size, len(images)))))
            embedding, quality = engine(batch)
            qualities.append(quality)
            embeddings.append(embedding)
    dim = engine.embedding_size
    quality = np.concatenate(qualities).astype(np.float32) if qualities else np.zeros(0, np.float32)
    if not return_embeddings:
        return quality
    return quality, (l2_normalise(np.concatenate(embeddings)) if embeddings else np.zeros((0, dim), np.float32))


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Sequence):
        return list(images)
    raise ValueError(f"expected image paths, RGB uint8 arrays or PIL images, got {type(images).__name__}")


def _is_pil(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.")


def _as_rgb(image: Any, index: int) -> np.ndarray:
    """Path, PIL image or array -> (H, W, 3) RGB uint8, decoded exactly as the command line decodes files."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(image)
        except ImageError as err:
            raise ValueError(f"{os.fspath(image)}: {err}") from None
    if _is_pil(image):
        from aikd.images import pil_to_rgb  # the decoder's own mode conversion (alpha onto black, 16-bit)

        return np.ascontiguousarray(pil_to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"image {index}: expected an (H, W, 3) RGB uint8 array, got {image.dtype} "
                             f"array of shape {image.shape}")
        return image
    raise ValueError(f"image {index}: expected a path, an RGB uint8 array or a PIL image, "
                     f"got {type(image).__name__}")


# Folding an iResNet-100 takes a moment: keep one engine per model while its weights stay the same.
_ENGINES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Engine]] = weakref.WeakKeyDictionary()


def _cached_engine(model: nn.Module, device: Any, precision: str, backend: str, fold: bool) -> Engine:
    weights = tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    key = (weights, str(resolve_device(device)), precision, backend, fold)
    cached = _ENGINES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    engine = Engine(model, device=device, precision=precision, backend=backend, fold=fold)
    _ENGINES[model] = (key, engine)
    return engine


# ---------------------------------------------------------------------------------------- score files
def _shortest(value: float) -> float:
    """The shortest decimal that reads back to the same float32 (0.1f -> 0.1, not 0.10000000149011612)."""
    return float(str(np.float32(value)))


def output_format(path: Path, requested: str | None) -> str:
    """``--format`` if given, else from the suffix (``.pkl``/``.pickle`` -> pickle, ``.jsonl``), else csv."""
    if requested is not None:
        if requested not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {requested!r}")
        return requested
    return _SUFFIX_FORMATS.get(path.suffix.lower(), "csv")


def write_scores(path: str | os.PathLike, keys: Sequence[str], qualities: Sequence[float], fmt: str = "csv") -> None:
    """Write scores atomically in input order as ``csv`` (path,quality), ``pickle`` ({path: score}) or ``jsonl``."""
    values = [_shortest(q) for q in qualities]
    if fmt == "csv":
        write_csv(path, ("path", "quality"), ([key, repr(q)] for key, q in zip(keys, values, strict=True)))
    elif fmt == "pickle":
        # The official format: a plain dict of str -> float, nothing a restricted unpickler would refuse.
        data = {str(key): float(q) for key, q in zip(keys, values, strict=True)}
        with atomic_write(path, "wb") as handle:
            handle.write(pickle.dumps(data, protocol=4))
    elif fmt == "jsonl":
        with atomic_write(path) as handle:
            for key, q in zip(keys, values, strict=True):
                handle.write(json.dumps({"path": key, "quality": q}) + "\n")
    else:
        raise ValueError(f"unknown score format {fmt!r}; use one of {', '.join(FORMATS)}")


def read_scores(path: str | os.PathLike, fmt: str | None = None) -> dict[str, float]:
    """Read a score file written by :func:`write_scores` (format from ``fmt`` or the suffix)."""
    path = Path(path)
    fmt = output_format(path, fmt)
    if fmt == "csv":
        return _read_csv_scores(path)
    if fmt == "pickle":
        data = safe_pickle_load(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict {{path: score}}, got {type(data).__name__}")
        return {str(key): float(value) for key, value in data.items()}
    scores = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                scores[str(entry["path"])] = float(entry["quality"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: not a score record ({err})") from None
    return scores


def _read_csv_scores(path: Path) -> dict[str, float]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if "path" not in header or "quality" not in header:
            raise ValueError(f"{path}: expected a header with path and quality columns, found {','.join(header)}")
        key_col, quality_col = header.index("path"), header.index("quality")
        scores = {}
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                scores[row[key_col]] = float(row[quality_col])
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{line_no}: expected path,quality, found {','.join(row)}") from None
    return scores


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd score``."""
    add_input_arguments(parser)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="quality model: an aikd checkpoint or the AI-KD release (aikd-best.pth)")
    parser.add_argument("--arch", help="backbone architecture when the checkpoint does not record it (e.g. r100)")
    parser.add_argument("-o", "--output", type=Path, default=Path("scores.csv"),
                        help="score file (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS,
                        help="csv (path,quality), pickle (the official {path: score} dict) or jsonl; "
                             "default: from the output suffix (.pkl, .jsonl), else csv")
    parser.add_argument("--embeddings", type=Path, metavar="FILE.npz",
                        help="also save the L2-normalised embedding of every scored image (aikd embed format)")
    add_source_arguments(parser)
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``aikd score``: 0 when every image was scored, 1 when some failed (listed in the errors file)."""
    from aikd.models import load_quality_model

    fmt = output_format(args.output, args.format)
    batch_size = batch_size_from_args(args, resolve_device(args.device))
    if args.embeddings is not None and args.embeddings.resolve() == args.output.resolve():
        raise ValueError("--embeddings must name a different file than -o/--output")
    items = collect_inputs(args.inputs)
    source_prepare = make_prepare(args, items)
    with distributed(args.device) as dist:
        device = dist.device
        dist.from_main(lambda: _check_outputs(args))
        engine = engine_from_args(load_quality_model(args.checkpoint, arch=args.arch), args, device)

        def prepare(image: np.ndarray, item: ImageInput) -> np.ndarray:
            return engine.prepare(source_prepare(image, item))

        def process(batch: list[np.ndarray], batch_items: list[ImageInput]) -> list[ItemResult]:
            embeddings, qualities = engine(batch)
            vectors = l2_normalise(embeddings) if args.embeddings is not None else [None] * len(batch)
            return [ItemResult(rows=[[_shortest(q)]], vector=v) for q, v in zip(qualities, vectors, strict=True)]

        results = run_job(items, process, args.output, batch_size=batch_size, workers=args.workers,
                          resume=args.resume, prepare=prepare, rank=dist.rank, world_size=dist.world_size,
                          load_previous=lambda path: _load_previous(path, fmt, args.embeddings), desc="scoring")
        write = _writer(args.output, fmt, args.embeddings, engine.embedding_size)
        return finish_sharded(dist, items, results, args.output, write, verb="scored")


def _check_outputs(args: argparse.Namespace) -> None:
    check_output(args.output, args.resume, args.overwrite)
    if args.embeddings is not None and args.embeddings.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"{args.embeddings} exists; pass --resume to continue or --overwrite to start over")


def _load_previous(path: Path, fmt: str, embeddings_path: Path | None) -> dict[str, ItemResult]:
    """The scores (and embeddings) of a finished earlier run, so ``--resume`` skips those images."""
    scores = read_scores(path, fmt)
    if embeddings_path is None:
        return {key: ItemResult(rows=[[q]]) for key, q in scores.items()}
    vectors = {}
    if embeddings_path.exists():
        keys, embeddings = load_embeddings(embeddings_path)
        vectors = dict(zip(keys, embeddings, strict=True))
    # An image scored without its embedding is not done when embeddings are asked for now.
    return {key: ItemResult(rows=[[q]], vector=vectors[key]) for key, q in scores.items() if key in vectors}


def _writer(output: Path, fmt: str, embeddings_path: Path | None, dim: int
            ) -> Callable[[list[tuple[ImageInput, ItemResult]]], None]:
    def write(good: list[tuple[ImageInput, ItemResult]]) -> None:
        keys = [item.key for item, _ in good]
        write_scores(output, keys, [result.rows[0][0] for _, result in good], fmt)
        if embeddings_path is not None:
            vectors = [result.vector for _, result in good]
            save_embeddings(embeddings_path, keys, np.stack(vectors) if vectors else np.zeros((0, dim), np.float32))

    return write
