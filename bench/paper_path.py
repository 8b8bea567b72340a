"""The AI-KD paper's scoring path, re-created without torchvision: the baseline of ``bench/score.py``.

What a user of the paper's ``inference.py`` runs: the iResNet and MLP head modules alone (no aikd package
import), the release checkpoint through ``torch.load``, PIL decode in the main process, ``ToTensor`` (HWC uint8
-> CHW float / 255) and ``Normalize(0.5, 0.5)``, eager fp32 in eval mode, fixed-size batches, no worker threads,
BatchNorm not folded, the default (NCHW) layout. ``--device cuda`` runs it as the paper's code does on a GPU:
``model.cuda()``, each batch ``.cuda()`` (a plain blocking copy), the qualities back with ``.cpu()``, torch's default
cuDNN settings (no autotuning; float32 convolutions in TF32 where the GPU has it).

A model the paper's code has no module for (``bench/int8.py``'s dlib-r29 student) comes as an aikd checkpoint
(``.pt``): aikd's loader builds it (the only aikd import), and it runs the same way, with ``Normalize`` taking the
model's own mean, std and channel order.

    python bench/paper_path.py FOLDER CHECKPOINT.pth OUT.csv --arch-blocks 3,13,30,3 --batch-size 32
    python bench/paper_path.py FOLDER best.pt OUT.csv          # an aikd checkpoint, e.g. the dlib-r29 student
    python bench/paper_path.py FOLDER CHECKPOINT.pth OUT.csv --device cuda

Writes ``path,quality`` rows (file names; aikd's score readers take the file), then prints one JSON line:
``startup_s`` (process start to model ready, as measured from inside: imports, weights read, model built, moved to
the device), ``images``, and where the time of the loop went: ``decode_s`` (open, decode, ToTensor, Normalize,
stack) and ``model_s`` (copy to the device, forward, qualities back).
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


def to_tensor_normalised(image: Image.Image, mean: tuple[float, ...] = (0.5,) * 3,
                         std: tuple[float, ...] = (0.5,) * 3) -> torch.Tensor:
    """torchvision's ``ToTensor()`` then ``Normalize(mean, std)`` (the paper's: 0.5, 0.5)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def load_model(checkpoint: Path, blocks: tuple[int, ...]) -> tuple[torch.nn.Module, dict]:
    """The model in eval mode and its input transform (``mean``, ``std``, ``bgr``)."""
    if checkpoint.suffix == ".pt":  # an aikd checkpoint of a model the paper's code cannot build
        from aikd.models import load_quality_model

        model = load_quality_model(checkpoint)
        pre = model.preprocessing
        return model.eval(), {"mean": pre.mean, "std": pre.std, "bgr": pre.channel_order == "BGR"}
    model = PaperModel(blocks)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval(), {"mean": (0.5,) * 3, "std": (0.5,) * 3, "bgr": False}


def qualities(model: torch.nn.Module, faces: torch.Tensor) -> torch.Tensor:
    """(N,) qualities: the paper's model gives (N, 1), an aikd quality model (embedding, quality)."""
    output = model(faces)
    return output[1] if isinstance(output, tuple) else output[:, 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch-blocks", default="3,13,30,3", help="iResNet blocks per stage (r100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    args = parser.parse_args()
    model, transform = load_model(args.checkpoint, tuple(int(n) for n in args.arch_blocks.split(",")))
    model = model.to(args.device)
    ready = time.perf_counter() - STARTED
    paths = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rows = []
    decode_s = model_s = 0.0
    with torch.no_grad():
        for start in range(0, len(paths), args.batch_size):
            started = time.perf_counter()
            batch = paths[start:start + args.batch_size]
            images = [Image.open(p).convert("RGB") for p in batch]
            faces = torch.stack([to_tensor_normalised(image, transform["mean"], transform["std"]) for image in images])
            if transform["bgr"]:
                faces = faces.flip(1)
            decoded = time.perf_counter()
            scores = qualities(model, faces.to(args.device)).cpu()
            model_s += time.perf_counter() - decoded
            decode_s += decoded - started
            rows += [f"{p.name},{float(q):.9g}" for p, q in zip(batch, scores, strict=True)]
    args.output.write_text("path,quality\n" + "\n".join(rows) + "\n", encoding="utf-8")
    print(json.dumps({"startup_s": round(ready, 3), "images": len(paths), "decode_s": round(decode_s, 3),
                      "model_s": round(model_s, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
