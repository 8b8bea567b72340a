"""How aikd joins image names from different files: one policy, everywhere a user's names meet.

Landmarks with input images (``score``/``embed``/``label``/``align --landmarks``), imported labels with
input images, the training index (landmarks, labels and the image folder), and evaluation (protocol names,
score files and embedding files) all name the same images in the ways people write paths. A name matches a
path by the first of these rules that gives exactly one path:

1. the exact string;
2. the normalised name (:func:`normalise_name`: ``\\`` as ``/``, no ``.``, ``..``, doubled or leading
   separators, surrounding spaces trimmed, Unicode NFC) equal to a normalised path;
3. whole trailing path components: the name equal to the trailing components of exactly one path
   (``n001/1.jpg`` finds ``vggface2/n001/1.jpg``), or the other way round (``vggface2/n001/1.jpg`` finds
   ``n001/1.jpg``), longest first.

A rule that finds several paths is ambiguous and finds nothing (``id1/1.png`` never stands for
``id2/1.png``): callers report such names as unmatched instead of guessing. A path listed more than once is
one entry, its first occurrence (the readers in :mod:`aikd.io` warn about such repeats). Case is
significant, as on the file systems faces are stored on.
"""

from __future__ import annotations

import posixpath
import unicodedata
from collections.abc import Sequence

import numpy as np

__all__ = ["NameIndex", "SortedNames", "match_names", "normalise_name", "strictly_increasing"]

_AMBIGUOUS = -1


def normalise_name(name: str) -> str:
    """``.\\lfw\\a.jpg`` -> ``lfw/a.jpg``; ``/data//lfw/./a.jpg`` -> ``data/lfw/a.jpg``; NFC Unicode."""
    text = unicodedata.normalize("NFC", str(name).strip().replace("\\", "/"))
    return posixpath.normpath(text).lstrip("/") if text else ""


def identity_from_folder(name: str) -> str | None:
    """The identity of an image in an identity-organised tree: its parent folder, as a path (``Abel/Abel_0001.jpg``
    -> ``Abel``; ``train/Abel/1.jpg`` -> ``train/Abel``, so two ``Abel`` folders under different roots stay two
    identities); ``None`` for a name with no folder. The one home of this rule: labelling (CR-FIQA's identity
    centres), protocols (identity lists) and calibration (pair lists) all use it."""
    parent = posixpath.dirname(normalise_name(name))
    return parent or None


def _tails(name: str) -> list[str]:
    """Trailing component runs, longest first, without the whole name: ``a/b/c`` -> ``b/c``, ``c``."""
    parts = name.split("/")
    return ["/".join(parts[k:]) for k in range(1, len(parts))]


class NameIndex:
    """Finds the row of a name among ``paths`` by the module's policy.

    The trailing-component table is built on the first name that needs it, so an index over millions of
    paths whose names all match exactly costs one dictionary.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self._exact: dict[str, int] = {}
        for row, path in enumerate(self.paths):
            self._exact.setdefault(path, row)
        self._normal: dict[str, int] | None = None
        self._tail_rows: dict[str, int] | None = None

    def _normalised(self) -> dict[str, int]:
        if self._normal is None:
            self._normal = {}
            for path, row in self._exact.items():  # a name listed twice is one entry: its first row
                normal = normalise_name(path)
                found = self._normal.get(normal)
                self._normal[normal] = row if found is None or found == row else _AMBIGUOUS
        return self._normal

    def _tail_table(self) -> dict[str, int]:
        if self._tail_rows is None:
            self._tail_rows = {}
            for normal, row in self._normalised().items():
                for tail in _tails(normal):
                    found = self._tail_rows.get(tail)
                    self._tail_rows[tail] = row if found is None or found == row else _AMBIGUOUS
        return self._tail_rows

    def find(self, name: str) -> int | None:
        """Row of the path ``name`` stands for; ``None`` when no path, or more than one, matches."""
        row = self._exact.get(name)
        if row is not None:
            return row
        normal = normalise_name(name)
        normalised = self._normalised()
        for found in (normalised.get(normal), self._tail_table().get(normal)):
            if found is not None:
                return found if found != _AMBIGUOUS else None
        for tail in _tails(normal):  # the name is the longer one
            found = normalised.get(tail)
            if found is not None:
                return found if found != _AMBIGUOUS else None
        return None

    def find_all(self, names: Sequence[str]) -> np.ndarray:
        """Row of each name (int64), -1 where :meth:`find` finds none."""
        cache: dict[str, int] = {}
        rows = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            if name not in cache:
                found = self.find(name)
                cache[name] = -1 if found is None else found
            rows[i] = cache[name]
        return rows


class SortedNames:
    """``paths`` (a numpy string array) sorted once, to find the rows of many names a chunk at a time, as
    :class:`NameIndex` finds them: exact matches by binary search, the policy's other rules only for the names left
    over (a :class:`NameIndex` of the paths, built the first time one is)."""

    def __init__(self, paths: np.ndarray) -> None:
        self.paths = np.asarray(paths)
        if strictly_increasing(self.paths):  # sorted and unique (a training index's tables): no sorted copy
            self.order, self.ordered = None, self.paths
        else:
            self.order = np.argsort(self.paths, kind="stable")  # stable: a repeated path's first row is found
            self.ordered = self.paths[self.order]
        self._index: NameIndex | None = None

    def rows(self, names: np.ndarray) -> np.ndarray:
        """Row of the path each of ``names`` stands for (int64, -1 for none)."""
        names = np.asarray(names)
        rows = np.full(len(names), -1, dtype=np.int64)
        if len(names) == 0 or len(self.paths) == 0:
            return rows
        place = np.clip(np.searchsorted(self.ordered, names), 0, len(self.ordered) - 1)
        exact = np.zeros(len(names), dtype=bool)
        for start in range(0, len(names), _CHUNK):  # the looked-up names a chunk at a time: no copy of them all
            exact[start:start + _CHUNK] = self.ordered[place[start:start + _CHUNK]] == names[start:start + _CHUNK]
        rows[exact] = place[exact] if self.order is None else self.order[place[exact]]
        left = np.flatnonzero(~exact)
        if left.size:
            if self._index is None:
                self._index = NameIndex(self.paths.tolist())
            rows[left] = self._index.find_all(names[left].tolist())
        return rows


def match_names(names: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """Row of ``paths`` each of ``names`` stands for (int64, -1 for none), as :class:`NameIndex` finds it.

    For large numpy string arrays (a 3.3 M-face training index): :class:`SortedNames`.
    """
    return SortedNames(paths).rows(names)


_CHUNK = 1 << 18


def strictly_increasing(values: np.ndarray) -> bool:
    """Whether every value is greater than the one before, compared a chunk at a time."""
    for start in range(1, len(values), _CHUNK):
        stop = min(start + _CHUNK, len(values))
        if not np.all(values[start:stop] > values[start - 1:stop - 1]):
            return False
    return True
