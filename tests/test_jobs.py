"""The batch job runner: order, errors file, journal, resume."""

import json

import numpy as np
import pytest
from PIL import Image

from aikd.images import collect_inputs
from aikd.io import write_csv
from aikd.pipeline.jobs import ItemResult, finish_job, read_journal, run_job
from aikd.pipeline.outputs import check_output, errors_path, journal_dir


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(7):
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(root / f"{i}.png")
    (root / "bad.png").write_bytes(b"")
    return root


def _mean_batch(images, items):
    return [ItemResult(rows=[[float(im.mean())]], vector=np.full(3, im.mean(), np.float32)) for im in images]


def _write(out):
    def write(good):
        write_csv(out, ["path", "value"], [[item.key, res.rows[0][0]] for item, res in good])
    return write


@pytest.mark.parametrize("workers", [0, 2])
def test_run_and_finish(tmp_path, folder, workers):
    items = collect_inputs([folder])
    out = tmp_path / "out.csv"
    check_output(out, resume=False, overwrite=False)
    results = run_job(items, _mean_batch, out, batch_size=3, workers=workers)
    assert journal_dir(out).is_dir()
    summary = finish_job(items, results, out, _write(out))
    assert summary.done == 7 and summary.failed == 1 and summary.exit_code == 1
    lines = out.read_text().splitlines()
    assert lines[0] == "path,value" and [line.split(",")[0] for line in lines[1:]] == [f"{i}.png" for i in range(7)]
    assert errors_path(out).read_text().splitlines()[1].startswith("bad.png,empty file")
    assert not journal_dir(out).exists()
    with pytest.raises(ValueError, match="--resume"):
        check_output(out, resume=False, overwrite=False)


def test_resume_skips_done_and_survives_torn_line(tmp_path, folder):
    items = collect_inputs([folder])
    out = tmp_path / "out.csv"
    calls = []

    def counting(images, batch_items):
        calls.extend(i.key for i in batch_items)
        return _mean_batch(images, batch_items)

    run_job(items[:4], counting, out, batch_size=2, workers=0)
    with open(journal_dir(out) / "rank0.jsonl", "a") as handle:
        handle.write('{"k": "4.png", "r": [[1')  # killed mid-write
    calls.clear()
    results = run_job(items, counting, out, batch_size=2, workers=0, resume=True)
    assert sorted(calls) == ["4.png", "5.png", "6.png"]
    assert len(read_journal(out)) == 8
    np.testing.assert_allclose(results["6.png"].vector, 60.0)
    assert finish_job(items, results, out, _write(out)).done == 7


def test_process_batch_count_mismatch_is_a_bug(tmp_path, folder):
    with pytest.raises(RuntimeError, match="results for"):
        run_job(collect_inputs([folder]), lambda images, items: [], tmp_path / "o.csv", workers=0)


def test_provenance_settings_do_not_decide_the_same_job(tmp_path):
    """``weights`` (an ONNX graph's source weights) follows from ``model``: a journal recorded without it resumes,
    while a different model is still refused."""
    from aikd.pipeline.outputs import check_same_job, journal_dir, settings_path

    out = tmp_path / "s.csv"
    journal_dir(out).mkdir(parents=True)
    settings_path(out).write_text(json.dumps({"command": "score", "model": "onnx:aa"}), encoding="utf-8")
    check_same_job(out, {"command": "score", "model": "onnx:aa", "weights": "bb"})
    with pytest.raises(ValueError, match="model = 'onnx:aa', this run has model = 'onnx:cc'"):
        check_same_job(out, {"command": "score", "model": "onnx:cc", "weights": "bb"})
