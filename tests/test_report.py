"""``aikd evaluate`` end to end on synthetic embeddings, score files and protocols."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from aikd.cli import main
from aikd.io import save_embeddings, write_csv

PAUC_REQUIRED = {"method", "fmr", "threshold_mode", "discard_limit", "pauc", "pauc_normalised"}
ERC_REQUIRED = {"method", "fmr", "threshold_mode", "discard_fraction", "fnmr"}


def make_dataset(folder, seed=0, n_ids=40, per=6, dim=32, n_pairs=250):
    """LFW-style folders, embeddings whose noise grows as quality falls, three score files, pairs.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"Person_{i:03d}" for i in range(n_ids)]
    paths = [f"{name}/{name}_{k:04d}.jpg" for name in names for k in range(1, per + 1)]
    identity = np.repeat(np.arange(n_ids), per)
    quality = rng.random(len(paths))
    embeddings = rng.normal(size=(n_ids, dim))[identity]
    embeddings += rng.normal(size=(len(paths), dim)) * (0.5 + 1.5 * (1 - quality))[:, None]
    save_embeddings(folder / "emb.npz", paths, embeddings)
    write_csv(folder / "good.csv", ["path", "quality"], zip(paths, quality + rng.normal(0, 0.05, len(paths)),
                                                           strict=True))
    write_csv(folder / "inverted.csv", ["path", "quality"], zip(paths, -quality, strict=True))
    lines = [f"1\t{n_pairs}"]
    for _ in range(n_pairs):
        i, (a, b) = rng.integers(n_ids), rng.choice(per, 2, replace=False) + 1
        lines.append(f"{names[i]}\t{a}\t{b}")
    for _ in range(n_pairs):
        i, j = rng.choice(n_ids, 2, replace=False)
        lines.append(f"{names[i]}\t{rng.integers(per) + 1}\t{names[j]}\t{rng.integers(per) + 1}")
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    write_csv(folder / "ids.csv", ["path", "identity"], [(p, p.split("/")[0]) for p in paths])
    return folder


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lfw") / "lfw")


