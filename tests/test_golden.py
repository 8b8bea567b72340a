"""Golden-file regression test of ``aikd evaluate``'s numbers (as OFIQ does for its quality measures).

Checked-in inputs (``tests/golden/evaluate/``: embeddings, a CSV pair protocol, three score files, made once
by ``make_inputs.py`` there) go through the command line in-process; the ``pauc.csv`` and ``tables.md`` it
writes are compared with the checked-in ``expected_pauc.csv`` and ``expected_tables.md``.

Regenerating the expected files deliberately (only when the numbers are meant to change, e.g. a corrected
definition; the commit message must say why they changed)::

    AIKD_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

That run rewrites the expected files instead of comparing and reports the test as skipped; review the diff
of the expected files before committing.
"""

from __future__ import annotations

import csv
import difflib
import logging
import math
import os
import shutil
from pathlib import Path

import pytest

from aikd.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden" / "evaluate"
EXPECTED_PAUC = GOLDEN / "expected_pauc.csv"
EXPECTED_TABLES = GOLDEN / "expected_tables.md"
REGENERATE = os.environ.get("AIKD_REGENERATE_GOLDEN") == "1"

METHODS = ("informative", "weak", "random")
KEY_COLUMNS = ("fr_model", "dataset", "method", "fmr", "threshold_mode", "discard_limit")
STRING_COLUMNS = {"fr_model", "dataset", "method", "threshold_mode"}
INTEGER_COLUMNS = {"mated", "comparisons"}
# FNMR values are ratios of counts and areas are float64 sums of them: equal up to summation order.
REL_TOL, ABS_TOL = 1e-9, 1e-12
# The threshold is a float32 similarity (a dot product whose last bits may differ between numpy builds and
# CPUs); the inputs keep every two similarities >= 1e-5 apart, so that never changes a decision.
FLOAT32_COLUMNS = {"threshold": 1e-6}


def run_evaluate(output: Path, score_files: list[Path] | None = None) -> Path:
    """``aikd evaluate`` on the golden inputs (or other score files) into ``output``."""
    scores = score_files or [GOLDEN / f"{method}.csv" for method in METHODS]
    code = main(["evaluate", "--scores", *map(str, scores), "--embeddings", str(GOLDEN / "emb.npz"),
                 "--pairs", str(GOLDEN / "pairs.csv"), "--dataset", "golden", "--fr-model", "synthetic32",
                 "--fmr", "0.01", "0.05", "--discard-limit", "0.2", "0.3", "--threshold", "both",
                 "--no-plots", "-o", str(output)])
    assert code == 0
    return output


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _values_match(column: str, expected: str, actual: str) -> bool:
    if column in STRING_COLUMNS or column in INTEGER_COLUMNS:
        return expected == actual
    want, got = float(expected), float(actual)
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    return math.isclose(got, want, rel_tol=FLOAT32_COLUMNS.get(column, REL_TOL), abs_tol=ABS_TOL)


def pauc_mismatches(expected_path: Path, actual_path: Path) -> list[str]:
    """Every difference between two ``pauc.csv`` files, each naming the row, the column and both values."""
    expected_header, expected = read_csv(expected_path)
    actual_header, actual = read_csv(actual_path)
    if actual_header != expected_header:
        return [f"header differs: expected {expected_header}, got {actual_header}"]
    problems = []
    if len(actual) != len(expected):
        problems.append(f"{len(actual)} rows instead of {len(expected)}")
    for number, (want, got) in enumerate(zip(expected, actual, strict=False), start=1):
        row = "/".join(want[c] for c in KEY_COLUMNS)
        for column in expected_header:
            if not _values_match(column, want[column], got[column]):
                problems.append(f"row {number} ({row}) column {column}: expected {want[column]}, "
                                f"got {got[column]}")
    return problems


def test_evaluate_matches_golden(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="aikd")
    output = run_evaluate(tmp_path / "report")
    if REGENERATE:
        shutil.copyfile(output / "pauc.csv", EXPECTED_PAUC)
        shutil.copyfile(output / "tables.md", EXPECTED_TABLES)
        pytest.skip(f"AIKD_REGENERATE_GOLDEN=1: rewrote {EXPECTED_PAUC.name} and {EXPECTED_TABLES.name}")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    problems = pauc_mismatches(EXPECTED_PAUC, output / "pauc.csv")
    assert not problems, "pauc.csv differs from the golden file:\n" + "\n".join(problems)
    expected_tables = EXPECTED_TABLES.read_text(encoding="utf-8")
    actual_tables = (output / "tables.md").read_text(encoding="utf-8")
    diff = difflib.unified_diff(expected_tables.splitlines(), actual_tables.splitlines(),
                                str(EXPECTED_TABLES.name), "tables.md", lineterm="")
    assert actual_tables == expected_tables, "tables.md differs from the golden file:\n" + "\n".join(diff)


def test_golden_comparison_catches_one_changed_quality(tmp_path):
    """One image's quality in one score file moved: the comparison must fail, and only for that method."""
    scores = tmp_path / "scores"
    scores.mkdir()
    for method in METHODS:
        shutil.copyfile(GOLDEN / f"{method}.csv", scores / f"{method}.csv")
    header, rows = read_csv(scores / "informative.csv")
    lowest = min(rows, key=lambda row: float(row["quality"]))
    lowest["quality"] = "2.0"  # the worst image now looks the best: its comparisons are discarded last
    with open(scores / "informative.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(rows)
    output = run_evaluate(tmp_path / "report", [scores / f"{method}.csv" for method in METHODS])
    problems = pauc_mismatches(EXPECTED_PAUC, output / "pauc.csv")
    assert problems, "changing a quality did not change pauc.csv: the golden comparison is not sensitive"
    assert all("/informative/" in problem and " column pauc" in problem for problem in problems), problems
