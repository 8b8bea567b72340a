"""Forward speed of every registered face-recognition model, the way ``aikd embed`` runs it, for planning runs.

Each model gets seeded random weights with calibrated BatchNorm (NOTES.md), then runs through
:class:`aikd.inference.engine.Engine` as ``aikd embed`` does (eval mode, BatchNorm folded where the architecture
allows, channels_last, fp32 unless ``--precision``) on batches of preprocessed 112x112 inputs; decoding and
alignment are not included. One warm-up batch, then ``--repeats`` timed batches; the figure is the median.

    PYTHONPATH=src python bench/models.py                              # every model, batch 16, 3 repeats
    PYTHONPATH=src python bench/models.py --models r100 adaface-ir101 swinface transface-l --batch 32

The first line printed describes the CPU; the last line is one JSON object: ``{"models": {name: {"img_s",
"ms_per_img", "gflops", "parameters"}}, "batch", "precision", "device"}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from aikd.inference.engine import InferenceOptions
from aikd.models import build_backbone, calibrate_batchnorm, get_spec, list_models
from aikd.models.registry import describe
from aikd.runtime import describe_cpu


def measure(name: str, batch: int, repeats: int, precision: str, device: str) -> dict:
    """img/s of one model through the inference engine (median over ``repeats`` batches after a warm-up)."""
    spec = get_spec(name)
    torch.manual_seed(0)
    backbone = calibrate_batchnorm(build_backbone(name), batches=2, batch_size=8).eval()
    options = InferenceOptions(device=str(device), precision=precision)
    engine = options.engine(backbone, preprocessing=spec.preprocessing)
    images = np.random.default_rng(0).integers(0, 256, (batch, *spec.preprocessing.input_size, 3), dtype=np.uint8)
    inputs = np.stack([engine.prepare(image) for image in images])
    engine(inputs)  # warm-up: oneDNN primitive creation, border caches of folded blocks
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        embeddings, _ = engine(inputs)
        seconds.append(time.perf_counter() - start)
    if not np.isfinite(embeddings).all():
        raise RuntimeError(f"{name}: non-finite embeddings")
    rate = batch / statistics.median(seconds)
    info = describe(name)
    return {"img_s": round(rate, 2), "ms_per_img": round(1000 / rate, 1), "gflops": round(info["gflops"], 2),
            "parameters": info["parameters"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help="registered names (default: all)")
    parser.add_argument("--batch", type=int, default=16, help="faces per forward pass (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per model (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.repeats < 1:
        parser.error("--batch must be at least 2 (BatchNorm calibration) and --repeats at least 1")
    names = args.models or list_models()
    for name in names:
        get_spec(name)  # unknown names fail before any work
    print(f"cpu: {describe_cpu()}", flush=True)
    results = {}
    for name in names:
        result = measure(name, args.batch, args.repeats, args.precision, args.device)
        results[name] = result
        print(f"{name:<21} {result['img_s']:8.2f} img/s  {result['ms_per_img']:8.1f} ms/img  "
              f"{result['gflops']:6.2f} GFLOPs  {result['parameters'] / 1e6:7.2f} M params", flush=True)
    print(json.dumps({"models": results, "batch": args.batch, "precision": args.precision, "device": args.device}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
