"""Normalised-pAUC tables in the AI-KD paper's layout, built from ``pauc.csv`` rows (no torch import).

Babnik et al., "AI-KD" (IWBF 2024), Tables I-II: rows are FIQA methods, columns datasets plus their mean, one
block per face-recognition (FR) model, each block marked *cross-model* or *same-model*: a quality method is
same-model under the FR model it was distilled from (AI-KD) or derived from (SER-FIQ and MagFace use the
FR model's own embeddings), and cross-model under every other. The point of the cross-model blocks: a quality
score is only useful if it predicts the errors of FR models other than its own.

* :func:`model_table`: one FR model's block (methods x datasets + mean), the per-model ``table_*.csv``;
* :func:`suite_table`: every FR model's block side by side, the ``table_suite_*.csv`` of a suite with several
  FR models, with each method's source FR model (``source`` in the suite file) to tell same from cross;
* :func:`markdown`: a block or the suite table as Markdown (best value of each column in bold, same-model
  cells in italics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SuiteTable", "cell", "markdown", "model_table", "parse_sources", "relation", "suite_table"]

Record = Mapping[str, object]  # a pauc.csv row by column name


def cell(value: float) -> str:
    """A table cell: three decimals, or an en dash for a missing value."""
    return "–" if math.isnan(value) else f"{value:.3f}"


def _picked(records: Sequence[Record], fr_model: str, fmr: float, mode: str, limit: float) -> list[Record]:
    return [r for r in records if (r["fr_model"], r["fmr"], r["threshold_mode"], r["discard_limit"])
            == (fr_model, fmr, mode, limit)]


def model_table(records: Sequence[Record], fr_model: str, fmr: float, mode: str,
                limit: float) -> tuple[list[str], list[str], np.ndarray]:
    """Methods, datasets and normalised pAUC with a last column of means, for one FR model and setting."""
    picked = _picked(records, fr_model, fmr, mode, limit)
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in picked))
    methods = list(dict.fromkeys(str(r["method"]) for r in picked))
    value = {(r["method"], r["dataset"]): float(r["pauc_normalised"]) for r in picked}  # type: ignore[arg-type]
    table = np.array([[value.get((m, d), math.nan) for d in datasets] for m in methods], dtype=np.float64)
    return methods, datasets, np.column_stack([table, table.mean(axis=1)])


def parse_sources(value: object, fr_models: Sequence[str], methods: Sequence[str]) -> dict[str, str]:
    """A suite file's ``source``: one FR model for every method, or a mapping method -> FR model.

    Raises:
        ValueError: an FR model or a method the suite does not have, or a value of another type.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        mapping = dict.fromkeys(methods, value)
    elif isinstance(value, Mapping):
        mapping = {str(method): str(model) for method, model in value.items()}
    else:
        raise ValueError(f"source: expected an FR model name or a mapping method -> FR model, got {value!r}")
    for method, model in mapping.items():
        if model not in fr_models:
            raise ValueError(f"source: {model!r} (for {method}) is not an FR model of the suite; "
                             f"the suite has {', '.join(fr_models)}")
        if method not in methods:
            raise ValueError(f"source: {method!r} is not a method of the suite; the suite has {', '.join(methods)}")
    return mapping


def relation(fr_model: str, methods: Sequence[str], sources: Mapping[str, str]) -> str:
    """``same-model``, ``cross-model`` or ``same- and cross-model`` for a block; ``""`` when no source is known."""
    known = {sources[m] == fr_model for m in methods if m in sources}
    if not known:
        return ""
    return "same- and cross-model" if len(known) > 1 else ("same-model" if known.pop() else "cross-model")


@dataclass
class SuiteTable:
    """Every FR model's block side by side.

    Attributes:
        methods: row names, in order of first appearance.
        blocks: (FR model, its datasets) in suite order; each block ends in a mean column.
        values: (methods, sum of len(datasets) + 1 over blocks) normalised pAUC, NaN where missing.
        same: like ``values``: whether the cell is same-model (the method's source is the block's FR model).
    """

    methods: list[str]
    blocks: list[tuple[str, list[str]]]
    values: np.ndarray
    same: np.ndarray

    def columns(self) -> list[tuple[str, str]]:
        """(FR model, dataset or ``mean``) of every value column."""
        return [(model, name) for model, datasets in self.blocks for name in [*datasets, "mean"]]


def suite_table(records: Sequence[Record], fmr: float, mode: str, limit: float,
                sources: Mapping[str, str]) -> SuiteTable:
    """The suite table of one setting (FMR, threshold convention, discard limit)."""
    fr_models = list(dict.fromkeys(str(r["fr_model"]) for r in records))
    parts = [(model, *model_table(records, model, fmr, mode, limit)) for model in fr_models]
    methods = list(dict.fromkeys(m for _, block_methods, _, _ in parts for m in block_methods))
    columns, same = [], []
    for model, block_methods, _, values in parts:
        rows = {m: values[i] for i, m in enumerate(block_methods)}
        block = np.array([rows.get(m, np.full(values.shape[1], math.nan)) for m in methods], dtype=np.float64)
        columns.append(block.reshape(len(methods), values.shape[1]))
        same.append(np.repeat([[sources.get(m) == model] for m in methods], values.shape[1], axis=1))
    blocks = [(model, datasets) for model, _, datasets, _ in parts]
    return SuiteTable(methods, blocks, np.hstack(columns), np.hstack(same).astype(bool))


def markdown(methods: Sequence[str], header: Sequence[str], values: np.ndarray,
             same: np.ndarray | None = None) -> list[str]:
    """Rows of a Markdown table: ``method`` then ``header``; the lowest value of each column in bold (when there is
    more than one method), same-model cells (``same``) in italics."""
    best = np.nanmin(np.where(np.isnan(values), np.inf, values), axis=0)
    lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for i, (method, row) in enumerate(zip(methods, values, strict=True)):
        cells = []
        for j, (value, low) in enumerate(zip(row, best, strict=True)):
            text = f"**{cell(value)}**" if value == low and len(methods) > 1 else cell(value)
            cells.append(f"*{text}*" if same is not None and same[i, j] and not math.isnan(value) else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines
