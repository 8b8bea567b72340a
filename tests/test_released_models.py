"""Released quality models (CR-FIQA, eDifFIQA, SDD-FIQA) load as their authors publish them and score as their
modules do; ``aikd score --format ofiq`` writes OFIQ's CSV layout.

For each released model: its state dict at full size (meta device) is the layout written from the authors' module
(published_layouts.py) once their keys are mapped, and a file of that layout is recognised. At reduced size (full
size for eDifFIQA(T), which is small; ``-m slow`` for the rest) random weights are written in the published layout,
loaded through the public loaders, and the qualities compared with the authors' forward pass written out here from
their modules with the published tensors (``functional``), on input prepared as each author documents.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aikd.cli import main
from aikd.io import read_labels
from aikd.models import IResNet, Preprocessing, calibrate_batchnorm
from aikd.models.head import QualityHead
from aikd.models.quality import QualityModel
from aikd.models.released import (
    QUALITY_MODELS,
    CrFiqaHead,
    SddTrunk,
    describe_quality_model,
    load_any_quality_model,
    load_released_quality_model,
    recognise,
    sdd_head,
)
from published_layouts import crfiqa, ediffiqa, iresnet, mobilefacenet, sddfiqa

FULL = {"crfiqa-l": crfiqa((3, 13, 30, 3)), "crfiqa-s": crfiqa((3, 4, 14, 3)),
        "ediffiqa-l": ediffiqa(iresnet((3, 13, 30, 3))), "ediffiqa-m": ediffiqa(iresnet((3, 4, 14, 3))),
        "ediffiqa-s": ediffiqa(iresnet((2, 2, 2, 2))), "ediffiqa-t": ediffiqa(mobilefacenet()), "sddfiqa": sddfiqa()}


# --------------------------------------------------------------------------- the authors' forward, written out
def _bn(state, prefix, x, eps=1e-5):
    return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                        state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias"), False, 0.0, eps)


def iresnet_forward(state, x, prefix=""):
    """insightface's IResNet.forward (CR-FIQA's and eDifFIQA's iresnet.py): stem, IBasicBlocks, bn2, fc, features."""
    s = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    x = F.prelu(_bn(s, "bn1", F.conv2d(x, s["conv1.weight"], padding=1)), s["prelu.weight"])
    for stage in range(1, 5):
        index = 0
        while f"layer{stage}.{index}.conv1.weight" in s:
            p = f"layer{stage}.{index}"
            out = _bn(s, f"{p}.bn2", F.conv2d(_bn(s, f"{p}.bn1", x), s[f"{p}.conv1.weight"], padding=1))
            out = F.conv2d(F.prelu(out, s[f"{p}.prelu.weight"]), s[f"{p}.conv2.weight"], stride=2 if index == 0 else 1,
                           padding=1)
            identity = x if index else _bn(s, f"{p}.downsample.1", F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=2))
            x, index = _bn(s, f"{p}.bn3", out) + identity, index + 1
    x = F.linear(torch.flatten(_bn(s, "bn2", x), 1), s["fc.weight"], s["fc.bias"])
    return _bn(s, "features", x)


def mobilefacenet_forward(state, x, prefix="base_model."):
    """eDifFIQA's MobileFaceNet.forward: Conv_block/Depth_Wise/Residual stages, linear, bn, l2_norm."""
    s = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}

    def block(p, x, stride=1, padding=0, groups=1):
        x = _bn(s, f"{p}.bn", F.conv2d(x, s[f"{p}.conv.weight"], stride=stride, padding=padding, groups=groups))
        return F.prelu(x, s[f"{p}.prelu.weight"]) if f"{p}.prelu.weight" in s else x

    def depth_wise(p, x, stride, residual=False):
        groups = s[f"{p}.conv_dw.conv.weight"].shape[0]
        out = block(f"{p}.project", block(f"{p}.conv_dw", block(f"{p}.conv", x), stride, 1, groups))
        return x + out if residual else out

    x = block("conv2_dw", block("conv1", x, 2, 1), 1, 1, 64)
    for name, count in (("conv_23", 0), ("conv_3", 4), ("conv_34", 0), ("conv_4", 6), ("conv_45", 0), ("conv_5", 2)):
        if count == 0:
            x = depth_wise(name, x, 2)
        for i in range(count):
            x = depth_wise(f"{name}.model.{i}", x, 1, residual=True)
    x = block("conv_6_dw", block("conv_6_sep", x), groups=512)
    x = _bn(s, "bn", F.linear(torch.flatten(x, 1), s["linear.weight"]))
    return x / torch.norm(x, 2, 1, True)


