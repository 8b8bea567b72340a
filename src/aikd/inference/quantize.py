"""Static int8 quantisation of an ``aikd export`` ONNX graph, calibrated on real faces, with its agreement measured.

    aikd export --checkpoint best.pt --int8 --calibration-images aligned/ -o model.int8.onnx
    aikd score faces/ --checkpoint model.int8.onnx -o scores.csv

onnxruntime's static quantisation (``onnxruntime.quantization.quantize_static``) replaces the convolutions'
fp32 arithmetic by 8-bit integer arithmetic: weights get one scale per output channel, activations one scale
and zero point per tensor, read off the ranges the activations take on a calibration set of real, aligned face
crops. The faces of the folder given are split (seeded) into a calibration part and a held-out part; the
held-out faces measure the int8 graph against the fp32 graph it came from: Spearman's rank correlation of the
qualities (what a quality ranking depends on), the largest quality difference and the smallest embedding
cosine similarity. The figures go into the file's metadata (``aikd.precision`` = ``int8``, ``aikd.int8``), and
``aikd score`` with the file warns when the Spearman figure is below the bar the file records.

Settings (:class:`QuantizeOptions`), chosen by measurement on dlib-r29 with a trained quality head (352 held-out
faces, the figures in the README's speed section; ``bench/int8.py`` measures the chosen ones):

- QDQ format (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into integer kernels), the format
  onnxruntime recommends for CPUs; QOperator agreed the same (Spearman 0.9976) and ran slower here;
- the whole trunk and the embedding layer quantised (convolutions, residual additions, pooling, ``fc``): keeping
  the additions and pooling fp32 as well measured Spearman 0.9964 and ran 1.4x slower (a quantise/dequantise
  pair at every block boundary); the quality head (``/quality_head/*`` nodes) stays fp32: it is a tiny MLP and
  numerically the most sensitive part (agreement 0.9976 kept fp32, 0.9973 quantised);
- the convolution that reads the image is quantised too (``fp32_input_conv=False``): keeping it fp32 agrees better
  (Spearman 0.9993 against 0.9979 on 440 faces of unseen identities) but scored 20 % slower end to end (1760
  files, 10.0 s against 8.2 s): its output is then pooled in fp32 and changes layout twice before the int8 trunk;
- uint8 activations, int8 weights per output channel, ``reduce_range`` (7-bit weights): on x86 CPUs without VNNI
  onnxruntime multiplies uint8 by int8 with ``vpmaddubsw``, whose 16-bit pairwise sums saturate with full-range
  weights; measured on such a CPU (AVX2), full-range weights dropped the agreement to Spearman 0.902. 7-bit
  weights cannot saturate there; uint8 weights (U8U8) agree best (0.9988) but run about half as fast; int8
  activations (S8S8) agree the same and run slower. CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX) accumulate in 32
  bits, where the 7-bit weights cost a little resolution and no speed;
- calibration ``percentile`` (the 99.999th percentile of each activation's absolute values): as good as MinMax
  and entropy on the demo student (0.9973-0.9979 whatever the method, from 48 or 352 calibration faces), and
  better than MinMax on a quality head fitted to certainty labels (0.9961 against 0.9934 on 154 faces of unseen
  identities, ``tests/test_quantize.py``'s model): a few outlier activations stretch MinMax's ranges.

The agreement the command reports comes from the held-out quarter of the calibration folder. Calibration faces
count: on the certainty-head model, calibrating on 77 faces instead of 116 lowered the agreement on unseen
identities from 0.9958 to 0.9951, so three quarters calibrate. The held-out figure is then a rough one: on the
demo student, 110 held-out faces gave 0.9942 where 440 faces of other identities gave 0.9981 (``bench/int8.py``).
Give a few hundred faces, and read a warning from a small folder as "not shown to agree" rather than
"disagrees".

Where the CPU lacks VNNI the int8 graph still runs and agrees as well, but gains less speed
(:func:`aikd.runtime.cpu_has_vnni`); the fp32 ONNX graph and the torch engine remain the exact paths everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aikd.evaluation.metrics import spearman
from aikd.inference.onnx_format import INPUT_NAME, OnnxSession, read_metadata, with_metadata

__all__ = [
    "CALIBRATION_METHODS",
    "MIN_FACES",
    "SPEARMAN_BAR",
    "Agreement",
    "QuantizeOptions",
    "load_faces",
    "measure_agreement",
    "quantize_graph",
    "int8_warning",
    "quantize_onnx",
]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
MIN_FACES = 40  # fewer gives ranges from a handful of faces and a Spearman figure from a handful more
SPEARMAN_BAR = 0.995  # int8 qualities below this rank agreement with fp32 are reported as a warning
BATCH = 16  # faces per batch when measuring agreement


@dataclass(frozen=True)
class QuantizeOptions:
    """How a graph is quantised and judged.

    Attributes:
        method: calibration method, one of :data:`CALIBRATION_METHODS`.
        percentile: the percentile of absolute activations ``percentile`` calibration keeps.
        quant_format: ``qdq`` (QuantizeLinear/DequantizeLinear pairs, fused by onnxruntime) or ``qoperator``
            (QLinearConv & co. written into the graph).
        quantised_ops: operator types quantised; everything else stays fp32.
        fp32_nodes: prefixes of node names kept fp32 whatever their type (``aikd export`` names nodes after the
            torch modules: ``/quality_head/`` is the quality head).
        fp32_input_conv: keep the convolution that reads the image (the stem) fp32: better agreement, slower.
        per_channel: one weight scale per output channel (else one per tensor).
        reduce_range: 7-bit weights, which cannot saturate the uint8 x int8 multiply of CPUs without VNNI.
        activations: ``uint8`` or ``int8`` activations.
        weights: ``int8`` or ``uint8`` weights.
        held_out_fraction: share of the faces kept out of calibration to measure agreement with fp32.
        min_spearman: the agreement below which the file is flagged and every use of it warns.
        seed: seed of the calibration / held-out split.
    """

    method: str = "percentile"
    percentile: float = 99.999
    quant_format: str = "qdq"
    quantised_ops: tuple[str, ...] = ("Conv", "Add", "Relu", "MaxPool", "AveragePool", "Pad", "ReduceMean",
                                      "GlobalAveragePool", "Gemm", "MatMul")
    per_channel: bool = True
    reduce_range: bool = True
    activations: str = "uint8"
    weights: str = "int8"
    fp32_nodes: tuple[str, ...] = ("/quality_head/",)
    fp32_input_conv: bool = False
    held_out_fraction: float = 0.25  # calibration faces help more than held-out ones (measured, below)
    min_spearman: float = SPEARMAN_BAR
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}, "
                             f"got {self.method!r}")
        if self.quant_format not in ("qdq", "qoperator"):
            raise ValueError(f"quant_format must be qdq or qoperator, got {self.quant_format!r}")
        for name, value in (("activations", self.activations), ("weights", self.weights)):
            if value not in ("uint8", "int8"):
                raise ValueError(f"{name} must be uint8 or int8, got {value!r}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if not -1 <= self.min_spearman <= 1:
            raise ValueError(f"--min-spearman must be in [-1, 1], got {self.min_spearman}")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def record(self) -> dict[str, Any]:
        """The settings as plain data (stored in the quantised file's metadata)."""
        data = asdict(self)
        data["quantised_ops"], data["fp32_nodes"] = list(self.quantised_ops), list(self.fp32_nodes)
        return data


@dataclass(frozen=True)
class Agreement:
    """The int8 graph against its fp32 graph on held-out faces.

    Attributes:
        faces: how many faces were compared.
        spearman: Spearman's rank correlation of the qualities.
        max_quality_diff: largest |quality(int8) - quality(fp32)|.
        quality_range: max - min of the fp32 qualities, the scale of ``max_quality_diff``.
        min_embedding_cosine: smallest cosine similarity of an int8 embedding with its fp32 embedding.
    """

    faces: int
    spearman: float
    max_quality_diff: float
    quality_range: float
    min_embedding_cosine: float

    def summary(self) -> str:
        """One line for the terminal."""
        return (f"Spearman {self.spearman:.4f} over {self.faces} held-out faces, max |quality diff| "
                f"{self.max_quality_diff:.3g} (fp32 qualities span {self.quality_range:.3g}), embedding cosine "
                f">= {self.min_embedding_cosine:.4f}")


@dataclass
class QuantizeResult:
    """A quantised graph and what was measured of it."""

    graph: bytes
    agreement: Agreement
    calibration_faces: int
    options: QuantizeOptions
    held_out: list[str] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        """Whether the held-out Spearman figure reaches ``options.min_spearman``."""
        return self.agreement.spearman >= self.options.min_spearman


# ------------------------------------------------------------------------------------------------ faces
def load_faces(folder: str | os.PathLike, preprocessing: Any) -> tuple[list[str], np.ndarray]:
    """Every image under ``folder`` as model input: (keys, float32 (N, 3, H, W)) by ``preprocessing``.

    The images should be face crops aligned for the model (``aikd align`` writes them); they are resized to the
    model's input size as they come.

    Raises:
        ValueError: ``folder`` is not a folder, holds fewer than :data:`MIN_FACES` images, or an image in it
            cannot be read (named).
    """
    from aikd.images import ImageError, collect_inputs, load_input

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--calibration-images {folder}: not a folder")
    try:
        items = collect_inputs([folder])
    except ValueError:
        items = []
    if len(items) < MIN_FACES:
        raise ValueError(f"--calibration-images {folder}: {len(items)} image(s); int8 calibration needs at least "
                         f"{MIN_FACES} aligned face crops (a few hundred, of varied quality, work best)")
    faces = []
    for item in items:
        try:
            faces.append(preprocessing.normalise(load_input(item)))
        except ImageError as err:
            raise ValueError(f"--calibration-images: {item.path}: {err}") from None
    return [item.key for item in items], np.ascontiguousarray(np.stack(faces).transpose(0, 3, 1, 2))


def _split(count: int, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) indices, a seeded random split."""
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, round(held_out_fraction * count))
    return np.sort(order[held:]), np.sort(order[:held])


# --------------------------------------------------------------------------------------------- quantise
class _Reader:
    """onnxruntime's calibration data reader over an array of faces, one at a time: the histogram calibrators
    stack the activations of all batches, so every batch must have the same size."""

    def __init__(self, faces: np.ndarray) -> None:
        self._faces = faces
        self._batches: Iterator[dict[str, np.ndarray]] = self._make()

    def _make(self) -> Iterator[dict[str, np.ndarray]]:
        return ({INPUT_NAME: self._faces[i:i + 1]} for i in range(len(self._faces)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._make()


def quantize_graph(graph: bytes, faces: np.ndarray, options: QuantizeOptions) -> bytes:
    """``graph`` (fp32 ONNX) statically quantised with ranges calibrated on ``faces`` (float32 NCHW model input).

    The metadata of ``graph`` is kept as it is; :func:`quantize_onnx` adds the int8 record.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    original = onnx.load_model_from_string(graph)
    excluded = [node.name for node in original.graph.node if options.fp32_nodes
                and node.name.startswith(tuple(options.fp32_nodes))]
    if options.fp32_input_conv:
        excluded += [node.name for node in original.graph.node
                     if node.op_type == "Conv" and INPUT_NAME in node.input and node.name not in excluded]
    settings = {
        "quant_format": QuantFormat.QDQ if options.quant_format == "qdq" else QuantFormat.QOperator,
        "op_types_to_quantize": list(options.quantised_ops), "nodes_to_exclude": excluded,
        "per_channel": options.per_channel, "reduce_range": options.reduce_range,
        "activation_type": types[options.activations], "weight_type": types[options.weights],
        "calibrate_method": methods[options.method],
        "extra_options": {"CalibPercentile": options.percentile} if options.method == "percentile" else {},
    }
    with tempfile.TemporaryDirectory(prefix="aikd-int8-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(graph)
        with contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():  # onnxruntime's progress lines
            quantize_static(str(source), str(target), _Reader(faces), **settings)
        quantised = onnx.load_model(str(target))
    del quantised.metadata_props[:]
    quantised.metadata_props.extend(original.metadata_props)
    return quantised.SerializeToString()


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger ("consider pre-processing"); hold it back."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _run(graph: bytes, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, qualities) of ``faces`` through ``graph`` on the CPU."""
    session = OnnxSession(graph)
    outputs = [session.run(np.ascontiguousarray(faces[i:i + BATCH])) for i in range(0, len(faces), BATCH)]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def measure_agreement(fp32_graph: bytes, int8_graph: bytes, faces: np.ndarray) -> Agreement:
    """The int8 graph's qualities and embeddings against the fp32 graph's on ``faces`` (float32 NCHW)."""
    fp32_embedding, fp32_quality = _run(fp32_graph, faces)
    int8_embedding, int8_quality = _run(int8_graph, faces)
    norms = np.linalg.norm(fp32_embedding, axis=1) * np.linalg.norm(int8_embedding, axis=1)
    cosine = (fp32_embedding * int8_embedding).sum(axis=1) / np.maximum(norms, 1e-12)
    return Agreement(faces=len(faces), spearman=round(spearman(int8_quality, fp32_quality), 6),
                     max_quality_diff=float(np.abs(int8_quality - fp32_quality).max()),
                     quality_range=float(np.ptp(fp32_quality)), min_embedding_cosine=float(cosine.min()))


def quantize_onnx(graph: bytes, folder: str | os.PathLike, options: QuantizeOptions | None = None,
                  source: str = "<graph>") -> QuantizeResult:
    """An ``aikd export`` fp32 graph quantised to int8 on the faces of ``folder``, its agreement measured.

    Args:
        graph: the fp32 ONNX graph with aikd's metadata.
        folder: aligned face crops; part calibrates, the held-out part measures agreement with fp32.
        options: quantisation settings.
        source: the graph's file name, for error messages.

    Raises:
        ValueError: ``graph`` is not an aikd fp32 graph with a quality output, or the faces do not do.
    """
    options = options or QuantizeOptions()
    metadata = read_metadata(graph, source)
    if metadata["precision"] != "fp32":
        raise ValueError(f"{source}: is already quantised ({metadata['precision']}); quantise the fp32 export")
    if "quality" not in metadata["outputs"]:
        raise ValueError(f"{source}: has no quality output (a bare backbone); int8 agreement is measured on "
                         "qualities")
    keys, faces = load_faces(folder, metadata["preprocessing"])
    calibration, held_out = _split(len(faces), options.held_out_fraction, options.seed)
    quantised = quantize_graph(graph, faces[calibration], options)
    agreement = measure_agreement(graph, quantised, faces[held_out])
    record = {"calibration_faces": int(len(calibration)), "agreement": asdict(agreement),
              "settings": options.record()}
    return QuantizeResult(_with_int8_record(quantised, record), agreement, int(len(calibration)), options,
                          [keys[i] for i in held_out])


def _with_int8_record(graph: bytes, record: dict[str, Any]) -> bytes:
    return with_metadata(graph, {"aikd.precision": "int8", "aikd.int8": json.dumps(record)}, keep_others=True)


def int8_warning(metadata: dict[str, Any], source: str) -> str | None:
    """The warning an int8 file's record calls for (Spearman below its bar), else ``None``."""
    record = metadata.get("int8") or {}
    figure = (record.get("agreement") or {}).get("spearman")
    bar = (record.get("settings") or {}).get("min_spearman", SPEARMAN_BAR)
    if figure is None or figure >= bar:
        return None
    return (f"{source}: int8 qualities rank faces with Spearman {figure:.4f} against fp32 (measured on "
            f"{record['agreement'].get('faces', '?')} held-out calibration faces), below {bar}; use the fp32 "
            "export where the ranking matters")

