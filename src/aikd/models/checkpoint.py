"""Checkpoint files: aikd's own, insightface's and the AI-KD paper's, read without unpickling any code.

Reading accepts
  * aikd checkpoints: ``{"format": "aikd", "format_version": 1, "arch", "preprocessing", "state_dict",
    "extra"}`` saved with :func:`torch.save`, or ``.safetensors`` with the same fields as JSON in the
    header metadata;
  * raw state dicts: an ``arcface_torch`` ``backbone.pth`` (``conv1.weight`` ... ``features.running_var``)
    or the AI-KD release ``aikd-best.pth`` (``feature_extractor.*`` + ``quality_head.*``), also wrapped as
    ``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}`` or ``{"state_dict_backbone":
    ...}`` (arcface_torch, TransFace and SwinFace training checkpoints), with DDP ``module.`` /
    ``torch.compile`` ``_orig_mod.`` prefixes stripped;
  * the other published face-recognition checkpoints the registry knows (AdaFace, MagFace, SwinFace,
    TransFace, ...): each architecture's ``convert`` maps its authors' keys (``model.*``,
    ``features.module.*``) to the module's. What a published file holds besides the recognition network
    (classifier weights, SwinFace's attribute heads) is left out, and the loader says what it left out.

Loading is strict: a file that does not fit is refused with the keys it lacks, the keys it has in excess and
the shapes that differ, and the registered architectures it does fit (:func:`fitting_architectures`).

  * dlib network files (``dlib_face_recognition_resnet_model_v1.dat``), read by :mod:`aikd.models.dlib_format`
    into the file's own layout (``dlib.NNN.KIND.NAME``), which the ``dlib-r29`` spec converts.

Named weights: ``"dlib"`` is the dlib face-recognition model the ``face-recognition-models`` package installs
(:func:`resolve_weights`); ``"none"`` asks :func:`load_fr_model` for random weights.

Pickled files are opened with ``torch.load(weights_only=True)``, which admits tensors and plain containers
only: a file that asks for anything else (a class, ``os.system``) is refused before it can run.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from aikd.io import atomic_write, check_archive
from aikd.models.batchnorm_statistics import calibrate_batchnorm
from aikd.models.dlib_format import is_dlib_network, network_state, read_dlib_network
from aikd.models.dlib_resnet import shipped_weights
from aikd.models.head import QualityHead
from aikd.models.quality import QualityModel
from aikd.models.registry import build_backbone, embedding_size_of, get_spec, list_models, preprocessing_for
from aikd.preprocessing import Preprocessing

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FRModel",
    "fitting_architectures",
    "infer_arch",
    "load_backbone",
    "load_fr_model",
    "load_quality_model",
    "NAMED_WEIGHTS",
    "read_checkpoint",
    "resolve_weights",
    "save_checkpoint",
    "weights_fingerprint",
]

FORMAT = "aikd"
FORMAT_VERSION = 1
BACKBONE_PREFIX = "feature_extractor."
HEAD_PREFIX = "quality_head."
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile
# Where trainers nest the network: generic trainers, PyTorch Lightning (AdaFace), MagFace; arcface_torch,
# TransFace and SwinFace training checkpoints (``state_dict_backbone`` beside the classifier and, for SwinFace,
# the analysis subnets).
_WRAPPED_STATE_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_backbone")

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------- writing
def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    arch: str,
    preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write an aikd checkpoint atomically; ``.safetensors`` suffix -> safetensors, anything else -> torch.

    Args:
        path: output file.
        model: a :class:`QualityModel`, a backbone, a DDP/compiled wrapper of either, or a state dict.
        arch: registered architecture name of the backbone.
        preprocessing: defaults to ``model.preprocessing``, else the architecture's.
        extra: plain data to keep alongside (training step, config, ...): dicts, lists, strings, numbers,
            and for torch files also tensors.

    Returns:
        The path written.
    """
    path = Path(path)
    spec = get_spec(arch)
    model = _unwrap(model)
    state = _strip_wrapper_prefixes(_state_dict_of(model))
    fc = (_part(state, BACKBONE_PREFIX) or state).get("fc.weight")
    preprocessing = preprocessing_for(spec.name, int(fc.shape[0]) if fc is not None else None,
                                      preprocessing or getattr(model, "preprocessing", None))
    state = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    try:
        looks_like = infer_arch(state)
    except ValueError:  # not an iResNet layout we know: trust the caller
        looks_like = spec.name
    if looks_like != spec.name and _layout(get_spec(looks_like)) != _layout(spec):  # r100 = magface-r100 by keys
        raise ValueError(f"{path}: model weights look like arch {looks_like}, but arch {arch!r} was given")
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": spec.name,
              "preprocessing": preprocessing.to_dict(), "extra": extra}
    if path.suffix.lower() == ".safetensors":
        _write_safetensors(path, state, record)
    else:
        with atomic_write(path, "wb") as handle:
            torch.save({**record, "state_dict": state}, handle)
    return path


