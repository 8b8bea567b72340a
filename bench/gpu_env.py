"""The machine a GPU check ran on, and its ceilings: what every other figure of ``bench/gpu_check.sh`` is read against.

Versions (Python, torch, CUDA, cuDNN, onnxruntime and its providers, numpy, OpenCV, Pillow), the GPU (name,
compute capability, multiprocessors, memory, driver), the CPU (:func:`aikd.runtime.describe_cpu`), and, where a
CUDA device is present, measured ceilings (CUDA events, median of ``--repeats`` after warm-up, random data):

- ``bf16_tflops``, ``tf32_tflops``, ``fp32_tflops``: an 8192^3 matrix product in bf16, in TF32 and in IEEE float32;
- ``copy_gb_s``: a device-to-device copy of 1 GiB, counting bytes read and written;
- ``h2d_pinned_gb_s``, ``h2d_pageable_gb_s``: host-to-device copies of one scoring batch (256 float32 112x112 faces,
  38.5 MB) from pinned and from ordinary memory.

    python bench/gpu_env.py > env.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any


def versions() -> dict[str, Any]:
    """Versions of everything the figures depend on."""
    import cv2
    import numpy as np
    import PIL
    import torch

    from aikd.runtime import describe_cpu

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": np.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__,
        "cpu": describe_cpu(), "cpus": os.cpu_count(),
    }
    try:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, onnxruntime_providers=ort.get_available_providers())
    except ImportError:
        info.update(onnxruntime=None, onnxruntime_providers=[])
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    driver=_driver())
    return info


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _median_ms(run: Callable[[], None], warmup: int, repeats: int) -> float:
    import torch

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings(repeats: int) -> dict[str, float]:
    """Measured matrix-product rates and copy bandwidths of GPU 0 (see the module docstring)."""
    import torch

    figures = {}
    size = 8192
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                                  ("fp32", torch.float32, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(size, size, device="cuda", dtype=dtype)
            b = torch.randn(size, size, device="cuda", dtype=dtype)
            ms = _median_ms(lambda a=a, b=b: torch.mm(a, b), 3, repeats)
            figures[f"{name}_tflops"] = round(2 * size**3 / ms / 1e9, 1)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    figures["copy_gb_s"] = _copy_gb_s(repeats)
    batch = torch.randn(256, 3, 112, 112)
    device_batch = torch.empty_like(batch, device="cuda")
    for name, host in (("pinned", batch.pin_memory()), ("pageable", batch)):
        ms = _median_ms(lambda host=host: device_batch.copy_(host, non_blocking=True), 3, repeats)
        figures[f"h2d_{name}_gb_s"] = round(batch.numel() * 4 / ms / 1e6, 1)
    return figures


def _copy_gb_s(repeats: int) -> float:
    import torch

    source = torch.empty(2**28, device="cuda").normal_()  # 1 GiB of float32
    target = torch.empty_like(source)
    ms = _median_ms(lambda: target.copy_(source), 3, repeats)
    return round(2 * source.numel() * 4 / ms / 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each ceiling (default: %(default)s)")
    args = parser.parse_args(argv)
    import torch

    result = versions()
    print(json.dumps(result), file=sys.stderr, flush=True)
    if torch.cuda.is_available():
        result["ceilings"] = ceilings(args.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
