"""File formats: atomic writes, the restricted unpickler, landmark/label/embedding files."""

import os
import pickle

import numpy as np
import pytest

from aikd.io import (
    UnsafePickleError,
    atomic_write,
    load_embeddings,
    read_labels,
    read_landmarks,
    safe_pickle_loads,
    save_embeddings,
    write_csv,
)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("new, half written")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary file left behind


def test_atomic_write_replaces(tmp_path):
    target = tmp_path / "sub" / "out.csv"
    write_csv(target, ["path", "quality"], [["a.jpg", 0.5]])
    assert target.read_text().splitlines() == ["path,quality", "a.jpg,0.5"]


def test_safe_pickle_accepts_plain_data():
    data = {"a.jpg": (np.arange(4.0), np.ones((5, 2), np.float32)), "b": [1, 2.5, "x", None, {1, 2}]}
    for protocol in (2, 4, 5):
        loaded = safe_pickle_loads(pickle.dumps(data, protocol=protocol))
        np.testing.assert_array_equal(loaded["a.jpg"][1], data["a.jpg"][1])
        assert loaded["b"] == data["b"]


def test_safe_pickle_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"x": _Evil()})
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|refused"):
        safe_pickle_loads(payload)
    assert not marker.exists()


def test_safe_pickle_refuses_garbage():
    with pytest.raises(ValueError, match="not a readable pickle"):
        safe_pickle_loads(b"definitely not a pickle", source="x.pkl")


def test_read_landmarks_csv_and_pickle(tmp_path):
    points = np.random.default_rng(0).uniform(0, 100, (3, 5, 2)).astype(np.float32)
    names = ["a/1.jpg", "b/2.jpg", "c.png"]
    csv_path = tmp_path / "lm.csv"
    header = ["path"] + [f"{a}{i}" for i in range(1, 6) for a in "xy"] + ["confidence"]
    write_csv(csv_path, header, [[n, *p.ravel().tolist(), 0.9] for n, p in zip(names, points, strict=True)])
    table = read_landmarks(csv_path)
    assert list(table.paths) == names
    np.testing.assert_allclose(table.landmarks, points, rtol=1e-6)

    pkl = tmp_path / "lm.pkl"
    pkl.write_bytes(pickle.dumps({n: (np.array([1, 2, 3, 4, 0.9]), p) for n, p in zip(names, points, strict=True)}))
    np.testing.assert_allclose(read_landmarks(pkl).landmarks, points)


def test_read_landmarks_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,x1,y1\na.jpg,1,2\n")
    with pytest.raises(ValueError, match=r"bad.csv.*lacks column"):
        read_landmarks(bad)
    short = tmp_path / "short.csv"
    header = "path," + ",".join(f"{a}{i}" for i in range(1, 6) for a in "xy")
    short.write_text(header + "\na.jpg,1,2\n")
    with pytest.raises(ValueError, match=r"short.csv:2"):
        read_landmarks(short)
    with pytest.raises(ValueError, match="missing.csv"):
        read_landmarks(tmp_path / "missing.csv")


def test_read_labels_marks_unparsable_as_nan(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,quality\na.jpg,0.5\nb.jpg,oops\nc.jpg,nan\n")
    table = read_labels(path)
    assert table.paths == ["a.jpg", "b.jpg", "c.jpg"]
    assert table.qualities[0] == 0.5 and np.isnan(table.qualities[1:]).all()
    pkl = tmp_path / "labels.pkl"
    pkl.write_bytes(pickle.dumps({"a.jpg": np.float32(0.25), "b.jpg": 1}))
    assert read_labels(pkl).as_dict() == {"a.jpg": 0.25, "b.jpg": 1.0}


def test_embeddings_roundtrip(tmp_path):
    emb = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    save_embeddings(tmp_path / "e.npz", ["a", "b", "c", "d"], emb)
    paths, loaded = load_embeddings(tmp_path / "e.npz")
    assert paths == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(loaded, emb)
    with pytest.raises(ValueError, match="must be"):
        save_embeddings(tmp_path / "x.npz", ["a"], emb)


def test_atomic_write_gives_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_csv(tmp_path / "o.csv", ["a"], [[1]])
    finally:
        os.umask(mask)
    assert (tmp_path / "o.csv").stat().st_mode & 0o777 == 0o644