def _write_safetensors(path: Path, state: StateDict, record: Mapping[str, Any]) -> None:
    """Tensors as safetensors; the record's fields as strings (JSON for structures) in the header metadata."""
    from safetensors.torch import save

    metadata = {}
    for key, value in record.items():
        try:
            metadata[key] = value if isinstance(value, str) else json.dumps(value)
        except TypeError as err:
            raise ValueError(f"{path}: safetensors metadata must be JSON; {key} holds {err}") from None
    with atomic_write(path, "wb") as handle:
        handle.write(save(state, metadata=metadata))


def _unwrap(model: Any) -> Any:
    """The model inside a (Distributed)DataParallel (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _state_dict_of(model: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    if isinstance(model, Mapping):
        return dict(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"save_checkpoint expects a model or a state dict, got {type(model).__name__}")
    return model.state_dict()


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would refuse to read back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"checkpoint {where}: keys must be strings or integers, got {key!r}")
            _check_plain(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise ValueError(f"checkpoint {where}: only plain data can be saved, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Read a checkpoint file without unpickling any code.

    Returns:
        ``(state_dict, meta)``: tensors with wrapper prefixes stripped; ``meta`` has ``source``,
        ``format`` (``"aikd"``, ``"state_dict"``, ``"safetensors"`` or ``"dlib"``), ``format_version``, ``arch`` and
        ``preprocessing`` (``None`` when the file does not say), ``extra`` (a dict), ``nested_in`` (the entry
        of the file that held the state dict, e.g. ``"state_dict_backbone"``, or ``None``) and ``left_out``
        (the file's other state dicts, e.g. SwinFace's ``state_dict_fam``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, not a plain weights file, or not a model state dict (message names the file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a checkpoint file")
    if is_dlib_network(path):
        network = read_dlib_network(path)
        return network_state(network), {"source": str(path), **_meta("dlib", extra={"sha256": network.sha256})}
    if _is_safetensors(path):
        state, meta = _read_safetensors(path)
    else:
        state, meta = _interpret(_torch_load(path), path)
    return _strip_wrapper_prefixes(state), {"source": str(path), **meta}


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    with open(path, "rb") as handle:  # 8-byte little-endian header length, then a JSON header
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def _torch_load(path: Path) -> Any:
    check_archive(path, "checkpoint")  # declared sizes first: a deflated member could inflate to gigabytes
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": irrelevant to a refusal or a success
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" not in text:
            raise ValueError(f"{path}: not a readable checkpoint ({text.splitlines()[0]})") from None
        found = re.search(r"Unsupported[^\n]*|unsupported GLOBAL \S+", text)
        reason = f" ({found.group(0).strip()})" if found else ""
        raise ValueError(
            f"{path}: not a plain weights file: it holds Python objects{reason}, and aikd will not "
            "unpickle it because unpickling can run arbitrary code; re-save it as a state dict of tensors "
            "(torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from None
    except Exception as err:  # truncated zip, not a pickle at all, ...
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    if metadata.get("format") != FORMAT:
        return state, _meta("safetensors")
    try:
        version = int(metadata.get("format_version", "0"))
        preprocessing = json.loads(metadata["preprocessing"]) if "preprocessing" in metadata else None
        extra = json.loads(metadata.get("extra", "{}"))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: malformed aikd metadata in the safetensors header ({err})") from None
    _check_version(version, path)
    return state, _meta(FORMAT, version, metadata.get("arch"), preprocessing, extra)


def _interpret(obj: Any, path: Path) -> tuple[StateDict, dict[str, Any]]:
    """Find the state dict (and our metadata) in whatever ``torch.load`` returned."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        _check_version(version, path)
        state = obj.get("state_dict")
        if not _is_state_dict(state):
            raise ValueError(f"{path}: aikd checkpoint without a state_dict of tensors")
        extra = obj.get("extra") or {}
        meta = _meta(FORMAT, version, obj.get("arch"), obj.get("preprocessing"), dict(extra))
        return dict(state), meta
    if _is_state_dict(obj):
        return dict(obj), _meta("state_dict")
    if isinstance(obj, Mapping):
        for key in _WRAPPED_STATE_KEYS:
            if _is_state_dict(obj.get(key)):
                others = [str(name) for name, value in obj.items() if name != key and _is_state_dict(value)]
                return dict(obj[key]), _meta("state_dict", nested_in=key, left_out=others)
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise ValueError(f"{path}: not a model checkpoint: a dict with keys {keys}, "
                         "but no state dict of tensors")
    raise ValueError(f"{path}: not a model checkpoint: holds a {type(obj).__name__}, not a state dict")


