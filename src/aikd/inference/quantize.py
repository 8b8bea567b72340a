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

Settings (:class:`QuantizeOptions`), each chosen by measurement on dlib-r29 with a trained quality head (the
figures, and those of the alternatives: docs/export.md; ``bench/int8.py`` measures the chosen ones):

- QDQ format (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into integer kernels), the format
  onnxruntime recommends for CPUs: QOperator agreed the same and ran slower;
- the whole trunk and the embedding layer quantised (convolutions, residual additions, pooling, ``fc``): keeping
  the additions and pooling fp32 puts a quantise/dequantise pair at every block boundary, slower and no closer;
  the quality head (``/quality_head/*`` nodes) stays fp32: a tiny MLP, numerically the most sensitive part;
- the convolution that reads the image quantised too (``fp32_input_conv=False``): fp32 there agrees a little
  better but scores slower end to end (its output is pooled in fp32 and changes layout twice);
- uint8 activations, int8 weights per output channel, ``reduce_range`` (7-bit weights): on x86 CPUs without VNNI
  onnxruntime multiplies uint8 by int8 with ``vpmaddubsw``, whose 16-bit pairwise sums saturate with full-range
  weights and wreck the agreement; 7-bit weights cannot saturate there. CPUs with VNNI (AVX512-VNNI, AVX-VNNI,
  AMX) accumulate in 32 bits, where the 7-bit weights cost a little resolution and no speed;
- calibration ``percentile`` (the 99.999th percentile of each activation's absolute values): as good as MinMax
  and entropy on the demo student, better than MinMax where a few outlier activations stretch its ranges;
- the calibration streamed in chunks of :data:`CALIBRATION_CHUNK` faces (onnxruntime holds a chunk's activations,
  about 9 MB a face, never the folder's), faces decoded as they are needed (:class:`FaceFolder`).

The agreement the command reports comes from the held-out quarter of the calibration folder: calibration faces
count more (three quarters calibrate), so the held-out figure of a small folder is a rough one. Give a few hundred
faces, and read a warning from a small folder as "not shown to agree" rather than "disagrees".

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
    "FaceFolder",
    "face_folder",
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
CALIBRATION_CHUNK = 32  # faces whose activations onnxruntime holds at once while calibrating (~9 MB per face)


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
    held_out_fraction: float = 0.25  # calibration faces help more than held-out ones (docs/export.md)
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
        spearman: Spearman's rank correlation of the qualities; ``None`` where it cannot be measured (the held-out
            faces all got the same fp32 quality: identical images, or a constant model).
        max_quality_diff: largest |quality(int8) - quality(fp32)|.
        quality_range: max - min of the fp32 qualities, the scale of ``max_quality_diff``.
        min_embedding_cosine: smallest cosine similarity of an int8 embedding with its fp32 embedding.
    """

    faces: int
    spearman: float | None
    max_quality_diff: float
    quality_range: float
    min_embedding_cosine: float

    def summary(self) -> str:
        """One line for the terminal."""
        figure = f"Spearman {self.spearman:.4f}" if self.spearman is not None else "Spearman not measurable"
        return (f"{figure} over {self.faces} held-out faces, max |quality diff| "
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
        return self.agreement.spearman is not None and self.agreement.spearman >= self.options.min_spearman


# ------------------------------------------------------------------------------------------------ faces
class FaceFolder:
    """The face crops of a folder as model input, decoded when asked for (one face, or a slice/index array as an
    (N, 3, H, W) float32 batch): calibration and the agreement check hold a batch at a time, never the folder."""

    def __init__(self, items: list[Any], preprocessing: Any) -> None:
        self.items, self.preprocessing = items, preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: np.ndarray) -> FaceFolder:
        return FaceFolder([self.items[i] for i in indices], self.preprocessing)

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        from aikd.images import ImageError, load_input

        if isinstance(index, (int, np.integer)):
            item = self.items[index]
            try:
                return self.preprocessing.normalise(load_input(item), channels_first=True)
            except ImageError as err:
                raise ValueError(f"--calibration-images: {item.path}: {err}") from None
        chosen = range(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        return np.ascontiguousarray(np.stack([self[int(i)] for i in chosen]))


def face_folder(folder: str | os.PathLike, preprocessing: Any) -> tuple[list[str], FaceFolder]:
    """The images under ``folder`` as model input (keys, :class:`FaceFolder`) by ``preprocessing``, decoded lazily.

    The images should be face crops aligned for the model (``aikd align`` writes them); they are resized to the
    model's input size as they come.

    Raises:
        ValueError: ``folder`` is not a folder, or holds fewer than :data:`MIN_FACES` images.
    """
    from aikd.images import collect_inputs

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
    return [item.key for item in items], FaceFolder(items, preprocessing)


def load_faces(folder: str | os.PathLike, preprocessing: Any) -> tuple[list[str], np.ndarray]:
    """Every image under ``folder`` as model input, decoded now: (keys, float32 (N, 3, H, W)) (small sets, tests).

    Raises:
        ValueError: as :func:`face_folder`, or an image cannot be read (named).
    """
    keys, faces = face_folder(folder, preprocessing)
    return keys, faces[:]


def _split(count: int, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) indices, a seeded random split."""
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, round(held_out_fraction * count))
    return np.sort(order[held:]), np.sort(order[:held])


# --------------------------------------------------------------------------------------------- quantise
class _Reader:
    """onnxruntime's calibration data reader over faces, one at a time (the histogram calibrators stack the
    activations of every batch of a collection, so batches must have the same size), in ranges of
    :data:`CALIBRATION_CHUNK` faces: onnxruntime collects each range's activations into its histograms and lets
    them go (its ``CalibStridedMinMax`` loop), so memory stays flat in the number of faces. Its length is rounded up
    to whole ranges (the loop wants that); only the last range is short, never empty."""

    def __init__(self, faces: Any) -> None:
        self._faces = faces
        self._start, self._end = 0, len(faces)
        self._next = 0

    def __len__(self) -> int:
        return -(-len(self._faces) // CALIBRATION_CHUNK) * CALIBRATION_CHUNK

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = start_index, min(end_index, len(self._faces))
        self._next = self._start

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        face = self._faces[self._next]
        self._next += 1
        return {INPUT_NAME: np.ascontiguousarray(face[None], dtype=np.float32)}

    def rewind(self) -> None:
        self._next = self._start


def quantize_graph(graph: bytes, faces: Any, options: QuantizeOptions) -> bytes:
    """``graph`` (fp32 ONNX) statically quantised with ranges calibrated on ``faces`` (float32 NCHW model input: an
    array, or a :class:`FaceFolder` decoded as it goes).

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
        "extra_options": {"CalibStridedMinMax": CALIBRATION_CHUNK,
                          **({"CalibPercentile": options.percentile} if options.method == "percentile" else {})},
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


def measure_agreement(fp32_graph: bytes, int8_graph: bytes, faces: Any) -> Agreement:
    """The int8 graph's qualities and embeddings against the fp32 graph's on ``faces`` (float32 NCHW: an array or a
    :class:`FaceFolder`, read a batch at a time)."""
    fp32_embedding, fp32_quality = _run(fp32_graph, faces)
    int8_embedding, int8_quality = _run(int8_graph, faces)
    norms = np.linalg.norm(fp32_embedding, axis=1) * np.linalg.norm(int8_embedding, axis=1)
    cosine = (fp32_embedding * int8_embedding).sum(axis=1) / np.maximum(norms, 1e-12)
    rank = spearman(int8_quality, fp32_quality)
    return Agreement(faces=len(faces), spearman=round(rank, 6) if np.isfinite(rank) else None,
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
    keys, faces = face_folder(folder, metadata["preprocessing"])
    calibration, held_out = _split(len(faces), options.held_out_fraction, options.seed)
    quantised = quantize_graph(graph, faces.subset(calibration), options)
    agreement = measure_agreement(graph, quantised, faces.subset(held_out))
    record = {"calibration_faces": int(len(calibration)), "agreement": asdict(agreement),
              "settings": options.record()}
    return QuantizeResult(_with_int8_record(quantised, record), agreement, int(len(calibration)), options,
                          [keys[i] for i in held_out])


def _with_int8_record(graph: bytes, record: dict[str, Any]) -> bytes:
    text = json.dumps(record, allow_nan=False)  # valid JSON: an unmeasurable figure is null, never NaN
    return with_metadata(graph, {"aikd.precision": "int8", "aikd.int8": text}, keep_others=True)


def int8_warning(metadata: dict[str, Any], source: str) -> str | None:
    """The warning an int8 file's record calls for (Spearman below its bar), else ``None``."""
    record = metadata.get("int8") or {}
    agreement = record.get("agreement") or {}
    figure = agreement.get("spearman")
    bar = (record.get("settings") or {}).get("min_spearman", SPEARMAN_BAR)
    if figure is None and "spearman" in agreement:
        return (f"{source}: the agreement of its int8 qualities with fp32 could not be measured (the held-out "
                "calibration faces all got the same quality); calibrate on varied faces")
    if not isinstance(figure, (int, float)) or figure >= bar:
        return None
    return (f"{source}: int8 qualities rank faces with Spearman {figure:.4f} against fp32 (measured on "
            f"{record['agreement'].get('faces', '?')} held-out calibration faces), below {bar}; use the fp32 "
            "export where the ranking matters")

