"""Image inputs: turn command-line arguments into a list of images, and decode any image to RGB uint8.

Inputs may be image files, folders (searched recursively), glob patterns, list files (``.txt`` with
one path per line, ``.csv`` or ``.parquet`` with a ``path`` column), or insightface validation ``.bin`` sets (each image
keyed ``NAME.bin#000123``, as their pairs name them). Each image gets a *key*: its path relative to the
folder it was found in, or the path exactly as given for files, patterns and list entries. Keys are
what output files contain and what a landmarks file is matched against (:mod:`aikd.names`).

Decoding never trusts the file: empty, truncated, non-image and decompression-bomb files raise
:class:`ImageError` with a one-line reason; grayscale, palette, RGBA, 16-bit and CMYK images are
converted to 8-bit RGB, and EXIF orientation is applied (as OpenCV's ``imread`` does).
"""

from __future__ import annotations

import array
import contextlib
import functools
import glob
import hashlib
import io
import itertools
import logging
import os
import stat
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from aikd.io import RecordFile, chunked, csv_rows, is_stream, open_text, readable_file
from aikd.names import NameIndex, SortedNames

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "ImageError",
    "ImageInput",
    "InputList",
    "collect_inputs",
    "decode_image",
    "input_pixels",
    "load_image",
    "load_input",
    "InputLandmarks",
    "match_landmarks",
    "repeated_hashes",
    "pil_to_rgb",
    "resize_image",
    "use_large_image_blocks",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".csv", ".parquet"})
# Far above any face photo (a 100 MP camera frame), far below what exhausts memory when decoded.
MAX_PIXELS = 120_000_000


class ImageError(ValueError):
    """An input image cannot be used; the message is the reason written to the errors file."""


@dataclass(frozen=True)
class ImageInput:
    """One image to process: ``path`` to read, ``key`` to write in outputs.

    ``member`` is the image's index inside a container file (an insightface validation ``.bin``). ``error``
    marks an input that cannot even be listed (an unreadable folder): it fails with that reason, so it is
    reported in the errors file like any unusable image instead of being skipped in silence.
    """

    path: Path
    key: str
    member: int | None = None
    error: str | None = None


class InputList(Sequence[ImageInput]):
    """The images of a run, in order, held compactly: in a temporary file (:class:`aikd.io.RecordFile`), not as one
    Python object each, so a list of millions of images costs kilobytes of memory. Iterate it (any number of times,
    at once too), take its length, or index it (a slice gives a list).

    Args:
        items: the images (default: none yet; :meth:`append` adds more).
    """

    def __init__(self, items: Iterable[ImageInput] = ()) -> None:
        self._records = RecordFile(4)
        for item in items:
            self.append(item)
        self.close()  # flushed now, so that readers in several threads never flush it at once

    def append(self, item: ImageInput) -> None:
        self._add(os.fspath(item.path), item.key, item.member, item.error)

    def _add(self, path: str, key: str, member: int | None, error: str | None) -> None:
        self._records.append((path, key, "" if member is None else str(member), "" if error is None else f"!{error}"))

    def close(self) -> None:
        """Done appending: what is still buffered goes to the file."""
        self._records.flush()

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[ImageInput]:
        return self.items(0)

    def items(self, start: int = 0) -> Iterator[ImageInput]:
        """The images from position ``start`` on."""
        for path, key, member, error in self._records.records(start):
            yield ImageInput(Path(path), key, int(member) if member else None, error[1:] if error else None)

    def keys(self) -> Iterator[str]:
        """The images' keys, in order (no :class:`ImageInput` made)."""
        return (record[1] for record in self._records)

    def __getitem__(self, position: Any) -> Any:
        if isinstance(position, slice):
            start, stop, step = position.indices(len(self))
            if step != 1:
                return list(self)[position]
            return list(itertools.islice(self.items(start), max(0, stop - start)))
        if not -len(self) <= position < len(self):
            raise IndexError(f"image {position} of {len(self)}")
        return next(self.items(position % len(self)))

    def __reduce__(self) -> tuple[Any, ...]:
        return InputList, (list(self),)  # copied whole into another process: small lists only

    def __repr__(self) -> str:
        return f"InputList({len(self)} images)"


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


# (path, key, member, error, identity): an input as listed, with what it is on disk (its real path; None: never
# one file with another, e.g. a folder that cannot be listed)
_Listed = tuple[str, str, "int | None", "str | None", "tuple[str, int | None] | None"]


