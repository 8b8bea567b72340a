"""Calibrated quality: a quality score mapped to the FNMR a face recogniser is expected to have on that image.

    aikd calibrate --scores scores.csv --embeddings emb.npz --pairs pairs.txt --fmr 1e-3 -o calib.json
    aikd score faces/ --checkpoint best.pt --calibration calib.json -o scores.csv   # + expected_fnmr, quality_100

A raw quality score has no unit. Calibration relates it to what the face-recognition (FR) system does with the
image, on an evaluation set with known identities (any protocol ``aikd evaluate`` reads):

* the decision threshold is set once, from all non-mated comparisons, at the target FMR (the fixed-threshold
  convention of ISO/IEC 29794-1, :func:`aikd.evaluation.metrics.threshold_at_fmr`);
* each image gets the share of its mated comparisons that are false non-matches at that threshold (weight:
  its number of mated comparisons);
* an isotonic regression (``scipy.optimize.isotonic_regression``), non-increasing in quality, fits the
  **expected FNMR** of the mated comparisons an image of that quality takes part in. Images tied in quality
  are pooled first, so equal scores always get one value.

The mapping is stored as knots, the first and last quality of every constant piece of the fit, and evaluated
by **linear interpolation** between knots, **clamped** to the end values outside their range: a
non-increasing function of quality everywhere.

Uncertainty: a bootstrap over **identities** (comparisons of one person are dependent, so pairs are not
resampled on their own). Each replicate draws identities with replacement; a comparison counts as often as
its identities were drawn (a non-mated one: the product of its two identities' counts), and both the
threshold and the fit are recomputed. The band is the pointwise percentile interval of the replicates at
the knots (``confidence``, 0.95 by default).

``quality_100`` = ``100 (f_max - f(q)) / (f_max - f_min)`` rounded to an integer, with ``f_min`` and ``f_max``
the lowest and highest expected FNMR of the mapping: 100 is the lowest expected FNMR **on this calibration
set**, 0 the highest. It is a scale in the spirit of OFIQ's (ISO/IEC 29794-5) 0-100 values, but specific to
the FR model, the FMR and the calibration set; it is not comparable across calibrations.

Reliability: identities are split (seeded) into a fit part and a held-out part (``holdout``, 0.3); the mapping
fitted on the first predicts the held-out images' FNMR at the fit part's threshold. Held-out images are binned
by predicted FNMR (quantile bins) and the observed FNMR of each bin is set against the prediction (a
reliability diagram); the expected calibration error (ECE) is the mean ``|predicted - observed|`` over bins
weighted by their mated comparisons.

Reject threshold (``target_fnmr``): the lowest quality ``t`` such that the mated comparisons kept (pair
quality = the lower of the two images' qualities, :func:`aikd.evaluation.metrics.pair_quality`, at least ``t``) have an
FNMR of at most the target at the threshold (the FNM-EDC of :func:`aikd.evaluation.metrics.fnm_edc`), with the share of
images and of mated comparisons it rejects and bootstrap intervals of all three.

A calibration set must hold at least ``10 / FMR`` non-mated comparisons (about ten false matches at the
threshold), or it is refused with the number needed.

Identities: an all-vs-all protocol gives them; for a pair list they are the connected groups of images joined
by mated pairs, merged by parent folder (``Abel/Abel_0001.jpg``) when no non-mated pair joins two images of
one folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aikd.evaluation import metrics as ev
from aikd.evaluation import protocols
from aikd.io import atomic_write
from aikd.names import identity_from_folder

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_HOLDOUT",
    "FORMAT",
    "FORMAT_VERSION",
    "Calibration",
    "CalibrationOptions",
    "CalibrationSet",
    "calibrate",
    "calibration_set",
    "check_fr_model",
    "check_quality_model",
    "load_calibration",
    "resolve_calibration",
    "needed_nonmated",
    "plot_reliability",
    "summary",
]

FORMAT = "aikd-calibration"
FORMAT_VERSION = 1
DEFAULT_BOOTSTRAP = 200  # replicates: enough for stable 2.5 / 97.5 percentiles at a few seconds' cost
DEFAULT_CONFIDENCE = 0.95
DEFAULT_HOLDOUT = 0.3  # share of identities held out for the reliability diagram
DEFAULT_BINS = 10
NONMATED_PER_FMR = 10  # non-mated comparisons needed per 1/FMR: about ten false matches at the threshold
TAIL_FACTOR = 4  # all-vs-all: keep 4x the highest non-mated scores the threshold needs, for the bootstrap
SET_SPECIFIC = ("expected_fnmr and quality_100 hold for this FR model at this FMR on sets like this calibration "
                "set; quality_100 = 100 is the lowest expected FNMR of this set, not a universal scale")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class CalibrationOptions:
    """How a calibration is fitted.

    Attributes:
        fmr: target false match rate of the fixed threshold.
        bootstrap: replicates of the bootstrap over identities (0: no band).
        seed: seed of the bootstrap and of the held-out split.
        confidence: level of the pointwise band and of the intervals of the reject threshold.
        holdout: share of identities held out for the reliability diagram (0: none).
        bins: quantile bins of predicted FNMR in the reliability diagram.
        target_fnmr: FNMR the recommended reject threshold should reach (``None``: no recommendation).
    """

    fmr: float = ev.DEFAULT_FMR
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE
    holdout: float = DEFAULT_HOLDOUT
    bins: int = DEFAULT_BINS
    target_fnmr: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.fmr < 1:
            raise ValueError(f"--fmr must be between 0 and 1 (exclusive), got {self.fmr:g}")
        if not 0 <= self.bootstrap <= 100_000:
            raise ValueError(f"--bootstrap must be 0 to 100000, got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"--confidence must be between 0 and 1 (exclusive), got {self.confidence:g}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout:g}")
        if not 1 <= self.bins <= 10_000:  # a bin per image at most matters; 3e8 bins took 24 GB
            raise ValueError(f"--bins must be 1 to 10000, got {self.bins}")
        if self.target_fnmr is not None and not 0 <= self.target_fnmr < 1:
            raise ValueError(f"--target-fnmr must be in [0, 1), got {self.target_fnmr:g}")


def needed_nonmated(fmr: float) -> int:
    """Non-mated comparisons a calibration at ``fmr`` needs: ``ceil(10 / fmr)``."""
    return math.ceil(NONMATED_PER_FMR / fmr * (1 - 1e-9))


# --------------------------------------------------------------------------------------- calibration set
@dataclass
class CalibrationSet:
    """The comparisons of an evaluation set, reduced to what calibration needs.

    Attributes:
        quality: (N,) quality of each image.
        identity: (N,) identity code of each image, ``0 .. n_identities - 1``.
        mated_first, mated_second: images of each mated comparison.
        mated_scores: similarity of each mated comparison.
        nonmated_scores: similarity of every non-mated comparison, or (all-vs-all) of the highest ones.
        nonmated_identities: (2, M) identity codes of the two images of each of those.
        n_nonmated: number of non-mated comparisons in all.
        all_vs_all: every pair of images is compared (the non-mated total then follows from identity sizes).
    """

    quality: np.ndarray
    identity: np.ndarray
    mated_first: np.ndarray
    mated_second: np.ndarray
    mated_scores: np.ndarray
    nonmated_scores: np.ndarray
    nonmated_identities: np.ndarray
    n_nonmated: int
    all_vs_all: bool = False

    @property
    def n_identities(self) -> int:
        return int(self.identity.max()) + 1 if self.identity.size else 0

    def nonmated_weights(self, drawn: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Weights of the given non-mated scores when identity ``i`` was drawn ``drawn[i]`` times, and the
        weighted total of all non-mated comparisons (``None``: the scores are all of them)."""
        a, b = self.nonmated_identities
        weights = np.where(a == b, drawn[a], drawn[a] * drawn[b])
        if not self.all_vs_all:
            return weights, None
        per_identity = drawn * np.bincount(self.identity, minlength=len(drawn))
        return weights, float((per_identity.sum() ** 2 - (per_identity**2).sum()) / 2)

    def threshold(self, fmr: float, drawn: np.ndarray | None = None) -> float:
        """Threshold at ``fmr`` over the non-mated comparisons (weighted by ``drawn`` identity counts)."""
        if drawn is None and not self.all_vs_all:
            return ev.threshold_at_fmr(self.nonmated_scores, fmr)
        drawn = np.ones(self.n_identities) if drawn is None else drawn
        weights, total = self.nonmated_weights(drawn)
        return ev.threshold_at_fmr(self.nonmated_scores, fmr, weights, total)


