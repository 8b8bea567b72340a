"""FNM-EDC over a billion comparisons on a GPU machine: aikd's CPU path, and what the GPU would take off it.

``aikd evaluate`` computes its curves in numpy (:mod:`aikd.evaluation.metrics` must not import torch), on the CPU
whatever the machine has. This measures that path on the machine's cores for an all-vs-all protocol of
``--comparisons`` (``bench/evaluate.py``'s synthetic protocol, in its own process: time and peak memory), and, where
a CUDA device is present, the part a GPU could take over: every similarity of the same protocol computed as
float32 matrix products on the device in row blocks, and the ones above a threshold counted (one pass over all
comparisons, no curve), so the two can be set side by side.

    PYTHONPATH=src python bench/gpu_evaluate.py                      # 1e8, then 1e9 comparisons
    PYTHONPATH=src python bench/gpu_evaluate.py --comparisons 1e6    # dry run

After each size one JSON line: ``comparisons``, ``images``, ``cpu_seconds``, ``cpu_peak_rss_mb``, ``cpu_threads``
and, with a GPU, ``gpu_similarity_seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def cpu_path(comparisons: float) -> dict:
    """``bench/evaluate.py`` at one size, in its own process."""
    done = subprocess.run([sys.executable, str(BENCH / "evaluate.py"), "--sizes", str(comparisons)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench/evaluate.py failed ({done.returncode}):\n{done.stderr[-2000:]}")
    print(done.stdout.strip(), file=sys.stderr, flush=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"comparisons": result["comparisons"], "cpu_seconds": result["seconds"],
            "cpu_peak_rss_mb": result["peak_rss_mb"]}


def gpu_similarities(images: int, dim: int = 512, rows: int = 4096) -> float:
    """Seconds to compute every pairwise cosine similarity of ``images`` random embeddings on the GPU (float32
    matrix products in blocks of ``rows``) and count those above 0.3: the arithmetic of one all-vs-all pass."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE float32, as numpy computes
    try:
        embeddings = torch.nn.functional.normalize(torch.randn(images, dim, device="cuda"), dim=1)
        total = torch.zeros((), dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, images, rows):
            block = embeddings[start:start + rows] @ embeddings[start:].T
            upper = torch.ones_like(block, dtype=torch.bool).triu_(1)
            total += ((block > 0.3) & upper).sum()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        print(f"GPU: {images * (images - 1) // 2:,d} similarities, {int(total):,d} above 0.3, in {seconds:.2f} s",
              file=sys.stderr, flush=True)
        return seconds
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comparisons", type=float, nargs="+", default=[1e8, 1e9],
                        help="all-vs-all sizes, smallest first (default: 1e8 1e9); a JSON line follows each")
    args = parser.parse_args(argv)
    gpu_seconds = {}
    import torch

    if torch.cuda.is_available():  # first: seconds, and not lost if the CPU path runs out of time
        gpu_similarities(4096)  # warm-up: context, cuBLAS handles
        gpu_seconds = {size: round(gpu_similarities(images_for(size)), 3) for size in args.comparisons}
    for size in sorted(args.comparisons):
        result = {"images": images_for(size), "cpu_threads": os.cpu_count(), **cpu_path(size)}
        if size in gpu_seconds:
            result["gpu_similarity_seconds"] = gpu_seconds[size]
        print(json.dumps(result), flush=True)
    return 0


def images_for(comparisons: float) -> int:
    """The fewest images whose all-vs-all protocol has ``comparisons`` pairs."""
    return math.ceil((1 + math.sqrt(1 + 8 * comparisons)) / 2)


if __name__ == "__main__":
    sys.exit(main())
