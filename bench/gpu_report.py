"""The report of ``bench/gpu_check.sh``: every step's figures in one JSON, and docs/gpu.md's table filled in.

Reads the check's work folder (each step's output ``NAME.out``, whose last JSON line is its result; ``score.json``;
the tests' ``junit.xml`` and ``figures.jsonl``; ``steps.tsv``; ``util.csv``, nvidia-smi's utilisation samples),
and writes into ``--out``:

- ``gpu.json``: the values of the table (``values``), the goals of issue 25 (``goals``) and every step's raw result;
- ``gpu_table.md``: the block of ``--template`` between ``<!-- gpu-table -->`` and ``<!-- /gpu-table -->`` with each
  ``{name}`` filled in (``n/a`` where a step gave nothing), followed by the goals and the steps' exit statuses;

then prints ``gpu_table.md``.

    python bench/gpu_report.py --work /tmp/aikd-gpu-check.XXXX --out $OUT --template docs/gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import string
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

MISSING = "n/a"
SPEARMAN_BAR, SCORING_GOAL, TRAINING_GOAL = 0.995, 5.0, 2.0


# ------------------------------------------------------------------------------------------------------ reading
def last_json(path: Path) -> dict[str, Any]:
    """The last line of ``path`` that parses as a JSON object, or ``{}``."""
    if not path.is_file():
        return {}
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def read_tests(path: Path, log: Path) -> dict[str, Any]:
    """Counts and every case's outcome (``passed``, ``failed``, ``skipped``) with its message, from junit XML, or
    where pytest was stopped before writing it, from its verbose log (``path::test PASSED``)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return tests_from_log(log)
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = "skipped" if kind == "skipped" else "failed"
                message = (found.get("message") or found.text or "")[:400]
                break
        cases.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "message": message, "seconds": float(case.get("time") or 0)})
    counts = {outcome: sum(c["outcome"] == outcome for c in cases) for outcome in ("passed", "failed", "skipped")}
    return {**counts, "cases": cases}


def tests_from_log(log: Path) -> dict[str, Any]:
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped", "XFAIL": "skipped"}
    cases = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            match = re.match(r"(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL)", line)
            if match:
                cases.append({"name": match.group(1).replace("/", ".").replace(".py::", "::"),
                              "outcome": words[match.group(2)], "message": "(from the log: pytest was stopped)",
                              "seconds": 0.0})
    if not cases:
        return {}
    counts = {outcome: sum(c["outcome"] == outcome for c in cases) for outcome in ("passed", "failed", "skipped")}
    return {**counts, "cases": cases, "from_log": True}


def read_figures(path: Path) -> dict[str, dict[str, Any]]:
    """The tests' recorded figures by test name (the last record of each)."""
    figures = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            figures[record.get("test", "?")] = record
    return figures


def read_utilisation(path: Path) -> list[tuple[float, float]]:
    """(epoch seconds, GPU utilisation %) samples of nvidia-smi's ``timestamp, utilization.gpu, memory.used``."""
    samples = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((when, float(parts[1])))
            except (ValueError, IndexError):
                continue
    return samples


def busy(samples: list[tuple[float, float]], start: float | None, end: float | None) -> float | None:
    """Mean utilisation (0-1) of the samples in [start, end]; ``None`` without samples there."""
    if start is None or end is None:
        return None
    inside = [u for t, u in samples if start <= t <= end]
    return sum(inside) / len(inside) / 100 if inside else None


# --------------------------------------------------------------------------------------------------- formatting
def number(value: Any, digits: int = 3) -> str:
    """A figure for the table: thousands as integers with separators, small values with ``digits`` significant."""
    if value is None or (isinstance(value, float) and value != value):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.{digits}g}"


def ratio(value: Any) -> str:
    return MISSING if value is None else f"{value:.2f}x"


def share(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.0f} %"


def spearman_text(value: Any) -> str:
    return MISSING if value is None else f"{value:.4f}"


