"""The report of ``aikd evaluate``: EDC/ERC curves, pAUC tables and plots for face image quality (FIQA) methods.

One dataset and one face-recognition (FR) model::

    aikd evaluate --scores aikd.csv crfiqa.csv --embeddings lfw_arcface.npz --pairs pairs.txt -o report/
    aikd evaluate --embeddings adience.npz --pairs adience.csv --protocol identity --oracle -o report/

Several of both, as in the AI-KD paper's tables (one table per FR model, one column per dataset)::

    aikd evaluate --suite suite.yaml -o report/

Curves and areas are computed by :mod:`aikd.evaluation.metrics` (see there for the two threshold conventions,
``fixed`` and ``recomputed``, and the exact definitions); protocol files are read by :mod:`aikd.evaluation.protocols`.
Score files are what ``aikd score`` writes (CSV ``path,quality``, the official pickle, or JSONL; read by
:func:`aikd.io.read_labels`), embeddings ``.npz`` files with ``paths`` and ``embeddings`` (``aikd embed``).
Image names are matched by aikd's one name policy (:mod:`aikd.names`).

Images of the protocol that some score file lacks are reported (count and examples) and every pair using
them is excluded for all methods alike, so that methods are compared on the same comparisons; it is an
error when no mated or no non-mated comparison is left.

Outputs in ``-o`` (each written atomically):

* ``erc.csv``: curve points ``fr_model,dataset,method,fmr,threshold_mode,discard_fraction,fnmr,threshold``;
  long fixed-threshold curves are thinned to at most ``--max-points`` exact points per curve.
* ``pauc.csv``: ``fr_model,dataset,method,fmr,threshold_mode,discard_limit,pauc,pauc_normalised,
  pauc_oracle,pauc_minus_oracle,fnmr0,threshold,mated,comparisons`` (``pauc_normalised`` = pAUC divided by
  FNMR(0) x discard_limit: 1.0 is no better than not discarding, lower is better).
* ``edc_<dataset>_<fr_model>_fmr<fmr>_<mode>.png`` and ``.svg``: FNMR against discard fraction, one line
  per method, the no-discard line and the oracle line.
* ``tables.md`` and ``table_<fr_model>_fmr<fmr>_<mode>_limit<limit>.csv``: normalised pAUC in the paper's
  layout (rows = methods, columns = datasets, last column = mean over datasets; best value in bold);
* with several FR models, ``table_suite_fmr<fmr>_<mode>_limit<limit>.csv`` and a section of ``tables.md``: the
  paper's cross-model table, one column block (datasets + mean) per FR model, same-model cells in italics
  (:mod:`aikd.evaluation.tables`).

Suite file (YAML; relative paths are relative to the suite file; command-line options win over the
optional top-level settings)::

    # aikd evaluate --suite suite.yaml -o report/
    fmr: [0.001]            # optional: target FMRs
    discard_limit: [0.3]    # optional: pAUC limits
    threshold: both         # optional: fixed | recomputed | both
    source: CosFace         # optional: the FR model the methods were distilled from / derived from
                            #   (or per method: {AI-KD: CosFace, MagFace: MagFace}); marks same-model and
                            #   cross-model results in the suite table
    models:                 # FR model -> dataset -> files; one table per FR model
      ArcFace:
        LFW:
          embeddings: emb/arcface/lfw.npz
          pairs: protocols/lfw/pairs.txt
          protocol: auto        # optional: auto | lfw | calfw | bin | csv | identity
          scores:               # method -> score file
            AI-KD: scores/aikd/lfw.csv
            CR-FIQA: scores/crfiqa/lfw.csv
        Adience:
          embeddings: emb/arcface/adience.npz
          pairs: protocols/adience_identities.csv
          protocol: identity
          identity_column: identity   # optional (identity protocol)
          scores: {AI-KD: scores/aikd/adience.csv, CR-FIQA: scores/crfiqa/adience.csv}

Other optional per-dataset keys: ``lfw_pattern`` (image-name pattern of LFW-style pairs files).
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aikd.evaluation import metrics as ev
from aikd.evaluation import protocols, tables
from aikd.io import atomic_write, load_embeddings, read_labels, write_csv
from aikd.names import NameIndex

log = logging.getLogger(__name__)

ORACLE = "oracle"
MODE_TITLES = {
    "fixed": "fixed threshold (FNM-EDC, ISO/IEC 29794-1)",
    "recomputed": "threshold recomputed at each discard level",
}
X_LABELS = {
    "fixed": "discard fraction (of mated comparisons, lowest pair quality first)",
    "recomputed": "discard fraction (of all comparisons, lowest pair quality first)",
}
ERC_HEADER = ("fr_model", "dataset", "method", "fmr", "threshold_mode", "discard_fraction", "fnmr",
              "threshold")
PAUC_HEADER = ("fr_model", "dataset", "method", "fmr", "threshold_mode", "discard_limit", "pauc",
               "pauc_normalised", "pauc_oracle", "pauc_minus_oracle", "fnmr0", "threshold", "mated",
               "comparisons")
SUITE_KEYS = {"fmr", "discard_limit", "threshold", "source", "models"}
DATASET_KEYS = {"embeddings", "pairs", "protocol", "scores", "lfw_pattern", "identity_column"}


@dataclass
class Job:
    """One (FR model, dataset) evaluation."""

    fr_model: str
    dataset: str
    embeddings: Path
    pairs: Path | None
    scores: dict[str, Path]
    protocol: str = "auto"
    lfw_pattern: str = protocols.LFW_PATTERN
    identity_column: str = "identity"


@dataclass
class Settings:
    """What to compute for every job: FMRs, pAUC limits, threshold conventions, the oracle, strictness."""

    fmrs: list[float]
    limits: list[float]
    modes: list[str]
    oracle: bool = False
    strict: bool = True

    @classmethod
    def make(cls, fmrs: Sequence[float] | None = None, limits: Sequence[float] | None = None,
             threshold: str | None = None, oracle: bool = False, strict: bool = True,
             suite: dict | None = None) -> Settings:
        """Checked settings: the values given, else a suite file's top-level ones, else the defaults."""
        suite = suite or {}
        fmrs = list(fmrs or _as_list(suite.get("fmr", [ev.DEFAULT_FMR]), "fmr"))
        limits = list(limits or _as_list(suite.get("discard_limit", [ev.DEFAULT_DISCARD_LIMIT]), "discard_limit"))
        threshold = threshold or str(suite.get("threshold", "both"))
        if threshold not in ("fixed", "recomputed", "both"):
            raise ValueError(f"threshold must be fixed, recomputed or both, not {threshold!r}")
        modes = list(ev.THRESHOLD_MODES) if threshold == "both" else [threshold]
        bad = [f for f in fmrs if not 0 < f < 1]
        if bad:
            raise ValueError(f"--fmr must be between 0 and 1 (exclusive), got {bad[0]:g}")
        top = float(ev.RECOMPUTED_GRID[-1]) if "recomputed" in modes else 1.0
        bad = [d for d in limits if not 0 < d <= top or d >= 1]
        if bad:
            raise ValueError(f"--discard-limit must be in (0, {top:g}] for the threshold conventions asked, "
                             f"got {bad[0]:g}")
        return cls(sorted(set(fmrs)), sorted(set(limits)), modes, oracle, strict)


