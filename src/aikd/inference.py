"""Fast inference for scoring and embedding: device choice, BatchNorm folding, channels_last, mixed precision.

:class:`Engine` wraps a :class:`~aikd.models.QualityModel` or a bare face-recognition backbone and turns
batches of preprocessed faces into embeddings (and qualities) as numpy arrays, on one of two backends:

- ``torch`` (default): eval mode, :func:`torch.inference_mode`, BatchNorm folded into the neighbouring
  convolutions (:func:`fold_batchnorm`), channels_last memory layout, and optionally bf16 (CPU) or fp16
  (CUDA) autocast over the convolutional trunk with the embedding layer and quality head kept in fp32;
- ``onnxruntime``: the folded model exported to ONNX in memory and run by an onnxruntime session.

Folding is exact arithmetic (only float rounding changes): every BatchNorm of an inference-mode iResNet is
an affine map per channel, ``y = a * x + b``. A BatchNorm *after* a convolution scales the convolution's
output channels and adds a bias. The iResNet block's BatchNorm *before* its first convolution
(``bn1 -> conv1``) scales the convolution's input channels; its shift ``b`` becomes a bias too, except on
the one-pixel border, where ``conv1`` reads zero padding rather than ``b`` — that border difference is
precomputed per input size and added back, so the folded block equals the original exactly. The trunk's
final ``bn2``, ``fc`` and the ``features`` BatchNorm1d (dropout is the identity in eval mode) become one
Linear layer. PReLU is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aikd.images import ImageInput
from aikd.jobs import ItemResult, add_job_arguments, finish_job, read_journal
from aikd.models.iresnet import IBasicBlock, IResNet
from aikd.models.preprocessing import Preprocessing
from aikd.models.quality import QualityModel
from aikd.runtime import cpu_has_bf16
from aikd.sources import resize_to

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Distributed",
    "Engine",
    "add_inference_arguments",
    "batch_size_from_args",
    "distributed",
    "engine_from_args",
    "finish_distributed",
    "l2_normalise",
    "FoldedIResNet",
    "fold_batchnorm",
    "normalise",
    "resolve_device",
]

PRECISIONS = ("fp32", "bf16", "fp16")
CPU_BATCH, GPU_BATCH = 32, 256  # a GPU needs large batches to be busy; on a CPU 32 is past the knee
BACKENDS = ("torch", "onnxruntime")


# ------------------------------------------------------------------------------------------------- devices
def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> the first CUDA device if there is one, else the CPU; otherwise ``torch.device(name)``.

    Raises:
        ValueError: unknown device name, or a CUDA device that this machine does not have.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: {err} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine (or this torch build) has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: unsupported device type (use cpu, cuda, cuda:N or auto)")
    return device


# ---------------------------------------------------------------------------------------------- folding
def _affine(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel (float64 for exact folding)."""
    var = norm.running_var.double()
    mean = norm.running_mean.double()
    weight = norm.weight.double() if norm.weight is not None else torch.ones_like(var)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + norm.eps)
    return scale, bias - mean * scale