class Filled(dict):
    def __missing__(self, key: str) -> str:
        return MISSING


def table_template(template: Path) -> str:
    text = template.read_text(encoding="utf-8")
    match = re.search(r"<!-- gpu-table -->\n(.*?)<!-- /gpu-table -->", text, re.S)
    return match.group(1) if match else text


# ------------------------------------------------------------------------------------------------------- values
def env_values(env: dict[str, Any]) -> dict[str, str]:
    ceilings = env.get("ceilings", {})
    driver = (env.get("driver") or "").split(",")[0].strip() or None
    providers = env.get("onnxruntime_providers") or []
    ort = env.get("onnxruntime")
    if ort:
        ort = f"{ort} ({'with' if 'CUDAExecutionProvider' in providers else 'without'} a CUDA provider)"
    values = {key: env.get(key) for key in ("gpu", "gpu_memory_gb", "cpus", "python", "torch", "cuda", "cudnn")}
    values.update(driver=driver, onnxruntime=ort, date=datetime.date.today().isoformat())
    values.update({key: ceilings.get(key) for key in ("bf16_tflops", "fp32_tflops", "tf32_tflops", "copy_gb_s")})
    return {key: number(value) if isinstance(value, float) else (value if value is not None else MISSING)
            for key, value in values.items()}


def score_values(score: dict[str, Any], samples: list[tuple[float, float]]) -> dict[str, str]:
    paths = score.get("paths", {})
    values: dict[str, str] = {key: number(score.get(key)) for key in ("images", "workers", "batch_size",
                                                                      "decode_img_s", "prepare_img_s")}

    def row(prefix: str, figures: dict[str, Any]) -> None:
        start = figures.get("started_at")
        steady = start + figures["wall_small_s"] if start is not None and "wall_small_s" in figures else None
        values.update({f"{prefix}_img_s": number(figures.get("img_s")),
                       f"{prefix}_net_img_s": number(figures.get("net_img_s")),
                       f"{prefix}_ratio": ratio(figures.get("ratio_vs_paper")),
                       f"{prefix}_net_ratio": ratio(figures.get("net_ratio_vs_paper")),
                       f"{prefix}_spearman": spearman_text(figures.get("spearman_vs_paper")),
                       f"{prefix}_startup_s": number(figures.get("startup_s")),
                       f"{prefix}_busy": share(busy(samples, steady, figures.get("ended_at")))})

    paper = paths.get("paper", {})
    row("paper", paper)
    loop = (paper.get("decode_s") or 0) + (paper.get("model_s") or 0)
    if loop:
        values["paper_decode_share"] = share(paper["decode_s"] / loop)
        values["paper_model_share"] = share(paper["model_s"] / loop)
    for precision in ("fp32", "bf16", "fp16"):
        row(precision, paths.get(f"aikd-{precision}", {}))
    candidates = {name: f for name, f in paths.items() if name.startswith("aikd-bf16") and "img_s" in f}
    if candidates:
        name, best = max(candidates.items(), key=lambda item: item[1]["img_s"])
        match = re.match(r"aikd-bf16-w(\d+)-b(\d+)$", name)
        workers, batch = match.groups() if match else (score.get("workers"), score.get("batch_size"))
        values["best_setting"] = f"--workers {workers} --batch-size {batch}"
        row("best", best)
    return values


