"""Whole-process scoring speed on a GPU: ``aikd score`` against the AI-KD paper's own path, on the same GPU.

The baseline is ``bench/paper_path.py --device cuda``: the paper's code shape (PIL decode, ToTensor and Normalize in
the main thread, batch 32, eager float32 with torch's default cuDNN settings, ``.cuda()`` per batch). Each path runs
as its own process, from interpreter start to exit, on the same folder of face JPEGs (``bench/gpu_faces.py``:
degraded real faces, each moved and compressed differently, 112x112) and the same weights (an iResNet with random
weights, fixed seed, calibrated BatchNorm, saved as the paper's state dict and as an aikd checkpoint):

- ``paper``: the baseline; its own JSON line says how its loop time splits into decoding and the model;
- ``aikd-fp32``, ``aikd-bf16``, ``aikd-fp16``: ``aikd score --aligned --device cuda --precision P`` with
  ``--workers`` decode threads and ``--batch-size`` faces per forward pass;
- ``aikd-bf16-wW-bB``: the same with other worker counts and batch sizes (``--variants``).

Each path runs on the whole folder and on its first ``--small`` images: ``img_s`` is the whole folder over the whole
process, ``net_img_s`` the rate once started (``(images - small) / (wall - wall_small)``) and ``startup_s`` the
rest. Before the processes, the CPU side of aikd's pipeline is measured in this process on the same files
(:func:`aikd.pipeline.jobs.run_job` with ``--workers`` threads and no model): ``decode_img_s`` (decoding only) and
``prepare_img_s`` (decoding and preprocessing, what feeds the model): the most ``aikd score`` could reach with an
infinitely fast GPU. Qualities are compared with the paper path's and with ``aikd-fp32`` (Spearman, max abs
difference).

    PYTHONPATH=src python bench/gpu_score.py --json score.json                     # r100, 16384 faces, cuda
    PYTHONPATH=src python bench/gpu_score.py --device cpu --arch tiny --images 64 --small 16 --paths paper,fp32

``--json`` is rewritten after every path, so a run cut short keeps what it measured; the last line printed is the
same JSON object: the settings, ``decode_img_s``, ``prepare_img_s`` and per path under ``paths``: ``img_s``,
``net_img_s``, ``startup_s``, ``ratio_vs_paper``, ``net_ratio_vs_paper``, ``peak_rss_mb``, ``spearman_vs_paper``,
``max_abs_diff_vs_paper``, ``spearman_vs_fp32``, and the paper's ``decode_s`` and ``model_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gpu_faces import write_jpegs  # a neighbour: bench/ is on the path when a script of it runs
from score import BENCH, read_scores, run_process_output, subset

from aikd.evaluation.metrics import spearman
from aikd.images import collect_inputs
from aikd.models import build_model, calibrate_batchnorm, get_spec, save_checkpoint
from aikd.pipeline.jobs import ItemResult, run_job
from aikd.preprocessing import Preprocessing

Command = Callable[[Path, Path], list[str]]  # (folder, output) -> the command line of one path


def pipeline_rates(folder: Path, workers: int, batch_size: int, scratch: Path) -> dict[str, float]:
    """img/s of aikd's file pipeline without a model: decoding only, and decoding + preprocessing."""
    items = collect_inputs([folder])
    preprocessing = Preprocessing()
    rates = {}
    run_job(items[:batch_size], lambda batch, batch_items: [ItemResult(rows=[[0.0]]) for _ in batch],
            scratch / "warm-up.csv", batch_size=batch_size, workers=workers, desc="warm-up")  # threads, caches
    normalise = lambda image, item: preprocessing.normalise(image)  # noqa: E731 - what ScoreTask.prepare does here
    for name, prepare in (("decode_img_s", None), ("prepare_img_s", normalise)):
        output = scratch / f"{name}.csv"
        started = time.perf_counter()
        run_job(items, lambda batch, batch_items: [ItemResult(rows=[[0.0]]) for _ in batch], output,
                batch_size=batch_size, workers=workers, prepare=prepare, desc=name)
        rates[name] = round(len(items) / (time.perf_counter() - started), 1)
    return rates


def make_weights(arch: str, device: str, scratch: Path, seed: int) -> tuple[Path, Path]:
    """The same random, BatchNorm-calibrated weights as the paper's state dict and as an aikd checkpoint."""
    torch.manual_seed(seed)
    model = build_model(arch).to(device)
    model = calibrate_batchnorm(model, batches=2, batch_size=16, seed=seed).eval().cpu()
    paper = scratch / "aikd-best.pth"
    torch.save(model.state_dict(), paper)
    return paper, save_checkpoint(scratch / "best.pt", model, arch)


def commands(args: argparse.Namespace, paper: Path, checkpoint: Path) -> dict[str, Command]:
    """name -> (folder, output) -> command line of every path."""
    blocks = ",".join(str(n) for n in get_spec(args.arch).layers)
    made = {"paper": lambda folder, out: [sys.executable, str(BENCH / "paper_path.py"), str(folder), str(paper),
                                          str(out), "--arch-blocks", blocks, "--batch-size", "32",
                                          "--device", args.device]}

    def aikd(precision: str, workers: int, batch: int):
        return lambda folder, out: [sys.executable, "-m", "aikd", "score", str(folder), "--checkpoint",
                                    str(checkpoint), "--aligned", "--device", args.device, "--precision", precision,
                                    "--workers", str(workers), "--batch-size", str(batch), "--overwrite", "-o",
                                    str(out)]

    for precision in args.paths.split(","):
        if precision != "paper":
            made[f"aikd-{precision}"] = aikd(precision, args.workers, args.batch_size)
    for variant in filter(None, (args.variants or "").split(",")):
        precision, workers, batch = variant.split(":")
        made[f"aikd-{precision}-w{workers}-b{batch}"] = aikd(precision, int(workers), int(batch))
    return made