def test_evaluate_end_to_end(dataset, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["evaluate", "--scores", str(dataset / "good.csv"), str(dataset / "inverted.csv"),
                 "--embeddings", str(dataset / "emb.npz"), "--pairs", str(dataset / "pairs.txt"),
                 "--fmr", "1e-2", "1e-3", "--discard-limit", "0.2", "0.3", "-o", str(out)])
    assert code == 0
    erc, pauc = read_rows(out / "erc.csv"), read_rows(out / "pauc.csv")
    assert ERC_REQUIRED <= set(erc[0]) and PAUC_REQUIRED <= set(pauc[0])
    assert {r["method"] for r in erc} == {"good", "inverted"}
    assert {r["threshold_mode"] for r in pauc} == {"fixed", "recomputed"}
    assert len(pauc) == 2 * 2 * 2 * 2  # methods x fmrs x modes x limits
    value = {(r["method"], r["fmr"], r["threshold_mode"], r["discard_limit"]): float(r["pauc_normalised"])
             for r in pauc}
    for mode in ("fixed", "recomputed"):
        assert value["good", "0.01", mode, "0.3"] < 1 < value["inverted", "0.01", mode, "0.3"]
    for mode in ("fixed", "recomputed"):
        for ext in ("png", "svg"):
            plot = out / f"edc_lfw_emb_fmr0.01_{mode}.{ext}"
            assert plot.stat().st_size > 5000
    assert (out / "edc_lfw_emb_fmr0.01_fixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "edc_lfw_emb_fmr0.001_recomputed.svg").read_text()
    assert "good" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporary files


def test_oracle_needs_no_scores(dataset, tmp_path):
    out = tmp_path / "oracle"
    code = main(["evaluate", "--embeddings", str(dataset / "emb.npz"), "--pairs", str(dataset / "pairs.txt"),
                 "--oracle", "--threshold", "fixed", "--fmr", "1e-2", "--no-plots", "-o", str(out)])
    assert code == 0
    rows = read_rows(out / "pauc.csv")
    assert [r["method"] for r in rows] == ["oracle"]
    assert float(rows[0]["pauc_minus_oracle"]) == pytest.approx(0.0)
    assert float(rows[0]["pauc_normalised"]) < 1


def test_identity_protocol_end_to_end(dataset, tmp_path):
    out = tmp_path / "adience"
    code = main(["evaluate", "--scores", str(dataset / "good.csv"), "--embeddings", str(dataset / "emb.npz"),
                 "--pairs", str(dataset / "ids.csv"), "--dataset", "Adience", "--fr-model", "ArcFace",
                 "--no-plots", "-o", str(out)])
    assert code == 0
    rows = read_rows(out / "pauc.csv")
    n = 40 * 6
    assert {int(r["comparisons"]) for r in rows} == {n * (n - 1) // 2}
    assert {int(r["mated"]) for r in rows} == {40 * 15}
    assert {(r["fr_model"], r["dataset"]) for r in rows} == {("ArcFace", "Adience")}
    # no --pairs: all embedded images, identity from the parent folder -> the same numbers
    code = main(["evaluate", "--scores", str(dataset / "good.csv"), "--embeddings", str(dataset / "emb.npz"),
                 "--protocol", "identity", "--dataset", "Adience", "--fr-model", "ArcFace", "--no-plots",
                 "-o", str(tmp_path / "folders")])
    assert code == 0
    assert read_rows(tmp_path / "folders" / "pauc.csv") == rows


def test_suite_writes_paper_layout_tables(tmp_path):
    sets = {name: make_dataset(tmp_path / name, seed=s) for s, name in enumerate(["lfw", "cplfw"])}
    lines = ["fmr: [0.01]", "discard_limit: 0.3", "threshold: fixed", "models:"]
    for model in ("ArcFace", "AdaFace"):
        lines.append(f"  {model}:")
        for name in sets:
            lines += [f"    {name.upper()}:", f"      embeddings: {name}/emb.npz",
                      f"      pairs: {name}/pairs.txt",
                      f"      scores: {{AI-KD: {name}/good.csv, Inverted: {name}/inverted.csv}}"]
    (tmp_path / "suite.yaml").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    assert main(["evaluate", "--suite", str(tmp_path / "suite.yaml"), "-o", str(out)]) == 0
    table = read_rows(out / "table_ArcFace_fmr0.01_fixed_limit0.3.csv")
    assert [r["method"] for r in table] == ["AI-KD", "Inverted"]
    assert list(table[0]) == ["method", "LFW", "CPLFW", "mean"]
    pauc = {(r["fr_model"], r["dataset"], r["method"]): float(r["pauc_normalised"])
            for r in read_rows(out / "pauc.csv")}
    for row in table:
        values = [pauc["ArcFace", d, row["method"]] for d in ("LFW", "CPLFW")]
        assert float(row["LFW"]) == pytest.approx(values[0])
        assert float(row["mean"]) == pytest.approx(np.mean(values))
    markdown = (out / "tables.md").read_text()
    assert "## ArcFace: FMR 0.01" in markdown and "## AdaFace: FMR 0.01" in markdown
    assert "| method | LFW | CPLFW | mean |" in markdown and "| AI-KD | **" in markdown
    assert (out / "edc_CPLFW_AdaFace_fmr0.01_fixed.png").exists()


def test_suite_table_puts_every_fr_model_side_by_side_and_marks_same_and_cross_model(tmp_path):
    """The AI-KD tables: a column block (datasets + mean) per FR model; a method is same-model under its source."""
    for seed, name in enumerate(["lfw", "cplfw"]):
        make_dataset(tmp_path / name, seed=seed)
    lines = ["fmr: [0.01]", "discard_limit: 0.3", "threshold: fixed",
             "source: {AI-KD: CosFace, Inverted: AdaFace}", "models:"]
    for model, names in (("AdaFace", ["lfw", "cplfw"]), ("CosFace", ["cplfw"])):
        lines.append(f"  {model}:")
        for name in names:
            lines += [f"    {name.upper()}:", f"      embeddings: {name}/emb.npz", f"      pairs: {name}/pairs.txt",
                      f"      scores: {{AI-KD: {name}/good.csv, Inverted: {name}/inverted.csv}}"]
    (tmp_path / "suite.yaml").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    assert main(["evaluate", "--suite", str(tmp_path / "suite.yaml"), "--no-plots", "-o", str(out)]) == 0
    table = read_rows(out / "table_suite_fmr0.01_fixed_limit0.3.csv")
    assert list(table[0]) == ["method", "source", "AdaFace/LFW", "AdaFace/CPLFW", "AdaFace/mean", "CosFace/CPLFW",
                              "CosFace/mean"]
    assert [(r["method"], r["source"]) for r in table] == [("AI-KD", "CosFace"), ("Inverted", "AdaFace")]
    for model in ("AdaFace", "CosFace"):  # each block is that FR model's own table
        own = {r["method"]: r for r in read_rows(out / f"table_{model}_fmr0.01_fixed_limit0.3.csv")}
        for row in table:
            for column in own[row["method"]]:
                if column != "method":
                    assert float(row[f"{model}/{column}"]) == pytest.approx(float(own[row["method"]][column]))
    markdown = (out / "tables.md").read_text()
    section = markdown[markdown.index("## All FR models: FMR 0.01"):]
    assert "Column blocks: AdaFace (same- and cross-model), CosFace (same- and cross-model)." in section
    assert "| method | AdaFace: LFW | AdaFace: CPLFW | AdaFace: mean | CosFace: CPLFW | CosFace: mean |" in section
    ai_kd = next(line for line in section.splitlines() if line.startswith("| AI-KD [CosFace] |")).split(" | ")
    inverted = next(line for line in section.splitlines() if line.startswith("| Inverted [AdaFace] |")).split(" | ")
    def italic(text: str) -> bool:  # *x* or ***x*** (bold too); **x** is bold only
        return (len(text) - len(text.lstrip("*"))) % 2 == 1

    assert not italic(ai_kd[1]) and italic(ai_kd[4])  # cross-model under AdaFace, same-model under CosFace
    assert italic(inverted[1]) and not italic(inverted[4])


def test_suite_source_names_a_known_fr_model_and_method(tmp_path, capsys):
    make_dataset(tmp_path / "lfw")
    suite = ("source: {AI-KD: ArcFace}\nmodels:\n  CosFace:\n    LFW:\n      embeddings: lfw/emb.npz\n"
             "      pairs: lfw/pairs.txt\n      scores: {AI-KD: lfw/good.csv}\n")
    (tmp_path / "suite.yaml").write_text(suite)
    assert main(["evaluate", "--suite", str(tmp_path / "suite.yaml"), "-o", str(tmp_path / "o")]) == 2
    assert "source: 'ArcFace' (for AI-KD) is not an FR model of the suite; the suite has CosFace" in \
        capsys.readouterr().err


def test_suite_errors_name_the_key(tmp_path, capsys):
    (tmp_path / "suite.yaml").write_text("models:\n  ArcFace:\n    LFW:\n      embedings: x.npz\n")
    assert main(["evaluate", "--suite", str(tmp_path / "suite.yaml"), "-o", str(tmp_path / "o")]) == 2
    assert "models.ArcFace.LFW: unknown key(s) embedings" in capsys.readouterr().err


def test_images_missing_from_a_score_file_are_reported_and_excluded(dataset, tmp_path, caplog):
    rows = read_rows(dataset / "good.csv")
    partial = tmp_path / "partial.csv"
    write_csv(partial, ["path", "quality"], [(r["path"], r["quality"]) for r in rows[:-30]])
    out = tmp_path / "partial"
    with caplog.at_level(logging.WARNING):
        code = main(["evaluate", "--scores", str(partial), str(dataset / "good.csv"), "--embeddings",
                     str(dataset / "emb.npz"), "--pairs", str(dataset / "pairs.txt"), "--no-plots",
                     "-o", str(out)])
    assert code == 0
    assert "partial (" in caplog.text and "has no score for" in caplog.text
    assert any(r["path"] in caplog.text for r in rows[-30:])  # examples of the missing images
    assert "comparisons excluded" in caplog.text
    counts = {int(r["comparisons"]) for r in read_rows(out / "pauc.csv")}
    assert len(counts) == 1 and counts.pop() < 500  # both methods on the same, smaller set of pairs
    write_csv(partial, ["path", "quality"], [("nobody/x.jpg", 1.0)])
    code = main(["evaluate", "--scores", str(partial), "--embeddings", str(dataset / "emb.npz"),
                 "--pairs", str(dataset / "pairs.txt"), "--no-plots", "-o", str(out)])
    assert code == 2


def test_bad_protocol_lines_fail_with_line_numbers_unless_skipped(dataset, tmp_path, capsys, caplog):
    pairs = tmp_path / "pairs.txt"
    text = (dataset / "pairs.txt").read_text().splitlines()
    text[3] = "Person_001 1"
    text[7] = "Nobody 1 2"
    pairs.write_text("\n".join(text) + "\n")
    args = ["evaluate", "--scores", str(dataset / "good.csv"), "--embeddings", str(dataset / "emb.npz"),
            "--pairs", str(pairs), "--no-plots", "-o", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("aikd evaluate: error:") and "line 4: expected 3 tokens" in err
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--skip-bad-pairs"]) == 0
    assert "line 4" in caplog.text
    assert "line 8: image 'Nobody/Nobody_0001.jpg' is not in the embeddings" in caplog.text


@pytest.mark.parametrize(("extra", "message"), [
    (["--names", "a", "b"], "2 names for 1 score files"),
    (["--fmr", "2"], "--fmr must be between 0 and 1"),
    (["--discard-limit", "0.99"], "--discard-limit must be in (0, 0.95]"),
    (["--protocol", "calfw"], "bad line(s)"),
])
def test_usage_errors_are_one_line(dataset, tmp_path, capsys, extra, message):
    args = ["evaluate", "--scores", str(dataset / "good.csv"), "--embeddings", str(dataset / "emb.npz"),
            "--pairs", str(dataset / "pairs.txt"), "--no-plots", "-o", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bin_protocol_end_to_end(tmp_path):
    """Embeddings named like iter_bin_images names the images of a .bin (lfw.bin#000123)."""
    import pickle

    rng = np.random.default_rng(4)
    n_pairs = 200
    issame = rng.random(n_pairs) < 0.5
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps(([b"not decoded here"] * (2 * n_pairs), issame.tolist())))
    names = [f"lfw.bin#{i:06d}" for i in range(2 * n_pairs)]
    quality = rng.random(2 * n_pairs)
    base = rng.normal(size=(n_pairs, 16))
    partner = np.where(issame[:, None], base, rng.normal(size=(n_pairs, 16)))
    embeddings = np.stack([base, partner], axis=1).reshape(-1, 16)
    embeddings += rng.normal(size=embeddings.shape) * (0.3 + 1.5 * (1 - quality))[:, None]
    save_embeddings(tmp_path / "emb.npz", names, embeddings)
    write_csv(tmp_path / "q.csv", ["path", "quality"], zip(names, quality, strict=True))
    out = tmp_path / "o"
    code = main(["evaluate", "--scores", str(tmp_path / "q.csv"), "--embeddings", str(tmp_path / "emb.npz"),
                 "--pairs", str(tmp_path / "lfw.bin"), "--fmr", "0.05", "--no-plots", "-o", str(out)])
    assert code == 0
    rows = read_rows(out / "pauc.csv")
    assert {r["dataset"] for r in rows} == {"lfw"} and {int(r["mated"]) for r in rows} == {int(issame.sum())}
    assert all(float(r["pauc_normalised"]) < 1 for r in rows)