def model_values(models: dict[str, Any], compiled: dict[str, Any]) -> dict[str, str]:
    variants = models.get("variants", {})
    main_batch = next((int(m.group(1)) for name in variants if (m := re.match(r"aikd-fp32-b(\d+)$", name))), None)
    sizes = sorted({int(m.group(1)) for name in variants if (m := re.match(r"aikd-bf16-b(\d+)$", name))})

    def rate(name: str) -> str:
        return number(variants.get(name, {}).get("img_s"))

    values = {"model_batch": number(main_batch), "model_paper": rate("paper-fp32-b32")}
    if main_batch is not None:
        batch, small, large = main_batch, sizes[0] if sizes else None, sizes[-1] if sizes else None
        values.update(model_fp32=rate(f"aikd-fp32-b{batch}"), model_bf16=rate(f"aikd-bf16-b{batch}"),
                      model_fp16=rate(f"aikd-fp16-b{batch}"), model_fp32_tf32=rate(f"aikd-fp32-tf32-b{batch}"),
                      model_bf16_nchw=rate(f"aikd-bf16-b{batch}-nchw"),
                      model_bf16_graph=rate(f"aikd-bf16-b{batch}-graph"),
                      model_bf16_b32=rate(f"aikd-bf16-b{small}"), model_fp16_b32=rate(f"aikd-fp16-b{small}"),
                      model_bf16_b512=rate(f"aikd-bf16-b{large}"),
                      model_bf16_b32_graph=rate(f"aikd-bf16-b{small}-graph"),
                      model_roundtrip=rate(f"aikd-bf16-b{batch}-roundtrip"))
    found = [v for name, v in {**variants, **compiled.get("variants", {})}.items() if name.endswith("-compiled")]
    if found and "img_s" in found[-1]:
        values.update(model_compiled=number(found[-1]["img_s"]), compile_s=number(found[-1].get("first_call_s")))
    return values


def train_values(train: dict[str, Any]) -> dict[str, str]:
    peaks = train.get("peak_gpu_mb", {})
    values = {"train_paper": number(train.get("paper_pairs_per_s")), "train_paper_mb": number(peaks.get("paper"))}
    for kind in ("first_epoch", "cached", "first_epoch_trunk", "cached_trunk"):
        short = kind.replace("first_epoch", "first")
        values[f"train_{short}"] = number(train.get(f"{kind}_pairs_per_s"))
        values[f"train_{short}_ratio"] = ratio(train.get(f"{kind}_ratio"))
        values[f"train_{short}_mb"] = number(peaks.get(kind))
    return values


def outcome(tests: dict[str, Any], pattern: str) -> str:
    """``passed (n)``, ``FAILED: ...`` or ``skipped: reason`` of the test cases whose name matches ``pattern``."""
    cases = [c for c in tests.get("cases", []) if re.search(pattern, c["name"])]
    if not cases:
        return MISSING
    failed = [c for c in cases if c["outcome"] == "failed"]
    if failed:
        return "FAILED: " + "; ".join(f"{c['name'].split('::')[-1]} ({c['message'][:160]})" for c in failed)
    if all(c["outcome"] == "skipped" for c in cases):
        return "skipped: " + cases[0]["message"][:200]
    return f"passed ({sum(c['outcome'] == 'passed' for c in cases)} of {len(cases)})"


def test_values(tests: dict[str, Any], figures: dict[str, dict[str, Any]]) -> dict[str, str]:
    fp32, dlib = figures.get("fp32_vs_cpu_r50", {}), figures.get("precisions_dlib_r29", {})
    return {"fp32_rel_quality": number(fp32.get("quality")), "fp32_rel_embedding": number(fp32.get("embedding")),
            "tf32_rel_quality": number(fp32.get("tf32_quality")),
            "tf32_rel_embedding": number(fp32.get("tf32_embedding")),
            "dlib_faces": number(dlib.get("faces")), "dlib_bf16_spearman": spearman_text(dlib.get("bf16_spearman")),
            "dlib_fp16_spearman": spearman_text(dlib.get("fp16_spearman")),
            "train_ok": outcome(tests, r"test_(tiny_trains|r50_config)"), "resume_ok": outcome(tests, r"resume"),
            "onnx_cuda": outcome(tests, r"onnx_on_the_cuda_provider"),
            **{f"tests_{k}": number(tests.get(k)) for k in ("passed", "failed", "skipped")}}