def _meta(
    fmt: str, version: int | None = None, arch: str | None = None,
    preprocessing: Mapping[str, Any] | None = None, extra: dict[str, Any] | None = None,
    nested_in: str | None = None, left_out: list[str] | None = None,
) -> dict[str, Any]:
    return {"format": fmt, "format_version": version, "arch": arch, "preprocessing": preprocessing,
            "extra": extra or {}, "nested_in": nested_in, "left_out": left_out or []}


def _check_version(version: Any, path: Path) -> None:
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: aikd checkpoint with an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer aikd (format_version {version}; this one reads "
                         f"{FORMAT_VERSION}); upgrade aikd")


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> StateDict:
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def weights_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state (names, shapes, dtypes, values): which weights made a cache or an output."""
    import hashlib

    digest = hashlib.sha256(b"aikd-teacher-v1")  # the prefix keeps existing teacher caches valid
    state = model.state_dict() if isinstance(model, nn.Module) else model
    for name, tensor in state.items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- recognising architecture
def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Registered architecture of a state dict: the first whose family recognises it (``ModelSpec.matches``:
    AdaFace, MagFace, SwinFace, ViT and TransFace layouts, as published or as aikd saves them), else the iResNet
    whose block counts and width it has.

    Accepts a backbone state dict or a quality model's (``feature_extractor.*`` keys). Failing both, the first
    architecture it fits exactly (:func:`fitting_architectures`). Architectures with the same keys and shapes
    (``r100``, ``elasticface-r100``, a bare ``magface-r100`` backbone) cannot be told apart: the first
    registered is returned; name the architecture for another one's preprocessing.

    Raises:
        ValueError: no family recognises it, it is not an iResNet state dict of a registered iResNet, and it
            fits no registered architecture exactly.
    """
    state = _strip_wrapper_prefixes(state_dict)
    state = _part(state, BACKBONE_PREFIX) or state
    for name in list_models():  # families that recognise their own published layouts
        spec = get_spec(name)
        if spec.matches is not None and spec.matches(state):
            return spec.name
    stem = state.get("conv1.weight")
    stages: list[set[int]] = [set() for _ in range(4)]
    for key in state:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stages[int(match.group(1)) - 1].add(int(match.group(2)))
    if stem is None or stem.ndim != 4 or not all(stages):
        first = ", ".join(list(state)[:4])
        problem = (f"not an iResNet state dict (expected conv1.weight and layer1..layer4 keys; "
                   f"first keys: {first})")
    else:
        layers = tuple(max(blocks) + 1 for blocks in stages)
        width = int(stem.shape[0])
        for name in list_models():
            spec = get_spec(name)
            if spec.layers == layers and spec.width == width and spec.family == "iresnet":
                return spec.name
        problem = (f"an iResNet with blocks {list(layers)} and width {width} matches no registered "
                   f"architecture (known: {', '.join(list_models())})")
    fits = fitting_architectures(state)  # last resort: a registered layout it fits key for key
    if fits:
        return fits[0]
    raise ValueError(problem)


def _looks_like(state: Mapping[str, torch.Tensor]) -> str:
    try:
        return f"the file looks like {infer_arch(state)}"
    except ValueError as err:
        return f"the file does not look like a registered architecture ({err})"


@functools.cache
def _layout(spec: Any) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict ``spec`` builds (on the meta device: nothing allocated)."""
    with torch.device("meta"):
        module = spec.builder()
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _converted(spec: Any, state: Mapping[str, torch.Tensor]) -> StateDict:
    return spec.convert(dict(state)) if spec.convert is not None else dict(state)


def fitting_architectures(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered architectures a state dict fits exactly (after each one's ``convert``): same keys, same shapes.

    Accepts what :func:`read_checkpoint` returns for a published file, or a quality model's state dict. Every
    architecture is built once on the meta device to learn its layout, so this allocates nothing.
    """
    state = _strip_wrapper_prefixes(state_dict)
    state = _part(state, BACKBONE_PREFIX) or state
    fits = []
    for name in list_models():
        spec = get_spec(name)
        try:
            layout = _layout(spec)
            converted = _converted(spec, state)
        except Exception:  # a builder that cannot run on the meta device, a key mapping for other files
            continue
        if converted.keys() == layout.keys() and all(tuple(v.shape) == layout[k] for k, v in converted.items()):
            fits.append(spec.name)
    return fits


