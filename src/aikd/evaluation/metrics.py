"""Error-versus-discard characteristics (EDC/ERC) and their partial areas, in numpy only.

A face image quality assessment (FIQA) method is judged by how fast the false non-match rate (FNMR) of a
face recogniser falls when the comparisons of the lowest quality are discarded. This module computes
that curve under two named threshold conventions (the ``threshold_mode`` column of every output):

``fixed``
    The FNM-EDC of ISO/IEC 29794-1:2024 as specified by Schlett et al., "Considerations on the evaluation
    of biometric quality assessment algorithms" (IEEE T-BIOM 2024). The decision threshold is set once,
    from all non-mated comparisons, at the target FMR. Mated comparisons are then discarded in order of
    increasing pair quality and the FNMR is computed over the mated comparisons that remain. Comparisons
    tied in pair quality are discarded together, so the curve has a point only where a whole tie group is
    gone; between points it is a step function, and its partial area is the area under that step
    function (:func:`pauc` with ``stepwise=True``). The x axis is the fraction of mated comparisons
    discarded.

``recomputed``
    The convention of the CR-FIQA and MagFace evaluation code, used by the AI-KD paper's tables: all
    comparisons (mated and non-mated) are ordered by pair quality, the lowest fraction ``d`` of them is
    discarded for ``d`` on the grid 0, 0.05, ..., 0.95 (``floor(d * P)`` of ``P`` comparisons), and the
    threshold is re-estimated at the target FMR on the non-mated comparisons that remain at each level.
    Partial areas use the trapezoid rule on that grid. Ties in pair quality are broken by a fixed rule
    (:func:`discard_order`) so that exactly ``floor(d * P)`` comparisons go at each level.

Definitions used throughout (all similarities are cosine similarities of L2-normalised embeddings):

* pair quality = ``min(q_a, q_b)`` of the two images' qualities (ISO/IEC 29794-1).
* threshold at FMR ``f`` over ``n`` non-mated similarities: with ``k = floor(f * n)`` false matches
  allowed, the threshold is the ``(k+1)``-th highest non-mated similarity, and a comparison is a *match*
  when its similarity is strictly greater than the threshold. At most ``k`` non-mated similarities exceed
  it, so the achieved FMR is ``<= f``; non-mated similarities tied with the threshold are all rejected,
  which can make the achieved FMR smaller than ``f`` (never larger). A mated comparison is a false
  non-match when its similarity is ``<=`` the threshold.
* normalised pAUC = pAUC / (FNMR(0) * discard_limit): the area relative to not discarding at all, so 1.0
  means "no better than not discarding" and values below 1 are better (the paper's tables).
* oracle (theoretical best): discarding exactly the false non-matches first,
  ``FNMR(d) = max(0, FNMR(0) - d) / (1 - d)`` for the fixed convention.

The module also holds the regression figures of a quality predictor against its labels
(:func:`quality_metrics`: SmoothL1 loss, Spearman and Pearson correlations, alignment sensitivity), which
``aikd train`` reports at each validation.

Scale: an all-vs-all protocol over 19k images has 1.8e8 comparisons. :func:`evaluate_all_vs_all` never
holds them: it computes similarities in row blocks of the Gram matrix (float32 matrix products), keeps
every mated comparison (few: only pairs within an identity), and streams the non-mated similarities
through :class:`NonMatedTail`, which keeps only those that can still be among the ``k+1`` highest of some
discard level (FMR <= 1e-2 needs at most the top 1 %). For the recomputed convention the images are put
in discard order first, so that each row of the Gram matrix belongs to one discard level except at the
few rows where a level boundary falls; the result equals the dense computation exactly.

This module must not import torch (tests check ``sys.modules`` in a fresh interpreter).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_DISCARD_LIMIT",
    "DEFAULT_FMR",
    "EDC",
    "RECOMPUTED_GRID",
    "STANDARD_FMRS",
    "THRESHOLD_MODES",
    "NonMatedTail",
    "average_ranks",
    "cosine_similarity",
    "discard_order",
    "evaluate_all_vs_all",
    "evaluate_pairs",
    "false_matches_allowed",
    "fnm_edc",
    "fnmr_at_fmr",
    "fnmr_at_threshold",
    "image_ranks",
    "quality_metrics",
    "iter_all_vs_all_similarities",
    "l2_normalise",
    "normalised_pauc",
    "oracle_edc",
    "oracle_fnmr",
    "oracle_for",
    "pair_quality",
    "pauc",
    "recomputed_edc",
    "spearman",
    "threshold_at_fmr",
]

DEFAULT_FMR = 1e-3  # the AI-KD tables' operating point
STANDARD_FMRS = (1e-4, 1e-3, 1e-2)
DEFAULT_DISCARD_LIMIT = 0.3  # the AI-KD tables integrate up to 30 % discarded (0.2 is also common)
RECOMPUTED_GRID = np.round(np.arange(20) * 0.05, 2)  # 0, 0.05, ..., 0.95 as in the CR-FIQA code
THRESHOLD_MODES = ("fixed", "recomputed")
_CHUNK_ELEMENTS = 1 << 22  # similarities per Gram block (16 MB of float32)


# ----------------------------------------------------------------------------------------------- basics
def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; norms computed in float64); all-zero rows stay zero.

    aikd's one L2 normalisation: ``aikd embed``/``score`` write embeddings with it, evaluation applies it again.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def cosine_similarity(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) embedding arrays."""
    return np.einsum("ij,ij->i", l2_normalise(first), l2_normalise(second))


