"""The AI-KD paper's scoring path, re-created without torchvision: the baseline of ``bench/score.py``.

What a user of the paper's ``inference.py`` runs: the iResNet and MLP head modules alone (no aikd package
import), the release checkpoint through ``torch.load``, PIL decode in the main process, ``ToTensor`` (HWC uint8
-> CHW float / 255) and ``Normalize(0.5, 0.5)``, eager fp32 in eval mode, fixed-size batches, no worker threads,
BatchNorm not folded, the default (NCHW) layout.

    python bench/paper_path.py FOLDER CHECKPOINT.pth OUT.csv --arch-blocks 3,13,30,3 --batch-size 32

Writes ``name,quality`` rows, then prints one JSON line: ``startup_s`` (process start to model ready, as
measured from inside: imports, weights read, model built) and ``images``.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402  (the clock starts before the imports it times)
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "src" / "aikd" / "models"


def _module(name: str):
    """A model file on its own (it imports only torch), as the paper's repository imports its model files."""
    spec = importlib.util.spec_from_file_location(f"paper_{name}", MODELS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PaperModel(torch.nn.Module):
    """``feature_extractor`` + ``quality_head``: the key names of the paper's ``aikd-best.pth``."""

    def __init__(self, blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.feature_extractor = _module("iresnet").IResNet(blocks)
        self.quality_head = _module("head").QualityHead()

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.quality_head(self.feature_extractor(faces))


def to_tensor_normalised(image: Image.Image) -> torch.Tensor:
    """torchvision's ``ToTensor()`` then ``Normalize([0.5] * 3, [0.5] * 3)``."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (pixels - 0.5) / 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch-blocks", default="3,13,30,3", help="iResNet blocks per stage (r100)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    model = PaperModel(tuple(int(n) for n in args.arch_blocks.split(",")))
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    ready = time.perf_counter() - STARTED
    paths = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rows = []
    with torch.no_grad():
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start:start + args.batch_size]
            faces = torch.stack([to_tensor_normalised(Image.open(p).convert("RGB")) for p in batch])
            rows += [f"{p.name},{float(q):.9g}" for p, q in zip(batch, model(faces)[:, 0], strict=True)]
    args.output.write_text("name,quality\n" + "\n".join(rows) + "\n", encoding="utf-8")
    print(json.dumps({"startup_s": round(ready, 3), "images": len(paths)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
