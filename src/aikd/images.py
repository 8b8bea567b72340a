"""Image inputs: turn command-line arguments into a list of images, and decode any image to RGB uint8.

Inputs may be image files, folders (searched recursively), glob patterns, list files (``.txt`` with
one path per line, ``.csv`` with a ``path`` column), or insightface validation ``.bin`` sets (each image
keyed ``NAME.bin#000123``, as their pairs name them). Each image gets a *key*: its path relative to the
folder it was found in, or the path exactly as given for files, patterns and list entries. Keys are
what output files contain and what a landmarks file is matched against (:mod:`aikd.names`).

Decoding never trusts the file: empty, truncated, non-image and decompression-bomb files raise
:class:`ImageError` with a one-line reason; grayscale, palette, RGBA, 16-bit and CMYK images are
converted to 8-bit RGB, and EXIF orientation is applied (as OpenCV's ``imread`` does).
"""

from __future__ import annotations

import functools
import glob
import io
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from aikd.io import csv_rows, is_stream, open_text, readable_file
from aikd.names import NameIndex

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "ImageError",
    "ImageInput",
    "collect_inputs",
    "decode_image",
    "input_pixels",
    "load_image",
    "load_input",
    "match_landmarks",
    "pil_to_rgb",
    "resize_image",
    "use_large_image_blocks",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".csv"})
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


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _from_folder(folder: Path) -> list[ImageInput]:
    """The images under ``folder``: links are followed, but each real folder is walked once (a link back up
    the tree would loop for ever, one to a sibling would list its images twice); a folder that cannot be
    listed becomes an input that fails with the reason."""
    found: list[ImageInput] = []
    walked: set[str] = set()

    def unreadable(err: OSError) -> None:
        where = Path(err.filename or folder)
        key = where.relative_to(folder).as_posix() + "/" if where != folder else f"{folder.as_posix()}/"
        found.append(ImageInput(where, key, error=f"cannot list this folder: {err.strerror}"))

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        dirs.sort(key=lambda name: (os.path.islink(os.path.join(root, name)), name))  # real folders before links
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                full = Path(root) / name
                key = full.relative_to(folder).as_posix()
                special = _not_a_regular_file(full)
                found.append(ImageInput(full, key, error=special) if special else ImageInput(full, key))
    return found


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


def _from_list_file(list_file: Path, base: Path | None = None) -> list[ImageInput]:
    """The images a list file names; relative entries are relative to the list's folder (or ``base``)."""
    base = list_file.parent if base is None else base
    with open_text(list_file, "list of images") as handle:
        if list_file.suffix.lower() == ".csv":
            reader = csv_rows(handle, list_file, "list of images")
            header = next(reader, [])
            column = header.index("path") if "path" in header else None
            if column is None:  # no header: the first column of every row is a path
                column, rows = 0, [header, *reader]
            else:
                rows = list(reader)
            names = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
        else:
            names = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
            if any("\x00" in name for name in names):
                raise ValueError(f"{list_file}: not a text list of images (it holds binary data)")
    return [ImageInput(Path(name) if os.path.isabs(name) else base / name, name) for name in names]


@functools.lru_cache(maxsize=2)
def _bin_images(path: Path) -> list[bytes]:
    from aikd.evaluation.protocols import read_bin  # numpy + the restricted unpickler only

    return read_bin(path)[0]


def _from_bin(path: Path) -> list[ImageInput]:
    """The images of an insightface validation ``.bin``, keyed like its pairs (``lfw.bin#000123``)."""
    from aikd.evaluation.protocols import bin_image_name

    return [ImageInput(path, bin_image_name(path, i), member=i) for i in range(len(_bin_images(path)))]


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[ImageInput]:
    """Expand command-line inputs into images, in a stable order, each file once.

    Keys are relative to the folder given, or the path as given for files, patterns and list entries. When
    two folders given hold the same relative names (``good/img_0.png`` and ``g3/img_0.png``), the keys of
    every folder start with the folder as given (``good/img_0.png``), so no image hides another. A file
    reached twice (through a link, or as ``a/x.png`` and ``a/./x.png``) is one input, its first key.

    Raises:
        ValueError: an input does not exist, two different files would share a key, or nothing was found.
    """
    groups: list[tuple[Path | None, list[ImageInput]]] = []  # (folder given, its images)
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            groups.append((path, _from_folder(path)))
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            groups.append((None, _from_list_file(path)))
        elif is_stream(path):  # <(ls ...), /dev/stdin: a list of images, one path per line, read once
            with readable_file(path, "list of images") as readable:
                groups.append((None, _from_list_file(readable, base=Path("."))))
        elif path.is_file() and path.suffix.lower() == ".bin":
            groups.append((None, _from_bin(path)))
        elif path.is_file():
            groups.append((None, [ImageInput(path, Path(text).as_posix())]))
        elif _is_pattern(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise ValueError(f"{text}: the pattern matches no file")
            groups.append((None, [ImageInput(Path(m), Path(m).as_posix()) for m in matches
                                  if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_SUFFIXES]))
        else:
            raise ValueError(f"{text}: no such file or folder")
    items = _unique_files([item for _, group in groups for item in group])
    if _colliding(items) and sum(folder is not None for folder, _ in groups) > 1:
        groups = [(folder, [_under(folder, item) for item in group] if folder is not None else group)
                  for folder, group in groups]
        items = _unique_files([item for _, group in groups for item in group])
    clashes = _colliding(items)
    if clashes:
        examples = "; ".join(f"{key!r}: {', '.join(str(p) for p in paths[:2])}" for key, paths in clashes[:3])
        raise ValueError(f"{len(clashes)} name(s) stand for different files ({examples}); give them in separate "
                         "runs, or list them by unique names")
    if not items:
        raise ValueError(f"no images found in {', '.join(os.fspath(i) for i in inputs) or '(no input)'}")
    return items


def _identity(item: ImageInput) -> tuple[str, int | None]:
    """What an input is on disk: its real path (and member of a container)."""
    return os.path.realpath(item.path), item.member


def _unique_files(items: list[ImageInput]) -> list[ImageInput]:
    seen: set[tuple[str, int | None]] = set()
    unique = []
    for item in items:
        if item.error is None:
            identity = _identity(item)
            if identity in seen:
                continue
            seen.add(identity)
        unique.append(item)
    return unique


def _colliding(items: list[ImageInput]) -> list[tuple[str, list[Path]]]:
    """Keys that name more than one file."""
    paths: dict[str, list[Path]] = {}
    for item in items:
        paths.setdefault(item.key, []).append(item.path)
    return [(key, found) for key, found in paths.items() if len(found) > 1]


def _under(folder: Path, item: ImageInput) -> ImageInput:
    prefix = folder.as_posix().rstrip("/")
    return ImageInput(item.path, f"{prefix}/{item.key}", item.member, item.error)


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