def pair_quality(first_quality: np.ndarray, second_quality: np.ndarray) -> np.ndarray:
    """Quality of a comparison: the lower of its two images' qualities (ISO/IEC 29794-1)."""
    return np.minimum(first_quality, second_quality)


def false_matches_allowed(n_nonmated: int | np.ndarray, fmr: float) -> int | np.ndarray:
    """``k = floor(fmr * n)``: how many non-mated comparisons may score above the threshold.

    A relative tolerance of 1e-9 keeps products such as ``1e-3 * 3000`` from rounding down to 2.
    """
    value = np.floor(np.asarray(n_nonmated, dtype=np.float64) * fmr * (1 + 1e-9)).astype(np.int64)
    return int(value) if value.ndim == 0 else value


def threshold_at_fmr(nonmated_scores: np.ndarray, fmr: float, weights: np.ndarray | None = None,
                     total: float | None = None) -> float:
    """The ``(k+1)``-th highest non-mated similarity, ``k = floor(fmr * n)`` (see the module docstring).

    Comparisons scoring strictly above the returned threshold are matches, so the achieved FMR is <= fmr.

    Args:
        nonmated_scores: non-mated similarities (all of them, or the highest ones with ``total``).
        fmr: target false match rate.
        weights: how many comparisons each similarity stands for (e.g. a bootstrap's multiplicities; 0 leaves
            it out); default one each. The result equals the unweighted threshold of the repeated scores.
        total: how many (weighted) non-mated comparisons there are in all, when ``nonmated_scores`` holds only
            the highest of them; default: all are given.

    Raises:
        ValueError: no non-mated comparison, or fewer highest scores given than the threshold needs.
    """
    scores = np.asarray(nonmated_scores).ravel()
    if weights is None and total is None:
        if scores.size == 0:
            raise ValueError("cannot set a threshold: there are no non-mated comparisons")
        rank = scores.size - 1 - false_matches_allowed(scores.size, fmr)  # ascending index of (k+1)-th highest
        return float(np.partition(scores, rank)[rank])
    weights = np.ones(scores.size) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    scores, weights = scores[weights > 0], weights[weights > 0]
    n = float(weights.sum()) if total is None else float(total)
    if scores.size == 0 or n <= 0:
        raise ValueError("cannot set a threshold: there are no non-mated comparisons")
    allowed = false_matches_allowed(n, fmr)
    order = np.argsort(-scores, kind="stable")
    held = np.cumsum(weights[order])
    position = int(np.searchsorted(held, allowed, side="right"))  # first score with more than k above or at it
    if position >= scores.size:
        raise ValueError(f"cannot set a threshold: the {scores.size} highest non-mated scores given stand for "
                         f"{held[-1]:g} comparisons; FMR {fmr:g} of {n:g} needs more than {allowed}")
    return float(scores[order[position]])


def fnmr_at_threshold(mated_scores: np.ndarray, threshold: float) -> float:
    """Fraction of mated comparisons that are not matches (similarity <= threshold)."""
    mated_scores = np.asarray(mated_scores)
    if mated_scores.size == 0:
        return math.nan
    return float(np.count_nonzero(mated_scores <= threshold) / mated_scores.size)


