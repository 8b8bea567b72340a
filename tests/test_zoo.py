"""Every registered face-recognition model loads as its authors publish it, and gets the input they document.

For every registered architecture:

* at full size, on the meta device (nothing allocated): the module's state dict is, key by key and shape by
  shape in order, the layout written from the published definition (``published_layouts.py``), and the
  published file's tensors (nesting and prefixes included) fit it and are recognised as it;
* its preprocessing is the one its authors document, applied as documented (a BGR model sees an image and
  its channel-swapped copy differently, and the swapped image fed to it equals the original fed to an RGB
  twin);
* at reduced cost (always run): the family's network at a reduced depth and width, registered for the test
  with the family's own key mapping and preprocessing, gets random weights, is written in the published file
  layout, and is loaded back strictly through the public loader, giving the same weights and embeddings;
* at full size (``-m slow``): the same round trip with the registered architecture itself.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from aikd.cli import main
from aikd.io import load_embeddings, read_labels
from aikd.models import (
    Preprocessing,
    build_backbone,
    calibrate_batchnorm,
    fitting_architectures,
    get_spec,
    infer_arch,
    list_models,
    load_backbone,
    load_fr_model,
)
from aikd.models import irnet as irnet_module
from aikd.models.iresnet import IResNet
from aikd.models.swin import SwinFace
from aikd.models.vit import FaceViT
from published_layouts import face_vit, ir_net, iresnet, publish, swin_face

# ------------------------------------------------------------------------------------ what the authors publish
# arch -> (family, layout arguments at full size). Families: how the file is published (see publish()).
ARCHS: dict[str, tuple[str, dict]] = {
    "r18": ("arcface", {"blocks": (2, 2, 2, 2)}),
    "r34": ("arcface", {"blocks": (3, 4, 6, 3)}),
    "r50": ("arcface", {"blocks": (3, 4, 14, 3)}),
    "r100": ("arcface", {"blocks": (3, 13, 30, 3)}),
    "r200": ("arcface", {"blocks": (6, 26, 60, 6)}),
    "r18_w0.25": ("arcface", {"blocks": (2, 2, 2, 2), "width": 16}),
    "tiny": ("arcface", {"blocks": (1, 1, 1, 1), "width": 8}),
    "elasticface-r100": ("arcface", {"blocks": (3, 13, 30, 3)}),
    "magface-r50": ("magface", {"blocks": (3, 4, 14, 3)}),
    "magface-r100": ("magface", {"blocks": (3, 13, 30, 3)}),
    "adaface-ir18": ("adaface", {"units": (2, 2, 2, 2)}),
    "adaface-ir50": ("adaface", {"units": (3, 4, 14, 3)}),
    "adaface-ir101": ("adaface", {"units": (3, 13, 30, 3)}),
    "curricularface-ir101": ("curricularface", {"units": (3, 13, 30, 3)}),
    "swinface": ("swinface", {}),
    "vit-t": ("vit", {"dim": 256, "depth": 12}),
    "vit-s": ("vit", {"dim": 512, "depth": 12}),
    "vit-b": ("vit", {"dim": 512, "depth": 24}),
    "vit-l": ("vit", {"dim": 768, "depth": 24}),
    "transface-s": ("transface", {"dim": 512, "depth": 12}),
    "transface-b": ("transface", {"dim": 512, "depth": 24}),
    "transface-l": ("transface", {"dim": 768, "depth": 24}),
}

# Models published in a format of their own, whose layout and parity a test file of their own checks.
OWN_FORMAT = {"dlib-r29": "tests/test_dlib.py (dlib's .dat serialisation)"}

# family -> (colour order, mean, std) on the 0..1 scale, as the authors' inference code documents it:
# arcface_torch / ElasticFace / TransFace / SwinFace inference.py: cv2 BGR -> RGB, (x / 255 - 0.5) / 0.5;
# CurricularFace: PIL RGB, RGB_MEAN = RGB_STD = 0.5; AdaFace to_input(): BGR, (x / 255 - 0.5) / 0.5;
# MagFace gen_feat.py: cv2 BGR, ToTensor, Normalize(mean=0, std=1).
DOCUMENTED = {
    "arcface": ("RGB", 0.5, 0.5), "curricularface": ("RGB", 0.5, 0.5), "vit": ("RGB", 0.5, 0.5),
    "transface": ("RGB", 0.5, 0.5), "swinface": ("RGB", 0.5, 0.5), "adaface": ("BGR", 0.5, 0.5),
    "magface": ("BGR", 0.0, 1.0),
}



def left_out(family: str, variant: int) -> str | None:
    """What the loader says it left out of a family's published file (publish() variant), if anything."""
    if family == "transface" and variant == 1:
        return "state_dict_softmax_fc"
    return {"adaface": "head.kernel", "magface": "fc.weight", "swinface": "state_dict_fam"}.get(family)


