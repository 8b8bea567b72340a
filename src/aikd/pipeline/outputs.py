"""The one output policy of every per-image command: where an output may go, and what may happen to one there.

- an output is never one of the run's inputs, never a link or a special file (a device, a FIFO), never a name
  too long for its side files, and never under a parent that is a file (:func:`check_output_path`);
- an existing output (or an interrupted run's journal) is never replaced without ``--overwrite`` nor added to
  without ``--resume`` (:func:`check_output`), and ``--resume`` only continues the same job: the same model and
  settings (:func:`check_same_job`, against the run record ``OUT_STEM.run.json``);
- one run writes an output at a time (:class:`OutputLock`); :func:`claimed_output` does all of this before the
  first result and releases the lock when the run is over.

Side files of an output ``scores.csv``: ``scores.csv.partial/`` (the journal of a run in progress),
``scores.errors.csv`` (failed inputs), ``scores.run.json`` (what made it) and ``.scores.csv.lock``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aikd.runtime import Distributed

__all__ = ["MAX_OUTPUT_NAME", "OutputLock", "check_new_file", "check_output", "check_output_path", "check_plain_file",
           "check_same_job", "check_side_output", "claimed_files", "claimed_output",
           "errors_path", "journal_dir", "read_run_record", "record_path", "settings_path"]


def errors_path(output: Path) -> Path:
    """``scores.csv`` -> ``scores.errors.csv`` (``landmarks.csv`` -> ``landmarks.errors.csv``)."""
    return output.with_name(f"{output.stem}.errors.csv")


def journal_dir(output: Path) -> Path:
    return output.with_name(f"{output.name}.partial")


def journal_without_results(output: Path) -> bool:
    """Whether ``output`` has a journal that holds no result (a run that stopped before its first batch): it counts
    for nothing, and is removed under the output's lock (:func:`check_output`)."""
    partial = journal_dir(output)
    return partial.is_dir() and not any(path.stat().st_size for path in partial.glob("rank*.jsonl"))


def check_output(output: Path, resume: bool, overwrite: bool, remove_empty_journal: bool = True) -> None:
    """Refuse to silently replace a finished output or an interrupted run's journal, or a path that is not a
    plain output (a device, a link). Under the output's lock (``remove_empty_journal``) a journal without a
    result is removed and, with ``--overwrite``, any journal."""
    partial = journal_dir(output)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one")
    empty = journal_without_results(output)
    if empty and remove_empty_journal:
        shutil.rmtree(partial, ignore_errors=True)  # a run that stopped before its first result: nothing to keep
    check_plain_file(output)
    if overwrite:
        if remove_empty_journal:
            shutil.rmtree(partial, ignore_errors=True)
    elif not resume and partial.exists() and not empty:
        raise ValueError(f"{output}: an interrupted run left its journal {partial}; pass --resume to continue "
                         "it or --overwrite to start over")
    elif not resume and output.exists():
        raise ValueError(f"{output} exists; pass --resume to continue or --overwrite to start over")


def record_path(output: Path) -> Path:
    """``scores.csv`` -> ``scores.run.json``: what defines a finished output (command, model, settings)."""
    return output.with_name(f"{output.stem}.run.json")


def settings_path(output: Path) -> Path:
    return journal_dir(output) / "settings.json"


def read_run_record(output: Path) -> dict[str, Any] | None:
    """What made ``output``: its journal's settings (a run in progress) or its run record (a finished one);
    ``None`` when there is neither.

    Raises:
        ValueError: a record that cannot be read or is not a JSON object (the message names it).
    """
    for path in (settings_path(output), record_path(output)):
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ValueError(f"{path}: unreadable run record ({err}); pass --overwrite to start over") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path}: not a run record (a JSON object); pass --overwrite to start over")
            return data
    return None


# Recorded for provenance, not compared on --resume: they follow from what is compared (``weights``, the torch
# weights an ONNX graph came from, follows from the graph's own fingerprint, ``model``), and a record written before
# such a key existed is still the same job.
PROVENANCE_SETTINGS = frozenset({"weights"})