def evaluate_values(evaluation: dict[str, Any]) -> dict[str, str]:
    comparisons = evaluation.get("comparisons")
    return {"eval_comparisons": f"{comparisons:.2e}" if comparisons else MISSING,
            "eval_cpu_s": number(evaluation.get("cpu_seconds")),
            "eval_cpu_mb": number(evaluation.get("cpu_peak_rss_mb")),
            "eval_gpu_s": number(evaluation.get("gpu_similarity_seconds"))}


def goals(score: dict[str, Any], train: dict[str, Any]) -> list[str]:
    """Issue 25's goals, each with its figure and met / not met. Scoring is judged once started (the throughput;
    start-up is its own figure), with the whole-process ratio beside it."""
    lines = []
    good = {name: f for name, f in score.get("paths", {}).items()
            if name != "paper" and f.get("net_ratio_vs_paper") and (f.get("spearman_vs_paper") or 0) >= SPEARMAN_BAR}
    if good:
        name, best = max(good.items(), key=lambda item: item[1]["net_ratio_vs_paper"])
        verdict = "met" if best["net_ratio_vs_paper"] >= SCORING_GOAL else "NOT met"
        lines.append(f"scoring >= {SCORING_GOAL:g}x the paper's path at Spearman >= {SPEARMAN_BAR}: {verdict} "
                     f"({name}: {best['net_ratio_vs_paper']}x once started, {best.get('ratio_vs_paper')}x for the "
                     f"whole process on {score.get('images')} images, Spearman {best['spearman_vs_paper']})")
    else:
        lines.append("scoring goal: no aikd path measured with Spearman >= the bar")
    ratio = train.get("first_epoch_ratio")
    if ratio is not None:
        best_ratio = max(ratio, train.get("first_epoch_trunk_ratio") or 0)
        lines.append(f"training first epoch >= {TRAINING_GOAL:g}x the paper-shaped step: "
                     f"{'met' if best_ratio >= TRAINING_GOAL else 'NOT met'} (default regions {ratio}x, trunk "
                     f"{train.get('first_epoch_trunk_ratio')}x; cached {train.get('cached_ratio')}x)")
    return lines


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="the check's work folder")
    parser.add_argument("--out", type=Path, required=True, help="where gpu.json and gpu_table.md go")
    parser.add_argument("--template", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "gpu.md")
    args = parser.parse_args(argv)
    work = args.work
    raw = {"env": last_json(work / "env.out"), "score": read_json(work / "score.json"),
           "models": last_json(work / "models.out"), "train": last_json(work / "train.out"),
           "evaluate": last_json(work / "evaluate.out"), "compile": last_json(work / "compile.out"),
           "tests": read_tests(work / "junit.xml", work / "tests.out"), "figures": read_figures(work / "figures.jsonl")}
    steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()] \
        if (work / "steps.tsv").is_file() else []
    samples = read_utilisation(work / "util.csv")
    values = {**env_values(raw["env"]), **score_values(raw["score"], samples),
              **model_values(raw["models"], raw["compile"]), **train_values(raw["train"]),
              **test_values(raw["tests"], raw["figures"]), **evaluate_values(raw["evaluate"])}
    achieved = goals(raw["score"], raw["train"])
    table = string.Formatter().vformat(table_template(args.template), (), Filled(values))
    status = "\n".join(f"- {s[0]}: exit {s[1]} in {s[2]} s (limit {s[3]} s)" if len(s) == 4 else f"- {s}"
                       for s in steps)
    failed = [c for c in raw["tests"].get("cases", []) if c["outcome"] == "failed"]
    report = (table + "\n**Goals (issue 25)**\n\n" + "\n".join(f"- {line}" for line in achieved) +
              "\n\n**Steps**\n\n" + status + "\n" +
              ("\n**Failed tests**\n\n" + "\n".join(f"- {c['name']}: {c['message']}" for c in failed) + "\n"
               if failed else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_table.md").write_text(report, encoding="utf-8")
    (args.out / "gpu.json").write_text(json.dumps({"values": values, "goals": achieved, "steps": steps,
                                                   "utilisation_samples": len(samples), **raw}, indent=1,
                                                  default=str), encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
