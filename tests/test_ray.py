"""Ray Data engine on a local Ray (issue 16): the same rows as a local scan. Skipped without Ray."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from memdetect.cli import app
from memdetect.store.report import COLUMNS

from .conftest import write_images

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'memdetect[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'memdetect[ray]')")

pytestmark = pytest.mark.slow  # starting a local Ray takes 10-60 s on a busy 2-core machine

SCORES = ["score", "std", "l4l2", "entropy", "maxmin"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def tar_of(path, files):
    with tarfile.open(path, "w") as tar:
        for f in files:
            tar.add(f, arcname=f"sample/{f.name}")
        info = tarfile.TarInfo("sample/bad.png")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"nope!"))
    return path


def test_cli_engine_ray_on_tar_shards_and_a_folder_equals_a_local_scan(local_ray, tiny_ddpm, tmp_path):
    files = write_images(tmp_path / "a", 4, seed=1)
    tar_of(tmp_path / "s1.tar", files[:2])
    tar_of(tmp_path / "s2.tar", files[2:])
    write_images(tmp_path / "folder", 3, seed=2)
    inputs = [tmp_path / "s1.tar", tmp_path / "s2.tar", tmp_path / "folder"]
    base = ["scan", *inputs, "--model", "ddpm", "--model-path", tiny_ddpm, "--device", "cpu", "--batch-size", 2,
            "--workers", 0, "-q"]
    runner = CliRunner()
    local = runner.invoke(app, [str(a) for a in [*base, "-o", tmp_path / "local.csv"]])
    assert local.exit_code == 0, local.output
    on_ray = runner.invoke(app, [str(a) for a in [*base, "--engine", "ray", "-o", tmp_path / "ray.csv"]])
    assert on_ray.exit_code == 0, on_ray.output
    a, b = pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "ray.csv")
    assert len(a) == 9 and a["error"].notna().sum() == 2  # 4 + 3 images, one bad member per shard
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a.drop(columns=SCORES), b.drop(columns=SCORES))  # paths, order, keys, errors
    np.testing.assert_allclose(b[SCORES].to_numpy(), a[SCORES].to_numpy(), rtol=1e-5)


def test_score_dataset_over_bytes(local_ray, tiny_ddpm, tmp_path):
    from memdetect import Detector
    from memdetect.integrations.ray import score_dataset

    files = write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "zz.png").write_bytes(b"broken")
    ds = ray.data.read_binary_files(str(tmp_path / "imgs"), include_paths=True)
    out = score_dataset(ds, model="ddpm", model_path=str(tiny_ddpm), device="cpu", batch_size=2).to_pandas()
    out = out.sort_values("path").reset_index(drop=True)
    assert list(out.columns[:len(COLUMNS)]) == COLUMNS
    assert out["path"].str.endswith("zz.png").tolist() == [False, False, False, True]
    assert out["error"].isna().tolist() == [True, True, True, False]
    assert out["error"].iloc[3] == "not a recognised image format"
    ref = Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", batch_size=2).scan(files)
    # recent Ray gives Arrow-backed columns (double[pyarrow]); compare them as floats
    np.testing.assert_allclose(out[SCORES].astype("float64").to_numpy()[:3], ref[SCORES].to_numpy(), rtol=1e-5)
