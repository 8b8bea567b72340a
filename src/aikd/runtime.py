"""Where aikd runs: the CPU's instruction set as torch sees it, and whether bf16 is native there.

Kernel bugs and speed both depend on the CPU (AVX2, AVX-512, AVX-512 BF16/AMX, ARM), so the test run and
every benchmark print :func:`describe_cpu` first: a failure or a figure can then be tied to a CPU.
"""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["cpu_capability", "cpu_has_bf16", "describe_cpu"]


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here (``AVX2``, ``AVX512``, ``DEFAULT`` on ARM...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX); elsewhere it is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn_version() -> str:
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.split("v", 1)[-1].split()[0] if " v" in line else line.strip(" -")
    return "none"


def describe_cpu() -> str:
    """One line: machine, torch build, CPU capability, native bf16, oneDNN version, threads."""
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"CPU capability {cpu_capability()}, native bf16 {'yes' if cpu_has_bf16() else 'no'}, "
            f"oneDNN {_onednn_version()}, {torch.get_num_threads()} threads")
