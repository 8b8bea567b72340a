"""The answer for each image: its faces (box, landmarks, detector score, quality), the calibrated figures and the
accept/reject decision, as JSON-ready data.

Qualities are written as ``aikd score`` writes them (the shortest decimal of the float32), and the calibration is
applied to that value, so the service and a score file agree digit for digit. With a calibration
(:mod:`aikd.evaluation.calibration`) each face also gets ``expected_fnmr`` and ``quality_100``; with a decision
rule (:class:`DecisionRule`) a ``decision``, ``accept`` or ``reject``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from aikd.io import shortest_float32
from aikd.pipeline.faces import PreparedFace, ScoredFace
from aikd.service.errors import ServiceError

if TYPE_CHECKING:
    from aikd.evaluation.calibration import Calibration

__all__ = ["DecisionRule", "PreparedImage", "image_result", "select_best"]


@dataclass(frozen=True)
class DecisionRule:
    """When an image is rejected: its expected FNMR above ``threshold`` (``--reject-above``), or its quality below
    ``threshold`` (the calibration's recommended reject threshold for a target FNMR).

    Attributes:
        on: ``expected_fnmr`` or ``quality``.
        threshold: the bound.
        source: where the rule comes from, for ``/v1/model``.
    """

    on: str
    threshold: float
    source: str

    @classmethod
    def choose(cls, calibration: Calibration | None, reject_above: float | None) -> DecisionRule | None:
        """``--reject-above`` if given, else the calibration's recommendation if it has a reachable one.

        Raises:
            ValueError: ``--reject-above`` without a calibration.
        """
        if reject_above is not None:
            if calibration is None:
                raise ValueError("--reject-above compares expected FNMR: give --calibration or a calibrated model")
            return cls("expected_fnmr", float(reject_above), "--reject-above")
        recommendation = (calibration.info.get("recommendation") or {}) if calibration is not None else {}
        if recommendation.get("reachable") and isinstance(recommendation.get("quality"), (int, float)):
            return cls("quality", float(recommendation["quality"]),
                       f"the calibration's reject threshold for FNMR <= {recommendation.get('target_fnmr')}")
        return None

    def decide(self, quality: float, expected_fnmr: float | None) -> str:
        if self.on == "expected_fnmr" and expected_fnmr is not None:
            return "reject" if expected_fnmr > self.threshold else "accept"
        return "reject" if quality < self.threshold else "accept"

    def to_dict(self) -> dict[str, Any]:
        rule = "reject when expected_fnmr > threshold" if self.on == "expected_fnmr" else \
            "reject when quality < threshold"
        return {"rule": rule, "threshold": self.threshold, "source": self.source}


@dataclass
class PreparedImage:
    """One image of a request after the worker threads: its faces ready for the model, or its error."""

    index: int
    name: str
    width: int = 0
    height: int = 0
    faces: list[PreparedFace] = field(default_factory=list)
    error: ServiceError | None = None


def _rounded(values: Any, digits: int = 2) -> list[Any] | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    return np.round(array, digits).tolist()


def _png_data_url(crop: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(crop[:, :, ::-1]))
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii") if ok else ""


def _face(face: ScoredFace, calibration: Calibration | None, decision: DecisionRule | None,
          crops: bool) -> dict[str, Any]:
    crop = face.crop
    record: dict[str, Any] = {"box": _rounded(crop.box), "landmarks": _rounded(crop.landmarks),
                              "detector_score": None if crop.detector_score is None else
                              round(float(crop.detector_score), 4)}
    quality = face.quality
    if quality is None or not math.isfinite(quality) or not np.isfinite(face.embedding).all():
        record.update(quality=None, error={"code": "non_finite", "message": "the model gave a non-finite output"})
    else:
        quality = shortest_float32(quality)
        record["quality"] = quality
        expected = None
        if calibration is not None:
            applied = calibration.apply(np.array([quality]))
            expected = shortest_float32(applied["expected_fnmr"][0])
            record.update(expected_fnmr=expected, quality_100=int(applied["quality_100"][0]))
        if decision is not None:
            record["decision"] = decision.decide(quality, expected)
    if crops:
        record["crop"] = _png_data_url(crop.crop)
    return record


def image_result(image: PreparedImage, scored: Sequence[ScoredFace], calibration: Calibration | None,
                 decision: DecisionRule | None, crops: bool = False) -> dict[str, Any]:
    """The JSON result of one image: its first face's figures (the face ``aikd score`` scores) at the top, every
    face under ``faces``, and ``error`` (``null``, or the code and message of why it has no quality)."""
    result: dict[str, Any] = {"index": image.index, "name": image.name, "width": image.width,
                              "height": image.height, "quality": None, "faces": [], "error": None}
    if image.error is not None:
        result["error"] = image.error.to_dict()
        return result
    faces = [_face(face, calibration, decision, crops) for face in scored]
    first = faces[0]
    if first.get("error"):
        return {**result, "faces": faces, "error": first["error"]}
    head = {key: first[key] for key in ("quality", "expected_fnmr", "quality_100", "decision") if key in first}
    return {**{key: value for key, value in result.items() if key not in ("quality", "faces", "error")}, **head,
            "faces": faces, "error": None}


def select_best(results: Sequence[dict[str, Any]], k: int) -> list[int]:
    """Indices of the ``k`` images of highest quality (ties: the earlier image), best first; images without a
    quality are never selected."""
    scored = [(-result["quality"], result["index"]) for result in results if result.get("quality") is not None]
    return [index for _, index in sorted(scored)[:k]]
