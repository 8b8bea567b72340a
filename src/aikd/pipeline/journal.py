"""The journal of a file run: every finished batch on disk as it is done, and the results read back from it.

A run writes ``OUT.partial/rankN.jsonl`` (one JSON object per image: key ``k``, rows ``r``, error ``e``, and ``v``,
where its float32 vector lies in ``rankN.f32``), appended and fsynced after every batch (:class:`Journal`). On
``--resume`` what a finished earlier output holds is written beside it as ``previousN.jsonl``, so it is read the same
way. :class:`Results` reads all of it back without holding it in memory:

- in input order (:meth:`Results.ordered`): a fresh run's journals hold the inputs in order (each rank its share,
  ``i % world_size``), so they are merged as they are read, in constant memory; any other journal (a resumed run,
  retried failures, an earlier output) through an index of 25 bytes per record (a 64-bit hash of the key, where
  its record lies, which record came first, whether it failed), every hit checked against the key on disk;
- by key, as a mapping (``results[key]``; a value set is kept in memory, for a pass over the whole set).

A key's result is its last successful record, else its last record (a failure retried and done counts as done).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from aikd.images import ImageInput
from aikd.pipeline.outputs import journal_dir

__all__ = ["ItemResult", "Journal", "Results", "json_default", "read_journal", "write_previous"]


@dataclass
class ItemResult:
    """What a job produced for one input.

    Attributes:
        rows: output rows (the columns after the key); several for e.g. all faces of a photo.
        vector: an optional float32 vector (an embedding) saved alongside.
        error: why the input failed; such an input gets a row in the errors file instead.
    """

    rows: list[list[Any]] = field(default_factory=list)
    vector: np.ndarray | None = None
    error: str | None = None


class Journal:
    """Append-only record of finished inputs of one rank (``name``: ``rank0``), fsynced after every batch."""

    def __init__(self, output: Path, rank: int = 0, name: str | None = None):
        self.folder = journal_dir(output)
        self.folder.mkdir(parents=True, exist_ok=True)
        name = name or f"rank{rank}"
        self.lines_path = self.folder / f"{name}.jsonl"
        self.vectors_path = self.folder / f"{name}.f32"
        _truncate_partial_line(self.lines_path)
        self._lines = open(self.lines_path, "a", encoding="utf-8")
        self._vectors = open(self.vectors_path, "ab")

    def append(self, batch: Sequence[tuple[str, ItemResult]]) -> None:
        entries = []
        for key, result in batch:
            entry: dict[str, Any] = {"k": key, "r": result.rows, "e": result.error}
            if result.vector is not None:
                vector = np.ascontiguousarray(result.vector, dtype=np.float32).ravel()
                entry["v"] = [self._vectors.tell() // 4, int(vector.size)]
                self._vectors.write(vector.tobytes())
            entries.append(json.dumps(entry, default=json_default))
        # Vectors first: a line is only trusted when what it points to is already on disk.
        self._vectors.flush()
        os.fsync(self._vectors.fileno())
        self._lines.write("".join(line + "\n" for line in entries))
        self._lines.flush()
        os.fsync(self._lines.fileno())

    def close(self) -> None:
        self._lines.close()
        self._vectors.close()


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for a journal record: numpy scalars and arrays as plain numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot record {type(value).__name__} in the journal")


def _truncate_partial_line(path: Path) -> None:
    """Cut a half-written last line (the process was killed mid-write) so appends start clean."""
    if not path.exists():
        return
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = size
        while start > 0:  # the last newline, read backwards in blocks
            step = min(1 << 16, start)
            handle.seek(start - step)
            block = handle.read(step)
            found = block.rfind(b"\n")
            if found >= 0:
                start = start - step + found + 1
                break
            start -= step
        if start != size:
            handle.truncate(start)


def write_previous(output: Path, rank: int, results: Mapping[str, ItemResult] | Iterable[tuple[str, ItemResult]],
                   batch: int = 1024) -> None:
    """Record what a finished earlier output holds (``--resume``) as ``previous{rank}.jsonl`` beside the journal."""
    folder = journal_dir(output)
    for suffix in (".jsonl", ".f32"):
        (folder / f"previous{rank}{suffix}").unlink(missing_ok=True)
    journal = Journal(output, name=f"previous{rank}")
    try:
        pending: list[tuple[str, ItemResult]] = []
        for pair in results.items() if isinstance(results, Mapping) else results:
            pending.append(pair)
            if len(pending) >= batch:
                journal.append(pending)
                pending.clear()
        journal.append(pending)
    finally:
        journal.close()


# ------------------------------------------------------------------------------------------------ reading back
class _Source:
    """One journal file and its vectors, read by offset."""

    def __init__(self, lines_path: Path) -> None:
        self.lines_path = lines_path
        vectors_path = lines_path.with_suffix(".f32")
        self.vectors: IO[bytes] | None = open(vectors_path, "rb") if vectors_path.exists() else None
        self.vector_values = os.fstat(self.vectors.fileno()).st_size // 4 if self.vectors is not None else 0
        self.lines = open(lines_path, "rb")
        self.size = os.fstat(self.lines.fileno()).st_size  # records appended later are not this reader's
        self._lock = threading.Lock()

    def scan(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(offset, entry)`` of every sound record, in file order."""
        with open(self.lines_path, "rb") as handle:
            offset = 0
            for line in handle:
                if offset >= self.size:
                    return
                entry = self._entry(line)
                if entry is not None:
                    yield offset, entry
                offset += len(line)

    def _entry(self, line: bytes) -> dict[str, Any] | None:
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # the half-written line of a killed run
        if not isinstance(entry, dict) or "k" not in entry:
            return None
        if entry.get("v"):
            start, size = entry["v"]
            if start + size > self.vector_values:
                return None  # points past the vectors written: never trusted
        return entry

    def at(self, offset: int) -> dict[str, Any]:
        with self._lock:  # one file position: readers in several threads take turns
            self.lines.seek(offset)
            line = self.lines.readline()
        entry = self._entry(line)
        if entry is None:
            raise RuntimeError(f"{self.lines_path}: the record at byte {offset} changed while the run was read")
        return entry

    def result(self, entry: dict[str, Any]) -> ItemResult:
        vector = None
        if entry.get("v"):
            start, size = entry["v"]
            data = os.pread(self.vectors.fileno(), 4 * size, 4 * start)
            vector = np.frombuffer(data, dtype=np.float32).copy()
        return ItemResult(entry.get("r") or [], vector, entry.get("e"))

    def close(self) -> None:
        self.lines.close()
        if self.vectors is not None:
            self.vectors.close()


