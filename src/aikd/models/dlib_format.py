"""dlib's serialisation of deep networks (``*.dat`` files written by ``dlib::serialize(net)``), read without dlib.

The format, as dlib's sources define it (``dlib/serialize.h``, ``dlib/float_details.h``, ``dlib/cuda/tensor.h``,
``dlib/dnn/core.h``, ``layers.h``, ``input.h``, ``loss.h``):

- integer: a control byte (bit 7 set: negative; low 4 bits: the count ``n`` of bytes that follow, 1..8),
  then the magnitude in ``n`` little-endian bytes;
- bool: one ASCII byte, ``'1'`` or ``'0'``;
- string: its length (integer), then its bytes;
- float or double scalar (``float_details``): an integer mantissa, then an integer exponent; the value is
  ``mantissa * 2**exponent`` (exponents 32000, 32001, 32002 stand for +inf, -inf and NaN);
- tensor (version 2): integers version, num_samples, k, nr, nc, then the ``num_samples * k * nr * nc``
  values as **little-endian IEEE float32** -- so the weights decode with one :func:`numpy.frombuffer` per
  tensor; only the few scalars use the mantissa/exponent form;
- alias tensor (version 1): integers version, num_samples, k, nr, nc (a shape into a layer's flat
  parameter tensor, no data).

A network is nested types: ``add_loss_layer<LOSS, add_layer<L1, add_layer<L2, ... input>>>``. The loss layer
writes its version (1), its own record and then its subnetwork; every ``add_layer`` writes its version,
**then its subnetwork**, then its own record; ``tag`` and ``skip`` layers write version 1 and their subnetwork
only. So a file holds the loss record, the layer headers top-down (output to input), the input layer, and
then the layers' records bottom-up (input to output). Each record starts with its version string (``con_4``,
``affine_``, ``relu_``, ...), followed by the layer's fields and the ``add_layer`` book-keeping (three bools
and the saved gradient/output tensors, empty in a released model). Which layer a ``tag``/``skip``/``add_prev``
refers to is part of the C++ type, not of the file: the reader returns the layers in order, and the model
that loads them knows its own wiring (:mod:`aikd.models.dlib_resnet`).

Read here: loss ``loss_metric_``/``loss_metric_2``; input ``input_rgb_image``/``input_rgb_image_sized``; layers
``con_4..6``, ``affine_``/``affine_2``, ``relu_``/``relu_2``, ``max_pool_2``, ``avg_pool_2``, ``add_prev_``,
``fc_2``/``fc_3``. Anything else is refused with the byte offset where it was found.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "INPUT_MEAN_KEY",
    "DlibFormatError",
    "DlibLayer",
    "DlibNetwork",
    "is_dlib_network",
    "is_network_state",
    "network_state",
    "read_dlib_network",
    "state_layers",
]

_TENSOR_VERSION = 2
_ALIAS_VERSION = 1
_INF, _NINF, _NAN = 32000, 32001, 32002  # float_details' special exponents
_CONV_MODE = 0  # dlib::layer_mode: CONV_MODE (one gamma/beta per channel), FC_MODE (one per element)
_FC_HAS_BIAS = 0  # dlib::fc_bias_mode


class DlibFormatError(ValueError):
    """A file that is not a dlib network aikd can read (the message names the file and the byte offset)."""


@dataclass(frozen=True)
class DlibLayer:
    """One layer record of a dlib network.

    Attributes:
        kind: ``con``, ``affine``, ``relu``, ``max_pool``, ``avg_pool``, ``add_prev`` or ``fc``.
        version: the record's version string (``con_4``).
        fields: the layer's settings (``num_filters``, ``nr``, ``nc``, ``stride_y``, ``padding_y``, ...).
        tensors: its parameters, shaped: ``filters`` (out, in, nr, nc) and ``biases`` (out,) of ``con``;
            ``gamma`` and ``beta`` (k,) of ``affine``; ``weights`` (inputs, outputs) and ``biases`` of ``fc``.
        offset: byte offset of the record in the file.
    """

    kind: str
    version: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    offset: int = 0

    def describe(self) -> str:
        """The layer as dlib prints it, e.g. ``con 32 7x7 stride 2 padding 0``."""
        f = self.fields
        try:
            return self._describe(f)
        except KeyError:
            return f"{self.kind} (settings missing)"

    def _describe(self, f: dict[str, Any]) -> str:
        if self.kind == "con":
            return (f"con {f['num_filters']} {f['nr']}x{f['nc']} stride {f['stride_y']} padding {f['padding_y']}")
        if self.kind in ("max_pool", "avg_pool"):
            window = "everything" if f["nr"] == 0 else f"{f['nr']}x{f['nc']} stride {f['stride_y']}"
            return f"{self.kind} {window} padding {f['padding_y']}"
        if self.kind == "fc":
            return f"fc {f['num_outputs']}" + ("" if "biases" in self.tensors else " no bias")
        return self.kind

    def geometry(self) -> list[int]:
        """The settings that shape the layer: ``[nr, nc, stride_y, stride_x, padding_y, padding_x]`` of a
        convolution or pool, ``[num_outputs]`` of ``fc``, ``[]`` otherwise."""
        if self.kind in ("con", "max_pool", "avg_pool"):
            return [int(self.fields[name]) for name in _GEOMETRY]
        if self.kind == "fc":
            return [int(self.fields["num_outputs"])]
        return []


_GEOMETRY = ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")


@dataclass(frozen=True)
class DlibNetwork:
    """A dlib network file: its loss, input and layers (input to output).

    Attributes:
        loss: the loss record's version string and fields (``margin``, ``dist_thresh`` of ``loss_metric_2``).
        input: the input layer's version string and fields (``avg_red``, ``avg_green``, ``avg_blue``, and
            ``nr``, ``nc`` for ``input_rgb_image_sized``).
        layers: the layer records, bottom-up.
        sha256: checksum of the file.
    """

    loss: dict[str, Any]
    input: dict[str, Any]
    layers: tuple[DlibLayer, ...]
    sha256: str


class _Reader:
    """Sequential reader of dlib's primitive encodings over the bytes of one file."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.source, self.position = data, source, 0

    def fail(self, message: str, at: int | None = None) -> DlibFormatError:
        where = self.position if at is None else at
        return DlibFormatError(f"{self.source}: byte {where}: {message}")

    def take(self, count: int, what: str) -> bytes:
        end = self.position + count
        if count < 0 or end > len(self.data):
            raise self.fail(f"file ends inside {what} (needs {count} bytes, {len(self.data) - self.position} left)")
        chunk = self.data[self.position:end]
        self.position = end
        return chunk

    def integer(self, what: str = "an integer") -> int:
        start = self.position
        control = self.take(1, what)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise self.fail(f"expected {what} (dlib integer), found control byte 0x{control:02x}", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def boolean(self, what: str = "a bool") -> bool:
        start = self.position
        byte = self.take(1, what)
        if byte not in (b"0", b"1"):
            raise self.fail(f"expected {what} ('0' or '1'), found {byte!r}", start)
        return byte == b"1"

    def string(self, what: str = "a string") -> str:
        start = self.position
        length = self.integer(what)
        if not 0 <= length <= 256:
            raise self.fail(f"expected {what}, found a length of {length}", start)
        try:
            return self.take(length, what).decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"expected {what}, found non-ASCII bytes", start) from None

    def floating(self, what: str = "a float") -> float:
        start = self.position
        mantissa = self.integer(f"{what} (mantissa)")
        exponent = self.integer(f"{what} (exponent)")
        if exponent == _INF:
            return math.inf
        if exponent == _NINF:
            return -math.inf
        if exponent == _NAN:
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:  # dlib writes floats a double holds: a larger one is a damaged file
            raise self.fail(f"{what} of {mantissa} x 2^{exponent} is beyond a double's range", start) from None

    def shape(self, version: int, what: str) -> tuple[int, int, int, int]:
        start = self.position
        found = self.integer(f"{what} (version)")
        if found != version:
            raise self.fail(f"expected {what} of version {version}, found version {found}", start)
        dims = tuple(self.integer(f"{what} (shape)") for _ in range(4))
        if min(dims) < 0:
            raise self.fail(f"{what} with a negative size {dims}", start)
        return dims  # type: ignore[return-value]

    def tensor(self, what: str = "a tensor") -> np.ndarray:
        dims = self.shape(_TENSOR_VERSION, what)
        count = int(np.prod(dims, dtype=np.int64))
        values = np.frombuffer(self.take(4 * count, what), dtype="<f4", count=count)
        return values.astype(np.float32).reshape(dims)

    def alias(self, what: str = "an alias tensor") -> tuple[int, int, int, int]:
        return self.shape(_ALIAS_VERSION, what)