def published_layout(family: str, **size) -> list[tuple[str, tuple[int, ...]]]:
    if family in ("arcface", "magface"):
        return iresnet(**size)
    if family in ("adaface", "curricularface"):
        return ir_net(mid_norm=family == "adaface", **size)
    if family in ("vit", "transface"):
        return face_vit(senet=family == "transface", **size)
    return swin_face(**size)


# family -> (layout arguments at reduced size, the family's module at that size)
REDUCED = {
    "arcface": ({"blocks": (1, 1, 1, 1), "width": 8}, lambda **kw: IResNet((1, 1, 1, 1), width=8, **kw)),
    "magface": ({"blocks": (1, 2, 1, 1), "width": 8},
                lambda **kw: IResNet((1, 2, 1, 1), width=8, bn_eps=2e-5, frozen_feature_scale=False, **kw)),
    "adaface": ({"units": (1, 2, 1, 1), "channels": (8, 16, 16, 32)},
                lambda **kw: irnet_module.IRNet((1, 2, 1, 1), True, channels=(8, 16, 16, 32), **kw)),
    "curricularface": ({"units": (1, 1, 2, 1), "channels": (8, 8, 16, 32)},
                       lambda **kw: irnet_module.IRNet((1, 1, 2, 1), False, channels=(8, 8, 16, 32), **kw)),
    "vit": ({"dim": 32, "depth": 2}, lambda **kw: FaceViT(32, 2, heads=4, **kw)),
    "transface": ({"dim": 32, "depth": 2}, lambda **kw: FaceViT(32, 2, heads=4, senet=True, **kw)),
    "swinface": ({"embed_dim": 8, "depths": (2, 2, 2, 1), "heads": (1, 2, 2, 4)},
                 lambda **kw: SwinFace(8, (2, 2, 2, 1), (1, 2, 2, 4), **kw)),
}
FAMILY_EXAMPLE = {"arcface": "r50", "magface": "magface-r100", "adaface": "adaface-ir101",
                  "curricularface": "curricularface-ir101", "vit": "vit-t", "transface": "transface-l",
                  "swinface": "swinface"}


def meta_state(layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta", dtype=torch.int64 if shape == () else torch.float32)
            for key, shape in layout}


def layout_of(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in module.state_dict().items()]


@functools.cache
def reduced_model(family: str) -> torch.nn.Module:
    """The family's network at reduced size: seeded random weights, calibrated BatchNorm, eval mode."""
    torch.manual_seed(0)
    return calibrate_batchnorm(REDUCED[family][1](), batches=1, batch_size=4).eval()


