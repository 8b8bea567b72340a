"""Whole-process scoring speed, start-up and peak memory of ``aikd score`` against the AI-KD paper's own path.

The baseline is what users of the paper already run (``bench/paper_path.py``: the paper's model modules, its
release checkpoint through ``torch.load``, PIL decode, ToTensor, Normalize(0.5, 0.5), eager fp32, batch 32,
no worker threads). Each path runs as its own process, from interpreter start to exit, on the same folder of
face JPEGs and the same weights (an iResNet with random weights, fixed seed, calibrated BatchNorm, saved as
the paper's ``aikd-best.pth`` state dict and as an aikd checkpoint):

- ``paper``: the baseline above;
- ``aikd-fp32``: ``aikd score --aligned`` (the default: BatchNorm folded, channels_last, threaded decode);
- ``aikd-onnxruntime``: ``aikd score --checkpoint best.onnx``, a graph written once by ``aikd export`` (what
  users of onnxruntime run; ``--backend onnxruntime`` would export at every start);
- ``aikd-bf16``: ``--precision bf16`` (only where the CPU has native bf16, or when named with ``--paths``).

Per path and repeat: the wall time on the whole folder, on 16 images and on one image (``startup_s``: a
process that scores one face is start-up plus one forward), and the peak RSS of the process (``wait4``'s
``ru_maxrss``). Paths run interleaved; each figure is a median over repeats, each ratio the median of the
per-repeat ratios against the paper path in the same repeat (machines here are shared and noisy).
``gflops`` is the achieved model arithmetic per second on the whole folder net of start-up
(``(images - 1) x GFLOP/face / (wall - startup)``), beside ``matmul_peak_gflops`` (a 2048x2048 fp32 matmul,
measured at the start and the end of the same run; the better of the two). Scores are compared with the paper
path's: max abs difference and Spearman.

    PYTHONPATH=src python bench/score.py                     # iResNet-100, batch 32, 128 images, 3 repeats
    PYTHONPATH=src python bench/score.py --arch r50 --images 64 --paths aikd-fp32

The last line printed is one JSON object: ``paper_img_s``, ``paper_startup_s``, ``paper_peak_rss_mb``,
``matmul_peak_gflops``, and per path under ``paths``: ``img_s``, ``ratio_vs_paper``, ``startup_s``,
``wall_16_s``, ``peak_rss_mb``, ``gflops``, ``spearman``, ``max_abs_diff``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aikd.evaluation.metrics import spearman
from aikd.io import read_labels
from aikd.models import build_model, calibrate_batchnorm, get_spec, save_checkpoint
from aikd.models.registry import describe
from aikd.runtime import cpu_has_bf16, describe_cpu

BENCH = Path(__file__).resolve().parent
SRC = BENCH.parent / "src"
AIKD_PATHS = {  # extra arguments of aikd score; "{onnx}": the exported graph in place of the checkpoint
    "aikd-fp32": [],
    "aikd-onnxruntime": ["{onnx}"],
    "aikd-bf16": ["--precision", "bf16"],
}
SMALL_SET = 16


def make_faces(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` smooth random 112x112 RGB JPEGs (upsampled noise: JPEG and the model see structure)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        Image.fromarray(small).resize((112, 112), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


def subset(folder: Path, count: int, into: Path) -> Path:
    """A folder of links to the first ``count`` faces of ``folder``."""
    into.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir())[:count]:
        (into / path.name).symlink_to(path)
    return into


def matmul_peak_gflops(size: int = 2048, repeats: int = 7) -> float:
    """fp32 matmul GFLOP/s on this machine now (median of ``repeats``): the ceiling of fp32 conv arithmetic."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


# Each measured process is started by a small launcher interpreter (about 10 MB), not by this one: on Linux a
# child's ru_maxrss starts at its parent's high-water mark (exec folds the forked memory's peak in), so a process
# started from this bench would report the bench's own memory. The launcher times its child and reports both.
_LAUNCHER = ("import os, subprocess, sys, time; start = time.perf_counter(); child = subprocess.Popen(sys.argv[1:]); "
             "_, status, usage = os.wait4(child.pid, 0); wall = time.perf_counter() - start; "
             "print(f'aikd-bench {wall} {usage.ru_maxrss}', file=sys.stderr); "
             "sys.exit(os.waitstatus_to_exitcode(status))")