# --------------------------------------------------------------------------------------------- records
def _split(params: np.ndarray, shapes: dict[str, tuple[int, ...]], reader: _Reader, at: int) -> dict[str, np.ndarray]:
    """Cut a layer's flat parameter tensor into its named, shaped parts (in order)."""
    flat, out, start = params.reshape(-1), {}, 0
    for name, dims in shapes.items():
        count = int(np.prod(dims, dtype=np.int64))
        if start + count > flat.size:
            raise reader.fail(f"parameters hold {flat.size} values, fewer than the layer's shapes need", at)
        out[name] = flat[start:start + count].reshape(dims)
        start += count
    if start != flat.size:
        raise reader.fail(f"parameters hold {flat.size} values, the layer's shapes {start}", at)
    return out


def _multipliers(reader: _Reader) -> dict[str, float]:
    names = ("learning_rate_multiplier", "weight_decay_multiplier", "bias_learning_rate_multiplier",
             "bias_weight_decay_multiplier")
    return {name: reader.floating(name) for name in names}


def _con(reader: _Reader, version: str, at: int) -> DlibLayer:
    params = reader.tensor("con parameters")
    fields: dict[str, Any] = {"num_filters": reader.integer("num_filters")}
    for name in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
        fields[name] = reader.integer(name)
    filters, biases = reader.alias("con filters"), reader.alias("con biases")
    fields.update(_multipliers(reader))
    fields["use_bias"] = reader.boolean("use_bias") if version in ("con_5", "con_6") else True
    if version == "con_6":
        fields["use_relu"] = reader.boolean("use_relu")
    shapes = {"filters": filters, "biases": (biases[1],)} if fields["use_bias"] else {"filters": filters}
    return DlibLayer("con", version, fields, _split(params, shapes, reader, at), at)


