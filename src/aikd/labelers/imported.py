"""Quality labels computed elsewhere (any FIQA technique), matched to the images and optionally normalised.

AI-KD distils whatever technique made the labels. A labels file is a CSV ``path,quality`` (another column
with ``column=``) or the official AI-KD pickle ``{name: score}`` (read through the restricted unpickler of
:mod:`aikd.io`). Its names are matched to the input images like a landmarks file (:mod:`aikd.names`): exact key,
normalised key, then whole trailing path components that match exactly one name.

Raw ranges differ from technique to technique (SER-FIQ on ArcFace sits in a narrow band near 0.9,
MagFace magnitudes around 20-35, CR-FIQA ratios around 0-1.5...), and only their order carries meaning
across techniques. ``normalise`` maps them, over the images of this run whose labels are finite:

    none    the labels as they are;
    minmax  (q - min) / (max - min), in [0, 1]; min -> 0, max -> 1;
    rank    r / (N - 1), in [0, 1], where r is the 0-based rank in ascending order and tied labels share
            the mean of their ranks (so equal labels stay equal).

When all labels are equal (or there is a single image) both mappings give 0.5. Labels that are NaN
(missing, or not a number) or infinite are reported per image and take no part in the normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aikd.evaluation.metrics import average_ranks
from aikd.io import read_labels
from aikd.labelers.base import Labeler, SetLabels
from aikd.names import NameIndex

__all__ = ["NORMALISATIONS", "ImportOptions", "ImportedLabels", "normalise_labels"]

NORMALISATIONS = ("none", "minmax", "rank")


@dataclass(frozen=True)
class ImportOptions:
    """Where the labels are and how to map them.

    Attributes:
        labels: CSV (``path`` + the label column) or pickle ``{name: score}``.
        column: label column of a CSV file.
        normalise: ``none``, ``minmax`` or ``rank`` (see the module docstring).
    """

    labels: Path
    column: str = "quality"
    normalise: str = "none"

    def __post_init__(self) -> None:
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"--normalise must be one of {', '.join(NORMALISATIONS)}, got {self.normalise!r}")


def normalise_labels(values: np.ndarray, method: str) -> np.ndarray:
    """Map finite labels with ``none``, ``minmax`` or ``rank`` (module docstring); float64 copy."""
    values = np.asarray(values, dtype=np.float64)
    if method not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALISATIONS)}")
    if not np.isfinite(values).all():
        raise ValueError("normalise_labels takes finite labels only")
    if method == "none":
        return values.copy()
    if method == "minmax":
        low, high = (values.min(), values.max()) if len(values) else (0.0, 0.0)
        return (values - low) / (high - low) if high > low else np.full(len(values), 0.5)
    if len(values) < 2:
        return np.full(len(values), 0.5)
    return (average_ranks(values) - 1.0) / (len(values) - 1)  # 0 .. 1, ties sharing their mean rank


class ImportedLabels(Labeler):
    """Labels from a file, matched to the images by key; needs neither images nor a model.

    The file is read when the labeller is made, so a missing file or column fails before any work.
    """

    name = "import"
    Options = ImportOptions
    needs_images = False
    needs_model = False
    set_pass = True

    def __init__(self, options: ImportOptions) -> None:
        self.options = options
        self.table = read_labels(options.labels, column=options.column)
        self.columns = () if options.normalise == "none" else ("raw",)

    def label_set(self, keys: Sequence[str], embeddings: np.ndarray | None = None) -> SetLabels:
        """Labels of ``keys``; unmatched, NaN and infinite ones are errors."""
        source = self.options.labels
        indices = [None if row < 0 else int(row) for row in NameIndex(self.table.paths).find_all(list(keys))]
        raw = np.array([self.table.qualities[i] if i is not None else np.nan for i in indices], dtype=np.float64)
        errors: dict[int, str] = {}
        for position, (index, value) in enumerate(zip(indices, raw, strict=True)):
            if index is None:
                errors[position] = f"no label for this image in {source}"
            elif np.isnan(value):
                errors[position] = f"label is NaN (missing or not a number) in {source}"
            elif not np.isfinite(value):
                errors[position] = f"label is infinite ({value}) in {source}"
        good = np.array([i not in errors for i in range(len(keys))], dtype=bool)
        quality = np.full(len(keys), np.nan)
        quality[good] = normalise_labels(raw[good], self.options.normalise)
        extras = {} if self.options.normalise == "none" else {"raw": raw}
        return SetLabels(quality=quality, extras=extras, errors=errors)

    def describe_range(self, labels: SetLabels) -> str:
        """One line on the raw range of the finite labels and what ``quality`` holds."""
        raw = labels.extras.get("raw", labels.quality)
        finite = raw[np.isfinite(raw)]
        if not len(finite):
            return "no finite label matched"
        line = f"raw labels: {len(finite)} finite, min {finite.min():.6g}, max {finite.max():.6g}"
        if self.options.normalise != "none":
            line += f"; quality = {self.options.normalise}-normalised to [0, 1], raw values in column 'raw'"
        return line