@dataclass
class Outcome:
    """Curves of one job, with what they were computed on."""

    job: Job
    curves: ev.Curves
    methods: list[str]
    n_comparisons: int
    oracles: dict[tuple[float, str], ev.EDC] = field(default_factory=dict)


def dataset_name(pairs: Path | None, embeddings: Path) -> str:
    """``pairs_CALFW.txt`` -> CALFW, ``lfw/pairs.txt`` -> lfw, ``lfw.bin`` -> lfw; else embeddings stem."""
    if pairs is None:
        return embeddings.stem
    stem = re.sub(r"^pairs[_-]|[_-]pairs$", "", pairs.stem, flags=re.IGNORECASE)
    return pairs.parent.name if stem.lower() in ("pairs", "") and pairs.parent.name else stem


def _suite_entry(model: str, dataset: str, entry: object, root: Path) -> Job:
    where = f"models.{model}.{dataset}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with embeddings, pairs and scores")
    unknown = set(entry) - DATASET_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(DATASET_KEYS))}")
    if "embeddings" not in entry:
        raise ValueError(f"{where}: embeddings is missing")
    scores = entry.get("scores") or {}
    if not isinstance(scores, dict):
        raise ValueError(f"{where}.scores: expected a mapping method -> score file")
    protocol = str(entry.get("protocol", "auto"))
    if protocol not in protocols.PROTOCOLS:
        raise ValueError(f"{where}.protocol: {protocol!r} is not one of {', '.join(protocols.PROTOCOLS)}")
    pairs = root / str(entry["pairs"]) if entry.get("pairs") else None
    return Job(str(model), str(dataset), root / str(entry["embeddings"]), pairs,
               {str(name): root / str(path) for name, path in scores.items()}, protocol,
               str(entry.get("lfw_pattern", protocols.LFW_PATTERN)),
               str(entry.get("identity_column", "identity")))