def _affine(reader: _Reader, version: str, at: int) -> DlibLayer:
    params = reader.tensor("affine parameters")
    gamma, beta = reader.alias("affine gamma"), reader.alias("affine beta")
    fields: dict[str, Any] = {"mode": reader.integer("affine mode")}
    if version == "affine_2":
        fields["disabled"] = reader.boolean("disabled")
    if fields["mode"] != _CONV_MODE:
        raise reader.fail("affine layer in FC mode (one scale per element): aikd reads per-channel affine layers", at)
    tensors = _split(params, {"gamma": gamma, "beta": beta}, reader, at)
    return DlibLayer("affine", version, fields, {name: value.reshape(-1) for name, value in tensors.items()}, at)


def _pool(kind: str) -> Callable[[_Reader, str, int], DlibLayer]:
    def read(reader: _Reader, version: str, at: int) -> DlibLayer:
        names = ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
        return DlibLayer(kind, version, {name: reader.integer(name) for name in names}, {}, at)

    return read


def _relu(reader: _Reader, version: str, at: int) -> DlibLayer:
    fields = {"disabled": reader.boolean("disabled")} if version == "relu_2" else {}
    return DlibLayer("relu", version, fields, {}, at)


def _add_prev(reader: _Reader, version: str, at: int) -> DlibLayer:
    return DlibLayer("add_prev", version, {}, {}, at)