def run_process(command: list[str], ok: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Run ``command`` to its end; ``(wall seconds, peak RSS in MB)`` of that process alone. An exit status not in
    ``ok`` stops the bench (``(0, 1)``: some inputs may fail, as aikd detect's on faces no detector finds)."""
    wall, peak_mb, _ = run_process_output(command, ok)
    return wall, peak_mb


def run_process_output(command: list[str], ok: tuple[int, ...] = (0,)) -> tuple[float, float, str]:
    """:func:`run_process`, and what the process printed on stdout."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, env=env)
    if done.returncode not in ok:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr.decode()[-2000:]}"
                         f"{done.stdout.decode()[-500:]}")
    _, wall, peak_kb = done.stderr.decode().strip().splitlines()[-1].split()
    return float(wall), int(peak_kb) / 1024, done.stdout.decode()  # kB on Linux


def read_scores(path: Path) -> dict[str, float]:
    """File name -> quality of a score file (aikd's reader: every format aikd writes)."""
    return {Path(key).name: quality for key, quality in read_labels(path).as_dict().items()}


class Paths:
    """The commands of every path, for a folder and an output file."""

    def __init__(self, arch: str, batch_size: int, workers: int, paper_checkpoint: Path, checkpoint: Path,
                 onnx: Path | None):
        blocks = ",".join(str(n) for n in get_spec(arch).layers)
        self.paper = lambda folder, out: [sys.executable, str(BENCH / "paper_path.py"), str(folder),
                                          str(paper_checkpoint), str(out), "--arch-blocks", blocks,
                                          "--batch-size", str(batch_size)]

        def aikd(extra: list[str]):
            model = str(onnx) if "{onnx}" in extra else str(checkpoint)
            extra = [arg for arg in extra if arg != "{onnx}"]
            return lambda folder, out: [
                sys.executable, "-m", "aikd", "score", str(folder), "--checkpoint", model, "--aligned",
                "--batch-size", str(batch_size), "--workers", str(workers), "--overwrite", "-o", str(out), *extra]

        self.aikd = aikd

    def command(self, name: str):
        return self.paper if name == "paper" else self.aikd(AIKD_PATHS[name])


def measure(args: argparse.Namespace, names: list[str]) -> dict:
    peak = matmul_peak_gflops()
    print(f"matmul fp32 2048x2048: {peak:.0f} GFLOP/s", file=sys.stderr, flush=True)
    result = run_paths(args, names)
    peak = max(peak, matmul_peak_gflops())  # again at the end: the quieter of the two is nearer the ceiling
    print(f"matmul fp32 2048x2048 at the end: best {peak:.0f} GFLOP/s", file=sys.stderr, flush=True)
    return {**result, "matmul_peak_gflops": round(peak, 1)}


def run_paths(args: argparse.Namespace, names: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="aikd-bench-") as tmp:
        scratch = Path(tmp)
        faces = scratch / "faces"
        make_faces(faces, args.images, args.seed)
        sets = {"all": faces, "small": subset(faces, SMALL_SET, scratch / "small"),
                "one": subset(faces, 1, scratch / "one")}
        torch.manual_seed(args.seed)
        model = calibrate_batchnorm(build_model(args.arch), batches=2, batch_size=8, seed=args.seed).eval()
        paper_checkpoint = scratch / "aikd-best.pth"
        torch.save(model.state_dict(), paper_checkpoint)
        checkpoint = save_checkpoint(scratch / "best.pt", model, args.arch)
        del model
        onnx = None
        if "aikd-onnxruntime" in names:
            onnx = scratch / "best.onnx"
            run_process([sys.executable, "-m", "aikd", "export", "--checkpoint", str(checkpoint), "-o", str(onnx)])
        paths = Paths(args.arch, args.batch_size, args.workers, paper_checkpoint, checkpoint, onnx)
        order = ["paper", *names]
        figures: dict[str, dict[str, list[float]]] = {n: {"all": [], "small": [], "one": [], "rss": []}
                                                      for n in order}
        scores: dict[str, dict[str, float]] = {}
        run_process(paths.command("paper")(sets["one"], scratch / "warm.csv"))  # page cache, .pyc files
        for repeat in range(args.repeats):
            for name in order:
                for which in ("one", "small", "all"):
                    out = scratch / f"{name}-{which}.csv"
                    wall, rss = run_process(paths.command(name)(sets[which], out))
                    figures[name][which].append(wall)
                    if which == "all":
                        figures[name]["rss"].append(rss)
                        scores.setdefault(name, read_scores(out))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{n} {args.images / f['all'][-1]:.2f} img/s ({f['one'][-1]:.1f} s start-up)"
                for n, f in figures.items()), file=sys.stderr, flush=True)
    return summarise(args, order, figures, scores)


def summarise(args: argparse.Namespace, order: list[str], figures: dict, scores: dict) -> dict:
    gflop_per_face = describe(args.arch)["gflops"]
    keys = sorted(scores["paper"])
    reference = np.array([scores["paper"][k] for k in keys])
    paths = {}
    for name in order:
        f = figures[name]
        startup = statistics.median(f["one"])
        net = [max(a - o, 1e-9) for a, o in zip(f["all"], f["one"], strict=True)]
        values = np.array([scores[name][k] for k in keys])
        paths[name] = {
            "img_s": round(args.images / statistics.median(f["all"]), 3),
            "ratio_vs_paper": round(statistics.median(
                p / a for p, a in zip(figures["paper"]["all"], f["all"], strict=True)), 3),
            "startup_s": round(startup, 2),
            "wall_16_s": round(statistics.median(f["small"]), 2),
            "ratio_16_vs_paper": round(statistics.median(
                p / a for p, a in zip(figures["paper"]["small"], f["small"], strict=True)), 3),
            "peak_rss_mb": round(statistics.median(f["rss"])),
            "gflops": round((args.images - 1) * gflop_per_face / statistics.median(net), 1),
            "spearman": round(spearman(values, reference), 6),
            "max_abs_diff": float(np.abs(values - reference).max()),
        }
    paper = paths.pop("paper")
    return {
        "arch": args.arch, "gflop_per_face": round(gflop_per_face, 2), "batch_size": args.batch_size,
        "images": args.images, "repeats": args.repeats, "workers": args.workers,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cpu": describe_cpu(),
        "paper_img_s": paper["img_s"], "paper_startup_s": paper["startup_s"], "paper_wall_16_s": paper["wall_16_s"],
        "paper_peak_rss_mb": paper["peak_rss_mb"], "paper_gflops": paper["gflops"], "paths": paths,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r100", help="registered iResNet (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="faces per forward (default: %(default)s)")
    parser.add_argument("--images", type=int, default=128, help="faces scored per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="aikd's decode threads (default: %(default)s)")
    parser.add_argument("--paths", help=f"comma-separated subset of {', '.join(AIKD_PATHS)} (default: all, bf16 "
                        "only with native CPU support)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and images (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.images < SMALL_SET:
        parser.error(f"--images must be at least {SMALL_SET}")
    names = args.paths.split(",") if args.paths else [n for n in AIKD_PATHS if n != "aikd-bf16" or cpu_has_bf16()]
    unknown = sorted(set(names) - set(AIKD_PATHS))
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(AIKD_PATHS)}")
    print(f"cpu: {describe_cpu()}", flush=True)
    result = measure(args, names)
    print(f"{'paper':18s} {result['paper_img_s']:7.2f} img/s  start-up {result['paper_startup_s']:.2f} s  "
          f"peak {result['paper_peak_rss_mb']} MB", file=sys.stderr)
    for name, f in result["paths"].items():
        print(f"{name:18s} {f['img_s']:7.2f} img/s  {f['ratio_vs_paper']:5.2f}x paper  "
              f"start-up {f['startup_s']:.2f} s  16 images {f['ratio_16_vs_paper']:.2f}x  "
              f"peak {f['peak_rss_mb']} MB  {f['gflops']} GFLOP/s  spearman {f['spearman']:.5f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