def load_suite(path: Path) -> tuple[list[Job], dict]:
    """Jobs and top-level settings of a suite file (format in the module docstring)."""
    from aikd.config import load_yaml

    data = load_yaml(path, "suite file")
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"]:
        raise ValueError(f"{path}: expected a mapping with 'models: {{FR model: {{dataset: ...}}}}'")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(SUITE_KEYS))}")
    jobs = []
    for model, datasets in data["models"].items():
        if not isinstance(datasets, dict) or not datasets:
            raise ValueError(f"{path}: models.{model}: expected a mapping dataset -> files")
        jobs.extend(_suite_entry(model, dataset, entry, path.parent) for dataset, entry in datasets.items())
    settings = {key: data[key] for key in SUITE_KEYS - {"models", "source"} if key in data}
    methods = list(dict.fromkeys(method for job in jobs for method in job.scores))
    try:
        settings["source"] = tables.parse_sources(data.get("source"), [str(m) for m in data["models"]], methods)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return jobs, settings


def _as_list(value: object, what: str) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected numbers, got {value!r}") from None


# ----------------------------------------------------------------------------------------- evaluation
def _qualities(job: Job, index: NameIndex, n_rows: int) -> dict[str, np.ndarray]:
    """Per method, the quality of each embedding row (NaN where the score file has none)."""
    qualities = {}
    for method, path in job.scores.items():
        if not path.is_file():
            raise FileNotFoundError(f"score file not found: {path}")
        table = read_labels(path)
        rows = index.find_all(table.paths)
        quality = np.full(n_rows, np.nan)
        found = np.flatnonzero(rows >= 0)[::-1]  # assigned last to first: a repeated name keeps its first row
        quality[rows[found]] = table.qualities[found]
        qualities[method] = quality
    return qualities


def _examples(paths: Sequence[str], rows: np.ndarray, count: int = 3) -> str:
    shown = ", ".join(paths[int(r)] for r in rows[:count])
    return shown + (", ..." if len(rows) > count else "")


Resolved = protocols.IndexedPairs | protocols.AllVsAll