def calibration_set(loaded: Any, method: str, fmr: float) -> CalibrationSet:
    """The calibration set of one score file of a job read by :func:`aikd.evaluation.report.read_job`.

    Raises:
        ValueError: fewer than ``10 / fmr`` non-mated comparisons (the message gives both numbers).
    """
    resolved, quality = loaded.resolved, loaded.qualities[method]
    if isinstance(resolved, protocols.AllVsAll):
        embeddings, identity = loaded.embeddings[resolved.rows], resolved.identity
        first, second = ev.mated_pairs(identity)
        n_nonmated = len(resolved) - first.size
        _refuse_small(n_nonmated, fmr)
        keep = min(n_nonmated, TAIL_FACTOR * (ev.false_matches_allowed(n_nonmated, fmr) + 1) + 1000)
        scores, identities = _highest_nonmated(embeddings, identity, keep)
        return CalibrationSet(quality[resolved.rows], identity, first, second,
                              ev.cosine_similarity(embeddings[first], embeddings[second]), scores, identities,
                              n_nonmated, all_vs_all=True)
    used, local = np.unique(np.concatenate([resolved.first, resolved.second]), return_inverse=True)
    first, second = local[: len(resolved)], local[len(resolved):]
    mated = resolved.mated
    _refuse_small(int((~mated).sum()), fmr)
    identity = pair_identities(first, second, mated, [loaded.paths[r] for r in used])
    scores = ev.cosine_similarity(loaded.embeddings[resolved.first], loaded.embeddings[resolved.second])
    nonmated_identities = np.stack([identity[first[~mated]], identity[second[~mated]]])
    return CalibrationSet(quality[used], identity, first[mated], second[mated], scores[mated], scores[~mated],
                          nonmated_identities, int((~mated).sum()))


