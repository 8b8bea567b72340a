"""Tests of aikd.models: insightface-compatible iResNet layout, quality model, registry, checkpoints."""

from __future__ import annotations

import json
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aikd.models import (
    IResNet,
    Preprocessing,
    build_backbone,
    build_model,
    calibrate_batchnorm,
    get_spec,
    infer_arch,
    iresnet18,
    iresnet_tiny,
    list_models,
    load_backbone,
    load_quality_model,
    read_checkpoint,
    save_checkpoint,
)

# Block counts of insightface arcface_torch (backbones/iresnet.py), written independently of the model code.
ARCFACE_BLOCKS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def _bn(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,)),
            (f"{prefix}.running_mean", (channels,)), (f"{prefix}.running_var", (channels,)),
            (f"{prefix}.num_batches_tracked", ())]


def arcface_layout(blocks: tuple[int, ...], width: int = 64) -> list[tuple[str, tuple[int, ...]]]:
    """Key -> shape list of an arcface_torch iResNet state dict, in its order, from the layout description.

    Stem: conv1 3x3 3->64, bn1, prelu(64). Stage s (planes 64, 128, 256, 512) has ``blocks[s]`` blocks of
    bn1(in) conv1 3x3 in->planes, bn2, prelu(planes), conv2 3x3 planes->planes, bn3; block 0 adds
    downsample = (1x1 conv in->planes, bn). Then bn2(512), fc 512*7*7 -> 512, features BatchNorm1d(512).
    """
    keys = [("conv1.weight", (width, 3, 3, 3)), *_bn("bn1", width), ("prelu.weight", (width,))]
    inplanes = width
    for stage, (count, multiplier) in enumerate(zip(blocks, (1, 2, 4, 8), strict=True), start=1):
        planes = width * multiplier
        for index in range(count):
            prefix = f"layer{stage}.{index}"
            cin = inplanes if index == 0 else planes
            keys += _bn(f"{prefix}.bn1", cin)
            keys.append((f"{prefix}.conv1.weight", (planes, cin, 3, 3)))
            keys += _bn(f"{prefix}.bn2", planes)
            keys.append((f"{prefix}.prelu.weight", (planes,)))
            keys.append((f"{prefix}.conv2.weight", (planes, planes, 3, 3)))
            keys += _bn(f"{prefix}.bn3", planes)
            if index == 0:
                keys.append((f"{prefix}.downsample.0.weight", (planes, cin, 1, 1)))
                keys += _bn(f"{prefix}.downsample.1", planes)
        inplanes = planes
    keys += _bn("bn2", width * 8)
    keys += [("fc.weight", (512, width * 8 * 49)), ("fc.bias", (512,))]
    keys += _bn("features", 512)
    return keys