def _drop_unscored(resolved: Resolved, qualities: dict[str, np.ndarray], job: Job,
                   paths: Sequence[str]) -> Resolved:
    """Exclude, for all methods alike, the comparisons with an image some score file lacks (warning)."""
    rows = resolved.rows if isinstance(resolved, protocols.IndexedPairs) else np.unique(resolved.rows)
    scored = np.ones(len(paths), dtype=bool)
    for method, quality in qualities.items():
        missing = rows[~np.isfinite(quality[rows])]
        if missing.size:
            log.warning("warning: %s: %s (%s) has no score for %d of %d images in the protocol, e.g. %s",
                        job.dataset, method, job.scores[method], missing.size, rows.size,
                        _examples(paths, missing))
        scored &= np.isfinite(quality)
    if isinstance(resolved, protocols.IndexedPairs):
        kept = resolved.subset(scored[resolved.first] & scored[resolved.second])
        has_both = kept.mated.any() and (~kept.mated).any()
    else:
        kept = resolved.subset(scored[resolved.rows])
        counts = np.bincount(kept.identity) if len(kept.rows) else np.zeros(0, np.int64)
        has_both = bool((counts > 1).any() and (counts > 0).sum() > 1)
    if len(kept) < len(resolved):
        log.warning("warning: %s: %d of %d comparisons excluded (images without a score)",
                    job.dataset, len(resolved) - len(kept), len(resolved))
    if not has_both:
        raise ValueError(f"{job.dataset}: no mated or no non-mated comparison left with a score for every "
                         "image from every method")
    return kept


def _compute(resolved: Resolved, embeddings: np.ndarray, qualities: dict[str, np.ndarray],
             settings: Settings) -> ev.Curves:
    if isinstance(resolved, protocols.AllVsAll):
        rows = resolved.rows
        return ev.evaluate_all_vs_all(embeddings[rows], resolved.identity,
                                      {m: q[rows] for m, q in qualities.items()}, settings.fmrs,
                                      settings.modes)
    used, local = np.unique(np.concatenate([resolved.first, resolved.second]), return_inverse=True)
    first, second = local[: len(resolved)], local[len(resolved):]
    return ev.evaluate_pairs(embeddings[used], first, second, resolved.mated,
                             {m: q[used] for m, q in qualities.items()}, settings.fmrs, settings.modes)


@dataclass
class Loaded:
    """One job's files, read and matched: the embedding file's names and vectors, the protocol resolved to its
    rows (comparisons with an image some score file lacks left out), and each method's quality per row."""

    paths: list[str]
    embeddings: np.ndarray
    resolved: Resolved
    qualities: dict[str, np.ndarray]


def read_job(job: Job, strict: bool = True) -> Loaded:
    """Read a job's embeddings, protocol and score files as ``aikd evaluate`` does (also ``aikd calibrate``)."""
    if not job.embeddings.is_file():
        raise FileNotFoundError(f"embeddings file not found: {job.embeddings}")
    paths, embeddings = load_embeddings(job.embeddings)
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(f"{job.embeddings}: embeddings contain NaN or infinite values")
    index = NameIndex(paths)
    if job.pairs is None:
        protocol = protocols.identity_list_from_names(paths, str(job.embeddings), strict)
    else:
        protocol = protocols.read_protocol(job.pairs, job.protocol, pattern=job.lfw_pattern,
                                           identity_column=job.identity_column, strict=strict)
    resolved = protocols.resolve(protocol, index, strict)
    qualities = _qualities(job, index, len(paths))
    return Loaded(paths, embeddings, _drop_unscored(resolved, qualities, job, paths), qualities)


def evaluate_job(job: Job, settings: Settings) -> Outcome:
    """Read one job's files, evaluate every method and derive the oracle curves."""
    if not job.scores and not settings.oracle:
        raise ValueError(f"{job.dataset}: no score files: give --scores (or --oracle for the oracle only)")
    loaded = read_job(job, settings.strict)
    qualities = loaded.qualities
    methods = list(qualities)
    if not qualities:  # oracle only: a constant quality gives FNMR(0) and the thresholds
        qualities = {"": np.zeros(len(loaded.paths))}
    curves = _compute(loaded.resolved, loaded.embeddings, qualities, settings)
    first = next(iter(qualities))
    oracles = {(fmr, mode): ev.oracle_for(curves[first, fmr, mode]) for fmr in settings.fmrs
               for mode in settings.modes}
    curves = {key: edc for key, edc in curves.items() if key[0] in methods}
    return Outcome(job, curves, methods, len(loaded.resolved), oracles)


