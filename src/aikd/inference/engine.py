"""Fast inference for scoring and embedding: device choice, BatchNorm folding, channels_last, mixed precision.

:class:`Engine` wraps a :class:`~aikd.models.QualityModel` or a bare face-recognition backbone and turns
batches of preprocessed faces into embeddings (and qualities) as numpy arrays, on one of two backends:

- ``torch`` (default): eval mode, :func:`torch.inference_mode`, BatchNorm folded into the neighbouring
  convolutions (:mod:`aikd.models.folding`), channels_last memory layout, and optionally bf16 (CPU) or fp16
  (CUDA) autocast over the convolutional trunk with the embedding layer and quality head kept in fp32;
- ``onnxruntime``: the folded model exported to ONNX in memory and run by an onnxruntime session.

Faces are prepared by the model's own :class:`~aikd.models.Preprocessing` (:meth:`Engine.prepare`), the
arithmetic the Python API uses too.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.evaluation.metrics import l2_normalise
from aikd.preprocessing import Preprocessing
from aikd.runtime import PlainDevice, available_cores, cpu_has_bf16, release_freed_memory, resolve_device

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch (and the model modules) load where the torch backend needs them: an onnxruntime engine for an exported
# file runs without them, and a process scoring with one starts in a fraction of the time (README, speed).

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Engine",
    "OnnxSession",
    "InferenceOptions",
    "l2_normalise",
]

PRECISIONS = ("fp32", "bf16", "fp16")
CPU_BATCH, GPU_BATCH = 32, 256  # a GPU needs large batches to be busy; on a CPU 32 is past the knee
BACKENDS = ("torch", "onnxruntime")


# ------------------------------------------------------------------------------------------------- engine
class Engine:
    """Batched inference of a quality model or a bare FR backbone.

    Args:
        model: a :class:`QualityModel` (gives embeddings and qualities) or a backbone (embeddings only).
            Never modified (unless ``own_model``): the engine works on its own eval-mode copy.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        precision: ``"fp32"`` (exact), ``"bf16"`` (autocast; CPU or CUDA) or ``"fp16"`` (autocast; CUDA). The
            embedding layer and the quality head always run in fp32.
        backend: ``"torch"`` or ``"onnxruntime"`` (fp32; needs the ``onnx`` extra).
        fold: fold BatchNorm into convolutions (exact; see :func:`fold_batchnorm`).
        channels_last: NHWC memory layout for the convolutions (torch backend).
        preprocessing: the input the model expects; default ``model.preprocessing`` (a quality model's).
        own_model: ``model`` was loaded for this engine alone: its tensors are freed as they are folded (it is
            unusable afterwards), so start-up holds one set of weights rather than two.
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = "auto", precision: str = "fp32",
                 backend: str = "torch", fold: bool = True, channels_last: bool = True,
                 preprocessing: Preprocessing | None = None, own_model: bool = False) -> None:
        import torch

        from aikd.models.checkpoint import weights_fingerprint
        from aikd.models.folding import fold_batchnorm
        from aikd.models.quality import QualityModel

        if precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.device = resolve_device(device)  # a torch.device (a PlainDevice becomes one)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; on the CPU use bf16")
        if backend == "onnxruntime" and precision != "fp32":
            raise ValueError("--backend onnxruntime runs fp32 only; drop --precision or use the torch backend")
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            warnings.warn("--precision bf16: this CPU has no native bf16 arithmetic, so bf16 is emulated and "
                          "slower than fp32", RuntimeWarning, stacklevel=2)
        self.precision, self.backend = precision, backend
        self.has_quality = isinstance(model, QualityModel)
        backbone = model.feature_extractor if self.has_quality else model
        self.embedding_size = int(getattr(backbone, "num_features", 0) or Preprocessing().embedding_size)
        self.preprocessing = preprocessing or getattr(model, "preprocessing", None) or Preprocessing()
        self.fingerprint = weights_fingerprint(model)  # which weights: recorded with every output
        self.weights_fingerprint = self.fingerprint
        self.calibration = getattr(model, "calibration", None)  # a calibrated checkpoint's (aikd.evaluation.calibration)
        if own_model and fold:
            prepared = fold_batchnorm(model, consume=True)
        else:
            prepared = fold_batchnorm(model) if fold else copy.deepcopy(model).eval()
        prepared.requires_grad_(False)
        self.session = None
        if backend == "onnxruntime":
            self.session = _onnx_session(prepared, self.preprocessing, self.device)
            return
        self.channels_last = channels_last
        self.model = prepared.to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        release_freed_memory()  # the temporaries of folding and of the layout change: give the pages back
        if self.has_quality:
            self.backbone, self.head = self.model.feature_extractor, self.model.quality_head
        else:
            self.backbone, self.head = self.model, None

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: str | torch.device | PlainDevice | None = "auto"
                  ) -> Engine:
        """An onnxruntime engine for a graph written by ``aikd export``, preprocessing as its metadata says.

        An int8 graph (``aikd export --int8``) whose recorded agreement with fp32 is below its bar logs a warning
        with the figure.

        Raises:
            ValueError: not an aikd ONNX export (no preprocessing metadata), or onnxruntime missing.
        """
        from aikd.inference.export import metadata_from_properties

        _require_onnxruntime()
        engine = cls.__new__(cls)
        engine.backend = "onnxruntime"
        engine.device = resolve_device(device, backend="onnxruntime")
        # From the file, not from its bytes, and the metadata from the session: onnxruntime then holds the one
        # copy of the weights (reading the graph into Python first cost three copies: 1.7 GB for iResNet-100).
        session = OnnxSession(os.fspath(path), engine.device, source=str(path))
        metadata = metadata_from_properties(session.metadata(), str(path))
        engine.precision = metadata["precision"]  # fp32, or int8 for a graph from aikd.inference.quantize
        if engine.precision == "int8":
            from aikd.inference.quantize import int8_warning

            warning = int8_warning(metadata, str(path))
            if warning:
                logging.getLogger(__name__).warning("warning: %s", warning)
        engine.has_quality = "quality" in metadata["outputs"]
        engine.preprocessing = metadata["preprocessing"]
        engine.embedding_size = engine.preprocessing.embedding_size
        engine.fingerprint = "onnx:" + _file_sha256(Path(path))
        engine.weights_fingerprint = metadata.get("fingerprint")  # of the torch weights it was exported from
        engine.calibration = metadata.get("calibration")
        engine.session = session
        return engine

    def record(self) -> dict[str, Any]:
        """What defines this engine's outputs (model, precision, backend), as plain data; for an exported graph
        also ``weights``, the fingerprint of the torch weights it came from (so a calibration fitted on its
        scores is known to belong to that checkpoint too)."""
        record = {"model": self.fingerprint, "precision": self.precision, "backend": self.backend}
        if self.weights_fingerprint and self.weights_fingerprint != self.fingerprint:
            record["weights"] = self.weights_fingerprint
        return record

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB face -> float32 model input (:meth:`Preprocessing.normalise`) in the layout this backend
        takes without a copy: (H, W, C) for torch (channels_last), (C, H, W) for onnxruntime; thread-safe, meant
        for the decode workers."""
        return self.preprocessing.normalise(image, channels_first=self.session is not None)

    def __call__(self, batch: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Faces from :meth:`prepare` or :meth:`Preprocessing.normalise`, stacked or as a list, either layout
        ((N, H, W, C) or (N, C, H, W)) -> (embeddings (N, D), qualities (N,)).

        Embeddings are the model's raw (not L2-normalised) float32 output; qualities are ``None`` for a bare
        backbone.

        Raises:
            ValueError: faces of another size than the model's input.
        """
        batch = np.stack(batch) if not isinstance(batch, np.ndarray) else batch
        channels_first = self._channels_first(batch.shape)
        if self.session is not None:
            faces = batch if channels_first else batch.transpose(0, 3, 1, 2)
            outputs = self.session.run(np.ascontiguousarray(faces, dtype=np.float32))
            return outputs[0], (outputs[1] if self.has_quality else None)
        import torch

        faces = batch.transpose(0, 2, 3, 1) if channels_first else batch
        with torch.inference_mode():
            embedding, quality = self._forward(self._to_device(np.ascontiguousarray(faces, dtype=np.float32)))
            return embedding.cpu().numpy(), (quality.cpu().numpy() if quality is not None else None)

    def _channels_first(self, shape: tuple[int, ...]) -> bool:
        height, width = self.preprocessing.input_size
        if len(shape) == 4 and shape[1:] == (3, height, width):
            return True
        if len(shape) == 4 and shape[1:] == (height, width, 3):
            return False
        raise ValueError(f"faces of shape {tuple(shape)}: this model takes (N, {height}, {width}, 3) or "
                         f"(N, 3, {height}, {width}) batches (prepare them with Engine.prepare)")

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        import torch

        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        if not self.channels_last:
            tensor = tensor.contiguous()
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        backbone = self.backbone
        if self.precision == "fp32":
            embedding = backbone(faces)
        else:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(self.device.type, dtype=dtype):
                trunk = backbone.forward_trunk(faces) if hasattr(backbone, "forward_trunk") else backbone(faces)
            # The embedding layer and the head are tiny and numerically sensitive: keep them in fp32.
            embedding = (backbone.forward_embedding_from_trunk(trunk.float())
                         if hasattr(backbone, "forward_trunk") else trunk.float())
        embedding = embedding.float()
        quality = self.head(embedding).squeeze(-1).float() if self.head is not None else None
        return embedding, quality