def mlp_forward(state, x, prefix="mlp."):
    """eDifFIQA's MLP: l1, GELU, l2."""
    x = F.gelu(F.linear(x, state[f"{prefix}l1.weight"], state[f"{prefix}l1.bias"]))
    return F.linear(x, state[f"{prefix}l2.weight"], state[f"{prefix}l2.bias"])


def sdd_forward(state, x, units):
    """TFace's R50(use_type="Qua").forward: input_layer, body (bottleneck_IR), quality (PReLU, Linear)."""
    x = F.prelu(_bn(state, "input_layer.1", F.conv2d(x, state["input_layer.0.weight"], padding=1)),
                state["input_layer.2.weight"])
    firsts = set(np.cumsum((0, *units[:-1])).tolist())
    for index in range(sum(units)):
        p, stride = f"body.{index}", 2 if index in firsts else 1
        if f"{p}.shortcut_layer.0.weight" in state:
            shortcut = _bn(state, f"{p}.shortcut_layer.1", F.conv2d(x, state[f"{p}.shortcut_layer.0.weight"],
                                                                     stride=stride))
        else:
            shortcut = F.max_pool2d(x, 1, stride)
        res = F.conv2d(_bn(state, f"{p}.res_layer.0", x), state[f"{p}.res_layer.1.weight"], padding=1)
        res = F.conv2d(F.prelu(res, state[f"{p}.res_layer.2.weight"]), state[f"{p}.res_layer.3.weight"], stride=stride,
                       padding=1)
        x = _bn(state, f"{p}.res_layer.4", res) + shortcut
    x = F.prelu(torch.flatten(x, 1), state["quality.1.weight"])
    return F.linear(x, state["quality.3.weight"], state["quality.3.bias"])


def authors_quality(name: str, state, x) -> torch.Tensor:
    """The quality ``name``'s authors' module computes (a reduced model: its family's module at that size)."""
    units = REDUCED_SDD_UNITS if name in REDUCED else (3, 4, 14, 3)
    name = REDUCED[name][2] if name in REDUCED else name
    if name.startswith("crfiqa"):
        return F.linear(iresnet_forward(state, x), state["qs.weight"], state["qs.bias"]).squeeze(1)
    if name.startswith("ediffiqa"):
        forward = mobilefacenet_forward if "base_model.conv_6_dw.conv.weight" in state else iresnet_forward
        embedding = forward(state, x) if forward is mobilefacenet_forward else forward(state, x, "base_model.")
        return mlp_forward(state, embedding).squeeze(1)
    return sdd_forward(state, x, units).squeeze(1)


# ----------------------------------------------------------------------------------------- reduced-size models
REDUCED_SDD_UNITS, REDUCED_SDD_CHANNELS = (1, 1, 1, 1), (8, 8, 16, 16)
REDUCED = {  # name -> (the family's network at reduced size, its published layout, the published name)
    "test-crfiqa": (lambda: QualityModel(IResNet((1, 2, 1, 1), width=8), CrFiqaHead()),
                    crfiqa((1, 2, 1, 1), width=8), "crfiqa-l"),
    "test-ediffiqa": (lambda: QualityModel(IResNet((1, 1, 2, 1), width=8), QualityHead(512, 1024, 1)),
                      ediffiqa(iresnet((1, 1, 2, 1), width=8)), "ediffiqa-l"),
    "test-sddfiqa": (lambda: QualityModel(SddTrunk(REDUCED_SDD_UNITS, REDUCED_SDD_CHANNELS), sdd_head(16 * 49)),
                     sddfiqa(REDUCED_SDD_UNITS, REDUCED_SDD_CHANNELS), "sddfiqa"),
}


