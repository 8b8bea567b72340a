"""Protocol readers on small files in the real formats, bad-line reports, name resolution, .bin safety."""

from __future__ import annotations

import logging
import pickle

import cv2
import numpy as np
import pytest

from aikd.evaluation import protocols as pr

LFW_PAIRS = """2\t2
Abel_Pacheco\t1\t4
Akhmed_Zakayev\t1\t3
Abdel_Madi_Shabneh\t1\tDean_Barker\t1
Abdel_Madi_Shabneh\t1\tGiancarlo_Fisichella\t1

Abdullah\t1\t3
Abdul_Majeed_Shobokshi\t1\tCharles_Cope\t1
"""


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ LFW
def test_lfw_pairs_in_the_real_format(tmp_path):
    pairs = pr.read_lfw_pairs(write(tmp_path / "pairs.txt", LFW_PAIRS))
    assert len(pairs) == 6
    assert pairs.first[0] == "Abel_Pacheco/Abel_Pacheco_0001.jpg"
    assert pairs.second[0] == "Abel_Pacheco/Abel_Pacheco_0004.jpg"
    assert pairs.second[2] == "Dean_Barker/Dean_Barker_0001.jpg"
    assert pairs.mated.tolist() == [True, True, False, False, True, False]
    assert pairs.lines.tolist() == [2, 3, 4, 5, 7, 8]  # header on line 1, blank line 6


def test_lfw_pattern_is_configurable_and_checked(tmp_path):
    path = write(tmp_path / "pairs.txt", "Abel_Pacheco 1 4\n")
    pairs = pr.read_lfw_pairs(path, pattern="{name}_{n:04d}.png")
    assert pairs.first == ["Abel_Pacheco_0001.png"]
    with pytest.raises(ValueError, match="pattern"):
        pr.read_lfw_pairs(path, pattern="{person}/{n}.jpg")


def test_lfw_bad_lines_are_reported_with_line_numbers(tmp_path, caplog):
    text = "10\t300\nAbel_Pacheco 1 4\nAbel_Pacheco 1 4 5 6\nA 1 B 2\nA one 2\nA 1\n"
    path = write(tmp_path / "pairs.txt", text)
    with pytest.raises(ValueError) as err:
        pr.read_lfw_pairs(path)
    message = str(err.value)
    assert "3 bad line(s)" in message and "pairs.txt" in message
    assert "line 3: expected 3 tokens" in message and "found 5" in message
    assert "line 5: image number 'one'" in message and "line 6:" in message
    with caplog.at_level(logging.WARNING, logger="aikd.evaluation.protocols"):
        pairs = pr.read_lfw_pairs(path, strict=False)
    assert len(pairs) == 2 and pairs.lines.tolist() == [2, 4]
    assert "line 3" in caplog.text and "skipped" in caplog.text


def test_many_bad_lines_show_the_first_few_and_the_count(tmp_path):
    path = write(tmp_path / "pairs.txt", "".join(f"bad line {i} x y\n" for i in range(12)))
    with pytest.raises(ValueError, match=r"12 bad line\(s\) \(first 5 shown\)") as err:
        pr.read_lfw_pairs(path)
    assert "line 5:" in str(err.value) and "line 6:" not in str(err.value)


# ---------------------------------------------------------------------------------------------- CALFW
CALFW_PAIRS = """Abel_Pacheco_0001.jpg 1
Abel_Pacheco_0004.jpg 1
Abdel_Madi_Shabneh_0001.jpg 0
Dean_Barker_0001.jpg 0
Akhmed_Zakayev_0001.jpg 2
Akhmed_Zakayev_0003.jpg 2
"""


def test_calfw_pairs_in_the_real_format(tmp_path):
    pairs = pr.read_calfw_pairs(write(tmp_path / "pairs_CALFW.txt", CALFW_PAIRS))
    assert pairs.first == ["Abel_Pacheco_0001.jpg", "Abdel_Madi_Shabneh_0001.jpg", "Akhmed_Zakayev_0001.jpg"]
    assert pairs.second[1] == "Dean_Barker_0001.jpg"
    assert pairs.mated.tolist() == [True, False, True]  # any non-zero label is mated
    assert pairs.lines.tolist() == [1, 3, 5]


