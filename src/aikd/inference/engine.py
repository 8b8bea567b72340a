"""Fast inference for scoring and embedding: two engines behind one small interface, configured once.

An :class:`Engine` turns batches of preprocessed faces into embeddings (and, for a quality model, qualities) as
numpy arrays. :class:`InferenceOptions` is the one place its settings are checked and the one way to build one:

- :class:`TorchEngine` (``backend="torch"``): a :class:`~aikd.models.QualityModel` or a bare face-recognition
  backbone in eval mode under :func:`torch.inference_mode`, BatchNorm folded into the neighbouring convolutions
  (:mod:`aikd.models.folding`), channels_last, and optionally bf16 (CPU or CUDA) or fp16 (CUDA) autocast over the
  convolutional trunk with the embedding layer and quality head in fp32 (:mod:`aikd.models.forward`);
- :class:`OnnxEngine` (``backend="onnxruntime"``, or an ``aikd export`` file): an onnxruntime session of an
  exported graph, with the preprocessing its metadata records (:mod:`aikd.inference.onnx_format`). A torch model
  asked to run on onnxruntime is exported in memory first.

Faces are prepared by the model's own :class:`~aikd.preprocessing.Preprocessing` (:meth:`Engine.prepare`), the
arithmetic the Python API, the file pipeline and the service share.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.evaluation.metrics import l2_normalise
from aikd.inference.onnx_format import OnnxSession, check_aikd_operators, check_graph_input, metadata_from_properties
from aikd.preprocessing import Preprocessing
from aikd.runtime import PRECISIONS, PlainDevice, release_freed_memory, resolve_device

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch (and the model modules) load where the torch engine needs them: an onnxruntime engine for an exported
# file runs without them, and a process scoring with one starts in a fraction of the time (docs/speed.md).

__all__ = [
    "BACKENDS",
    "CPU_BATCH",
    "GPU_BATCH",
    "Engine",
    "InferenceOptions",
    "OnnxEngine",
    "TorchEngine",
    "l2_normalise",
]

CPU_BATCH, GPU_BATCH = 32, 256  # a GPU needs large batches to be busy; on a CPU 32 is past the knee
BACKENDS = ("torch", "onnxruntime")


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class InferenceOptions:
    """How a model runs: the one place these settings are checked (the device-dependent rule, fp16 needs CUDA,
    is :func:`aikd.runtime.autocast_dtype`'s).

    Attributes:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: one of :data:`aikd.runtime.PRECISIONS`: ``fp32`` (exact), ``bf16`` or ``fp16`` (autocast over
            the convolutional trunk).
        backend: ``torch`` or ``onnxruntime`` (fp32; needs the ``onnx`` extra).
        fold: fold BatchNorm into the convolutions (exact).
        batch_size: faces per forward pass; ``None``: :data:`CPU_BATCH` on the CPU, :data:`GPU_BATCH` on a GPU.
        channels_last: NHWC memory layout for the convolutions (torch backend).
    """

    device: str = "auto"
    precision: str = "fp32"
    backend: str = "torch"
    fold: bool = True
    batch_size: int | None = None
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "onnxruntime" and self.precision != "fp32":
            raise ValueError("--backend onnxruntime runs fp32 only; drop --precision or use the torch backend")
        if self.batch_size is not None and not 1 <= self.batch_size <= 65_536:
            raise ValueError(f"--batch-size must be 1 to 65536, got {self.batch_size}")

    def batch_size_on(self, device: Any) -> int:
        """``batch_size``, or the default for ``device``."""
        if self.batch_size is not None:
            return self.batch_size
        return GPU_BATCH if device.type == "cuda" else CPU_BATCH

    def engine(self, model: nn.Module, device: Any = None, preprocessing: Preprocessing | None = None,
               own_model: bool = False) -> Engine:
        """An engine running ``model`` this way.

        Args:
            model: a :class:`~aikd.models.QualityModel` or a backbone; never modified unless ``own_model``.
            device: where to run (e.g. a torchrun rank's device); default: :attr:`device` resolved.
            preprocessing: the input the model expects; default ``model.preprocessing``.
            own_model: ``model`` was loaded for this engine alone: its tensors are freed as they are folded (it is
                unusable afterwards), so start-up holds one set of weights rather than two.
        """
        device = resolve_device(device if device is not None else self.device)
        if self.backend == "onnxruntime":
            return OnnxEngine.from_model(model, device, preprocessing, fold=self.fold)
        return TorchEngine(model, self, device, preprocessing, own_model)

    @staticmethod
    def device_backend(checkpoint: str | os.PathLike) -> str:
        """What resolves the device for a model file (:func:`aikd.runtime.resolve_device`): ``onnxruntime`` for
        an ONNX graph, which runs without torch, else ``torch``."""
        return "onnxruntime" if Path(checkpoint).suffix.lower() == ".onnx" else "torch"

    def quality_engine(self, checkpoint: str | os.PathLike, arch: str | None = None, device: Any = None) -> Engine:
        """An engine for a quality model file: an aikd/AI-KD checkpoint, or an ``aikd export`` ONNX graph (run by
        onnxruntime, fp32 or int8 as exported, with the preprocessing its metadata records)."""
        if self.device_backend(checkpoint) == "onnxruntime":
            if self.precision != "fp32":
                raise ValueError(f"{checkpoint}: an ONNX model runs at the precision it was exported with (fp32, "
                                 f"or int8 from aikd export --int8); drop --precision {self.precision}")
            return OnnxEngine(os.fspath(checkpoint), device if device is not None else self.device)
        from aikd.models.checkpoint import load_quality_model

        return self.engine(load_quality_model(checkpoint, arch=arch), device, own_model=True)


# ------------------------------------------------------------------------------------------------- engines
class Engine(ABC):
    """Batched inference of a quality model or a bare FR backbone (the interface both engines share).

    Attributes:
        backend: ``torch`` or ``onnxruntime``.
        precision: ``fp32``, ``bf16``, ``fp16`` or (an int8 export) ``int8``.
        preprocessing: the input the model takes.
        embedding_size: length of its embedding.
        has_quality: whether it gives qualities (a quality model) or embeddings only.
        fingerprint: which weights (or which graph file) give the outputs: recorded with every output.
        weights_fingerprint: for an exported graph, the fingerprint of the torch weights it came from.
        calibration: the calibration the model file carries (plain data, :mod:`aikd.evaluation.calibration`).
        channels_first: the layout :meth:`prepare` gives, the one :meth:`run` takes without a copy.
    """

    backend: str
    precision: str
    preprocessing: Preprocessing
    embedding_size: int
    has_quality: bool
    fingerprint: str
    weights_fingerprint: str | None
    calibration: dict[str, Any] | None
    channels_first: bool

    def record(self) -> dict[str, Any]:
        """What defines this engine's outputs (model, precision, backend), as plain data; for an exported graph
        also ``weights``, the fingerprint of the torch weights it came from (so a calibration fitted on its
        scores is known to belong to that checkpoint too)."""
        record = {"model": self.fingerprint, "precision": self.precision, "backend": self.backend}
        if self.weights_fingerprint and self.weights_fingerprint != self.fingerprint:
            record["weights"] = self.weights_fingerprint
        return record

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB face -> float32 model input (:meth:`Preprocessing.normalise`: resized to the input size) in the
        layout this engine takes without a copy; thread-safe, meant for the decode workers."""
        return self.preprocessing.normalise(image, channels_first=self.channels_first)

    def __call__(self, batch: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Faces from :meth:`prepare` or :meth:`Preprocessing.normalise`, stacked or as a list, either layout
        ((N, H, W, C) or (N, C, H, W)) -> (embeddings (N, D), qualities (N,)).

        Embeddings are the model's raw (not L2-normalised) float32 output; qualities are ``None`` for a bare
        backbone.

        Raises:
            ValueError: faces of another size than the model's input.
        """
        batch = np.stack(batch) if not isinstance(batch, np.ndarray) else batch
        first = self._is_channels_first(batch.shape)
        if first != self.channels_first:
            batch = batch.transpose(0, 3, 1, 2) if self.channels_first else batch.transpose(0, 2, 3, 1)
        return self.run(np.ascontiguousarray(batch, dtype=np.float32))

    @abstractmethod
    def run(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(embeddings, qualities) of a contiguous float32 batch in this engine's layout."""

    def _is_channels_first(self, shape: tuple[int, ...]) -> bool:
        height, width = self.preprocessing.input_size
        if len(shape) == 4 and shape[1:] == (3, height, width):
            return True
        if len(shape) == 4 and shape[1:] == (height, width, 3):
            return False
        raise ValueError(f"faces of shape {tuple(shape)}: this model takes (N, {height}, {width}, 3) or "
                         f"(N, 3, {height}, {width}) batches (prepare them with Engine.prepare)")


class TorchEngine(Engine):
    """A torch model run for inference (see the module docstring); build it with :meth:`InferenceOptions.engine`."""

    backend = "torch"
    channels_first = False  # channels_last: the decode threads' (H, W, C) faces stack into its memory layout

    def __init__(self, model: nn.Module, options: InferenceOptions, device: torch.device,
                 preprocessing: Preprocessing | None = None, own_model: bool = False) -> None:
        import copy

        import torch

        from aikd.models.checkpoint import weights_fingerprint
        from aikd.models.folding import fold_batchnorm
        from aikd.models.quality import QualityModel
        from aikd.runtime import autocast_dtype

        self.device = device
        self.precision = options.precision
        self.amp_dtype = autocast_dtype(options.precision, device)
        self.has_quality = isinstance(model, QualityModel)
        backbone = model.feature_extractor if self.has_quality else model
        self.preprocessing = preprocessing or getattr(model, "preprocessing", None) or Preprocessing()
        self.embedding_size = int(getattr(backbone, "num_features", 0) or self.preprocessing.embedding_size)
        self.fingerprint = weights_fingerprint(model)
        self.weights_fingerprint = self.fingerprint
        self.calibration = getattr(model, "calibration", None)
        if options.fold:
            prepared = fold_batchnorm(model, consume=own_model)
        else:
            prepared = copy.deepcopy(model).eval()
        prepared.requires_grad_(False)
        self.channels_last = options.channels_last
        self._pinned: torch.Tensor | None = None  # the page-locked host buffer of CUDA transfers
        self.model = prepared.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        release_freed_memory()  # the temporaries of folding and of the layout change: give the pages back

    def run(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from aikd.models.forward import embed, quality_forward

        with torch.inference_mode():
            tensor = self._to_device(faces)
            if self.has_quality:
                embedding, quality = quality_forward(self.model, tensor, self.amp_dtype, regions="trunk")
                return embedding.cpu().numpy(), quality.cpu().numpy()
            return embed(self.model, tensor, self.amp_dtype, regions="trunk").cpu().numpy(), None

    def _to_device(self, faces: np.ndarray) -> torch.Tensor:
        import torch

        host = torch.from_numpy(faces)
        if self.device.type == "cuda":
            # Through one page-locked buffer, reused: pinning a new one for every batch costs more than the copy.
            # Reusing it is safe: run() ends with the results copied back, after the transfer has completed.
            if self._pinned is None or self._pinned.numel() < host.numel():
                self._pinned = torch.empty(host.numel(), dtype=host.dtype, pin_memory=True)
            pinned = self._pinned[:host.numel()].view(host.shape)
            pinned.copy_(host)
            host = pinned
        tensor = host.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        if not self.channels_last:
            tensor = tensor.contiguous()
        return tensor.to(self.device, non_blocking=True) if self.device.type == "cuda" else tensor


class OnnxEngine(Engine):
    """An onnxruntime engine for a graph written by ``aikd export`` (a file, or bytes exported in memory), with the
    preprocessing its metadata says.

    An int8 graph (``aikd export --int8``) whose recorded agreement with fp32 is below its bar logs a warning with
    the figure.

    Raises:
        ValueError: not an aikd ONNX export (no preprocessing metadata), or onnxruntime missing.
    """

    backend = "onnxruntime"
    channels_first = True  # onnxruntime takes NCHW: the decode threads give (C, H, W) faces

    def __init__(self, graph: str | os.PathLike | bytes, device: Any = "auto", source: str | None = None,
                 fingerprint: str | None = None) -> None:
        _require_onnxruntime()
        in_memory = isinstance(graph, bytes)
        source = source or ("<graph>" if in_memory else os.fspath(graph))
        self.device = device if isinstance(device, PlainDevice) else resolve_device(device, backend="onnxruntime")
        # From the file, not from its bytes, and the metadata from the session: onnxruntime then holds the one
        # copy of the weights (reading the graph into Python first cost three copies: docs/speed.md).
        if not in_memory and not os.path.isfile(graph):
            raise ValueError(f"{source}: no such file")
        check_aikd_operators(graph, source)  # before running anything: a crafted graph can loop for ever
        self.session = OnnxSession(graph if in_memory else os.fspath(graph), self.device, source=source)
        metadata = metadata_from_properties(self.session.metadata(), source)
        check_graph_input(self.session.session, metadata["preprocessing"], source)
        self.precision = metadata["precision"]  # fp32, or int8 for a graph from aikd.inference.quantize
        if self.precision == "int8":
            from aikd.inference.quantize import int8_warning

            warning = int8_warning(metadata, source)
            if warning:
                logging.getLogger(__name__).warning("warning: %s", warning)
        self.has_quality = "quality" in metadata["outputs"]
        self.preprocessing = metadata["preprocessing"]
        self.embedding_size = self.preprocessing.embedding_size
        self.weights_fingerprint = metadata.get("fingerprint")  # of the torch weights it was exported from
        # A file is known by its bytes; a graph exported in memory by the torch weights it came from.
        self.fingerprint = fingerprint or (self.weights_fingerprint if in_memory and self.weights_fingerprint
                                           else "onnx:" + _file_sha256(Path(graph)))
        self.calibration = metadata.get("calibration")

    @classmethod
    def from_model(cls, model: nn.Module, device: Any, preprocessing: Preprocessing | None = None,
                   fold: bool = True) -> OnnxEngine:
        """A torch model exported to ONNX in memory and run by onnxruntime (fp32); its outputs are recorded under
        the torch weights' fingerprint, as the torch engine records them."""
        from aikd.inference.export import export_onnx

        _require_onnxruntime()
        buffer = io.BytesIO()
        export_onnx(model, buffer, fold=fold, preprocessing=preprocessing)  # metadata: the torch weights, calibration
        return cls(buffer.getvalue(), PlainDevice(device.type, device.index), fingerprint=None)

    def run(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session.run(faces)
        return outputs[0], (outputs[1] if self.has_quality else None)


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ValueError("--backend onnxruntime needs onnxruntime (pip install 'aikd[onnx]')") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
