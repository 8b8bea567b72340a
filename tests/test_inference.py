"""The inference engine: exact BatchNorm folding, layouts, precisions, backends, devices."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from aikd.inference.engine import InferenceOptions, l2_normalise
from aikd.models import Preprocessing, build_model, calibrate_batchnorm
from aikd.models.folding import FoldedIResNet, _NormConvNorm, fold_batchnorm
from aikd.runtime import resolve_device


def _engine(model: nn.Module, preprocessing: Preprocessing | None = None, own_model: bool = False, **options):
    """The engine ``InferenceOptions(**options)`` builds for ``model``."""
    return InferenceOptions(**options).engine(model, preprocessing=preprocessing, own_model=own_model)


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every trainable BatchNorm a non-trivial affine part, so folding has real shifts to move."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight.requires_grad:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 0.6 - 0.3)
    return model


@pytest.fixture
def shifted_model():
    torch.manual_seed(0)
    model = _randomise_norms(build_model("tiny"))
    return calibrate_batchnorm(model, batches=2, batch_size=8).eval()


@pytest.mark.parametrize("arch", ["tiny", "r18_w0.25"])
def test_folded_model_matches_plain_model(arch, faces_batch):
    torch.manual_seed(0)
    model = calibrate_batchnorm(_randomise_norms(build_model(arch)), batches=2, batch_size=8).eval()
    folded = fold_batchnorm(model)
    assert isinstance(folded.feature_extractor, FoldedIResNet)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        embedding, quality = model(faces_batch)
        folded_embedding, folded_quality = folded(faces_batch)
        channels_last = fold_batchnorm(model).to(memory_format=torch.channels_last)
        cl_quality = channels_last(faces_batch.contiguous(memory_format=torch.channels_last))[1]
    assert (quality - folded_quality).abs().max() < 1e-4
    assert (quality - cl_quality).abs().max() < 1e-4
    assert (embedding - folded_embedding).abs().max() < 1e-4 * max(1.0, embedding.abs().max().item())


@pytest.mark.parametrize("size", [(9, 13), (1, 5), (16, 16)])
def test_norm_conv_norm_border_is_exact(size):
    """BN -> conv (zero padding) -> BN: the folded border correction reproduces the padded original."""
    torch.manual_seed(size[0])
    before, after = nn.BatchNorm2d(4).eval(), nn.BatchNorm2d(6).eval()
    for norm in (before, after):
        _randomise_norms(norm)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, *size)
    folded = _NormConvNorm(before, conv, after)
    with torch.no_grad():
        expected = after(conv(before(x)))
        np.testing.assert_allclose(folded(x).numpy(), expected.numpy(), atol=1e-5)
        assert folded.correct_border and (folded.conv(x) - expected).abs().max() > 1e-3  # the border matters


def test_folding_leaves_the_model_alone(shifted_model):
    shifted_model.train()
    before = {k: v.clone() for k, v in shifted_model.state_dict().items()}
    fold_batchnorm(shifted_model)
    assert shifted_model.training
    assert all(torch.equal(before[k], v) for k, v in shifted_model.state_dict().items())
    other = nn.Sequential(nn.Linear(3, 2))
    assert isinstance(fold_batchnorm(other), nn.Sequential)


def test_consuming_fold_gives_the_same_model_and_frees_the_source(faces_batch):
    torch.manual_seed(0)
    model = calibrate_batchnorm(_randomise_norms(build_model("r18_w0.25")), batches=2, batch_size=8).eval()
    kept = fold_batchnorm(model)
    consumed = fold_batchnorm(model, consume=True)
    with torch.no_grad():
        for ours, theirs in zip(consumed(faces_batch), kept(faces_batch), strict=True):
            assert torch.equal(ours, theirs)
    assert all(p.numel() == 0 for p in model.feature_extractor.parameters())  # the weights were freed
    assert consumed.quality_head is model.quality_head  # taken, not copied


def test_an_engine_owning_its_model_scores_the_same(shifted_model):
    faces = np.random.default_rng(3).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    expected = _engine(shifted_model, device="cpu")(list(faces))
    own = _engine(copy.deepcopy(shifted_model), device="cpu", own_model=True)(list(faces))
    for ours, theirs in zip(own, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_engine_prepares_exactly_as_the_models_preprocessing():
    """One preprocessing for the API (``model.preprocessing(x)``) and the engine ``aikd score`` runs."""
    rng = np.random.default_rng(0)
    faces = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((112, 112, 3), (200, 80, 3), (80, 200, 3),
                                                                          (50, 70, 3), (300, 300, 3))]
    preprocessing = Preprocessing()
    engine = _engine(nn.Identity(), device="cpu", fold=False, preprocessing=preprocessing)
    ours = np.stack([engine.prepare(face) for face in faces]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours, preprocessing(faces).numpy())
    bgr = Preprocessing(channel_order="BGR")
    np.testing.assert_array_equal(bgr.normalise(faces[0]), preprocessing.normalise(faces[0])[..., ::-1])
    with pytest.raises(ValueError, match="uint8"):
        preprocessing.normalise(faces[0].astype(np.float32))


def _faces(count: int = 5, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [Preprocessing().normalise(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(count)]


def test_engine_paths_agree(shifted_model):
    faces = _faces()
    with torch.no_grad():
        plain_embedding, plain_quality = shifted_model(torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2))
    for fold in (True, False):
        for channels_last in (True, False):
            engine = _engine(shifted_model, device="cpu", fold=fold, channels_last=channels_last)
            embedding, quality = engine(faces)
            assert quality.dtype == np.float32 and quality.shape == (5,)
            np.testing.assert_allclose(quality, plain_quality.numpy(), atol=1e-5)
            np.testing.assert_allclose(embedding, plain_embedding.numpy(), atol=1e-4)


def test_bf16_keeps_head_in_fp32_and_stays_close(shifted_model):
    faces = _faces(8)
    _, reference = _engine(shifted_model, device="cpu")(faces)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "emulated and slower" on CPUs without native bf16
        engine = _engine(shifted_model, device="cpu", precision="bf16")
    embedding, quality = engine(faces)
    assert quality.dtype == np.float32 and embedding.dtype == np.float32
    assert engine.model.quality_head.l1.weight.dtype == torch.float32
    spread = reference.max() - reference.min()
    assert np.abs(quality - reference).max() < 0.1 * spread + 1e-3


def test_onnxruntime_backend_matches_torch(shifted_model):
    pytest.importorskip("onnxruntime")
    faces = _faces(3)
    embedding, quality = _engine(shifted_model, device="cpu")(faces)
    ort_embedding, ort_quality = _engine(shifted_model, device="cpu", backend="onnxruntime")(faces)
    np.testing.assert_allclose(ort_quality, quality, atol=1e-5)
    np.testing.assert_allclose(ort_embedding, embedding, atol=1e-4)


def test_backbone_only_engine(shifted_model):
    embedding, quality = _engine(shifted_model.feature_extractor, device="cpu")(_faces(2))
    assert quality is None and embedding.shape == (2, 512)


def test_devices_and_option_errors(shifted_model):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unsupported device|cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            _engine(shifted_model, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="--precision must be one of"):
        _engine(shifted_model, device="cpu", precision="int4")
    with pytest.raises(ValueError, match="onnxruntime runs fp32"):
        _engine(shifted_model, device="cpu", backend="onnxruntime", precision="bf16")


def test_l2_normalise():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(l2_normalise(vectors), [[0.6, 0.8], [0.0, 0.0]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_close_to_fp32(shifted_model, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 (aikd score sets this too)
    faces = _faces(16)
    _, reference = _engine(shifted_model, device="cpu")(faces)
    _, fp32 = _engine(shifted_model, device="cuda")(faces)
    _, fp16 = _engine(shifted_model, device="cuda", precision="fp16")(faces)
    np.testing.assert_allclose(fp32, reference, atol=1e-4)
    assert np.abs(fp16 - reference).max() < 0.05 * (reference.max() - reference.min()) + 1e-3


def test_engines_take_either_layout_and_name_a_wrong_shape(shifted_model):
    pytest.importorskip("onnxruntime")
    faces = np.stack(_faces(3))  # (N, H, W, C), as Preprocessing.normalise gives them
    for engine in (_engine(shifted_model, device="cpu"), _engine(shifted_model, device="cpu", backend="onnxruntime")):
        embedding, quality = engine(faces)
        first_embedding, first_quality = engine(np.ascontiguousarray(faces.transpose(0, 3, 1, 2)))
        np.testing.assert_array_equal(first_quality, quality)
        np.testing.assert_array_equal(first_embedding, embedding)
        with pytest.raises(ValueError, match=r"faces of shape \(3, 64, 64, 3\).*\(N, 112, 112, 3\)"):
            engine(np.zeros((3, 64, 64, 3), np.float32))
    onnx_engine = _engine(shifted_model, device="cpu", backend="onnxruntime")
    prepared = onnx_engine.prepare(np.full((112, 112, 3), 90, np.uint8))
    assert prepared.shape == (3, 112, 112)  # what onnxruntime takes, without a transpose per batch
    np.testing.assert_array_equal(prepared, Preprocessing().normalise(np.full((112, 112, 3), 90, np.uint8),
                                                                      channels_first=True))


def test_normalise_layouts_hold_the_same_values_as_the_formula():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    for preprocessing in (Preprocessing(), Preprocessing(mean=(0.48, 0.46, 0.41), std=(0.23, 0.22, 0.26)),
                          Preprocessing(channel_order="BGR", mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))):
        last, first = preprocessing.normalise(image), preprocessing.normalise(image, channels_first=True)
        np.testing.assert_array_equal(first, last.transpose(2, 0, 1))  # bit for bit
        pixels = image[..., ::-1] if preprocessing.channel_order == "BGR" else image
        expected = (pixels / 255.0 - np.array(preprocessing.mean)) / np.array(preprocessing.std)
        np.testing.assert_allclose(last, expected, atol=1e-6)


def test_onnxruntime_devices_resolve_without_torch():
    ort = pytest.importorskip("onnxruntime")
    from aikd.runtime import PlainDevice

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert resolve_device("auto", backend="onnxruntime") == PlainDevice("cuda" if has_cuda else "cpu")
    assert resolve_device("cpu", backend="onnxruntime") == PlainDevice("cpu")
    assert resolve_device(PlainDevice("cpu")) == torch.device("cpu")  # a torch engine given one
    for bad in ("tpu", "cpu:1", "cuda:x"):
        with pytest.raises(ValueError, match=f"--device {bad}: unsupported device"):
            resolve_device(bad, backend="onnxruntime")
    if not has_cuda:
        with pytest.raises(ValueError, match="no CUDA provider.*onnxruntime-gpu"):
            resolve_device("cuda:0", backend="onnxruntime")


def test_scoring_an_onnx_file_never_imports_torch(shifted_model, tmp_path):
    """An exported graph is scored by onnxruntime alone: torch's import was most of such a process's start-up."""
    pytest.importorskip("onnxruntime")
    import subprocess
    import sys

    from aikd.demo.showcase import write_png
    from aikd.inference.export import export_onnx

    export_onnx(shifted_model, tmp_path / "m.onnx")
    faces = tmp_path / "faces"
    faces.mkdir()
    for value in (30, 150):
        write_png(faces / f"{value}.png", np.full((112, 112, 3), value, np.uint8))
    script = ("import sys; from aikd.cli import main; "
              f"rc = main(['score', {str(faces)!r}, '--checkpoint', {str(tmp_path / 'm.onnx')!r}, '--aligned', "
              f"'-o', {str(tmp_path / 's.csv')!r}]); "
              "print(rc, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stderr[-2000:]
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 3


def test_onnxruntime_runs_a_cpu_batch_as_two_halves_with_the_same_outputs(shifted_model, monkeypatch):
    """Two halves at once on half the cores each (throughput with decode threads about): the same outputs as
    the faces one by one, and on a single core the batch runs whole."""
    pytest.importorskip("onnxruntime")
    import aikd.inference.onnx_format as inference

    faces = np.stack(_faces(5))
    monkeypatch.setattr(inference, "available_cores", lambda: 2)
    engine = _engine(shifted_model, device="cpu", backend="onnxruntime")
    assert engine.session.halves
    embedding, quality = engine(faces)
    singles = [engine(faces[i:i + 1]) for i in range(len(faces))]
    np.testing.assert_allclose(quality, np.concatenate([q for _, q in singles]), atol=1e-6)
    np.testing.assert_allclose(embedding, np.concatenate([e for e, _ in singles]), atol=1e-5)
    monkeypatch.setattr(inference, "available_cores", lambda: 1)
    whole = _engine(shifted_model, device="cpu", backend="onnxruntime")
    assert not whole.session.halves
    np.testing.assert_allclose(whole(faces)[1], quality, atol=1e-6)
