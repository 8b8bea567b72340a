"""aikd export: named inputs/outputs, dynamic batch, ONNX checker, parity with torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aikd.cli import main
from aikd.inference.export import check_onnx, export_onnx, relative_difference

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("fold", [True, False])
def test_export_command_writes_a_checked_graph(tmp_path, tiny_checkpoint, tiny_model, fold, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "-o", str(out), *([] if fold else ["--no-fold"])]) == 0
    assert "max |quality diff|" in capsys.readouterr().err
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == ["embedding", "quality"]
    has_norm = any(node.op_type == "BatchNormalization" for node in graph.graph.node)
    assert has_norm != fold
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # dynamic batch axis
        faces = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        embedding, quality = session.run(None, {"image": faces.numpy()})
        with torch.no_grad():
            want_embedding, want_quality = tiny_model(faces)
        assert embedding.shape == (batch, 512) and quality.shape == (batch,)
        assert np.abs(quality - want_quality.numpy()).max() < 1e-4
        np.testing.assert_allclose(embedding, want_embedding.numpy(), atol=1e-4)


def test_check_onnx_reports_differences(tiny_model, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(tiny_model, path)
    worst = check_onnx(tiny_model, path)
    assert set(worst) == {"embedding", "quality", "embedding_scale", "quality_scale"} and worst["quality"] < 1e-4
    with torch.no_grad():
        tiny_model.quality_head.l2.bias += 0.5  # the graph no longer matches the model
    assert check_onnx(tiny_model, path)["quality"] == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError, match="ONNX checker"):
        check_onnx(tiny_model, b"not a graph" * 10)


def test_parity_failure_exits_1_without_writing(tmp_path, tiny_checkpoint, monkeypatch):
    import aikd.commands.export

    monkeypatch.setattr(aikd.commands.export, "check_onnx", lambda model, data: {
        "quality": 0.3, "embedding": 0.1, "quality_scale": 0.9, "embedding_scale": 3.0})
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "-o", str(out)]) == 1
    assert not out.exists()


def test_parity_is_judged_relative_to_the_scale_of_the_qualities(tmp_path, tiny_model):
    """Qualities around 1e5-1e6 (a random, uncalibrated model) differ by ~0.1 in float32: not a parity failure."""
    from aikd.models import save_checkpoint

    with torch.no_grad():
        tiny_model.quality_head.l2.weight *= 1e6
        tiny_model.quality_head.l2.bias += 5e5
    checkpoint = save_checkpoint(tmp_path / "large.pt", tiny_model, "tiny")
    out = tmp_path / "large.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out)]) == 0 and out.exists()
    worst = check_onnx(tiny_model, out)
    assert worst["quality_scale"] > 1e5 and relative_difference(worst, "quality") < 1e-4
    # the same absolute difference on qualities in [0, 1] is a failure
    assert relative_difference({"quality": worst["quality"] + 0.01, "quality_scale": 0.8}, "quality") > 1e-4


def test_export_usage_errors(tmp_path):
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")]) == 2


def test_scoring_a_graph_that_is_not_an_aikd_export_names_the_file(tmp_path, tiny_model, face_folder, capsys):
    """onnxruntime reads the file itself (one copy of the weights); what it cannot use is still named."""
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a graph")
    plain = tmp_path / "plain.onnx"  # a valid graph without aikd's metadata
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(plain), dynamo=False)
    for graph, said in ((garbage, "not an ONNX model"), (plain, "has no aikd metadata"),
                        (tmp_path / "missing.onnx", "no such file")):
        code = main(["score", str(face_folder[0]), "--checkpoint", str(graph), "-o", str(tmp_path / "s.csv")])
        assert code == 2 and f"{graph}: {said}" in capsys.readouterr().err
