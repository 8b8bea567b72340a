"""The local engine and the Ray engine on the same faces, in one run: throughput of each, Ray's start-up and per-image
overhead, the model rate per actor, and the throughput a GPU node would reach.

Both engines score the same ``--images`` generated 112x112 JPEGs with the same model (the registry's ``tiny``,
random weights, calibrated BatchNorm) as whole ``aikd score`` processes (bench/score.py's launcher: wall time):

- ``local``: ``aikd score`` (decode threads, the model in the main process);
- ``ray``: ``aikd score --engine ray`` on a local Ray started by the run (``ray.init`` with this machine's CPUs:
  decode in CPU tasks, the model in CPU actors, half the CPUs; batches back to the driver's journal).

Each engine also scores one image; ``startup_s`` is that run's wall time and ``img_s`` is ``(N - 1) / (wall -
startup)``. Ray's start-up is the difference of the two one-image runs (``ray.init``, worker processes, the model
loaded in an actor); its per-image overhead the difference of the two net times per image. The Ray run prints its
model time per image inside the actors (``per_actor_img_s``). Decoding and preprocessing one face on one core is
timed in this process (``decode_img_s_per_core``).

The projection per GPU node is ``min(GPUs x a GPU's model rate, decode cores x decode_img_s_per_core)``: one actor
per GPU, one core each for the actors and one for the driver, the rest decoding. A GPU's rate comes from
docs/gpu.md (H200, iResNet-100, bf16, ``TorchEngine.run`` on host batches: 10,279 img/s), since this machine has
none; ``--gpu-img-s`` sets another.

    PYTHONPATH=src python bench/ray.py                   # 2,000 faces
    PYTHONPATH=src python bench/ray.py --images 500

This script never imports Ray itself (its file name would stand for the package here): Ray runs in the aikd
processes it starts. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from aikd.runtime import describe_cpu

BENCH = Path(__file__).resolve().parent
SRC = BENCH.parent / "src"
sys.path.insert(0, str(BENCH))
from score import _LAUNCHER, make_faces, read_scores  # noqa: E402  (bench/score.py: launcher, faces, reader)

H200_IMG_S = 10_279  # docs/gpu.md: iResNet-100, bf16, TorchEngine.run on host batches of 256, one H200
NODES = ((1, 8), (4, 32), (8, 64))  # (GPUs, CPU cores) of the nodes projected
_RAY_LINE = re.compile(r"ray: (\d+) images in ([\d.]+) s on (\d+) (\w+) actor\(s\), ([\d.]+|nan) img/s per actor")


def run(command: list[str]) -> tuple[float, str]:
    """Run ``command`` to its end from the launcher; ``(wall seconds, what it printed on stderr)``."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, env=env)
    stderr = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{stderr[-3000:]}")
    wall = float([line for line in stderr.splitlines() if line.startswith("aikd-bench ")][-1].split()[1])
    return wall, stderr


def score_command(folder: Path, checkpoint: Path, out: Path, engine: str, batch_size: int, workers: int
                  ) -> list[str]:
    return [sys.executable, "-m", "aikd", "score", str(folder), "--checkpoint", str(checkpoint), "-o", str(out),
            "--device", "cpu", "--batch-size", str(batch_size), "--workers", str(workers), "--overwrite",
            "--engine", engine]


def decode_rate(folder: Path, seconds: float = 5.0) -> float:
    """Faces decoded and preprocessed (as-is crop, the tiny model's preprocessing) per second on one core."""
    from aikd.images import collect_inputs
    from aikd.models import get_spec
    from aikd.pipeline.crops import CropOptions, FaceCropper
    from aikd.pipeline.decoding import load_prepared
    from aikd.pipeline.faces import FilePreparer

    preprocessing = get_spec("tiny").preprocessing
    prepare = FilePreparer(FaceCropper(CropOptions(), preprocessing), preprocessing, True)
    items, done = list(collect_inputs([folder])), 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        load_prepared(items[done % len(items)], prepare)
        done += 1
    return done / (time.perf_counter() - started)


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    from aikd.models import build_model, calibrate_batchnorm, save_checkpoint

    faces, one = scratch / "faces", scratch / "one"
    make_faces(faces, args.images)
    one.mkdir()
    (one / "00000.jpg").symlink_to(faces / "00000.jpg")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(scratch / "tiny.pt", calibrate_batchnorm(build_model("tiny"), batches=2,
                                                                         batch_size=8, seed=0).eval(), "tiny")
    figures: dict[str, dict] = {}
    run(score_command(one, checkpoint, scratch / "warm.csv", "local", args.batch_size, args.workers))  # page cache
    for engine in ("local", "ray"):
        startup, _ = run(score_command(one, checkpoint, scratch / f"{engine}-1.csv", engine, args.batch_size,
                                       args.workers))
        wall, stderr = run(score_command(faces, checkpoint, scratch / f"{engine}.csv", engine, args.batch_size,
                                         args.workers))
        figures[engine] = {"wall_s": round(wall, 2), "startup_s": round(startup, 2),
                           "img_s": round((args.images - 1) / max(wall - startup, 1e-9), 1)}
        found = _RAY_LINE.search(stderr)
        if found:
            figures[engine].update(actors=int(found.group(3)), per_actor_img_s=float(found.group(5)))
        print(f"{engine}: {json.dumps(figures[engine])} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    local, remote = read_scores(scratch / "local.csv"), read_scores(scratch / "ray.csv")
    keys = sorted(local)
    diff = float(np.abs(np.array([local[k] for k in keys]) - np.array([remote[k] for k in keys])).max())
    net = {e: (figures[e]["wall_s"] - figures[e]["startup_s"]) / (args.images - 1) for e in figures}
    decode = decode_rate(faces)
    extra_startup = figures["ray"]["startup_s"] - figures["local"]["startup_s"]
    return {"local": figures["local"], "ray": figures["ray"], "same_keys": sorted(remote) == keys,
            "max_abs_diff": diff, "ray_startup_s": round(extra_startup, 2),
            "ray_overhead_ms_per_img": round(1000 * (net["ray"] - net["local"]), 3),
            "decode_img_s_per_core": round(decode, 1), "projection": project(decode, args.gpu_img_s)}


def project(decode_per_core: float, gpu_img_s: float) -> list[dict]:
    """Throughput of one node: its GPUs' model rate or its decode cores' rate, whichever is lower."""
    rows = []
    for gpus, cores in NODES:
        model, decoding = gpus * gpu_img_s, max(1, cores - gpus - 1) * decode_per_core
        rows.append({"gpus": gpus, "cores": cores, "model_img_s": round(model), "decode_img_s": round(decoding),
                     "node_img_s": round(min(model, decoding)), "bound": "model" if model <= decoding else "decode"})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="faces scored by each engine (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="faces per batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="local decode threads (default: %(default)s)")
    parser.add_argument("--gpu-img-s", type=float, default=H200_IMG_S,
                        help="one GPU's model rate for the projection (default: docs/gpu.md's H200, %(default)s)")
    args = parser.parse_args(argv)
    print(f"cpu: {describe_cpu()}; load {os.getloadavg()}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="aikd-ray-bench-") as tmp:
        result = {"cpu": describe_cpu(), "images": args.images, "load_before": os.getloadavg(),
                  **measure(args, Path(tmp)), "load_after": os.getloadavg()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