def test_calfw_bad_lines(tmp_path):
    text = "a.jpg 1\nb.jpg 0\nc.jpg x\nd.jpg 1\ne.jpg 1 extra\nf.jpg 1\ng.jpg 1\n"
    path = write(tmp_path / "pairs_CPLFW.txt", text)
    with pytest.raises(ValueError) as err:
        pr.read_calfw_pairs(path)
    message = str(err.value)
    assert "line 1: labels disagree" in message
    assert "line 3: label 'x'" in message
    assert "line 5: expected 2 tokens" in message
    assert "line 7: unpaired line" in message  # the missing second image of the last pair


# ------------------------------------------------------------------------------------------------ CSV
def test_csv_pairs_and_bad_labels(tmp_path):
    path = write(tmp_path / "pairs.csv", "a,b,genuine\nx/1.jpg,x/2.jpg,1\nx/1.jpg,y/1.jpg,false\n"
                                         "x/1.jpg,y/2.jpg,maybe\nx/2.jpg,y/2.jpg\n")
    with pytest.raises(ValueError) as err:
        pr.read_csv_pairs(path)
    assert "line 4: genuine must be 1/0" in str(err.value) and "line 5: expected 3 columns" in str(err.value)
    pairs = pr.read_csv_pairs(path, strict=False)
    assert pairs.first == ["x/1.jpg", "x/1.jpg"] and pairs.mated.tolist() == [True, False]


# -------------------------------------------------------------------------------------------- identity
def test_identity_csv_and_path_list(tmp_path):
    csv_path = write(tmp_path / "ids.csv", "path,identity,age\nf/1.jpg,7,20\nf/2.jpg,7,30\nf/3.jpg,9,40\n")
    listed = pr.read_identity_list(csv_path)
    assert listed.names == ["f/1.jpg", "f/2.jpg", "f/3.jpg"] and listed.identities == ["7", "7", "9"]
    by_age = pr.read_identity_list(csv_path, identity_column="age")
    assert by_age.identities == ["20", "30", "40"]
    txt = write(tmp_path / "images.txt", "alice/1.jpg\nalice/2.jpg\n\nbob\\1.jpg\n")
    listed = pr.read_identity_list(txt)
    assert listed.identities == ["alice", "alice", "bob"] and listed.lines.tolist() == [1, 2, 4]
    with pytest.raises(ValueError, match="line 2: 'orphan.jpg' has no parent folder"):
        pr.read_identity_list(write(tmp_path / "bad.txt", "alice/1.jpg\norphan.jpg\n"))


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_all_vs_all_pairs_come_in_chunks_and_cover_every_pair_once(chunk):
    rows = np.array([10, 11, 12, 13, 14, 15, 16])
    identity = np.array([0, 0, 1, 1, 1, 2, 0])
    protocol = pr.AllVsAll("x", rows, identity)
    parts = list(protocol.iter_pairs(chunk_pairs=chunk))
    first, second, mated = (np.concatenate([p[k] for p in parts]) for k in range(3))
    expected = [(rows[i], rows[j], identity[i] == identity[j]) for i in range(7) for j in range(i + 1, 7)]
    assert list(zip(first.tolist(), second.tolist(), mated.tolist(), strict=True)) == expected
    assert len(protocol) == 21
    if chunk == 7:
        assert max(len(p[0]) for p in parts) <= 7 and len(parts) > 2


# ------------------------------------------------------------------------------------------------ .bin
def _encoded(seed):
    image = np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes(), image


@pytest.mark.parametrize("protocol", [2, 4])
def test_bin_pairs_and_images(tmp_path, protocol):
    encoded = [_encoded(i) for i in range(6)]
    path = tmp_path / "lfw.bin"
    issame = np.array([True, False, True])
    path.write_bytes(pickle.dumps(([e[0] for e in encoded], issame), protocol=protocol))
    pairs = pr.read_bin_pairs(path)
    assert pairs.first == ["lfw.bin#000000", "lfw.bin#000002", "lfw.bin#000004"]
    assert pairs.second[2] == "lfw.bin#000005" and pairs.mated.tolist() == [True, False, True]
    decoded = list(pr.iter_bin_images(path))
    assert [name for name, _ in decoded][:2] == ["lfw.bin#000000", "lfw.bin#000001"]
    assert np.array_equal(decoded[3][1], encoded[3][1])  # PNG is lossless: the same pixels come back


