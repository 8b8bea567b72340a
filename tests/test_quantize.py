"""aikd export --int8 (aikd.inference.quantize): the quantised graph runs where an fp32 export runs, keeps its metadata,
agrees with fp32 on a real model (dlib-r29 with a trained quality head; skipped where dlib's weights package is
absent), warns when it does not, and refuses bad calibration input with the file named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aikd.cli import main

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")


def _smooth_faces(folder, count: int, size: int = 112, seed: int = 0) -> None:
    """``count`` seeded smooth random RGB PNGs (upsampled noise: structure for the tiny model to see)."""
    import cv2

    from aikd.demo.showcase import write_png

    rng = np.random.default_rng(seed)
    for index in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        write_png(folder / f"{index:03d}.png", cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC))


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    """(folder, tiny checkpoint, fp32 export, int8 export made with --min-spearman 1, its stderr)."""
    from aikd.models import build_model, calibrate_batchnorm, save_checkpoint

    root = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model("tiny"), batches=2, batch_size=8, seed=0).eval()
    checkpoint = save_checkpoint(root / "tiny.pt", model, "tiny")
    faces = root / "faces"
    _smooth_faces(faces, 48)
    fp32, int8 = root / "m.onnx", root / "m.int8.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(fp32)]) == 0
    return faces, checkpoint, fp32, int8


def _export_int8(source, faces, output, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(source), "--int8", "--calibration-images", str(faces),
                 "-o", str(output), *extra]) == 0
    return capsys.readouterr().err


def test_int8_graph_keeps_the_metadata_and_records_calibration(tiny_int8, capsys):
    from aikd.inference.onnx_format import read_metadata

    faces, checkpoint, fp32, int8 = tiny_int8
    err = _export_int8(checkpoint, faces, int8, capsys)
    assert "int8 vs fp32: Spearman" in err and "int8," in err
    before, after = read_metadata(fp32), read_metadata(int8)
    for key in ("preprocessing", "alignment", "arch", "outputs", "version"):
        assert after[key] == before[key], key
    assert before["precision"] == "fp32" and before["int8"] is None and after["precision"] == "int8"
    record = after["int8"]
    assert record["calibration_faces"] == 36 and record["agreement"]["faces"] == 12  # 48 faces, a quarter held out
    assert record["settings"]["reduce_range"] and record["settings"]["min_spearman"] == 0.995
    graph = onnx.load(str(int8))
    kinds = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    fp32_weights = {tensor.name for tensor in graph.graph.initializer if tensor.data_type == onnx.TensorProto.FLOAT}
    layers = {node.name: node for node in graph.graph.node if node.op_type in ("Gemm", "MatMul", "Conv")}
    assert {"/quality_head/l1/Gemm", "/quality_head/l2/Gemm"} <= set(layers)
    for name, node in layers.items():  # the head's weights stay fp32, every other layer's are int8
        assert (node.input[1] in fp32_weights) == name.startswith("/quality_head/"), name
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size


def test_int8_graph_runs_through_the_engine_and_aikd_score(tiny_int8, tmp_path, capsys):
    from aikd.inference.engine import OnnxEngine
    from aikd.io import read_labels

    faces, checkpoint, _, int8 = tiny_int8
    if not int8.exists():
        _export_int8(checkpoint, faces, int8, capsys)
    engine = OnnxEngine(int8, "cpu")
    assert engine.precision == "int8" and engine.record()["precision"] == "int8"
    batch = np.stack([engine.prepare(np.full((112, 112, 3), v, np.uint8)) for v in (40, 120, 200)])
    embeddings, qualities = engine(batch)
    assert embeddings.shape == (3, 512) and qualities.shape == (3,) and np.isfinite(qualities).all()
    scores = tmp_path / "scores.csv"
    assert main(["score", str(faces), "--checkpoint", str(int8), "--aligned", "-o", str(scores)]) == 0
    assert len(read_labels(scores)) == 48
    assert json.loads((tmp_path / "scores.run.json").read_text())["precision"] == "int8"
    assert main(["score", str(faces), "--checkpoint", str(int8), "--precision", "bf16", "-o",
                 str(tmp_path / "x.csv")]) == 2


def test_low_agreement_warns_at_export_and_at_every_use(tiny_int8, tmp_path, capsys):
    from aikd.inference.onnx_format import read_metadata

    faces, _, fp32, _ = tiny_int8
    int8 = tmp_path / "strict.int8.onnx"
    err = _export_int8(fp32, faces, int8, capsys, "--min-spearman", "1")  # from the fp32 ONNX file
    figure = read_metadata(int8)["int8"]["agreement"]["spearman"]
    assert figure < 1  # a random tiny model's int8 qualities do not keep every rank
    assert f"warning: {int8}: int8 qualities rank faces with Spearman {figure:.4f}" in err
    assert main(["score", str(faces), "--checkpoint", str(int8), "--aligned", "-o", str(tmp_path / "s.csv")]) == 0
    assert f"Spearman {figure:.4f} against fp32" in capsys.readouterr().err
    lenient = tmp_path / "lenient.int8.onnx"
    assert "warning" not in _export_int8(fp32, faces, lenient, capsys, "--min-spearman", "-1")
    assert main(["score", str(faces), "--checkpoint", str(lenient), "--aligned", "-o", str(tmp_path / "t.csv")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_stem_can_stay_fp32(tiny_int8):
    """``fp32_input_conv``: the convolution that reads the pixels keeps fp32 weights and reads the image itself."""
    from aikd.inference.quantize import QuantizeOptions, load_faces, quantize_graph
    from aikd.models import Preprocessing

    faces, _, fp32, _ = tiny_int8
    _, pixels = load_faces(faces, Preprocessing())
    graph = onnx.load_model_from_string(quantize_graph(fp32.read_bytes(), pixels[:8],
                                                       QuantizeOptions(fp32_input_conv=True)))
    fp32_weights = {tensor.name for tensor in graph.graph.initializer if tensor.data_type == onnx.TensorProto.FLOAT}
    convolutions = [node for node in graph.graph.node if node.op_type == "Conv"]
    stem = [node for node in convolutions if "image" in node.input]
    assert [node.name for node in stem] == ["/feature_extractor/conv1/Conv"]
    assert stem[0].input[1] in fp32_weights
    assert all(node.input[1] not in fp32_weights for node in convolutions if node is not stem[0])


def test_bad_calibration_input_is_refused_naming_the_file(tiny_int8, tmp_path, capsys):
    faces, checkpoint, fp32, int8 = tiny_int8
    out = str(tmp_path / "x.onnx")

    def refused(*argv: str) -> str:
        capsys.readouterr()
        assert main(["export", *argv, "-o", out]) == 2
        return capsys.readouterr().err

    empty, few, broken = tmp_path / "empty", tmp_path / "few", tmp_path / "broken"
    empty.mkdir()
    _smooth_faces(few, 5)
    _smooth_faces(broken, 45)
    (broken / "044.png").write_bytes(b"not a png")
    assert f"{empty}: 0 image(s)" in refused("--checkpoint", str(fp32), "--int8", "--calibration-images", str(empty))
    assert f"{few}: 5 image(s)" in refused("--checkpoint", str(fp32), "--int8", "--calibration-images", str(few))
    assert "044.png" in refused("--checkpoint", str(fp32), "--int8", "--calibration-images", str(broken))
    assert "not a folder" in refused("--checkpoint", str(fp32), "--int8", "--calibration-images",
                                     str(tmp_path / "missing"))
    assert "--calibration-images" in refused("--checkpoint", str(checkpoint), "--int8")
    assert "--int8" in refused("--checkpoint", str(checkpoint), "--calibration-images", str(faces))
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString())
    assert f"{foreign}: has no aikd metadata" in refused("--checkpoint", str(foreign), "--int8",
                                                         "--calibration-images", str(faces))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00junk")
    assert f"{junk}" in refused("--checkpoint", str(junk), "--int8", "--calibration-images", str(faces))
    if not int8.exists():
        _export_int8(checkpoint, faces, int8, capsys)
    assert "already quantised" in refused("--checkpoint", str(int8), "--int8", "--calibration-images", str(faces))


# ------------------------------------------------------------------------------------------------ real model
@pytest.fixture(scope="module")
def dlib_student(tmp_path_factory):
    """dlib-r29 (dlib's real weights) with a quality head trained on CR-FIQA certainty labels of real faces, and
    aligned face sets of disjoint identities: (checkpoint, calibration folder, evaluation folder)."""
    from aikd.models import load_fr_model, save_checkpoint

    try:
        teacher = load_fr_model("dlib")
    except ValueError:
        pytest.skip("face-recognition-models (dlib's weights) is not installed")
    pytest.importorskip("retinaface")
    from aikd.demo.samples import lfw_subset_faces, sample_photos
    from aikd.demo.showcase import write_aligned_face_set
    from aikd.detectors import get_detector

    root = tmp_path_factory.mktemp("dlib")
    photos = {**sample_photos(), **lfw_subset_faces(12)}
    detector = get_detector("retinaface")
    landmarks = {name: faces[0].landmarks for name, photo in photos.items() if (faces := detector.detect(photo))}
    names = sorted(landmarks)
    splits = {"calibration": names[::2], "evaluation": names[1::2]}
    write_aligned_face_set(photos, landmarks, splits, root, teacher.preprocessing)
    model = _trained_student(teacher, root / "calibration")
    return save_checkpoint(root / "student.pt", model, "dlib-r29"), root / "calibration", root / "evaluation"


def _trained_student(teacher, folder):
    """dlib-r29 + a quality head fitted (full batch, Adam) to the certainty ratio of ``folder``'s faces."""
    from aikd.inference.quantize import load_faces
    from aikd.labelers.certainty import certainty_ratio
    from aikd.models import QualityHead, QualityModel

    keys, faces = load_faces(folder, teacher.preprocessing)
    with torch.no_grad():
        embeddings = torch.cat([teacher.backbone(torch.from_numpy(faces[i:i + 32])) for i in range(0, len(faces), 32)])
    ratio = certainty_ratio(embeddings.numpy(), [key.split("/")[0] for key in keys]).ratio
    target = torch.from_numpy(np.argsort(np.argsort(np.nan_to_num(ratio))) / (len(ratio) - 1)).float()
    torch.manual_seed(0)
    head = QualityHead(128, 1024)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.smooth_l1_loss(head(embeddings).squeeze(-1), target, beta=0.5)
        loss.backward()
        optimiser.step()
    return QualityModel(teacher.backbone, head.eval(), "dlib-r29", teacher.preprocessing).eval()


def test_int8_agrees_with_fp32_on_dlibs_real_model(dlib_student, tmp_path, capsys):
    from aikd.inference.onnx_format import read_metadata
    from aikd.inference.quantize import load_faces, measure_agreement

    checkpoint, calibration, evaluation = dlib_student
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(fp32)]) == 0
    _export_int8(fp32, calibration, int8, capsys)
    # The command's own figure comes from the quarter of 154 faces it holds out (38): a rough one, 0.993 here.
    assert read_metadata(int8)["int8"]["agreement"]["spearman"] >= 0.98
    _, faces = load_faces(evaluation, read_metadata(fp32)["preprocessing"])
    agreement = measure_agreement(fp32.read_bytes(), int8.read_bytes(), faces)  # identities never calibrated on
    print(f"dlib-r29 int8 on {len(faces)} evaluation faces: {agreement.summary()}")
    # 0.9958 on this test's small model and face set (AVX2, no VNNI); bench/int8.py reports the figure on the
    # demo student (0.998). The bar here leaves room for other CPUs' integer kernels and catches real breakage
    # (full-range weights on a CPU without VNNI measured 0.90).
    assert agreement.spearman >= 0.99 and agreement.min_embedding_cosine > 0.98