def _fc(reader: _Reader, version: str, at: int) -> DlibLayer:
    fields: dict[str, Any] = {"num_outputs": reader.integer("num_outputs"), "num_inputs": reader.integer("num_inputs")}
    params = reader.tensor("fc parameters")
    weights, biases = reader.alias("fc weights"), reader.alias("fc biases")
    fields["bias_mode"] = reader.integer("fc bias mode")
    fields.update(_multipliers(reader))
    fields["use_bias"] = reader.boolean("use_bias") if version == "fc_3" else True
    has_bias = fields["bias_mode"] == _FC_HAS_BIAS and fields["use_bias"]
    shapes = {"weights": (fields["num_inputs"], fields["num_outputs"])}
    if weights[:2] != shapes["weights"]:
        raise reader.fail(f"fc weights shaped {weights[:2]}, not (num_inputs, num_outputs) {shapes['weights']}", at)
    if has_bias:
        shapes["biases"] = (biases[1],)
    return DlibLayer("fc", version, fields, _split(params, shapes, reader, at), at)


_LAYERS: dict[str, Callable[[_Reader, str, int], DlibLayer]] = {
    "con_4": _con, "con_5": _con, "con_6": _con,
    "affine_": _affine, "affine_2": _affine,
    "relu_": _relu, "relu_2": _relu,
    "max_pool_2": _pool("max_pool"), "avg_pool_2": _pool("avg_pool"),
    "add_prev_": _add_prev,
    "fc_2": _fc, "fc_3": _fc,
}


def _loss(reader: _Reader) -> dict[str, Any]:
    start = reader.position
    name = reader.string("the loss layer's name")
    if name == "loss_metric_":
        return {"version": name, "margin": 0.1, "dist_thresh": 0.75}  # the values dlib used before storing them
    if name == "loss_metric_2":
        return {"version": name, "margin": reader.floating("margin"), "dist_thresh": reader.floating("dist_thresh")}
    raise reader.fail(f"loss layer {name!r}: aikd reads dlib metric-learning networks (loss_metric_)", start)


def _input(reader: _Reader, name: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"version": name}
    for colour in ("avg_red", "avg_green", "avg_blue"):
        fields[colour] = reader.floating(colour)
    if name == "input_rgb_image_sized":
        fields["nr"], fields["nc"] = reader.integer("input rows"), reader.integer("input columns")
    return fields


# -------------------------------------------------------------------------------------------- network
def _headers(reader: _Reader) -> tuple[list[int], dict[str, Any]]:
    """The version integers of the layers, top-down, up to and including the input layer."""
    versions = []
    while True:
        start = reader.position
        value = reader.integer("a layer version")
        if value > 3:  # not a version: the length of the input layer's name
            reader.position = start
            name = reader.string("the input layer's name")
            if name not in ("input_rgb_image", "input_rgb_image_sized"):
                raise reader.fail(f"input layer {name!r}: aikd reads RGB-image networks (input_rgb_image)", start)
            return versions, _input(reader, name)
        versions.append(value)