def random_state(layout: list[tuple[str, tuple[int, ...]]], seed: int = 0, device: str = "cpu") -> dict:
    """Tensors of the layout's shapes: realistic BN statistics, small conv weights (meta: shapes only)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout:
        if device == "meta":
            dtype = torch.int64 if shape == () else torch.float32
            state[key] = torch.empty(shape, device="meta", dtype=dtype)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith(("running_mean", "bias")) or "prelu" in key:
            state[key] = torch.randn(shape, generator=generator) * 0.1
        elif len(shape) == 1:  # BN weight
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:  # conv / linear weight, scaled by fan-in so activations stay O(1)
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


def head_layout(in_features: int = 512, hidden: int = 1024) -> list[tuple[str, tuple[int, ...]]]:
    return [("l1.weight", (hidden, in_features)), ("l1.bias", (hidden,)),
            ("l2.weight", (1, hidden)), ("l2.bias", (1,))]


# ------------------------------------------------------------------------------------------ layout and keys
@pytest.mark.parametrize("arch", ["r18", "r50", "r100"])
def test_arcface_state_dict_loads_strictly(arch):
    layout = arcface_layout(ARCFACE_BLOCKS[arch])
    device = "cpu" if arch == "r18" else "meta"  # strict loading checks keys and shapes; meta keeps it cheap
    with torch.device(device):
        model = build_backbone(arch)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == layout
    state = random_state(layout, device=device)
    model.load_state_dict(state, strict=True, assign=device == "meta")
    if device == "cpu":
        assert torch.equal(model.state_dict()["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])


def test_insightface_module_details():
    model = iresnet18()
    assert model.features.weight.requires_grad is False
    assert torch.all(model.features.weight == 1)
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.inplace and model.dropout.p == 0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 1e-5 and torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert abs(float(model.layer2[0].conv1.weight.detach().std()) - 0.1) < 0.005  # N(0, 0.1) init
    assert model.layer1[0].conv2.stride == (2, 2) and model.layer1[0].conv1.stride == (1, 1)
    assert model.layer1[1].downsample is None


def test_paper_checkpoint_keys_load(tmp_path):
    """The AI-KD release: feature_extractor.* (iResNet-100) + quality_head.l1/l2.*, loaded unchanged."""
    with torch.device("meta"):
        model = build_model("r100")
    expected = [("feature_extractor." + k, s) for k, s in arcface_layout(ARCFACE_BLOCKS["r100"])]
    expected += [("quality_head." + k, s) for k, s in head_layout()]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    head_names = [k for k, _ in model.quality_head.named_parameters()]
    assert head_names == ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]
    head = {"quality_head." + k: v for k, v in random_state(head_layout()).items()}
    backbone = {"feature_extractor." + k: v for k, v in random_state(arcface_layout((1, 1, 1, 1), 8)).items()}
    path = tmp_path / "aikd-best.pth"
    torch.save({"state_dict": {**backbone, **head}}, path)  # a wrapped raw state dict, as some trainers write
    loaded = load_quality_model(path)
    assert loaded.arch == "tiny" and not loaded.training
    assert torch.equal(loaded.quality_head.l1.weight, head["quality_head.l1.weight"])


# ------------------------------------------------------------------------------------------------- forward
# Architectures that repeat a cheaper registered one's modules at greater depth or width or with other constants
# only, and SwinFace (many small window operations), take 5-12 s each here and run with -m slow; test_zoo.py
# checks every family's forward at reduced size on every run.
SLOW_FORWARD = {"r200", "elasticface-r100", "magface-r50", "magface-r100", "adaface-ir50", "adaface-ir101",
                "curricularface-ir101", "swinface", "vit-s", "vit-b", "vit-l", "transface-s", "transface-b",
                "transface-l"}


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_FORWARD else a for a in list_models()]
)
def test_every_model_forward(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    calibrate_batchnorm(model, batches=1, batch_size=2)
    preprocessing = get_spec(arch).preprocessing
    with torch.no_grad():
        embedding, quality = model.eval()(torch.rand(1, 3, *preprocessing.input_size) * 2 - 1)
    assert embedding.shape == (1, preprocessing.embedding_size) and quality.shape == (1,)
    assert quality.dtype == torch.float32
    assert torch.isfinite(embedding).all() and torch.isfinite(quality).all()
    assert embedding.abs().max() < 1e4  # calibrated: nothing like the 1e10 of uncalibrated eval mode


def reference_forward(state: dict, x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """The iResNet embedding written with torch.nn.functional straight from a state dict (eval mode)."""

    def bn(t, p):
        return F.batch_norm(t, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], training=False, eps=1e-5)

    x = F.prelu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"), state["prelu.weight"])
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            p = f"layer{stage}.{index}"
            stride = 2 if index == 0 else 1
            out = F.conv2d(bn(x, f"{p}.bn1"), state[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(out, f"{p}.bn2"), state[f"{p}.prelu.weight"])
            out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn3")
            if index == 0:
                x = bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=2), f"{p}.downsample.1")
            x = out + x
    x = bn(x, "bn2").flatten(1)
    return bn(F.linear(x, state["fc.weight"], state["fc.bias"]), "features")


@pytest.mark.parametrize(
    "arch, blocks, width", [("tiny", (1, 1, 1, 1), 8), ("r18", ARCFACE_BLOCKS["r18"], 64)]
)
def test_functional_reference_parity(arch, blocks, width, faces_batch):
    state = random_state(arcface_layout(blocks, width), seed=3)
    model = build_backbone(arch)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours = model.eval()(faces_batch)
        reference = reference_forward(state, faces_batch, blocks)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_trunk_split_matches_forward_and_keeps_trunk(faces_batch):
    torch.manual_seed(0)
    model = calibrate_batchnorm(iresnet_tiny(dropout=0.5)).eval()
    with torch.no_grad():
        full = model(faces_batch)
        trunk = model.forward_trunk(faces_batch)
        torch.testing.assert_close(model.forward_embedding_from_trunk(trunk), full)
        model.dropout.train()  # SER-FIQ: stochastic head over one trunk pass
        kept = trunk.clone()
        first, second = (model.forward_embedding_from_trunk(trunk) for _ in range(2))
    assert torch.equal(trunk, kept)
    assert not torch.allclose(first, second)
    assert trunk.shape == (4, 64 * 49)


def test_fp16_flag_runs_trunk_in_half(faces_batch):
    torch.manual_seed(0)
    fp32 = calibrate_batchnorm(iresnet_tiny()).eval()
    fp16 = iresnet_tiny(fp16=True).eval()
    fp16.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        assert fp16.forward_trunk(faces_batch).dtype == torch.float16
        out16, out32 = fp16(faces_batch), fp32(faces_batch)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.05)


def test_eval_output_independent_of_batch_composition(tiny_model, faces_batch):
    with torch.no_grad():
        embedding, quality = tiny_model(faces_batch)
        singles = [tiny_model(faces_batch[i : i + 1]) for i in range(4)]
        reordered = tiny_model(faces_batch.flip(0))[1].flip(0)
    torch.testing.assert_close(torch.cat([e for e, _ in singles]), embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([q for _, q in singles]), quality, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reordered, quality, rtol=1e-5, atol=1e-5)


def test_calibrate_batchnorm_is_seeded_and_restores_state():
    model = build_model("tiny")
    model.train()
    model.feature_extractor.bn1.momentum = 0.3
    calibrate_batchnorm(model, batches=2, batch_size=4, seed=5)
    assert model.training and model.feature_extractor.layer1[0].bn2.training
    assert model.feature_extractor.bn1.momentum == 0.3 and model.feature_extractor.bn2.momentum == 0.1
    first = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert int(model.feature_extractor.bn1.num_batches_tracked) == 2
    calibrate_batchnorm(model.eval(), batches=2, batch_size=4, seed=5)
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in first.items())
    assert not torch.equal(first["feature_extractor.bn2.running_var"], torch.ones(64))
    with pytest.raises(ValueError, match="batch_size"):
        calibrate_batchnorm(model, batch_size=1)


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_roundtrip(tmp_path, tiny_model, faces_batch, suffix):
    preprocessing = Preprocessing(channel_order="BGR")
    path = save_checkpoint(tmp_path / f"model{suffix}", tiny_model, "tiny", preprocessing, extra={"step": 7})
    state, meta = read_checkpoint(path)
    assert meta["format"] == "aikd" and meta["arch"] == "tiny" and meta["extra"] == {"step": 7}
    assert state.keys() == tiny_model.state_dict().keys()
    loaded = load_quality_model(path)
    assert loaded.arch == "tiny" and loaded.preprocessing == preprocessing
    with torch.no_grad():
        for ours, theirs in zip(loaded(faces_batch), tiny_model(faces_batch), strict=True):
            assert torch.equal(ours, theirs)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic write left no temporary file


def test_backbone_from_ddp_prefixed_file_and_from_quality_checkpoint(tmp_path, tiny_model, faces_batch):
    backbone = tiny_model.feature_extractor
    torch.save({"module." + k: v for k, v in backbone.state_dict().items()}, tmp_path / "backbone.pth")
    save_checkpoint(tmp_path / "quality.pt", tiny_model, "tiny")
    with torch.no_grad():
        expected = backbone(faces_batch)
        for name in ("backbone.pth", "quality.pt"):
            loaded = load_backbone(tmp_path / name)
            assert isinstance(loaded, IResNet)
            torch.testing.assert_close(loaded(faces_batch), expected, rtol=0, atol=0)
    ddp_quality = {"module." + k: v for k, v in tiny_model.state_dict().items()}
    assert load_quality_model(ddp_quality).arch == "tiny"
    tiny_model.preprocessing = Preprocessing(channel_order="BGR")
    wrapped = save_checkpoint(tmp_path / "wrapped.pt", torch.nn.DataParallel(tiny_model), "tiny")
    state, meta = read_checkpoint(wrapped)
    assert state.keys() == tiny_model.state_dict().keys() and meta["preprocessing"]["channel_order"] == "BGR"


def test_a_file_is_loaded_without_a_second_copy_and_a_callers_state_dict_is_copied(tmp_path, tiny_model,
                                                                                  faces_batch):
    """Files load onto the meta device and take the file's tensors (no random init, half the peak memory);
    they still give float32 weights with the model's frozen tensors frozen, and a caller's dict is not shared."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_model.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")
    for loaded in (load_quality_model(tmp_path / "half.pth", arch="tiny"),
                   load_backbone(tmp_path / "half.pth", arch="tiny")):
        tensors = [*loaded.parameters(), *loaded.buffers()]
        assert not any(t.is_meta for t in tensors)
        assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}
        backbone = getattr(loaded, "feature_extractor", loaded)
        assert not backbone.features.weight.requires_grad and backbone.conv1.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(load_quality_model(tmp_path / "half.pth", arch="tiny")(faces_batch)[1],
                                   tiny_model.half().float()(faces_batch)[1], rtol=0, atol=0)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    from_dict = load_quality_model(state, arch="tiny")
    with torch.no_grad():
        from_dict.feature_extractor.conv1.weight.add_(1.0)
    key = "feature_extractor.conv1.weight"
    assert torch.equal(state[key], tiny_model.state_dict()[key])