def test_bin_with_wrong_pair_count(tmp_path):
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps(([_encoded(0)[0]] * 3, [True, False])))
    with pytest.raises(ValueError, match="3 images for 2 pairs"):
        pr.read_bin_pairs(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_bin_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(marker)], [True])))
    with pytest.raises(ValueError, match="refused to load"):
        pr.read_bin_pairs(path)
    with pytest.raises(ValueError, match="refused"):
        pr.read_protocol(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ detection
def test_detect_protocol(tmp_path):
    assert pr.detect_protocol(write(tmp_path / "pairs.txt", LFW_PAIRS)) == "lfw"
    assert pr.detect_protocol(write(tmp_path / "headerless.txt", "A 1 2\nA 1 B 2\n")) == "lfw"
    assert pr.detect_protocol(write(tmp_path / "pairs_CALFW.txt", CALFW_PAIRS)) == "calfw"
    assert pr.detect_protocol(write(tmp_path / "p.csv", "a,b,genuine\nx,y,1\n")) == "csv"
    assert pr.detect_protocol(write(tmp_path / "i.csv", "path,identity\nx/1.jpg,3\n")) == "identity"
    assert pr.detect_protocol(write(tmp_path / "list.txt", "a/1.jpg\na/2.jpg\n")) == "identity"
    assert pr.detect_protocol(tmp_path / "agedb_30.bin") == "bin"
    with pytest.raises(ValueError, match="cannot tell which protocol.*--protocol"):
        pr.detect_protocol(write(tmp_path / "odd.txt", "a b c d e\n"))
    with pytest.raises(ValueError, match="cannot tell the protocol from the header"):
        pr.detect_protocol(write(tmp_path / "odd.csv", "x,y\n1,2\n"))
    with pytest.raises(FileNotFoundError):
        pr.read_protocol(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------ resolving
def test_resolve_reports_unknown_names_with_line_numbers(tmp_path, caplog):
    pairs = pr.read_lfw_pairs(write(tmp_path / "pairs.txt", LFW_PAIRS))
    known = sorted(set(pairs.first + pairs.second) - {"Dean_Barker/Dean_Barker_0001.jpg",
                                                     "Abdullah/Abdullah_0003.jpg"})
    with pytest.raises(ValueError) as err:
        pr.resolve(pairs, known)
    assert "2 pair(s) naming images without an embedding" in str(err.value)
    assert "line 4: image 'Dean_Barker/Dean_Barker_0001.jpg'" in str(err.value)
    assert "line 7:" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="aikd.evaluation.protocols"):
        resolved = pr.resolve(pairs, known, strict=False)
    assert len(resolved) == 4 and resolved.lines.tolist() == [2, 3, 5, 8]
    assert [known[i] for i in resolved.first[:1]] == ["Abel_Pacheco/Abel_Pacheco_0001.jpg"]
    assert "line 7" in caplog.text
    with pytest.raises(ValueError, match="no pair left"):
        pr.resolve(pairs, ["unrelated.jpg"], strict=False)


def test_resolve_identity_list(tmp_path):
    listed = pr.read_identity_list(write(tmp_path / "ids.csv",
                                         "path,identity\na/1.jpg,A\na/2.jpg,A\nb/1.jpg,B\nzz.jpg,Z\na/1.jpg,A\n"))
    with pytest.raises(ValueError) as err:
        pr.resolve(listed, ["root/a/1.jpg", "root/a/2.jpg", "root/b/1.jpg"])
    assert "line 5: image 'zz.jpg' is not in the embeddings" in str(err.value)
    assert "line 6: image listed twice (first on line 2)" in str(err.value)
    resolved = pr.resolve(listed, ["root/b/1.jpg", "root/a/1.jpg", "root/a/2.jpg"], strict=False)
    assert resolved.rows.tolist() == [1, 2, 0]
    assert resolved.identity[0] == resolved.identity[1] != resolved.identity[2]
    assert len(resolved) == 3