def fnmr_at_fmr(mated_scores: np.ndarray, nonmated_scores: np.ndarray, fmr: float = DEFAULT_FMR) -> float:
    """FNMR at the threshold that :func:`threshold_at_fmr` sets on the non-mated similarities."""
    return fnmr_at_threshold(mated_scores, threshold_at_fmr(nonmated_scores, fmr))


def image_ranks(quality: np.ndarray) -> np.ndarray:
    """Each image's place in discard order: ascending quality, ties by row index (rank 0 goes first)."""
    order = np.lexsort((np.arange(len(quality)), quality))
    ranks = np.empty(len(quality), dtype=np.int64)
    ranks[order] = np.arange(len(quality))
    return ranks


def discard_order(first_rank: np.ndarray, second_rank: np.ndarray) -> np.ndarray:
    """Order in which comparisons are discarded, lowest pair quality first.

    Comparisons are sorted by the rank (:func:`image_ranks`) of their lower-quality image, which orders them
    by pair quality; ties go by the rank of the other image, then by list position. All-vs-all protocols
    use the same order, so a chunked evaluation discards exactly the comparisons a dense one would.
    """
    low, high = np.minimum(first_rank, second_rank), np.maximum(first_rank, second_rank)
    return np.lexsort((np.arange(len(low)), high, low))


# ---------------------------------------------------------------------------------------------- curves
@dataclass(frozen=True)
class EDC:
    """One error-versus-discard curve.

    Attributes:
        discard_fraction: x values, ascending, starting at 0.
        fnmr: FNMR after discarding that fraction.
        threshold: decision threshold used at each point (constant for ``fixed``).
        fmr: target false match rate.
        threshold_mode: ``"fixed"`` (step function) or ``"recomputed"`` (trapezoid).
        n_mated: mated comparisons before discarding.
    """

    discard_fraction: np.ndarray
    fnmr: np.ndarray
    threshold: np.ndarray
    fmr: float
    threshold_mode: str
    n_mated: int

    @property
    def fnmr0(self) -> float:
        """FNMR without discarding anything."""
        return float(self.fnmr[0])


def fnm_edc(mated_scores: np.ndarray, mated_pair_quality: np.ndarray, threshold: float,
            fmr: float = math.nan, weights: np.ndarray | None = None) -> EDC:
    """FNM-EDC with a fixed threshold (ISO/IEC 29794-1; Schlett et al.).

    Mated comparisons are discarded lowest pair quality first, a whole tie group at a time; the point after
    discarding ``c`` of ``m`` comparisons is ``(c / m, FNM among the rest / (m - c))``. No point is made
    once nothing is left.

    Args:
        mated_scores: similarity of each mated comparison.
        mated_pair_quality: pair quality of each mated comparison (no NaN).
        threshold: decision threshold from all non-mated comparisons (:func:`threshold_at_fmr`).
        fmr: the FMR the threshold was set at (recorded in the result).
        weights: how many comparisons each one stands for (a bootstrap's multiplicities; 0 leaves it out);
            default one each. Counts ``c``, ``m`` and FNM are then sums of weights.
    """
    scores, quality = np.asarray(mated_scores), np.asarray(mated_pair_quality)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        scores, quality, weights = scores[weights > 0], quality[weights > 0], weights[weights > 0]
    if scores.size == 0:
        raise ValueError("cannot draw an EDC: there are no mated comparisons")
    if np.isnan(quality).any():
        raise ValueError("pair qualities must not be NaN (drop comparisons without a score first)")
    order = np.argsort(quality, kind="stable")
    quality = quality[order]
    weight = np.ones(scores.size) if weights is None else weights[order]
    false_non_match = (scores[order] <= threshold) * weight
    discarded = np.concatenate([[0], np.flatnonzero(quality[1:] != quality[:-1]) + 1])  # tie-group starts
    fnm_before = np.concatenate([[0], np.cumsum(false_non_match)])[discarded]
    weight_before = np.concatenate([[0], np.cumsum(weight)])[discarded]
    total = float(weight.sum())
    fnmr = (false_non_match.sum() - fnm_before) / (total - weight_before)
    n_mated = int(scores.size) if weights is None else int(round(total))
    return EDC(weight_before / total, fnmr.astype(np.float64), np.full(discarded.size, float(threshold)),
               fmr, "fixed", n_mated)


def oracle_fnmr(fnmr0: float, discard_fraction: np.ndarray) -> np.ndarray:
    """Theoretical best curve: ``max(0, FNMR(0) - d) / (1 - d)`` (false non-matches discarded first)."""
    d = np.asarray(discard_fraction, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d < 1, np.maximum(0.0, fnmr0 - d) / (1 - d), 0.0)


