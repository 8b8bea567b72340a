"""aikd: alignment-invariant face image quality assessment (AI-KD, Babnik et al., IWBF 2024).

    from aikd import load_quality_model, score_images
    qualities = score_images(load_quality_model("best.pt"), ["a.jpg", "b.png"])

Heavy modules (torch) load on first use of a name that needs them, so ``import aikd.evaluation.metrics`` stays
numpy-only.
"""

from __future__ import annotations

from typing import Any

from aikd.version import __version__

__all__ = [
    "ARCFACE_TEMPLATE",
    "QualityModel",
    "Scorer",
    "__version__",
    "align_face",
    "build_model",
    "load_backbone",
    "load_calibration",
    "load_fr_model",
    "load_quality_model",
    "score_images",
]


def __getattr__(name: str) -> Any:
    # Plain imports inside the function: the import graph stays visible to readers and tests, and torch loads
    # only when a name that needs it is first used.
    if name in ("QualityModel", "build_model", "load_quality_model", "load_backbone", "load_fr_model"):
        from aikd import models

        return getattr(models, name)
    if name in ("score_images", "Scorer"):
        from aikd.inference import scorer

        return getattr(scorer, name)
    if name == "load_calibration":
        from aikd.evaluation.calibration import load_calibration

        return load_calibration
    if name in ("align_face", "ARCFACE_TEMPLATE"):
        from aikd import align

        return getattr(align, name)
    raise AttributeError(f"module 'aikd' has no attribute {name!r}")
