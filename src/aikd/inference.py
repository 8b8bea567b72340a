"""Fast inference for scoring and embedding: device choice, BatchNorm folding, channels_last, mixed precision.

:class:`Engine` wraps a :class:`~aikd.models.QualityModel` or a bare face-recognition backbone and turns
batches of preprocessed faces into embeddings (and qualities) as numpy arrays, on one of two backends:

- ``torch`` (default): eval mode, :func:`torch.inference_mode`, BatchNorm folded into the neighbouring
  convolutions (:mod:`aikd.models.folding`), channels_last memory layout, and optionally bf16 (CPU) or fp16
  (CUDA) autocast over the convolutional trunk with the embedding layer and quality head kept in fp32;
- ``onnxruntime``: the folded model exported to ONNX in memory and run by an onnxruntime session.

"""

from __future__ import annotations

import argparse
import copy
import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from aikd.jobs import add_job_arguments
from aikd.models.folding import fold_batchnorm
from aikd.models.preprocessing import Preprocessing
from aikd.models.quality import QualityModel
from aikd.runtime import cpu_has_bf16, resolve_device
from aikd.sources import resize_to

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Engine",
    "add_inference_arguments",
    "batch_size_from_args",
    "engine_from_args",
    "l2_normalise",
    "normalise",
]

PRECISIONS = ("fp32", "bf16", "fp16")
CPU_BATCH, GPU_BATCH = 32, 256  # a GPU needs large batches to be busy; on a CPU 32 is past the knee
BACKENDS = ("torch", "onnxruntime")


# ------------------------------------------------------------------------------------------ preprocessing
def normalise(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """One uint8 (H, W, 3) RGB face -> float32 (H, W, C) model input, resized to the model's input size.

    The same arithmetic as :meth:`Preprocessing.to_tensor` (``(x / 255 - mean) / std`` in float32), done
    per image with numpy so that it runs in the decode threads; stacking gives an (N, H, W, C) batch whose
    NCHW view is already channels_last.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    image = resize_to(image, preprocessing.input_size)
    if preprocessing.channel_order == "BGR":
        image = image[..., ::-1]
    mean = np.asarray(preprocessing.mean, dtype=np.float32)
    std = np.asarray(preprocessing.std, dtype=np.float32)
    return (image.astype(np.float32) / np.float32(255.0) - mean) / std


# ------------------------------------------------------------------------------------------------- engine
class Engine:
    """Batched inference of a quality model or a bare FR backbone.

    Args:
        model: a :class:`QualityModel` (gives embeddings and qualities) or a backbone (embeddings only).
            Never modified: the engine works on its own eval-mode copy.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        precision: ``"fp32"`` (exact), ``"bf16"`` (autocast; CPU or CUDA) or ``"fp16"`` (autocast; CUDA). The
            embedding layer and the quality head always run in fp32.
        backend: ``"torch"`` or ``"onnxruntime"`` (fp32; needs the ``onnx`` extra).
        fold: fold BatchNorm into convolutions (exact; see :func:`fold_batchnorm`).
        channels_last: NHWC memory layout for the convolutions (torch backend).
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = "auto", precision: str = "fp32",
                 backend: str = "torch", fold: bool = True, channels_last: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.device = resolve_device(device)
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
        self.preprocessing = getattr(model, "preprocessing", None) or Preprocessing()
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
        if self.has_quality:
            self.backbone, self.head = self.model.feature_extractor, self.model.quality_head
        else:
            self.backbone, self.head = self.model, None

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB face -> float32 (H, W, C) input; thread-safe, meant for the decode workers."""
        return normalise(image, self.preprocessing)

    def __call__(self, batch: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Faces from :meth:`prepare`, stacked (N, H, W, C) or as a list -> (embeddings (N, D), qualities (N,)).

        Embeddings are the model's raw (not L2-normalised) float32 output; qualities are ``None`` for a bare
        backbone.
        """
        batch = np.ascontiguousarray(np.stack(batch) if not isinstance(batch, np.ndarray) else batch,
                                     dtype=np.float32)
        if self.session is not None:
            outputs = self.session.run(None, {"image": np.ascontiguousarray(batch.transpose(0, 3, 1, 2))})
            return outputs[0], (outputs[1] if self.has_quality else None)
        with torch.inference_mode():
            embedding, quality = self._forward(self._to_device(batch))
            return embedding.cpu().numpy(), (quality.cpu().numpy() if quality is not None else None)

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        if not self.channels_last:
            tensor = tensor.contiguous()
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("--backend onnxruntime needs onnxruntime (pip install 'aikd[onnx]')") from None
    from aikd.export import export_onnx

    buffer = io.BytesIO()
    export_onnx(model, buffer, input_size=preprocessing.input_size, fold=False)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("--backend onnxruntime --device cuda needs onnxruntime-gpu")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buffer.getvalue(), options, providers=providers)


# ------------------------------------------------------------------------------------- command-line options
def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the batch-inference commands (``score``, ``embed``): speed, device, resuming."""
    group = add_job_arguments(parser, None, f"faces per forward pass ({CPU_BATCH} on the CPU, {GPU_BATCH} on a GPU)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="fp32 (exact), bf16 (autocast; fast on GPUs and on CPUs with native bf16, e.g. "
                            "AVX-512 BF16 or AMX, emulated and slow elsewhere) or fp16 (GPU autocast); the "
                            "embedding layer and the quality head stay fp32 (default: %(default)s)")
    group.add_argument("--backend", choices=BACKENDS, default="torch",
                       help="torch, or onnxruntime (fp32, needs the onnx extra; often the fastest exact path on "
                            "CPUs, at the cost of an export of some seconds at start) (default: %(default)s)")
    group.add_argument("--no-fold", dest="fold", action="store_false",
                       help="run the model as stored instead of with BatchNorm folded into convolutions")


def engine_from_args(model: nn.Module, args: argparse.Namespace, device: torch.device | None = None) -> Engine:
    """An :class:`Engine` configured by the options of :func:`add_inference_arguments`."""
    if torch.device(device or resolve_device(args.device)).type == "cuda":
        torch.backends.cudnn.benchmark = True  # a command runs one input size: let cuDNN pick its fastest kernels
    return Engine(model, device=device or args.device, precision=args.precision, backend=args.backend,
                  fold=args.fold)


def batch_size_from_args(args: argparse.Namespace, device: torch.device) -> int:
    """``--batch-size``, or the default for ``device``; raises ValueError below 1."""
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = GPU_BATCH if device.type == "cuda" else CPU_BATCH
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    return batch_size


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their Euclidean norm (float32; an all-zero row stays zero)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)