def oracle_edc(n_mated: int, n_false_non_matches: int, threshold: float = math.nan,
               fmr: float = math.nan) -> EDC:
    """The fixed-threshold oracle as a step curve over ``m`` mated comparisons with ``E`` false non-matches:
    after discarding ``c`` of them, ``FNMR = max(0, E - c) / (m - c)``."""
    discarded = np.arange(n_mated)
    fnmr = np.maximum(0, n_false_non_matches - discarded) / (n_mated - discarded)
    return EDC(discarded / n_mated, fnmr, np.full(n_mated, threshold), fmr, "fixed", n_mated)


def oracle_for(edc: EDC) -> EDC:
    """The oracle matching ``edc``: the exact step oracle for ``fixed``; for ``recomputed`` the same formula
    sampled on the curve's grid (a reference line: with re-estimated thresholds there is no exact oracle)."""
    if edc.threshold_mode == "fixed":
        return oracle_edc(edc.n_mated, int(round(edc.fnmr0 * edc.n_mated)), float(edc.threshold[0]), edc.fmr)
    x = edc.discard_fraction
    return EDC(x, oracle_fnmr(edc.fnmr0, x), edc.threshold, edc.fmr, "recomputed", edc.n_mated)


def pauc(edc: EDC, discard_limit: float = DEFAULT_DISCARD_LIMIT, stepwise: bool | None = None,
         subtract_oracle: bool = False) -> float:
    """Area under the curve from discard fraction 0 to ``discard_limit``.

    Args:
        edc: the curve.
        discard_limit: upper end of the integral (0 < limit < 1).
        stepwise: integrate the step function (each point's FNMR holds until the next point; the last point
            holds to the limit) or the trapezoid rule (linear interpolation at the limit). Defaults to
            stepwise for ``fixed`` curves and trapezoid for ``recomputed`` ones.
        subtract_oracle: return the area minus the oracle's (:func:`oracle_for`), as Schlett et al. suggest:
            0 is the best possible.
    """
    if subtract_oracle:
        return pauc(edc, discard_limit, stepwise) - pauc(oracle_for(edc), discard_limit, stepwise)
    if not 0 < discard_limit < 1:
        raise ValueError(f"discard limit must be between 0 and 1, got {discard_limit}")
    x, y = edc.discard_fraction, edc.fnmr
    if stepwise if stepwise is not None else edc.threshold_mode == "fixed":
        right = np.minimum(np.append(x[1:], np.inf), discard_limit)
        widths = np.clip(right - x, 0, None)
        return float(np.sum(y * widths))
    if x[-1] < discard_limit - 1e-12:
        raise ValueError(f"the curve stops at discard fraction {x[-1]:.3f}, before the limit {discard_limit}")
    inside = x < discard_limit
    xs = np.append(x[inside], discard_limit)
    ys = np.append(y[inside], np.interp(discard_limit, x, y))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def normalised_pauc(edc: EDC, discard_limit: float = DEFAULT_DISCARD_LIMIT) -> float:
    """pAUC over the area under the no-discard line, ``FNMR(0) * discard_limit`` (NaN if FNMR(0) = 0)."""
    denominator = edc.fnmr0 * discard_limit
    return pauc(edc, discard_limit) / denominator if denominator > 0 else math.nan


# ------------------------------------------------------------------------------- recomputed thresholds
def discard_counts(grid: Sequence[float], n_comparisons: int) -> np.ndarray:
    """Comparisons discarded at each grid level, ``floor(d * P)``; levels discarding all are dropped."""
    counts = np.floor(np.round(np.asarray(grid, dtype=np.float64) * n_comparisons, 6)).astype(np.int64)
    if counts.size == 0 or counts[0] != 0 or np.any(np.diff(counts) < 0):
        raise ValueError("the discard grid must start at 0 and increase")
    return counts[counts < n_comparisons]


