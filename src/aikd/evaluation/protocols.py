"""Verification protocols: which pairs of face images are compared, and which pairs are mated.

Readers for the protocol files of the benchmarks in the AI-KD paper's tables (numpy only, no torch):

``lfw``
    LFW / XQLFW ``pairs.txt``: an optional header line of integers (``10\\t300``: folds, pairs per fold),
    then ``name n1 n2`` (mated: images n1 and n2 of one person) or ``name1 n1 name2 n2`` (non-mated).
    Image names follow :data:`LFW_PATTERN`, ``{name}/{name}_{n:04d}.jpg``; pass another pattern for other
    layouts (e.g. ``"{name}_{n:04d}.png"``).
``calfw``
    CALFW / CPLFW ``pairs_*.txt``: two consecutive lines ``file label`` make one pair; a label != 0 on both
    lines means mated, 0 on both means non-mated.
``bin``
    insightface validation ``.bin`` files (lfw.bin, cfp_fp.bin, ...): a pickle of (list of encoded images,
    list of is-same flags); images ``2k`` and ``2k+1`` form pair ``k``. They are read only through
    :func:`aikd.io.safe_pickle_load`, which refuses anything but plain data. The images are named
    ``"<file name>#<index:06d>"`` (``lfw.bin#000123``); :func:`iter_bin_images` decodes them under those names
    so that an embedding step can store embeddings the pairs can find.
``csv``
    A generic CSV with header ``a,b,genuine`` (``genuine``: 1/0, true/false, yes/no).
``identity``
    All-vs-all by identity (Adience style): every pair of listed images, mated when the identities match.
    The list is a CSV with columns ``path`` and an identity column (default ``identity``), or a text file
    with one image path per line whose identity is the parent folder's name. All-vs-all is never
    materialised: :class:`AllVsAll` holds the images and identities and yields index arrays in chunks.

Bad lines (wrong token count, bad label or image number, an unpaired line, an image the embeddings lack)
are collected with file and line number. With ``strict=True`` (the default) one ValueError lists the first
few and the count; with ``strict=False`` they are skipped and the same report is logged as a warning
(stderr). Nothing is dropped silently.

Pairs name images; :func:`resolve` maps names to rows of an embedding file by aikd's one name policy
(:mod:`aikd.names`): an exact match first, else normalised relative paths, equal or one being the other's
trailing path components (``Abel/Abel_0001.jpg`` finds ``/data/lfw/Abel/Abel_0001.jpg`` and vice versa),
when exactly one embedding path fits.
"""

from __future__ import annotations

import csv
import logging
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aikd.io import UnsafePickleError, open_text, safe_pickle_load
from aikd.names import NameIndex, identity_from_folder

__all__ = [
    "LFW_PATTERN",
    "PROTOCOLS",
    "AllVsAll",
    "IdentityList",
    "IndexedPairs",
    "PairIssue",
    "PairList",
    "detect_protocol",
    "identity_list_from_names",
    "iter_bin_images",
    "read_bin",
    "read_bin_pairs",
    "read_calfw_pairs",
    "read_csv_pairs",
    "read_identity_list",
    "read_lfw_pairs",
    "read_protocol",
    "resolve",
]

LFW_PATTERN = "{name}/{name}_{n:04d}.jpg"
PROTOCOLS = ("auto", "lfw", "calfw", "bin", "csv", "identity")
SHOWN_ISSUES = 5  # bad lines quoted in an error message
_TRUE = {"1", "true", "yes", "y", "genuine", "mated", "same"}
_FALSE = {"0", "false", "no", "n", "impostor", "non-mated", "nonmated", "different"}

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- issues
@dataclass(frozen=True)
class PairIssue:
    """One bad entry of a protocol file (``line`` is 1-based; 0 when the file has no lines, e.g. .bin)."""

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


