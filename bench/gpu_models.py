"""Model-only scoring speed on a GPU: iResNet-100 + quality head on batches already on the device.

This is the GPU's share of ``aikd score``: no decoding, no copies, the forward pass alone, as
:class:`aikd.inference.engine.TorchEngine` runs it (BatchNorm folded, channels_last, autocast over the trunk with
the embedding layer and head in float32, cuDNN autotuning and IEEE float32 as ``aikd score`` sets them,
:func:`aikd.runtime.use_fastest_convolutions`), next to the paper's model as its code runs it (BatchNorm not
folded, NCHW, float32 with torch's default TF32 convolutions, no autotuning). Variants:

- ``paper-fp32-b32``: the paper's model at its batch of 32;
- ``aikd-{fp32,fp32-tf32,bf16,fp16}-bN``: aikd's model at batch N (``--batch``, the paper's 32, a larger one;
  ``fp32-tf32``: float32 with TF32 convolutions allowed, what ``--precision fp32`` would run without aikd's
  setting);
- ``...-nchw``: the same without channels_last; ``...-graph``: the forward captured once as a CUDA graph and
  replayed (no launch overhead); ``...-compiled``: ``torch.compile`` (``--compile``); ``first_call_s`` is each
  variant's first pass (autotuning, capture, compilation);
- ``aikd-bf16-b256-roundtrip``: :meth:`TorchEngine.run` on a host batch: the pinned copy, the transfer and the
  results' way back included (what the file pipeline's main thread waits for per batch).

Weights are random with calibrated BatchNorm (NOTES.md). Each variant: warm-up passes (cuDNN autotuning,
graph capture), then ``--repeats`` timed passes (CUDA events), median. Qualities of one fixed batch of 512 inputs
are compared with ``aikd-fp32`` (Spearman, max abs difference).

    PYTHONPATH=src python bench/gpu_models.py                       # r100 on cuda
    PYTHONPATH=src python bench/gpu_models.py --device cpu --arch tiny --batch 16 --small-batch 8 --large-batch 32

The last line printed is one JSON object: ``arch``, ``gflop_per_face``, ``device`` and ``variants``
(name -> ``img_s``, ``ms_per_batch``, ``tflops``, ``batch``, ``spearman_vs_fp32``, ``max_abs_diff_vs_fp32``...);
after each variant a line with ``"partial": true`` and the variants so far.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from aikd.evaluation.metrics import spearman
from aikd.inference.engine import InferenceOptions
from aikd.models import build_model, calibrate_batchnorm
from aikd.models.forward import quality_forward
from aikd.models.registry import describe
from aikd.runtime import autocast_dtype, use_fastest_convolutions

FIXED_FACES = 512


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    batch: int
    channels_last: bool = True
    tf32: bool = False
    graph: bool = False
    compiled: bool = False
    paper: bool = False


def variants(batch: int, small: int, large: int, device: torch.device, compile_too: bool) -> list[Variant]:
    """The variants of the module docstring: every precision at ``batch``, the low ones at the paper's ``small``
    batch, bf16 at ``large``, and bf16 at ``batch`` as NCHW, as a CUDA graph and compiled (graphs, fp16 and TF32 only
    on a GPU)."""
    cuda = device.type == "cuda"
    low = ("bf16", "fp16") if cuda else ("bf16",)
    chosen = [Variant("paper-fp32-b32", "fp32", 32, channels_last=False, tf32=True, paper=True)]
    chosen += [Variant(f"aikd-{p}-b{batch}", p, batch) for p in ("fp32", *low)]
    chosen += [Variant(f"aikd-{p}-b{small}", p, small) for p in low]
    chosen.append(Variant(f"aikd-bf16-b{large}", "bf16", large))
    if cuda:
        chosen.append(Variant(f"aikd-fp32-tf32-b{batch}", "fp32", batch, tf32=True))
        chosen += [Variant(f"aikd-bf16-b{b}-graph", "bf16", b, graph=True) for b in (batch, small)]
    chosen.append(Variant(f"aikd-bf16-b{batch}-nchw", "bf16", batch, channels_last=False))
    if compile_too:
        chosen.append(Variant(f"aikd-bf16-b{batch}-compiled", "bf16", batch, compiled=True))
    return chosen


@contextlib.contextmanager
def cudnn_settings(benchmark: bool, tf32: bool) -> Iterator[None]:
    """cuDNN's autotuning and TF32 switches for one variant, put back afterwards."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = benchmark, tf32
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved


def timed_ms(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``run`` (CUDA events on a GPU, the wall clock on the CPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def forward_fn(variant: Variant, model: torch.nn.Module, inputs: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward pass of ``variant`` on ``inputs`` -> qualities (float32); graphs are captured here."""
    device = inputs.device
    if variant.paper:
        return lambda: model(inputs)[1]
    amp = autocast_dtype(variant.precision, device)

    def run() -> torch.Tensor:
        return quality_forward(model, inputs, amp, regions="trunk")[1]

    if variant.compiled:
        return torch.compile(run)  # compiled at the first call (the warm-up)
    if not variant.graph:
        return run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # autotuning and lazy initialisation before capture
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()

    def replay() -> torch.Tensor:
        graph.replay()
        return captured

    return replay


def measure(variant: Variant, models: dict[str, torch.nn.Module], fixed: torch.Tensor, repeats: int,
            gflop: float) -> dict:
    """Throughput of one variant and its qualities of the fixed faces."""
    device = fixed.device
    model = models["paper" if variant.paper else "nchw" if not variant.channels_last else "aikd"]
    layout = torch.channels_last if variant.channels_last else torch.contiguous_format
    inputs = torch.rand(variant.batch, 3, 112, 112, device=device).mul_(2).sub_(1).contiguous(memory_format=layout)
    with cudnn_settings(benchmark=not variant.paper, tf32=variant.tf32), torch.inference_mode():
        started = time.perf_counter()
        run = forward_fn(variant, model, inputs)
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_call_s = round(time.perf_counter() - started, 2)  # autotuning, graph capture, compilation
        for _ in range(2):
            run()
        ms = timed_ms(run, device, repeats)
        qualities = []
        for start in range(0, len(fixed), variant.batch):  # eager passes: graphs hold one input buffer
            chunk = fixed[start:start + variant.batch].contiguous(memory_format=layout)
            if variant.paper:
                qualities.append(model(chunk)[1].float().cpu())
            else:
                amp = autocast_dtype(variant.precision, device)
                qualities.append(quality_forward(model, chunk, amp, regions="trunk")[1].cpu())
    rate = variant.batch / ms * 1000
    result = {"img_s": round(rate, 1), "ms_per_batch": round(ms, 3), "tflops": round(rate * gflop / 1000, 2),
              "batch": variant.batch, "precision": variant.precision, "channels_last": variant.channels_last,
              "tf32": variant.tf32, "graph": variant.graph, "first_call_s": first_call_s,
              "qualities": torch.cat(qualities).numpy()}
    return result


def roundtrip(model: torch.nn.Module, device: torch.device, batch: int, repeats: int) -> dict:
    """:meth:`TorchEngine.run` on a host batch (pinned copy, transfer, forward, results back), bf16."""
    engine = InferenceOptions(device=str(device), precision="bf16").engine(model)
    faces = np.random.default_rng(1).uniform(-1, 1, (batch, 112, 112, 3)).astype(np.float32)
    for _ in range(3):
        engine.run(faces)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.run(faces)
        times.append((time.perf_counter() - started) * 1000)
    ms = statistics.median(times)
    return {"img_s": round(batch / ms * 1000, 1), "ms_per_batch": round(ms, 3), "batch": batch, "precision": "bf16"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r100", help="registered iResNet (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256, help="aikd's main batch size (default: %(default)s)")
    parser.add_argument("--small-batch", type=int, default=32, help="the paper's batch size (default: %(default)s)")
    parser.add_argument("--large-batch", type=int, default=512, help="a larger one, bf16 (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per variant (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (bf16, largest batch)")
    parser.add_argument("--only-compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    use_fastest_convolutions()  # as aikd score: autotuning, IEEE float32
    torch.manual_seed(0)
    paper = calibrate_batchnorm(build_model(args.arch), batches=2, batch_size=16).eval().to(device)
    engine = InferenceOptions(device=str(device)).engine(paper)  # folded, channels_last
    nchw = copy.deepcopy(engine.model).to(memory_format=torch.contiguous_format)
    models = {"paper": paper, "aikd": engine.model, "nchw": nchw}
    gflop = describe(args.arch)["gflops"]
    fixed = torch.rand(FIXED_FACES, 3, 112, 112, generator=torch.Generator().manual_seed(2)).mul_(2).sub_(1).to(device)
    chosen = variants(args.batch, args.small_batch, args.large_batch, device, args.compile or args.only_compile)
    if args.only_compile:
        chosen = [v for v in chosen if v.compiled or v.name == f"aikd-fp32-b{args.batch}"]
    results = {}
    for variant in chosen:
        try:
            results[variant.name] = measure(variant, models, fixed, args.repeats, gflop)
        except Exception as err:  # one failing variant must not lose the others' figures
            results[variant.name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        shown = {k: v for k, v in results[variant.name].items() if k != "qualities"}
        print(f"{variant.name:28s} {json.dumps(shown)}", file=sys.stderr, flush=True)
        partial = {name: {k: v for k, v in r.items() if k != "qualities"} for name, r in results.items()}
        print(json.dumps({"arch": args.arch, "device": str(device), "partial": True, "variants": partial}),
              flush=True)  # a run cut short keeps what it measured
    reference = next((r["qualities"] for n, r in results.items() if n.startswith("aikd-fp32-b") and "qualities" in r
                      and "tf32" not in n), None)
    for result in results.values():
        qualities = result.pop("qualities", None)
        if qualities is not None and reference is not None:
            result["spearman_vs_fp32"] = round(spearman(qualities, reference), 6)
            result["max_abs_diff_vs_fp32"] = float(np.abs(qualities - reference).max())
            result["finite"] = bool(np.isfinite(qualities).all())
    if not args.only_compile:
        try:
            results[f"aikd-bf16-b{args.batch}-roundtrip"] = roundtrip(paper, device, args.batch, args.repeats)
        except Exception as err:  # as above
            results[f"aikd-bf16-b{args.batch}-roundtrip"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    print(json.dumps({"arch": args.arch, "gflop_per_face": round(gflop, 2), "device": str(device),
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                      "variants": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
