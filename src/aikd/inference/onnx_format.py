"""The one home of aikd's ONNX schema (input and output names, metadata keys) and of onnxruntime sessions.

An ``aikd export`` graph takes ``image`` (N, 3, H, W) float32 faces, preprocessed as its metadata says, and gives
``embedding`` (N, D, not L2-normalised) and, for a quality model, ``quality`` (N,); the batch axis is dynamic.
Its ``metadata_props`` carry what a consumer needs besides the weights:

    aikd.preprocessing  JSON: input size, colour order, mean, std, embedding size (a Preprocessing)
    aikd.alignment      JSON: the five-point template in input pixels (left eye, right eye, nose, mouth corners)
    aikd.arch           the backbone architecture
    aikd.outputs        JSON list of the output names
    aikd.version        the aikd that wrote the file
    aikd.fingerprint    the fingerprint of the torch weights exported
    aikd.calibration    JSON calib.json content of a calibrated model (absent otherwise)
    aikd.precision      ``int8`` for a graph from ``aikd export --int8`` (absent: fp32)
    aikd.int8           JSON: that graph's calibration faces, measured agreement and settings

Writers (:mod:`aikd.inference.export`, :mod:`aikd.inference.quantize`) go through :func:`with_metadata`, readers
through :func:`read_metadata` / :func:`metadata_from_properties`; every onnxruntime session is an
:class:`OnnxSession`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.runtime import PlainDevice, available_cores

if TYPE_CHECKING:
    import torch

__all__ = ["INPUT_NAME", "METADATA_KEYS", "OPSET", "OnnxSession", "metadata_from_properties", "read_metadata",
           "with_metadata"]

OPSET = 17
INPUT_NAME = "image"
EMBEDDING, QUALITY = "embedding", "quality"
METADATA_KEYS = ("aikd.preprocessing", "aikd.alignment", "aikd.arch", "aikd.outputs", "aikd.version",
                 "aikd.fingerprint", "aikd.calibration", "aikd.precision", "aikd.int8")


def output_names(has_quality: bool) -> list[str]:
    """The graph's outputs, in order."""
    return [EMBEDDING, QUALITY] if has_quality else [EMBEDDING]


def with_metadata(graph: bytes, values: Mapping[str, str], keep_others: bool = False) -> bytes:
    """``graph`` with aikd's metadata ``values`` (keys from :data:`METADATA_KEYS`) set.

    Args:
        keep_others: keep the entries ``values`` does not name (adding the int8 record to an exported graph);
            otherwise the graph's metadata becomes exactly ``values``.
    """
    import onnx

    unknown = sorted(set(values) - set(METADATA_KEYS))
    if unknown:
        raise ValueError(f"not aikd ONNX metadata keys: {', '.join(unknown)}")
    proto = onnx.load_model_from_string(graph)
    kept = [entry for entry in proto.metadata_props if keep_others and entry.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def read_metadata(onnx_model: str | os.PathLike | bytes, source: str | None = None) -> dict[str, Any]:
    """aikd's metadata of an exported graph, parsed (:func:`metadata_from_properties`).

    Args:
        onnx_model: the file or its bytes.
        source: the name errors give (default: the file's path, or ``<bytes>``).

    Raises:
        ValueError: not an ONNX file, or one without aikd's metadata (exported elsewhere).
    """
    import onnx

    source = source or ("<bytes>" if isinstance(onnx_model, bytes) else str(onnx_model))
    try:
        data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
        proto = onnx.load_model_from_string(data)
    except OSError as err:
        raise ValueError(f"{source}: cannot read ({err.strerror})") from None
    except Exception as err:  # DecodeError: not an ONNX model
        raise ValueError(f"{source}: not an ONNX model ({type(err).__name__})") from None
    return metadata_from_properties({entry.key: entry.value for entry in proto.metadata_props}, source)


def metadata_from_properties(props: Mapping[str, str], source: str) -> dict[str, Any]:
    """aikd's metadata from a graph's properties as already read (an onnxruntime session's
    ``custom_metadata_map`` spares parsing the graph a second time): ``preprocessing`` (a
    :class:`~aikd.preprocessing.Preprocessing`), ``alignment``, ``arch``, ``outputs``, ``version``, ``fingerprint``,
    ``calibration`` (plain data or ``None``), ``precision`` (``fp32`` or ``int8``) and ``int8`` (or ``None``).

    Raises:
        ValueError: no aikd metadata, or malformed metadata (the message names ``source``).
    """
    from aikd.preprocessing import Preprocessing

    if "aikd.preprocessing" not in props:
        raise ValueError(f"{source}: has no aikd metadata (not exported by aikd export); its preprocessing "
                         "is unknown")
    try:
        return {"preprocessing": Preprocessing.from_dict(json.loads(props["aikd.preprocessing"])),
                "alignment": json.loads(props.get("aikd.alignment", "null")),
                "arch": props.get("aikd.arch") or None,
                "outputs": json.loads(props.get("aikd.outputs", json.dumps(output_names(True)))),
                "version": props.get("aikd.version"),
                "fingerprint": props.get("aikd.fingerprint"),
                "calibration": json.loads(props.get("aikd.calibration", "null")),
                "precision": props.get("aikd.precision", "fp32"),
                "int8": json.loads(props["aikd.int8"]) if "aikd.int8" in props else None}
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: malformed aikd metadata ({err})") from None


class OnnxSession:
    """An onnxruntime session of an exported graph, run the way that is fastest for whole folders.

    On the CPU each batch runs as two halves at once, each half on half the cores, instead of the whole batch on
    every core: onnxruntime's threads meet at a barrier after every operator, and on a machine whose cores the
    decode threads share, one preempted thread holds up the others there (measured: docs/speed.md). On a GPU the
    batch runs whole.
    """

    def __init__(self, graph: bytes | str, device: torch.device | PlainDevice | None = None,
                 source: str = "<graph>") -> None:
        """Load ``graph`` (its bytes, or its file: lighter, onnxruntime reads it itself) for ``device`` (CPU when
        ``None``).

        Raises:
            ValueError: no such file, or not a graph onnxruntime can load (the message names ``source``).
        """
        import onnxruntime as ort

        device = device or PlainDevice("cpu")
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("--backend onnxruntime --device cuda needs onnxruntime-gpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No memory arena: it keeps the largest batch's activations reserved for good (about 200 MB for an
        # iResNet-100 at batch 32); plain allocation measured no slower here.
        options.enable_cpu_mem_arena = False
        cores = available_cores()
        self.halves = device.type == "cpu" and cores >= 2
        if self.halves:
            options.intra_op_num_threads = cores // 2
        if isinstance(graph, str) and not os.path.isfile(graph):
            raise ValueError(f"{source}: no such file")
        try:
            self.session = ort.InferenceSession(graph, options, providers=providers)
        except Exception as err:  # onnxruntime's own exception types: InvalidProtobuf, Fail, InvalidGraph...
            raise ValueError(f"{source}: not an ONNX model onnxruntime can run ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
        self._pool: ThreadPoolExecutor | None = None

    def metadata(self) -> dict[str, str]:
        """The graph's metadata properties (:func:`metadata_from_properties` parses aikd's)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def output_names(self) -> list[str]:
        return [output.name for output in self.session.get_outputs()]

    def run(self, faces: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for a contiguous float32 (N, C, H, W) batch."""
        if not self.halves or len(faces) < 2:
            return self.session.run(None, {INPUT_NAME: faces})
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="aikd-onnxruntime")
        halves = np.array_split(faces, 2)
        outputs = list(self._pool.map(lambda half: self.session.run(None, {INPUT_NAME: half}), halves))
        return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]