def report_issues(issues: Sequence[PairIssue], source: str, strict: bool, what: str = "bad line(s)") -> None:
    """Raise one ValueError listing the first issues (strict), or log the same text as a warning."""
    if not issues:
        return
    shown = "; ".join(str(issue) for issue in issues[:SHOWN_ISSUES])
    more = f" (first {SHOWN_ISSUES} shown)" if len(issues) > SHOWN_ISSUES else ""
    text = f"{source}: {len(issues)} {what}{more}: {shown}"
    if strict:
        raise ValueError(f"{text}. Fix them, or skip them with strict=False (aikd evaluate --skip-bad-pairs)")
    log.warning("warning: %s; skipped", text)


# --------------------------------------------------------------------------------------- containers
@dataclass
class PairList:
    """Pairs of image names as a protocol file lists them.

    Attributes:
        source: the protocol file.
        first, second: image names of each pair.
        mated: True where both images show the same person.
        lines: line of each pair in the file (the first line for two-line formats; the pair index for .bin).
    """

    source: str
    first: list[str]
    second: list[str]
    mated: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


@dataclass
class IdentityList:
    """Images with identities: every pair of them is compared (all-vs-all)."""

    source: str
    names: list[str]
    identities: list[str]
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class IndexedPairs:
    """A pair list resolved to embedding rows."""

    source: str
    first: np.ndarray
    second: np.ndarray
    mated: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    @property
    def rows(self) -> np.ndarray:
        """Embedding rows that take part in some pair."""
        return np.unique(np.concatenate([self.first, self.second]))

    def subset(self, keep: np.ndarray) -> IndexedPairs:
        """The pairs where ``keep`` is True."""
        return IndexedPairs(self.source, self.first[keep], self.second[keep], self.mated[keep],
                            self.lines[keep])


