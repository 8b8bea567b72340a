"""Memory flat in the number of images: inputs kept on disk, results merged from the journal, files written as they
come, with every output byte for byte what it was when everything was held in memory."""

from __future__ import annotations

import gc
import pickle
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aikd.cli import main
from aikd.images import ImageInput, InputList, collect_inputs
from aikd.io import EmbeddingWriter, RecordFile, load_embeddings, save_embeddings, write_quality_rows
from aikd.pipeline.jobs import ItemResult, finish_job, read_journal
from aikd.pipeline.journal import Journal, Results, write_previous
from aikd.pipeline.outputs import errors_path, journal_dir


def test_record_file_reads_in_order_by_position_and_from_several_readers():
    records = RecordFile(3)
    for i in range(3000):
        records.append((f"p{i}", f"key\n{i}\t", "" if i % 2 else "x"))
    assert len(records) == 3000
    both = zip(records, records.records(1), strict=False)  # two readers at once
    assert all(a[1] == f"key\n{i}\t" and b[0] == f"p{i + 1}" for i, (a, b) in enumerate(both))
    assert records[2049] == ("p2049", "key\n2049\t", "") and records[-1][0] == "p2999"
    with pytest.raises(ValueError, match="NUL"):
        records.append(("a\0b", "", ""))
    with pytest.raises(IndexError):
        records[3000]


def test_input_list_is_a_sequence_of_image_inputs(tmp_path):
    given = [ImageInput(tmp_path / f"{i}.png", f"k{i}", i if i % 3 == 0 else None, "bad" if i == 5 else None)
             for i in range(2100)]
    items = InputList(given)
    assert len(items) == 2100 and list(items) == given
    assert items[5] == given[5] and items[-1] == given[-1] and items[1024:1027] == given[1024:1027]
    assert list(items.keys())[:3] == ["k0", "k1", "k2"]
    assert list(pickle.loads(pickle.dumps(items))) == given
    # read from several threads at once, the first reads included (a server's threads; decode threads)
    from concurrent.futures import ThreadPoolExecutor

    fresh = InputList(given)
    with ThreadPoolExecutor(8) as pool:
        assert all(seen == given for seen in pool.map(lambda _: list(fresh), range(8)))
    assert len(fresh) == 2100 and list(fresh) == given


def test_listing_memory_does_not_grow_with_the_images(tmp_path):
    """Listing 20,000 files holds no Python object per file (8 bytes each while listing, then nothing)."""
    source = tmp_path / "one.jpg"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(source)
    peaks = {}
    for count in (1000, 20000):
        folder = tmp_path / f"f{count}"
        for i in range(count):
            if i % 1000 == 0:
                (folder / f"d{i // 1000:02d}").mkdir(parents=True)
            (folder / f"d{i // 1000:02d}" / f"{i:05d}.jpg").hardlink_to(source)
        tracemalloc.start()
        items = collect_inputs([folder])
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(items) == count and items[count - 1].key == f"d{(count - 1) // 1000:02d}/{count - 1:05d}.jpg"
    assert peaks[20000] - peaks[1000] < 19000 * 40, peaks  # a list of ImageInput: ~500 bytes each


def _keys(count: int) -> list[str]:
    return [f"d{i // 1000:04d}/{i:06d}.jpg" for i in range(count)]


def test_a_landmarks_file_costs_no_object_per_image(tmp_path):
    """aikd score/align --landmarks over a run's inputs: the landmarks held by key in ~60 bytes an image (a dict of
    arrays by key held ~280), still found by the name policy (a file naming them under a root folder), and the
    inputs it has none for said."""
    from aikd.align import ARCFACE_TEMPLATE
    from aikd.io import write_csv
    from aikd.pipeline.crops import CropOptions, FaceCropper

    held = {}
    for count in (2000, 40000):
        keys = _keys(count)
        landmarks = tmp_path / f"lm{count}.csv"
        write_csv(landmarks, ["path", *(f"{a}{i}" for i in range(1, 6) for a in "xy")],
                  ([f"root/{key}", *(ARCFACE_TEMPLATE + i % 7).ravel().tolist()] for i, key in enumerate(keys)
                   if i % 10))  # every tenth image has none
        items = InputList(ImageInput(Path("/faces") / key, key) for key in keys)
        gc.collect()
        tracemalloc.start()
        cropper = FaceCropper(CropOptions(landmarks=landmarks), None, items)
        held[count] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        np.testing.assert_array_equal(cropper._landmarks_of(keys[13]), ARCFACE_TEMPLATE + 13 % 7)
        with pytest.raises(ValueError, match="no landmarks for this image"):
            cropper._landmarks_of(keys[20])
        assert cropper._inputs.missing.tolist() == list(range(0, count, 10))
    assert held[40000] - held[2000] < 38000 * 100, held


