"""File formats: atomic writes, CSV tables, quality tables, the safe legacy-pickle reader, embedding files.

Every output aikd writes goes through :func:`atomic_write` (temporary file in the same folder, fsync,
rename), so a run killed at any moment leaves either the old file or the new one, never half of one.

Names round-trip byte for byte. Text files are UTF-8; a file name that is not valid UTF-8 (``bad_\xff.png``
on Linux) is read by Python as a string with escape characters and written back as its original bytes
(:data:`NAME_ERRORS`, Python's ``surrogateescape``), so an output names the very file on disk; JSONL writes
such a name as ``\udcff`` escapes, which JSON readers turn back into the same string. Text inputs are read
the same way, so a Latin-1 landmarks file still parses (its names match files whose names are Latin-1
bytes); a binary file where text is expected is refused with a message naming it.

The official AI-KD code exchanges landmarks and labels as pickles (``{name: (detection, landmarks)}``
and ``{name: score}``). Unpickling a user's file with :mod:`pickle` can run arbitrary code, so
:func:`safe_pickle_load` admits only plain containers, numbers, strings and numpy arrays.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import csv
import io
import itertools
import json
import logging
import math
import os
import pickle
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "NAME_ERRORS",
    "QUALITY_FORMATS",
    "EmbeddingWriter",
    "LabelTable",
    "LandmarkTable",
    "RecordFile",
    "UnsafePickleError",
    "atomic_write",
    "check_archive",
    "chunked",
    "csv_rows",
    "is_stream",
    "load_embeddings",
    "log_repeated",
    "open_text",
    "read_label_arrays",
    "read_labels",
    "read_landmark_arrays",
    "quality_format",
    "read_landmarks",
    "readable_file",
    "safe_pickle_load",
    "safe_pickle_loads",
    "save_embeddings",
    "shortest_float32",
    "warn_repeated",
    "write_csv",
    "write_qualities",
    "write_quality_rows",
]

LANDMARK_COLUMNS = tuple(f"{axis}{i}" for i in range(1, 6) for axis in ("x", "y"))
log = logging.getLogger(__name__)
NAME_ERRORS = "surrogateescape"  # file names that are not UTF-8 keep their bytes (see the module docstring)


def open_text(path: str | os.PathLike, what: str = "file") -> IO[str]:
    """Open a text input (CSV, list, protocol) for reading: UTF-8 (BOM skipped), names' bytes kept.

    Raises:
        ValueError: the file cannot be opened; the message names it and ``what`` it is.
    """
    try:
        return open(path, newline="", encoding="utf-8-sig", errors=NAME_ERRORS)
    except OSError as err:
        raise ValueError(f"{path}: cannot read {what} ({err.strerror})") from None


def csv_rows(handle: IO[str], path: str | os.PathLike, what: str = "CSV file") -> Iterator[list[str]]:
    """The rows of an open CSV file; a binary file (NUL bytes, ...) becomes a ValueError naming it."""
    try:
        for row in csv.reader(handle):
            if any("\x00" in cell for cell in row):
                raise ValueError(f"{path}: not a text {what} (it holds binary data)")
            yield row
    except csv.Error as err:
        raise ValueError(f"{path}: not a text {what} ({err})") from None


# ------------------------------------------------------------------------------------------------ streams
MAX_STREAM_BYTES = 1 << 30  # a pipe read into memory (--landmarks <(...)): far above a 3.3 M-row landmarks file


def is_stream(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a pipe or a character device (``<(cmd)``, ``/dev/stdin``): readable once only."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


@contextlib.contextmanager
def readable_file(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """``path`` as a file that can be read more than once: itself, or for a stream (:func:`is_stream`) a temporary
    copy of what it gives, read once (at most :data:`MAX_STREAM_BYTES`) and removed afterwards.

    Readers open an input more than once (a header first, then the columns); a pipe gives its data only to the
    first reader, so every image would otherwise fail as having no landmarks.

    Raises:
        ValueError: the stream gives more than :data:`MAX_STREAM_BYTES`.
    """
    if not is_stream(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="aikd-stream-") as folder:
        copy = Path(folder) / (Path(path).name or "stream")
        total = 0
        with open(path, "rb") as source, open(copy, "wb") as target:
            while block := source.read(1 << 20):
                total += len(block)
                if total > MAX_STREAM_BYTES:
                    raise ValueError(f"{path}: the {what} stream gives more than {MAX_STREAM_BYTES} bytes; save it to "
                                     "a file")
                target.write(block)
        yield copy


# --------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
        open_kwargs.setdefault("errors", NAME_ERRORS)
        if "newline" not in open_kwargs:
            open_kwargs["newline"] = ""
    # The temporary name stays within NAME_MAX (255 bytes) whatever the length of the final one.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the permissions open() would give
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file atomically (comma separated, header first)."""
    with atomic_write(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------- record files
class RecordFile:
    """Records of ``fields`` strings kept in an anonymous temporary file rather than as Python objects: a list of a
    million image paths costs a few kB of memory. Records are appended, then read in order (each iteration with a
    position of its own; any number at once) or by position (through a sparse table of offsets, one per
    :data:`RecordFile.STRIDE` records). Strings may hold anything but NUL (no path or name can).

    The file disappears when the object is closed or collected.
    """

    STRIDE = 1024  # records between two remembered offsets
    _BLOCK = 1 << 16  # bytes written or read at once (a block read is split into its fields: ~6x its size)

    def __init__(self, fields: int) -> None:
        self.fields = int(fields)
        self._file = tempfile.TemporaryFile(prefix="aikd-records-")
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._size = 0  # bytes written (flushed or not)
        self._count = 0
        self._offsets: list[int] = []  # the offset of every STRIDE-th record

    def append(self, record: Sequence[str]) -> None:
        if len(record) != self.fields:
            raise ValueError(f"a record of {len(record)} fields, expected {self.fields}")
        if self._count % self.STRIDE == 0:
            self._offsets.append(self._size)
        if any("\0" in field for field in record):
            raise ValueError("a record field holds a NUL character")
        data = b"".join(field.encode("utf-8", NAME_ERRORS) + b"\0" for field in record)
        self._buffer.append(data)
        self._buffered += len(data)
        self._size += len(data)
        self._count += 1
        if self._buffered >= self._BLOCK:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._file.write(b"".join(self._buffer))
            self._file.flush()
            self._buffer, self._buffered = [], 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return self.records(0)

    def records(self, start: int = 0) -> Iterator[tuple[str, ...]]:
        """The records from position ``start`` on, in order."""
        self.flush()
        block = start // self.STRIDE
        if block >= len(self._offsets):
            return
        skip, offset, pending, fields = start - block * self.STRIDE, self._offsets[block], b"", []
        fd, size = self._file.fileno(), self._size
        while offset < size:
            data = pending + os.pread(fd, min(self._BLOCK, size - offset), offset)
            offset += len(data) - len(pending)
            parts = data.split(b"\0")
            pending = parts.pop()
            for part in parts:
                fields.append(part.decode("utf-8", NAME_ERRORS))
                if len(fields) == self.fields:
                    if skip:
                        skip -= 1
                    else:
                        yield tuple(fields)
                    fields = []

    def __getitem__(self, position: int) -> tuple[str, ...]:
        if not -self._count <= position < self._count:
            raise IndexError(f"record {position} of {self._count}")
        return next(self.records(position % self._count))

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------------------- restricted pickle
class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something other than plain data (a ValueError: the CLI reports it in one line)."""


# (module, name) pairs a data pickle legitimately needs. Everything else (os.system, eval, arbitrary
# classes) is refused before it can be called.
# Builtins that a pickle may call, each only on data the pickle itself holds (see _from_data): ``bytes(2**31)``
# or ``list(range(10**10))`` would allocate gigabytes from a 50-byte file.
_DATA_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "str", "int", "float", "bool")
_SAFE_GLOBALS = {("builtins", name) for name in _DATA_BUILTINS} | {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("_codecs", "encode"),  # protocol-2 pickles store bytes as latin-1 strings via _codecs.encode
    ("copyreg", "_reconstructor"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
} | {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
    for name in ("_reconstruct", "scalar", "_frombuffer")
} | {("numpy.dtypes", name) for name in dir(getattr(np, "dtypes", None)) if name.endswith("DType")
     and not name.startswith(("Void", "Object", "StringDType", "DateTime", "TimeDelta"))}

_SAFE_RECONSTRUCT_BASES = {list, dict, tuple, set, frozenset, np.ndarray}
# What numpy data in the official formats is made of: booleans, integers, floats, complex numbers and fixed-width
# strings, each element at most this many bytes. A dtype is a size too: numpy.dtype('V2000000000') is 2 GB per
# element, and numpy's scalar() allocates it from a 66-byte pickle.
_DATA_KINDS = frozenset("biufcUS")
MAX_PICKLE_ITEMSIZE = 1 << 16


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Python 2 era pickles (protocol <= 2) name modules the old way: __builtin__, copy_reg.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafePickleError(
                f"refused to load {module}.{name}: only containers, numbers, strings and numpy arrays are allowed"
            )
        if (module, name) == ("copyreg", "_reconstructor"):
            return _checked_reconstructor
        if (module, name) == ("collections", "defaultdict"):
            return _plain_defaultdict
        if (module, name) == ("numpy", "dtype"):
            return _bounded_dtype
        if name == "scalar":
            return _bounded_scalar(super().find_class(module, name))
        found = super().find_class(module, name)
        return _from_data(found) if module == "builtins" or (module, name) == ("collections", "OrderedDict") \
            else found


_DATA_ARGUMENTS = (str, bytes, bytearray, list, tuple, dict, set, frozenset, float, bool)


def _from_data(constructor: type) -> Any:
    """``constructor`` restricted to arguments that are data already in the pickle, never a size or an iterator
    to expand (an ``int`` is accepted only where it is the value itself, as for ``int`` and ``float``)."""

    def build(*args: Any, **kwargs: Any) -> Any:
        numeric = constructor in (int, float, bool)
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not numeric and not isinstance(value, bool):
                raise UnsafePickleError(f"refused {constructor.__name__}({value}): a size, not data")
            if not isinstance(value, (*_DATA_ARGUMENTS, int)):
                raise UnsafePickleError(f"refused {constructor.__name__} of a {type(value).__name__}")
        return constructor(*args, **kwargs)

    return build


def _bounded_dtype(*args: Any, **kwargs: Any) -> np.dtype:
    """``numpy.dtype`` for the data kinds of the official formats only, each element of a bounded size (checked on
    the descriptor, before anything of that size exists)."""
    return _check_dtype(np.dtype(*args, **kwargs))


def _check_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _DATA_KINDS or dtype.fields or dtype.subdtype \
            or dtype.itemsize > MAX_PICKLE_ITEMSIZE:
        raise UnsafePickleError(f"refused numpy dtype {str(dtype)[:40]!r}: only booleans, numbers and strings of at "
                                f"most {MAX_PICKLE_ITEMSIZE} bytes per element")
    return dtype


def _bounded_scalar(scalar: Any) -> Any:
    """``numpy``'s scalar constructor, its dtype checked again when called: a dtype's state (set after it was
    built) can change its size, and a scalar given no data would be allocated at that size."""

    def build(dtype: Any, data: Any = None) -> Any:
        _check_dtype(dtype)
        if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
            raise UnsafePickleError(f"refused a numpy scalar of {str(dtype)[:40]!r} without its {dtype.itemsize} "
                                    "bytes")
        return scalar(dtype, data)

    return build


def _checked_reconstructor(cls: type, base: type, state: Any) -> Any:
    if cls not in _SAFE_RECONSTRUCT_BASES or base not in (object, *_SAFE_RECONSTRUCT_BASES):
        raise UnsafePickleError(f"refused to reconstruct {cls!r}")
    return base.__new__(cls) if state is None else base.__new__(cls, state)


def _plain_defaultdict(default_factory: Any = None, *args: Any) -> dict:
    # A defaultdict's factory would be callable code; plain data needs none of it.
    if default_factory is not None and default_factory not in (list, dict, int, float, str, tuple, set):
        raise UnsafePickleError(f"refused defaultdict factory {default_factory!r}")
    return dict(*args)


def safe_pickle_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` admitting only plain data.

    Raises:
        UnsafePickleError: the pickle references anything but containers, numbers, strings, numpy arrays.
        ValueError: the data is not a readable pickle; the message names ``source``.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{source}: {err}") from None
    except Exception as err:  # truncated, wrong protocol, not a pickle at all
        raise ValueError(f"{source}: not a readable pickle ({type(err).__name__}: {err})") from None


def safe_pickle_load(path: str | os.PathLike) -> Any:
    """Read a legacy pickle file through the restricted unpickler (see :func:`safe_pickle_loads`)."""
    return safe_pickle_loads(Path(path).read_bytes(), source=str(path))


def is_pickle_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".pkl", ".pickle", ".p")


# ------------------------------------------------------------------------------------- landmarks and labels
@dataclass
class LandmarkTable:
    """Five-point landmarks by image name.

    Attributes:
        paths: image names as written in the file (relative to the image root).
        landmarks: (N, 5, 2) float32 in the order left eye, right eye, nose, left mouth, right mouth.
            Values that could not be parsed are NaN; callers validate (see :func:`aikd.align.check_landmarks`).
    """

    paths: list[str]
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def as_dict(self) -> dict[str, np.ndarray]:
        """Name -> landmarks; a name listed more than once keeps its first row."""
        return _first_of_each(self.paths, self.landmarks)


@dataclass
class LabelTable:
    """One quality score per image name (float64; NaN where the value could not be parsed)."""

    paths: list[str]
    qualities: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def as_dict(self) -> dict[str, float]:
        """Name -> quality; a name listed more than once keeps its first row."""
        return _first_of_each(self.paths, self.qualities.tolist())


def _first_of_each(names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name, value in zip(names, values, strict=True):
        table.setdefault(name, value)
    return table


def warn_repeated(names: Sequence[str], source: str | os.PathLike) -> list[str]:
    """Log a warning naming the names ``source`` lists more than once (aikd uses the first of each, everywhere).

    Returns:
        The repeated names, sorted.
    """
    if len(names) < 2:
        return []
    unique, counts = np.unique(np.asarray(names, dtype=str), return_counts=True)  # vectorised: 3 M names
    repeated = unique[counts > 1].tolist()
    log_repeated(repeated, source)
    return repeated


def log_repeated(repeated: Sequence[str], source: str | os.PathLike) -> None:
    """The warning of :func:`warn_repeated` for names already found repeated (sorted)."""
    if len(repeated):
        examples = ", ".join(str(name) for name in repeated[:3]) + (", ..." if len(repeated) > 3 else "")
        log.warning("warning: %s: %d name(s) listed more than once; the first row of each is used (e.g. %s)",
                    source, len(repeated), examples)


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _read_csv_columns(path: Path, wanted: Sequence[str], what: str) -> tuple[list[str], list[list[str]]]:
    """Return the ``path`` column and the ``wanted`` columns (as text) of a headed CSV file."""
    with open_text(path, f"{what} file") as handle:
        reader = csv_rows(handle, path, f"{what} file")
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty {what} file (expected a header: path,{','.join(wanted)})")
        header = [name.strip() for name in header]
        missing = [name for name in ("path", *wanted) if name not in header]
        if missing:
            raise ValueError(
                f"{path}: {what} file lacks column(s) {', '.join(missing)}; header is {','.join(header)}"
            )
        path_col = header.index("path")
        cols = [header.index(name) for name in wanted]
        names: list[str] = []
        values: list[list[str]] = []
        width = max(path_col, *cols) + 1
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < width:
                raise ValueError(f"{path}:{line_no}: expected {len(header)} columns, found {len(row)}")
            names.append(row[path_col])
            values.append([row[c] for c in cols])
    return names, values


def _read_csv_fast(path: Path, columns: Sequence[str], dtype: type) -> tuple[np.ndarray, np.ndarray] | None:
    """Names and numeric columns of a well-formed CSV through numpy's C parser; ``None`` for the slow path.

    Building Python objects per cell costs gigabytes and tens of seconds for a VGGFace2-sized file (docs/speed.md);
    ``np.loadtxt`` parses straight into arrays. Any irregularity (a missing column, a cell that is not a
    number, ragged rows) returns ``None`` and the tolerant reader takes over and reports it.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = [name.strip() for name in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if "path" not in header or any(name not in header for name in columns):
        return None
    options = {"delimiter": ",", "skiprows": 1, "comments": None, "quotechar": '"', "encoding": "utf-8-sig"}
    try:
        with warnings.catch_warnings():  # "input contained no data" for a header-only file
            warnings.simplefilter("ignore", UserWarning)
            values = np.loadtxt(path, usecols=[header.index(c) for c in columns], dtype=dtype, ndmin=2, **options)
            names = np.loadtxt(path, usecols=header.index("path"), dtype=str, ndmin=1, **options)
    except (ValueError, IndexError):
        return None
    if len(names) != len(values):
        return None
    return names, values.reshape(len(names), len(columns))


def read_landmarks(path: str | os.PathLike) -> LandmarkTable:
    """Read landmarks from CSV (``path,x1,y1,...,x5,y5``, extra columns ignored) or the official pickle.

    The pickle is ``{name: (detection, landmarks)}`` or ``{name: landmarks}`` with landmarks shaped (5, 2)
    or (10,) as x1, y1, ..., x5, y5. Names listed more than once are warned about (:func:`warn_repeated`);
    every consumer uses the first row of each.
    """
    with readable_file(path, "landmarks") as readable:
        table = _read_landmarks(readable)
    warn_repeated(table.paths, path)
    return table


def _read_landmarks(path: Path) -> LandmarkTable:
    if is_pickle_path(path):
        data = safe_pickle_load(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict {{name: (detection, landmarks)}}, got {type(data).__name__}")
        names = [str(name) for name in data]
        points = np.full((len(names), 5, 2), np.nan, dtype=np.float32)
        for i, value in enumerate(data.values()):
            if isinstance(value, (tuple, list)) and len(value) == 2 and np.size(value[1]) == 10:
                value = value[1]
            array = np.asarray(value, dtype=np.float32) if np.size(value) == 10 else None
            if array is not None:
                points[i] = array.reshape(5, 2)
        return LandmarkTable(names, points)
    quick = _read_csv_fast(path, LANDMARK_COLUMNS, np.float32)
    if quick is not None:
        return LandmarkTable(quick[0].tolist(), quick[1].reshape(-1, 5, 2))
    names, values = _read_csv_columns(path, LANDMARK_COLUMNS, "landmarks")
    if not names:
        return LandmarkTable([], np.zeros((0, 5, 2), np.float32))
    try:
        points = np.array(values, dtype=np.float32)
    except ValueError:  # some cell is not a number: parse cell by cell, NaN for the bad ones
        points = np.array([[_to_float(v) for v in row] for row in values], dtype=np.float32)
    return LandmarkTable(names, points.reshape(-1, 5, 2))


def read_landmark_arrays(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_landmarks` as arrays, for millions of rows: names (a ``<U`` array) and (N, 5, 2) float32 points. A
    well-formed CSV goes from numpy's parser straight to the arrays, without a Python string per name; names listed
    more than once are left to the caller (:func:`log_repeated`)."""
    with readable_file(path, "landmarks") as readable:
        if not is_pickle_path(readable):
            quick = _read_csv_fast(readable, LANDMARK_COLUMNS, np.float32)
            if quick is not None:
                return quick[0], quick[1].reshape(-1, 5, 2)
        table = _read_landmarks(readable)
    return _name_array(table.paths), table.landmarks


def read_label_arrays(path: str | os.PathLike, column: str = "quality", fmt: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_labels` as arrays (names a ``<U`` array, float64 scores), as :func:`read_landmark_arrays`."""
    fmt = quality_format(path, fmt)
    with readable_file(path, "labels") as readable:
        if fmt == "csv":
            quick = _read_csv_fast(readable, (column,), np.float64)
            if quick is not None:
                return quick[0], quick[1][:, 0]
        table = _read_labels(readable, column, fmt)
    return _name_array(table.paths), table.qualities


def _name_array(names: Sequence[str]) -> np.ndarray:
    return np.array(list(names), dtype=str) if len(names) else np.zeros(0, dtype="<U1")


def read_labels(path: str | os.PathLike, column: str = "quality", fmt: str | None = None) -> LabelTable:
    """Read a quality table: labels (``aikd train``) and scores (``aikd evaluate``) alike.

    Formats (``fmt``, else from the suffix; see :func:`quality_format`): CSV with a ``path`` and a ``column``
    column (what ``aikd score`` and ``aikd label`` write), the official pickle ``{name: score}``, or JSONL, one
    ``{"path": ..., "quality": ...}`` object per line (``aikd score -o scores.jsonl``). Rows are kept in file
    order, repeated names included; repeats are warned about (:func:`warn_repeated`) and every consumer uses
    the first row of each.
    """
    with readable_file(path, "labels") as readable:
        table = _read_labels(readable, column, quality_format(path, fmt))
    warn_repeated(table.paths, path)
    return table


def _read_labels(path: Path, column: str, fmt: str) -> LabelTable:
    if fmt == "pickle":
        data = safe_pickle_load(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict {{name: score}}, got {type(data).__name__}")
        names = [str(name) for name in data]
        scores = np.array([_to_float(str(np.asarray(v).reshape(-1)[0])) if np.size(v) == 1 else np.nan
                           for v in data.values()], dtype=np.float64)
        return LabelTable(names, scores)
    if fmt == "jsonl":
        return _read_jsonl_qualities(path, column)
    if fmt == "parquet":
        return _read_parquet_qualities(path, column)
    quick = _read_csv_fast(path, (column,), np.float64)
    if quick is not None:
        return LabelTable(quick[0].tolist(), quick[1][:, 0])
    names, values = _read_csv_columns(path, (column,), "labels")
    try:
        scores = np.array([row[0] for row in values], dtype=np.float64)
    except ValueError:
        scores = np.array([_to_float(row[0]) for row in values], dtype=np.float64)
    return LabelTable(names, scores)


def _read_jsonl_qualities(path: Path, column: str) -> LabelTable:
    names, scores = [], []
    with open_text(path, "quality file") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                names.append(str(entry["path"]))
                scores.append(float(entry[column]) if entry[column] is not None else math.nan)
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: not a record with path and {column} ({err})") from None
    return LabelTable(names, np.array(scores, dtype=np.float64))


# ------------------------------------------------------------------------------------------ quality files
QUALITY_FORMATS = ("csv", "pickle", "jsonl", "parquet")
_SUFFIX_FORMATS = {".csv": "csv", ".pkl": "pickle", ".pickle": "pickle", ".p": "pickle", ".jsonl": "jsonl",
                   ".parquet": "parquet"}
PARQUET_ROWS = 65_536  # rows per Parquet row group (the rows held at once while writing)


def quality_format(path: str | os.PathLike, requested: str | None = None) -> str:
    """``requested`` if given, else from the suffix (``.pkl``/``.pickle``/``.p`` -> pickle, ``.jsonl``,
    ``.parquet``), else csv."""
    if requested is not None:
        if requested not in QUALITY_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(QUALITY_FORMATS)}, got {requested!r}")
        return requested
    return _SUFFIX_FORMATS.get(Path(path).suffix.lower(), "csv")


def shortest_float32(value: float) -> float:
    """The shortest decimal that reads back to the same float32 (0.1f -> 0.1, not 0.10000000149011612)."""
    return float(str(np.float32(value)))


def write_qualities(path: str | os.PathLike, keys: Sequence[str], qualities: Sequence[float],
                    fmt: str | None = None, columns: Mapping[str, Sequence[Any]] | None = None) -> None:
    """Write a quality table atomically, in the given order: ``csv`` (path,quality), ``pickle`` (the official
    ``{path: score}`` dict), ``jsonl`` or ``parquet`` (needs pyarrow: the ray extra); each value as the shortest
    decimal of its float32, so every format reads back exactly (:func:`read_labels`).

    ``columns`` (name -> one value per key) adds columns after ``quality`` (CSV) or keys (JSONL), e.g. a
    calibration's ``expected_fnmr`` and ``quality_100``; the official pickle has no room for them.
    """
    columns = {name: list(column) for name, column in (columns or {}).items()}
    extra = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)] if columns else None
    rows = ((key, q, extra[i] if extra else None) for i, (key, q) in enumerate(zip(keys, qualities, strict=True)))
    write_quality_rows(path, rows, fmt, list(columns))


def write_quality_rows(path: str | os.PathLike, rows: Iterable[tuple[str, float, Mapping[str, Any] | None]],
                       fmt: str | None = None, columns: Sequence[str] = ()) -> int:
    """:func:`write_qualities` from rows ``(key, quality, extra columns or None)`` as they come: CSV and JSONL are
    written row by row and Parquet a row group at a time (memory does not grow with the number of rows); the
    official pickle, one dict, is built whole. Returns the number of rows."""
    fmt = quality_format(path, fmt)
    if columns and fmt == "pickle":
        raise ValueError(f"{path}: the official pickle holds one score per image; write CSV or JSONL for the "
                         f"columns {', '.join(columns)}")
    count = 0
    if fmt == "pickle":
        # A plain dict of str -> float: nothing a restricted unpickler would refuse.
        data = {str(key): float(shortest_float32(q)) for key, q, _ in rows}
        with atomic_write(path, "wb") as handle:
            handle.write(pickle.dumps(data, protocol=4))
        return len(data)
    if fmt == "parquet":
        return _write_parquet_qualities(path, rows, columns)
    with atomic_write(path) as handle:
        if fmt == "csv":
            writer = csv.writer(handle)
            writer.writerow(("path", "quality", *columns))
            for key, q, extra in rows:
                writer.writerow([key, repr(shortest_float32(q)), *(extra.values() if extra else ())])
                count += 1
        else:
            for key, q, extra in rows:
                handle.write(json.dumps({"path": key, "quality": shortest_float32(q), **(extra or {})}) + "\n")
                count += 1
    return count


def _write_parquet_qualities(path: str | os.PathLike, rows: Iterable[tuple[str, float, Mapping[str, Any] | None]],
                             columns: Sequence[str]) -> int:
    """``path``, ``quality`` (float64 of the shortest float32 decimal, the value a CSV reader gets) and ``columns``,
    a row group of :data:`PARQUET_ROWS` at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count, writer = 0, None
    with atomic_write(path, "wb") as handle:
        for chunk in chunked(rows, PARQUET_ROWS):
            table = {"path": [key for key, _, _ in chunk], "quality": [shortest_float32(q) for _, q, _ in chunk]}
            table.update({name: [extra[name] for _, _, extra in chunk] for name in columns})
            batch = pa.table(table)
            writer = writer or pq.ParquetWriter(handle, batch.schema)
            writer.write_table(batch)
            count += len(chunk)
        if writer is None:
            pq.write_table(pa.table({"path": pa.array([], pa.string()), "quality": pa.array([], pa.float64()),
                                     **{name: pa.array([], pa.float64()) for name in columns}}), handle)
        else:
            writer.close()
    return count


def chunked(values: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``values`` in lists of ``size`` (the last may be shorter), as they come."""
    iterator = iter(values)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _read_parquet_qualities(path: Path, column: str) -> LabelTable:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["path", column])
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a quality table with path and {column} ({err})") from None
    names = [str(name) for name in table.column("path").to_pylist()]
    scores = np.array([math.nan if v is None else float(v) for v in table.column(column).to_pylist()], np.float64)
    return LabelTable(names, scores)


# ------------------------------------------------------------------------------------------------ archives
MAX_INFLATION = 20  # a compressed member may declare at most this many bytes per compressed byte (npz of floats: ~1.1)
MIN_BOMB_BYTES = 1 << 20  # members smaller than this are never a memory problem, whatever their ratio


def check_archive(path: str | os.PathLike, what: str) -> None:
    """Refuse a zip archive (``.npz``, a ``torch.save`` ``.pt``) whose members would inflate far beyond their
    compressed size, from the sizes its directory declares, before anything is decompressed.

    Readers produce no more than a member's declared size (Python's zipfile and torch's reader both stop there),
    so the declared sizes bound what reading can cost. A ``.npy`` member's own header (shape x item size) must
    fit its declared size too. A file that is no zip archive is left to its reader.

    Raises:
        ValueError: a decompression bomb (the message names the file, the member and the sizes).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                inflated = info.compress_type != zipfile.ZIP_STORED
                if inflated and info.file_size > max(MIN_BOMB_BYTES, MAX_INFLATION * info.compress_size):
                    ratio = info.file_size // max(1, info.compress_size)
                    raise ValueError(f"{path}: {what} member {info.filename!r} would inflate from "
                                     f"{info.compress_size} to {info.file_size} bytes ({ratio}:1); refused as a "
                                     "decompression bomb")
                if info.filename.endswith(".npy"):
                    _check_npy_header(archive, info, path, what)
    except (zipfile.BadZipFile, OSError, EOFError):
        return


def _check_npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Any, what: str) -> None:
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(member, max_header_size=10_000)
        except (ValueError, OSError, EOFError):
            return  # not a readable .npy: np.load says why
    needed = math.prod(shape) * dtype.itemsize
    if needed > info.file_size:
        raise ValueError(f"{path}: {what} array {info.filename!r} declares {needed} bytes of data but holds "
                         f"{info.file_size}; refused")


# ------------------------------------------------------------------------------------------- embedding files
def save_embeddings(path: str | os.PathLike, paths: Sequence[str], embeddings: np.ndarray) -> None:
    """Write an embedding file: ``.npz`` with ``paths`` (str) and ``embeddings`` (N, D float32)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(paths):
        raise ValueError(f"embeddings must be (N, D) with N = {len(paths)}, got {embeddings.shape}")
    with atomic_write(path, "wb") as handle:
        np.savez(handle, paths=np.asarray(list(paths), dtype=str), embeddings=embeddings)


class EmbeddingWriter:
    """An embedding file written as the embeddings come (:func:`save_embeddings`' format, the same bytes but the
    zip members' dates): the names and vectors go to temporary files beside ``path`` and are copied into the
    ``.npz`` by :meth:`close`, so memory does not grow with their number.

        with EmbeddingWriter("emb.npz", 512) as writer:
            for key, vector in results:
                writer.add(key, vector)

    An exception inside the ``with`` block leaves ``path`` as it was.
    """

    def __init__(self, path: str | os.PathLike, dim: int) -> None:
        self.path, self.dim, self.count, self._longest = Path(path), int(dim), 0, 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._names = tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name[:200]}.")
        self._vectors = tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name[:200]}.")

    def add(self, key: str, vector: np.ndarray) -> None:
        vector = np.ascontiguousarray(vector, dtype=np.float32).ravel()
        if vector.size != self.dim:
            raise ValueError(f"embedding of {key!r} has {vector.size} values, expected {self.dim}")
        name = key.encode("utf-32-le", "surrogatepass")
        self._names.write(len(name).to_bytes(4, "little") + name)
        self._vectors.write(vector.tobytes())
        self._longest = max(self._longest, len(key))
        self.count += 1

    def close(self) -> None:
        """Write the ``.npz`` (atomically) and remove the temporary files."""
        try:
            with atomic_write(self.path, "wb") as handle, zipfile.ZipFile(handle, mode="w",
                                                                          compression=zipfile.ZIP_STORED,
                                                                          allowZip64=True) as archive:
                with archive.open("paths.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, {"descr": f"<U{self._longest}",
                                                                  "fortran_order": False, "shape": (self.count,)})
                    self._copy_names(member)
                with archive.open("embeddings.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                                  "shape": (self.count, self.dim)})
                    self._vectors.seek(0)
                    while block := self._vectors.read(1 << 22):
                        member.write(block)
        finally:
            self.discard()

    def _copy_names(self, member: IO[bytes]) -> None:
        """Each name UTF-32 encoded and padded with NULs to the longest, as numpy stores a ``<U`` array."""
        width = 4 * self._longest
        self._names.seek(0)
        pending = b""
        while block := self._names.read(1 << 22):
            data, start, out = pending + block, 0, []
            while start + 4 <= len(data):
                size = int.from_bytes(data[start:start + 4], "little")
                if start + 4 + size > len(data):
                    break
                out.append(data[start + 4:start + 4 + size].ljust(width, b"\0"))
                start += 4 + size
            pending = data[start:]
            member.write(b"".join(out))

    def discard(self) -> None:
        self._names.close()
        self._vectors.close()

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read an embedding file written by :func:`save_embeddings` (no pickled objects are loaded; the declared
    sizes are checked first, :func:`check_archive`). Names listed more than once are warned about.

    Raises:
        ValueError: not such a file, a decompression bomb, or values beyond float32's range (naming the file).
    """
    check_archive(path, "embedding file")
    try:
        with np.load(path, allow_pickle=False) as data:
            found = set(data.files)
            if found >= {"paths", "embeddings"}:
                paths = [str(p) for p in data["paths"]]
                embeddings = _as_float32(data["embeddings"], path)
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read embedding file ({err})") from None
    except ValueError as err:  # object arrays (pickled Python objects) are never loaded
        raise ValueError(f"{path}: not an embedding file aikd reads ({err}); expected the string array paths "
                         "and the float array embeddings") from None
    missing = {"paths", "embeddings"} - found
    if missing:
        raise ValueError(f"{path}: embedding file lacks array(s) {', '.join(sorted(missing))}")
    if embeddings.ndim != 2 or len(embeddings) != len(paths):
        raise ValueError(f"{path}: embeddings {embeddings.shape} do not match {len(paths)} paths")
    warn_repeated(paths, path)
    return paths, embeddings


def _as_float32(values: np.ndarray, path: Any) -> np.ndarray:
    """``values`` as float32; values beyond its range are refused with the file named (not a raw RuntimeWarning)."""
    if values.dtype.kind not in "fiub":
        raise ValueError(f"{path}: embeddings of type {values.dtype}, not numbers")
    if values.dtype.kind == "f" and values.dtype.itemsize > 4 and values.size:
        finite = values[np.isfinite(values)]
        if finite.size and np.abs(finite).max() > np.finfo(np.float32).max:
            raise ValueError(f"{path}: embedding values up to {np.abs(finite).max():.3g} exceed float32's range")
    return np.asarray(values, dtype=np.float32)
