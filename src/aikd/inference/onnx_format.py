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
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future
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
        metadata = {"preprocessing": Preprocessing.from_dict(json.loads(props["aikd.preprocessing"])),
                    "alignment": json.loads(props.get("aikd.alignment", "null")),
                    "arch": props.get("aikd.arch") or None,
                    "outputs": json.loads(props.get("aikd.outputs", json.dumps(output_names(True)))),
                    "version": props.get("aikd.version"),
                    "fingerprint": props.get("aikd.fingerprint"),
                    "calibration": json.loads(props.get("aikd.calibration", "null")),
                    "precision": props.get("aikd.precision", "fp32"),
                    "int8": json.loads(props["aikd.int8"]) if "aikd.int8" in props else None}
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as err:
        raise ValueError(f"{source}: malformed aikd metadata ({type(err).__name__}: {str(err)[:200]})") from None
    if metadata["outputs"] not in (output_names(True), output_names(False)):
        raise ValueError(f"{source}: malformed aikd metadata (aikd.outputs must be {output_names(True)} or "
                         f"{output_names(False)})")
    for key, kind in (("calibration", dict), ("int8", dict), ("alignment", dict)):
        if metadata[key] is not None and not isinstance(metadata[key], kind):
            raise ValueError(f"{source}: malformed aikd metadata (aikd.{key} must be a JSON object)")
    if metadata["precision"] not in ("fp32", "int8"):
        raise ValueError(f"{source}: malformed aikd metadata (aikd.precision must be fp32 or int8)")
    return metadata


# ---------------------------------------------------------------------------------------------- operators
# The operators aikd's exports contain (every registered architecture, fp32 at opset 7-20, and int8 in QDQ or
# QOperator form; tests/test_export.py checks the list covers them), plus a few stateless relatives other opsets
# emit. No control flow (Loop, If, Scan: a crafted Loop ran for 10^15 iterations) and no custom operators: a graph
# with anything else is not an aikd export and is refused before it runs.
AIKD_OPERATORS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "Div", "Erf", "Flatten", "Gather", "Gemm", "Identity", "LayerNormalization", "MatMul", "MaxPool", "Mul", "PRelu",
    "Pad", "Pow", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt",
    "Squeeze", "Sub", "Transpose", "Unsqueeze", "GlobalAveragePool", "LeakyRelu", "Tanh", "Neg", "Exp", "Abs",
    "Max", "Min", "Expand", "Where", "Equal", "Range", "ReduceSum", "ReduceL2", "Dropout", "Gelu",
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
    "DynamicQuantizeLinear",
})
# onnxruntime's own quantised operators (QOperator int8 graphs).
AIKD_MICROSOFT_OPERATORS = frozenset({
    "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QGemm",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearReduceMean", "QLinearSoftmax",
})


