"""Labellers: SER-FIQ against a plain loop of full forward passes, magnitude, the CR-FIQA certainty ratio by
hand, imported labels and their normalisations, and ``aikd label`` end to end for every method."""

from __future__ import annotations

import csv
import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from aikd.cli import main
from aikd.io import read_labels
from aikd.labelers import LABELERS, Labeler, labeler_class
from aikd.labelers.certainty import CertaintyOptions, CertaintyRatio, certainty_ratio, identity_from_folder
from aikd.labelers.imported import ImportedLabels, ImportOptions, normalise_labels
from aikd.labelers.magnitude import Magnitude
from aikd.labelers.serfiq import SerFiq, SerFiqOptions, dropout_masks


@pytest.fixture
def faces() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 112, 112, generator=generator) * 2 - 1


KEYS = ["a/1.jpg", "a/2.jpg", "b/1.jpg"]


# ------------------------------------------------------------------------------------------------------ SER-FIQ
def _serfiq_by_loop(backbone, faces, masks, dropout, monkeypatch) -> np.ndarray:
    """The formula written out: T full forward passes with the model's dropout active (train mode) using the
    given masks, then 2 sigmoid(-mean distance over the pairs i < j of L2-normalised embeddings)."""
    passes = masks.shape[1]
    current = {}

    def fake_dropout(x, p, training, inplace=False):
        assert training and p == dropout and not inplace
        return x * current["mask"] / (1.0 - p)

    qualities = []
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch.nn.functional, "dropout", fake_dropout)
        backbone.dropout.p = dropout
        backbone.dropout.train()
        for index in range(len(faces)):
            embeddings = []
            for t in range(passes):
                current["mask"] = masks[index, t].float()
                embeddings.append(backbone(faces[index : index + 1])[0].double())
            distances = [torch.dist(embeddings[i] / embeddings[i].norm(), embeddings[j] / embeddings[j].norm())
                         for i, j in itertools.combinations(range(passes), 2)]
            qualities.append(2.0 / (1.0 + math.exp(float(sum(distances)) / len(distances))))
    backbone.dropout.eval()
    backbone.dropout.p = 0.0
    return np.array(qualities)


def test_serfiq_equals_a_loop_of_full_forward_passes_with_the_same_masks(tiny_backbone, faces, monkeypatch):
    options = SerFiqOptions(passes=6, dropout=0.3, seed=5)
    features = tiny_backbone.forward_trunk(faces[:1]).shape[1]
    masks = dropout_masks(KEYS, features, options)
    ours = SerFiq(tiny_backbone, options).label_batch(faces, KEYS, masks=masks)
    expected = _serfiq_by_loop(tiny_backbone, faces, masks, 0.3, monkeypatch)
    np.testing.assert_allclose(ours.quality, expected, rtol=0, atol=1e-6)
    assert ours.quality.shape == (3,) and ours.quality.dtype == np.float64
    np.testing.assert_allclose(ours.quality, 2 / (1 + np.exp(ours.extras["mean_distance"])))
    # The seeded masks (no masks argument) are those same masks.
    np.testing.assert_allclose(SerFiq(tiny_backbone, options).label_batch(faces, KEYS).quality, ours.quality)


def test_serfiq_is_seeded_per_image_and_independent_of_the_batch(tiny_backbone, faces):
    options = SerFiqOptions(passes=8, seed=1)
    labeler = SerFiq(tiny_backbone, options)
    together = labeler.label_batch(faces, KEYS).quality
    alone = labeler.label_batch(faces[2:], KEYS[2:]).quality
    np.testing.assert_allclose(alone, together[2:], atol=1e-6)
    np.testing.assert_array_equal(labeler.label_batch(faces, KEYS).quality, together)
    other_seed = SerFiq(tiny_backbone, SerFiqOptions(passes=8, seed=2)).label_batch(faces, KEYS).quality
    assert np.all(other_seed != together)
    assert np.all((together > 0) & (together < 1))
    # Without dropout every pass is the same network: distance 0, quality 1.
    still = SerFiq(tiny_backbone, SerFiqOptions(passes=3, dropout=0.0)).label_batch(faces, KEYS)
    np.testing.assert_allclose(still.quality, 1.0, atol=1e-6)