@dataclass
class AllVsAll:
    """All pairs of a set of images, never materialised.

    Attributes:
        source: where the image list came from.
        rows: embedding row of each image.
        identity: integer identity code of each image (mated = equal codes).
    """

    source: str
    rows: np.ndarray
    identity: np.ndarray
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        """Number of comparisons, ``n (n - 1) / 2``."""
        return len(self.rows) * (len(self.rows) - 1) // 2

    def subset(self, keep: np.ndarray) -> AllVsAll:
        """The images where ``keep`` is True (and all pairs among them)."""
        lines = self.lines[keep] if len(self.lines) == len(self.rows) else self.lines
        return AllVsAll(self.source, self.rows[keep], self.identity[keep], lines)

    def iter_pairs(self, chunk_pairs: int = 1 << 20) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(first_rows, second_rows, mated)`` index arrays, about ``chunk_pairs`` pairs at a time.

        Pairs ``(i, j)``, ``i < j`` in list order, go row by row; a chunk always holds whole rows.
        """
        n = len(self.rows)
        start = 0
        while start < n - 1:
            stop = start + 1
            budget = n - 1 - start
            while stop < n - 1 and budget + (n - 1 - stop) <= chunk_pairs:
                budget += n - 1 - stop
                stop += 1
            counts = n - 1 - np.arange(start, stop)
            i = np.repeat(np.arange(start, stop), counts)
            j = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + i + 1
            yield self.rows[i], self.rows[j], self.identity[i] == self.identity[j]
            start = stop

    def materialise(self) -> IndexedPairs:
        """All pairs as an explicit list (small sets only: tests and checks)."""
        parts = list(self.iter_pairs())
        first, second, mated = (np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int64)
                                for k in range(3))
        return IndexedPairs(self.source, first, second, mated.astype(bool), np.zeros(len(first), np.int64))


# ------------------------------------------------------------------------------------------- readers
def _text_lines(path: Path) -> list[str]:
    with open_text(path, "protocol file") as handle:
        text = handle.read()
    if "\x00" in text:
        raise ValueError(f"{path}: not a text file (is it a .bin protocol? use --protocol bin)")
    return text.splitlines()


_PATTERN_SPECS = re.compile(r"0?[1-9]?d?")  # {n}, {n:d}, {n:4d}, {n:04d}: at most 9 digits wide


def _check_pattern(pattern: str) -> None:
    """Allow only the documented fields, ``{name}`` and ``{n}`` with an integer width of at most 9: a format
    string is code (``{name.__class__}`` reads attributes, ``{n:>999999999}`` allocates gigabytes)."""
    try:
        fields = list(string.Formatter().parse(pattern))
    except ValueError as err:
        raise ValueError(f"bad image-name pattern {pattern!r}: {err}") from None
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in ("name", "n") or conversion or (spec and (name != "n" or not _PATTERN_SPECS.fullmatch(spec))):
            raise ValueError(f"bad image-name pattern {pattern!r}: use only {{name}} and {{n}} (an integer width "
                             f"such as {{n:04d}} is allowed), not {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}}")


def read_lfw_pairs(path: str | Path, pattern: str = LFW_PATTERN, strict: bool = True) -> PairList:
    """Read an LFW / XQLFW ``pairs.txt`` (see the module docstring)."""
    path = Path(path)
    _check_pattern(pattern)
    first, second, mated, lines, issues = [], [], [], [], []
    seen_content = False
    for line_no, line in enumerate(_text_lines(path), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if not seen_content and len(tokens) <= 2 and all(t.isdigit() for t in tokens):
            seen_content = True  # header: number of folds and pairs per fold
            continue
        seen_content = True
        if len(tokens) == 3:
            names, numbers = (tokens[0], tokens[0]), (tokens[1], tokens[2])
        elif len(tokens) == 4:
            names, numbers = (tokens[0], tokens[2]), (tokens[1], tokens[3])
        else:
            issues.append(PairIssue(str(path), line_no, "expected 3 tokens (name n1 n2) or 4 (name1 n1 name2 "
                                                        f"n2), found {len(tokens)}"))
            continue
        bad = [n for n in numbers if not n.isdigit()]
        if bad:
            issues.append(PairIssue(str(path), line_no, f"image number {bad[0]!r} is not a whole number"))
            continue
        first.append(pattern.format(name=names[0], n=int(numbers[0])))
        second.append(pattern.format(name=names[1], n=int(numbers[1])))
        mated.append(len(tokens) == 3)
        lines.append(line_no)
    report_issues(issues, str(path), strict)
    return PairList(str(path), first, second, np.array(mated, dtype=bool), np.array(lines, dtype=np.int64))


def _calfw_entry(path: Path, line_no: int, tokens: list[str]) -> tuple[str, int] | PairIssue:
    if len(tokens) != 2:
        return PairIssue(str(path), line_no, f"expected 2 tokens (file label), found {len(tokens)}")
    try:
        return tokens[0], int(tokens[1])
    except ValueError:
        return PairIssue(str(path), line_no, f"label {tokens[1]!r} is not an integer")


def read_calfw_pairs(path: str | Path, strict: bool = True) -> PairList:
    """Read a CALFW / CPLFW ``pairs_*.txt``: consecutive non-blank lines ``file label`` form a pair."""
    path = Path(path)
    entries = [(no, line.split()) for no, line in enumerate(_text_lines(path), start=1) if line.split()]
    first, second, mated, lines, issues = [], [], [], [], []
    if len(entries) % 2:
        message = "unpaired line: the pair's second image is missing"
        issues.append(PairIssue(str(path), entries[-1][0], message))
    for (no_a, tokens_a), (no_b, tokens_b) in zip(entries[0::2], entries[1::2], strict=False):
        a, b = _calfw_entry(path, no_a, tokens_a), _calfw_entry(path, no_b, tokens_b)
        bad = [e for e in (a, b) if isinstance(e, PairIssue)]
        if bad:
            issues.extend(bad)
        elif (a[1] != 0) != (b[1] != 0):
            issues.append(PairIssue(str(path), no_a, f"labels disagree: {a[1]} here, {b[1]} on line {no_b}"))
        else:
            first.append(a[0])
            second.append(b[0])
            mated.append(a[1] != 0)
            lines.append(no_a)
    report_issues(sorted(issues, key=lambda i: i.line), str(path), strict)
    return PairList(str(path), first, second, np.array(mated, dtype=bool), np.array(lines, dtype=np.int64))


def _csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header (stripped, lower case) and the following non-empty rows with their line numbers."""
    reader = csv.reader(_text_lines(path))
    rows = ((reader.line_num, row) for row in reader if any(cell.strip() for cell in row))
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path}: empty CSV file")
    return [cell.strip().lower() for cell in first[1]], rows


