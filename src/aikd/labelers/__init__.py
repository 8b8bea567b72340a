"""Training-free face image quality labels for AI-KD to distil, one technique per module.

AI-KD (Babnik et al., IWBF 2024) can distil *any* FIQA technique into an alignment-invariant regressor;
these labellers make the teacher's labels from a face-recognition (FR) model alone:

    serfiq     SER-FIQ, stochastic embedding robustness (Terhörst et al., CVPR 2020)      serfiq.py
    magnitude  embedding magnitude, as MagFace reads quality (Meng et al., CVPR 2021)       magnitude.py
    certainty  CR-FIQA certainty ratio from identity centres (Boutros et al., CVPR 2023)    certainty.py
    import     labels computed elsewhere (CSV or the official pickle), optionally normalised imported.py

Every labeller implements :class:`Labeler`. A labeller works in up to two passes:

1. :meth:`Labeler.label_batch` maps a batch of preprocessed faces (float (N, 3, 112, 112), the model's
   input) to :class:`BatchLabels`: qualities, or embeddings kept for the second pass;
2. :meth:`Labeler.label_set` sees every image of the run at once (CR-FIQA needs all identities' centres;
   imported labels need the whole set to normalise) and returns :class:`SetLabels`.

``aikd label`` runs the passes through the resumable file pipeline (:mod:`aikd.pipeline`).
"""

from __future__ import annotations

from aikd.labelers.base import BatchLabels, Labeler, SetLabels

__all__ = ["LABELERS", "BatchLabels", "Labeler", "SetLabels", "labeler_class"]


# The --method names; each labeller's module (and what it needs) loads on first use, by a plain import below.
LABELERS: tuple[str, ...] = ("serfiq", "magnitude", "certainty", "import")


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
    if name == "import":
        from aikd.labelers.imported import ImportedLabels

        return ImportedLabels
    raise ValueError(f"unknown labelling method {name!r}; choose one of: {', '.join(LABELERS)}")