def _from_folder(folder: Path) -> Iterator[_Listed]:
    """The images under ``folder``, depth first, names sorted: links are followed, but each real folder is walked
    once (a link back up the tree would loop for ever, one to a sibling would list its images twice); a folder
    that cannot be listed becomes an input that fails with the reason. One ``os.scandir`` per folder; a file is
    looked at again only when it is a link or not a regular file."""
    walked: set[str] = set()
    pending = [(os.fspath(folder), "")]
    while pending:
        root, prefix = pending.pop()
        real = os.path.realpath(root)
        if real in walked:
            continue
        walked.add(real)
        try:
            with os.scandir(root) as listing:
                entries = list(listing)
        except OSError as err:
            where = Path(err.filename or folder)
            key = where.relative_to(folder).as_posix() + "/" if where != folder else f"{folder.as_posix()}/"
            yield os.fspath(where), key, None, f"cannot list this folder: {err.strerror}", None
            continue
        folders, files = [], []
        for entry in entries:
            (folders if _is_folder(entry) else files).append(entry)
        folders.sort(key=lambda entry: (entry.is_symlink(), entry.name))  # real folders before links
        pending.extend((entry.path, f"{prefix}{entry.name}/") for entry in reversed(folders))
        for entry in sorted(files, key=lambda entry: entry.name):
            if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                regular = _is_regular(entry)
                special = None if regular else _not_a_regular_file(Path(entry.path))
                identity = f"{real}/{entry.name}" if regular and not entry.is_symlink() else os.path.realpath(
                    entry.path)
                yield entry.path, prefix + entry.name, None, special, None if special else (identity, None)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # a link to a folder too
    except OSError:
        return False


