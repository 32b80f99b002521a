"""Image discovery and decoding: modes, orientation, the fit recipe, and bad files as ImageError."""

import os

import numpy as np
import pytest
from PIL import Image

from memdetect.store.io import ImageError, discover, image_seed, load_image, write_report


def _save(path, img, **kw):
    img.save(path, **kw)
    return path


def test_discover_sorts_recurses_and_filters(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ["b/2.png", "b/1.JPG", "a/deep/x.webp", "notes.txt", "a/z.jpeg"]:
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in discover([tmp_path])]
    assert found == ["a/deep/x.webp", "a/z.jpeg", "b/1.JPG", "b/2.png"]
    # an explicit file is kept whatever its suffix; duplicates collapse
    assert discover([tmp_path / "notes.txt", tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]
    with pytest.raises(FileNotFoundError):
        discover([tmp_path / "missing"])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    base = Image.linear_gradient("L").resize((40, 30))
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (np.asarray(base, dtype=np.float64) * (257 if mode != "F" else 1 / 255)).astype(
            {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    assert img.mode == mode
    suffix = ".jpg" if mode == "CMYK" else (".tiff" if mode in ("I", "F") else ".png")
    p = _save(tmp_path / f"x{suffix}", img)
    arr = load_image(p, 16)
    assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8
    if mode in ("L", "I;16", "I", "F"):
        assert arr.max() > 200  # full range kept, not clipped to black/white
        assert arr.min() < 60


def test_exif_orientation_and_centre_crop(tmp_path):
    # a 40x20 image, left half black, right half white, stored with EXIF "rotate 90 CW" (orientation 6)
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(tmp_path / "rot.jpg", Image.fromarray(a), exif=exif.tobytes(), quality=95)
    arr = load_image(p, 8)
    # after rotation the image is 20 wide x 40 tall: top half black, bottom half white; centre crop keeps both
    assert arr[:, :3].mean() < 40 and arr[:, -3:].mean() > 215


def test_small_and_animated(tmp_path):
    assert load_image(_save(tmp_path / "one.png", Image.new("RGB", (1, 1), (10, 20, 30))), 8).shape == (3, 8, 8)
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    arr = load_image(p, 8)
    assert arr[0].mean() > 200 and arr[2].mean() < 50  # the first frame (red)


def test_bad_files_raise_image_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    good = _save(tmp_path / "good.png", Image.new("RGB", (64, 64), (1, 2, 3)))
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "dir.png").mkdir()
    os.symlink(tmp_path / "nowhere.png", tmp_path / "broken.png")
    expected = {"empty.png": "empty file", "text.png": "not a recognised", "trunc.png": "corrupt",
                "dir.png": "directory", "broken.png": "broken symbolic link"}
    for name, needle in expected.items():
        with pytest.raises(ImageError, match=needle):
            load_image(tmp_path / name, 8)


def test_image_seed_depends_on_pixels_and_seed():
    a = np.zeros((3, 4, 4), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert image_seed(a, 0) == image_seed(a.copy(), 0)
    assert len({image_seed(a, 0), image_seed(b, 0), image_seed(a, 1)}) == 3


def test_report_suffix_checked(tmp_path):
    import pandas as pd

    with pytest.raises(ValueError, match="not supported"):
        write_report(pd.DataFrame({"a": [1]}), tmp_path / "r.xlsx")
    write_report(pd.DataFrame({"a": [1]}), tmp_path / "sub" / "r.csv")
    assert (tmp_path / "sub" / "r.csv").read_text().splitlines() == ["a", "1"]
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]
