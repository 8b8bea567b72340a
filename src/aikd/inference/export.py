"""ONNX export of a quality model, with a structural check and a numerical parity check against torch.

    aikd export --checkpoint runs/r100/best.pt -o aikd.onnx

The graph takes ``image`` (N, 3, 112, 112) float32 faces preprocessed as the model's
:class:`~aikd.models.Preprocessing` says (RGB, ``(x / 255 - 0.5) / 0.5``) and returns ``embedding``
(N, 512, not L2-normalised) and ``quality`` (N,). The batch axis is dynamic.

The file carries its preprocessing, so a consumer needs nothing else: the metadata keys and the graph's input
and output names are defined in :mod:`aikd.inference.onnx_format`, which also reads them back
(:func:`~aikd.inference.onnx_format.read_metadata`); the onnxruntime engine (``aikd score --checkpoint model.onnx``)
preprocesses by them.

By default the exported graph is the BatchNorm-folded model (:func:`aikd.models.folding.fold_batchnorm`):
the same function with fewer operators. Parity is always measured against the plain, unfolded torch model.

Exporter: the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``). This model has no
data-dependent control flow, so tracing captures it completely; the tracer needs no onnxscript, prints
nothing, takes seconds for an iResNet-100 and names inputs, outputs and the dynamic axis directly. The
dynamo exporter (torch 2.13's default) also works but needs onnxscript and prints progress lines.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from aikd.inference.onnx_format import INPUT_NAME, OPSET, OnnxSession, output_names, with_metadata
from aikd.io import atomic_write
from aikd.preprocessing import Preprocessing

if TYPE_CHECKING:
    from torch import nn

# torch is imported by the functions that export or run torch: reading an exported graph's metadata (what
# scoring an ONNX file needs) does without it.

__all__ = ["check_onnx", "export_onnx", "relative_difference"]


def _output_names(model: nn.Module) -> list[str]:
    from aikd.models import QualityModel

    return output_names(isinstance(model, QualityModel))


def export_onnx(
    model: nn.Module,
    destination: str | os.PathLike | IO[bytes],
    input_size: tuple[int, int] | None = None,
    fold: bool = True,
    opset: int = OPSET,
    preprocessing: Preprocessing | None = None,
) -> None:
    """Export ``model`` (a :class:`QualityModel` or a backbone) to ONNX with a dynamic batch axis.

    Args:
        model: not modified (a folded or eval-mode CPU copy is exported).
        destination: a file path (written atomically) or a binary file object.
        input_size: (height, width); defaults to ``model.preprocessing.input_size`` or 112x112.
        fold: export the BatchNorm-folded model (same outputs up to float rounding, fewer operators).
        opset: ONNX opset version.
        preprocessing: what the metadata records; default ``model.preprocessing`` (a bare backbone has none).
    """
    import torch

    from aikd.models.folding import fold_batchnorm

    highest = getattr(torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    if not 7 <= int(opset) <= highest:
        raise ValueError(f"--opset {opset}: this torch exports ONNX opsets 7 to {highest}")
    preprocessing = preprocessing or getattr(model, "preprocessing", None) or Preprocessing()
    input_size = tuple(input_size or preprocessing.input_size)
    prepared = fold_batchnorm(model) if fold else _eval_copy(model)
    prepared = prepared.cpu().float()
    names = _output_names(model)
    example = torch.zeros(2, 3, *input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        prepared(example)  # fills the folded blocks' border caches, so the trace records them as constants
        warnings.simplefilter("ignore")  # tracer notes about constants and the exporter's deprecation notice
        torch.onnx.export(
            prepared, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *names]},
        )
    data = _with_metadata(buffer.getvalue(), model, preprocessing, tuple(input_size), names)
    if isinstance(destination, (str, os.PathLike)):
        with atomic_write(destination, "wb") as handle:
            handle.write(data)
    else:
        destination.write(data)


def _with_metadata(graph: bytes, model: nn.Module, preprocessing: Preprocessing, input_size: tuple[int, int],
                   names: list[str]) -> bytes:
    """The exported graph with aikd's metadata (preprocessing, alignment template, arch, version) added."""
    from aikd.models import weights_fingerprint
    from aikd.version import __version__

    template = preprocessing.alignment_points().round(4).tolist()
    values = {
        "aikd.preprocessing": json.dumps({**preprocessing.to_dict(), "input_size": list(input_size)}),
        "aikd.alignment": json.dumps({"template": template, "template_frame": list(input_size),
                                      "points": ["left_eye", "right_eye", "nose", "left_mouth", "right_mouth"]}),
        "aikd.arch": str(getattr(model, "arch", None) or ""),
        "aikd.outputs": json.dumps(names),
        "aikd.version": __version__,
        "aikd.fingerprint": weights_fingerprint(model),
    }
    if getattr(model, "calibration", None):
        values["aikd.calibration"] = json.dumps(model.calibration)
    return with_metadata(graph, values)


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def check_onnx(model: nn.Module, onnx_model: str | os.PathLike | bytes, batch_sizes: tuple[int, ...] = (1, 5),
               seed: int = 0) -> dict[str, float]:
    """Validate an exported graph with ``onnx.checker`` and compare it with the plain torch model.

    Args:
        model: the torch model the graph came from (run unfolded, fp32, CPU, eval mode).
        onnx_model: the ONNX file or its bytes.
        batch_sizes: batches of seeded random faces in [-1, 1] to run (different sizes exercise the dynamic axis).
        seed: seed of the random faces.

    Returns:
        Maximum absolute differences ``{"quality": ..., "embedding": ...}`` and the scale of each output, the
        largest absolute torch value: ``{"quality_scale": ..., "embedding_scale": ...}`` (``quality*`` only for
        quality models).

    Raises:
        ValueError: the graph fails the ONNX checker or gives outputs of the wrong shape.
    """
    import onnx
    import torch

    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    try:
        onnx.checker.check_model(onnx.load_model_from_string(data), full_check=True)
    except Exception as err:  # DecodeError (not a model at all), ValidationError, shape-inference errors
        raise ValueError(f"the graph fails the ONNX checker: {type(err).__name__}: {err}") from None
    session = OnnxSession(data)
    reference = _eval_copy(model).cpu().float()
    names = _output_names(model)
    size = tuple(getattr(getattr(model, "preprocessing", None), "input_size", (112, 112)))
    generator = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys([*names, *(f"{name}_scale" for name in names)], 0.0)
    for batch in batch_sizes:
        faces = torch.rand(batch, 3, *size, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = reference(faces)
        expected = expected if isinstance(expected, tuple) else (expected,)
        if not all(torch.isfinite(value).all() for value in expected):
            raise ValueError("the model's outputs are not finite (NaN or infinite) on test faces: its weights are "
                             "broken; nothing to export")
        got = session.run(np.ascontiguousarray(faces.numpy()))
        for name, want, have in zip(names, expected, got, strict=True):
            if have.shape != tuple(want.shape):
                raise ValueError(f"ONNX output {name} has shape {have.shape}, torch gives {tuple(want.shape)}")
            worst[name] = max(worst[name], float(np.abs(have - want.numpy()).max()))
            worst[f"{name}_scale"] = max(worst[f"{name}_scale"], float(want.abs().max()))
    return worst


def relative_difference(worst: dict[str, float], name: str) -> float:
    """``worst[name]`` relative to the output's scale, ``max(1, largest |torch value|)``: qualities in [0, 1]
    are judged in absolute terms, a model whose outputs are ~1e5 by float32's relative precision."""
    return worst[name] / max(1.0, worst[f"{name}_scale"])
