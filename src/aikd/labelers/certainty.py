"""CR-FIQA certainty ratio from embeddings and identities: how much closer a face sits to its own identity.

Boutros, Fang, Klemt, Fu and Damer, "CR-FIQA: Face Image Quality Assessment by Learning Sample Relative
Classifiability", CVPR 2023. For a sample ``x_i`` of identity ``y_i``, with ``cos`` the cosine similarity,

    CCS_i   = cos(x_i, c_{y_i})                      class centre similarity
    NNCCS_i = max_{k != y_i} cos(x_i, c_k)           nearest negative class centre similarity
    CR_i    = CCS_i / (NNCCS_i + 1 + eps),  eps = 1e-9

as in the paper: NNCCS lies in [-1, 1], so adding ``1 + eps`` keeps the denominator positive. (The
released training script regresses on ``CCS / NNCCS`` directly; the paper's form is the one used here.)

CR-FIQA reads the centres ``c_k`` from the weights of a margin-softmax classifier trained on the same
identities. Without such a classifier the centres here are the mean of the L2-normalised embeddings of
each identity in the labelled set, which makes the label meaningful on identity-organised training sets
such as VGGFace2 or CASIA-WebFace (many images per identity).

Own centre: by default a sample is *left out* of its own centre (``c_{y_i}`` is the mean of the other
images of identity ``y_i``), so a few images per identity do not inflate CCS (with itself included, a
singleton would get CCS = 1). Identities with a single image then have no centre and their image is
reported as an error. ``include_self=True`` uses the plain mean of all images of the identity. Centres of
the *other* identities always include all their images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aikd.labelers.base import IdentitySetLabeler, SetLabels, unit_rows
from aikd.names import identity_from_folder

__all__ = ["CertaintyOptions", "CertaintyRatio", "certainty_ratio", "identity_from_folder"]

ROWS_PER_CHUNK = 4096  # samples compared with every centre at once: (4096, identities) float64


@dataclass(frozen=True)
class CertaintyOptions:
    """Settings of the certainty ratio.

    Attributes:
        include_self: count a sample in its own identity centre (default: leave it out).
        epsilon: ``eps`` of the denominator ``NNCCS + 1 + eps`` (1e-9 in the paper).
    """

    include_self: bool = False
    epsilon: float = 1e-9


@dataclass
class CertaintyResult:
    """Per-sample CR, CCS and NNCCS (float64, NaN where undefined) and why each undefined one is."""

    ratio: np.ndarray
    ccs: np.ndarray
    nnccs: np.ndarray
    errors: dict[int, str]


def certainty_ratio(embeddings: np.ndarray, identities: Sequence[str],
                    options: CertaintyOptions | None = None) -> CertaintyResult:
    """CR-FIQA certainty ratio of every sample against the identity centres of the set.

    Args:
        embeddings: (N, D) embeddings (normalised here).
        identities: identity of each sample.
        options: own-centre policy and epsilon.
    """
    options = options or CertaintyOptions()
    unit = unit_rows(np.asarray(embeddings, dtype=np.float64))
    names, label = np.unique(np.asarray(identities, dtype=str), return_inverse=True)
    sums = np.zeros((len(names), unit.shape[1]))
    np.add.at(sums, label, unit)
    counts = np.bincount(label, minlength=len(names))
    own = sums[label] if options.include_self else sums[label] - unit
    own_count = counts[label] if options.include_self else counts[label] - 1
    own_norm = np.linalg.norm(own, axis=1)
    ccs = np.where(own_norm > 0, (unit * own).sum(axis=1) / np.where(own_norm > 0, own_norm, 1.0), np.nan)
    nnccs = np.full(len(unit), np.nan)
    if len(names) > 1:
        centres = unit_rows(sums)
        for start in range(0, len(unit), ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            cosine = unit[rows] @ centres.T
            cosine[np.arange(len(cosine)), label[rows]] = -np.inf  # not the own identity
            nnccs[rows] = cosine.max(axis=1)
    errors: dict[int, str] = {}
    for index in np.flatnonzero(np.isnan(ccs) | np.isnan(nnccs)):
        identity = names[label[index]]
        if len(names) < 2:
            errors[int(index)] = f"only one identity ({identity!r}) in the set: no other centre to compare with"
        elif own_count[index] == 0:
            errors[int(index)] = (f"identity {identity!r} has no other image, so no centre (its own image is "
                                  "left out; --include-self counts it)")
        else:
            errors[int(index)] = f"identity {identity!r}: its centre is the zero vector"
    ratio = ccs / (nnccs + 1.0 + options.epsilon)
    return CertaintyResult(ratio, ccs, nnccs, errors)


class CertaintyRatio(IdentitySetLabeler):
    """CR-FIQA certainty ratio: embeddings in the first pass, centres and ratios over the whole set
    (:class:`~aikd.labelers.base.IdentitySetLabeler`; options: own-centre policy and epsilon)."""

    name = "certainty"
    title = "the certainty ratio"
    Options = CertaintyOptions
    columns = ("identity", "ccs", "nnccs")

    def label_identities(self, embeddings: np.ndarray, identities: Sequence[str]) -> SetLabels:
        result = certainty_ratio(embeddings, identities, self.options)
        return SetLabels(quality=result.ratio, extras={"ccs": result.ccs, "nnccs": result.nnccs},
                         errors=result.errors)