def _column(header: list[str], path: Path, *names: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise ValueError(f"{path}: no column {' or '.join(names)}; header is {','.join(header)}")


def read_csv_pairs(path: str | Path, strict: bool = True) -> PairList:
    """Read a generic pair CSV with header ``a,b,genuine`` (also accepted: first/second, mated/label)."""
    path = Path(path)
    header, rows = _csv_rows(path)
    cols = (_column(header, path, "a", "first"), _column(header, path, "b", "second"),
            _column(header, path, "genuine", "mated", "label"))
    first, second, mated, lines, issues = [], [], [], [], []
    for line_no, row in rows:
        if len(row) != len(header):
            issues.append(PairIssue(str(path), line_no, f"expected {len(header)} columns, found {len(row)}"))
            continue
        a, b, label = (row[c].strip() for c in cols)
        if label.lower() not in _TRUE | _FALSE:
            issues.append(PairIssue(str(path), line_no, f"genuine must be 1/0 or true/false, not {label!r}"))
        elif not a or not b:
            issues.append(PairIssue(str(path), line_no, "missing image name"))
        else:
            first.append(a)
            second.append(b)
            mated.append(label.lower() in _TRUE)
            lines.append(line_no)
    report_issues(issues, str(path), strict)
    return PairList(str(path), first, second, np.array(mated, dtype=bool), np.array(lines, dtype=np.int64))


def identity_list_from_names(names: Sequence[str], source: str, strict: bool = True,
                             lines: Sequence[int] | None = None) -> IdentityList:
    """Images whose identity is their parent folder (``Alice/001.jpg`` -> ``Alice``;
    :func:`aikd.names.identity_from_folder`)."""
    line_numbers = list(lines) if lines is not None else list(range(1, len(names) + 1))
    kept, identities, kept_lines, issues = [], [], [], []
    for name, line_no in zip(names, line_numbers, strict=True):
        parent = identity_from_folder(name)
        if parent:
            kept.append(name)
            identities.append(parent)
            kept_lines.append(line_no)
        else:
            issues.append(PairIssue(source, line_no, f"{name!r} has no parent folder to name the identity"))
    report_issues(issues, source, strict)
    return IdentityList(source, kept, identities, np.array(kept_lines, dtype=np.int64))


def read_identity_list(path: str | Path, identity_column: str = "identity",
                       strict: bool = True) -> IdentityList:
    """Read the images of an all-vs-all protocol: a CSV ``path,<identity_column>`` or a list of paths."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        entries = [(no, line.strip()) for no, line in enumerate(_text_lines(path), start=1) if line.strip()]
        return identity_list_from_names([e[1] for e in entries], str(path), strict, [e[0] for e in entries])
    header, rows = _csv_rows(path)
    path_col, id_col = _column(header, path, "path"), _column(header, path, identity_column.lower())
    names, identities, lines, issues = [], [], [], []
    for line_no, row in rows:
        if len(row) != len(header):
            issues.append(PairIssue(str(path), line_no, f"expected {len(header)} columns, found {len(row)}"))
        elif not row[path_col].strip() or not row[id_col].strip():
            issues.append(PairIssue(str(path), line_no, f"empty path or {identity_column}"))
        else:
            names.append(row[path_col].strip())
            identities.append(row[id_col].strip())
            lines.append(line_no)
    report_issues(issues, str(path), strict)
    return IdentityList(str(path), names, identities, np.array(lines, dtype=np.int64))


# ------------------------------------------------------------------------------------- insightface .bin
def _image_bytes(item: object, path: Path, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # a Python 2 str read back with latin-1 decoding
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise ValueError(f"{path}: image {index} is a {type(item).__name__}, expected encoded image bytes")


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """Encoded images and is-same flags of an insightface validation ``.bin`` (through the safe unpickler)."""
    path = Path(path)
    try:
        data = safe_pickle_load(path)
    except UnsafePickleError as err:  # report it like any other bad input (one line, exit status 2)
        raise ValueError(f"refused to load {path}: it is not plain data ({err})") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(data).__name__}")
    images, issame = data
    images = [_image_bytes(item, path, i) for i, item in enumerate(images)]
    try:
        flags = np.asarray(issame, dtype=bool).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{path}: the is-same list is not a list of flags") from None
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs (expected 2 per pair)")
    return images, flags


def bin_image_name(path: str | Path, index: int) -> str:
    """Name of image ``index`` of a .bin file, e.g. ``lfw.bin#000123``."""
    return f"{Path(path).name}#{index:06d}"


def read_bin_pairs(path: str | Path) -> PairList:
    """Pairs of an insightface ``.bin``: images ``2k`` and ``2k+1``, named by :func:`bin_image_name`."""
    path = Path(path)
    _, flags = read_bin(path)
    k = np.arange(len(flags))
    first = [bin_image_name(path, 2 * i) for i in k]
    second = [bin_image_name(path, 2 * i + 1) for i in k]
    return PairList(str(path), first, second, flags, k + 1)


def iter_bin_images(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Decode the images of a ``.bin`` (BGR uint8, as ``cv2.imdecode`` gives them) with their names."""
    import cv2  # lazily: only this helper decodes images

    path = Path(path)
    images, _ = read_bin(path)
    for index, data in enumerate(images):
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{path}: image {index} ({bin_image_name(path, index)}) cannot be decoded")
        yield bin_image_name(path, index), image


# ------------------------------------------------------------------------------------------ detection
def detect_protocol(path: str | Path, identity_column: str = "identity") -> str:
    """Guess the protocol of a file from its suffix and first lines; ValueError when it cannot tell."""
    path = Path(path)
    if path.suffix.lower() == ".bin":
        return "bin"
    if path.suffix.lower() == ".csv":
        header, _ = _csv_rows(path)
        if "path" in header and identity_column.lower() in header:
            return "identity"
        if {"a", "b"} <= set(header) or {"first", "second"} <= set(header):
            return "csv"
        raise ValueError(f"{path}: cannot tell the protocol from the header {','.join(header)} (expected "
                         f"a,b,genuine or path,{identity_column}); pass --protocol")
    lines = [line.split() for line in _text_lines(path)[:50] if line.split()]
    if lines and len(lines[0]) <= 2 and all(t.isdigit() for t in lines[0]):
        return "lfw"  # the LFW header line
    counts = {len(tokens) for tokens in lines}
    if counts and counts <= {3, 4}:
        return "lfw"
    if counts == {2} and all(tokens[1].lstrip("-").isdigit() for tokens in lines):
        return "calfw"
    if counts == {1}:
        return "identity"
    raise ValueError(f"{path}: cannot tell which protocol this file follows (lines of {sorted(counts)} "
                     "tokens); pass --protocol lfw|calfw|bin|csv|identity")


def read_protocol(path: str | Path, protocol: str = "auto", *, pattern: str = LFW_PATTERN,
                  identity_column: str = "identity", strict: bool = True) -> PairList | IdentityList:
    """Read a protocol file of the given kind (``auto``: :func:`detect_protocol`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"protocol file not found: {path}")
    if protocol == "auto":
        protocol = detect_protocol(path, identity_column)
    if protocol == "lfw":
        return read_lfw_pairs(path, pattern, strict)
    if protocol == "calfw":
        return read_calfw_pairs(path, strict)
    if protocol == "bin":
        return read_bin_pairs(path)
    if protocol == "csv":
        return read_csv_pairs(path, strict)
    return read_identity_list(path, identity_column, strict)


# ------------------------------------------------------------------------------------------ resolving
def resolve(protocol: PairList | IdentityList, embedding_paths: Sequence[str] | NameIndex,
            strict: bool = True) -> IndexedPairs | AllVsAll:
    """Map a protocol's image names to embedding rows (see :class:`NameIndex`).

    Entries naming an image the embeddings lack are reported with their line numbers (ValueError when
    ``strict``, else a logged warning and the entries are skipped); an empty result is always an error.
    """
    index = embedding_paths if isinstance(embedding_paths, NameIndex) else NameIndex(embedding_paths)
    if isinstance(protocol, IdentityList):
        return _resolve_identities(protocol, index, strict)
    first, second = index.find_all(protocol.first), index.find_all(protocol.second)
    known = (first >= 0) & (second >= 0)
    missing = [protocol.first[k] if first[k] < 0 else protocol.second[k] for k in np.flatnonzero(~known)]
    issues = [PairIssue(protocol.source, int(line), f"image {name!r} is not in the embeddings")
              for line, name in zip(protocol.lines[~known], missing, strict=True)]
    report_issues(issues, protocol.source, strict, "pair(s) naming images without an embedding")
    if not known.any():
        raise ValueError(f"{protocol.source}: no pair left whose images both have embeddings")
    pairs = IndexedPairs(protocol.source, first[known], second[known], protocol.mated[known], protocol.lines[known])
    return _distinct_pairs(pairs, strict)


def _distinct_pairs(pairs: IndexedPairs, strict: bool) -> IndexedPairs:
    """Each comparison once: drop (and report) self-pairs and repeats of a pair (in either order, first kept);
    a pair listed as both mated and non-mated is an error (strict) or dropped, reported."""
    low, high = np.minimum(pairs.first, pairs.second), np.maximum(pairs.first, pairs.second)
    keep = low != high
    if (~keep).any():
        lines = ", ".join(str(int(line)) for line in pairs.lines[~keep][:SHOWN_ISSUES])
        log.warning("warning: %s: %d pair(s) compare an image with itself (lines %s); dropped", pairs.source,
                    int((~keep).sum()), lines)
    key = low.astype(np.int64) * (int(high.max(initial=0)) + 1) + high
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    labels = np.zeros((len(first), 2), dtype=bool)
    labels[group, pairs.mated.astype(int)] = True
    conflicting = labels.all(axis=1)[group] & keep
    if conflicting.any():
        issues = [PairIssue(pairs.source, int(line), "this pair is also listed with the other label")
                  for line in pairs.lines[conflicting]]
        report_issues(issues, pairs.source, strict, "pair(s) listed as both mated and non-mated")
        keep &= ~conflicting
    repeated = keep.copy()
    repeated[first] = False
    if repeated.any():
        lines = ", ".join(str(int(line)) for line in pairs.lines[repeated][:SHOWN_ISSUES])
        log.warning("warning: %s: %d pair(s) repeat an earlier one (lines %s); each comparison counted once",
                    pairs.source, int(repeated.sum()), lines)
        keep &= ~repeated
    if not keep.any():
        raise ValueError(f"{pairs.source}: no distinct pair of two different images left")
    return pairs.subset(keep) if not keep.all() else pairs


def _resolve_identities(protocol: IdentityList, index: NameIndex, strict: bool) -> AllVsAll:
    rows = index.find_all(protocol.names)
    issues = [PairIssue(protocol.source, int(line), f"image {name!r} is not in the embeddings")
              for line, name, row in zip(protocol.lines, protocol.names, rows, strict=True) if row < 0]
    first_line: dict[int, int] = {}
    keep = rows >= 0
    for k, (row, line) in enumerate(zip(rows, protocol.lines, strict=True)):
        if row >= 0 and int(row) in first_line:
            message = f"image listed twice (first on line {first_line[row]})"
            issues.append(PairIssue(protocol.source, int(line), message))
            keep[k] = False
        elif row >= 0:
            first_line[int(row)] = int(line)
    report_issues(sorted(issues, key=lambda i: i.line), protocol.source, strict, "bad image entr(y/ies)")
    if keep.sum() < 2:
        raise ValueError(f"{protocol.source}: fewer than two images with embeddings; nothing to compare")
    identities = np.array(protocol.identities, dtype=object)[keep].astype(str)
    _, identity = np.unique(identities, return_inverse=True)
    return AllVsAll(protocol.source, rows[keep], identity.astype(np.int64), protocol.lines[keep])
