"""The demo on real faces: degraded copies of sample photos, the comparisons that judge quality, and the report.

What ``aikd demo`` builds (:mod:`aikd.commands.demo` runs the steps with the ``aikd`` commands themselves):

- a face set (:func:`write_face_set`): every sample photo of :mod:`aikd.demo.samples` whose face RetinaFace finds,
  and its copies degraded by :mod:`aikd.demo.degradations` (7 kinds x 3 levels), written as
  ``SPLIT/IDENTITY/KIND_LEVEL.png`` (the photo itself is ``original_0.png``), with the original's five landmarks
  for every copy; identities are split into training and held-out ones (:func:`split_identities`);
- the comparisons of the held-out set (:func:`write_pairs`): mated = a degraded copy against its original,
  non-mated = every pair of images of two different identities; the error-versus-reject characteristic (ERC)
  of each quality measure then comes from ``aikd evaluate`` (:mod:`aikd.evaluation.metrics`);
- the report (:func:`write_report`): a contact sheet of held-out faces sorted by predicted quality, quality
  against degradation strength, the ERC, and the alignment sensitivity of the label technique against the AI-KD
  student, with the figures in ``summary.json``.

Qualities of different methods live on different scales; the pictures and the alignment figures compare them
by percentile rank within the held-out set (0 = lowest quality, 1 = highest).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from aikd.demo.degradations import KINDS, LEVELS, degrade
from aikd.evaluation.metrics import average_ranks, spearman
from aikd.io import LANDMARK_COLUMNS, atomic_write, write_csv

__all__ = [
    "ORIGINAL",
    "Method",
    "alignment_sensitivity",
    "image_key",
    "parse_key",
    "split_identities",
    "write_aligned_face_set",
    "write_face_set",
    "write_pairs",
    "write_png",
    "write_report",
]

ORIGINAL = "original"
# The two sharp photos: one teaches the student what degradations do to a sharp face (the LFW faces are all low
# resolution), the other is held out and shown on the contact sheet.
ALWAYS_TRAINING = ("grace_hopper",)
ALWAYS_HELD_OUT = ("astronaut",)


def image_key(identity: str, kind: str, level: int) -> str:
    """``IDENTITY/KIND_LEVEL.png``; the undegraded photo is ``IDENTITY/original_0.png``."""
    return f"{identity}/{ORIGINAL if level == 0 else kind}_{level}.png"


def parse_key(key: str) -> tuple[str, str, int]:
    """(identity, kind, level) of an :func:`image_key` (leading folders, e.g. the split, are ignored).

    Raises:
        ValueError: not such a name.
    """
    parts = key.replace("\\", "/").split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    kind, _, level = stem.rpartition("_")
    if len(parts) < 2 or not level.isdigit() or kind not in (ORIGINAL, *KINDS):
        raise ValueError(f"{key}: not a demo face name (IDENTITY/KIND_LEVEL.png)")
    return parts[-2], kind, int(level)


def split_identities(names: Sequence[str], seed: int = 0, held_out_fraction: float = 0.5
                     ) -> tuple[list[str], list[str]]:
    """(training, held-out) identities: Grace Hopper trains and the astronaut is held out (the two sharp photos),
    the rest is split at random (seeded)."""
    rest = [name for name in names if name not in ALWAYS_HELD_OUT + ALWAYS_TRAINING]
    order = np.random.default_rng(seed).permutation(len(rest))
    count = round(held_out_fraction * len(rest))
    held_out = [n for n in names if n in ALWAYS_HELD_OUT] + sorted(rest[i] for i in order[:count])
    training = sorted([n for n in names if n in ALWAYS_TRAINING] + [rest[i] for i in order[count:]])
    if len(training) < 2 or len(held_out) < 2:
        raise ValueError(f"{len(names)} identities are too few to split into training and held-out ones")
    return training, held_out


def write_face_set(photos: Mapping[str, np.ndarray], landmarks: Mapping[str, np.ndarray],
                   splits: Mapping[str, Sequence[str]], root: Path, landmarks_file: Path,
                   seed: int = 0) -> dict[str, list[str]]:
    """Write every photo of ``splits`` and its degraded copies as PNG, and the landmarks of them all as CSV.

    Args:
        photos: identity -> RGB uint8 photo.
        landmarks: identity -> its face's (5, 2) landmarks.
        splits: split name (folder) -> identities.
        root: folder of the splits.
        landmarks_file: CSV ``path,x1,y1,...,x5,y5`` written with paths relative to ``root``.
        seed: seed of the noise degradation.

    Returns:
        split -> image keys relative to the split's folder.
    """
    written: dict[str, list[str]] = {split: [] for split in splits}
    rows = []
    for split, key, image, points in _degraded_copies(photos, landmarks, splits, seed):
        write_png(root / split / key, image)
        written[split].append(key)
        rows.append([f"{split}/{key}", *(f"{v:.3f}" for v in points.reshape(-1))])
    write_csv(landmarks_file, ("path", *LANDMARK_COLUMNS), rows)
    return written


def write_aligned_face_set(photos: Mapping[str, np.ndarray], landmarks: Mapping[str, np.ndarray],
                           splits: Mapping[str, Sequence[str]], root: Path, preprocessing: Any,
                           seed: int = 0) -> dict[str, list[str]]:
    """Like :func:`write_face_set`, but each photo and degraded copy is written as the face crop the model takes
    (``preprocessing.align``, e.g. dlib-r29's 150x150 chip): sets of aligned faces of graded quality, such as
    int8 calibration wants (:mod:`aikd.inference.quantize`).

    Returns:
        split -> image keys relative to the split's folder.
    """
    written: dict[str, list[str]] = {split: [] for split in splits}
    for split, key, image, points in _degraded_copies(photos, landmarks, splits, seed):
        write_png(root / split / key, preprocessing.align(image, points))
        written[split].append(key)
    return written


def _degraded_copies(photos: Mapping[str, np.ndarray], landmarks: Mapping[str, np.ndarray],
                     splits: Mapping[str, Sequence[str]], seed: int
                     ) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """``(split, key, image, (5, 2) landmarks)`` of every photo of ``splits`` and each of its degraded copies,
    in a fixed order (the noise of the degradations is drawn in it, from ``seed``)."""
    rng = np.random.default_rng(seed)
    for split, identities in splits.items():
        for identity in identities:
            photo, points = photos[identity], np.asarray(landmarks[identity], dtype=np.float64).reshape(5, 2)
            for kind, level in [(ORIGINAL, 0), *((k, lv) for k in KINDS for lv in range(1, LEVELS + 1))]:
                image = photo if level == 0 else degrade(photo, kind, level, points, rng)
                yield split, image_key(identity, kind, level), image, points


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically, making its folder."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        handle.write(encoded.tobytes())


def write_pairs(keys: Sequence[str], path: Path) -> tuple[int, int]:
    """Write the comparisons of a face set as CSV ``a,b,genuine`` (what ``aikd evaluate --pairs`` reads).

    Mated: each degraded copy against the original of its identity. Non-mated: every pair of images of two
    different identities.

    Returns:
        (mated, non-mated) counts.
    """
    parsed = [parse_key(key) for key in keys]
    originals = {identity: key for key, (identity, _, level) in zip(keys, parsed, strict=True) if level == 0}
    rows = [(originals[identity], key, 1) for key, (identity, _, level) in zip(keys, parsed, strict=True)
            if level > 0 and identity in originals]
    mated = len(rows)
    identity = np.array([p[0] for p in parsed])
    first, second = np.triu_indices(len(keys), k=1)
    different = identity[first] != identity[second]
    rows += [(keys[a], keys[b], 0) for a, b in zip(first[different], second[different], strict=True)]
    write_csv(path, ("a", "b", "genuine"), rows)
    return mated, len(rows) - mated


# --------------------------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Method:
    """One quality measure on the held-out faces.

    Attributes:
        name: how the report names it.
        aligned: quality of each held-out image (in the order of the report's keys), faces properly aligned.
        misaligned: the same with misaligned faces, when measured.
    """

    name: str
    aligned: np.ndarray
    misaligned: np.ndarray | None = None


def percentile(quality: np.ndarray) -> np.ndarray:
    """Tie-averaged rank scaled to 0 (lowest) .. 1 (highest)."""
    quality = np.asarray(quality, dtype=np.float64)
    return (average_ranks(quality) - 1.0) / max(len(quality) - 1, 1)


def alignment_sensitivity(aligned: np.ndarray, misaligned: np.ndarray) -> dict[str, float]:
    """How much misalignment moves a quality measure: ``mean |Δ percentile|`` (scale-free), Spearman between the
    aligned and misaligned qualities, and ``mean |q(aligned) - q(misaligned)| / std q(aligned)``."""
    aligned, misaligned = np.asarray(aligned, np.float64), np.asarray(misaligned, np.float64)
    spread = float(aligned.std())
    return {
        "mean_abs_percentile_change": float(np.abs(percentile(aligned) - percentile(misaligned)).mean()),
        "spearman_aligned_misaligned": spearman(aligned, misaligned),
        "mean_abs_change_over_std": float(np.abs(aligned - misaligned).mean() / spread) if spread > 0 else math.nan,
    }


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot and no backend switch: the figure draws itself (Agg)

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)


def contact_sheet(crops: Sequence[np.ndarray], captions: Sequence[str], path: Path, columns: int = 8) -> None:
    """A grid of face crops with a caption under each, in the given order."""
    rows = math.ceil(len(crops) / columns)
    fig = _figure(1.2 * columns, 1.5 * rows)
    for index, (crop, caption) in enumerate(zip(crops, captions, strict=True)):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(crop)
        ax.set_axis_off()
        ax.set_title(caption, fontsize=7)
    _save(fig, path)


def plot_ladder(methods: Sequence[Method], levels: np.ndarray, kinds: np.ndarray, path: Path) -> None:
    """Mean percentile of each method's quality at each degradation level, one line per kind."""
    fig = _figure(5.0 * len(methods), 3.8)
    for index, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), index + 1)
        rank = percentile(method.aligned)
        for kind in KINDS:
            means = [rank[(levels == 0) if level == 0 else (kinds == kind) & (levels == level)].mean()
                     for level in range(LEVELS + 1)]
            ax.plot(range(LEVELS + 1), means, marker="o", label=kind)
        ax.set(xticks=range(LEVELS + 1), ylim=(0, 1), xlabel="degradation level (0 = original)",
               ylabel="mean quality percentile", title=method.name)
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    _save(fig, path)