def check_same_job(output: Path, settings: dict[str, Any]) -> None:
    """On ``--resume``: refuse to add to an output made by another model or with other settings."""
    if not (output.exists() or journal_dir(output).exists()):
        return
    recorded = read_run_record(output)
    if recorded is None:
        raise ValueError(f"--resume: {output} has no record of the model and settings that made it (written by "
                         "another program or an older aikd), so it cannot be continued safely; pass --overwrite")
    changed = [change for change in _differences(recorded, settings) if change[0] not in PROVENANCE_SETTINGS]
    if changed:
        key, before, now = changed[0]
        raise ValueError(f"--resume: {output} was made with {key} = {before!r}, this run has {key} = {now!r}; "
                         "resume with the same model and options, or pass --overwrite to start over, or choose "
                         "another -o")


def _differences(recorded: Any, settings: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, recorded, now)`` of every setting that differs, nested dicts walked (``crop.mode``)."""
    if not (isinstance(recorded, dict) and isinstance(settings, dict)):
        return [] if recorded == settings else [(prefix, recorded, settings)]
    found = []
    for key in sorted(set(recorded) | set(settings)):
        found += _differences(recorded.get(key), settings.get(key), f"{prefix}.{key}" if prefix else key)
    return found


class OutputLock:
    """An exclusive lock on an output (``.NAME.lock`` beside it, ``flock``): one run writes it at a time.

    The lock file is left in place (removing it would race with a run waiting for it); the lock itself ends
    with the process, however it ends.
    """

    def __init__(self, output: Path) -> None:
        import fcntl

        output.parent.mkdir(parents=True, exist_ok=True)
        self.path = output.with_name(f".{output.name}.lock")
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "another process"
            self.handle.close()
            raise ValueError(f"{output} is being written by another aikd run ({owner}); wait for it to finish, "
                             "or choose another -o") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}")
        self.handle.flush()

    def release(self) -> None:
        self.handle.close()


MAX_OUTPUT_NAME = 240  # bytes: room for the side files' suffixes (.partial, .lock, .errors.csv) within NAME_MAX


def check_output_path(output: Path, inputs: Sequence[Path | str] = (), option: str = "-o") -> None:
    """Refuse an output path aikd cannot or must not write: a name too long for its side files, a parent that
    is a file, or one of the run's own inputs (``option`` names the setting in messages)."""
    if len(os.fsencode(output.name)) > MAX_OUTPUT_NAME:
        raise ValueError(f"{option}: the name {output.name[:40]}... is {len(os.fsencode(output.name))} bytes; aikd "
                         f"needs at most {MAX_OUTPUT_NAME} (its side files add a suffix within the 255-byte limit)")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option}: {parent} is a file, not a folder, so {output} cannot be written")
            break
    target = output.resolve()
    clash = next((Path(p) for p in inputs if Path(p).resolve() == target), None)
    if clash is not None:
        raise ValueError(f"{option} {output} is one of this run's inputs ({clash}); write it somewhere else")


def check_plain_file(path: Path, option: str = "-o") -> None:
    """Refuse to write over a link or a special file (a device, a FIFO, a socket): aikd writes plain files only."""
    if path.is_symlink() or (path.exists() and not (path.is_file() or path.is_dir())):
        raise ValueError(f"{option} {path} is a link or a special file, not an output aikd writes; choose another")


def check_side_output(path: Path, option: str, resume: bool, overwrite: bool, inputs: Sequence[Path | str] = ()
                      ) -> None:
    """The output policy for a command's further output (``--embeddings FILE``): never an input, never a link or a
    special file, and an existing one kept unless ``--resume`` continues it or ``--overwrite`` replaces it."""
    check_output_path(path, inputs, option)
    check_plain_file(path, option)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; name a file")
    if path.exists() and not (resume or overwrite):
        raise ValueError(f"{option} {path} exists; pass --resume to continue or --overwrite to start over")