def test_infer_arch():
    for arch, blocks in ARCFACE_BLOCKS.items():
        state = random_state(arcface_layout(blocks), device="meta")
        assert infer_arch(state) == arch
        assert infer_arch({"feature_extractor." + k: v for k, v in state.items()}) == arch
    assert infer_arch(build_backbone("r18_w0.25").state_dict()) == "r18_w0.25"
    assert infer_arch(random_state(arcface_layout((1, 1, 1, 1), 8), device="meta")) == "tiny"
    with pytest.raises(ValueError, match=r"blocks \[2, 2, 2, 2\] and width 32 matches no registered"):
        infer_arch(random_state(arcface_layout((2, 2, 2, 2), 32), device="meta"))
    with pytest.raises(ValueError, match="not an iResNet"):
        infer_arch({"weight": torch.zeros(3)})


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps({"conv1.weight": Exploit()}, protocol=2))
    zipped = tmp_path / "model.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Exploit()}, zipped)
    for path in (legacy, zipped):
        with pytest.raises(ValueError, match="not a plain weights file.*will not") as error:
            read_checkpoint(path)
        assert str(path) in str(error.value)
        with pytest.raises(ValueError, match="not a plain weights file"):
            load_quality_model(path)
    assert not marker.exists()


def test_checkpoint_errors(tmp_path, tiny_model):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(missing)

    raw = tmp_path / "tiny_backbone.pth"
    torch.save(tiny_model.feature_extractor.state_dict(), raw)
    with pytest.raises(ValueError, match=r"tiny_backbone.pth.*missing key.*layer1\.1\..*looks like tiny"):
        load_backbone(raw, arch="r18_w0.25")
    with pytest.raises(ValueError, match=r"tiny_backbone.pth: has no quality head.*looks like tiny"):
        load_quality_model(raw)

    ours = save_checkpoint(tmp_path / "tiny.pt", tiny_model, "tiny")
    with pytest.raises(ValueError, match="saved as arch 'tiny', but arch 'r18' was requested"):
        load_quality_model(ours, arch="r18")

    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.pth: not a readable checkpoint"):
        read_checkpoint(text)

    newer = tmp_path / "newer.pt"
    torch.save({"format": "aikd", "format_version": 99, "state_dict": {"a": torch.zeros(1)}}, newer)
    with pytest.raises(ValueError, match="newer aikd"):
        read_checkpoint(newer)

    with pytest.raises(ValueError, match="look like arch tiny, but arch 'r18' was given"):
        save_checkpoint(tmp_path / "mislabelled.pt", tiny_model, "r18")
    with pytest.raises(ValueError, match="only plain data"):
        save_checkpoint(tmp_path / "bad.pt", tiny_model, "tiny", extra={"optimizer": object()})
    with pytest.raises(ValueError, match="safetensors metadata must be JSON; extra holds"):
        save_checkpoint(tmp_path / "bad.safetensors", tiny_model, "tiny", extra={"ema": torch.zeros(1)})
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad.safetensors").exists()


