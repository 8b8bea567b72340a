"""`aikd demo`: the whole pipeline on bundled sample photos, end to end."""

from aikd.cli import main


def test_demo_runs_every_step(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    for name in ("landmarks.csv", "scores_aligned.csv", "scores_misaligned.csv", "scores_as_is.csv",
                 "model.onnx", "summary.md", "run/best.pt"):
        assert (out / name).is_file(), name
    assert len(list((out / "aligned").glob("*.png"))) == len(list((out / "photos").glob("*.png"))) >= 5
    summary = (out / "summary.md").read_text()
    assert "astronaut_original.png" in summary and "alignment sensitivity" in summary
    assert main(["demo", "--out", str(out)]) == 2  # an existing output is never silently replaced
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0


def test_demo_overwrite_refuses_foreign_folder(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--overwrite"]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"
