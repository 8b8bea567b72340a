"""SDD-FIQA pseudo-labels: the Wasserstein distance between a face's intra-class and inter-class similarities.

Ou, Chen, Zhang, Huang, Li, Li, Li, Cao and Wang, "SDD-FIQA: Unsupervised Face Image Quality Assessment with
Similarity Distribution Distance", CVPR 2021; the sampling and normalisation of the authors' code (Tencent/TFace
``quality/generate_pseudo_labels/gen_pseudo_labels.py``). With ``cos`` the cosine similarity of FR embeddings, for
every image ``x`` of identity ``y`` in each of ``R`` rounds:

    S_P(x) = { cos(x, x') : m_P images x' of identity y, x' != x }       (m_P = min(m, images of y - 1))
    S_N(x) = { cos(x, x'') : m images x'' of other identities }
    d_r(x) = W_1(S_P(x), S_N(x))                                          (1-D Wasserstein distance)
    q_r(x) = 100 (d_r(x) - min d_r) / (max d_r - min d_r)                 (over the whole set)
    q(x)   = mean over the R rounds of q_r(x)

Defaults as there: ``R = 12`` rounds and ``m = 24`` pairs. The draws follow the authors' code call for call with
a seeded :class:`random.Random` (their code draws from Python's global ``random`` without a seed): per round, the
positives of the images of each identity in sorted identity order (a shuffle of the identity's other images, the
first ``m_P`` taken), then one shuffle of all images and, for each image in the same order, ``m`` distinct images
of other identities drawn by ``randint`` with rejection. Seeded the same, this reproduces the authors' labels (the
reference comparison in tests/test_reference_fiqa.py); the labels then depend on the whole set (they are
normalised over it) and nothing else: not the batch size, the worker count or a resume.

Identities come from the image folders (``IDENTITY/image.jpg``, as the authors' data list) or a list. An identity
with a single image has no intra-class similarity (the authors' code stops on one): its image is reported as an
error, and it still serves as a negative for the others. ``quality`` is ``q`` (0-100, higher is better); the
``wasserstein`` column is the mean over the rounds of the raw ``d_r``.

``W_1`` is computed from the two empirical quantile functions on the merged grid of their steps (equal to
scipy's ``wasserstein_distance``, vectorised over images with the same sample sizes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from math import lcm

import numpy as np

from aikd.labelers.base import IdentitySetLabeler, SetLabels, unit_rows

__all__ = ["SddFiqa", "SddOptions", "SddResult", "sdd_pseudo_labels", "wasserstein_1d"]


@dataclass(frozen=True)
class SddOptions:
    """Settings of the SDD-FIQA pseudo-labels (the authors' defaults).

    Attributes:
        rounds: sampling rounds averaged (12).
        pairs: positive (at most) and negative pairs per image and round (24).
        seed: seed of the sampling.
    """

    rounds: int = 12
    pairs: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.pairs < 1:
            raise ValueError(f"pairs must be at least 1, got {self.pairs}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass
class SddResult:
    """Per-image pseudo-labels (0-100; NaN where undefined), mean raw Wasserstein distances, and the errors."""

    quality: np.ndarray
    wasserstein: np.ndarray
    errors: dict[int, str]


def wasserstein_1d(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise 1-D Wasserstein distance between the empirical distributions of ``first`` (N, a) and ``second``
    (N, b): the integral over t in (0, 1] of |F^-1(t) - G^-1(t)|, on the merged grid of the quantile steps."""
    a, b = first.shape[1], second.shape[1]
    common = lcm(a, b)
    steps = np.union1d(np.arange(1, a + 1) * (common // a), np.arange(1, b + 1) * (common // b))  # t = k / common
    widths = np.diff(steps, prepend=0) / common
    index_a = -(-steps * a // common) - 1  # ceil(t a) - 1: the order statistic the quantile function takes at t
    index_b = -(-steps * b // common) - 1
    sorted_a, sorted_b = np.sort(first, axis=1), np.sort(second, axis=1)
    return np.abs(sorted_a[:, index_a] - sorted_b[:, index_b]) @ widths


def _draw_round(rng: random.Random, members: dict[str, list[int]], identities: Sequence[str], pairs: int
                ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """One round's positive and negative partners of every image, drawn as the authors' code draws them."""
    positives: dict[int, list[int]] = {}
    for identity in sorted(members):
        group = members[identity]
        if len(group) < 2:
            continue
        for image in group:
            others = [other for other in group if other != image]
            rng.shuffle(others)
            positives[image] = others[:pairs]
    order = list(range(len(identities)))
    rng.shuffle(order)
    negatives: dict[int, list[int]] = {}
    last = len(order) - 1
    for identity in sorted(members):
        if len(members[identity]) < 2:
            continue
        for image in members[identity]:
            chosen: list[int] = []
            while len(chosen) < pairs:
                candidate = order[rng.randint(0, last)]
                if candidate in chosen or identities[candidate] == identity:
                    continue
                chosen.append(candidate)
            negatives[image] = chosen
    return positives, negatives


def _round_distances(unit: np.ndarray, images: list[int], positives: dict[int, list[int]],
                     negatives: dict[int, list[int]]) -> np.ndarray:
    """W_1 between each image's positive and negative similarities, grouped by the number of positives."""
    distances = np.empty(len(images))
    sizes = np.array([len(positives[i]) for i in images])
    for size in np.unique(sizes):
        rows = np.flatnonzero(sizes == size)
        anchors = np.array([images[r] for r in rows])
        pos = np.array([positives[images[r]] for r in rows])
        neg = np.array([negatives[images[r]] for r in rows])
        pos_sim = np.einsum("nd,nkd->nk", unit[anchors], unit[pos])
        neg_sim = np.einsum("nd,nkd->nk", unit[anchors], unit[neg])
        distances[rows] = wasserstein_1d(pos_sim, neg_sim)
    return distances


def _min_max_100(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min()) * 100


def sdd_pseudo_labels(embeddings: np.ndarray, identities: Sequence[str], options: SddOptions | None = None
                      ) -> SddResult:
    """SDD-FIQA pseudo-labels of a set of embeddings with identities (see the module docstring).

    Raises:
        ValueError: an identity has fewer images of other identities than ``pairs`` negatives to draw.
    """
    options = options or SddOptions()
    unit = unit_rows(np.asarray(embeddings, dtype=np.float64))
    identities = [str(identity) for identity in identities]
    members: dict[str, list[int]] = {}
    for index, identity in enumerate(identities):
        members.setdefault(identity, []).append(index)
    errors = {group[0]: f"identity {name!r} has no other image: no intra-class similarity"
              for name, group in members.items() if len(group) == 1}
    images = [i for name in sorted(members) if len(members[name]) > 1 for i in members[name]]
    quality, raw = np.full(len(identities), np.nan), np.full(len(identities), np.nan)
    if not images:
        return SddResult(quality, raw, errors)
    fewest = len(identities) - max(len(group) for group in members.values())
    if fewest < options.pairs:
        raise ValueError(f"SDD-FIQA draws {options.pairs} negatives per image, but an identity has only {fewest} "
                         "images of other identities: give more identities, or fewer pairs (--option pairs=N)")
    rng = random.Random(options.seed)
    total, total_raw = np.zeros(len(images)), np.zeros(len(images))
    for _ in range(options.rounds):
        distances = _round_distances(unit, images, *_draw_round(rng, members, identities, options.pairs))
        total += _min_max_100(_min_max_100(distances))  # normalised twice, as the authors' norm_labels does
        total_raw += distances
    quality[images], raw[images] = total / options.rounds, total_raw / options.rounds
    return SddResult(quality, raw, errors)


class SddFiqa(IdentitySetLabeler):
    """SDD-FIQA pseudo-labels: embeddings in the first pass, the similarity distributions over the whole set
    (:class:`~aikd.labelers.base.IdentitySetLabeler`; options: rounds, pairs, seed). Images alone in their identity
    are errors."""

    name = "sddfiqa"
    title = "SDD-FIQA"
    Options = SddOptions
    columns = ("identity", "wasserstein")

    def label_identities(self, embeddings: np.ndarray, identities: Sequence[str]) -> SetLabels:
        result = sdd_pseudo_labels(embeddings, identities, self.options)
        return SetLabels(quality=result.quality, extras={"wasserstein": result.wasserstein}, errors=result.errors)
