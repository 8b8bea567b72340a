"""Calibrated quality (aikd calibrate): recovery of a known FNMR curve, monotonicity, ties, refusals, the file
format, and the round trip through aikd score, a checkpoint and ONNX metadata.

The synthetic set: identities with a random unit centre in 32 dimensions; each image is the centre plus Gaussian
noise whose scale falls with the image's quality q ~ U(0, 1). The expected FNMR of an image of quality q is the
chance that its similarity with a mated image of random quality is at most the threshold: computed here by
Monte Carlo from the same generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from aikd.cli import main
from aikd.evaluation import calibration as cal
from aikd.evaluation import metrics as ev
from aikd.evaluation import protocols
from aikd.io import read_labels, save_embeddings, write_csv, write_qualities

DIM = 32


def _noise_scale(quality: np.ndarray) -> np.ndarray:
    return 0.35 + 1.2 * (1 - quality) ** 2


def synthetic_set(identities: int = 400, per_identity: int = 5, seed: int = 0):
    """Embeddings, identity codes and qualities of the synthetic set (module docstring)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    identity = np.repeat(np.arange(identities), per_identity)
    quality = rng.uniform(0, 1, identity.size)
    noise = rng.standard_normal((identity.size, DIM)) / np.sqrt(DIM)
    return (centres[identity] + _noise_scale(quality)[:, None] * noise).astype(np.float32), identity, quality


def true_fnmr(quality: np.ndarray, threshold: float, samples: int = 20000, seed: int = 1) -> np.ndarray:
    """P(similarity <= threshold) of an image of each quality with a mated image of uniform quality."""
    rng = np.random.default_rng(seed)
    out = []
    for q in quality:
        centre = rng.standard_normal((samples, DIM))
        centre /= np.linalg.norm(centre, axis=1, keepdims=True)
        partner = rng.uniform(0, 1, samples)
        a = centre + _noise_scale(q) * rng.standard_normal((samples, DIM)) / np.sqrt(DIM)
        b = centre + _noise_scale(partner)[:, None] * rng.standard_normal((samples, DIM)) / np.sqrt(DIM)
        out.append(float((ev.cosine_similarity(a, b) <= threshold).mean()))
    return np.array(out)


def _loaded(embeddings, identity, quality):
    resolved = protocols.AllVsAll("synthetic", np.arange(len(quality)), identity)
    return SimpleNamespace(resolved=resolved, embeddings=embeddings, qualities={"q": quality},
                           paths=[str(i) for i in range(len(quality))])


@pytest.fixture(scope="module")
def fitted():
    embeddings, identity, quality = synthetic_set()
    data = cal.calibration_set(_loaded(embeddings, identity, quality), "q", 1e-3)
    options = cal.CalibrationOptions(fmr=1e-3, bootstrap=100, seed=0, target_fnmr=0.05)
    info = {"fr_model": {"name": "synthetic", "fingerprint": None}, "quality_model": {"fingerprint": None}}
    return data, cal.calibrate(data, options, info)


def _files(folder: Path, identities: int = 150, per_identity: int = 4, seed: int = 0) -> dict[str, Path]:
    """The synthetic set as aikd's files: embeddings, scores, an identity list and a pair CSV."""
    embeddings, identity, quality = synthetic_set(identities, per_identity, seed)
    names = [f"id{i:04d}/{n}.png" for n, i in enumerate(identity)]
    files = {"emb": folder / "emb.npz", "scores": folder / "scores.csv", "ids": folder / "ids.csv"}
    save_embeddings(files["emb"], names, embeddings)
    write_qualities(files["scores"], names, quality)
    write_csv(files["ids"], ("path", "identity"), [(n, f"id{i:04d}") for n, i in zip(names, identity, strict=True)])
    return files