def _levels(position: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Discard level of each comparison: the last level at which it is still kept (position >= cut)."""
    return (np.searchsorted(cuts, position, side="right") - 1).astype(np.int16)


class NonMatedTail:
    """The highest non-mated similarities of every discard level, kept in bounded memory.

    A comparison of level ``l`` takes part in levels ``0..l`` (levels are nested). Setting the threshold at
    level ``k`` needs only the ``needed[k]`` highest similarities among comparisons of level ``>= k``. Scores
    arrive in chunks; every so often the buffer is pruned: ``cut[k]`` is the ``needed[k]``-th highest score
    buffered for level ``k`` (scores seen later can only raise it), and a comparison of level ``l`` is dropped
    when its score is below ``min(cut[0..l])``, i.e. when it can no longer be among the needed scores of
    any level it belongs to. What remains answers every level's threshold exactly.

    Args:
        needed: per level, how many of the highest scores the threshold needs (``k + 1`` at the largest FMR).
        prune_at: prune once more than this many scores (or twice the last pruned size) are buffered.
    """

    def __init__(self, needed: np.ndarray, prune_at: int = _CHUNK_ELEMENTS):
        self.needed = np.asarray(needed, dtype=np.int64)
        self._scores: list[np.ndarray] = []
        self._levels: list[np.ndarray] = []
        self._size = 0
        self._kept = 0
        self._prune_at = prune_at
        self._floor = np.full(len(self.needed), -np.inf)

    def floor(self) -> np.ndarray:
        """Per comparison level, the lowest score still worth keeping (non-increasing in the level)."""
        return self._floor

    def add(self, scores: np.ndarray, levels: np.ndarray) -> None:
        """Offer non-mated similarities with their discard levels."""
        keep = scores >= self._floor[levels]
        if not keep.all():
            scores, levels = scores[keep], levels[keep]
        self._scores.append(scores)
        self._levels.append(levels)
        self._size += scores.size
        if self._size > max(self._prune_at, 2 * self._kept):
            self.prune()

    def prune(self) -> None:
        """Drop every buffered score that cannot be among the needed highest scores of its levels."""
        scores, levels = self.result()
        cut = np.full(len(self.needed), -np.inf)
        for level, needed in enumerate(self.needed):
            sub = scores[levels >= level] if level else scores
            if needed == 0:
                cut[level] = np.inf  # no non-mated comparison at this level: it constrains nothing
            elif sub.size >= needed:
                cut[level] = np.partition(sub, sub.size - needed)[sub.size - needed]
        self._floor = np.minimum.accumulate(cut)
        keep = scores >= self._floor[levels]
        self._scores, self._levels = [scores[keep]], [levels[keep]]
        self._size = self._kept = int(np.count_nonzero(keep))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The buffered scores (float32) and their levels."""
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0, np.float32)
        levels = np.concatenate(self._levels) if self._levels else np.zeros(0, np.int16)
        self._scores, self._levels = [scores], [levels]
        return scores, levels


def _recomputed_curves(mated_scores: np.ndarray, mated_level: np.ndarray, tail: tuple[np.ndarray, np.ndarray],
                       cuts: np.ndarray, n_comparisons: int, grid: np.ndarray,
                       fmrs: Sequence[float]) -> list[EDC]:
    """One recomputed-threshold curve per FMR from the mated comparisons and the non-mated tail by level."""
    tail_scores, tail_level = tail
    n_mated = np.cumsum(np.bincount(mated_level, minlength=len(cuts))[::-1])[::-1]
    n_nonmated = (n_comparisons - cuts) - n_mated
    n_levels = int(np.argmin(np.append((n_mated > 0) & (n_nonmated > 0), False)))  # nested: a prefix is valid
    if n_levels == 0:
        raise ValueError("cannot draw an EDC: need at least one mated and one non-mated comparison")
    thresholds = np.empty((len(fmrs), n_levels))
    fnmr = np.empty((len(fmrs), n_levels))
    for level in range(n_levels):
        sub = tail_scores[tail_level >= level] if level else tail_scores
        wanted = [false_matches_allowed(int(n_nonmated[level]), fmr) + 1 for fmr in fmrs]
        if sub.size < max(wanted):
            raise RuntimeError(f"non-mated tail too short at level {level}: {sub.size} < {max(wanted)}")
        kth = sorted({sub.size - w for w in wanted})
        ordered = np.partition(sub, kth)
        mated = mated_scores[mated_level >= level] if level else mated_scores
        for i, w in enumerate(wanted):
            thresholds[i, level] = ordered[sub.size - w]
            fnmr[i, level] = np.count_nonzero(mated <= thresholds[i, level]) / mated.size
    return [EDC(grid[:n_levels].astype(np.float64), fnmr[i], thresholds[i], fmr, "recomputed",
                int(mated_scores.size)) for i, fmr in enumerate(fmrs)]