def _suggestion(state: Mapping[str, torch.Tensor], arch: str) -> str:
    """What a file that does not fit ``arch`` does fit, in words."""
    fits = [name for name in fitting_architectures(state) if name != arch]
    if fits:
        return f"the file looks like {' or '.join(fits)} (its keys and shapes fit exactly)"
    return _looks_like(state)


def _part(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _resolve_arch(requested: str | None, recorded: str | None, state: StateDict, source: str) -> str:
    """Architecture: the file's own record, else the caller's, else inferred from the keys."""
    try:
        name = get_spec(requested).name if requested is not None else None
        saved = get_spec(recorded).name if recorded is not None else None
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if name is not None and saved is not None and name != saved:
        raise ValueError(f"{source}: saved as arch {recorded!r}, but arch {requested!r} was requested")
    if name or saved:
        return name or saved
    try:
        return infer_arch(state)
    except ValueError as err:
        raise ValueError(f"{source}: cannot tell the architecture: {err}; pass arch explicitly") from None


# --------------------------------------------------------------------------------------------------- loading
def _load_strictly(module: nn.Module, state: StateDict, source: str, arch: str,
                   published: Mapping[str, torch.Tensor] | None = None, assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with an error that says what differs and what the file does fit.

    Args:
        module: the model to load into.
        state: the file's tensors under the module's key names.
        source: the file, for messages.
        arch: the architecture ``module`` is.
        published: the file's tensors as read (before ``convert``), to say which architectures it fits.
        assign: make ``state``'s tensors the module's own (``load_state_dict(assign=True)``), cast to the
            module's dtypes; ``module`` may then live on the meta device.
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected if key in state and state[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
        for what, items in (("missing key(s) the model needs", missing),
                            ("unexpected key(s) the model does not have", unexpected),
                            ("shape mismatch(es)", mismatched)) if items
    ]
    if problems:
        raise ValueError(f"{source}: weights do not fit arch {arch}: {'; '.join(problems)}; "
                         f"{_suggestion(published if published is not None else state, arch)}")
    broken = _non_finite(state)
    if broken:
        raise ValueError(f"{source}: {len(broken)} weight tensor(s) hold NaN or infinite values (e.g. {broken[0]}): "
                         "the file is damaged, or the run that wrote it diverged")
    if assign:  # the file's tensors become the module's: no second copy of the weights in memory
        state = {key: value if value.dtype == expected[key].dtype else value.to(expected[key].dtype)
                 for key, value in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)


def _non_finite(state: StateDict) -> list[str]:
    """Keys of floating tensors holding NaN or inf. One fused norm over all tensors first (a few hundred
    separate checks are slow on a busy CPU); a non-finite norm is then confirmed element-wise (a norm can
    overflow where no element does)."""
    keys = [key for key, value in state.items() if value.is_floating_point() and value.numel()]
    if not keys:
        return []
    norms = torch.stack([norm.float() for norm in torch._foreach_norm([state[key] for key in keys], ord=2)])
    suspects = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
    return [keys[i] for i in suspects if not torch.isfinite(state[keys[i]]).all()]


# Initialisers a file's tensors replace: torch.nn.init's public in-place functions, and the Tensor methods that
# modules call directly (or that the init functions without a torch-function hook call).
_INITIALISERS = frozenset(getattr(nn.init, name) for name in dir(nn.init)
                          if name.endswith("_") and not name.startswith("_"))
_TENSOR_FILLS = frozenset(getattr(torch.Tensor, name) for name in (
    "normal_", "uniform_", "fill_", "zero_", "bernoulli_", "exponential_", "geometric_", "log_normal_",
    "cauchy_", "random_", "erfinv_", "clamp_", "mul_", "add_", "copy_", "orthogonal_") if hasattr(torch.Tensor, name))


class _SkipInitOnMeta(TorchFunctionMode):
    """Skip random initialisation of meta tensors while a module whose every tensor a file will replace is built.

    On the meta device initialisers only cost time (the first ``normal_`` there runs torch's Python reference
    kernels: most of a large model's start-up, docs/speed.md). A torch-function mode is per thread, so only the
    thread that loads is affected: a module another thread builds meanwhile is initialised as usual, and nothing is
    patched.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _INITIALISERS or func in _TENSOR_FILLS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _build_and_load(build: Callable[[], nn.Module], state: StateDict, source: str, arch: str, owned: bool,
                    published: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """``build()`` loaded strictly with ``state``; ``owned``: the tensors were read from a file here.

    Owned tensors are assigned into a module built on the meta device: no random initialisation (seconds
    for the large models) and no second copy of the weights, which halves the peak memory of loading. A
    caller's own state dict is copied as usual, so the model never shares storage with it. Modules holding
    tensors that no file carries (non-persistent buffers) are built normally.
    """
    if owned:
        with torch.device("meta"), _SkipInitOnMeta():
            module = build()
        if {name for name, _ in module.named_buffers()} <= set(module.state_dict()):
            _load_strictly(module, state, source, arch, published, assign=True)
            if not any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
                return module
    module = build()
    _load_strictly(module, state, source, arch, published)
    return module


NAMED_WEIGHTS = {"dlib": shipped_weights}
"""Weights that installed packages ship, by the name ``--weights`` takes: name -> where the file is."""


def resolve_weights(weights: str | os.PathLike) -> Path:
    """The file ``weights`` names: a path as it is, or a name from :data:`NAMED_WEIGHTS` (``dlib``).

    Raises:
        ValueError: a named model whose package is not installed.
    """
    name = str(weights).strip()
    return NAMED_WEIGHTS[name]() if name in NAMED_WEIGHTS else Path(weights)


def _read_any(
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
) -> tuple[StateDict, dict[str, Any], str]:
    if isinstance(weights, Mapping):
        if not _is_state_dict(weights):
            raise ValueError("expected a state dict mapping parameter names to tensors")
        return _strip_wrapper_prefixes(weights), _meta("state_dict"), "<state dict>"
    path = resolve_weights(weights)
    state, meta = read_checkpoint(path)
    return state, meta, str(path)


def load_backbone(
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Backbone (eval mode) from a backbone state dict/file or a quality model's ``feature_extractor`` part.

    Args:
        weights: a checkpoint path or a state dict.
        arch: architecture; by default the file's record, else inferred from the keys.
        map_location: device to put the model on.
    """
    state, meta, source = _read_any(weights)
    backbone, _, notes = _load_backbone(state, meta, source, arch, owned=not isinstance(weights, Mapping))
    _say(source, notes)
    return backbone.to(map_location).eval()


def _say(source: str, notes: list[str]) -> None:
    for note in notes:
        log.warning("note: %s: %s", source, note)


def _load_backbone(state: StateDict, meta: Mapping[str, Any], source: str,
                   arch: str | None, owned: bool = False) -> tuple[nn.Module, str, list[str]]:
    """The backbone, its architecture and notes on what of the file was left out."""
    published = _part(state, BACKBONE_PREFIX) or state
    arch = _resolve_arch(arch, meta.get("arch"), published, source)
    spec = get_spec(arch)
    state = published
    if spec.convert is not None and meta.get("format") != FORMAT:  # as its authors publish it -> our module keys
        state = spec.convert(dict(published))
    fc = state.get("fc.weight") if spec.family == "iresnet" else None
    size = {"num_features": int(fc.shape[0])} if fc is not None else {}
    model = _build_and_load(lambda: build_backbone(arch, **size), state, source, arch, owned, published)
    return model, arch, _left_out(published, state, meta, arch)


def _left_out(published: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
              arch: str) -> list[str]:
    """Notes on what a published file holds besides the recognition network, which was not loaded."""
    notes = []
    if meta.get("left_out"):
        notes.append(f"took the network from '{meta['nested_in']}'; left out {', '.join(meta['left_out'])} "
                     f"(not part of {arch}'s recognition network)")
    kept = {id(value) for value in state.values()}
    dropped = [key for key, value in published.items() if id(value) not in kept]
    if dropped:
        shown = ", ".join(dropped[:4]) + (", ..." if len(dropped) > 4 else "")
        notes.append(f"left out {len(dropped)} tensor(s) not part of {arch}'s recognition network "
                     f"(training-only heads: {shown})")
    return notes


@dataclass
class FRModel:
    """A face-recognition backbone with what comes with it.

    Attributes:
        backbone: the network, in eval mode.
        preprocessing: the input it expects (:func:`aikd.models.registry.preprocessing_for`).
        arch: its registered architecture.
        random: whether its weights are random (``weights="none"``): for tests and demos only.
        notes: what of the file was left out (e.g. SwinFace's attribute heads, AdaFace's margin head); also
            logged as warnings of the ``aikd.models.checkpoint`` logger when loading.
    """

    backbone: nn.Module
    preprocessing: Preprocessing
    arch: str
    random: bool = False
    notes: list[str] = field(default_factory=list)


def load_fr_model(
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str | None = None,
    *,
    seed: int = 0,
    map_location: str | torch.device = "cpu",
) -> FRModel:
    """The face-recognition model every command that needs one loads (``label``, ``train``'s teacher, ``embed``).

    Args:
        weights: a registered architecture's file as its authors publish it (insightface ``backbone.pth``,
            AdaFace ``.ckpt``, MagFace, SwinFace, TransFace, dlib's ``dlib_face_recognition_resnet_model_v1.dat``,
            ... files), an aikd or AI-KD quality checkpoint (its backbone is taken), a ``.safetensors`` file, a
            state dict; ``"dlib"``: that dlib file as the ``face-recognition-models`` package installs it; or
            ``"none"``: random weights seeded by ``seed``, with BatchNorm calibrated on noise (tests and demos
            only: its embeddings mean nothing).
        arch: architecture; by default the file's record, else inferred from the keys; required for ``none``.
        seed: seed of random weights.
        map_location: device to put the model on.

    Raises:
        ValueError: unreadable or unsafe weights, or weights that fit no (or not the named) architecture.
    """
    if isinstance(weights, (str, os.PathLike)) and str(weights).strip().lower() == "none":
        if not arch:
            raise ValueError("weights none builds random weights: name the architecture (e.g. tiny)")
        name = get_spec(arch).name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(name)
        calibrate_batchnorm(backbone, batches=4, batch_size=8, seed=seed)
        preprocessing = preprocessing_for(name, embedding_size_of(backbone))
        return FRModel(backbone.to(map_location).eval(), preprocessing, name, random=True)
    state, meta, source = _read_any(weights)
    backbone, name, notes = _load_backbone(state, meta, source, arch, owned=not isinstance(weights, Mapping))
    try:
        preprocessing = preprocessing_for(name, embedding_size_of(backbone), meta.get("preprocessing"))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    _say(source, notes)
    return FRModel(backbone.to(map_location).eval(), preprocessing, name, notes=notes)


def load_quality_model(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str | None = None,
    map_location: str | torch.device = "cpu",
) -> QualityModel:
    """Quality model (in eval mode) from an aikd checkpoint or the AI-KD paper's ``aikd-best.pth``.

    Args:
        checkpoint: a checkpoint path, or a state dict with ``feature_extractor.*`` + ``quality_head.*`` keys.
        arch: backbone architecture; by default the file's record, else inferred from the keys.
        map_location: device to put the model on.
    """
    state, meta, source = _read_any(checkpoint)
    head_state = _part(state, HEAD_PREFIX)
    backbone_state = _part(state, BACKBONE_PREFIX)
    if not head_state:
        raise ValueError(
            f"{source}: has no quality head (no quality_head.* keys): it is a backbone-only checkpoint "
            f"({_looks_like(state)}); load it with load_backbone(), or train a quality model on it "
            "with aikd train"
        )
    if not backbone_state or "l1.weight" not in head_state or "l2.weight" not in head_state:
        raise ValueError(f"{source}: expected feature_extractor.* keys and quality_head.l1/l2 weights; "
                         f"found keys such as {', '.join(list(state)[:4])}")
    arch = _resolve_arch(arch, meta.get("arch"), backbone_state, source)
    hidden, in_features = head_state["l1.weight"].shape
    fc = backbone_state.get("fc.weight")
    size = {"num_features": int(fc.shape[0])} if fc is not None else {}
    try:
        preprocessing = preprocessing_for(arch, int(in_features), meta.get("preprocessing"))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None

    def build() -> QualityModel:
        head = QualityHead(int(in_features), int(hidden), int(head_state["l2.weight"].shape[0]))
        return QualityModel(build_backbone(arch, **size), head, arch=arch, preprocessing=preprocessing)

    model = _build_and_load(build, state, source, arch, owned=not isinstance(checkpoint, Mapping))
    calibration = meta.get("extra", {}).get("calibration")
    model.calibration = dict(calibration) if isinstance(calibration, Mapping) else None  # aikd calibrate --checkpoint
    return model.to(map_location).eval()