# ------------------------------------------------------------------------------------------ the mapping
def test_the_mapping_recovers_a_known_fnmr_within_its_band(fitted):
    data, calibration = fitted
    grid = np.linspace(0.05, 0.95, 19)  # the ends are where isotonic regression is least sure
    truth = true_fnmr(grid, calibration.threshold)
    lower, upper = calibration.band(grid)
    inside = (truth >= lower - 1e-9) & (truth <= upper + 1e-9)
    assert inside.mean() >= 0.8, (inside.mean(), truth, lower, upper)
    assert np.abs(calibration.expected_fnmr(grid) - truth).mean() < 0.04
    assert truth[0] > 0.4 and truth[-1] < 0.15  # the set spans a real range of FNMR
    reliability = calibration.info["reliability"]
    assert 0 <= reliability["ece"] < 0.06 and len(reliability["bins"]) >= 5
    assert reliability["heldout_identities"] == 120 and reliability["fit_identities"] == 280


def test_the_threshold_is_the_fixed_one_of_all_nonmated_comparisons():
    """All-vs-all keeps only the highest non-mated scores (streamed); the threshold, also weighted, is exact."""
    embeddings, identity, quality = synthetic_set(identities=100)
    data = cal.calibration_set(_loaded(embeddings, identity, quality), "q", 1e-3)
    pairs = protocols.AllVsAll("s", np.arange(len(identity)), identity).materialise()
    scores = ev.cosine_similarity(embeddings[pairs.first], embeddings[pairs.second])
    nonmated = scores[~pairs.mated]
    assert data.n_nonmated == nonmated.size and data.nonmated_scores.size < nonmated.size
    assert data.threshold(1e-3) == pytest.approx(ev.threshold_at_fmr(nonmated, 1e-3), abs=1e-6)
    drawn = np.random.default_rng(0).integers(0, 3, 100).astype(float)
    weights = drawn[identity[pairs.first]] * drawn[identity[pairs.second]]
    assert data.threshold(1e-3, drawn) == pytest.approx(ev.threshold_at_fmr(nonmated, 1e-3, weights[~pairs.mated]),
                                                        abs=1e-6)


def test_expected_fnmr_never_rises_with_quality_and_quality_100_spans_the_set(fitted):
    _, calibration = fitted
    grid = np.linspace(-0.5, 1.5, 5001)  # beyond the knots too: clamped
    expected = calibration.expected_fnmr(grid)
    assert np.all(np.diff(expected) <= 1e-12)
    assert expected[0] == calibration.fnmr[0] and expected[-1] == calibration.fnmr[-1]
    scaled = calibration.quality_100(grid)
    assert np.all(np.diff(scaled) >= 0) and scaled.min() == 0 and scaled.max() == 100
    lower, upper = calibration.band(grid)
    assert np.all(np.diff(lower) <= 1e-12) and np.all(np.diff(upper) <= 1e-12)


def test_equal_scores_get_one_value_the_pooled_fnmr():
    """Images 0 and 1 share quality 0.5; image 0's comparison fails, image 1's matches: both get 0.5."""
    data = cal.CalibrationSet(
        quality=np.array([0.5, 0.5, 0.9, 0.1]), identity=np.array([0, 0, 1, 1]),
        mated_first=np.array([0, 1]), mated_second=np.array([3, 2]), mated_scores=np.array([0.1, 0.9]),
        nonmated_scores=np.linspace(-0.2, 0.3, 20000), nonmated_identities=np.zeros((2, 20000), np.int64) + [[0], [1]],
        n_nonmated=20000)
    calibration = cal.calibrate(data, cal.CalibrationOptions(fmr=1e-3, bootstrap=0, holdout=0))
    assert 0.1 < calibration.threshold < 0.9
    assert calibration.expected_fnmr(data.quality).tolist() == [0.5, 0.5, 0.0, 1.0]
    assert calibration.quality.tolist() == [0.1, 0.5, 0.9]  # one knot per tie group


