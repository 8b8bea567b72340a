"""Where and how aikd runs: device choice, mixed precision, seeding, torchrun, and the CPU it runs on.

One home for what ``train``, ``score``, ``embed`` and ``label`` all need:

- :func:`resolve_device`: ``auto`` is the first CUDA device if there is one, else the CPU; names are checked;
  for a process that runs an ONNX file alone, against onnxruntime's providers and without importing torch
  (:class:`PlainDevice`: torch's import is most of such a process's start-up);
- :data:`PRECISIONS` and :func:`autocast_dtype` / :func:`autocast`: the one list of precisions (``fp32``,
  ``bf16``, ``fp16``) and the one rule for them (fp16 needs CUDA; bf16 on a CPU without native bf16 is emulated and
  slower, and says so); training also takes ``auto`` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32) and
  ``off``;
- :func:`seed_everything`: Python, numpy and torch;
- :class:`Distributed` and :func:`join_torchrun` / :func:`distributed`: this process's place in a
  ``torchrun`` job (gloo on the CPU, NCCL on GPUs, ``cuda`` meaning the local rank's GPU);
- :func:`release_freed_memory`: hand freed heap pages back to the system after a one-off peak;
- :func:`describe_cpu`: kernel bugs and speed depend on the CPU (AVX2, AVX-512, AVX-512 BF16/AMX, ARM), so
  the test run and every benchmark print it first, and a failure or a figure can be tied to a CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import functools
import os
import platform
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: scoring with an ONNX file runs without it (start-up: about 2 s of 2.6).

__all__ = [
    "PRECISIONS",
    "Distributed",
    "PlainDevice",
    "autocast",
    "autocast_dtype",
    "available_cores",
    "cpu_capability",
    "cpu_has_bf16",
    "cpu_has_vnni",
    "describe_cpu",
    "deterministic_algorithms",
    "distributed",
    "join_torchrun",
    "release_freed_memory",
    "resolve_device",
    "seed_everything",
    "use_fastest_convolutions",
]

PRECISIONS = ("fp32", "bf16", "fp16")  # what a model runs in: scoring, embedding, labelling and training alike


# ------------------------------------------------------------------------------------------------------- CPU
def release_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``; elsewhere nothing happens).

    glibc keeps freed blocks for reuse, so after a one-off peak of temporaries (folding a model in float64)
    a process would go on holding that memory although nothing uses it.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c") if platform.system() == "Linux" else None
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here (``AVX2``, ``AVX512``, ``DEFAULT`` on ARM...)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX); elsewhere it is emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_vnni() -> bool:
    """Whether the CPU has 8-bit integer dot products that accumulate in 32 bits (x86 AVX512-VNNI, AVX-VNNI or
    AMX-INT8, read from ``/proc/cpuinfo``): where int8 inference pays off most. ``False`` where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def _onednn_version() -> str:
    import torch

    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.split(" v", 1)[-1].split()[0] if " v" in line else line.strip(" -")
    return "none"


def describe_cpu() -> str:
    """One line: machine, torch build, CPU capability, native bf16, VNNI, oneDNN version, threads."""
    import torch

    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"CPU capability {cpu_capability()}, native bf16 {'yes' if cpu_has_bf16() else 'no'}, "
            f"VNNI {'yes' if cpu_has_vnni() else 'no'}, "
            f"oneDNN {_onednn_version()}, {torch.get_num_threads()} threads")