def test_serfiq_masks_and_rescaling(tiny_backbone, faces):
    masks = dropout_masks(["x.jpg"], 1000, SerFiqOptions(passes=50, dropout=0.5, seed=0))
    assert masks.dtype == torch.bool and masks.shape == (1, 50, 1000)
    assert abs(masks.float().mean().item() - 0.5) < 0.01  # 50,000 draws: standard deviation 0.0022
    plain = SerFiq(tiny_backbone, SerFiqOptions(passes=5)).label_batch(faces, KEYS)
    rescaled = SerFiq(tiny_backbone, SerFiqOptions(passes=5, rescale=True, alpha=10.0, r=0.5))
    assert rescaled.columns == ("serfiq_raw", "mean_distance")
    out = rescaled.label_batch(faces, KEYS)
    np.testing.assert_allclose(out.extras["serfiq_raw"], plain.quality)
    np.testing.assert_allclose(out.quality, 1 / (1 + np.exp(-10.0 * (plain.quality - 0.5))))
    with pytest.raises(ValueError, match="--passes"):
        SerFiqOptions(passes=1)
    with pytest.raises(ValueError, match="--dropout"):
        SerFiqOptions(dropout=1.0)
    with pytest.raises(ValueError, match="masks must be"):
        SerFiq(tiny_backbone, SerFiqOptions(passes=5)).label_batch(faces, KEYS, masks=masks)


# ---------------------------------------------------------------------------------------------------- magnitude
def test_magnitude_is_the_embedding_norm(tiny_backbone, faces):
    out = Magnitude(tiny_backbone).label_batch(faces, KEYS)
    with torch.no_grad():
        expected = torch.sqrt((tiny_backbone(faces).double() ** 2).sum(dim=1)).numpy()
    np.testing.assert_allclose(out.quality, expected, rtol=1e-6)
    assert out.quality.shape == (3,) and np.all(out.quality > 0)