def _recomputed_from_order(scores: np.ndarray, mated: np.ndarray, order: np.ndarray, fmrs: Sequence[float],
                           grid: Sequence[float]) -> list[EDC]:
    """Dense recomputed curves: comparisons discarded in ``order`` (first = lowest quality)."""
    grid = np.asarray(grid, dtype=np.float64)
    cuts = discard_counts(grid, scores.size)
    position = np.empty(scores.size, dtype=np.int64)
    position[order] = np.arange(scores.size)
    level = _levels(position, cuts)
    return _recomputed_curves(scores[mated], level[mated], (scores[~mated], level[~mated]), cuts, scores.size,
                              grid, fmrs)


def recomputed_edc(scores: np.ndarray, mated: np.ndarray, fmr: float = DEFAULT_FMR, *,
                   pair_quality: np.ndarray | None = None, order: np.ndarray | None = None,
                   grid: Sequence[float] = RECOMPUTED_GRID) -> EDC:
    """ERC with the threshold re-estimated after each discard level (CR-FIQA / MagFace convention).

    Args:
        scores: similarity of every comparison.
        mated: True for mated comparisons.
        fmr: target FMR of the threshold at every level.
        pair_quality: pair quality of every comparison; discard order is ascending, ties by list position.
        order: explicit discard order (indices, first discarded first), e.g. from :func:`discard_order`;
            overrides ``pair_quality``.
        grid: discard fractions, starting at 0.
    """
    scores, mated = np.asarray(scores), np.asarray(mated, dtype=bool)
    if order is None:
        if pair_quality is None:
            raise ValueError("recomputed_edc needs pair_quality or order")
        order = np.argsort(pair_quality, kind="stable")
    return _recomputed_from_order(scores, mated, np.asarray(order), [fmr], grid)[0]


# ----------------------------------------------------------------------------------------- protocols
Curves = dict[tuple[str, float, str], EDC]  # (method, fmr, threshold_mode) -> curve


def _pair_similarities(normalised: np.ndarray, first: np.ndarray, second: np.ndarray,
                       chunk: int = 1 << 16) -> np.ndarray:
    """Cosine similarity of listed pairs of rows of an L2-normalised matrix, a chunk of pairs at a time."""
    out = np.empty(len(first), dtype=np.float32)
    for start in range(0, len(first), chunk):
        a, b = first[start:start + chunk], second[start:start + chunk]
        out[start:start + chunk] = np.einsum("ij,ij->i", normalised[a], normalised[b])
    return out


def _check_qualities(qualities: Mapping[str, np.ndarray], n_images: int) -> None:
    for method, quality in qualities.items():
        if np.shape(quality) != (n_images,):
            raise ValueError(f"{method}: {np.shape(quality)} qualities for {n_images} images")
        if not np.all(np.isfinite(quality)):
            raise ValueError(f"{method}: qualities must be finite (drop images without a score first)")


def evaluate_pairs(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray, mated: np.ndarray,
                   qualities: Mapping[str, np.ndarray], fmrs: Sequence[float] = (DEFAULT_FMR,),
                   modes: Sequence[str] = THRESHOLD_MODES, grid: Sequence[float] = RECOMPUTED_GRID) -> Curves:
    """EDCs of every quality method over a list of comparisons.

    Args:
        embeddings: (N, D) face-recognition embeddings (normalised here).
        first, second: row indices of the two images of each comparison.
        mated: True where both images show the same person.
        qualities: method name -> (N,) image quality per embedding row.
        fmrs: target FMRs.
        modes: threshold conventions, a subset of ``("fixed", "recomputed")``.
        grid: discard fractions of the recomputed convention.
    """
    _check_qualities(qualities, len(embeddings))
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    mated = np.asarray(mated, dtype=bool)
    scores = _pair_similarities(l2_normalise(embeddings), first, second)
    curves: Curves = {}
    if "fixed" in modes:
        nonmated = scores[~mated]
        thresholds = {fmr: threshold_at_fmr(nonmated, fmr) for fmr in fmrs}
        for method, quality in qualities.items():
            quality_of_pair = pair_quality(quality[first[mated]], quality[second[mated]])
            for fmr in fmrs:
                curves[method, fmr, "fixed"] = fnm_edc(scores[mated], quality_of_pair, thresholds[fmr], fmr)
    if "recomputed" in modes:
        for method, quality in qualities.items():
            ranks = image_ranks(quality)
            order = discard_order(ranks[first], ranks[second])
            for edc in _recomputed_from_order(scores, mated, order, fmrs, grid):
                curves[method, edc.fmr, "recomputed"] = edc
    return curves