def reduced(name: str, monkeypatch) -> str:
    """Register ``name``: the family's spec (key mapping, preprocessing) with a reduced network."""
    build, layout, family = REDUCED[name]
    keys = {key for key, _ in layout}
    spec = dataclasses.replace(QUALITY_MODELS[family], name=name, build=build, matches=lambda state: set(state) == keys)
    monkeypatch.setitem(QUALITY_MODELS, name, spec)
    return name


def published_file(name: str, tmp_path, wrap: bool = False):
    """Random calibrated weights of ``name`` written as its authors' file (``module.`` prefixes with ``wrap``)."""
    spec = QUALITY_MODELS[name]
    torch.manual_seed(0)
    model = calibrate_batchnorm(spec.build(), batches=2, batch_size=4).eval()
    ours = model.state_dict()
    inverse = {}
    published_keys = [key for key, _ in (FULL.get(name) or REDUCED[name][1])]
    for key in published_keys:  # the published key each of ours comes from
        (mapped,) = spec.convert({key: None})
        inverse[key] = ours[mapped]
    state = {("module." if wrap else "") + key: value.clone() for key, value in inverse.items()}
    path = tmp_path / spec.published
    torch.save(state, path)
    return path, {key: value.clone() for key, value in inverse.items()}


def faces(count=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)


def documented_input(images: np.ndarray) -> torch.Tensor:
    """PIL RGB, ToTensor, Normalize(0.5, 0.5) (eDifFIQA, SDD-FIQA); CR-FIQA's cv2 BGR->RGB, /255, -0.5, /0.5."""
    return torch.from_numpy(((images / 255.0 - 0.5) / 0.5).astype(np.float32)).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(QUALITY_MODELS))
def test_full_size_layout_is_the_published_one_and_is_recognised(name):
    spec = QUALITY_MODELS[name]
    with torch.device("meta"):
        model = spec.build()
    published = {key: torch.empty(shape, device="meta") for key, shape in FULL[name]}
    converted = spec.convert(dict(published))
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in converted.items()} == shapes
    assert recognise(published) is spec
    assert spec.preprocessing == Preprocessing()  # RGB, (x / 255 - 0.5) / 0.5, 112x112: every author documents it
    info = describe_quality_model(name)
    assert info["parameters"] > 1e6 and info["gflops"] > 0.1 and info["published"] == spec.published


@pytest.mark.parametrize("name", [*REDUCED, "ediffiqa-t"])
def test_published_file_loads_unchanged_and_scores_as_the_authors_module(name, tmp_path, monkeypatch):
    if name in REDUCED:
        reduced(name, monkeypatch)
    path, state = published_file(name, tmp_path, wrap=name == "test-crfiqa")
    model = load_released_quality_model(path)
    assert model.preprocessing == QUALITY_MODELS[name].preprocessing
    images = faces()
    with torch.no_grad():
        _, ours = model(model.preprocessing(images))
        theirs = authors_quality(name, state, documented_input(images))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert load_any_quality_model(path).state_dict().keys() == model.state_dict().keys()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["crfiqa-s", "ediffiqa-s", "sddfiqa"])
def test_published_file_at_full_size(name, tmp_path):
    path, state = published_file(name, tmp_path)
    model = load_any_quality_model(path)
    images = faces(2)
    with torch.no_grad():
        _, ours = model(model.preprocessing(images))
        theirs = authors_quality(name, state, documented_input(images))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_file_that_is_no_released_model_says_so(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a released quality model"):
        load_released_quality_model(path)
    with pytest.raises(ValueError, match="unknown released quality model"):
        load_released_quality_model(path, "ediffiqa-xl")
    with pytest.raises(ValueError):
        load_any_quality_model(path)


def _write_faces(folder, images):
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index}.png")


