"""``aikd score``: quality scores of face images from an AI-KD model -> ``scores.csv``.

    aikd score faces/ --checkpoint aikd-best.pth --arch r100 -o scores.csv
    aikd score photos/ --checkpoint best.pt --detect -o scores.pkl --embeddings emb.npz
    torchrun --nproc_per_node=4 -m aikd score faces/ --checkpoint best.pt -o scores.csv   # one shard per rank

AI-KD (Babnik et al., IWBF 2024) is trained to be alignment invariant, so faces are scored as they come
(any crop, resized to the model's input size) unless ``--landmarks`` or ``--detect`` asks for five-point
alignment first.

Outputs, in input order: CSV ``path,quality``; ``--format pickle``, the official AI-KD ``{path: score}``
dict; or ``--format jsonl``, one ``{"path": ..., "quality": ...}`` object per line (:func:`aikd.io.write_qualities`:
every format round-trips exactly, and ``aikd train``/``evaluate`` read them all). Images that cannot be used
are listed with a reason in ``OUT_STEM.errors.csv``; the run goes on (exit status 1).

Calibrated quality (:mod:`aikd.evaluation.calibration`): with ``--calibration calib.json`` (from ``aikd calibrate``), or a
checkpoint or ONNX file that carries its calibration, the CSV and JSONL outputs get two more columns after the
raw ``quality``: ``expected_fnmr``, the FNMR the calibration's FR model is expected to have at its FMR on
mated comparisons with this image, and ``quality_100``, 0-100 with 100 the lowest expected FNMR of the
calibration set (specific to that set).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from aikd.io import (
    QUALITY_FORMATS,
    load_embeddings,
    quality_format,
    read_labels,
    save_embeddings,
    shortest_float32,
    write_qualities,
)
from aikd.pipeline.jobs import ItemResult, JobOptions, claim_output, finish_sharded, run_job
from aikd.pipeline.crops import make_prepare

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd score``."""
    add_input_arguments(parser)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="quality model: an aikd checkpoint, the AI-KD release (aikd-best.pth), or an "
                             "ONNX file written by aikd export (run by onnxruntime)")
    parser.add_argument("--arch", help="backbone architecture when the checkpoint does not record it (e.g. r100)")
    parser.add_argument("-o", "--output", type=Path, default=Path("scores.csv"),
                        help="score file (default: %(default)s)")
    parser.add_argument("--format", choices=QUALITY_FORMATS,
                        help="csv (path,quality), pickle (the official {path: score} dict) or jsonl; "
                             "default: from the output suffix (.pkl, .jsonl), else csv")
    parser.add_argument("--embeddings", type=Path, metavar="FILE.npz",
                        help="also save the L2-normalised embedding of every scored image (aikd embed format)")
    parser.add_argument("--calibration", type=Path, metavar="JSON",
                        help="add expected_fnmr and quality_100 columns (calib.json from aikd calibrate; a "
                             "calibrated checkpoint adds them without it). quality_100 is specific to the "
                             "calibration set")
    parser.add_argument("--fr-model", metavar="NAME|NPZ",
                        help="the FR model the expected FNMR is wanted for (a name, or its embeddings from aikd "
                             "embed): warns when the calibration was made with another")
    add_crop_arguments(parser)
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``aikd score``: 0 when every image was scored, 1 when some failed (listed in the errors file)."""
    from aikd.runtime import distributed

    job, crop, inference = job_options(args), crop_options(args), inference_options(args)
    fmt = quality_format(args.output, args.format)
    output, embeddings_path = args.output, args.embeddings
    if embeddings_path is not None and embeddings_path.resolve() == output.resolve():
        raise ValueError("--embeddings must name a different file than -o/--output")
    items = collect_inputs(args.inputs)
    with distributed(inference.device, backend=inference.device_backend(args.checkpoint)) as dist:
        engine = inference.quality_engine(args.checkpoint, args.arch, dist.device)
        calibration = _calibration(args, engine)
        if calibration is not None and fmt == "pickle":
            raise ValueError("--calibration adds columns the official pickle cannot hold: write CSV or JSONL")
        settings = {"command": "score", **engine.record(), "fold": inference.fold, "crop": crop.record(),
                    "embeddings": embeddings_path is not None}
        dist.from_main(lambda: _check_embeddings(embeddings_path, job))
        claim_output(output, job, settings, dist, protected_inputs(args, items))
        crop_prepare = make_prepare(crop, items, engine.preprocessing, job.workers)

        def prepare(image: np.ndarray, item: ImageInput) -> np.ndarray:
            return engine.prepare(crop_prepare(image, item))

        def process(batch: list[np.ndarray], batch_items: list[ImageInput]) -> list[ItemResult]:
            embeddings, qualities = engine(batch)
            vectors = l2_normalise(embeddings) if embeddings_path is not None else [None] * len(batch)
            finite = np.isfinite(qualities) & np.isfinite(embeddings).all(axis=1)
            return [ItemResult(rows=[[shortest_float32(q)]], vector=v) if ok else
                    ItemResult(error=f"the model gave a non-finite quality ({q}) or embedding")
                    for q, v, ok in zip(qualities, vectors, finite, strict=True)]

        results = run_job(items, process, output, batch_size=inference.batch_size_on(dist.device),
                          workers=job.workers, resume=job.resume, prepare=prepare, rank=dist.rank,
                          world_size=dist.world_size, desc="scoring",
                          load_previous=lambda path: _load_previous(path, fmt, embeddings_path))
        write = _writer(output, fmt, embeddings_path, engine.embedding_size, calibration)
        return finish_sharded(dist, items, results, output, write, verb="scored")


def _check_embeddings(embeddings_path: Path | None, job: JobOptions) -> None:
    if embeddings_path is not None and embeddings_path.exists() and not (job.resume or job.overwrite):
        raise ValueError(f"{embeddings_path} exists; pass --resume to continue or --overwrite to start over")


def _load_previous(path: Path, fmt: str, embeddings_path: Path | None) -> dict[str, ItemResult]:
    """The scores (and embeddings) of a finished earlier run, so ``--resume`` skips those images."""
    scores = read_labels(path, fmt=fmt).as_dict()
    if embeddings_path is None:
        return {key: ItemResult(rows=[[q]]) for key, q in scores.items()}
    vectors = {}
    if embeddings_path.exists():
        keys, embeddings = load_embeddings(embeddings_path)
        vectors = dict(zip(keys, embeddings, strict=True))
    # An image scored without its embedding is not done when embeddings are asked for now.
    return {key: ItemResult(rows=[[q]], vector=vectors[key]) for key, q in scores.items() if key in vectors}


def _calibration(args: argparse.Namespace, engine: Any) -> Any:
    """The calibration to apply: ``--calibration``, else the one the model file carries, else ``None``."""
    if args.calibration is None and not engine.calibration and args.fr_model is None:
        return None  # the common case: no import of the calibration module at start-up
    from aikd.evaluation.calibration import check_fr_model, check_quality_model, load_calibration

    calibration = None
    if args.calibration is not None:
        calibration = load_calibration(args.calibration)
        if engine.calibration:
            print(f"note: --calibration {args.calibration} replaces the calibration {args.checkpoint} carries",
                  file=sys.stderr)
        check_quality_model(calibration, [engine.fingerprint, engine.weights_fingerprint], str(args.checkpoint))
    elif engine.calibration:
        calibration = load_calibration(engine.calibration, f"{args.checkpoint}: calibration")
    if args.fr_model is not None:
        if calibration is None:
            raise ValueError("--fr-model checks a calibration: give --calibration or a calibrated checkpoint")
        check_fr_model(calibration, args.fr_model)
    return calibration


def _writer(output: Path, fmt: str, embeddings_path: Path | None, dim: int, calibration: Any = None
            ) -> Callable[[list[tuple[ImageInput, ItemResult]]], None]:
    def write(good: list[tuple[ImageInput, ItemResult]]) -> None:
        keys = [item.key for item, _ in good]
        qualities = [result.rows[0][0] for _, result in good]
        columns = None
        if calibration is not None:  # from the quality as written, so a reader of the file gets the same values
            applied = calibration.apply(np.asarray(qualities, dtype=np.float64))
            columns = {"expected_fnmr": [shortest_float32(v) for v in applied["expected_fnmr"]],
                       "quality_100": applied["quality_100"].tolist()}
        write_qualities(output, keys, qualities, fmt, columns)
        if embeddings_path is not None:
            vectors = [result.vector for _, result in good]
            save_embeddings(embeddings_path, keys, np.stack(vectors) if vectors else np.zeros((0, dim), np.float32))

    return write