# ------------------------------------------------------------------------------------------ all-vs-all
def _row_offsets(n_images: int) -> np.ndarray:
    """Comparisons in rows before row ``r`` of the upper triangle: ``r (n - 1) - r (r - 1) / 2``."""
    r = np.arange(n_images, dtype=np.int64)
    return r * (n_images - 1) - r * (r - 1) // 2


def mated_pairs(identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of images of one identity, as index arrays ``(first, second)`` with first < second."""
    identity = np.asarray(identity)
    order = np.argsort(identity, kind="stable")
    boundary = np.flatnonzero(np.r_[True, identity[order][1:] != identity[order][:-1], True])
    starts, sizes = boundary[:-1], np.diff(boundary)
    firsts, seconds = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for size in np.unique(sizes[sizes > 1]):  # all identities with `size` images at once
        upper_i, upper_j = np.triu_indices(size, 1)
        members = order[starts[sizes == size][:, None] + np.arange(size)]
        firsts.append(members[:, upper_i].ravel())
        seconds.append(members[:, upper_j].ravel())
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    return np.minimum(first, second), np.maximum(first, second)


def iter_all_vs_all_similarities(embeddings: np.ndarray, chunk_elements: int = _CHUNK_ELEMENTS
                                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(first, second, similarity)`` of every pair ``first < second``, a block of Gram rows at a time.

    Each block holds about ``chunk_elements`` similarities, so memory stays bounded whatever the image count.
    """
    normalised = l2_normalise(embeddings)
    for r0, _, block in _gram_row_blocks(normalised, chunk_elements):
        rows, cols = np.nonzero(np.isfinite(block))
        yield rows + r0, cols + r0, block[rows, cols]


def _gram_row_blocks(normalised: np.ndarray, chunk_elements: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Blocks ``S[r0:r1, r0:]`` of the similarity matrix with ``j <= i`` set to NaN (upper triangle only)."""
    n = len(normalised)
    r0 = 0
    while r0 < n - 1:
        r1 = min(n - 1, r0 + max(1, chunk_elements // (n - r0)))
        block = normalised[r0:r1] @ normalised[r0:].T
        block[:, : r1 - r0][np.tri(r1 - r0, dtype=bool)] = np.nan
        yield r0, r1, block
        r0 = r1


def _stream_nonmated(normalised: np.ndarray, mated_low: np.ndarray, mated_high: np.ndarray, cuts: np.ndarray,
                     tail: NonMatedTail, chunk_elements: int) -> None:
    """Feed every non-mated similarity of the upper triangle, with its discard level, to ``tail``.

    Rows are images in discard order, so the comparison (r, c), r < c, sits at position
    ``offset[r] + c - r - 1`` of the discard order and a row's level can only grow along the row: each row
    is filtered at the floor of its last (highest-level, lowest-floor) comparison, and the few survivors get
    their exact level.
    """
    n = len(normalised)
    offsets = _row_offsets(n)
    rows = np.arange(n - 1)
    row_floor_level = _levels(offsets[:-1] + (n - 2 - rows), cuts)
    by_row = np.argsort(mated_low, kind="stable")
    mated_low, mated_high = mated_low[by_row], mated_high[by_row]
    for r0, r1, block in _gram_row_blocks(normalised, chunk_elements):
        lo, hi = np.searchsorted(mated_low, [r0, r1])
        block[mated_low[lo:hi] - r0, mated_high[lo:hi] - r0] = np.nan
        floor = tail.floor()[row_floor_level[r0:r1]]
        i, j = np.nonzero(block >= floor[:, None].astype(np.float32))
        scores = block[i, j]
        i += r0
        j += r0
        tail.add(scores, _levels(offsets[i] + j - i - 1, cuts))


def _all_vs_all_recomputed(normalised: np.ndarray, quality: np.ndarray, first: np.ndarray, second: np.ndarray,
                           mated_scores: np.ndarray, fmrs: Sequence[float], grid: np.ndarray,
                           chunk_elements: int) -> list[EDC]:
    """Recomputed-threshold curves of one quality method over all pairs (``grid=[0]``: fixed threshold)."""
    n = len(normalised)
    n_comparisons = n * (n - 1) // 2
    ranks = image_ranks(quality)
    low, high = np.minimum(ranks[first], ranks[second]), np.maximum(ranks[first], ranks[second])
    cuts = discard_counts(grid, n_comparisons)
    mated_level = _levels(_row_offsets(n)[low] + high - low - 1, cuts)
    n_nonmated = (n_comparisons - cuts) - np.cumsum(np.bincount(mated_level, minlength=len(cuts))[::-1])[::-1]
    needed = np.minimum(false_matches_allowed(n_nonmated, max(fmrs)) + 1, n_nonmated)
    tail = NonMatedTail(needed, prune_at=max(chunk_elements, 1))
    by_rank = np.argsort(ranks)
    _stream_nonmated(normalised[by_rank], low, high, cuts, tail, chunk_elements)
    return _recomputed_curves(mated_scores, mated_level, tail.result(), cuts, n_comparisons, grid, fmrs)


def evaluate_all_vs_all(embeddings: np.ndarray, identity: np.ndarray, qualities: Mapping[str, np.ndarray],
                        fmrs: Sequence[float] = (DEFAULT_FMR,), modes: Sequence[str] = THRESHOLD_MODES,
                        grid: Sequence[float] = RECOMPUTED_GRID,
                        chunk_elements: int = _CHUNK_ELEMENTS) -> Curves:
    """EDCs of every quality method over all pairs of images (mated when identities match).

    Memory is bounded: ``chunk_elements`` similarities per Gram block, all mated comparisons, and the
    non-mated tail (:class:`NonMatedTail`). Results equal :func:`evaluate_pairs` on the materialised pairs.

    Args:
        embeddings: (N, D) embeddings, one per image.
        identity: (N,) identity label of each image (any comparable type).
        qualities: method name -> (N,) image qualities.
        fmrs, modes, grid: as in :func:`evaluate_pairs`.
        chunk_elements: similarities computed per block.
    """
    _check_qualities(qualities, len(embeddings))
    normalised = l2_normalise(embeddings)
    first, second = mated_pairs(np.asarray(identity))
    mated_scores = _pair_similarities(normalised, first, second)
    grid = np.asarray(grid, dtype=np.float64)
    curves: Curves = {}
    fixed_thresholds: dict[float, float] = {}
    if "recomputed" in modes:
        for method, quality in qualities.items():
            for edc in _all_vs_all_recomputed(normalised, quality, first, second, mated_scores, fmrs, grid,
                                              chunk_elements):
                curves[method, edc.fmr, "recomputed"] = edc
                fixed_thresholds[edc.fmr] = float(edc.threshold[0])  # level 0 = all non-mated comparisons
    if "fixed" in modes:
        if not fixed_thresholds:
            any_quality = np.zeros(len(normalised))  # with one level, the order does not matter
            for edc in _all_vs_all_recomputed(normalised, any_quality, first, second, mated_scores, fmrs,
                                              np.zeros(1), chunk_elements):
                fixed_thresholds[edc.fmr] = float(edc.threshold[0])
        for method, quality in qualities.items():
            quality_of_pair = pair_quality(quality[first], quality[second])
            for fmr in fmrs:
                threshold = fixed_thresholds[fmr]
                curves[method, fmr, "fixed"] = fnm_edc(mated_scores, quality_of_pair, threshold, fmr)
    return curves


# ---------------------------------------------------------------------------- quality regression metrics
def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as Spearman's rho needs)."""
    _, inverse, counts = np.unique(np.asarray(values), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's of the tie-averaged ranks); NaN when either is constant."""
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"spearman: {x.size} values against {y.size}")
    return _pearson(average_ranks(x), average_ranks(y))


def _smooth_l1(predicted: np.ndarray, target: np.ndarray, beta: float) -> float:
    error = np.abs(predicted - target)
    return float(np.where(error < beta, 0.5 * error**2 / beta, error - 0.5 * beta).mean())


def quality_metrics(aligned: np.ndarray, misaligned: np.ndarray, labels: np.ndarray, beta: float) -> dict[str, float]:
    """Validation figures: quality loss, Spearman and Pearson vs the labels on aligned and misaligned faces,
    and the alignment sensitivity ``mean |q̂(aligned) - q̂(misaligned)|``."""
    out: dict[str, float] = {}
    for view, predicted in (("aligned", aligned), ("misaligned", misaligned)):
        out[f"quality_loss_{view}"] = _smooth_l1(predicted, labels, beta)
        out[f"spearman_{view}"] = spearman(predicted, labels)
        out[f"pearson_{view}"] = _pearson(predicted, labels)
    out["alignment_sensitivity"] = float(np.abs(aligned - misaligned).mean())
    return out