def test_input_landmarks_whose_digests_collide_are_found_by_their_keys(monkeypatch):
    from aikd import images

    monkeypatch.setattr(images, "_key_digest", lambda key: 7)  # every key the same 64 bits
    keys = _keys(50)
    points = np.arange(50 * 10, dtype=np.float32).reshape(50, 5, 2)
    table = images.InputLandmarks([ImageInput(Path(key), key) for key in keys], np.array(keys[::-1]), points[::-1])
    for i in (0, 17, 49):
        np.testing.assert_array_equal(table.find(keys[i]), points[i])


def test_embedding_writer_writes_what_save_embeddings_writes(tmp_path):
    keys = ["a.jpg", "sub/b\u00e9.png", "bad_\udcff.png", "x" * 40, "\U0001f600.png"]
    vectors = np.random.default_rng(0).standard_normal((5, 9)).astype(np.float32)
    for count in (5, 0):
        save_embeddings(tmp_path / "whole.npz", keys[:count], vectors[:count])
        with EmbeddingWriter(tmp_path / "streamed.npz", 9) as writer:
            for key, vector in zip(keys[:count], vectors[:count], strict=True):
                writer.add(key, vector)
        whole, streamed = zipfile.ZipFile(tmp_path / "whole.npz"), zipfile.ZipFile(tmp_path / "streamed.npz")
        assert whole.namelist() == streamed.namelist() == ["paths.npy", "embeddings.npy"]
        for name in whole.namelist():
            assert whole.read(name) == streamed.read(name), name
        assert load_embeddings(tmp_path / "streamed.npz")[0] == keys[:count]
    with pytest.raises(RuntimeError), EmbeddingWriter(tmp_path / "streamed.npz", 9) as writer:
        writer.add("c", vectors[0])
        raise RuntimeError("stopped")
    assert load_embeddings(tmp_path / "streamed.npz")[0] == []  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.npz", "whole.npz"]


def _journal(out: Path, records: list[tuple[str, ItemResult]], rank: int = 0) -> None:
    journal = Journal(out, rank)
    journal.append(records)
    journal.close()


def _result(value: float, error: str | None = None) -> ItemResult:
    if error:
        return ItemResult(error=error)
    return ItemResult(rows=[[value]], vector=np.full(3, value, np.float32))


def test_a_fresh_journal_is_merged_as_it_is_read(tmp_path):
    out = tmp_path / "o.csv"
    items = InputList(ImageInput(tmp_path / f"{i}.png", f"{i}.png") for i in range(7))
    for rank in range(2):  # two ranks: item i in rank i % 2
        _journal(out, [(f"{i}.png", _result(i)) for i in range(rank, 7, 2)], rank)
    results = read_journal(out)
    merged = list(results.ordered(items))
    assert [item.key for item, _ in merged] == [f"{i}.png" for i in range(7)]
    assert [result.rows[0][0] for _, result in merged] == list(range(7))
    np.testing.assert_array_equal(merged[6][1].vector, 6.0)
    assert results._index is None and list(results.others()) == []  # no index was needed


def test_a_resumed_journal_keeps_the_last_success_and_what_was_done_before(tmp_path):
    out = tmp_path / "o.csv"
    items = InputList(ImageInput(tmp_path / f"{i}.png", f"{i}.png") for i in range(4))
    journal_dir(out).mkdir()
    write_previous(out, 0, {"old.png": _result(9), "3.png": _result(33)})
    _journal(out, [("0.png", _result(0)), ("1.png", _result(0, "unreadable")), ("2.png", _result(2))])
    _journal(out, [("1.png", _result(1)), ("2.png", _result(0, "later failure"))])
    with open(journal_dir(out) / "rank0.jsonl", "a") as handle:
        handle.write('{"k": "4.png", "r": [[1')  # killed mid-write
    results = Results(out, previous="previous0")
    assert results.status("1.png") == "done" and results.status("4.png") is None
    merged = {item.key: result for item, result in results.ordered(items)}
    assert {key: r.rows[0][0] for key, r in merged.items()} == {"0.png": 0, "1.png": 1, "2.png": 2, "3.png": 33}
    assert [key for key, _ in results.others()] == ["old.png"]
    assert set(results) == {"old.png", "3.png", "0.png", "1.png", "2.png"} and len(results) == 5
    results["5.png"] = _result(5)  # a value set (a pass over the whole set) wins and is listed
    assert results["5.png"].rows == [[5]] and "5.png" in results and len(results) == 6


