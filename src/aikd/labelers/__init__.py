"""Training-free face image quality labels for AI-KD to distil, one technique per module.

AI-KD (Babnik et al., IWBF 2024) can distil *any* FIQA technique into an alignment-invariant regressor;
these labellers make the teacher's labels from a face-recognition (FR) model alone:

    serfiq      SER-FIQ, stochastic embedding robustness (Terhörst et al., CVPR 2020)      serfiq.py
    magnitude   embedding magnitude, as MagFace reads quality (Meng et al., CVPR 2021)       magnitude.py
    certainty   CR-FIQA certainty ratio from identity centres (Boutros et al., CVPR 2023)    certainty.py
    faceqan     FaceQAN, adversarial-noise robustness + symmetry (Babnik et al., ICPR 2022)  faceqan.py
    grafiqs     GraFIQs, BatchNorm-statistics gradient magnitudes (Kolf et al., CVPRW 2024)  grafiqs.py
    sddfiqa     SDD-FIQA pseudo-labels, similarity distribution distance (Ou et al., 2021)  sddfiqa.py
    checkpoint  a quality model's scores (aikd, CR-FIQA, eDifFIQA, SDD-FIQA files)           quality_model.py
    import      labels computed elsewhere (CSV or the official pickle), optionally normalised imported.py

Every labeller implements :class:`Labeler`. A labeller works in up to two passes:

1. :meth:`Labeler.label_batch` maps a batch of preprocessed faces (float (N, 3, 112, 112), the model's
   input) to :class:`BatchLabels`: qualities, or embeddings kept for the second pass;
2. :meth:`Labeler.label_set` sees every image of the run at once (CR-FIQA needs all identities' centres;
   imported labels need the whole set to normalise) and returns :class:`SetLabels`.

``aikd label`` runs the passes through the resumable file pipeline (:mod:`aikd.pipeline`). Each technique's settings
are a frozen dataclass (``Labeler.Options``); :func:`method_options` builds it from ``KEY=VALUE`` strings
(``aikd label --option iterations=3``), refusing unknown keys (with a did-you-mean) and values of the wrong type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aikd.labelers.base import BatchLabels, Labeler, SetLabels

__all__ = ["LABELERS", "BatchLabels", "Labeler", "SetLabels", "labeler_class", "method_options"]


# The --method names; each labeller's module (and what it needs) loads on first use, by a plain import below.
LABELERS: tuple[str, ...] = ("serfiq", "magnitude", "certainty", "faceqan", "grafiqs", "sddfiqa", "checkpoint",
                             "import")


def labeler_class(name: str) -> type[Labeler]:
    """The :class:`Labeler` registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if name == "serfiq":
        from aikd.labelers.serfiq import SerFiq

        return SerFiq
    if name == "magnitude":
        from aikd.labelers.magnitude import Magnitude

        return Magnitude
    if name == "certainty":
        from aikd.labelers.certainty import CertaintyRatio

        return CertaintyRatio
    if name == "faceqan":
        from aikd.labelers.faceqan import FaceQan

        return FaceQan
    if name == "grafiqs":
        from aikd.labelers.grafiqs import Grafiqs

        return Grafiqs
    if name == "sddfiqa":
        from aikd.labelers.sddfiqa import SddFiqa

        return SddFiqa
    if name == "checkpoint":
        from aikd.labelers.quality_model import QualityModelLabels

        return QualityModelLabels
    if name == "import":
        from aikd.labelers.imported import ImportedLabels

        return ImportedLabels
    raise ValueError(f"unknown labelling method {name!r}; choose one of: {', '.join(LABELERS)}")


def method_options(name: str, overrides: Sequence[str] = (), given: Mapping[str, Any] | None = None,
                   defaults: Mapping[str, Any] | None = None) -> Any:
    """The typed settings of technique ``name`` (its ``Labeler.Options``), or ``None`` for one without settings.

    Args:
        name: the ``--method``.
        overrides: ``KEY=VALUE`` strings (``--option``), values read as YAML scalars.
        given: values of dedicated flags (``--passes``); one that an override sets to another value is an error.
        defaults: values an override may replace (``seed`` from ``--seed``); keys the settings lack are skipped.

    Raises:
        ValueError: an unknown key (with the closest known one), a value of the wrong type or out of range, a key
            set two ways, or overrides for a technique without settings.
    """
    from aikd.config import ConfigError, apply_overrides, from_dict

    options = labeler_class(name).Options
    if options is None:
        if overrides:
            raise ValueError(f"--method {name} takes no --option (got {', '.join(overrides)})")
        return None
    try:
        tree = apply_overrides({}, overrides)
    except ConfigError as err:
        raise ValueError(f"--option: {err}") from None
    given = {key: value for key, value in (given or {}).items() if value is not None}
    clash = [key for key in tree if key in given and tree[key] != given[key]]
    if clash:
        raise ValueError(f"--option {clash[0]}={tree[clash[0]]} contradicts the flag that set it to {given[clash[0]]}")
    known = set(options.__dataclass_fields__)
    data = {**{k: v for k, v in (defaults or {}).items() if k in known}, **given, **tree}
    try:
        return from_dict(options, data, prefix="")
    except ConfigError as err:
        raise ValueError(f"--method {name} --option: {str(err).replace('config key', 'key')}") from None