def _record(reader: _Reader, bottom_version: int | None) -> DlibLayer:
    """One ``add_layer`` record: the layer, its three book-keeping bools and the tensors dlib saves with it."""
    start = reader.position
    name = reader.string("a layer name")
    if name not in _LAYERS:
        raise reader.fail(f"layer {name!r}: aikd reads {', '.join(sorted(_LAYERS))}", start)
    layer = _LAYERS[name](reader, name, start)
    for what in ("this_layer_setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
        reader.boolean(what)
    reader.tensor("x_grad")
    reader.tensor("cached_output")
    reader.tensor("params_grad" if bottom_version is None else "grad_final")
    if bottom_version == 3:
        reader.integer("sample_expansion_factor")
    return layer


def read_dlib_network(path: str | os.PathLike) -> DlibNetwork:
    """Read a dlib metric-learning network file (e.g. ``dlib_face_recognition_resnet_model_v1.dat``).

    Raises:
        FileNotFoundError: no such file.
        DlibFormatError: not such a file, or a layer aikd does not read (the message gives the byte offset).
    """
    path = Path(path)
    data = path.read_bytes()
    reader = _Reader(data, str(path))
    start = reader.position
    if reader.integer("the loss layer's version") != 1:
        raise reader.fail("not a dlib network file (expected add_loss_layer version 1)", start)
    loss = _loss(reader)
    versions, input_layer = _headers(reader)
    if not versions or versions[-1] not in (2, 3) or any(v not in (1, 2) for v in versions[:-1]):
        raise reader.fail(f"layer versions {sorted(set(versions))}: aikd reads add_layer 2 (bottom 2 or 3), "
                          "tag and skip 1")
    count = sum(v == 2 for v in versions[:-1])  # add_layers above the bottom one; tags and skips (1) hold no record
    layers = [_record(reader, versions[-1])]
    layers += [_record(reader, None) for _ in range(count)]
    if reader.position != len(data):
        raise reader.fail(f"{len(data) - reader.position} bytes left after the last layer")
    return DlibNetwork(loss, input_layer, tuple(layers), hashlib.sha256(data).hexdigest())


def is_dlib_network(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a dlib network file (``add_loss_layer`` version 1, then a ``loss_`` name)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
    except OSError:
        return False
    if len(head) < 8 or head[:2] != b"\x01\x01" or head[2] != 0x01:
        return False
    length = head[3]
    return head[4:4 + min(length, 5)] == b"loss_"


# ------------------------------------------------------------------------------------- as a state dict
_KEY = re.compile(r"^dlib\.(\d{3})\.([a-z_]+)(?:\.([a-z_]+))?$")
INPUT_MEAN_KEY = "dlib.input.mean"


def network_state(network: DlibNetwork) -> dict[str, torch.Tensor]:
    """A dlib network as a flat state dict, the file's own layout (what ``aikd`` reads a ``.dat`` file as).

    Keys, bottom-up: ``dlib.NNN.KIND.NAME`` for the parameters (``filters``, ``biases``, ``gamma``, ``beta``,
    ``weights``), ``dlib.NNN.KIND.geometry`` (int64, :meth:`DlibLayer.geometry`) for layers with settings, an
    empty ``dlib.NNN.KIND`` marker for the others; ``dlib.input.mean`` (float64 R, G, B on 0..255) and
    ``dlib.input.size`` (rows, columns; 0 when the input layer takes any size). :func:`state_layers` inverts it.
    """
    state: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(network.layers):
        prefix = f"dlib.{index:03d}.{layer.kind}"
        for name, value in layer.tensors.items():
            state[f"{prefix}.{name}"] = torch.from_numpy(np.ascontiguousarray(value))
        geometry = layer.geometry()
        state[f"{prefix}.geometry" if geometry else prefix] = torch.tensor(geometry, dtype=torch.int64)
    inputs = network.input
    state[INPUT_MEAN_KEY] = torch.tensor([inputs["avg_red"], inputs["avg_green"], inputs["avg_blue"]],
                                         dtype=torch.float64)
    state["dlib.input.size"] = torch.tensor([inputs.get("nr", 0), inputs.get("nc", 0)], dtype=torch.int64)
    return state


def is_network_state(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is a dlib network laid out by :func:`network_state`."""
    return INPUT_MEAN_KEY in state and any(_KEY.match(key) for key in state)


def state_layers(state: Mapping[str, torch.Tensor]) -> list[DlibLayer]:
    """The layers of a :func:`network_state` dict, bottom-up (their settings as far as the geometry says)."""
    found: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        match = _KEY.match(key)
        if match:
            index, kind, name = int(match.group(1)), match.group(2), match.group(3) or ""
            found.setdefault(index, (kind, {}))[1][name] = value
    layers = []
    for index in sorted(found):
        kind, parts = found[index]
        geometry = [int(v) for v in parts.pop("geometry", torch.zeros(0)).tolist()]
        parts.pop("", None)
        fields: dict[str, Any] = {}
        if kind in ("con", "max_pool", "avg_pool") and len(geometry) == len(_GEOMETRY):
            fields = dict(zip(_GEOMETRY, geometry, strict=True))
            if kind == "con" and "filters" in parts:
                fields["num_filters"] = int(parts["filters"].shape[0])
        elif kind == "fc" and geometry:
            fields = {"num_outputs": geometry[0]}
        tensors = {name: value.numpy() for name, value in parts.items()}
        layers.append(DlibLayer(kind, kind, fields, tensors, index))
    return layers
