"""Memory and speed of the local engine against the number of images: ``aikd score`` (and ``embed``, ``detect``,
``align``) at 2,000, 20,000 and 200,000 faces, and the training index at VGGFace2's size.

The faces are generated 112x112 JPEGs: a pool of ``--pool`` distinct files, and for each size a tree of hard links
to them, 1,000 per folder (``d0000/000000.jpg``, ...): only the names need to differ, and a tree of identity-sized
folders is how face sets are stored. The model is the registry's ``tiny`` (random weights, calibrated BatchNorm).

Per command and size, two processes:

- the run itself, started by a small launcher interpreter (bench/score.py's ``_LAUNCHER``: a child's ``ru_maxrss``
  starts at its parent's peak, so the bench's own memory must not be the parent): wall time and peak RSS;
- the same run with ``tracemalloc`` started after the imports (``--heap``): the Python heap's peak above them.

``img_s`` is the rate net of start-up: ``(N - 1) / (wall - wall of a 1-image run)``. The index: a landmarks CSV and
a labels CSV of ``--index-faces`` names (VGGFace2: 3.31 M faces of 9,131 identities), read by
:func:`aikd.training.data.read_index` without an image walk: wall time, peak RSS and heap, and bytes per face.

    PYTHONPATH=src python bench/scale.py                                  # score at 2k, 20k, 200k; the index
    PYTHONPATH=src python bench/scale.py --sizes 2000,20000 --commands score,embed --index-faces 0

The last line printed is one JSON object: per command and size ``wall_s``, ``img_s``, ``peak_rss_mb``,
``heap_peak_mb``; ``index``; the CPU line and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from score import make_faces, run_process  # noqa: E402  (bench/score.py: the launcher and the faces)

PER_FOLDER = 1000
VGGFACE2_FACES, VGGFACE2_IDENTITIES = 3_310_000, 9131

# tracemalloc from after the imports to the end of the command; the command's own imports inside main() count.
_HEAP = ("import sys, tracemalloc; import aikd.cli, aikd.pipeline.files, aikd.pipeline.scoring, "
         "aikd.pipeline.embedding, aikd.pipeline.detection, aikd.inference.engine, aikd.images, aikd.io, torch, cv2; "
         "tracemalloc.start(); code = aikd.cli.main(sys.argv[1:]); "
         "print(f'aikd-heap {tracemalloc.get_traced_memory()[1]}', file=sys.stderr); sys.exit(code)")
_INDEX = ("import json, sys, time, tracemalloc; from aikd.training.data import read_index; heap = sys.argv[4] == '1'; "
          "heap and tracemalloc.start(); start = time.perf_counter(); "
          "index = read_index(sys.argv[1], sys.argv[2], sys.argv[3], check_images=False); "
          "print(json.dumps({'faces': len(index), 'read_s': time.perf_counter() - start, "
          "'heap': tracemalloc.get_traced_memory()[1] if heap else None}))")


def link_tree(pool: list[Path], count: int, root: Path) -> Path:
    """``count`` hard links (copies where the file system refuses) to the ``pool`` files, 1,000 per folder. Never
    symbolic links: aikd scores each file once, and a symbolic link to a listed file is that file."""
    for i in range(count):
        folder = root / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{i:06d}.jpg"
        try:
            os.link(pool[i % len(pool)], target)
        except OSError:
            shutil.copyfile(pool[i % len(pool)], target)
    return root


def command_line(command: str, folder: Path, out: Path, checkpoint: Path, landmarks: Path, workers: int
                 ) -> list[str]:
    """The aikd arguments of one measured run (after ``-m aikd`` or the heap wrapper)."""
    job = ["--workers", str(workers), "--overwrite"]
    if command == "score":
        return ["score", str(folder), "--checkpoint", str(checkpoint), "-o", str(out), "--device", "cpu", *job]
    if command == "embed":
        return ["embed", str(folder), "--weights", str(checkpoint), "-o", str(out), "--device", "cpu", *job]
    if command == "detect":
        return ["detect", str(folder), "-o", str(out), *job]
    if command == "align":
        return ["align", str(folder), "--landmarks", str(landmarks), "-o", str(out), *job]
    raise ValueError(command)


OUTPUT_SUFFIX = {"score": ".csv", "embed": ".npz", "detect": ".csv", "align": ""}


def heap_peak(argv: list[str]) -> float:
    """The Python heap's peak (MB) of one in-process run of ``aikd argv``, above the imports."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", _HEAP, *argv], capture_output=True, env=env)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr.decode()[-2000:]}")
    line = [line for line in done.stderr.decode().splitlines() if line.startswith("aikd-heap ")][-1]
    return int(line.split()[1]) / 2**20