def _conv_then_norm(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """``norm(conv(x))`` as one convolution with a bias."""
    scale, shift = _affine(norm)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = shift + (conv.bias.double() * scale if conv.bias is not None else 0.0)
    return _new_conv(conv, weight, bias)


def _new_conv(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(template.in_channels, template.out_channels, template.kernel_size, template.stride,
                     template.padding, template.dilation, template.groups, bias=True,
                     device=template.weight.device, dtype=template.weight.dtype)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    return conv


class _NormConvNorm(nn.Module):
    """``bn_after(conv(bn_before(x)))`` as one convolution plus a precomputed border correction.

    ``conv`` holds the folded weights and the bias an interior pixel gets. On the border, padding means
    the original convolution never saw ``bn_before``'s shift there; the difference depends only on the
    input size and is cached per (height, width, device, dtype).
    """

    def __init__(self, before: nn.modules.batchnorm._BatchNorm, conv: nn.Conv2d,
                 after: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        in_scale, in_shift = _affine(before)
        out_scale, out_shift = _affine(after)
        weight = conv.weight.double()
        # What the input shift adds through each kernel tap; an interior pixel gets the sum over all taps.
        tap_shift = ((weight * in_shift.view(1, -1, 1, 1)).sum(1) * out_scale.view(-1, 1, 1)).cpu()
        folded = weight * in_scale.view(1, -1, 1, 1) * out_scale.view(-1, 1, 1, 1)
        self.conv = _new_conv(conv, folded, tap_shift.sum((1, 2)) + out_shift)
        self.tap_shift = tap_shift  # float64, CPU: the border is computed exactly once per input size
        self.correct_border = bool(in_shift.abs().max() > 0) and max(conv.padding) > 0
        kernel, padding = tuple(conv.kernel_size), tuple(conv.padding)
        self.ring_only = conv.stride == (1, 1) and conv.dilation == (1, 1) and kernel == (3, 3) and padding == (1, 1)
        self._border: dict[tuple, torch.Tensor] = {}

    def border(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, H', W', C_out) bias missing from ``conv``'s output: zero inside, non-zero on the border."""
        key = (height, width, torch.device(device), dtype)
        if key not in self._border:
            conv = self.conv
            # Ones convolved with the per-tap shift: the bias each output pixel really gets.
            ones = torch.ones(1, 1, height, width, dtype=torch.float64)
            real = F.conv2d(ones, self.tap_shift.unsqueeze(1), None, conv.stride, conv.padding, conv.dilation)
            interior = self.tap_shift.sum((1, 2)).view(1, -1, 1, 1)
            self._border[key] = (real - interior).permute(0, 2, 3, 1).contiguous().to(device, dtype)
        return self._border[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if not self.correct_border:
            return out
        # int(): under the ONNX tracer sizes are tensors, and the border is a constant of the input size.
        border = self.border(int(x.shape[-2]), int(x.shape[-1]), out.device, out.dtype)
        height, width = out.shape[-2:]
        if not self.ring_only or height < 3 or width < 3 or torch.jit.is_tracing() \
                or torch.onnx.is_in_onnx_export():
            return out + border.permute(0, 3, 1, 2)  # also the exported graph: one Add of a constant
        # 3x3 kernel, stride 1, padding 1: only the outermost rows and columns differ. Two in-place adds on
        # the (N, H, W, C) view, contiguous along C for channels_last output.
        out_hwc = out.permute(0, 2, 3, 1)
        out_hwc[:, :: height - 1] += border[:, :: height - 1]
        out_hwc[:, 1:-1, :: width - 1] += border[:, 1:-1, :: width - 1]
        return out


class FoldedBlock(nn.Module):
    """An :class:`IBasicBlock` with its three BatchNorms (and the shortcut's) folded into convolutions."""

    def __init__(self, block: IBasicBlock) -> None:
        super().__init__()
        self.conv1 = _NormConvNorm(block.bn1, block.conv1, block.bn2)
        self.prelu = copy.deepcopy(block.prelu)
        self.conv2 = _conv_then_norm(block.conv2, block.bn3)
        self.downsample = None
        if block.downsample is not None:
            conv, norm = block.downsample[0], block.downsample[1]
            self.downsample = _conv_then_norm(conv, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.prelu(self.conv1(x)))
        out += x if self.downsample is None else self.downsample(x)  # out is fresh: add in place
        return out


class FoldedIResNet(nn.Module):
    """Inference-only iResNet: BatchNorms folded; ``bn2 -> flatten -> fc -> features`` as one Linear.

    Same interface as :class:`IResNet` (``forward``, ``forward_trunk``, ``forward_embedding_from_trunk``,
    ``num_features``), except that the trunk output is flattened in (height, width, channel) order, which
    is free for channels_last input, and the embedding layer needs the trunk's spatial size (7x7).
    """

    def __init__(self, model: IResNet) -> None:
        super().__init__()
        self.num_features = model.num_features
        self.conv1 = _conv_then_norm(model.conv1, model.bn1)
        self.prelu = copy.deepcopy(model.prelu)
        blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
        self.blocks = nn.Sequential(*(FoldedBlock(block) for block in blocks))
        self.fc = self._fold_embedding(model)

    @staticmethod
    def _fold_embedding(model: IResNet) -> nn.Linear:
        channels = model.bn2.num_features
        positions = model.fc.in_features // channels
        in_scale, in_shift = _affine(model.bn2)
        out_scale, out_shift = _affine(model.features)
        # fc input index is c * positions + p (flatten of C, H, W); reorder to p * channels + c (H, W, C).
        weight = model.fc.weight.double().view(-1, channels, positions)
        bias = model.fc.bias.double() + (weight * in_shift.view(1, -1, 1)).sum((1, 2))
        weight = (weight * in_scale.view(1, -1, 1)).permute(0, 2, 1).reshape(model.fc.out_features, -1)
        fc = nn.Linear(model.fc.in_features, model.fc.out_features, device=model.fc.weight.device,
                       dtype=model.fc.weight.dtype)
        fc.weight.data.copy_(weight * out_scale.view(-1, 1))
        fc.bias.data.copy_(bias * out_scale + out_shift)
        return fc

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) -> (N, 7 * 7 * C) flattened in (H, W, C) order (before ``bn2``, folded into fc)."""
        x = self.blocks(self.prelu(self.conv1(x)))
        return x.permute(0, 2, 3, 1).flatten(1)

    def forward_embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.fc(trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_embedding_from_trunk(self.forward_trunk(x))


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Inference copy of ``model`` with BatchNorm folded (see the module docstring); ``model`` is untouched.

    Args:
        model: an :class:`IResNet`, a :class:`QualityModel` with an iResNet backbone, or anything else (then
            returned as an eval-mode copy, unfolded).

    Returns:
        A new module in eval mode giving the same outputs as ``model.eval()`` up to float rounding.
    """
    if isinstance(model, QualityModel):
        backbone = fold_batchnorm(model.feature_extractor)
        return QualityModel(backbone, copy.deepcopy(model.quality_head), model.arch, model.preprocessing).eval()
    if isinstance(model, IResNet):
        return FoldedIResNet(model.eval()).eval()
    return copy.deepcopy(model).eval()


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


# -------------------------------------------------------------------------------------------- torchrun
class Distributed:
    """This process's place in a ``torchrun`` job: ``rank`` of ``world_size`` (0 of 1 when run alone)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def sum(self, value: int) -> int:
        """The sum of ``value`` over all ranks (gloo/nccl all-reduce)."""
        if self.world_size == 1:
            return value
        backend = torch.distributed.get_backend()
        tensor = torch.tensor([value], dtype=torch.int64,
                              device=f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")
        torch.distributed.all_reduce(tensor)
        return int(tensor.item())

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """Run ``compute`` on rank 0 only and give every rank its result (or raise its ValueError everywhere)."""
        result: list[Any] = [None]
        if self.is_main:
            try:
                result = [("ok", compute())]
            except ValueError as err:
                result = [("error", str(err))]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(result, src=0)
        status, value = result[0]
        if status == "error":
            raise ValueError(value)
        return value


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[Distributed, torch.device]]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (gloo on the CPU, nccl on GPUs).

    Yields the :class:`Distributed` handle and the device this rank should use: ``cuda`` without an index
    becomes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield Distributed(), device
        return
    import torch.distributed as dist

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # Ranks wait for each other at the end; a generous timeout covers uneven shards of slow images.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    try:
        yield Distributed(dist.get_rank(), dist.get_world_size()), device
    finally:
        dist.destroy_process_group()


def finish_distributed(
    dist: Distributed,
    items: Sequence[ImageInput],
    results: dict[str, ItemResult],
    output: os.PathLike,
    write_output: Callable[[list[tuple[ImageInput, ItemResult]]], None],
    verb: str,
) -> int:
    """After :func:`aikd.jobs.run_job` on every rank: rank 0 merges all ranks' results and writes the outputs.

    Returns the exit status (0 all done, 1 some failed) on every rank.
    """
    dist.barrier()  # every rank's journal is complete

    def finish() -> int:
        merged = dict(results)
        if dist.world_size > 1:
            for key, result in read_journal(output).items():
                if key not in merged or merged[key].error is not None:
                    merged[key] = result
        return finish_job(items, merged, output, write_output, verb=verb).exit_code

    return dist.from_main(finish)


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their Euclidean norm (float32; an all-zero row stays zero)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)