def compare(scores: dict[str, float], reference: dict[str, float] | None) -> tuple[float | None, float | None]:
    if not reference:
        return None, None
    keys = sorted(reference)
    ours, theirs = np.array([scores[k] for k in keys]), np.array([reference[k] for k in keys])
    return round(spearman(ours, theirs), 6), float(np.abs(ours - theirs).max())


def run_path(name: str, command: Command, sets: dict[str, Path], scratch: Path) -> tuple[dict, dict[str, float]]:
    """Figures of one path (small set, then the whole folder) and its qualities of the whole folder."""
    small_wall, _, _ = run_process_output(command(sets["small"], scratch / f"{name}-small.csv"))
    started_at = time.time()  # the whole folder's run, for the GPU utilisation samples of that window
    wall, rss, stdout = run_process_output(command(sets["all"], scratch / f"{name}.csv"))
    ended_at = time.time()
    images, small = (len(list(sets[k].iterdir())) for k in ("all", "small"))
    # Once started: the extra images over the extra time (none where the start-up's noise hides the difference).
    net = (images - small) / (wall - small_wall) if wall - small_wall > 0.05 * wall else None
    figures = {"img_s": round(images / wall, 1), "net_img_s": round(net, 1) if net else None,
               "startup_s": round(max(small_wall - small / net, 0.0), 2) if net else None, "wall_s": round(wall, 2),
               "wall_small_s": round(small_wall, 2), "peak_rss_mb": round(rss), "started_at": round(started_at, 3),
               "ended_at": round(ended_at, 3)}
    if name == "paper":  # its own split of the loop's time; its start-up as it sees it (from its first line)
        inside = json.loads(stdout.strip().splitlines()[-1])
        figures.update(decode_s=inside["decode_s"], model_s=inside["model_s"], startup_inside_s=inside["startup_s"])
    return figures, read_scores(scratch / f"{name}.csv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r100", help="registered iResNet (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (default: %(default)s)")
    parser.add_argument("--images", type=int, default=16384, help="face JPEGs (default: %(default)s)")
    parser.add_argument("--small", type=int, default=512, help="images of the start-up run (default: %(default)s)")
    parser.add_argument("--paths", default="paper,fp32,bf16,fp16", help="paper and aikd precisions to run")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="aikd's decode threads (default: cores - 2, %(default)s here)")
    parser.add_argument("--batch-size", type=int, default=256, help="aikd's faces per forward (default: %(default)s)")
    parser.add_argument("--variants", default="bf16:6:256,bf16:14:512",
                        help="more aikd runs, PRECISION:WORKERS:BATCH,... (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and faces (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the result here, after every path")
    args = parser.parse_args(argv)
    result: dict = {"arch": args.arch, "device": args.device, "images": args.images, "small": args.small,
                    "workers": args.workers, "batch_size": args.batch_size, "cpus": os.cpu_count(), "paths": {}}

    def save() -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="aikd-gpu-score-") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        write_jpegs(scratch / "faces", args.images, args.seed)
        sets = {"all": scratch / "faces", "small": subset(scratch / "faces", args.small, scratch / "small")}
        result["faces_s"] = round(time.perf_counter() - started, 1)
        result.update(pipeline_rates(sets["all"], args.workers, args.batch_size, scratch))
        print(f"faces written in {result['faces_s']} s; aikd's pipeline without a model: "
              f"{result['decode_img_s']} img/s decoding, {result['prepare_img_s']} img/s decoding + preprocessing "
              f"({args.workers} threads)", file=sys.stderr, flush=True)
        save()
        paper, checkpoint = make_weights(args.arch, args.device, scratch, args.seed)
        scores: dict[str, dict[str, float]] = {}
        for name, command in commands(args, paper, checkpoint).items():
            try:
                figures, scores[name] = run_path(name, command, sets, scratch)
            except (SystemExit, Exception) as err:  # a failed path must not lose the others' figures
                result["paths"][name] = {"error": str(err)[-1500:]}
                print(f"{name}: failed: {str(err)[-1500:]}", file=sys.stderr, flush=True)
                save()
                continue
            figures["spearman_vs_paper"], figures["max_abs_diff_vs_paper"] = compare(scores[name], scores.get("paper"))
            figures["spearman_vs_fp32"], _ = compare(scores[name], scores.get("aikd-fp32"))
            paper_figures = result["paths"].get("paper", {})
            if "img_s" in paper_figures and name != "paper":
                figures["ratio_vs_paper"] = round(figures["img_s"] / paper_figures["img_s"], 2)
                if figures["net_img_s"] and paper_figures.get("net_img_s"):
                    figures["net_ratio_vs_paper"] = round(figures["net_img_s"] / paper_figures["net_img_s"], 2)
            result["paths"][name] = figures
            print(f"{name:22s} {json.dumps(figures)}", file=sys.stderr, flush=True)
            save()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
