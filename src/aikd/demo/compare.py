"""``aikd demo --compare``: every FIQA technique that needs no download, side by side on dlib-r29 and real faces.

What the AI-KD paper (Babnik et al., IWBF 2024) is about, measured on the demo's held-out faces (each with 21 degraded
copies; :mod:`aikd.demo.showcase`), with dlib's ResNet face descriptor (``dlib-r29``) as the FR model of every
technique and of the comparisons:

- the techniques of :mod:`aikd.labelers` that run on dlib-r29: SER-FIQ, the embedding magnitude, CR-FIQA's certainty
  ratio, FaceQAN and the SDD-FIQA pseudo-labels (their authors' default settings); GraFIQs needs BatchNorm
  statistics, which dlib-r29 has none of (it is listed as not applicable); the released quality models need
  downloads (not run);
- each on three alignments of the same faces: **aligned** from RetinaFace's landmarks (the demo's), **misaligned** as
  the paper does (every landmark coordinate jittered by U[-3, 3] px) and aligned from **MTCNN**'s landmarks instead
  (the "different alignment procedure" the paper is about; a face MTCNN misses keeps RetinaFace's, counted);
- one table: Spearman correlation with the degradation order per kind of degradation (aligned), the ERC pAUC
  (normalised, up to 30 % discarded) at FMR 1e-3 per alignment, the alignment sensitivity (mean |Δ percentile|,
  aligned vs misaligned and vs MTCNN) and the time per face of labelling on this CPU;
- then the best-ranked technique (lowest aligned pAUC) distilled with AI-KD (the demo's student when it is the
  certainty ratio, which the demo distils anyway), and whether the student beats its label technique aligned and
  misaligned, with the figures, whichever way it comes out.

Outputs in ``OUT/compare/``: the label files, ``erc/`` (``aikd evaluate``'s report), ``comparison.md`` and
``comparison.json``; the summary is also under ``comparison`` in ``OUT/summary.json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aikd.io import LANDMARK_COLUMNS, read_labels, read_landmarks, write_csv
from aikd.pipeline.crops import CropOptions

__all__ = ["CONDITIONS", "TECHNIQUES", "Comparison", "run_comparison"]

TECHNIQUES = ("serfiq", "magnitude", "certainty", "faceqan", "sddfiqa", "grafiqs")
CONDITIONS = ("aligned", "misaligned", "MTCNN")
NOT_RUN = {"checkpoint": "the released quality models (CR-FIQA, eDifFIQA, SDD-FIQA) need their authors' files, "
                         "which are downloads"}


@dataclass
class Comparison:
    """What the comparison measured.

    Attributes:
        qualities: method -> condition -> quality of each held-out image (in the order of the keys).
        seconds_per_face: technique -> wall time of labelling per face (the aligned run: decoding, alignment and
            the model's loading, about a second, included).
        not_applicable: technique -> why it did not run.
        mtcnn_missed: identities whose face MTCNN did not find (they keep RetinaFace's landmarks).
    """

    qualities: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    seconds_per_face: dict[str, float] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    mtcnn_missed: list[str] = field(default_factory=list)


def mtcnn_landmarks(out: Path, keys: list[str], split: str = "heldout") -> tuple[Path, list[str]]:
    """Landmarks of every held-out image from MTCNN on its original photo (RetinaFace's where MTCNN finds none).

    Returns:
        The landmarks file (paths as the demo's ``landmarks.csv``) and the identities MTCNN missed.
    """
    from aikd.demo.showcase import parse_key
    from aikd.demo.steps import detect_faces

    found_file = out / "compare" / "originals_mtcnn.csv"
    detect_faces(out / "originals", found_file, detector="mtcnn")
    table = read_landmarks(found_file)
    mtcnn = {Path(p).stem: pts for p, pts in zip(table.paths, table.landmarks, strict=True) if np.isfinite(pts).all()}
    demo = read_landmarks(out / "landmarks.csv")
    retina = dict(zip(demo.paths, demo.landmarks, strict=True))
    rows, missed = [], set()
    for key in keys:
        identity = parse_key(key)[0]
        points = mtcnn.get(identity)
        if points is None:
            missed.add(identity)
            points = retina[f"{split}/{key}"]
        rows.append([f"{split}/{key}", *(f"{v:.3f}" for v in np.asarray(points).reshape(-1))])
    path = out / "compare" / "landmarks_mtcnn.csv"
    write_csv(path, ("path", *LANDMARK_COLUMNS), rows)
    return path, sorted(missed)


def _crops(out: Path, mtcnn: Path, seed: int, misalign: float) -> dict[str, CropOptions]:
    landmarks = out / "landmarks.csv"
    return {"aligned": CropOptions(landmarks=landmarks),
            "misaligned": CropOptions(landmarks=landmarks, misalign=misalign, seed=seed + 1),
            "MTCNN": CropOptions(landmarks=mtcnn)}


def _label_technique(name: str, images: Path, folder: Path, crops: dict[str, CropOptions], keys: list[str],
                     seed: int, result: Comparison) -> None:
    """Label the held-out faces with technique ``name`` under every alignment (or record why it cannot run)."""
    from aikd.demo.steps import label_with
    from aikd.pipeline.labelling import LabelOptions

    options = LabelOptions(name, weights="dlib", seed=seed)
    for condition, crop in crops.items():
        output = folder / f"{name}_{condition}.csv"
        start = time.perf_counter()
        try:
            label_with(images, output, crop, options)
        except ValueError as err:
            if condition != "aligned":
                raise
            result.not_applicable[name] = str(err)
            print(f"{name}: not applicable here ({result.not_applicable[name]})", file=sys.stderr)
            return
        if condition == "aligned":
            result.seconds_per_face[name] = (time.perf_counter() - start) / len(keys)
        table = read_labels(output).as_dict()
        result.qualities.setdefault(name, {})[condition] = np.array([table.get(k, np.nan) for k in keys])


def _score_student(name: str, checkpoint: Path, images: Path, folder: Path, crops: dict[str, CropOptions],
                   keys: list[str], result: Comparison) -> None:
    from aikd.demo.steps import score_with

    for condition, crop in crops.items():
        output = folder / f"{name}_{condition}.csv"
        score_with(images, checkpoint, crop, output)
        table = read_labels(output).as_dict()
        result.qualities.setdefault(name, {})[condition] = np.array([table[k] for k in keys])


def _pauc(out: Path, result: Comparison, keys: list[str], name: str) -> dict[str, dict[str, float]]:
    """ERC pAUC (normalised, 30 %, FMR 1e-3, fixed threshold) of every method and condition (``aikd evaluate``)."""
    from aikd.evaluation import protocols, report

    folder = out / "compare" / name
    scores = {}
    for method, by_condition in result.qualities.items():
        for condition, values in by_condition.items():
            path = folder / "scores" / f"{method}_{condition}.csv"
            finite = np.isfinite(values)
            write_csv(path, ("path", "quality"), ([k, float(v)] for k, v, ok in zip(keys, values, finite, strict=True)
                                                  if ok))
            scores[f"{method} | {condition}"] = path
    heldout = out / "heldout"
    job = report.Job("dlib-r29", "held-out", heldout / "certainty.embeddings.npz", heldout / "pairs.csv", scores,
                     "auto", protocols.LFW_PATTERN, "identity")
    report.write_report([job], report.Settings.make(None, None, "fixed", False, False, {}), folder, 2000, plots=False)
    table: dict[str, dict[str, float]] = {}
    for label, value in report.read_pauc(folder / "pauc.csv").items():
        if " | " in label:
            method, condition = label.split(" | ")
            table.setdefault(method, {})[condition] = value
    return table


def _distil(out: Path, best: str, crops: dict[str, CropOptions], keys: list[str], seed: int, options: Any,
            result: Comparison) -> str:
    """The AI-KD student of technique ``best``: the demo's when it is the certainty ratio, else trained here."""
    from aikd.demo.steps import label_with, train_student
    from aikd.labelers.imported import ImportOptions
    from aikd.pipeline.labelling import LabelOptions

    student = f"AI-KD ({best})"
    if best == "certainty":
        checkpoint = out / "run" / "best.pt"
    else:
        folder, train = out / "compare" / "labels", out / "photos" / "train"
        label_with(train, folder / f"train_{best}.csv", CropOptions(landmarks=out / "landmarks.csv"),
                   LabelOptions(best, weights="dlib", seed=seed))
        label_with(train, folder / f"train_{best}_rank.csv", None,
                   LabelOptions("import", imported=ImportOptions(folder / f"train_{best}.csv", "quality", "rank")))
        train_student(out / "compare" / f"run_{best}", train, out / "landmarks.csv", folder / f"train_{best}_rank.csv",
                      options)
        checkpoint = out / "compare" / f"run_{best}" / "best.pt"
    _score_student(student, checkpoint, out / "photos" / "heldout", out / "compare" / "labels", crops, keys, result)
    return student


def _figures(result: Comparison, pauc: dict[str, dict[str, float]], keys: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: Spearman with the degradation order (all, per kind), pAUC per alignment, sensitivity, time."""
    from aikd.demo.showcase import Method, alignment_sensitivity, degradation_figures, parse_key

    parsed = [parse_key(key) for key in keys]
    levels, kinds = np.array([p[2] for p in parsed]), np.array([p[1] for p in parsed])
    rows = {}
    for name, by_condition in result.qualities.items():
        aligned = by_condition["aligned"]
        ok = np.isfinite(aligned) & np.isfinite(by_condition["misaligned"]) & np.isfinite(by_condition["MTCNN"])
        spearman = degradation_figures([Method(name, aligned[ok])], levels[ok], kinds[ok])
        rows[name] = {
            "spearman": spearman["spearman"][name], "spearman_per_kind": spearman["spearman_per_kind"][name],
            "pauc": pauc.get(name, {}),
            "sensitivity_misaligned": alignment_sensitivity(aligned[ok], by_condition["misaligned"][ok]),
            "sensitivity_mtcnn": alignment_sensitivity(aligned[ok], by_condition["MTCNN"][ok]),
            "seconds_per_face": result.seconds_per_face.get(name), "labelled": int(ok.sum()),
        }
    return rows


def _verdict(figures: dict[str, dict[str, Any]], technique: str, student: str) -> dict[str, Any]:
    """Whether the student beats its label technique (lower pAUC) aligned, misaligned and with MTCNN."""
    verdict = {"technique": technique, "student": student}
    for condition in CONDITIONS:
        ours, theirs = figures[student]["pauc"].get(condition), figures[technique]["pauc"].get(condition)
        verdict[condition] = {"student": ours, "technique": theirs,
                              "student_better": bool(ours is not None and theirs is not None and ours < theirs)}
    return verdict


def run_comparison(out: Path, keys: list[str], options: Any) -> dict[str, Any]:
    """Run the comparison on the demo in ``out`` (after its own steps); returns ``comparison.json``'s content.

    Args:
        out: the demo folder (its held-out faces, landmarks, pairs, embeddings and student).
        keys: the held-out image keys (``IDENTITY/KIND_LEVEL.png``).
        options: the demo's :class:`~aikd.demo.run.DemoOptions` (seed, misalignment, epochs).
    """
    import json

    from aikd.io import atomic_write

    (out / "compare" / "labels").mkdir(parents=True, exist_ok=True)
    mtcnn, missed = mtcnn_landmarks(out, keys)
    crops = _crops(out, mtcnn, options.seed, options.misalign)
    result = Comparison(mtcnn_missed=missed, not_applicable=dict(NOT_RUN))
    for name in TECHNIQUES:
        print(f"\n-- {name}", file=sys.stderr, flush=True)
        _label_technique(name, out / "photos" / "heldout", out / "compare" / "labels", crops, keys, options.seed,
                         result)
    pauc = _pauc(out, result, keys, "erc")
    best = min((n for n in result.qualities if n in TECHNIQUES), key=lambda n: pauc[n]["aligned"])
    print(f"\n-- distilling the best-ranked technique, {best}", file=sys.stderr, flush=True)
    student = _distil(out, best, crops, keys, options.seed, options, result)
    figures = _figures(result, _pauc(out, result, keys, "erc_with_student"), keys)
    summary = {"fr_model": "dlib-r29", "heldout_images": len(keys), "misalign": options.misalign,
               "mtcnn_missed": missed, "not_applicable": result.not_applicable, "best": best,
               "methods": figures, "verdict": _verdict(figures, best, student)}
    with atomic_write(out / "compare" / "comparison.json") as handle:
        json.dump(summary, handle, indent=2)
    with atomic_write(out / "compare" / "comparison.md") as handle:
        handle.write(comparison_markdown(summary))
    return summary


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def comparison_markdown(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown report: the table, what did not run, and the verdict on distillation."""
    from aikd.demo.degradations import KINDS

    lines = ["# FIQA techniques side by side on dlib-r29 (aikd demo --compare)", "",
             f"{summary['heldout_images']} held-out images (faces with 21 degraded copies each). Spearman: quality "
             "against the degradation order (aligned). pAUC: ERC, FNMR at FMR 1e-3, fixed threshold, normalised, up "
             f"to 30 % discarded (lower is better) with faces aligned, misaligned (U[-{summary['misalign']:g}, "
             f"{summary['misalign']:g}] px) and aligned from MTCNN's landmarks. Sensitivity: mean |Δ percentile| of "
             "the quality between aligned and misaligned (MTCNN) faces (lower is more alignment-invariant).", "",
             "| method | Spearman | " + " | ".join(KINDS) + " | pAUC aligned | pAUC misaligned | pAUC MTCNN | "
             "sensitivity misaligned | sensitivity MTCNN | ms/face |",
             "|---|" + "---|" * (len(KINDS) + 7)]
    for name, row in summary["methods"].items():
        per_kind = " | ".join(_cell(row["spearman_per_kind"][kind], 2) for kind in KINDS)
        seconds = row["seconds_per_face"]
        lines.append(f"| {name} | {_cell(row['spearman'])} | {per_kind} | "
                     + " | ".join(_cell(row["pauc"].get(c)) for c in CONDITIONS) + " | "
                     f"{_cell(row['sensitivity_misaligned']['mean_abs_percentile_change'])} | "
                     f"{_cell(row['sensitivity_mtcnn']['mean_abs_percentile_change'])} | "
                     f"{'–' if seconds is None else f'{1000 * seconds:.1f}'} |")
    lines += ["", "Not run:", "", *(f"- {name}: {why}" for name, why in summary["not_applicable"].items()), ""]
    if summary["mtcnn_missed"]:
        lines.append(f"MTCNN found no face in {len(summary['mtcnn_missed'])} original(s) "
                     f"({', '.join(summary['mtcnn_missed'])}); their copies keep RetinaFace's landmarks.")
    verdict = summary["verdict"]
    lines += ["", f"## AI-KD on the best-ranked technique: {verdict['technique']}", ""]
    for condition in CONDITIONS:
        item = verdict[condition]
        word = "beats" if item["student_better"] else "does not beat"
        lines.append(f"- {condition}: the student ({verdict['student']}) {word} its label technique, pAUC "
                     f"{_cell(item['student'])} vs {_cell(item['technique'])}.")
    lines += ["", "The student saw a few hundred degraded copies of a few dozen faces: a demonstration, not the "
              "paper's setting (VGGFace2, a CosFace iResNet-100 teacher).", ""]
    return "\n".join(lines)
