"""aikd: alignment-invariant face image quality assessment (AI-KD, Babnik et al., IWBF 2024).

Heavy modules (torch) load on first use, so ``import aikd.evaluation.metrics`` stays numpy-only.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "QualityModel": "aikd.models",
    "build_model": "aikd.models",
    "load_quality_model": "aikd.models",
    "load_backbone": "aikd.models",
    "load_fr_model": "aikd.models",
    "score_images": "aikd.inference.scorer",
    "load_calibration": "aikd.calibration",
    "align_face": "aikd.align",
    "ARCFACE_TEMPLATE": "aikd.align",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aikd' has no attribute {name!r}")