def check_new_file(path: Path, option: str, overwrite: bool, inputs: Sequence[Path | str] = ()) -> None:
    """The output policy for a file a command writes whole (no journal, no ``--resume``): never an input, never a
    link or a special file, and an existing one replaced only with ``--overwrite``."""
    check_output_path(path, inputs, option)
    check_plain_file(path, option)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def claimed_files(files: Sequence[tuple[str, Path]], overwrite: bool = False,
                  inputs: Sequence[Path | str] = ()) -> Iterator[OutputLock]:
    """Claim the files a command writes whole (``(option, path)``; the first is the main output): every one
    passes :func:`check_new_file` before anything is created (a refusal leaves nothing behind, not even a lock
    file), then the main output is locked and the checks are made again under the lock."""
    for option, path in files:
        check_new_file(path, option, overwrite, inputs)
    lock = OutputLock(files[0][1])
    try:
        for option, path in files:
            check_new_file(path, option, overwrite, inputs)
        yield lock
    finally:
        lock.release()


def _among(inputs: Iterable[Path | str], targets: Sequence[Path]) -> dict[Path, list[Path]]:
    """The first of ``inputs`` that is each of ``targets`` (the same resolved path), in one pass of one ``stat`` per
    input: a run of millions of images is checked in seconds, without a list of them in memory. Only an input with
    the same file identity as an existing target, or one that does not exist (a missing target's equal), is
    resolved."""
    resolved = {target: target.resolve() for target in targets}
    existing: dict[tuple[int, int], list[Path]] = {}
    missing: dict[Path, list[Path]] = {}
    for target, real in resolved.items():
        try:
            info = os.stat(real)
            existing.setdefault((info.st_dev, info.st_ino), []).append(target)
        except OSError:
            missing.setdefault(real, []).append(target)
    found: dict[Path, list[Path]] = {}
    for path in inputs:
        try:
            info = os.stat(path)
            candidates = existing.get((info.st_dev, info.st_ino), [])
        except OSError:
            candidates = missing.get(Path(path).resolve(), []) if missing else []
        for target in candidates:
            if target not in found and Path(path).resolve() == resolved[target]:
                found[target] = [Path(path)]
    return found


@contextlib.contextmanager
def claimed_output(output: Path, settings: dict[str, Any], *, resume: bool = False, overwrite: bool = False,
                   dist: Distributed | None = None, inputs: Iterable[Path | str] = (),
                   side_outputs: Sequence[tuple[str, Path]] = ()) -> Iterator[OutputLock | None]:
    """Everything a per-image command checks before it writes ``output``: a sound path that is none of the
    ``inputs`` (images, landmarks, labels...), an exclusive lock, no result replaced or mixed
    (:func:`check_output`, :func:`check_same_job`), and ``settings`` recorded in a new journal. Its side files
    (errors file, run record) and every ``side_outputs`` file (``(option, path)``: :func:`check_side_output`) obey
    the same policy.

    Under torchrun rank 0 does it and every rank gets its refusal. Gives the lock (rank 0; ``None`` on the
    others), held until the ``with`` block ends.
    """
    claimed: list[OutputLock] = []

    def check() -> None:
        found = _among(inputs, [output, errors_path(output), record_path(output), *(p for _, p in side_outputs)])
        check_output_path(output, found.get(output, ()))
        for side in (errors_path(output), record_path(output)):
            check_output_path(side, found.get(side, ()), "-o")
            check_plain_file(side, "-o (its side file)")
        for option, path in side_outputs:
            if path.resolve() in {output.resolve(), errors_path(output).resolve(), record_path(output).resolve()}:
                raise ValueError(f"{option} must name a different file than -o/--output and its side files")
            check_side_output(path, option, resume, overwrite, found.get(path, ()))
        check_output(output, resume, overwrite, remove_empty_journal=False)
        if resume and not journal_without_results(output):  # an empty journal goes under the lock: not its settings
            check_same_job(output, settings)

    def claim() -> None:
        check()  # before the lock file exists: a refused output leaves nothing behind
        lock = OutputLock(output)
        try:  # again under the lock (another run may have started in between): what is on disk, not the paths
            check_output(output, resume, overwrite)
            if resume:
                check_same_job(output, settings)
            journal = journal_dir(output)
            journal.mkdir(parents=True, exist_ok=True)
            if not settings_path(output).exists():
                settings_path(output).write_text(json.dumps(settings, sort_keys=True), encoding="utf-8")
        except BaseException:
            lock.release()
            raise
        claimed.append(lock)

    if dist is None:
        claim()
    else:
        dist.from_main(claim)
    lock = claimed[0] if claimed else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