def test_score_and_label_with_a_released_file(tmp_path, monkeypatch):
    """``aikd score --checkpoint ediffiqaT.pth`` gives the authors' qualities; ``aikd label --method checkpoint`` the
    same."""
    path, state = published_file("ediffiqa-t", tmp_path)
    images = faces(4, seed=1)
    _write_faces(tmp_path / "faces", images)
    scores, labels = tmp_path / "scores.csv", tmp_path / "labels.csv"
    assert main(["score", str(tmp_path / "faces"), "--checkpoint", str(path), "--aligned", "--device", "cpu",
                 "-o", str(scores)]) == 0
    assert main(["label", str(tmp_path / "faces"), "--method", "checkpoint", "--weights", str(path), "--aligned",
                 "--device", "cpu", "-o", str(labels)]) == 0
    with torch.no_grad():
        theirs = authors_quality("ediffiqa-t", state, documented_input(images)).numpy()
    np.testing.assert_allclose(read_labels(scores).qualities, theirs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read_labels(labels).qualities, read_labels(scores).qualities, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------ OFIQ
@pytest.fixture
def calibrated(tmp_path, tiny_model):
    """A tiny quality model's checkpoint and a calibration for it (qualities -1..1 -> FNMR 0.5..0.1)."""
    from aikd.evaluation.calibration import Calibration
    from aikd.models import save_checkpoint, weights_fingerprint

    checkpoint = save_checkpoint(tmp_path / "quality.pt", tiny_model, "tiny")
    fnmr = np.array([0.5, 0.1])
    calibration = Calibration(np.array([-1.0, 1.0]), fnmr, fnmr, fnmr, 1e-3, 0.3,
                              {"fr_model": {"name": "test"},
                               "quality_model": {"fingerprint": weights_fingerprint(tiny_model)}})
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(calibration.to_dict()))
    return checkpoint, path, calibration


def test_ofiq_layout_with_the_calibrated_scalar_and_failed_images(tmp_path, calibrated):
    checkpoint, calibration_file, calibration = calibrated
    _write_faces(tmp_path / "faces", faces(3, seed=2))
    (tmp_path / "faces" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "ofiq.csv"
    args = ["score", str(tmp_path / "faces"), "--checkpoint", str(checkpoint), "--aligned", "--format", "ofiq",
            "--calibration", str(calibration_file), "-o", str(out)]
    assert main(args) == 1  # one image failed
    lines = out.read_text().splitlines()
    assert lines[0] == "Filename;AIKDQuality;AIKDQuality.scalar;"
    rows = {line.split(";")[0]: line.split(";")[1:] for line in lines[1:]}
    assert list(rows) == ["0.png", "1.png", "2.png", "broken.png"] and rows["broken.png"] == ["-1", "-1"]
    assert main([*args[:-2], "--format", "csv", "-o", str(tmp_path / "plain.csv")]) == 1
    plain = read_labels(tmp_path / "plain.csv").as_dict()
    for key in ("0.png", "1.png", "2.png"):
        raw, scalar = rows[key]
        assert float(raw) == plain[key] and scalar == str(int(calibration.quality_100(plain[key])))
        assert 0 <= int(scalar) <= 100 and "." not in scalar
    assert main([*args, "--resume"]) == 1 and out.read_text().splitlines() == lines  # failed one retried, same file
    (tmp_path / "faces" / "2.png").unlink()  # resumed without one image: its score is kept, after the inputs
    assert main([*args, "--resume"]) == 1
    assert out.read_text().splitlines() == [lines[0], lines[1], lines[2], lines[4], lines[3]]


def test_ofiq_needs_a_calibration(tmp_path, calibrated, capsys):
    checkpoint, _, _ = calibrated
    _write_faces(tmp_path / "faces", faces(1))
    assert main(["score", str(tmp_path / "faces"), "--checkpoint", str(checkpoint), "--format", "ofiq",
                 "-o", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "--format ofiq" in err and "--calibration" in err and not (tmp_path / "o.csv").exists()