# ---------------------------------------------------------------------------------------------------- certainty
def test_certainty_ratio_by_hand():
    # Identity A: (1, 0) and (0.8, 0.6); identity B: (0, 1) and (-0.6, 0.8). Every own-class cosine is 0.8.
    # Centres: A = (0.9, 0.3) ~ (3, 1)/sqrt(10), B = (-0.3, 0.9) ~ (-1, 3)/sqrt(10).
    embeddings = np.array([[5.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])  # the first one unnormalised
    result = certainty_ratio(embeddings, ["A", "A", "B", "B"])
    root10 = math.sqrt(10.0)
    nnccs = np.array([-1 / root10, 1 / root10, 1 / root10, -1 / root10])  # e.g. (1, 0) . (-1, 3)/sqrt(10)
    np.testing.assert_allclose(result.ccs, 0.8)  # leave-one-out: the other image of the identity
    np.testing.assert_allclose(result.nnccs, nnccs)
    np.testing.assert_allclose(result.ratio, 0.8 / (nnccs + 1 + 1e-9))
    assert result.errors == {}
    # Counted in its own centre: CCS = cos((1, 0), (3, 1)/sqrt(10)) = 3/sqrt(10) for the first sample.
    included = certainty_ratio(embeddings, ["A", "A", "B", "B"], CertaintyOptions(include_self=True))
    np.testing.assert_allclose(included.ccs, 3 / root10)
    np.testing.assert_allclose(included.nnccs, nnccs)


def test_certainty_ratio_undefined_cases():
    lonely = certainty_ratio(np.eye(3), ["A", "A", "B"])
    assert set(lonely.errors) == {2} and "has no other image" in lonely.errors[2]
    assert np.isnan(lonely.ratio[2]) and np.isfinite(lonely.ratio[:2]).all()
    assert np.isfinite(certainty_ratio(np.eye(3), ["A", "A", "B"], CertaintyOptions(include_self=True)).ratio).all()
    single = certainty_ratio(np.eye(3), ["A", "A", "A"])
    assert set(single.errors) == {0, 1, 2} and "only one identity" in single.errors[0]


def test_certainty_labeler_uses_identity_folders(tiny_backbone, faces):
    keys = ["id1/x.jpg", "id1/y.jpg", "id2/z.jpg", "id2/w.jpg", "top.jpg"]
    labeler = CertaintyRatio(tiny_backbone)
    batch = labeler.label_batch(torch.cat([faces, faces[:2].flip(3)]), keys)
    assert batch.quality is None and batch.embeddings.shape == (5, 512)
    labels = labeler.label_set(keys, batch.embeddings)
    assert set(labels.errors) == {4} and "no identity" in labels.errors[4]
    expected = certainty_ratio(batch.embeddings[:4], ["id1", "id1", "id2", "id2"])
    np.testing.assert_allclose(labels.quality[:4], expected.ratio)
    assert list(labels.extras["identity"]) == ["id1", "id1", "id2", "id2", ""]
    assert identity_from_folder("a/b/c.jpg") == "a/b" and identity_from_folder("c.jpg") is None


# ------------------------------------------------------------------------------------------------------- import
def test_normalisations():
    values = np.array([10.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(normalise_labels(values, "none"), values)
    np.testing.assert_allclose(normalise_labels(values, "minmax"), [1.0, 0.0, 1 / 9, 1 / 9])
    np.testing.assert_allclose(normalise_labels(values, "rank"), [1.0, 0.0, 0.5, 0.5])  # ranks 3, 0, 1.5, 1.5
    np.testing.assert_allclose(normalise_labels(np.array([4.0, 4.0, 4.0]), "minmax"), 0.5)
    np.testing.assert_allclose(normalise_labels(np.array([4.0, 4.0, 4.0]), "rank"), 0.5)
    np.testing.assert_allclose(normalise_labels(np.array([7.0]), "rank"), 0.5)
    with pytest.raises(ValueError, match="finite"):
        normalise_labels(np.array([1.0, np.nan]), "rank")


def test_import_matches_keys_and_reports_bad_labels(tmp_path):
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text("path,quality,other\nid/a.jpg,3,0\nb.jpg,1,0\nc.jpg,nan,0\nd.jpg,inf,0\ne.jpg,x,0\n")
    labeler = ImportedLabels(ImportOptions(labels_file, normalise="minmax"))
    keys = ["id/a.jpg", "sub/b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]  # b.jpg: matched by its unique name
    labels = labeler.label_set(keys)
    np.testing.assert_allclose(labels.quality[:2], [1.0, 0.0])
    np.testing.assert_allclose(labels.extras["raw"][:2], [3.0, 1.0])
    assert sorted(labels.errors) == [2, 3, 4, 5]
    assert "NaN" in labels.errors[2] and "infinite" in labels.errors[3] and "NaN" in labels.errors[4]
    assert "no label for this image" in labels.errors[5]
    assert "min 1, max 3" in labeler.describe_range(labels)
    with pytest.raises(ValueError, match="lacks column"):
        ImportedLabels(ImportOptions(labels_file, column="cr"))


# ------------------------------------------------------------------------------------------- aikd label, e2e
@pytest.fixture
def identity_folder(tmp_path):
    """Five small face-like images in two identity folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for identity, count in (("id1", 3), ("id2", 2)):
        (root / identity).mkdir(parents=True)
        for index in range(count):
            image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / identity / f"{index}.png")
    return root


def _model_args(method: str) -> list[str]:
    return ["--method", method, "--arch", "tiny", "--weights", "none", "--seed", "3", "--batch-size", "2"]


EXTRA_COLUMNS = {"serfiq": ["mean_distance"], "magnitude": [], "certainty": ["identity", "ccs", "nnccs"]}


@pytest.mark.parametrize("method", ["serfiq", "magnitude", "certainty"])
def test_label_command_end_to_end(identity_folder, tmp_path, method, capsys):
    output = tmp_path / f"{method}.csv"
    extra = ["--passes", "10"] if method == "serfiq" else []
    assert main(["label", str(identity_folder), *_model_args(method), *extra, "-o", str(output)]) == 0
    assert "MEANINGLESS" in capsys.readouterr().err
    table = read_labels(output)
    assert table.paths == ["id1/0.png", "id1/1.png", "id1/2.png", "id2/0.png", "id2/1.png"]
    assert np.isfinite(table.qualities).all()
    with open(output, newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["path", "quality", *EXTRA_COLUMNS[method]]
    # Seeded: a second run gives the same file.
    again = tmp_path / f"{method}_again.csv"
    assert main(["label", str(identity_folder), *_model_args(method), *extra, "-o", str(again)]) == 0
    assert again.read_text() == output.read_text()


def test_label_resume_labels_only_new_images(identity_folder, tmp_path, monkeypatch):
    output = tmp_path / "labels.csv"
    args = ["label", str(identity_folder), *_model_args("serfiq"), "--passes", "4", "-o", str(output)]
    assert main(args) == 0
    first = read_labels(output).as_dict()
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(identity_folder / "id2" / "new.png")
    seen: list[str] = []
    original = SerFiq.label_batch

    def counting(self, faces, keys, masks=None):
        seen.extend(keys)
        return original(self, faces, keys, masks)

    monkeypatch.setattr(SerFiq, "label_batch", counting)
    assert main(args) == 2  # exists
    assert main([*args, "--resume"]) == 0
    assert set(seen) == {"id2/new.png"}  # (its pass padded to the compute batch with copies of it)
    second = read_labels(output).as_dict()
    assert {key: second[key] for key in first} == first and len(second) == 6


def test_certainty_resume_reuses_embeddings_and_identity_column(identity_folder, tmp_path):
    listing = tmp_path / "list.csv"
    rows = ["path,subject"] + [f"faces/{p.relative_to(identity_folder).as_posix()},{p.stem}"
                               for p in sorted(identity_folder.rglob("*.png"))]
    listing.write_text("\n".join(rows) + "\n")  # identities by file stem: 0, 1, 2 (2 has one image)
    output = tmp_path / "cr.csv"
    args = ["label", str(listing), *_model_args("certainty"), "--identity-column", "subject", "-o", str(output)]
    assert main(args) == 1
    errors = (tmp_path / "cr.errors.csv").read_text()
    assert "faces/id1/2.png" in errors and "has no other image" in errors
    table = read_labels(output)
    assert len(table) == 4
    assert (tmp_path / "cr.embeddings.npz").is_file()
    with open(output, newline="") as handle:
        assert {row["identity"] for row in csv.DictReader(handle)} == {"0", "1"}
    before = output.read_text()
    assert main([*args, "--resume", "--include-self"]) == 0  # embeddings reused, centres recomputed
    assert output.read_text() != before and len(read_labels(output)) == 5


def test_import_end_to_end_with_csv_and_official_pickle(identity_folder, tmp_path):
    scores = {"id1/0.png": 0.2, "id1/1.png": 0.9, "id1/2.png": 0.5, "id2/0.png": 0.5, "id2/1.png": 0.1}
    pickle_file = tmp_path / "scores.pkl"
    pickle_file.write_bytes(pickle.dumps(scores))
    output = tmp_path / "imported.csv"
    assert main(["label", str(identity_folder), "--method", "import", "--labels", str(pickle_file),
                 "--normalise", "rank", "-o", str(output)]) == 0
    table = read_labels(output).as_dict()
    assert table == {"id1/0.png": 0.25, "id1/1.png": 1.0, "id1/2.png": 0.625, "id2/0.png": 0.625, "id2/1.png": 0.0}
    assert read_labels(output, column="raw").as_dict() == scores
    csv_file = tmp_path / "scores.csv"
    partial = {key: value for key, value in scores.items() if key != "id1/2.png"}
    csv_file.write_text("path,cr\n" + "".join(f"{key},{value}\n" for key, value in partial.items()))
    plain = tmp_path / "plain.csv"
    assert main(["label", str(identity_folder), "--method", "import", "--labels", str(csv_file),
                 "--labels-column", "cr", "-o", str(plain)]) == 1
    assert read_labels(plain).as_dict() == partial
    assert "id1/2.png,no label for this image" in (tmp_path / "plain.errors.csv").read_text()


def test_label_usage_errors(identity_folder, tmp_path, capsys):
    output = str(tmp_path / "x.csv")
    assert main(["label", str(identity_folder), "--method", "serfiq", "-o", output]) == 2
    assert "needs a face-recognition model" in capsys.readouterr().err
    assert main(["label", str(identity_folder), "--method", "import", "-o", output]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["label", str(identity_folder), "--method", "magnitude", "--weights", "none", "-o", output]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["label", str(identity_folder), "--method", "certainty", "--weights", "none", "--arch", "tiny",
                 "--identity-column", "who", "-o", output]) == 2
    assert "CSV list" in capsys.readouterr().err


def test_every_registered_method_implements_the_interface():
    for name in LABELERS:
        cls = labeler_class(name)
        assert issubclass(cls, Labeler) and cls.name == name
        assert cls.set_pass or cls.needs_images  # a method gets its qualities from some pass
    with pytest.raises(ValueError, match="serfiq"):
        labeler_class("faceqnet")


def test_label_loads_insightface_style_weights(identity_folder, tmp_path, tiny_backbone):
    weights = tmp_path / "backbone.pth"
    torch.save(tiny_backbone.state_dict(), weights)  # a plain state dict, as arcface_torch saves it
    output = tmp_path / "magnitude.csv"
    assert main(["label", str(identity_folder / "id2"), "--method", "magnitude", "--weights", str(weights),
                 "--arch", "tiny", "-o", str(output)]) == 0
    from aikd.models import Preprocessing

    images = [np.asarray(Image.open(identity_folder / "id2" / f"{i}.png")) for i in range(2)]
    expected = Magnitude(tiny_backbone).label_batch(Preprocessing()(images), ["0.png", "1.png"]).quality
    np.testing.assert_allclose(read_labels(output).qualities, expected, rtol=1e-5)