# ----------------------------------------------------------------------------------- registry, preprocessing
def test_registry_lookup():
    assert {"r18", "r34", "r50", "r100", "r200", "tiny"} <= set(list_models())
    assert get_spec("iresnet100").name == "r100"
    with pytest.raises(ValueError, match="unknown model architecture 'r101'; known: r18, r34"):
        get_spec("r101")
    model = build_model("tiny", dropout=0.2)
    assert model.arch == "tiny" and model.feature_extractor.dropout.p == 0.2
    assert model.preprocessing == get_spec("tiny").preprocessing


def test_preprocessing_numbers_and_channel_order():
    image = np.zeros((112, 112, 3), np.uint8)
    image[..., 0] = 255  # pure red
    image[0, 0] = (51, 102, 204)
    tensor = Preprocessing()(image)
    assert tensor.shape == (1, 3, 112, 112) and tensor.dtype == torch.float32
    assert tensor[0, :, 5, 5].tolist() == [1.0, -1.0, -1.0]
    expected = [(v / 255 - 0.5) / 0.5 for v in (51, 102, 204)]
    assert torch.allclose(tensor[0, :, 0, 0], torch.tensor(expected), atol=1e-6)
    bgr = Preprocessing(channel_order="BGR").to_tensor(image)
    assert bgr[0, :, 5, 5].tolist() == [-1.0, -1.0, 1.0]
    assert Preprocessing.from_dict(json.loads(json.dumps(Preprocessing().to_dict()))) == Preprocessing()
    with pytest.raises(ValueError, match="unknown preprocessing key"):
        Preprocessing.from_dict({"size": 112})