def faces(count: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------- every model
def test_every_registered_model_has_its_published_layout_here():
    unknown = [name for name in list_models() if name not in ARCHS and name not in OWN_FORMAT]
    assert unknown == [], f"add the published layout of {unknown} to tests/published_layouts.py and ARCHS"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_full_size_layout_is_the_published_one_and_is_recognised(arch):
    family, size = ARCHS[arch]
    layout = published_layout(family, **size)
    with torch.device("meta"):
        module = build_backbone(arch)
    assert layout_of(module) == layout  # every key and shape, in the published order
    # The registry's contract (students, SER-FIQ, autocast regions): the embedding split into trunk and head.
    assert module.num_features == 512
    assert callable(module.forward_trunk) and callable(module.forward_embedding_from_trunk)
    published = publish(family, meta_state(layout), variant=1)
    state = published.get("state_dict") or published.get("state_dict_backbone") or published
    assert arch in fitting_architectures(state)
    twins = set(fitting_architectures(meta_state(layout)))  # the same keys and shapes: r100 = elasticface-r100
    assert infer_arch(state) == arch or infer_arch(state) in twins
    if family in ("magface", "adaface", "swinface"):  # files that say what they are
        assert infer_arch(state) == arch


@pytest.mark.parametrize("arch", list(ARCHS))
def test_preprocessing_is_the_documented_one_and_applied_as_documented(arch):
    family = ARCHS[arch][0]
    order, mean, std = DOCUMENTED[family]
    preprocessing = get_spec(arch).preprocessing
    assert (preprocessing.channel_order, preprocessing.mean, preprocessing.std) == (order, (mean,) * 3, (std,) * 3)
    assert preprocessing.input_size == (112, 112) and preprocessing.template is None  # ArcFace template
    images = faces(2)
    pixels = images[..., ::-1] if order == "BGR" else images
    expected = torch.from_numpy(((pixels / 255.0 - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    torch.testing.assert_close(preprocessing(images), expected, rtol=0, atol=1e-6)

    model = reduced_model(family)
    other = "RGB" if order == "BGR" else "BGR"
    twin = dataclasses.replace(preprocessing, channel_order=other)
    swapped = np.ascontiguousarray(images[..., ::-1])
    with torch.no_grad():
        original, of_swapped = model(preprocessing(images)), model(preprocessing(swapped))
        assert not torch.allclose(original, of_swapped, atol=1e-3)  # colour order matters to the model
        assert torch.equal(of_swapped, model(twin(images)))  # swapped into it = original into the twin


# ------------------------------------------------------------------------------- round trip through the loader
def reduced_spec(family: str, monkeypatch) -> str:
    """Register ``FAMILY_EXAMPLE[family]``'s spec at reduced size (its key mapping and preprocessing kept)."""
    from aikd.models import registry

    name = f"test-{family}-reduced"
    spec = dataclasses.replace(get_spec(FAMILY_EXAMPLE[family]), name=name, builder=REDUCED[family][1])
    monkeypatch.setitem(registry._REGISTRY, name, spec)
    return name


def round_trip(arch: str, family: str, layout, tmp_path, variant: int, caplog) -> None:
    """Random weights -> published file -> public loader: same tensors, same embeddings, notes on what was left."""
    torch.manual_seed(1)
    module = calibrate_batchnorm(build_backbone(arch), batches=1, batch_size=4).eval()
    assert layout_of(module) == layout
    path = tmp_path / f"{arch}-{variant}.pth"
    torch.save(publish(family, module.state_dict(), variant), path)
    with caplog.at_level(logging.WARNING, logger="aikd.models.checkpoint"):
        loaded = load_fr_model(path, arch)
    assert loaded.arch == arch and loaded.preprocessing == get_spec(arch).preprocessing
    for (key, want), got in zip(module.state_dict().items(), loaded.backbone.state_dict().values(), strict=True):
        assert torch.equal(want, got), key
    images = faces(3)
    with torch.no_grad():
        embedding = loaded.backbone(loaded.preprocessing(images))
        torch.testing.assert_close(embedding, module(loaded.preprocessing(images)), rtol=0, atol=0)
    assert embedding.shape == (3, 512) and torch.isfinite(embedding).all()
    dropped = left_out(family, variant)
    if dropped:
        assert any(dropped in note for note in loaded.notes) and dropped in caplog.text
    else:
        assert loaded.notes == [] and "note:" not in caplog.text


@pytest.mark.parametrize("family", list(REDUCED))
@pytest.mark.parametrize("variant", [0, 1])
def test_published_file_loads_strictly_at_reduced_size(family, variant, tmp_path, monkeypatch, caplog):
    arch = reduced_spec(family, monkeypatch)
    round_trip(arch, family, published_layout(family, **REDUCED[family][0]), tmp_path, variant, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCHS if ARCHS[a][0] != "arcface" or a == "elasticface-r100"])
def test_published_file_loads_strictly_at_full_size(arch, tmp_path, caplog):
    family, size = ARCHS[arch]
    round_trip(arch, family, published_layout(family, **size), tmp_path, 0, caplog)


def test_a_file_that_does_not_fit_says_what_differs_and_what_it_fits(tmp_path, monkeypatch):
    arch = reduced_spec("adaface", monkeypatch)
    curricular = reduced_spec("curricularface", monkeypatch)
    torch.manual_seed(0)
    path = tmp_path / "adaface_ir101_webface12m.ckpt"
    torch.save(publish("adaface", build_backbone(arch).state_dict()), path)
    with pytest.raises(ValueError) as error:
        load_fr_model(path, "r50")
    message = str(error.value)
    assert message.startswith(f"{path}: weights do not fit arch r50: ")
    assert "missing key(s) the model needs (e.g. conv1.weight" in message
    assert "unexpected key(s) the model does not have (e.g. model.input_layer.0.weight" in message
    assert f"looks like {arch} (its keys and shapes fit exactly)" in message
    with pytest.raises(ValueError, match=f"fit arch {curricular}: .*looks like {arch} "):
        load_fr_model(path, curricular)
    assert load_fr_model(path).arch == arch  # without --arch: recognised by its keys


def test_swinface_multitask_checkpoint_says_it_left_out_the_analysis_heads(tmp_path, monkeypatch, capsys):
    arch = reduced_spec("swinface", monkeypatch)
    torch.manual_seed(0)
    path = tmp_path / "checkpoint_step_79999_gpu_0.pt"
    torch.save(publish("swinface", build_backbone(arch).state_dict()), path)
    loaded = load_fr_model(path, arch)
    assert loaded.notes == [f"took the network from 'state_dict_backbone'; left out state_dict_softmax_fc, "
                            f"state_dict_fam, state_dict_tss, state_dict_om (not part of {arch}'s recognition "
                            "network)"]
    assert isinstance(load_backbone(path, arch), SwinFace)


def published_reduced_model(arch: str, family: str, path: Path) -> tuple[torch.nn.Module, Path]:
    """A seeded, BatchNorm-calibrated ``arch`` in eval mode, and its weights saved as ``family`` publishes them."""
    torch.manual_seed(0)
    module = calibrate_batchnorm(build_backbone(arch), batches=1, batch_size=4).eval()
    torch.save(publish(family, module.state_dict()), path)
    return module, path


def write_faces(folder: Path, images: np.ndarray) -> np.ndarray:
    """``images`` as ``folder/0.png``, ``1.png``, ...; returns them."""
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return images


def test_magface_quality_is_aikd_labels_magnitude(tmp_path, monkeypatch):
    """``aikd label --method magnitude`` on a MagFace file as published: the norm of its BGR [0, 1] embedding."""
    arch = reduced_spec("magface", monkeypatch)
    module, weights = published_reduced_model(arch, "magface", tmp_path / "magface_epoch_00025.pth")
    images = write_faces(tmp_path / "faces", faces(3))
    out = tmp_path / "magface.csv"
    assert main(["label", str(tmp_path / "faces"), "--method", "magnitude", "--weights", str(weights), "--arch", arch,
                 "--aligned", "--device", "cpu", "-o", str(out)]) == 0
    bgr_unit = torch.from_numpy((images[..., ::-1] / 255.0).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = torch.linalg.vector_norm(module(bgr_unit), dim=1).numpy()
    np.testing.assert_allclose(read_labels(out).qualities, expected, rtol=1e-5)


def test_embed_with_an_adaface_checkpoint_as_published(tmp_path, monkeypatch):
    """``aikd embed --arch ... --weights adaface_*.ckpt``: BGR input, the embedding AdaFace's forward returns."""
    arch = reduced_spec("adaface", monkeypatch)
    module, weights = published_reduced_model(arch, "adaface", tmp_path / "adaface_ir18_webface4m.ckpt")
    images = write_faces(tmp_path / "faces", faces(3, seed=2))
    out = tmp_path / "emb.npz"
    assert main(["embed", str(tmp_path / "faces"), "--arch", arch, "--weights", str(weights), "--aligned",
                 "--device", "cpu", "-o", str(out)]) == 0
    keys, embeddings = load_embeddings(out)
    bgr = torch.from_numpy(((images[..., ::-1] / 255.0 - 0.5) / 0.5).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        unit, norm = module.forward_with_norm(bgr)  # AdaFace's (feature / norm, norm)
    assert keys == ["0.png", "1.png", "2.png"]
    np.testing.assert_allclose(embeddings, unit.numpy(), atol=2e-5)
    torch.testing.assert_close(norm.squeeze(1), torch.linalg.vector_norm(module(bgr), dim=1))


@pytest.mark.parametrize("family", ["adaface", "vit", "transface", "swinface"])
def test_every_family_splits_into_trunk_and_embedding_head(family):
    """The contract SER-FIQ and the autocast regions rely on: forward = head(trunk), dropout only in the head."""
    torch.manual_seed(0)
    model = calibrate_batchnorm(REDUCED[family][1](dropout=0.5), batches=1, batch_size=4).eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        trunk = model.forward_trunk(x)
        torch.testing.assert_close(model.forward_embedding_from_trunk(trunk), model(x))
        model.dropout.train()
        kept = trunk.clone()
        first, second = (model.forward_embedding_from_trunk(trunk) for _ in range(2))
    assert model.num_features == 512 and trunk.ndim == 2
    assert torch.equal(trunk, kept) and not torch.allclose(first, second)


def test_unused_published_tensors_are_frozen():
    """Kept for the published keys only: the ViT mask token and SwinFace's unused ``head`` never train."""
    vit, swin = REDUCED["transface"][1](), REDUCED["swinface"][1]()
    assert not vit.mask_token.requires_grad and not any(p.requires_grad for p in swin.head.parameters())
    magface = REDUCED["magface"][1]()
    assert magface.features.weight.requires_grad  # MagFace trains the features scale; arcface_torch freezes it
    assert all(m.eps == 2e-5 for m in magface.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_preprocessing_twin_is_a_different_model_input():
    """Sanity of the twin construction used above: only the channel order differs."""
    bgr = get_spec("adaface-ir18").preprocessing
    assert dataclasses.replace(bgr, channel_order="RGB") == Preprocessing()


@pytest.mark.parametrize("family", ["transface", "swinface"])
def test_transformer_students_train_from_a_published_teacher(family, tmp_path, monkeypatch):
    """``aikd train`` with a published file as the teacher: the quality head on the family's embedding, the
    paper's last K tensors trainable (the rest keep the teacher's values), the run's checkpoint reloads.

    The transformer families, which differ most from the iResNet students test_train.py trains; every family's
    training step is checked against float64 in test_layout.py."""
    from pathlib import Path

    from aikd.models import load_quality_model

    arch = reduced_spec(family, monkeypatch)
    torch.manual_seed(0)
    teacher = calibrate_batchnorm(build_backbone(arch), batches=1, batch_size=4).eval()
    weights = tmp_path / "teacher.pth"
    torch.save(publish(family, teacher.state_dict()), weights)
    run = tmp_path / "run"
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert main(["train", "--config", tiny, "--out", str(run), "data.synthetic.count=24", "data.batch_size=8",
                 "data.val_batch_size=8", "train.epochs=1", f"teacher.weights={weights}", f"student.arch={arch}",
                 "student.trainable_tensors=6", "train.validate_every=1.0"]) == 0
    student = load_quality_model(run / "best.pt")
    assert student.arch == arch and student.preprocessing == get_spec(arch).preprocessing
    names = [name for name, _ in teacher.named_parameters()]
    trained = dict(student.feature_extractor.named_parameters())
    original = dict(teacher.named_parameters())
    assert all(torch.equal(trained[n], original[n]) for n in names[:-6])  # frozen: the teacher's values
    assert any(not torch.equal(trained[n], original[n]) for n in names[-6:] if original[n].requires_grad)


@pytest.mark.slow  # 10-20 s each here: tracing the transformers' many small operations
@pytest.mark.parametrize("family", ["transface", "swinface"])
def test_transformer_quality_models_export_to_onnx_with_parity(family):
    """``aikd export`` of a quality model on a transformer backbone: the graph gives the torch model's outputs."""
    import io

    from aikd.inference.export import check_onnx, export_onnx
    from aikd.inference.onnx_format import read_metadata
    from aikd.models import QualityHead, QualityModel

    torch.manual_seed(0)
    preprocessing = get_spec(FAMILY_EXAMPLE[family]).preprocessing
    model = QualityModel(REDUCED[family][1](), QualityHead(512), arch=FAMILY_EXAMPLE[family],
                         preprocessing=preprocessing)
    calibrate_batchnorm(model, batches=1, batch_size=4).eval()
    buffer = io.BytesIO()
    export_onnx(model, buffer)
    worst = check_onnx(model, buffer.getvalue())
    assert worst["embedding"] < 1e-4 * worst["embedding_scale"]
    assert worst["quality"] < 1e-4 * max(1.0, worst["quality_scale"])
    assert read_metadata(buffer.getvalue())["preprocessing"] == preprocessing


def test_a_model_saves_under_its_own_name_when_another_has_the_same_keys(tmp_path, monkeypatch):
    """A MagFace student has insightface's keys (the file alone says iResNet); saving it as MagFace is right,
    saving it as an architecture with other keys is refused."""
    from aikd.models import read_checkpoint, registry, save_checkpoint

    spec = dataclasses.replace(get_spec("magface-r50"), name="test-magface-tiny", layers=(1, 1, 1, 1), width=8,
                               builder=lambda **kw: IResNet((1, 1, 1, 1), width=8, bn_eps=2e-5,
                                                            frozen_feature_scale=False, **kw))
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    backbone = build_backbone(spec.name)
    assert infer_arch(backbone.state_dict()) == "tiny"  # same keys and shapes as the arcface_torch tiny
    path = save_checkpoint(tmp_path / "magface.pt", backbone, spec.name)
    assert read_checkpoint(path)[1]["preprocessing"]["channel_order"] == "BGR"
    assert load_fr_model(path).arch == spec.name  # the file's record wins over the keys
    with pytest.raises(ValueError, match="look like arch tiny, but arch 'r18' was given"):
        save_checkpoint(tmp_path / "wrong.pt", backbone, "r18")