# --------------------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class PlainDevice:
    """A device named without torch, for onnxruntime: ``type`` ``cpu`` or ``cuda``, ``index`` or ``None``."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def resolve_device(name: str | torch.device | PlainDevice | None = "auto", option: str = "--device",
                   backend: str = "torch") -> torch.device | PlainDevice:
    """``"auto"``/``None`` -> the first CUDA device if there is one, else the CPU; otherwise ``torch.device(name)``.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        option: the user-facing name of the setting, for error messages (``--device``, ``train.device``).
        backend: ``torch``, or ``onnxruntime`` for a process that runs an ONNX file alone: the device is then
            checked against onnxruntime's providers (``auto`` is CUDA only where onnxruntime-gpu can use it) and
            returned as a :class:`PlainDevice`, torch not imported.

    Raises:
        ValueError: unknown device name, or a CUDA device that this machine does not have.
    """
    if backend == "onnxruntime":
        return _onnxruntime_device(name, option)
    import torch

    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name) if isinstance(name, PlainDevice) else name)
    except RuntimeError as err:
        raise ValueError(f"{option}: {err} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name}: this machine (or this torch build) has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"{option} {name}: unsupported device type (use cpu, cuda, cuda:N or auto)")
    return device


def _onnxruntime_device(name: Any, option: str) -> PlainDevice:
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    text = "auto" if name is None else str(name)
    if text == "auto":
        return PlainDevice("cuda" if has_cuda else "cpu")
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"{option} {text}: unsupported device (use cpu, cuda, cuda:N or auto)")
    if kind == "cuda" and not has_cuda:
        raise ValueError(f"{option} {text}: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    return PlainDevice(kind, int(index) if index else None)


# ------------------------------------------------------------------------------------------------- precision
def autocast_dtype(precision: str | bool, device: torch.device | PlainDevice,
                   option: str = "--precision") -> torch.dtype | None:
    """The autocast dtype of a precision setting on ``device``; ``None`` means float32. The one rule of precisions.

    One of :data:`PRECISIONS`, or (training's settings) ``auto``: fp16 on CUDA (the paper's AMP), bf16 on CPUs with
    native bf16 arithmetic and float32 on other CPUs, where bf16 is emulated and slower; ``off`` (and YAML's boolean
    reading of it) means fp32. bf16 asked for on a CPU without native bf16 runs, with a warning that it is slower.

    Raises:
        ValueError: an unknown setting, or fp16 asked for on the CPU (``option`` names the setting).
    """
    import torch

    setting = "fp32" if precision in ("off", False) else str(precision)
    if setting == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if setting not in PRECISIONS:
        raise ValueError(f"{option}: expected one of {', '.join(PRECISIONS)}, auto or off, got {precision!r}")
    if setting == "fp16" and device.type != "cuda":
        raise ValueError(f"{option} fp16 needs a CUDA device; on the CPU use bf16")
    if setting == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(f"{option} bf16: this CPU has no native bf16 arithmetic, so bf16 is emulated and slower than "
                      "fp32", RuntimeWarning, stacklevel=2)
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or nothing for float32 (``None``)."""
    import torch

    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def use_fastest_convolutions() -> None:
    """Let cuDNN benchmark its convolution kernels on first use, where a CUDA device is present: a scoring run feeds
    one input size, so the fastest kernel for it is found once and used for every batch. Process-wide
    (``torch.backends.cudnn.benchmark``): only command entry points call it, never the library.

    It also keeps ``--precision fp32`` what it says on a GPU: torch lets cuDNN run float32 convolutions as TF32 by
    default (inputs rounded to 10-bit mantissas), which moves iResNet qualities by about 1e-3 relative to the CPU's
    (docs/gpu.md); aikd's fp32 is exact, and its fast GPU precisions are bf16 and fp16. The legacy ``allow_tf32``
    switch sets cuDNN's convolution and RNN flags together (mixing it with the newer ``fp32_precision`` settings
    makes torch refuse to read either).
    """
    import torch

    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Deterministic GPU kernels for the ``with`` block (``train.deterministic``), the settings restored after.

    cuDNN picks among convolution algorithms, some of which add in a varying order, and cuBLAS needs a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``) to repeat its sums: without both, two identical training runs on one
    GPU drift apart within steps. Operations without a deterministic kernel warn rather than fail.
    """
    if not enabled:
        yield
        return
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------------- torchrun
@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job: ``rank`` of ``world_size`` (0 of 1 when run alone), and
    the device this rank runs on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | PlainDevice = field(default_factory=lambda: PlainDevice("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, saves and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as torch_dist

            torch_dist.barrier()

    def sum(self, value: int) -> int:
        """The sum of ``value`` over all ranks."""
        if self.world_size == 1:
            return value
        import torch
        import torch.distributed as torch_dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        torch_dist.all_reduce(tensor)
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
            import torch.distributed as torch_dist

            torch_dist.broadcast_object_list(result, src=0)
        status, value = result[0]
        if status == "error":
            raise ValueError(value)
        return value

    def _collective_device(self) -> torch.device:
        import torch
        import torch.distributed as torch_dist

        return self.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")


def join_torchrun(device: str | torch.device | None = "auto", option: str = "--device",
                  backend: str = "torch") -> Distributed:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1; alone, a one-process :class:`Distributed`.

    ``cuda`` (or ``auto`` on a GPU machine) becomes this rank's GPU, ``cuda:LOCAL_RANK``. ``backend``: see
    :func:`resolve_device` (an onnxruntime process alone never imports torch; under torchrun its ranks meet
    through gloo).
    """
    chosen = resolve_device(device, option, backend)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if isinstance(chosen, PlainDevice):
        if chosen.type == "cuda" and chosen.index is None and world_size > 1:
            chosen = PlainDevice("cuda", local_rank)
        if world_size == 1:
            return Distributed(0, 1, chosen)
    import torch
    import torch.distributed as torch_dist

    if not isinstance(chosen, PlainDevice) and chosen.type == "cuda":
        if chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if world_size > 1 and not torch_dist.is_initialized():
        # Ranks wait for each other at the end; a generous timeout covers uneven shards of slow images.
        nccl = not isinstance(chosen, PlainDevice) and chosen.type == "cuda"
        torch_dist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(hours=2))
    rank = torch_dist.get_rank() if world_size > 1 else 0
    return Distributed(rank, world_size, chosen)


@contextlib.contextmanager
def distributed(device: str | torch.device | None = "auto", option: str = "--device",
                backend: str = "torch") -> Iterator[Distributed]:
    """:func:`join_torchrun` for the duration of a command; leaves the process group it joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield join_torchrun(device, option, backend)
        return
    import torch.distributed as torch_dist

    joined = not torch_dist.is_initialized()
    dist = join_torchrun(device, option, backend)
    try:
        yield dist
    finally:
        if joined and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