def test_finish_job_streams_the_results_from_disk(tmp_path):
    """The writer gets the results one by one as they are read back, and no more than a handful are alive at once
    (a count of objects, not of bytes: the allocator's peaks are not the pipeline's)."""
    count = 20000
    out = tmp_path / "o.csv"
    items = InputList(ImageInput(tmp_path / f"{i}.png", f"{i:06d}.png") for i in range(count))
    for start in range(0, count, 500):
        _journal(out, [(f"{i:06d}.png", _result(i / 7, "bad" if i % 100 == 0 else None))
                       for i in range(start, start + 500)])
    alive = []

    def rows(good):
        for n, (item, result) in enumerate(good):
            if n % 4000 == 0:
                gc.collect()
                alive.append(sum(type(o) in (ItemResult, ImageInput) for o in gc.get_objects()))
            yield item.key, result.rows[0][0], None

    def write(good):
        assert not isinstance(good, list)
        write_quality_rows(out, rows(good))

    summary = finish_job(items, read_journal(out), out, write)
    assert summary.done == count - count // 100 and summary.failed == count // 100
    assert len(errors_path(out).read_text().splitlines()) == 1 + count // 100
    assert len(alive) == 5 and max(alive) < 50, alive


def _faces(folder: Path, count: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "pickle"])
def test_resuming_a_finished_run_rewrites_the_same_bytes(tmp_path, tiny_checkpoint, fmt):
    """The merge from an earlier output (an index over the journal) writes what the in-order merge of a fresh run
    wrote, in every format and for the embeddings."""
    _faces(tmp_path / "faces", 11)
    out, emb = tmp_path / f"s.{'pkl' if fmt == 'pickle' else fmt}", tmp_path / "e.npz"
    command = ["score", str(tmp_path / "faces"), "--checkpoint", str(tiny_checkpoint), "-o", str(out),
               "--embeddings", str(emb), "--device", "cpu", "--batch-size", "4", "--workers", "0"]
    assert main(command) == 0
    first, first_embeddings = out.read_bytes(), zipfile.ZipFile(emb).read("embeddings.npy")
    (tmp_path / "faces" / "03.png").unlink()  # not given again: kept, after the others
    assert main([*command, "--resume"]) == 0
    keys = [f"{i:02d}.png" for i in range(11) if i != 3] + ["03.png"]
    assert load_embeddings(emb)[0] == keys
    (tmp_path / "faces" / "03.png").write_bytes(b"")  # given again, now unreadable: the earlier score is kept
    assert main([*command, "--resume"]) == 0
    assert out.read_bytes() == first and zipfile.ZipFile(emb).read("embeddings.npy") == first_embeddings


def _index_files(folder: Path, count: int, order: np.ndarray | None = None) -> tuple[Path, Path]:
    """Landmarks and labels CSVs naming ``count`` faces of 300 per identity (in ``order``; default sorted)."""
    rng = np.random.default_rng(count)
    names = [f"n{i // 300:06d}/{i % 300:04d}_01.jpg" for i in range(count)]
    points = (np.tile(np.array([38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2]), (count, 1))
              + rng.uniform(-2, 2, (count, 10)))
    header = "path," + ",".join(f"{axis}{i}" for i in range(1, 6) for axis in "xy") + "\n"
    order = range(count) if order is None else order
    folder.mkdir()
    with open(folder / "lm.csv", "w") as handle:
        handle.write(header + "".join(f"{names[i]},{','.join(f'{v:.2f}' for v in points[i])}\n" for i in order))
    with open(folder / "lb.csv", "w") as handle:
        handle.write("path,quality\n" + "".join(f"{names[i]},{i / count:.6f}\n" for i in order))
    return folder / "lm.csv", folder / "lb.csv"


def test_the_training_index_holds_a_few_hundred_bytes_a_face(tmp_path):
    """Joining 50,000 then 200,000 faces: the peak grows by under 300 bytes a face (the arrays kept: ~124); a file
    in another order gives the same index."""
    from aikd.training.data import read_index

    peaks = {}
    for count in (50_000, 200_000):
        landmarks, labels = _index_files(tmp_path / str(count), count)
        tracemalloc.start()
        index = read_index(tmp_path, landmarks, labels, check_images=False)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        kept = index.names.nbytes + index.landmarks.nbytes + index.labels.nbytes
        assert len(index) == count and kept / count < 140
    assert (peaks[200_000] - peaks[50_000]) / 150_000 < 300, peaks
    landmarks, labels = _index_files(tmp_path / "shuffled", 50_000, np.random.default_rng(1).permutation(50_000))
    other = read_index(tmp_path, landmarks, labels, check_images=False)
    sorted_index = read_index(tmp_path, tmp_path / "50000" / "lm.csv", tmp_path / "50000" / "lb.csv",
                              check_images=False)
    assert other.fingerprint() == sorted_index.fingerprint()
    np.testing.assert_array_equal(other.labels, sorted_index.labels)