def plot_alignment(methods: Sequence[Method], path: Path) -> None:
    """Percentile with aligned faces against percentile with misaligned ones, per method."""
    measured = [m for m in methods if m.misaligned is not None]
    fig = _figure(4.2 * len(measured), 4.0)
    for index, method in enumerate(measured):
        ax = fig.add_subplot(1, len(measured), index + 1)
        ax.scatter(percentile(method.aligned), percentile(method.misaligned), s=6, alpha=0.5)
        ax.plot([0, 1], [0, 1], color="0.4", lw=1, ls="--")
        figures = alignment_sensitivity(method.aligned, method.misaligned)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="percentile, aligned", ylabel="percentile, misaligned",
               title=f"{method.name}\nmean |Δ percentile| {figures['mean_abs_percentile_change']:.3f}")
        ax.grid(alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------- report
def degradation_figures(methods: Sequence[Method], levels: np.ndarray, kinds: np.ndarray) -> dict[str, Any]:
    """Spearman of each method's quality against the degradation order (stronger = lower), overall and per kind."""
    figures: dict[str, Any] = {"spearman": {}, "spearman_per_kind": {}}
    for method in methods:
        figures["spearman"][method.name] = spearman(method.aligned, -levels)
        figures["spearman_per_kind"][method.name] = {
            kind: spearman(method.aligned[(levels == 0) | (kinds == kind)],
                           -levels[(levels == 0) | (kinds == kind)]) for kind in KINDS}
    return figures


def write_report(out: Path, keys: Sequence[str], methods: Sequence[Method], crop: Callable[[str], np.ndarray],
                 erc_plot: Path, pauc: Mapping[str, float], facts: Mapping[str, Any],
                 timing: Callable[[], Mapping[str, Any]] = dict) -> dict[str, Any]:
    """Write ``report.md``, its pictures and ``summary.json`` into ``out``; returns the summary.

    Args:
        out: the demo folder.
        keys: held-out image keys (``IDENTITY/KIND_LEVEL.png``), the order of every method's qualities.
        methods: the AI-KD student first, then the label technique, then any others (e.g. a random order).
        crop: key -> its aligned crop, for the contact sheet.
        erc_plot: the ERC picture ``aikd evaluate`` drew.
        pauc: method -> normalised pAUC from ``aikd evaluate``.
        facts: what the report states about the run (counts, settings).
        timing: called once the pictures are drawn: the run's timings (``seconds`` in all), merged into ``facts``.
    """
    parsed = [parse_key(key) for key in keys]
    levels = np.array([p[2] for p in parsed])
    kinds = np.array([p[1] for p in parsed])
    student, technique = methods[0], methods[1]
    order = np.argsort(-student.aligned, kind="stable")
    shown = order[np.unique(np.linspace(0, len(order) - 1, min(32, len(order))).round().astype(int))]
    contact_sheet([crop(keys[i]) for i in shown],
                  [f"{student.aligned[i]:.3f}\n{parsed[i][0]} {parsed[i][1]} {parsed[i][2]}" for i in shown],
                  out / "contact_sheet.png")
    identities = list(dict.fromkeys(p[0] for p in parsed))
    rows = [name for name in ALWAYS_HELD_OUT if name in identities]
    rows += [name for name in identities if name not in rows][:4 - len(rows)]
    by_identity = [i for name in rows for i in order if parsed[i][0] == name]
    contact_sheet([crop(keys[i]) for i in by_identity],
                  [f"{student.aligned[i]:.3f}\n{_short(parsed[i])}" for i in by_identity],
                  out / "faces_by_identity.png", columns=len(by_identity) // max(len(rows), 1))
    plot_ladder([student, technique], levels, kinds, out / "quality_vs_degradation.png")
    plot_alignment([technique, student], out / "alignment.png")
    summary = {**degradation_figures(methods, levels, kinds), "pauc_normalised": dict(pauc),
               "alignment": {m.name: alignment_sensitivity(m.aligned, m.misaligned)
                             for m in methods if m.misaligned is not None},
               **dict(facts), **dict(timing())}
    with atomic_write(out / "summary.json") as handle:
        json.dump(summary, handle, indent=2)
    with atomic_write(out / "report.md") as handle:
        handle.write(_markdown(summary, methods, erc_plot.relative_to(out).as_posix()))
    return summary


def _gain(value: float, oracle: float) -> str:
    return f"{(1 - value) / (1 - oracle):.2f}" if oracle < 1 else "–"


def _short(parsed: tuple[str, str, int]) -> str:
    return "original" if parsed[2] == 0 else f"{parsed[1]} {parsed[2]}"


def _markdown(summary: Mapping[str, Any], methods: Sequence[Method], erc_plot: str) -> str:
    """The report: what the model is, then one section per picture."""
    names = [method.name for method in methods]
    sections = (_intro(summary, names[1]), _pictures(summary, names), _erc(summary, erc_plot),
                _alignment(summary, names[0], names[1]), _run(summary))
    return "\n".join(line for section in sections for line in section)


def _intro(facts: Mapping[str, Any], technique: str) -> list[str]:
    train_seconds = next((v for k, v in facts.get("step_seconds", {}).items() if k.startswith("train")), math.nan)
    return [
        "# aikd demo: face image quality on real faces",
        "",
        f"**What this model is.** An AI-KD student distilled on this CPU in {train_seconds:.0f} s: dlib's ResNet "
        f"face descriptor (`dlib-r29`, 99.38 % on LFW, public domain) as the frozen teacher and as the start of the "
        f"student, a new quality head, and the last {facts['trainable_tensors']} backbone tensors trained on "
        f"{facts['training_images']} images ({facts['training_identities']} faces, each with "
        f"{facts['copies_per_face']} degraded copies), misaligned by U[-{facts['misalign']:g}, "
        f"{facts['misalign']:g}] px per landmark coordinate as in the paper. Its labels are CR-FIQA's certainty "
        f"ratio ({technique}: how much closer an image's dlib descriptor lies to the other images of its face than "
        "to the nearest other face), a training-free technique computed with the same dlib model. It has seen a "
        "few hundred degraded copies of a few dozen faces: it shows the method working on real faces, it is "
        "**not** a production quality model.",
        "",
        "**Production-grade scores** come from an AI-KD model distilled from a strong face-recognition model on a "
        "large training set: the paper's released checkpoints (`aikd score --checkpoint aikd-best.pth --arch "
        "r100`), or your own run, `aikd train --config configs/aikd_r100.yaml` on e.g. VGGFace2 with an ArcFace "
        "`backbone.pth` teacher and labels from `aikd label`.",
        "",
        f"Held-out faces: {facts['heldout_images']} images of {facts['heldout_identities']} faces the student "
        "never saw, each degraded by 7 kinds at 3 levels: scikit-image's astronaut and low-resolution LFW faces "
        "(25x25 crops of scikit-image's `lfw_subset`, enlarged). Matplotlib's Grace Hopper, the other sharp photo, "
        "is among the training faces.",
        "",
    ]


def _pictures(summary: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    lines = [
        "## Faces sorted by the student's quality (highest first)",
        "",
        "Each face with all its degraded copies, one face per row:",
        "",
        "![faces by identity](faces_by_identity.png)",
        "",
        "All held-out faces together (every n-th by quality). The student learned from labels that compare each "
        "image with the other images of its face, so it ranks copies of one face better than it compares faces "
        "of different resolution: the 25-pixel LFW faces, enlarged, are all blurry to begin with.",
        "",
        "![contact sheet](contact_sheet.png)",
        "",
        "## Quality against degradation strength",
        "",
        "![quality vs degradation](quality_vs_degradation.png)",
        "",
        "Spearman correlation between quality and the degradation order (original > level 1 > 2 > 3):",
        "",
        "| method | all | " + " | ".join(KINDS) + " |",
        "|---|---|" + "---|" * len(KINDS),
    ]
    for name in names:
        per_kind = summary["spearman_per_kind"][name]
        lines.append(f"| {name} | {summary['spearman'][name]:.3f} | "
                     + " | ".join(f"{per_kind[k]:.2f}" for k in KINDS) + " |")
    return lines


def _erc(facts: Mapping[str, Any], erc_plot: str) -> list[str]:
    pauc = facts["pauc_normalised"]
    return [
        "",
        "## Error versus discard (ERC)",
        "",
        f"Comparisons with dlib-r29: {facts['mated_pairs']} mated (a degraded copy against its original) and "
        f"{facts['nonmated_pairs']} non-mated (images of different faces); FNMR at FMR = 1e-3 with the threshold "
        "set once from all non-mated comparisons, while the lowest-quality comparisons are discarded. Lower is "
        "better; a random order only keeps the FNMR where it is.",
        "",
        f"![ERC]({erc_plot})",
        "",
        "| method | normalised pAUC up to 30 % discarded (1 = no better than not discarding) | share of the "
        "oracle's gain |",
        "|---|---|---|",
        *(f"| {name} | {value:.3f} | {_gain(value, pauc['oracle'])} |" for name, value in pauc.items()),
        "",
        f"FNMR without discarding: {facts['fnmr0']:.3f}. The oracle discards exactly the false non-matches first; "
        "with many copies degraded beyond recognition it cannot reach 0, and the share of its gain "
        "(1 - pAUC) / (1 - pAUC of the oracle) says how much of the possible improvement a method achieves.",
        "",
    ]


def _alignment(facts: Mapping[str, Any], student: str, technique: str) -> list[str]:
    return [
        "## Alignment sensitivity",
        "",
        f"The same held-out faces aligned properly and misaligned (landmarks jittered by U[-{facts['misalign']:g}, "
        f"{facts['misalign']:g}] px). AI-KD's point: {student} should rank a face the same either way, where the "
        f"label technique ({technique}) moves.",
        "",
        "![alignment](alignment.png)",
        "",
        "| method | mean abs. change of percentile | Spearman aligned vs misaligned | mean abs. change / std |",
        "|---|---|---|---|",
        *(f"| {name} | {v['mean_abs_percentile_change']:.3f} | {v['spearman_aligned_misaligned']:.3f} | "
          f"{v['mean_abs_change_over_std']:.3f} |" for name, v in facts["alignment"].items()),
        "",
    ]


def _run(facts: Mapping[str, Any]) -> list[str]:
    return [
        f"Run: {facts['seconds']:.0f} s on {facts['cpu']} (load average {facts['load_average']:.1f} at the end: "
        f"other processes shared the CPU when it exceeds the cores); seed {facts['seed']}. Files: `photos/`, "
        "`landmarks.csv`, `labels/`, `run/` (the student: `run/best.pt`), `heldout/` (scores, embeddings, pairs), "
        "`erc/`, `model.onnx`.",
        "",
    ]