# -------------------------------------------------------------------------------------------- outputs
def thin(edc: ev.EDC, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` exact curve points spread evenly over the discard fractions."""
    n = len(edc.discard_fraction)
    if n <= max_points:
        return np.arange(n)
    targets = np.linspace(0, edc.discard_fraction[-1], max(2, max_points))
    picked = np.searchsorted(edc.discard_fraction, targets, side="right") - 1
    return np.unique(np.concatenate([[0], picked, [n - 1]]))


def _named_curves(outcome: Outcome, settings: Settings, fmr: float, mode: str) -> list[tuple[str, ev.EDC]]:
    named = [(method, outcome.curves[method, fmr, mode]) for method in outcome.methods]
    return named + ([(ORACLE, outcome.oracles[fmr, mode])] if settings.oracle else [])


def erc_rows(outcomes: Sequence[Outcome], settings: Settings, max_points: int) -> list[tuple]:
    rows = []
    for outcome in outcomes:
        for fmr in settings.fmrs:
            for mode in settings.modes:
                for method, edc in _named_curves(outcome, settings, fmr, mode):
                    for i in thin(edc, max_points):
                        rows.append((outcome.job.fr_model, outcome.job.dataset, method, fmr, mode,
                                     float(edc.discard_fraction[i]), float(edc.fnmr[i]),
                                     float(edc.threshold[i])))
    return rows


def _area(edc: ev.EDC, limit: float, where: str) -> float:
    try:
        return ev.pauc(edc, limit)
    except ValueError as err:
        log.warning("warning: %s: %s; pAUC left empty", where, err)
        return math.nan


def pauc_rows(outcomes: Sequence[Outcome], settings: Settings) -> list[tuple]:
    rows = []
    for outcome in outcomes:
        job = outcome.job
        for fmr in settings.fmrs:
            for mode in settings.modes:
                oracle = outcome.oracles[fmr, mode]
                if oracle.fnmr0 == 0:
                    log.warning("warning: %s/%s: FNMR is 0 at FMR %g (%s) without discarding; the normalised "
                                "pAUC is left empty", job.fr_model, job.dataset, fmr, mode)
                for method, edc in _named_curves(outcome, settings, fmr, mode):
                    for limit in settings.limits:
                        where = f"{job.fr_model}/{job.dataset}/{method} at FMR {fmr:g} ({mode})"
                        area, best = _area(edc, limit, where), _area(oracle, limit, where + " oracle")
                        base = edc.fnmr0 * limit
                        rows.append((job.fr_model, job.dataset, method, fmr, mode, limit, area,
                                     area / base if base > 0 else math.nan, best, area - best, edc.fnmr0,
                                     float(edc.threshold[0]), edc.n_mated, outcome.n_comparisons))
    return rows


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def plot_edc(outcome: Outcome, settings: Settings, fmr: float, mode: str, stem: Path) -> None:
    """Write ``stem``.png and .svg: FNMR against discard fraction per method, no-discard and oracle lines."""
    from matplotlib.figure import Figure  # no pyplot and no backend switch: the figure draws itself (Agg)

    fig = Figure(figsize=(9.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    limit = max(settings.limits)
    steps = "steps-post" if mode == "fixed" else "default"
    oracle = outcome.oracles[fmr, mode]
    for method in outcome.methods:
        edc = outcome.curves[method, fmr, mode]
        keep = thin(edc, 4000)
        score = _area(edc, limit, method) / (edc.fnmr0 * limit) if edc.fnmr0 > 0 else math.nan
        ax.plot(edc.discard_fraction[keep], edc.fnmr[keep], drawstyle=steps, lw=1.6, ms=3,
                marker="o" if mode == "recomputed" else None, label=f"{method} ({score:.3f})")
    ax.axhline(oracle.fnmr0, color="0.45", ls="--", lw=1.2, label=f"no discard (FNMR {oracle.fnmr0:.4f})")
    x_oracle = np.linspace(0, 0.95, 400)
    ax.plot(x_oracle, ev.oracle_fnmr(oracle.fnmr0, x_oracle), color="black", ls=":", lw=1.5, label="oracle")
    for value in settings.limits:
        ax.axvline(value, color="0.75", lw=0.8, zorder=0)
    ax.axvspan(0, limit, color="0.93", zorder=-1)
    in_region = [edc.fnmr[edc.discard_fraction <= limit] for edc in (outcome.curves[m, fmr, mode]
                                                                    for m in outcome.methods)]
    top = max([oracle.fnmr0 * 1.25, 1e-6, *(1.08 * float(v.max()) for v in in_region if v.size)])
    ax.set(xlim=(0, 0.95), ylim=(0, min(top, 1.02)), ylabel=f"FNMR at FMR = {fmr:g}", xlabel=X_LABELS[mode])
    job = outcome.job
    ax.set_title(f"{job.dataset} ({job.fr_model}), FMR = {fmr:g}\n{MODE_TITLES[mode]}", fontsize=11)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper", title=f"pAUC$_{{norm}}$ up to {limit:g}",
               title_fontsize=8)
    for suffix in ("png", "svg"):
        with atomic_write(stem.with_name(f"{stem.name}.{suffix}"), "wb") as handle:
            fig.savefig(handle, format=suffix, dpi=150)


def write_tables(rows: Sequence[tuple], settings: Settings, output: Path,
                 sources: Mapping[str, str] | None = None) -> list[Path]:
    """Paper-layout tables of normalised pAUC: one per FR model (and FMR, convention, discard limit), and with
    several FR models (or ``sources``) the suite table of every FR model side by side
    (:mod:`aikd.evaluation.tables`)."""
    records = [dict(zip(PAUC_HEADER, row, strict=True)) for row in rows]
    written = []
    text = ["# Normalised pAUC", "", "Lower is better; 1.0 is no better than not discarding. "
            "Mean over datasets in the last column; the best value of each column in bold.", ""]
    models = list(dict.fromkeys(r[0] for r in rows))
    for model, fmr, mode, limit in itertools.product(models, settings.fmrs, settings.modes, settings.limits):
        methods, datasets, table = tables.model_table(records, model, fmr, mode, limit)
        path = output / f"table_{_file_part(model)}_fmr{fmr:g}_{mode}_limit{limit:g}.csv"
        write_csv(path, ["method", *datasets, "mean"],
                  [[m, *row] for m, row in zip(methods, table.tolist(), strict=True)])
        written.append(path)
        text += [f"## {model}: FMR {fmr:g}, {MODE_TITLES[mode]}, discard limit {limit:g}", "",
                 *tables.markdown(methods, [*datasets, "mean"], table), ""]
    if len(models) > 1 or sources:
        for fmr, mode, limit in itertools.product(settings.fmrs, settings.modes, settings.limits):
            path = output / f"table_suite_fmr{fmr:g}_{mode}_limit{limit:g}.csv"
            text += _write_suite_table(records, (fmr, mode, limit), dict(sources or {}), path)
            written.append(path)
    with atomic_write(output / "tables.md") as handle:
        handle.write("\n".join(text).rstrip() + "\n")
    return [*written, output / "tables.md"]


def _write_suite_table(records: Sequence[dict], setting: tuple[float, str, float], sources: dict[str, str],
                       path: Path) -> list[str]:
    """Write the suite table's CSV (columns ``FR model/dataset``, a ``source`` column); its Markdown section."""
    fmr, mode, limit = setting
    table = tables.suite_table(records, fmr, mode, limit, sources)
    columns = table.columns()
    write_csv(path, ["method", "source", *(f"{model}/{name}" for model, name in columns)],
              [[m, sources.get(m, ""), *row] for m, row in zip(table.methods, table.values.tolist(), strict=True)])
    blocks = []
    for model, _ in table.blocks:
        kind = tables.relation(model, table.methods, sources)
        blocks.append(f"{model} ({kind})" if kind else model)
    legend = ("Italic: same-model (the FR model the method was distilled from or derived from: `source` in the "
              "suite file); upright: cross-model." if sources else
              "Give `source` in the suite file to mark same-model and cross-model results.")
    labels = [m + (f" [{sources[m]}]" if m in sources else "") for m in table.methods]
    return [f"## All FR models: FMR {fmr:g}, {MODE_TITLES[mode]}, discard limit {limit:g}", "",
            f"Column blocks: {', '.join(blocks)}. {legend}", "",
            *tables.markdown(labels, [f"{model}: {name}" for model, name in columns], table.values,
                             table.same), ""]


# ------------------------------------------------------------------------------------------------ run
def write_report(jobs: Sequence[Job], settings: Settings, output: Path, max_points: int = 2000,
                 plots: bool = True, sources: Mapping[str, str] | None = None) -> tuple[list[tuple], list[Path]]:
    """Evaluate every job, then write ``erc.csv``, ``pauc.csv``, the tables and (if ``plots``) the EDC plots.

    ``sources`` (method -> the FR model it was distilled from or derived from; a suite file's ``source``) marks
    same-model and cross-model results in the suite table.

    Returns:
        The ``pauc.csv`` rows and the files written.
    """
    if max_points < 2:
        raise ValueError("--max-points must be at least 2")
    outcomes = [evaluate_job(job, settings) for job in jobs]
    write_csv(output / "erc.csv", ERC_HEADER, erc_rows(outcomes, settings, max_points))
    rows = pauc_rows(outcomes, settings)
    write_csv(output / "pauc.csv", PAUC_HEADER, rows)
    written = [output / "erc.csv", output / "pauc.csv", *write_tables(rows, settings, output, sources)]
    if plots:
        for outcome in outcomes:
            for fmr in settings.fmrs:
                for mode in settings.modes:
                    name = (f"edc_{_file_part(outcome.job.dataset)}_{_file_part(outcome.job.fr_model)}"
                            f"_fmr{fmr:g}_{mode}")
                    plot_edc(outcome, settings, fmr, mode, output / name)
                    written += [output / f"{name}.png", output / f"{name}.svg"]
    return rows, written


def read_fnmr0(path: Path) -> float:
    """FNMR without discarding, from a pauc.csv this module wrote (fixed threshold, first row)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return next(float(row["fnmr0"]) for row in csv.DictReader(handle) if row["threshold_mode"] == "fixed")


def read_pauc(path: Path, limit: float = 0.3) -> dict[str, float]:
    """method -> normalised pAUC (fixed threshold, discard limit ``limit``) from a pauc.csv this module wrote, and
    ``oracle``: the normalised pAUC of discarding exactly the false non-matches first (the best possible)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle)
                if row["threshold_mode"] == "fixed" and math.isclose(float(row["discard_limit"]), limit)]
    if not rows:
        raise ValueError(f"{path}: no fixed-threshold pAUC up to {limit:g}")
    pauc = {row["method"]: float(row["pauc_normalised"]) for row in rows}
    pauc["oracle"] = float(rows[0]["pauc_oracle"]) / (float(rows[0]["fnmr0"]) * limit)
    return pauc


def summary(rows: Sequence[tuple]) -> str:
    col = {name: i for i, name in enumerate(PAUC_HEADER)}
    lines = []
    for r in rows:
        where = f"{r[col['fr_model']]}/{r[col['dataset']]}"
        lines.append(f"{where}  {r[col['method']]:<16} FMR {r[col['fmr']]:<7g} "
                     f"{r[col['threshold_mode']]:<10} limit {r[col['discard_limit']]:<4g} "
                     f"pAUC {r[col['pauc']]:.4g}  normalised {tables.cell(r[col['pauc_normalised']])}")
    return "\n".join(lines)
