"""Time and peak memory of the EDC computation on synthetic all-vs-all protocols.

    python bench/evaluate.py                      # 1e6, 1e7 and 1e8 comparisons
    python bench/evaluate.py --sizes 1e6 1e7      # smaller ones only

Each size runs in a fresh subprocess, so the peak resident memory (``ru_maxrss``) is that size's own. A
size of ``P`` comparisons uses the smallest ``N`` images with ``N (N - 1) / 2 >= P``, grouped into identities
of ``--images-per-identity`` images, with 512-D embeddings whose noise grows as the synthetic quality falls.
The timed part is :func:`aikd.evaluation.metrics.evaluate_all_vs_all` (both threshold conventions, FMR 1e-4, 1e-3 and
1e-2, one quality method), not the making of the synthetic data. The last line printed is one JSON object
with ``comparisons``, ``seconds`` and ``peak_rss_mb`` for the largest size.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:
    from aikd.evaluation import metrics as ev
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from aikd.evaluation import metrics as ev


def synthetic_protocol(n_comparisons: int, dim: int, per_identity: int, seed: int = 0):
    """Embeddings, identities and qualities for an all-vs-all protocol of at least ``n_comparisons``."""
    n_images = math.ceil((1 + math.sqrt(1 + 8 * n_comparisons)) / 2)
    rng = np.random.default_rng(seed)
    identity = np.arange(n_images) // per_identity
    quality = rng.random(n_images).astype(np.float64)
    centres = rng.standard_normal((identity[-1] + 1, dim), dtype=np.float32)
    embeddings = centres[identity]
    noise = rng.standard_normal((n_images, dim), dtype=np.float32)
    embeddings += noise * (0.6 + 1.2 * (1 - quality))[:, None].astype(np.float32)
    return embeddings.astype(np.float32), identity, quality


def run_one(n_comparisons: int, dim: int, per_identity: int) -> dict:
    embeddings, identity, quality = synthetic_protocol(n_comparisons, dim, per_identity)
    start = time.perf_counter()
    curves = ev.evaluate_all_vs_all(embeddings, identity, {"synthetic": quality}, fmrs=ev.STANDARD_FMRS)
    seconds = time.perf_counter() - start
    n = len(embeddings)
    fixed, recomputed = curves["synthetic", 1e-3, "fixed"], curves["synthetic", 1e-3, "recomputed"]
    return {
        "comparisons": n * (n - 1) // 2,
        "images": n,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fnmr_at_1e-3": round(fixed.fnmr0, 4),
        "pauc_normalised_fixed_0.3": round(ev.normalised_pauc(fixed, 0.3), 4),
        "pauc_normalised_recomputed_0.3": round(ev.normalised_pauc(recomputed, 0.3), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8], help="comparisons per run")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--images-per-identity", type=int, default=8)
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child: run one size, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(int(args.one), args.dim, args.images_per_identity)))
        return 0
    from aikd.runtime import describe_cpu  # here only: the children measured below import numpy alone

    print(f"cpu: {describe_cpu()}", flush=True)
    result = None
    for size in sorted(args.sizes):
        child = subprocess.run(
            [sys.executable, __file__, "--one", str(size), "--dim", str(args.dim),
             "--images-per-identity", str(args.images_per_identity)],
            capture_output=True, text=True, check=False,
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{result['comparisons']:>12,d} comparisons ({result['images']} images): "
              f"{result['seconds']:8.2f} s, peak RSS {result['peak_rss_mb']:8.1f} MB", flush=True)
    print(json.dumps({key: result[key] for key in ("comparisons", "seconds", "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