def measure_command(command: str, trees: dict[int, Path], scratch: Path, checkpoint: Path, landmarks: Path,
                    args: argparse.Namespace) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    one = scratch / "one"
    out_of = lambda name: scratch / f"{command}-{name}{OUTPUT_SUFFIX[command]}"  # noqa: E731
    startup, _ = run_process([sys.executable, "-m", "aikd",  # exit 1: generated faces no detector finds
                              *command_line(command, one, out_of("one"), checkpoint, landmarks, args.workers)], (0, 1))
    for size, folder in trees.items():
        argv = command_line(command, folder, out_of(size), checkpoint, landmarks, args.workers)
        wall, rss = run_process([sys.executable, "-m", "aikd", *argv], (0, 1))
        entry = {"wall_s": round(wall, 2), "img_s": round((size - 1) / max(wall - startup, 1e-9), 1),
                 "peak_rss_mb": round(rss, 1), "startup_s": round(startup, 2)}
        if args.heap:
            entry["heap_peak_mb"] = round(heap_peak(argv), 2)
        figures[str(size)] = entry
        print(f"{command} {size}: {json.dumps(entry)}  (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return figures


def write_index_files(folder: Path, faces: int, identities: int, seed: int = 0) -> tuple[Path, Path]:
    """A landmarks CSV and a labels CSV naming ``faces`` images of ``identities`` identities (VGGFace2's layout:
    ``n000001/0001_01.jpg``), written in chunks."""
    rng = np.random.default_rng(seed)
    landmarks, labels = folder / "landmarks.csv", folder / "labels.csv"
    header = "path," + ",".join(f"{axis}{i}" for i in range(1, 6) for axis in ("x", "y"))
    per_identity = -(-faces // identities)
    with open(landmarks, "w") as lm, open(labels, "w") as lb:
        lm.write(header + "\n")
        lb.write("path,quality\n")
        for start in range(0, faces, 100_000):
            stop = min(start + 100_000, faces)
            index = np.arange(start, stop)
            names = [f"n{i // per_identity:06d}/{i % per_identity:04d}_01.jpg" for i in index]
            points = (np.array([38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2], np.float32)
                      + rng.uniform(-2, 2, (len(index), 10)).astype(np.float32))
            lm.writelines(f"{name},{','.join(f'{v:.2f}' for v in row)}\n" for name, row in zip(names, points,
                                                                                                strict=True))
            lb.writelines(f"{name},{q:.6f}\n" for name, q in zip(names, rng.random(len(index)), strict=True))
    return landmarks, labels


def measure_index(scratch: Path, faces: int) -> dict[str, float]:
    started = time.perf_counter()
    landmarks, labels = write_index_files(scratch, faces, max(1, round(faces * VGGFACE2_IDENTITIES / VGGFACE2_FACES)))
    print(f"index files: {faces} faces written in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    base = [sys.executable, "-c", _INDEX, str(scratch), str(landmarks), str(labels)]
    wall, rss = run_process([*base, "0"])
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    timed = json.loads(subprocess.run([*base, "0"], capture_output=True, env=env, check=True).stdout)
    heap = json.loads(subprocess.run([*base, "1"], capture_output=True, env=env, check=True).stdout)
    empty_wall, empty_rss = run_process([sys.executable, "-c", "import aikd.training.data"])
    result = {"faces": timed["faces"], "read_s": round(timed["read_s"], 1), "process_wall_s": round(wall, 1),
              "peak_rss_mb": round(rss, 1), "imports_rss_mb": round(empty_rss, 1),
              "heap_peak_mb": round(heap["heap"] / 2**20, 1),
              "rss_bytes_per_face": round((rss - empty_rss) * 2**20 / faces),
              "heap_bytes_per_face": round(heap["heap"] / faces)}
    print(f"index: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,20000,200000", help="numbers of faces (default: %(default)s)")
    parser.add_argument("--commands", default="score", help="of score, embed, detect, align (default: %(default)s)")
    parser.add_argument("--pool", type=int, default=500, help="distinct JPEGs linked to (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (default: %(default)s)")
    parser.add_argument("--no-heap", dest="heap", action="store_false", help="skip the tracemalloc runs")
    parser.add_argument("--index-faces", type=int, default=VGGFACE2_FACES,
                        help="faces of the training index (0: skip it; default: VGGFace2's %(default)s)")
    parser.add_argument("--scratch", type=Path, help="folder for the generated files (default: a temporary one)")
    args = parser.parse_args(argv)
    sizes = [int(text) for text in args.sizes.split(",") if text]
    commands = [text for text in args.commands.split(",") if text]
    print(f"cpu: {describe_cpu()}; load {os.getloadavg()}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="aikd-scale-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        result = {"cpu": describe_cpu(), "load_before": os.getloadavg(), "workers": args.workers, "commands": {}}
        if sizes and commands:
            result["commands"] = run_commands(scratch, sizes, commands, args)
        if args.index_faces:
            result["index"] = measure_index(scratch, args.index_faces)
        result["load_after"] = os.getloadavg()
    print(json.dumps(result))
    return 0


def run_commands(scratch: Path, sizes: list[int], commands: list[str], args: argparse.Namespace) -> dict:
    from aikd.models import build_model, calibrate_batchnorm, save_checkpoint

    make_faces(scratch / "pool", args.pool)
    pool = sorted((scratch / "pool").iterdir())
    started = time.perf_counter()
    trees = {size: link_tree(pool, size, scratch / f"faces{size}") for size in sizes}
    link_tree(pool, 1, scratch / "one")
    print(f"trees of {', '.join(map(str, sizes))} links made in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    landmarks = scratch / "landmarks.csv"
    if "align" in commands:
        from aikd.align import ARCFACE_TEMPLATE
        from aikd.io import write_csv

        points = (ARCFACE_TEMPLATE * 0.9 + 4).ravel().tolist()
        write_csv(landmarks, ["path", *(f"{a}{i}" for i in range(1, 6) for a in "xy")],
                  ([f"d{i // PER_FOLDER:04d}/{i:06d}.jpg", *points] for i in range(max(sizes))))
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model("tiny"), batches=2, batch_size=8, seed=0).eval()
    checkpoint = save_checkpoint(scratch / "tiny.pt", model, "tiny")
    return {command: measure_command(command, trees, scratch, checkpoint, landmarks, args) for command in commands}


if __name__ == "__main__":
    sys.exit(main())
