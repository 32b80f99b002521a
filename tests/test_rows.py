"""One row core (issue 33): the local scan, torchrun's ranks, Ray's actors and the Python API give the same rows,
on a folder with a tar member, an animated GIF, a 16-bit PNG, an EXIF-rotated JPEG and a broken file."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memdetect import Detector
from memdetect.store.report import COLUMNS
from memdetect.workflows.merge import read_report
from memdetect.workflows.scan import scan

from .conftest import write_images

SCORES = ["score", "std", "l4l2", "entropy", "maxmin"]

RANK_SCRIPT = """
import sys
from memdetect import Detector
from memdetect.workflows.scan import scan

det = Detector.from_pretrained("ddpm", sys.argv[1], device="cpu", batch_size=2)
scan(det, sys.argv[3:], output=sys.argv[2], engine="torchrun", num_workers=0)
"""


def mixed_inputs(root: Path) -> list[Path]:
    """A folder of every kind of image the recipe treats specially, a broken file, and a tar shard beside it."""
    folder = root / "mixed"
    plain = write_images(folder, 2, size=(40, 28), seed=3)
    rng = np.random.default_rng(7)
    # animated: three different frames, so the highest score may come from any of them
    frames = [Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    # 16 bits: a wide range that an 8-bit conversion would clip to white
    Image.fromarray(rng.integers(0, 65536, (26, 34), dtype=np.uint16)).save(folder / "deep.png")
    # EXIF orientation 6 (turn 90 degrees): the pixels a viewer shows are not the stored ones
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)).save(folder / "turned.jpg", exif=exif,
                                                                            quality=95)
    (folder / "broken.png").write_bytes(b"not an image at all")
    with tarfile.open(root / "shard.tar", "w") as tar:
        tar.add(plain[0], arcname="sample/copy.png")
        tar.add(folder / "deep.png", arcname="sample/deep.png")
        info = tarfile.TarInfo("sample/bad.png")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"nope!"))
    return [folder, root / "shard.tar"]


def opened(path: str) -> Image.Image:
    """The image a row names, opened with Pillow (a tar member from its bytes)."""
    shard, sep, member = path.partition(".tar::")
    if sep:
        with tarfile.open(shard + ".tar") as tar:
            return Image.open(io.BytesIO(tar.extractfile(member).read()))
    return Image.open(path)


@pytest.fixture(scope="module")
def case(tiny_ddpm, tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    inputs = mixed_inputs(root)
    det = Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", batch_size=2)
    local = scan(det, inputs, num_workers=0, state_dir=root / "state")
    return det, inputs, local.frame[COLUMNS].reset_index(drop=True), root


def test_the_folder_holds_what_the_recipe_treats_specially(case):
    _, _, local, _ = case
    by_name = {Path(p.split("::")[-1]).name: row for p, row in zip(local["path"], local.itertuples())}
    assert len(local) == 9 and local["error"].notna().sum() == 2  # broken.png, the tar's bad.png
    assert by_name["broken.png"].error == "not a recognised image format"
    assert local["key"].notna().all()
    assert by_name["copy.png"].key == by_name["img_000.png"].key  # a tar member is keyed by its bytes


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["api", "torchrun", "ray"])
def test_every_engine_gives_the_local_scans_rows(case, engine, tiny_ddpm, tmp_path):
    det, inputs, local, _ = case
    if engine == "api":  # Detector.scan, and Detector.score_images on the same images opened with Pillow
        pd.testing.assert_frame_equal(det.scan(inputs, num_workers=0)[COLUMNS], local)
        good = local[local["error"].isna()].reset_index(drop=True)
        images = [opened(p) for p in good["path"]]
        api = det.score_images(images)
        assert api["path"].tolist() == [str(i) for i in range(len(good))] and api["key"].isna().all()
        pd.testing.assert_frame_equal(api.drop(columns=["path", "key"]), good.drop(columns=["path", "key"]))
        return
    if engine == "torchrun":
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
        if torchrun is None:
            pytest.skip("torchrun is not installed")
        script = tmp_path / "rank.py"
        script.write_text(RANK_SCRIPT)
        cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(29600 + os.getpid() % 1000), str(script),
               str(tiny_ddpm), str(tmp_path / "dist.csv"), *map(str, inputs)]
        p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        got = read_report(tmp_path / "dist.csv").frame[COLUMNS].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, local)
        return
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'memdetect[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'memdetect[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        got = scan(det, inputs, engine="ray", detector_options={
            "model": "ddpm", "model_path": str(tiny_ddpm), "device": "cpu", "batch_size": 2}).frame[COLUMNS]
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(got.drop(columns=SCORES), local.drop(columns=SCORES))  # paths, keys, frames
    # actors are other processes: scores agree to float rounding (as tests/test_ray.py checks the CLI)
    np.testing.assert_allclose(got[SCORES].to_numpy("float64", na_value=np.nan),
                               local[SCORES].to_numpy("float64", na_value=np.nan), rtol=1e-5)


def test_score_images_uses_the_files_recipe(case):
    """The API turns EXIF orientation, rescales 16 bits and scores every frame, as a file scan does: the rows differ
    from those of a plain ``convert('RGB')`` of the same images (what it scored before), so the recipe it reports
    is the one it ran."""
    det, _, local, root = case
    names = ["anim.gif", "deep.png", "turned.jpg"]
    want = local[local["path"].map(lambda p: Path(p).parent.name == "mixed" and Path(p).name in names)]
    want = want.set_index(want["path"].map(lambda p: Path(p).name)).loc[names].reset_index(drop=True)
    api = det.score_images([Image.open(root / "mixed" / n) for n in names])
    pd.testing.assert_frame_equal(api.drop(columns=["path", "key"]), want.drop(columns=["path", "key"]))
    gif = Image.open(root / "mixed" / "anim.gif")
    each = det.score_images([(gif.seek(k), gif.convert("RGB"))[1] for k in range(3)])["std"]  # frame by frame
    assert (want["std"].iloc[0], want["frame"].iloc[0]) == (each.max(), each.argmax())
    # what it scored before: 8-bit RGB by Pillow's convert (16 bits clipped), its EXIF orientation not applied
    naive = det.score_images([Image.fromarray(np.asarray(Image.open(root / "mixed" / n).convert("RGB")))
                              for n in names[1:]])
    assert not np.isclose(naive["std"].to_numpy(), want["std"].to_numpy()[1:], rtol=1e-6).any()
    im = Image.open(root / "mixed" / "anim.gif")
    im.seek(1)
    det.score_images([im])
    assert im.tell() == 1  # the caller's image is left at its frame


def test_a_broken_in_memory_image_is_an_error_row(case):
    det, _, _, _ = case
    df = det.score_images([Image.new("RGB", (0, 0)), Image.new("RGB", (8, 8))])
    assert df["error"].tolist()[0] == "image has no pixels (0x0)" and pd.isna(df["score"].iloc[0])
    assert pd.isna(df["error"].iloc[1]) and df["score"].notna().iloc[1]