def test_preprocessing_resizes_and_validates():
    rng = np.random.default_rng(0)
    large = rng.integers(0, 256, (224, 200, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (56, 60, 3), dtype=np.uint8)
    batch = Preprocessing().to_tensor([large, small])
    assert batch.shape == (2, 3, 112, 112)
    cases = ((batch[0], large, cv2.INTER_AREA), (batch[1], small, cv2.INTER_LINEAR))
    for tensor, image, interpolation in cases:
        resized = cv2.resize(image, (112, 112), interpolation=interpolation).astype(np.float32)
        expected = torch.from_numpy((resized / 255 - 0.5) / 0.5).permute(2, 0, 1)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    stacked = Preprocessing().to_tensor(rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8))
    assert stacked.shape == (3, 3, 112, 112)
    with pytest.raises(ValueError, match="uint8"):
        Preprocessing().to_tensor(np.zeros((112, 112, 3), np.float32))
    with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\) RGB array"):
        Preprocessing().to_tensor([large, np.zeros((112, 112), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        Preprocessing().to_tensor([])


def test_models_command(capsys):
    from aikd.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in list_models())
    assert "(x/255-0.5)/0.5" in out
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    layout = arcface_layout(ARCFACE_BLOCKS["r100"])
    parameters = sum(int(np.prod(s)) for k, s in layout if not k.endswith(("running_mean", "running_var",
                                                                             "num_batches_tracked")))
    assert rows["r100"]["parameters"] == parameters
    assert rows["r100"]["blocks"] == [3, 13, 30, 3]
    assert 23 < rows["r100"]["gflops"] < 25.5  # NOTES.md: 24.2 GFLOP per face