_SOURCE_BITS = 40  # a record's place: source number << 40 | byte offset (journals up to 1 TB each)


class Results(MutableMapping[str, ItemResult]):
    """Every result a run's journal holds (and its earlier output's, ``previous``), read from disk when asked for.

    Args:
        output: the run's output (its journal is ``OUT.partial/``).
        previous: the name of the earlier output's record to include (``previous0``), or ``None``.

    Values set (``results[key] = ...``) are kept in memory and win over the journal's.
    """

    def __init__(self, output: Path, previous: str | None = "previous0") -> None:
        folder = journal_dir(output)
        names = [folder / f"{previous}.jsonl"] if previous else []
        names += sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []
        self._sources = [_Source(path) for path in names if path.is_file()]
        self._previous = bool(previous) and bool(self._sources) and self._sources[0].lines_path.stem == previous
        self._set: dict[str, ItemResult | None] = {}  # None: deleted
        self._index: _Index | None = None
        self._visited: set[str] = set()  # keys of ``_set`` handed out by ordered()

    # -- input order
    def ordered(self, items: Iterable[ImageInput]) -> Iterator[tuple[ImageInput, ItemResult | None]]:
        """``(item, its result or None)`` for every item, in order; :meth:`others` then gives the rest."""
        if self._in_order(items):
            yield from self._zipped(items)
            return
        index = self._built()
        for item in items:
            found = index.find(item.key, mark=True)
            if item.key in self._set:  # set in memory: the journal's record is only marked as reached
                self._visited.add(item.key)
                yield item, self._set[item.key]
            else:
                yield item, self._source_result(found) if found is not None else None

    def others(self) -> Iterator[tuple[str, ItemResult]]:
        """The results of keys :meth:`ordered` did not reach, in the order first recorded (earlier output first)."""
        if self._index is not None:
            for found in self._index.unvisited():
                key = found[1]["k"]
                if key not in self._set:
                    yield key, self._source_result(found)
                elif key not in self._visited and self._set[key] is not None:
                    self._visited.add(key)
                    yield key, self._set[key]
        for key, value in self._set.items():
            if key not in self._visited and value is not None and (self._index is None or not self._index.has(key)):
                yield key, value

    def _rank_sources(self) -> list[_Source] | None:
        """The rank journals in rank order, when they are all there is."""
        if self._previous or not self._sources:
            return None
        ranks = {int(source.lines_path.stem[4:]): source for source in self._sources
                 if source.lines_path.stem[4:].isdigit()}
        if sorted(ranks) != list(range(len(self._sources))):
            return None
        return [ranks[rank] for rank in range(len(ranks))]

    def _in_order(self, items: Iterable[ImageInput]) -> bool:
        """Whether the journals hold exactly ``items``, each once, in order (rank ``i % ranks`` holding item i)."""
        sources = self._rank_sources()
        if sources is None:
            return False
        cursors = [source.scan() for source in sources]
        for position, item in enumerate(items):
            recorded = next(cursors[position % len(cursors)], None)
            if recorded is None or recorded[1]["k"] != item.key:
                return False
        return all(next(cursor, None) is None for cursor in cursors)

    def _zipped(self, items: Iterable[ImageInput]) -> Iterator[tuple[ImageInput, ItemResult | None]]:
        sources = self._rank_sources()
        cursors = [source.scan() for source in sources]
        for position, item in enumerate(items):
            source = sources[position % len(sources)]
            _, entry = next(cursors[position % len(cursors)])
            if item.key in self._set:
                self._visited.add(item.key)
                yield item, self._set[item.key]
            else:
                yield item, source.result(entry)

    # -- by key
    def _built(self) -> _Index:
        if self._index is None:
            self._index = _Index(self._sources)
        return self._index

    def _source_result(self, found: tuple[int, dict[str, Any]]) -> ItemResult:
        source, entry = found
        return self._sources[source].result(entry)

    def status(self, key: str) -> str | None:
        """``done``, ``failed``, or ``None`` (no result): what ``--resume`` needs, without reading vectors."""
        if key in self._set:
            value = self._set[key]
            return None if value is None else "failed" if value.error is not None else "done"
        found = self._built().find(key)
        if found is None:
            return None
        return "failed" if found[1].get("e") is not None else "done"

    def __getitem__(self, key: str) -> ItemResult:
        if key in self._set:
            value = self._set[key]
            if value is None:
                raise KeyError(key)
            return value
        found = self._built().find(key)
        if found is None:
            raise KeyError(key)
        return self._source_result(found)

    def __setitem__(self, key: str, value: ItemResult) -> None:
        self._set[key] = value

    def __delitem__(self, key: str) -> None:
        self[key]  # noqa: B018  (a KeyError for a key with no result)
        self._set[key] = None

    def __iter__(self) -> Iterator[str]:
        index = self._built()
        for key in index.keys():
            if self._set.get(key, True) is not None:
                yield key
        for key, value in self._set.items():
            if value is not None and not index.has(key):
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def close(self) -> None:
        for source in self._sources:
            source.close()