def graph_operators(graph: str | os.PathLike | bytes) -> tuple[set[tuple[str, str]], bool]:
    """The ``(domain, op_type)`` of every node of an ONNX model, and whether it has subgraphs or functions, read
    from the protobuf wire format of the file (memory-mapped: the weights are skipped, never copied).

    Raises:
        ValueError: not a protobuf the walker can read (the caller's session load would fail too).
    """
    import mmap

    if isinstance(graph, bytes):
        return _scan_model(memoryview(graph))
    with open(graph, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _scan_model(view)
            finally:
                view.release()


def _fields(data: memoryview, start: int, end: int) -> Any:
    """``(field number, wire type, value start, value end)`` of each field of one protobuf message."""
    position = start
    while position < end:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(data, position)
        elif wire == 1:
            after = position + 8
        elif wire == 2:
            size, position = _varint(data, position)
            after = position + size
        elif wire == 5:
            after = position + 4
        else:
            raise ValueError(f"wire type {wire} at byte {position}")
        if after > end:
            raise ValueError(f"field {number} runs past its message at byte {position}")
        yield number, wire, position, after
        position = after


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _scan_model(data: memoryview) -> tuple[set[tuple[str, str]], bool]:
    operators: set[tuple[str, str]] = set()
    nested = False
    for number, wire, start, end in _fields(data, 0, len(data)):
        if number == 7 and wire == 2:  # ModelProto.graph
            nested |= _scan_graph(data, start, end, operators)
        elif number == 25:  # ModelProto.functions
            nested = True
    return operators, nested


def _scan_graph(data: memoryview, start: int, end: int, operators: set[tuple[str, str]]) -> bool:
    nested = False
    for number, wire, node_start, node_end in _fields(data, start, end):
        if number != 1 or wire != 2:  # GraphProto.node; initializers and the rest are skipped
            continue
        op_type = domain = ""
        for field, kind, value_start, value_end in _fields(data, node_start, node_end):
            if field == 4 and kind == 2:
                op_type = bytes(data[value_start:value_end]).decode("utf-8", "replace")
            elif field == 7 and kind == 2:
                domain = bytes(data[value_start:value_end]).decode("utf-8", "replace")
            elif field == 5 and kind == 2:  # NodeProto.attribute: a graph-valued one is a subgraph
                nested |= any(sub in (6, 11) for sub, _, _, _ in _fields(data, value_start, value_end))
        operators.add((domain, op_type))
    return nested


def check_aikd_operators(graph: str | os.PathLike | bytes, source: str) -> None:
    """Refuse a graph that holds an operator aikd's exports never contain (control flow, custom operators).

    Raises:
        ValueError: naming ``source`` and the first unknown operators.
    """
    try:
        operators, nested = graph_operators(graph)
    except ValueError as err:
        raise ValueError(f"{source}: not an ONNX model ({err})") from None
    unknown = sorted(f"{domain + '.' if domain else ''}{op}" for domain, op in operators
                     if not (domain in ("", "ai.onnx") and op in AIKD_OPERATORS
                             or domain == "com.microsoft" and op in AIKD_MICROSOFT_OPERATORS))
    if unknown or nested:
        what = f"operators aikd's exports never contain ({', '.join(unknown[:5])})" if unknown else \
            "subgraphs or functions, which aikd's exports never contain"
        raise ValueError(f"{source}: not an aikd export: it holds {what}; refused before running it")


def check_graph_input(session: Any, preprocessing: Any, source: str) -> None:
    """Refuse a graph whose input is not the ``image`` batch its metadata describes (its own shape decides)."""
    inputs = session.get_inputs()
    height, width = preprocessing.input_size
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or len(inputs[0].shape) != 4:
        found = ", ".join(f"{item.name}{list(item.shape)}" for item in inputs)
        raise ValueError(f"{source}: expects inputs {found}, not the one (N, 3, H, W) {INPUT_NAME!r} batch of an "
                         "aikd export")
    for axis, dim, want in zip(("channels", "height", "width"), inputs[0].shape[1:], (3, height, width),
                               strict=True):
        if isinstance(dim, int) and dim != want:
            raise ValueError(f"{source}: its metadata says {axis} {want}, its graph takes {dim}; refused")


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
        # No memory arena: it keeps the largest batch's activations reserved for good, and plain allocation
        # measured no slower (docs/speed.md).
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
        self._jobs: queue.SimpleQueue | None = None

    def metadata(self) -> dict[str, str]:
        """The graph's metadata properties (:func:`metadata_from_properties` parses aikd's)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def output_names(self) -> list[str]:
        return [output.name for output in self.session.get_outputs()]

    def run(self, faces: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for a contiguous float32 (N, C, H, W) batch.

        The work runs in daemon threads while the caller waits: an interrupt (Ctrl-C) or any exception in the
        caller terminates the runs in flight (``RunOptions.terminate``), and the process never waits for them.
        """
        import onnxruntime as ort

        parts = np.array_split(faces, 2) if self.halves and len(faces) >= 2 else [faces]
        options = [ort.RunOptions() for _ in parts]
        futures = [self._submit(part, option) for part, option in zip(parts, options, strict=True)]
        try:
            outputs = [future.result() for future in futures]
        except BaseException:
            for option in options:
                option.terminate = True
            raise
        if len(outputs) == 1:
            return outputs[0]
        return [np.concatenate(pieces) for pieces in zip(*outputs, strict=True)]

    def _submit(self, faces: np.ndarray, options: Any) -> Future:
        """Run ``faces`` on one of this session's daemon workers (started on first use)."""
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            for index in range(2 if self.halves else 1):
                threading.Thread(target=self._work, name=f"aikd-onnxruntime-{index}", daemon=True).start()
        future: Future = Future()
        self._jobs.put((faces, options, future))
        return future

    def _work(self) -> None:
        while True:
            faces, options, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.session.run(None, {INPUT_NAME: faces}, options))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(err)