def _is_regular(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` is no image file to open (a FIFO would block the reader for ever), or ``None``."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # decoding says why
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    return f"not a regular file (a {kind}); skipped"


def _from_list_file(list_file: Path, base: Path | None = None) -> Iterator[_Listed]:
    """The images a list file names, read as they come; relative entries are relative to the list's folder (or
    ``base``)."""
    base = list_file.parent if base is None else base
    with contextlib.ExitStack() as stack:
        if list_file.suffix.lower() == ".parquet":
            names = _parquet_names(list_file)
        else:
            names = _list_names(stack.enter_context(open_text(list_file, "list of images")), list_file)
        for name in names:
            path = name if os.path.isabs(name) else os.path.join(base, name)
            yield path, name, None, None, (os.path.realpath(path), None)


def _parquet_names(list_file: Path) -> Iterator[str]:
    """The ``path`` column of a Parquet manifest (needs pyarrow: the ray extra), a row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{list_file}: reading a Parquet list of images needs pyarrow (pip install "
                         "'aikd[ray]')") from None
    try:
        manifest = pq.ParquetFile(list_file)
        if "path" not in manifest.schema_arrow.names:
            raise ValueError(f"{list_file}: a Parquet list of images needs a path column; it has "
                             f"{', '.join(manifest.schema_arrow.names)}")
        for batch in manifest.iter_batches(columns=["path"], batch_size=8192):
            yield from (name.strip() for name in batch.column(0).to_pylist() if name and name.strip())
    except OSError as err:
        raise ValueError(f"{list_file}: not a Parquet file ({err})") from None


def _list_names(handle: IO[str], list_file: Path) -> Iterator[str]:
    if list_file.suffix.lower() == ".csv":
        reader = csv_rows(handle, list_file, "list of images")
        header = next(reader, [])
        column = header.index("path") if "path" in header else None
        rows: Iterable[list[str]] = reader
        if column is None:  # no header: the first column of every row is a path
            column, rows = 0, itertools.chain([header], reader)
        yield from (row[column].strip() for row in rows if len(row) > column and row[column].strip())
        return
    for line in handle:
        name = line.strip()
        if name and not line.lstrip().startswith("#"):
            if "\x00" in name:
                raise ValueError(f"{list_file}: not a text list of images (it holds binary data)")
            yield name


@functools.lru_cache(maxsize=2)
def _bin_images(path: Path) -> list[bytes]:
    from aikd.evaluation.protocols import read_bin  # numpy + the restricted unpickler only

    return read_bin(path)[0]


def _from_bin(path: Path) -> Iterator[_Listed]:
    """The images of an insightface validation ``.bin``, keyed like its pairs (``lfw.bin#000123``)."""
    from aikd.evaluation.protocols import bin_image_name

    real = os.path.realpath(path)
    for i in range(len(_bin_images(path))):
        yield os.fspath(path), bin_image_name(path, i), i, None, (real, i)


def _from_pattern(text: str) -> Iterator[_Listed]:
    matches = sorted(glob.glob(text, recursive=True))
    if not matches:
        raise ValueError(f"{text}: the pattern matches no file")
    for match in matches:
        if Path(match).is_file() and Path(match).suffix.lower() in IMAGE_SUFFIXES:
            yield match, Path(match).as_posix(), None, None, (os.path.realpath(match), None)


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> InputList:
    """Expand command-line inputs into images, in a stable order, each file once.

    Keys are relative to the folder given, or the path as given for files, patterns and list entries. When
    two folders given hold the same relative names (``good/img_0.png`` and ``g3/img_0.png``), the keys of
    every folder start with the folder as given (``good/img_0.png``), so no image hides another. A file
    reached twice (through a link, or as ``a/x.png`` and ``a/./x.png``) is one input, its first key.

    Memory does not grow with the number of images beyond 8 bytes each while listing (two 32-bit hashes that find
    repeated files and names, which are then checked exactly) and the names of the largest folder; the list itself
    is an :class:`InputList`.

    Raises:
        ValueError: an input does not exist, two different files would share a key, or nothing was found.
    """
    listing = _Listing()
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            listing.add(_from_folder(path), folder=path)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            listing.add(_from_list_file(path))
        elif is_stream(path):  # <(ls ...), /dev/stdin: a list of images, one path per line, read once
            with readable_file(path, "list of images") as readable:
                listing.add(_from_list_file(readable, base=Path(".")))
        elif path.is_file() and path.suffix.lower() == ".bin":
            listing.add(_from_bin(path))
        elif path.is_file():
            listing.add(iter([(text, Path(text).as_posix(), None, None, (os.path.realpath(text), None))]))
        elif _is_pattern(text):
            listing.add(_from_pattern(text))
        else:
            raise ValueError(f"{text}: no such file or folder")
    items = listing.finish()
    if not items:
        raise ValueError(f"no images found in {', '.join(os.fspath(i) for i in inputs) or '(no input)'}")
    return items


class _Listing:
    """The inputs as listed (every group's images, repeats included), with 32-bit hashes of what each is on disk
    and of its key; :meth:`finish` drops repeated files and refuses keys that name two files, exactly."""

    def __init__(self) -> None:
        self.raw = InputList()
        self.identities, self.keys = array.array("I"), array.array("I")
        self.folders: list[tuple[int, int, Path]] = []  # (start, stop, folder given) of each folder's images

    def add(self, listed: Iterator[_Listed], folder: Path | None = None) -> None:
        start = len(self.raw)
        for path, key, member, error, identity in listed:
            self.raw._add(path, key, member, error)
            self.identities.append(hash(identity if identity is not None else (len(self.raw),)) & 0xFFFFFFFF)
            self.keys.append(hash(key) & 0xFFFFFFFF)
        if folder is not None:
            self.folders.append((start, len(self.raw), folder))

    def finish(self) -> InputList:
        dropped = self._repeated_files()
        if dropped:  # said, so that N paths giving fewer rows is never a surprise (links to one file are that file)
            again, first = min(dropped.items())
            log.warning("warning: %d input(s) are a file already listed (the same path again, or a link to it); "
                        "each file is done once, under its first name (e.g. %s is %s)", len(dropped),
                        self.raw._records[again][0], self.raw._records[first][0])
        prefixed = False
        clashes = self._clashes(dropped, prefixed)
        if clashes and len(self.folders) > 1:
            prefixed = True
            self.keys = array.array("I", (hash(key) & 0xFFFFFFFF for key in self._keys(prefixed)))
            clashes = self._clashes(dropped, prefixed)
        if clashes:
            examples = "; ".join(f"{key!r}: {', '.join(str(p) for p in paths[:2])}" for key, paths in clashes[:3])
            raise ValueError(f"{len(clashes)} name(s) stand for different files ({examples}); give them in "
                             "separate runs, or list them by unique names")
        items = InputList()
        for position, ((path, _, member, error), key) in enumerate(zip(self.raw._records, self._keys(prefixed),
                                                                       strict=True)):
            if position not in dropped:
                items._records.append((path, key, member, error))
        items.close()
        return items

    def _keys(self, prefixed: bool) -> Iterator[str]:
        """The keys, those of each folder's images prefixed with the folder as given when ``prefixed``."""
        folders = iter(self.folders if prefixed else [])
        start, stop, folder = next(folders, (-1, -1, None))
        for position, key in enumerate(self.raw.keys()):
            while position >= stop and start >= 0:
                start, stop, folder = next(folders, (-1, -1, None))
            yield f"{folder.as_posix().rstrip('/')}/{key}" if start <= position < stop else key

    def _repeated_files(self) -> dict[int, int]:
        """Positions of images that are a file listed before (its first listing kept), each with that first
        listing's position."""
        wanted = set(repeated_hashes(np.frombuffer(self.identities, dtype=np.uint32)).tolist())
        seen: dict[tuple[str, int | None], int] = {}
        dropped: dict[int, int] = {}
        if not wanted:  # no two records share a hash (the usual case): no pass over the records
            return dropped
        for position, (path, _, member, error) in enumerate(self.raw._records):
            if position in wanted and not error:
                identity = (os.path.realpath(path), int(member) if member else None)
                if identity in seen:
                    dropped[position] = seen[identity]
                else:
                    seen[identity] = position
        return dropped

    def _clashes(self, dropped: Mapping[int, int], prefixed: bool) -> list[tuple[str, list[Path]]]:
        """Keys that name more than one file, in the order they are first met."""
        hashes = np.frombuffer(self.keys, dtype=np.uint32)
        kept = np.ones(len(hashes), dtype=bool)
        kept[list(dropped)] = False
        wanted = set(repeated_hashes(hashes, kept).tolist())
        paths: dict[str, list[Path]] = {}
        if not wanted:
            return []
        for position, (record, key) in enumerate(zip(self.raw._records, self._keys(prefixed), strict=True)):
            if position in wanted:
                paths.setdefault(key, []).append(Path(record[0]))
        return [(key, found) for key, found in paths.items() if len(found) > 1]


def repeated_hashes(hashes: np.ndarray, kept: np.ndarray | None = None, chunk: int = 1 << 16) -> np.ndarray:
    """Positions whose hash occurs more than once (among ``kept``), in order; looked up in chunks, so the
    temporaries stay small."""
    values = hashes[kept] if kept is not None else hashes.copy()
    values.sort()
    repeated = np.unique(values[1:][values[1:] == values[:-1]])
    del values
    if not len(repeated):
        return np.zeros(0, dtype=np.int64)
    found = []
    for start in range(0, len(hashes), chunk):
        part = hashes[start:start + chunk]
        at = np.minimum(np.searchsorted(repeated, part), len(repeated) - 1)
        hit = repeated[at] == part
        if kept is not None:
            hit &= kept[start:start + chunk]
        found.append(np.flatnonzero(hit) + start)
    return np.concatenate(found)


# ---------------------------------------------------------------------------------------------- decoding
def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode as (H, W, 3) RGB uint8: 16-bit scaled, alpha composited onto black."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        gray = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent areas become black, like the border of an aligned crop.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _open(source: io.BytesIO | Path, name: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
                if width == 0 or height == 0:
                    raise ImageError("image has no pixels")
                image.load()
                image = ImageOps.exif_transpose(image)
                return np.ascontiguousarray(pil_to_rgb(image))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image too large (decompression bomb guard): {err}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"cannot decode image: {err}") from None


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as an (H, W, 3) RGB uint8 array.

    Raises:
        ImageError: with a short reason (missing, empty, truncated, not an image, too large).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as err:
        raise ImageError(f"cannot read file: {err.strerror}") from None
    if path.is_dir():
        raise ImageError("is a folder, not an image")
    special = _not_a_regular_file(path)
    if special:
        raise ImageError(special)
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError("cannot read file: permission denied")
    return _open(path, str(path), max_pixels)


def load_input(item: ImageInput, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image of one input: a file, or a member of a container file."""
    if item.error is not None:
        raise ImageError(item.error)
    if item.member is not None:
        return decode_image(_bin_images(item.path)[item.member], item.key, max_pixels)
    return load_image(item.path, max_pixels)


def input_pixels(item: ImageInput) -> int:
    """Width x height of an input from its header alone (0 when it cannot be read: decoding will say why)."""
    if item.error is not None or (item.member is None and _not_a_regular_file(item.path)):
        return 0
    try:
        source = io.BytesIO(_bin_images(item.path)[item.member]) if item.member is not None else item.path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as image:
                return int(image.size[0]) * int(image.size[1])
    except Exception:  # any unreadable input: load_input reports it
        return 0


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) as an (H, W, 3) RGB uint8 array."""
    if not data:
        raise ImageError("empty image data")
    return _open(io.BytesIO(data), source, max_pixels)


def use_large_image_blocks() -> None:
    """Let PIL allocate large images in 64 MB blocks, for a process that decodes photos in several threads.

    With PIL's 16 MB default, glibc serves each decode thread from the thread's own heap arena and keeps the freed
    blocks there, so two threads that decode very large photos one after the other keep far more than one thread
    does (measured: docs/speed.md). 64 MB blocks are mapped and unmapped directly, so memory returns to the system after
    each photo. Process-wide: only an entry point calls it (``aikd``'s, :func:`aikd.cli.main`), never the library.
    """
    if Image.core.get_block_size() < 64 << 20:
        Image.core.set_block_size(64 << 20)


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """The one resize rule of aikd (API, command line, training alike): ``image`` at ``size`` (a side, or
    (height, width)), area averaging when either side shrinks, bilinear when both grow.

    Returns ``image`` itself when it already has that size.
    """
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] > height or image.shape[1] > width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)


# ---------------------------------------------------------------------------------------- landmark lookup
def match_landmarks(
    items: Iterable[ImageInput], table_paths: Sequence[str], landmarks: np.ndarray
) -> tuple[np.ndarray, list[int]]:
    """Landmarks for each input, its key matched to the table's names by :class:`aikd.names.NameIndex`.

    Returns:
        (N, 5, 2) landmarks (NaN rows where nothing matched) and the indices of unmatched items.
    """
    rows = NameIndex(table_paths).find_all([item.key for item in items])
    out = np.full((len(rows), 5, 2), np.nan, dtype=np.float32)
    found = rows >= 0
    out[found] = np.asarray(landmarks)[rows[found]]
    return out, np.flatnonzero(~found).tolist()


KEY_CHUNK = 1 << 16  # keys matched at once to a landmarks file's names


def _key_digest(key: str) -> int:
    """64 bits of a key, the same in every process (Python's ``hash`` of a string is not: decode processes and Ray
    workers are other processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


class InputLandmarks:
    """The landmarks of a run's inputs from a landmarks file, found by key (:mod:`aikd.names`' policy), in memory
    that does not grow by a Python object per image: the points in input order (N, 5, 2 float32) and the keys' sorted
    64-bit digests with their positions (docs/scale.md measures it). The keys are matched a chunk at a time. Only the
    keys of ``items`` are looked up: a key from elsewhere could share a digest (odds about 2^-64 a key).

    Args:
        items: the run's inputs (each key once: :func:`collect_inputs` refuses clashes).
        names: the landmarks file's names (a ``<U`` array: :func:`aikd.io.read_landmark_arrays`).
        points: their (M, 5, 2) landmarks.
    """

    def __init__(self, items: Sequence[ImageInput], names: np.ndarray, points: np.ndarray) -> None:
        # an InputList gives its keys without making an ImageInput (a Path) each
        keys = items.keys() if isinstance(items, InputList) else (item.key for item in items)
        table, points = SortedNames(names), np.asarray(points, dtype=np.float32)
        self.found = np.zeros(len(items), dtype=bool)
        self.points = np.full((len(items), 5, 2), np.nan, dtype=np.float32)
        digests = np.empty(len(items), dtype=np.uint64)
        position = 0
        for chunk in chunked(keys, KEY_CHUNK):
            rows = table.rows(np.array(chunk))  # a chunk of keys as a string array at a time, never all of them
            found, here = rows >= 0, slice(position, position + len(chunk))
            self.found[here] = found
            self.points[here][found] = points[rows[found]]
            digests[here] = [_key_digest(key) for key in chunk]
            position += len(chunk)
        self.order = np.argsort(digests, kind="stable")
        self.digests = digests[self.order]
        same = np.flatnonzero(self.digests[1:] == self.digests[:-1])
        # keys whose digests collide (none in any real set, but then exactly): found by their strings
        self.collided = {items[int(self.order[at])].key: int(self.order[at])
                         for at in np.unique(np.concatenate([same, same + 1]))}

    @property
    def missing(self) -> np.ndarray:
        """Positions of the inputs the file has no landmarks for."""
        return np.flatnonzero(~self.found)

    def find(self, key: str) -> np.ndarray | None:
        """The (5, 2) landmarks of input ``key``; ``None`` where the file has none."""
        position = self.collided.get(key)
        if position is None:
            digest = np.uint64(_key_digest(key))
            at = int(np.searchsorted(self.digests, digest))
            if at >= len(self.digests) or self.digests[at] != digest:
                return None
            position = int(self.order[at])
        return self.points[position] if self.found[position] else None