def test_weighted_threshold_and_edc_equal_the_repeated_comparisons():
    rng = np.random.default_rng(2)
    scores, weights = rng.normal(size=3000), rng.integers(0, 4, 3000)
    repeated = np.repeat(scores, weights)
    assert ev.threshold_at_fmr(scores, 1e-2, weights) == ev.threshold_at_fmr(repeated, 1e-2)
    top = np.argsort(scores)[-500:]  # only the highest scores, with the total behind them
    assert ev.threshold_at_fmr(scores[top], 1e-2, weights[top], total=weights.sum()) == \
        ev.threshold_at_fmr(repeated, 1e-2)
    mated, quality = rng.normal(1, 1, 400), rng.integers(0, 50, 400).astype(float)
    w = rng.integers(0, 3, 400)
    weighted = ev.fnm_edc(mated, quality, 0.5, weights=w)
    plain = ev.fnm_edc(np.repeat(mated, w), np.repeat(quality, w), 0.5)
    np.testing.assert_allclose(weighted.fnmr, plain.fnmr)
    np.testing.assert_allclose(weighted.discard_fraction, plain.discard_fraction)


# ---------------------------------------------------------------------------------------- the threshold
def test_reject_threshold_reaches_the_target_with_intervals(fitted):
    data, calibration = fitted
    rec = calibration.info["recommendation"]
    assert rec["reachable"] and rec["fnmr"] <= 0.05
    kept = ev.pair_quality(data.quality[data.mated_first], data.quality[data.mated_second]) >= rec["quality"]
    assert ev.fnmr_at_threshold(data.mated_scores[kept], calibration.threshold) == pytest.approx(rec["fnmr"])
    assert rec["rejected_mated"] == pytest.approx(1 - kept.mean())
    assert rec["rejected_images"] == pytest.approx((data.quality < rec["quality"]).mean())
    for key in ("quality", "rejected_images", "rejected_mated"):
        low, high = rec[f"{key}_interval"]
        assert low <= rec[key] <= high and low < high
    # one tie group earlier the target is not reached (the lowest such quality)
    below = ev.pair_quality(data.quality[data.mated_first], data.quality[data.mated_second])
    previous = np.unique(below[below < rec["quality"]])[-1]
    assert ev.fnmr_at_threshold(data.mated_scores[below >= previous], calibration.threshold) > 0.05


def test_an_unreachable_target_is_said_so(fitted):
    data, _ = fitted
    hopeless = cal.CalibrationSet(**{**data.__dict__, "mated_scores": np.full(data.mated_scores.size, -1.0)})
    calibration = cal.calibrate(hopeless, cal.CalibrationOptions(bootstrap=3, holdout=0, target_fnmr=0.01))
    rec = calibration.info["recommendation"]
    assert rec["reachable"] is False and rec["best_fnmr"] == 1.0
    assert "unreachable" in cal.summary(calibration)