class _Index:
    """The journal's records by key: for each key (a 64-bit hash, then the key on disk) where its winning record
    lies, and which of its records came first."""

    def __init__(self, sources: list[_Source]) -> None:
        self._sources = sources
        hashes, places, failed = _record_table(sources)
        order = np.argsort(hashes, kind="stable")  # equal hashes stay in record order
        sorted_hashes = hashes[order]
        starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]]) if len(order) else order
        sizes = np.diff(np.r_[starts, len(order)])
        alone = order[starts[sizes == 1]]
        table = [(hashes[alone], places[alone], alone)]
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
            table.append(self._resolve(order[start:start + size], hashes, places, failed))
        merged = [np.concatenate(column) for column in zip(*table, strict=True)]
        by_hash = np.argsort(merged[0], kind="stable")
        self.hashes, self.places, self.first = (column[by_hash] for column in merged)
        self.visited = np.zeros(len(self.hashes), dtype=bool)

    def _resolve(self, records: np.ndarray, hashes: np.ndarray, places: np.ndarray, failed: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Records sharing one hash, grouped by their actual key: the winner of each key and its first record."""
        by_key: dict[str, list[int]] = {}
        for record in records.tolist():
            by_key.setdefault(self._entry(int(places[record]))["k"], []).append(record)
        winners, firsts = [], []
        for group in by_key.values():
            done = [record for record in group if not failed[record]]
            winners.append((done or group)[-1])
            firsts.append(group[0])
        return hashes[winners], places[winners], np.asarray(firsts, dtype=np.int64)

    def _entry(self, place: int) -> dict[str, Any]:
        return self._sources[place >> _SOURCE_BITS].at(place & ((1 << _SOURCE_BITS) - 1))

    def _locate(self, key: str) -> tuple[int, dict[str, Any]] | None:
        """The slot of ``key`` and its winning record (read once), or ``None``."""
        value = hash(key)
        low, high = np.searchsorted(self.hashes, value, "left"), np.searchsorted(self.hashes, value, "right")
        for slot in range(int(low), int(high)):
            entry = self._entry(int(self.places[slot]))
            if entry["k"] == key:
                return slot, entry
        return None

    def find(self, key: str, mark: bool = False) -> tuple[int, dict[str, Any]] | None:
        """``(source, entry)`` of ``key``'s result, or ``None``; ``mark``: count it as reached."""
        located = self._locate(key)
        if located is None:
            return None
        slot, entry = located
        if mark:
            self.visited[slot] = True
        return int(self.places[slot]) >> _SOURCE_BITS, entry

    def has(self, key: str) -> bool:
        return self._locate(key) is not None

    def unvisited(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for slot in np.flatnonzero(~self.visited)[np.argsort(self.first[~self.visited], kind="stable")].tolist():
            place = int(self.places[slot])
            yield place >> _SOURCE_BITS, self._entry(place)

    def keys(self) -> Iterator[str]:
        for slot in np.argsort(self.first, kind="stable").tolist():
            yield self._entry(int(self.places[slot]))["k"]


def _record_table(sources: list[_Source]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every sound record in order: the hash of its key, its place (source << 40 | offset), whether it failed."""
    import array

    hashes, places, failed = array.array("q"), array.array("q"), array.array("b")
    for number, source in enumerate(sources):
        for offset, entry in source.scan():
            hashes.append(hash(entry["k"]))
            places.append(number << _SOURCE_BITS | offset)
            failed.append(entry.get("e") is not None)
    return (np.frombuffer(hashes, dtype=np.int64), np.frombuffer(places, dtype=np.int64),
            np.frombuffer(failed, dtype=np.int8).astype(bool))


def read_journal(output: Path, previous: str | None = None) -> Results:
    """Every result recorded by any rank's journal (a mapping read from disk; see :class:`Results`)."""
    return Results(output, previous)
