"""Input preprocessing a model expects, carried with the model (and its checkpoint) instead of re-stated.

The insightface iResNets and the AI-KD quality model take 112x112 RGB crops aligned to the ArcFace
template, scaled to [-1, 1]: ``x = (pixel / 255 - 0.5) / 0.5`` per channel (the paper code's
``ToTensor`` + ``Normalize(mean=0.5, std=0.5)``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.images import resize_image

if TYPE_CHECKING:
    import torch

__all__ = ["Preprocessing"]

ImageBatch = np.ndarray | Sequence[np.ndarray]
# Far above any face model's input (112, 150, 224), far below what a file's metadata could make aikd allocate per
# face: a file's metadata claiming a 12000x12000 input made aikd allocate gigabytes before anything refused it.
MAX_INPUT_SIDE = 1024
MAX_EMBEDDING_SIZE = 1 << 16


@dataclass(frozen=True)
class Preprocessing:
    """How images become model input.

    Attributes:
        input_size: (height, width) in pixels the model takes.
        mean: per-channel mean subtracted on the 0..1 scale, in model channel order.
        std: per-channel divisor on the 0..1 scale.
        channel_order: ``"RGB"`` or ``"BGR"``, the order the model's first convolution expects.
        embedding_size: length of the backbone embedding (the quality head's input).
        template: where the five landmarks (left eye, right eye, nose, left and right mouth corner) go in the
            model's input, in its pixels; ``None``: the ArcFace template scaled to ``input_size``.
    """

    input_size: tuple[int, int] = (112, 112)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    embedding_size: int = 512
    template: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists (from JSON/YAML) but store tuples so instances stay hashable and comparable.
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.input_size) != 2 or min(self.input_size) < 1 or max(self.input_size) > MAX_INPUT_SIDE:
            raise ValueError(f"preprocessing.input_size must be (height, width) of 1 to {MAX_INPUT_SIDE} pixels, "
                             f"got {self.input_size}")
        if not 1 <= int(self.embedding_size) <= MAX_EMBEDDING_SIZE:
            raise ValueError(f"preprocessing.embedding_size must be 1 to {MAX_EMBEDDING_SIZE}, got "
                             f"{self.embedding_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preprocessing.mean/std must be 3 values with std > 0, "
                             f"got mean={self.mean}, std={self.std}")
        if self.template is not None:
            points = tuple(tuple(float(v) for v in point) for point in self.template)
            if len(points) != 5 or any(len(point) != 2 for point in points):
                raise ValueError(f"preprocessing.template must be 5 (x, y) points, got {self.template}")
            object.__setattr__(self, "template", points)
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"preprocessing.channel_order must be 'RGB' or 'BGR', "
                             f"got {self.channel_order!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, numbers, strings) for checkpoints and JSON."""
        data = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
        data["template"] = [list(point) for point in self.template] if self.template is not None else None
        return data

    def alignment_points(self) -> np.ndarray:
        """(5, 2) float32: where the five landmarks go in the model's input (:attr:`template`)."""
        if self.template is not None:
            return np.asarray(self.template, dtype=np.float32)
        from aikd.align import ALIGNED_SIZE, ARCFACE_TEMPLATE

        return ARCFACE_TEMPLATE * np.float32(self.input_size[0] / ALIGNED_SIZE)

    def align(self, image: np.ndarray, landmarks: object) -> np.ndarray:
        """``image`` warped so that its five ``landmarks`` land on :meth:`alignment_points`, at ``input_size``.

        The one home of "a crop for this model": ``aikd score``/``embed``/``label``/``align`` and training all
        align through it (:func:`aikd.align.align_face`: least-squares similarity, bilinear, black border).

        Raises:
            ValueError: a non-square input size, or bad landmarks (:func:`aikd.align.align_face` says which).
        """
        from aikd.align import ALIGNED_SIZE, align_face

        height, width = self.input_size
        if height != width:
            raise ValueError(f"five-point alignment makes square crops; the model's input is {height}x{width}")
        template = self.alignment_points() * np.float32(ALIGNED_SIZE / height)  # align_face's 112 frame
        return align_face(image, landmarks, size=height, template=template)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocessing must be a mapping of its fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        return self.to_tensor(images)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """``image`` at ``input_size`` by aikd's one resize rule (:func:`aikd.images.resize_image`)."""
        return resize_image(image, self.input_size)

    def normalise(self, image: np.ndarray, channels_first: bool = False) -> np.ndarray:
        """One uint8 (H, W, 3) RGB image -> float32 model input: resized to ``input_size``, channels in the
        model's order, ``x * (1 / (255 std)) - mean / std`` per channel.

        The single home of this arithmetic: :meth:`to_tensor` (the Python API), the inference engine's decode
        threads (``aikd score``/``embed``) and training all call it, so the same image gives the same input.
        ``channels_first=False`` gives (H, W, 3), whose stack is an (N, H, W, 3) batch that is already
        channels_last; ``True`` gives (3, H, W), bit for bit the same values (for onnxruntime's NCHW input).
        """
        image = self.resize(_check_image(image, 0))
        if self.channel_order == "BGR":
            image = image[..., ::-1]
        scale, offset = self._affine
        height, width = image.shape[:2]  # input_size, after the resize
        if channels_first:
            out = np.empty((3, height, width), dtype=np.float32)
            for channel in range(3):
                np.multiply(image[:, :, channel], scale[channel], out=out[channel])
                out[channel] += offset[channel]
            return out
        # Per-channel constants tiled along a row: numpy's inner loop then runs 3 x width long, not 3 (faster;
        # measured: docs/speed.md).
        row_scale, row_offset = self._row_affine
        rows = image.reshape(height, width * 3).astype(np.float32)
        rows *= row_scale
        rows += row_offset
        return rows.reshape(height, width, 3)

    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 (scale, offset) per channel: ``(x / 255 - mean) / std`` as one multiply and one add (computed
        once per instance: :meth:`normalise` runs for every face)."""
        std = np.asarray(self.std, dtype=np.float64)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        offset = (-np.asarray(self.mean, dtype=np.float64) / std).astype(np.float32)
        return _read_only(scale), _read_only(offset)

    @functools.cached_property
    def _row_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """:attr:`_affine` tiled along one row of ``input_size`` pixels."""
        width = self.input_size[1]
        return tuple(_read_only(np.tile(values, width)) for values in self._affine)

    def to_tensor(self, images: ImageBatch) -> torch.Tensor:
        """uint8 RGB images -> float32 (N, 3, H, W) model input (:meth:`normalise` of each).

        Args:
            images: one (H, W, 3) array, an (N, H, W, 3) array, or a list of (H, W, 3) arrays of any sizes.

        Raises:
            ValueError: an image is not uint8 or not shaped (H, W, 3).
        """
        import torch  # here, not at the top: an ONNX-only process never imports torch

        items = _as_list(images)
        batch = np.stack([self.normalise(_check_image(image, i)) for i, image in enumerate(items)])
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)  # shared by every call of a cached property
    return array


def _as_list(images: ImageBatch) -> Sequence[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items: Sequence[np.ndarray] = list(images)
    elif isinstance(images, np.ndarray):
        items = [images]
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = images
    else:
        raise ValueError(f"expected uint8 RGB image array(s), got {type(images).__name__}")
    if len(items) == 0:
        raise ValueError("no images given")
    return items


def _check_image(image: Any, index: int) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image {index}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image {index}: expected uint8 pixels (0..255), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image {index}: expected an (H, W, 3) RGB array, got shape {image.shape}")
    return image