def _refuse_small(n_nonmated: int, fmr: float) -> None:
    needed = needed_nonmated(fmr)
    if n_nonmated < needed:
        raise ValueError(f"the calibration set has {n_nonmated} non-mated comparisons; FMR {fmr:g} needs at least "
                         f"{needed} (10 / FMR) for a stable threshold: use a larger set or a larger --fmr")


def _highest_nonmated(embeddings: np.ndarray, identity: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` highest non-mated similarities of all pairs and their identities, streamed by Gram blocks."""
    kept_scores, kept_pairs, floor = np.zeros(0, np.float32), np.zeros((2, 0), np.int64), -np.inf
    for first, second, similarity in ev.iter_all_vs_all_similarities(embeddings):
        take = (identity[first] != identity[second]) & (similarity >= floor)
        kept_scores = np.concatenate([kept_scores, similarity[take]])
        kept_pairs = np.concatenate([kept_pairs, np.stack([identity[first[take]], identity[second[take]]])], 1)
        if kept_scores.size > 2 * keep:
            top = np.argpartition(kept_scores, kept_scores.size - keep)[kept_scores.size - keep:]
            kept_scores, kept_pairs = kept_scores[top], kept_pairs[:, top]
            floor = float(kept_scores.min())
    return kept_scores, kept_pairs


def pair_identities(first: np.ndarray, second: np.ndarray, mated: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Identity codes of the images of a pair list: groups joined by mated pairs, merged by parent folder unless
    some non-mated pair joins two images of one folder."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(names)
    folders = [identity_from_folder(name) or "" for name in names]
    _, folder = np.unique(folders, return_inverse=True)
    named = np.array([bool(f) for f in folders])
    clash = (~mated) & named[first] & named[second] & (folder[first] == folder[second])
    a, b = [first[mated]], [second[mated]]
    if not clash.any():
        representative = np.full(folder.max(initial=0) + 1, -1)
        representative[folder[named][::-1]] = np.flatnonzero(named)[::-1]
        a.append(np.flatnonzero(named))
        b.append(representative[folder[named]])
    a, b = np.concatenate(a), np.concatenate(b)
    graph = coo_matrix((np.ones(a.size), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


# ---------------------------------------------------------------------------------------------- fitting
def _isotonic() -> Any:
    try:
        from scipy.optimize import isotonic_regression
    except ImportError:
        raise ImportError("calibration needs scipy >= 1.12 (scipy.optimize.isotonic_regression); "
                          "pip install 'aikd[evaluate]'") from None
    return isotonic_regression


class _Fitter:
    """Fits the mapping on a calibration set for any identity weights (bootstrap, held-out split)."""

    def __init__(self, data: CalibrationSet, fmr: float) -> None:
        self.data, self.fmr = data, fmr
        n = len(data.quality)
        self.comparisons = (np.bincount(data.mated_first, minlength=n)
                            + np.bincount(data.mated_second, minlength=n)).astype(np.float64)
        self.levels, self.level_of = np.unique(data.quality, return_inverse=True)
        self.isotonic = _isotonic()

    def failures(self, threshold: float) -> np.ndarray:
        """Per image, its mated comparisons that are false non-matches at ``threshold``."""
        data, n = self.data, len(self.data.quality)
        fnm = (data.mated_scores <= threshold).astype(np.float64)
        return np.bincount(data.mated_first, fnm, n) + np.bincount(data.mated_second, fnm, n)

    def fit(self, threshold: float, image_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Knots ``(quality, expected_fnmr)`` of the non-increasing fit; images weighted by ``image_weight``."""
        weight = np.bincount(self.level_of, image_weight * self.comparisons, len(self.levels))
        failed = np.bincount(self.level_of, image_weight * self.failures(threshold), len(self.levels))
        present = weight > 0
        if not present.any():
            raise ValueError("no image with a mated comparison to fit the mapping on")
        quality, weight, failed = self.levels[present], weight[present], failed[present]
        result = self.isotonic(failed / weight, weights=weight, increasing=False)
        starts, ends = result.blocks[:-1], result.blocks[1:] - 1
        knots = np.unique(np.concatenate([starts, ends]))  # first and last quality of every constant piece
        return quality[knots], np.clip(result.x[knots], 0.0, 1.0)


def expected_at(knot_quality: np.ndarray, knot_fnmr: np.ndarray, quality: np.ndarray | float) -> np.ndarray:
    """The mapping at ``quality``: linear between knots, clamped to the end values outside them."""
    return np.interp(np.asarray(quality, dtype=np.float64), knot_quality, knot_fnmr)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Calibration:
    """A fitted mapping from quality to expected FNMR, with its band and provenance (the calib.json content).

    Attributes:
        quality: knot qualities, increasing.
        fnmr: expected FNMR at the knots, non-increasing.
        lower, upper: pointwise bootstrap band at the knots (equal to ``fnmr`` without a bootstrap).
        fmr: target FMR of the threshold.
        threshold: the threshold the FNMR holds at (cosine similarity).
        info: the rest of the file: FR model, dataset, quality model, counts, reliability, recommendation.
    """

    quality: np.ndarray
    fnmr: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    fmr: float
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)

    def expected_fnmr(self, quality: np.ndarray | float) -> np.ndarray:
        """Expected FNMR of the mated comparisons an image of this quality takes part in."""
        return expected_at(self.quality, self.fnmr, quality)

    def band(self, quality: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """The bootstrap band of :meth:`expected_fnmr` (linear between knots, as the mapping)."""
        return expected_at(self.quality, self.lower, quality), expected_at(self.quality, self.upper, quality)

    def quality_100(self, quality: np.ndarray | float) -> np.ndarray:
        """0-100, 100 = the lowest expected FNMR of the calibration set (set-specific; module docstring)."""
        best, worst = float(self.fnmr.min()), float(self.fnmr.max())
        expected = self.expected_fnmr(quality)
        if worst <= best:  # a flat mapping: every image has the set's lowest expected FNMR
            return np.full(np.shape(expected), 100, dtype=np.int64)
        return np.rint(100 * (worst - expected) / (worst - best)).astype(np.int64)

    def apply(self, quality: np.ndarray) -> dict[str, np.ndarray]:
        """``{"quality", "expected_fnmr", "quality_100"}`` for an array of raw qualities."""
        quality = np.asarray(quality, dtype=np.float64)
        return {"quality": quality, "expected_fnmr": self.expected_fnmr(quality),
                "quality_100": self.quality_100(quality)}

    @property
    def quality_model_fingerprint(self) -> str | None:
        return (self.info.get("quality_model") or {}).get("fingerprint")

    @property
    def quality_model_fingerprints(self) -> list[str]:
        """Every fingerprint the calibrated scores' model is known by (an exported graph's and its weights')."""
        model = self.info.get("quality_model") or {}
        return [f for f in (model.get("fingerprint"), model.get("weights_fingerprint")) if f]

    @property
    def fr_model(self) -> dict[str, Any]:
        return dict(self.info.get("fr_model") or {})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON, checkpoint ``extra``, ONNX metadata); :meth:`from_dict` reads it back."""
        from aikd.version import __version__

        mapping = {"interpolation": "linear", "outside": "clamp", "quality": _floats(self.quality),
                   "expected_fnmr": _floats(self.fnmr), "lower": _floats(self.lower), "upper": _floats(self.upper)}
        scale = {"fnmr_at_100": float(self.fnmr.min()), "fnmr_at_0": float(self.fnmr.max()),
                 "rounding": "nearest integer", "set_specific": True}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "aikd_version": __version__,
                "note": SET_SPECIFIC, "fmr": self.fmr, "threshold": self.threshold, **self.info,
                "mapping": {**(self.info.get("mapping") or {}), **mapping}, "quality_100": scale}

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> Calibration:
        """Read and check :meth:`to_dict`'s data; a bad field is named in the ValueError."""
        return _parse(data, source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the calibration as JSON, atomically."""
        with atomic_write(path) as handle:
            json.dump(self.to_dict(), handle, indent=1, allow_nan=False)
            handle.write("\n")


MAX_FILE_BYTES = 64 << 20  # a calib.json is a few kB; a file this large is something else
_MAPPING_ARRAYS = ("quality", "expected_fnmr", "lower", "upper", "interpolation", "outside")


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64)]


def load_calibration(source: str | os.PathLike | Mapping[str, Any] | Calibration,
                     name: str = "calibration") -> Calibration:
    """A calibration from a calib.json file, its plain data (a checkpoint's, an ONNX file's; ``name`` says whose
    in errors) or itself."""
    if isinstance(source, Calibration):
        return source
    if isinstance(source, Mapping):
        return _parse(dict(source), name)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is no calibration file (they are a few kB)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a calibration file aikd reads ({str(err)[:200]})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a calibration file aikd reads (nested too deep)") from None
    return _parse(data, str(path))


def _get(data: Any, name: str, source: str) -> Any:
    node = data
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{source}: {name} is missing")
        node = node[part]
    return node


def _number(data: Any, name: str, source: str, low: float = -math.inf, high: float = math.inf) -> float:
    value = _get(data, name, source)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"{source}: {name} must be a number in ({low:g}, {high:g}), got {str(value)[:40]}")
    return float(value)


def _array(data: Any, name: str, source: str, length: int | None = None) -> np.ndarray:
    value = _get(data, name, source)
    if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                       for v in value):
        raise ValueError(f"{source}: {name} must be a non-empty list of numbers")
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: {name} holds a value that is not finite")
    if length is not None and array.size != length:
        raise ValueError(f"{source}: {name} has {array.size} values, mapping.quality has {length}")
    return array


def _check_model_record(record: Any, name: str, source: str) -> None:
    """A model record (``quality_model``, ``fr_model``): a mapping of short strings (or ``None``) by name."""
    if record is None:
        return
    if not isinstance(record, dict):
        raise ValueError(f"{source}: {name} must be a mapping, got {type(record).__name__}")
    for key, value in record.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{source}: {name}.{key} must be a string, got {type(value).__name__}")


def _parse(data: Any, source: str) -> Calibration:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{source}: format must be {FORMAT!r} (not an aikd calibration)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{source}: format_version {version!r} is not {FORMAT_VERSION} (written by another aikd "
                         "version?)")
    quality = _array(data, "mapping.quality", source)
    if np.any(np.diff(quality) <= 0):
        raise ValueError(f"{source}: mapping.quality must increase strictly")
    arrays = {name: _array(data, f"mapping.{name}", source, quality.size)
              for name in ("expected_fnmr", "lower", "upper")}
    for name, values in arrays.items():
        if values.min() < 0 or values.max() > 1:
            raise ValueError(f"{source}: mapping.{name} must lie in [0, 1]")
    if np.any(np.diff(arrays["expected_fnmr"]) > 0):
        raise ValueError(f"{source}: mapping.expected_fnmr must not increase with quality")
    if _get(data, "mapping.interpolation", source) != "linear":
        raise ValueError(f"{source}: mapping.interpolation must be 'linear'")
    fmr = _number(data, "fmr", source, 0, 1)
    threshold = _number(data, "threshold", source)
    if not isinstance(_get(data, "fr_model", source), dict):
        raise ValueError(f"{source}: fr_model must be a mapping with name and fingerprint")
    _check_model_record(data.get("quality_model"), "quality_model", source)
    _check_model_record(data["fr_model"], "fr_model", source)
    info = {key: value for key, value in data.items() if key not in
            ("format", "format_version", "aikd_version", "note", "fmr", "threshold", "quality_100")}
    info["mapping"] = {key: value for key, value in data["mapping"].items() if key not in _MAPPING_ARRAYS}
    return Calibration(quality, arrays["expected_fnmr"], arrays["lower"], arrays["upper"], fmr, threshold, info)


# ------------------------------------------------------------------------------------------- calibrate
def calibrate(data: CalibrationSet, options: CalibrationOptions, info: Mapping[str, Any] | None = None
              ) -> Calibration:
    """Fit the mapping, its bootstrap band, the held-out reliability and (if asked) the reject threshold.

    Args:
        data: the calibration set (:func:`calibration_set`).
        options: FMR, bootstrap, held-out split, target FNMR.
        info: provenance to record (``fr_model``, ``dataset``, ``quality_model``).
    """
    if data.n_nonmated < needed_nonmated(options.fmr):
        _refuse_small(data.n_nonmated, options.fmr)
    fitter = _Fitter(data, options.fmr)
    everyone = np.ones(data.n_identities)
    threshold = data.threshold(options.fmr)
    quality, fnmr = fitter.fit(threshold, everyone[data.identity])
    curves, rejects, skipped = _bootstrap(data, fitter, options, quality)
    if skipped:
        log.warning("warning: %d of %d bootstrap replicates left out (no mated or too few non-mated comparisons "
                    "among the identities drawn)", skipped, options.bootstrap)
    lower, upper = fnmr, fnmr
    if len(curves):
        alpha = 100 * (1 - options.confidence) / 2
        lower, upper = np.percentile(curves, [alpha, 100 - alpha], axis=0)
    record = {**(info or {}),
              "counts": {"images": int(len(data.quality)), "identities": data.n_identities,
                         "mated": int(data.mated_scores.size), "nonmated": int(data.n_nonmated)},
              "mapping": {"confidence": options.confidence, "bootstrap": options.bootstrap,
                          "bootstrap_used": int(len(curves)), "seed": options.seed, "resampled": "identities"},
              "reliability": _reliability(data, fitter, options)}
    if options.target_fnmr is not None:
        record["recommendation"] = _recommendation(data, threshold, rejects, options)
    return Calibration(quality, fnmr, np.minimum(lower, 1), np.minimum(upper, 1), options.fmr, threshold, record)


def _bootstrap(data: CalibrationSet, fitter: _Fitter, options: CalibrationOptions,
               knots: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]], int]:
    """Replicate curves at ``knots``, reject thresholds, and the number of replicates left out."""
    rng = np.random.default_rng(options.seed)
    n = data.n_identities
    curves, rejects, skipped = [], [], 0
    for _ in range(options.bootstrap):
        drawn = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        try:
            threshold = data.threshold(options.fmr, drawn)
            quality, fnmr = fitter.fit(threshold, drawn[data.identity])
        except ValueError:
            skipped += 1
            continue
        curves.append(expected_at(quality, fnmr, knots))
        if options.target_fnmr is not None:
            rejects.append(_reject(data, threshold, options.target_fnmr, drawn, options.fmr))
    return np.array(curves).reshape(-1, knots.size), rejects, skipped


def _reject(data: CalibrationSet, threshold: float, target: float, drawn: np.ndarray,
            fmr: float) -> dict[str, Any]:
    """The lowest quality whose kept mated comparisons reach ``target`` FNMR, or the best reachable FNMR."""
    pair_quality = ev.pair_quality(data.quality[data.mated_first], data.quality[data.mated_second])
    weight = drawn[data.identity[data.mated_first]]
    curve = ev.fnm_edc(data.mated_scores, pair_quality, threshold, fmr, weights=weight)
    reached = np.flatnonzero(curve.fnmr <= target)
    if not reached.size:
        best = int(np.argmin(curve.fnmr))
        return {"reachable": False, "best_fnmr": float(curve.fnmr[best]),
                "rejected_mated_at_best": float(curve.discard_fraction[best])}
    point = int(reached[0])
    quality = float(np.unique(pair_quality[weight > 0])[point])
    image_weight = drawn[data.identity]
    return {"reachable": True, "quality": quality, "fnmr": float(curve.fnmr[point]),
            "rejected_images": float(image_weight[data.quality < quality].sum() / image_weight.sum()),
            "rejected_mated": float(curve.discard_fraction[point])}


def _recommendation(data: CalibrationSet, threshold: float, rejects: list[dict[str, Any]],
                    options: CalibrationOptions) -> dict[str, Any]:
    """The reject threshold for ``options.target_fnmr`` with bootstrap intervals of its figures."""
    target = float(options.target_fnmr)
    point = _reject(data, threshold, target, np.ones(data.n_identities), options.fmr)
    reached = [r for r in rejects if r["reachable"]]
    out: dict[str, Any] = {"target_fnmr": target, "rule": "reject images with quality < quality; a mated "
                           "comparison is rejected when either image is (pair quality = the lower quality)",
                           **point, "replicates_reaching": len(reached), "replicates": len(rejects)}
    alpha = 100 * (1 - options.confidence) / 2
    if point["reachable"] and reached:
        for key in ("quality", "fnmr", "rejected_images", "rejected_mated"):
            values = [r[key] for r in reached]
            out[f"{key}_interval"] = [float(np.percentile(values, alpha)), float(np.percentile(values, 100 - alpha))]
    return out


def _reliability(data: CalibrationSet, fitter: _Fitter, options: CalibrationOptions) -> dict[str, Any] | None:
    """Reliability diagram on held-out identities: predicted vs observed FNMR per bin, and the ECE."""
    n = data.n_identities
    held = np.random.default_rng([options.seed, 1]).permutation(n)[: int(round(options.holdout * n))]
    if held.size == 0 or held.size >= n:
        if options.holdout > 0:
            log.warning("warning: %d identities are too few to hold %g of them out; no reliability diagram",
                        n, options.holdout)
        return None
    drawn = np.ones(n)
    drawn[held] = 0
    threshold = data.threshold(options.fmr, drawn)
    quality, fnmr = fitter.fit(threshold, drawn[data.identity])
    images = (drawn[data.identity] == 0) & (fitter.comparisons > 0)
    if not images.any():
        return None
    predicted = expected_at(quality, fnmr, data.quality[images])
    comparisons, failures = fitter.comparisons[images], fitter.failures(threshold)[images]
    edges = np.unique(np.quantile(predicted, np.linspace(0, 1, options.bins + 1)))
    index = np.clip(np.searchsorted(edges, predicted, side="right") - 1, 0, max(edges.size - 2, 0))
    size = int(index.max()) + 1
    mated = np.bincount(index, comparisons, size)
    used = np.flatnonzero(mated > 0)
    bins = [{"predicted": float(np.bincount(index, predicted * comparisons, size)[b] / mated[b]),
             "observed": float(np.bincount(index, failures, size)[b] / mated[b]),
             "images": int(np.bincount(index, minlength=size)[b]), "mated": int(mated[b])} for b in used]
    error = sum(row["mated"] * abs(row["predicted"] - row["observed"]) for row in bins) / mated.sum()
    return {"holdout": options.holdout, "fit_identities": int(n - held.size), "heldout_identities": int(held.size),
            "threshold": float(threshold), "bins": bins, "ece": float(error),
            "note": "fitted on the other identities; predicted vs observed FNMR of held-out images, quantile bins "
                    "of predicted FNMR, ECE weighted by mated comparisons"}


# ------------------------------------------------------------------------------------------ provenance
def run_record(path: str | os.PathLike) -> dict[str, Any]:
    """The run record aikd wrote beside an output (``S.csv`` -> ``S.run.json``), or ``{}`` where there is none or
    it cannot be read (provenance is advisory here: a warning is judged on what can be known)."""
    from aikd.pipeline.outputs import read_run_record

    try:
        return read_run_record(Path(path)) or {}
    except ValueError:
        return {}


def resolve_calibration(requested: Any, carried: Mapping[str, Any] | None, fingerprints: Sequence[str | None],
                        model: str, fr_model: str | os.PathLike | None = None) -> Calibration | None:
    """The calibration a scoring run applies: the one home of this rule (``aikd score``, the Python API, the service).

    Args:
        requested: a calib.json path, its data or a :class:`Calibration`; ``True``: the one the model carries;
            ``None``/``False``: none.
        carried: the calibration the model file carries (plain data), if any.
        fingerprints: the quality model's fingerprints (the weights, and an exported graph's own).
        model: the model's name in messages (its file).
        fr_model: the FR model the expected FNMR is wanted for (a name, or its embeddings): warned about when the
            calibration was made with another.

    Raises:
        ValueError: ``True`` for a model that carries none, an unreadable calibration, or ``fr_model`` without one.
    """
    calibration = None
    if requested is True:
        if not carried:
            raise ValueError(f"{model} carries no calibration (aikd calibrate --checkpoint writes one into a "
                             "checkpoint); give a calib.json")
        calibration = load_calibration(carried, f"{model}: calibration")
        check_quality_model(calibration, fingerprints, model)  # a carried one too: it may have been forced
    elif requested is not None and requested is not False:
        calibration = load_calibration(requested)
        if carried:
            log.warning("note: the calibration given replaces the one %s carries", model)
        check_quality_model(calibration, fingerprints, model)
    if fr_model is not None:
        if calibration is None:
            raise ValueError("--fr-model checks a calibration: give --calibration or a calibrated checkpoint")
        check_fr_model(calibration, fr_model)
    return calibration


def same_quality_model(calibration: Calibration, fingerprints: Sequence[str | None]) -> bool:
    """Whether the calibration was fitted on scores of the model known by ``fingerprints`` (True where it does not
    say which model it was)."""
    expected = calibration.quality_model_fingerprint
    return expected is None or bool(set(calibration.quality_model_fingerprints) & {f for f in fingerprints if f})


def forced(calibration: Calibration, fingerprint: str) -> Calibration:
    """``calibration`` recording that it was attached to the model ``fingerprint`` although it was fitted on
    another model's scores (``aikd calibrate --force``)."""
    note = "attached with --force; its expected FNMR was not fitted on this model's scores"
    info = {**calibration.info, "forced": {"attached_to": fingerprint,
                                           "fitted_on": calibration.quality_model_fingerprint, "note": note}}
    return Calibration(calibration.quality, calibration.fnmr, calibration.lower, calibration.upper, calibration.fmr,
                       calibration.threshold, info)


def check_quality_model(calibration: Calibration, fingerprints: Sequence[str | None], model: str) -> bool:
    """Warn when the quality model now scoring is not the one whose scores were calibrated; True if it matches
    (or cannot be told)."""
    if same_quality_model(calibration, fingerprints):
        return True
    expected = calibration.quality_model_fingerprint
    log.warning("warning: the calibration was fitted on scores of another quality model (%s) than %s (%s): its "
                "expected FNMR does not hold for these scores; calibrate this model", expected,
                model, next((f for f in fingerprints if f), "unknown"))
    return False


def check_fr_model(calibration: Calibration, fr_model: str | os.PathLike) -> bool:
    """Warn when ``fr_model`` (a name, or an embeddings file whose run record names the FR weights) is not the
    FR model the calibration was made with; True if it matches."""
    recorded = calibration.fr_model
    path = Path(fr_model)
    fingerprint = run_record(path).get("model") if path.suffix == ".npz" and path.is_file() else None
    if fingerprint is not None and recorded.get("fingerprint") is not None:
        same = fingerprint == recorded["fingerprint"]
        given = f"{path} ({fingerprint})"
    else:
        name = path.stem if path.suffix == ".npz" else str(fr_model)
        same = name == recorded.get("name")
        given = name
    if not same:
        log.warning("warning: the calibration was made with embeddings of FR model %s (%s); expected FNMR does not "
                    "transfer to %s: calibrate with that model's embeddings", recorded.get("name"),
                    recorded.get("fingerprint") or "no fingerprint", given)
    return same


# ------------------------------------------------------------------------------------------------- plot
def plot_reliability(calibration: Calibration, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem``.png and .svg: the mapping with its band, and the held-out reliability diagram."""
    from matplotlib.figure import Figure  # no pyplot and no backend switch: the figure draws itself (Agg)

    stem = Path(stem)
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    grid = np.linspace(calibration.quality.min(), calibration.quality.max(), 400)
    confidence = (calibration.info.get("mapping") or {}).get("confidence", DEFAULT_CONFIDENCE)
    left.fill_between(grid, *calibration.band(grid), color="tab:blue", alpha=0.25,
                      label=f"{confidence:.0%} band (bootstrap over identities)")
    left.plot(grid, calibration.expected_fnmr(grid), color="tab:blue", lw=1.8, label="expected FNMR")
    left.set(xlabel="quality score", ylabel=f"expected FNMR at FMR {calibration.fmr:g}",
             title=f"mapping (threshold {calibration.threshold:.4f})")
    left.legend(fontsize=8)
    reliability = calibration.info.get("reliability")
    if reliability:
        bins = reliability["bins"]
        predicted, observed = [b["predicted"] for b in bins], [b["observed"] for b in bins]
        top = max([*predicted, *observed, 1e-3]) * 1.1
        right.plot([0, top], [0, top], color="0.5", ls="--", lw=1, label="perfect calibration")
        right.plot(predicted, observed, marker="o", color="tab:red", label="held-out bins")
        right.set(xlim=(0, top), ylim=(0, top), xlabel="predicted FNMR", ylabel="observed FNMR",
                  title=f"held-out identities ({reliability['heldout_identities']}): ECE {reliability['ece']:.4f}")
        right.legend(fontsize=8)
    else:
        right.set_axis_off()
        right.text(0.5, 0.5, "no held-out split (--holdout 0)", ha="center", va="center")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    written = []
    for suffix in ("png", "svg"):
        path = stem.with_name(f"{stem.name}.{suffix}")
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format=suffix, dpi=150)
        written.append(path)
    return written


def _interval(values: Sequence[float] | None, scale: float = 1, digits: int = 4) -> str:
    return f" [{values[0] * scale:.{digits}g}, {values[1] * scale:.{digits}g}]" if values else ""


def summary(calibration: Calibration) -> str:
    """What a calibration says, in a few lines (printed by ``aikd calibrate``)."""
    info = calibration.info
    counts, mapping = info.get("counts") or {}, info.get("mapping") or {}
    lines = [f"FR model {calibration.fr_model.get('name')}, dataset {info.get('dataset')}: FMR {calibration.fmr:g}, "
             f"threshold {calibration.threshold:.4f}"
             + (f"; {counts['images']} images of {counts['identities']} identities, {counts['mated']} mated and "
                f"{counts['nonmated']} non-mated comparisons" if counts else ""),
             f"expected FNMR {calibration.fnmr[0]:.4f} at quality <= {calibration.quality[0]:.4g} down to "
             f"{calibration.fnmr[-1]:.4f} at quality >= {calibration.quality[-1]:.4g} ({calibration.quality.size} "
             f"knots, linear between them); {mapping.get('confidence', DEFAULT_CONFIDENCE):.0%} band from "
             f"{mapping.get('bootstrap_used', 0)} bootstrap replicates over identities",
             "quality_100: 100 = the lowest expected FNMR of this calibration set (set-specific)"]
    reliability = info.get("reliability")
    if reliability:
        lines.append(f"held-out calibration error (ECE): {reliability['ece']:.4f} over {len(reliability['bins'])} "
                     f"bins, {reliability['heldout_identities']} held-out identities")
    rec = info.get("recommendation")
    if rec and rec["reachable"]:
        lines.append(f"reject threshold for FNMR <= {rec['target_fnmr']:g}: quality < {rec['quality']:.4g}"
                     f"{_interval(rec.get('quality_interval'))}; rejects {rec['rejected_images']:.1%} of images"
                     f"{_interval(rec.get('rejected_images_interval'), 100, 3)} % and {rec['rejected_mated']:.1%} "
                     f"of mated comparisons{_interval(rec.get('rejected_mated_interval'), 100, 3)} %; FNMR then "
                     f"{rec['fnmr']:.4f} ({rec['replicates_reaching']} of {rec['replicates']} replicates reach it)")
    elif rec:
        lines.append(f"reject threshold for FNMR <= {rec['target_fnmr']:g}: unreachable on this set; the lowest FNMR "
                     f"is {rec['best_fnmr']:.4f}, after rejecting {rec['rejected_mated_at_best']:.1%} of mated "
                     "comparisons")
    return "\n".join(lines)