def _onnx_session(model: nn.Module, preprocessing: Preprocessing, device: torch.device) -> Any:
    """An onnxruntime session running ``model`` exported to ONNX in memory."""
    from aikd.inference.export import export_onnx

    _require_onnxruntime()
    buffer = io.BytesIO()
    export_onnx(model, buffer, input_size=preprocessing.input_size, fold=False)
    return OnnxSession(buffer.getvalue(), device)


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


class OnnxSession:
    """An onnxruntime session of an exported graph, run the way that is fastest for whole folders.

    On the CPU each batch runs as two halves at once, each half on half the cores, instead of the whole batch on
    every core: onnxruntime's threads meet at a barrier after every operator, and on a machine whose cores the
    decode threads share, one preempted thread holds up the others there. Measured on 2 cores (``aikd score``,
    whole process, interleaved runs): dlib-r29 int8 on 1760 files 1.04x (median of 3 pairs; 1.20x in another
    series of 3), fp32 1.07x, iResNet-100 fp32 on 64 files 1.02x, the same scores; a batch of one face runs on
    half the cores (iResNet-100: 0.3 s more for the first face). On a GPU the batch runs whole.
    """

    def __init__(self, graph: bytes | str, device: torch.device | PlainDevice, source: str = "<graph>") -> None:
        """Load ``graph`` (its bytes, or its file: lighter, onnxruntime reads it itself) for ``device``.

        Raises:
            ValueError: no such file, or not a graph onnxruntime can load (the message names ``source``).
        """
        import onnxruntime as ort

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("--backend onnxruntime --device cuda needs onnxruntime-gpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No memory arena: it keeps the largest batch's activations reserved for good (about 200 MB for an
        # iResNet-100 at batch 32); plain allocation measured no slower here.
        options.enable_cpu_mem_arena = False
        cores = available_cores()
        self.halves = device.type == "cpu" and cores >= 2
        if self.halves:
            options.intra_op_num_threads = cores // 2
        if isinstance(graph, str) and not os.path.isfile(graph):
            raise ValueError(f"{source}: no such file")
        try:
            self.session = ort.InferenceSession(graph, options, providers=providers)
        except Exception as err:  # onnxruntime's own exception types: InvalidProtobuf, Fail, InvalidGraph...
            raise ValueError(f"{source}: not an ONNX model onnxruntime can run ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
        self._pool: ThreadPoolExecutor | None = None

    def metadata(self) -> dict[str, str]:
        """The graph's metadata properties (aikd's: :func:`aikd.inference.export.metadata_from_properties`)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, faces: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for a contiguous float32 (N, C, H, W) batch."""
        if not self.halves or len(faces) < 2:
            return self.session.run(None, {"image": faces})
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="aikd-onnxruntime")
        halves = np.array_split(faces, 2)
        outputs = list(self._pool.map(lambda half: self.session.run(None, {"image": half}), halves))
        return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class InferenceOptions:
    """How a batch-inference command runs its model.

    Attributes:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32`` (exact), ``bf16`` or ``fp16`` (autocast over the convolutional trunk).
        backend: ``torch`` or ``onnxruntime``.
        fold: fold BatchNorm into the convolutions (exact).
        batch_size: faces per forward pass; ``None``: :data:`CPU_BATCH` on the CPU, :data:`GPU_BATCH` on a GPU.
    """

    device: str = "auto"
    precision: str = "fp32"
    backend: str = "torch"
    fold: bool = True
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")

    def batch_size_on(self, device: torch.device) -> int:
        """``batch_size``, or the default for ``device``."""
        if self.batch_size is not None:
            return self.batch_size
        return GPU_BATCH if device.type == "cuda" else CPU_BATCH

    def engine(self, model: nn.Module, device: torch.device | None = None,
               preprocessing: Preprocessing | None = None, own_model: bool = False) -> Engine:
        """An :class:`Engine` running ``model`` this way (on ``device``, e.g. a torchrun rank's, if given);
        ``own_model``: see :class:`Engine`."""
        import torch

        device = device or resolve_device(self.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a command runs one input size: cuDNN picks its fastest kernels
        return Engine(model, device=device, precision=self.precision, backend=self.backend, fold=self.fold,
                      preprocessing=preprocessing, own_model=own_model)

    @staticmethod
    def device_backend(checkpoint: str | os.PathLike) -> str:
        """What resolves the device for a model file (:func:`aikd.runtime.resolve_device`): ``onnxruntime`` for
        an ONNX graph, which runs without torch, else ``torch``."""
        return "onnxruntime" if Path(checkpoint).suffix.lower() == ".onnx" else "torch"

    def quality_engine(self, checkpoint: str | os.PathLike, arch: str | None = None,
                       device: torch.device | None = None) -> Engine:
        """An engine for a quality model file: an aikd/AI-KD checkpoint, or an ``aikd export`` ONNX graph
        (run by onnxruntime, fp32 or int8 as exported, with the preprocessing its metadata records)."""
        if self.device_backend(checkpoint) == "onnxruntime":
            if self.precision != "fp32":
                raise ValueError(f"{checkpoint}: an ONNX model runs at the precision it was exported with (fp32, "
                                 f"or int8 from aikd export --int8); drop --precision {self.precision}")
            return Engine.from_onnx(checkpoint, device or self.device)
        from aikd.models.checkpoint import load_quality_model

        return self.engine(load_quality_model(checkpoint, arch=arch), device, own_model=True)