# ----------------------------------------------------------------------------------- refusals and format
def test_a_set_too_small_for_the_fmr_is_refused_with_the_number_needed(tmp_path, capsys):
    files = _files(tmp_path, identities=30)  # 120 images: 7140 - 180 = 6960 non-mated comparisons
    code = main(["calibrate", "--scores", str(files["scores"]), "--embeddings", str(files["emb"]), "--pairs",
                 str(files["ids"]), "--fmr", "1e-3", "-o", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and "6960 non-mated" in err and "at least 10000" in err
    assert not (tmp_path / "c.json").exists()
    assert cal.needed_nonmated(1e-4) == 100000


@pytest.mark.parametrize(("field", "value", "named"), [
    ("format_version", 99, "format_version"),
    ("fmr", 1.5, "fmr"),
    ("threshold", "high", "threshold"),
    ("mapping.expected_fnmr", "rising", "mapping.expected_fnmr must not increase"),
    ("mapping.quality", "unsorted", "mapping.quality must increase"),
    ("mapping.lower", "short", "mapping.lower has"),
    ("mapping.upper", None, "mapping.upper is missing"),
    ("fr_model", "arcface", "fr_model"),
])
def test_a_bad_calibration_file_names_the_field(fitted, tmp_path, field, value, named):
    data = fitted[1].to_dict()
    node, key = (data["mapping"], field.split(".")[1]) if "." in field else (data, field)
    if value == "rising":
        node[key] = sorted(node[key])
    elif value == "unsorted":
        node[key] = node[key][::-1]
    elif value == "short":
        node[key] = node[key][:-1]
    elif value is None:
        del node[key]
    else:
        node[key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        cal.load_calibration(path)


def test_the_file_round_trips(fitted, tmp_path):
    _, calibration = fitted
    calibration.save(tmp_path / "c.json")
    again = cal.load_calibration(tmp_path / "c.json")
    q = np.linspace(0, 1, 101)
    np.testing.assert_array_equal(again.expected_fnmr(q), calibration.expected_fnmr(q))
    np.testing.assert_array_equal(again.quality_100(q), calibration.quality_100(q))
    assert again.to_dict() == calibration.to_dict()
    assert again.to_dict()["quality_100"]["set_specific"] is True


# -------------------------------------------------------------------------------------- command line
def test_calibrate_command_writes_the_file_and_the_reliability_plot(tmp_path, capsys):
    files = _files(tmp_path)
    out = tmp_path / "calib.json"
    args = ["calibrate", "--scores", str(files["scores"]), "--embeddings", str(files["emb"]), "--pairs",
            str(files["ids"]), "--fmr", "1e-3", "--bootstrap", "30", "--target-fnmr", "0.05", "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out calibration error (ECE)" in printed and "reject threshold for FNMR <= 0.05" in printed
    data = json.loads(out.read_text())
    assert data["fmr"] == 1e-3 and data["fr_model"]["name"] == "emb" and data["dataset"] == "ids"
    assert data["counts"] == {"images": 600, "identities": 150, "mated": 900, "nonmated": 600 * 599 // 2 - 900}
    assert data["mapping"]["bootstrap_used"] == 30 and "ece" in data["reliability"]
    assert (tmp_path / "calib.reliability.png").stat().st_size > 0 and (tmp_path / "calib.reliability.svg").exists()
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never replaced without --overwrite
    assert main([*args, "--overwrite", "--no-plots"]) == 0


def test_a_pair_list_and_all_vs_all_give_the_same_calibration(tmp_path):
    files = _files(tmp_path, identities=60)
    paths = [row.split(",")[0] for row in files["ids"].read_text().splitlines()[1:]]
    identity = [p.split("/")[0] for p in paths]
    rows = [(a, b, int(identity[i] == identity[j])) for i, a in enumerate(paths) for j, b in enumerate(paths)
            if i < j]
    write_csv(tmp_path / "pairs.csv", ("a", "b", "genuine"), rows)
    outs = []
    for pairs in ("ids.csv", "pairs.csv"):
        out = tmp_path / f"{pairs}.json"
        assert main(["calibrate", "--scores", str(files["scores"]), "--embeddings", str(files["emb"]), "--pairs",
                     str(tmp_path / pairs), "--bootstrap", "5", "--no-plots", "-o", str(out)]) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["threshold"] == pytest.approx(outs[1]["threshold"])
    assert outs[0]["counts"] == outs[1]["counts"]  # identities found from the pair list: 60
    assert outs[0]["mapping"]["expected_fnmr"] == pytest.approx(outs[1]["mapping"]["expected_fnmr"])
    assert outs[0]["mapping"]["lower"] == pytest.approx(outs[1]["mapping"]["lower"])  # same identities drawn
    assert outs[0]["reliability"]["ece"] == pytest.approx(outs[1]["reliability"]["ece"])


# ----------------------------------------------------------------------------- score, checkpoint, ONNX
@pytest.fixture
def calib_file(fitted, tmp_path):
    path = tmp_path / "calib.json"
    fitted[1].save(path)
    return path


@pytest.fixture
def few_faces(tmp_path):
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _score(folder: Path, checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["score", str(folder), "--checkpoint", str(checkpoint), "-o", str(out), "--device", "cpu", *extra])


def _columns(path: Path) -> dict[str, list[str]]:
    lines = [line.split(",") for line in path.read_text().splitlines()]
    return {name: [row[i] for row in lines[1:]] for i, name in enumerate(lines[0])}


def test_score_adds_calibrated_columns_and_keeps_the_raw_score(tmp_path, few_faces, tiny_checkpoint, calib_file,
                                                               fitted):
    plain, calibrated = tmp_path / "plain.csv", tmp_path / "calibrated.csv"
    assert _score(few_faces, tiny_checkpoint, plain) == 0
    assert _score(few_faces, tiny_checkpoint, calibrated, "--calibration", str(calib_file)) == 0
    columns = _columns(calibrated)
    assert list(columns) == ["path", "quality", "expected_fnmr", "quality_100"]
    assert columns["quality"] == _columns(plain)["quality"]
    raw = read_labels(calibrated).qualities
    np.testing.assert_allclose([float(v) for v in columns["expected_fnmr"]], fitted[1].expected_fnmr(raw), rtol=1e-6)
    assert [int(v) for v in columns["quality_100"]] == fitted[1].quality_100(raw).tolist()
    jsonl = tmp_path / "s.jsonl"
    assert _score(few_faces, tiny_checkpoint, jsonl, "--calibration", str(calib_file)) == 0
    assert set(json.loads(jsonl.read_text().splitlines()[0])) == {"path", "quality", "expected_fnmr", "quality_100"}
    assert _score(few_faces, tiny_checkpoint, tmp_path / "s.pkl", "--calibration", str(calib_file)) == 2


def test_python_api_gives_the_same_columns(few_faces, tiny_model, calib_file, fitted):
    from aikd import score_images

    images = sorted(str(p) for p in few_faces.iterdir())
    scored = score_images(tiny_model, images, calibration=calib_file, device="cpu")
    assert set(scored) == {"quality", "expected_fnmr", "quality_100"}
    np.testing.assert_allclose(scored["expected_fnmr"], fitted[1].expected_fnmr(scored["quality"]))
    with pytest.raises(ValueError, match="carries no calibration"):
        score_images(tiny_model, images, calibration=True, device="cpu")


def test_a_calibrated_checkpoint_and_its_onnx_export_carry_the_calibration(tmp_path, few_faces, tiny_checkpoint,
                                                                            calib_file, capsys):
    from aikd.inference.onnx_format import read_metadata
    from aikd.models import load_quality_model

    calibrated = tmp_path / "best_calibrated.pt"
    assert main(["calibrate", "--calibration", str(calib_file), "--checkpoint", str(tiny_checkpoint), "--no-plots",
                 "-o", str(calibrated)]) == 0
    want = json.loads(calib_file.read_text())
    assert load_quality_model(calibrated).calibration == want
    assert load_quality_model(tiny_checkpoint).calibration is None
    by_file, by_checkpoint = tmp_path / "by_file.csv", tmp_path / "by_checkpoint.csv"
    assert _score(few_faces, tiny_checkpoint, by_file, "--calibration", str(calib_file)) == 0
    assert _score(few_faces, calibrated, by_checkpoint) == 0
    assert _columns(by_checkpoint) == _columns(by_file)
    onnx = tmp_path / "calibrated.onnx"
    assert main(["export", "--checkpoint", str(calibrated), "-o", str(onnx)]) == 0
    assert read_metadata(onnx)["calibration"] == want
    by_onnx = tmp_path / "by_onnx.csv"
    assert _score(few_faces, onnx, by_onnx) == 0
    got, expected = _columns(by_onnx), _columns(by_file)
    assert got["quality_100"] == expected["quality_100"]
    np.testing.assert_allclose([float(v) for v in got["expected_fnmr"]],
                               [float(v) for v in expected["expected_fnmr"]], atol=1e-5)
    plain_onnx = tmp_path / "plain.onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "-o", str(plain_onnx)]) == 0
    assert read_metadata(plain_onnx)["calibration"] is None


def test_a_calibration_of_another_model_warns(tmp_path, few_faces, tiny_checkpoint, tiny_model, calib_file, capsys):
    from aikd.models import weights_fingerprint

    data = json.loads(calib_file.read_text())
    data["quality_model"]["fingerprint"] = "someone-else"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert _score(few_faces, tiny_checkpoint, tmp_path / "a.csv", "--calibration", str(other)) == 0
    assert "another quality model" in capsys.readouterr().err
    data["quality_model"]["fingerprint"] = weights_fingerprint(tiny_model)
    other.write_text(json.dumps(data))
    assert _score(few_faces, tiny_checkpoint, tmp_path / "b.csv", "--calibration", str(other)) == 0
    assert "another quality model" not in capsys.readouterr().err
    assert main(["calibrate", "--calibration", str(calib_file), "--checkpoint", str(tiny_checkpoint), "--no-plots",
                 "-o", str(tmp_path / "c.pt")]) == 0
    assert "another quality model" not in capsys.readouterr().err  # the fitted calibration records no fingerprint


def test_scores_of_an_exported_graph_calibrate_its_checkpoint(tmp_path, few_faces, tiny_checkpoint, tiny_model,
                                                             calib_file, capsys):
    """The run record of ONNX scores names the torch weights the graph came from, so the calibration fitted on
    them belongs to that checkpoint too (it used to warn of "another quality model")."""
    pytest.importorskip("onnxruntime")
    from aikd.commands.calibrate import _quality_model
    from aikd.models import weights_fingerprint

    onnx = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "-o", str(onnx)]) == 0
    scores = tmp_path / "onnx_scores.csv"
    assert _score(few_faces, onnx, scores) == 0
    recorded = _quality_model(scores)
    assert recorded["fingerprint"].startswith("onnx:")
    assert recorded["weights_fingerprint"] == weights_fingerprint(tiny_model)
    data = json.loads(calib_file.read_text())
    data["quality_model"] = recorded
    from_onnx = tmp_path / "from_onnx.json"
    from_onnx.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["calibrate", "--calibration", str(from_onnx), "--checkpoint", str(tiny_checkpoint), "--no-plots",
                 "-o", str(tmp_path / "c.pt")]) == 0
    assert _score(few_faces, tiny_checkpoint, tmp_path / "t.csv", "--calibration", str(from_onnx)) == 0
    assert "another quality model" not in capsys.readouterr().err
    data["quality_model"]["weights_fingerprint"] = "someone-else"
    from_onnx.write_text(json.dumps(data))
    assert main(["calibrate", "--calibration", str(from_onnx), "--checkpoint", str(tiny_checkpoint), "--no-plots",
                 "-o", str(tmp_path / "d.pt")]) == 2
    assert "another quality model" in capsys.readouterr().err and not (tmp_path / "d.pt").exists()


def test_an_fr_model_other_than_the_calibrations_warns(tmp_path, few_faces, tiny_checkpoint, calib_file, capsys):
    assert _score(few_faces, tiny_checkpoint, tmp_path / "a.csv", "--calibration", str(calib_file),
                  "--fr-model", "adaface") == 0
    assert "FR model synthetic" in capsys.readouterr().err
    assert _score(few_faces, tiny_checkpoint, tmp_path / "b.csv", "--calibration", str(calib_file),
                  "--fr-model", "synthetic") == 0
    assert "FR model" not in capsys.readouterr().err
    data = json.loads(calib_file.read_text())
    data["fr_model"]["fingerprint"] = "arcface-weights"
    calibration = cal.load_calibration(data)
    emb = tmp_path / "adaface.npz"
    save_embeddings(emb, ["x"], np.ones((1, 4), np.float32))
    (tmp_path / "adaface.run.json").write_text(json.dumps({"command": "embed", "model": "adaface-weights"}))
    assert cal.check_fr_model(calibration, emb) is False
    (tmp_path / "adaface.run.json").write_text(json.dumps({"command": "embed", "model": "arcface-weights"}))
    assert cal.check_fr_model(calibration, emb) is True
