"""Image inputs and robust decoding."""

import numpy as np
import pytest
from PIL import Image

from aikd.images import ImageError, ImageInput, collect_inputs, load_image, match_landmarks
from conftest import png_claiming_size


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_formats_roundtrip(tmp_path, rgb, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(rgb).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    np.testing.assert_array_equal(load_image(path), rgb)


def test_conversions(tmp_path, rgb):
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (20, 24, 3) and (out[..., 0] == gray).all() and (out[..., 2] == gray).all()

    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png")[..., 1], gray)

    rgba = np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (20, 24, 3) and (out[0, 0] == 0).all()
    np.testing.assert_array_equal(out[1:], rgb[1:])

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (20, 24, 3) and np.abs(out.astype(int) - rgb).mean() < 12


def test_exif_orientation_applied(tmp_path, rgb):
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "o.jpg", exif=exif, quality=100)
    assert load_image(tmp_path / "o.jpg").shape == (24, 20, 3)


def test_bad_files_give_reasons(tmp_path, rgb):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    Image.fromarray(rgb).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(60000, 60000))
    expected = {"empty.jpg": "empty file", "text.jpg": "not an image", "trunc.jpg": "cannot decode",
                "bomb.png": "too large", "missing.jpg": "not found"}
    for name, reason in expected.items():
        with pytest.raises(ImageError, match=reason):
            load_image(tmp_path / name)


def test_collect_inputs(tmp_path, rgb):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.png", "d/sub/a.jpg", "d/notes.txt.bak", "e.png"):
        path = tmp_path / name
        if name.endswith((".png", ".jpg")):
            Image.fromarray(rgb).save(path)
        else:
            path.write_text("x")
    (tmp_path / "list.txt").write_text("# comment\nd/b.png\n\ne.png\n")
    items = collect_inputs([tmp_path / "d"])
    assert [i.key for i in items] == ["b.png", "sub/a.jpg"]
    listed = collect_inputs([tmp_path / "list.txt"])
    assert [i.key for i in listed] == ["d/b.png", "e.png"] and listed[0].path == tmp_path / "d" / "b.png"
    (tmp_path / "list.csv").write_text("path,label\nd/b.png,1\n")
    assert [i.key for i in collect_inputs([tmp_path / "list.csv"])] == ["d/b.png"]
    globbed = collect_inputs([str(tmp_path / "**" / "*.jpg")])
    assert len(globbed) == 1 and globbed[0].path.name == "a.jpg"
    with pytest.raises(ValueError, match="no such file"):
        collect_inputs([tmp_path / "nope"])
    with pytest.raises(ValueError, match="matches no file"):
        collect_inputs([str(tmp_path / "*.gif")])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        collect_inputs([tmp_path / "emptydir"])


def test_match_landmarks(tmp_path):
    points = np.arange(40, dtype=np.float32).reshape(4, 5, 2)
    table = ["sub/a.jpg", "./b.jpg", "vggface2/n001/c.jpg", "id1/1.png"]
    keys = ["sub/a.jpg", "b.jpg", "n001/c.jpg", "id2/1.png", "root/id1/1.png", "z.jpg"]
    items = [ImageInput(tmp_path / key, key) for key in keys]
    matched, missing = match_landmarks(items, table, points)
    np.testing.assert_array_equal(matched[:3], points[:3])
    np.testing.assert_array_equal(matched[4], points[3])
    assert missing == [3, 5] and np.isnan(matched[3]).all()


def test_bin_validation_set_members(tmp_path, rgb):
    import io
    import pickle

    from aikd.images import load_input

    encoded = []
    for shade in (0, 80, 160, 240):
        buffer = io.BytesIO()
        Image.fromarray(np.full((6, 6, 3), shade, np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((encoded, [True, False])))
    items = collect_inputs([path])
    assert [i.key for i in items] == [f"lfw.bin#{i:06d}" for i in range(4)]
    assert load_input(items[2]).mean() == 160
