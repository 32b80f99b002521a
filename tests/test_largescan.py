"""Past one process: shards plus merge, torchrun ranks, tar shards, manifests and fsspec URLs (issue 16)."""

from __future__ import annotations

import io
import json
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
from typer.testing import CliRunner

from memdetect import Detector
from memdetect.cli import app
from memdetect.workflows.merge import read_report
from memdetect.store.report import COLUMNS
from memdetect.workflows.scan import scan
from memdetect.store.sources import parse_shard, shard, shard_bounds

from .conftest import write_images

runner = CliRunner()
SCORE_COLUMNS = ["score", "std", "l4l2", "entropy", "maxmin"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def det(tiny_ddpm):
    return Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", batch_size=2)


def png_bytes(seed: int, size=(20, 18)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar shard: ``(name, bytes)`` members, ``(name, None)`` a folder member."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[COLUMNS].reset_index(drop=True)


# -- shards ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total,count", [(0, 3), (1, 4), (5, 2), (7, 3), (12, 5)])
def test_shards_are_disjoint_contiguous_and_cover_the_inputs(total, count):
    items = list(range(total))
    parts = [shard(items, i, count) for i in range(count)]
    assert [x for p in parts for x in p] == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_bounds(total, count - 1, count)[1] == total


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2"])
def test_bad_shard_specs_are_refused(text):
    from memdetect.errors import UsageError

    with pytest.raises(UsageError, match="--shard takes I/N"):
        parse_shard(text)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_shards_plus_merge_equal_a_plain_scan(det, tmp_path, suffix):
    write_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    plain = scan(det, [tmp_path / "imgs"], output=tmp_path / f"plain{suffix}")
    parts = []
    for i in range(3):
        res = scan(det, [tmp_path / "imgs"], output=tmp_path / f"part{i}{suffix}", shard=(i, 3))
        assert len(res.frame) == 2 and res.shard == (i, 3)
        parts.append(tmp_path / f"part{i}{suffix}")
    r = invoke("merge", *reversed(parts), "--output", tmp_path / f"merged{suffix}")
    assert r.exit_code == 0, r.output
    assert "merged 3 shards: 6 images: 5 scored, 1 errored" in r.output
    merged = read_report(tmp_path / f"merged{suffix}")
    expected = read_report(tmp_path / f"plain{suffix}")
    pd.testing.assert_frame_equal(rows(merged.frame), rows(expected.frame))
    pd.testing.assert_frame_equal(rows(merged.frame), rows(plain.frame))
    if suffix == ".json":
        doc_m = json.loads((tmp_path / f"merged{suffix}").read_text())["settings"]
        doc_p = json.loads((tmp_path / f"plain{suffix}").read_text())["settings"]
        assert doc_m == doc_p
    else:
        raw_m = pd.read_csv(tmp_path / "merged.csv") if suffix == ".csv" else pd.read_parquet(tmp_path / f"merged{suffix}")
        raw_p = pd.read_csv(tmp_path / "plain.csv") if suffix == ".csv" else pd.read_parquet(tmp_path / f"plain{suffix}")
        assert list(raw_m.columns) == list(raw_p.columns)  # the shard marks are gone


def test_merge_refuses_what_is_not_one_scan(det, tiny_ddpm, tmp_path):
    write_images(tmp_path / "imgs", 4)
    for i in range(2):
        scan(det, [tmp_path / "imgs"], output=tmp_path / f"p{i}.csv", shard=(i, 2))
    other = Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", batch_size=2, seed=7)
    scan(other, [tmp_path / "imgs"], output=tmp_path / "seed7.csv", shard=(1, 2))
    scan(det, [tmp_path / "imgs"], output=tmp_path / "plain.csv")
    write_images(tmp_path / "more", 5)
    scan(det, [tmp_path / "more"], output=tmp_path / "more.csv", shard=(1, 2))

    cases = {
        ("p0.csv", "seed7.csv"): "different settings; they differ in seed (0 vs 7)",
        ("p0.csv", "p0.csv"): "shard 1/2 is given twice",
        ("p0.csv",): "shard 2/2 missing",
        ("p0.csv", "plain.csv"): "not a shard's report",
        ("p0.csv", "more.csv"): "shards of different inputs",
    }
    for given, needle in cases.items():
        r = invoke("merge", *(tmp_path / g for g in given), "-o", tmp_path / "m.csv")
        assert r.exit_code == 2 and needle in r.output, (given, r.output)
        assert len(r.output.strip().splitlines()) <= 2
    assert not (tmp_path / "m.csv").exists()
    # a hand-edited shard (a row dropped) is noticed
    df = pd.read_csv(tmp_path / "p1.csv").iloc[:-1]
    df.to_csv(tmp_path / "p1cut.csv", index=False)
    r = invoke("merge", tmp_path / "p0.csv", tmp_path / "p1cut.csv", "-o", tmp_path / "m.csv")
    assert r.exit_code == 2 and "(shard 2/2 of 4 inputs) holds 1 rows, not 2" in r.output


def test_cli_shard_flag_and_bad_values(tiny_ddpm, tmp_path):
    write_images(tmp_path / "imgs", 3)
    base = ["scan", tmp_path / "imgs", "--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 0, "-q"]
    r = invoke(*base, "--shard", "2/2", "-o", tmp_path / "s2.csv")
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "s2.csv")
    assert list(df["path"]) == [str(tmp_path / "imgs" / f"img_{i:03d}.png") for i in (1, 2)]
    assert set(df["shard"]) == {"2/2"}
    r = invoke(*base, "--shard", "3/2")
    assert r.exit_code == 2 and "--shard takes I/N" in r.output
    r = invoke(*base, "--ray-address", "auto")
    assert r.exit_code == 2 and "--ray-address needs --engine ray" in r.output


# -- tar shards, manifests, URLs -----------------------------------------------------------------------------------

def test_tar_members_are_rows_and_bad_members_are_error_rows(det, tmp_path):
    good = [png_bytes(1), png_bytes(2)]
    shard_path = make_tar(tmp_path / "s.tar", [("a/000.png", good[0]), ("a/000.txt", b"a caption"),
                                               ("a/001.png", b"garbage"), ("b.png", None),
                                               ("a/002.png", good[1]), ("a/003.jpg", b"")])
    (tmp_path / "files").mkdir()
    for i, data in enumerate(good):
        (tmp_path / "files" / f"{i}.png").write_bytes(data)
    res = scan(det, [shard_path])
    df = res.frame
    assert list(df["path"]) == [f"{shard_path}::a/000.png", f"{shard_path}::a/001.png", f"{shard_path}::b.png",
                                f"{shard_path}::a/002.png", f"{shard_path}::a/003.jpg"]
    errors = dict(zip(df["path"], df["error"]))
    assert errors[f"{shard_path}::a/001.png"] == "not a recognised image format"
    assert errors[f"{shard_path}::b.png"] == "tar member is not a regular file"
    assert errors[f"{shard_path}::a/003.jpg"] == "empty file (0 bytes)"
    ref = scan(det, [tmp_path / "files"]).frame
    ok = df[df["error"].isna()].reset_index(drop=True)
    # the same bytes as files: the same keys, and the same scores up to float rounding (the batches differ)
    np.testing.assert_allclose(ok[SCORE_COLUMNS].to_numpy(), ref[SCORE_COLUMNS].to_numpy(), rtol=1e-5)
    assert list(ok["key"]) == list(ref["key"])


def test_a_cut_off_tar_keeps_its_first_members_and_adds_an_error_row(det, tmp_path):
    full = make_tar(tmp_path / "full.tar", [(f"{i}.png", png_bytes(i, (64, 64))) for i in range(3)])
    data = full.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    df = scan(det, [cut]).frame
    assert df["error"].iloc[-1].startswith("corrupt tar shard after") or df["error"].iloc[-1].startswith("tar member cut off")
    assert df["error"].notna().any() and len(df) >= 2
    assert df["path"].iloc[0] == f"{cut}::0.png" and pd.isna(df["error"].iloc[0])


def test_manifests_csv_and_parquet(det, tmp_path):
    files = write_images(tmp_path / "imgs", 3)
    tar = make_tar(tmp_path / "s.tar", [("x.png", png_bytes(5))])
    pd.DataFrame({"path": ["imgs/img_002.png", str(files[0]), "", f"{tar}::x.png", f"{tar}::nope.png"],
                  "caption": list("abcde")}).to_csv(tmp_path / "m.csv", index=False)
    df = scan(det, [tmp_path / "m.csv"]).frame
    assert list(df["path"]) == [str(tmp_path / "imgs" / "img_002.png"), str(files[0]), f"{tmp_path / 'm.csv'}#row3",
                                f"{tar}::x.png", f"{tar}::nope.png"]
    assert list(df["error"].fillna("")) == ["", "", "manifest row 3 has no path", "", "no such tar member"]
    pd.DataFrame({"url": [f"file://{files[1]}"]}).to_parquet(tmp_path / "m.parquet")
    df2 = scan(det, [tmp_path / "m.parquet"]).frame
    assert list(df2["path"]) == [str(files[1])] and df2["error"].isna().all()
    pd.DataFrame({"name": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    r = invoke("scan", tmp_path / "bad.csv", "--model", "ddpm", "--model-path", det.adapter.source, "-q")
    assert r.exit_code == 2 and "has no path or url column (columns: name)" in r.output


def test_memory_and_file_urls_for_inputs_and_reports(det, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    files = write_images(tmp_path / "imgs", 3)
    for f in files:
        fs.pipe(f"/t16/imgs/{f.name}", f.read_bytes())
    fs.pipe("/t16/imgs/notes.txt", b"x")
    fs.pipe("/t16/shards/s.tar", make_tar(tmp_path / "s.tar", [("0.png", files[0].read_bytes())]).read_bytes())
    try:
        res = scan(det, ["memory://t16/imgs", "memory://t16/shards/*.tar", f"file://{files[2]}"],
                   output="memory://t16/out/report.json", allow_remote=True)
        names = list(res.frame["path"])
        assert len(names) == 5 and names[-1] == str(files[2])
        assert names[0].startswith("memory://") and names[0].endswith("/t16/imgs/img_000.png")
        assert names[3].endswith("/t16/shards/s.tar::0.png")
        local = scan(det, [tmp_path / "imgs"]).frame
        np.testing.assert_allclose(res.frame[SCORE_COLUMNS].to_numpy()[:3], local[SCORE_COLUMNS].to_numpy(), rtol=1e-5)
        np.testing.assert_allclose(res.frame[SCORE_COLUMNS].to_numpy()[3], local[SCORE_COLUMNS].to_numpy()[0],
                                   rtol=1e-5)
        doc = json.loads(fs.cat("/t16/out/report.json"))
        assert len(doc["rows"]) == 5 and doc["settings"]["family"] == "ddpm"
        # a rerun resumes from the journal (kept in the state directory for a report at a URL)
        again = scan(det, ["memory://t16/imgs"], output="memory://t16/out/r2.csv", allow_remote=True)
        assert again.computed == 3
        again = scan(det, ["memory://t16/imgs"], output="memory://t16/out/r2.csv", allow_remote=True)
        assert again.resumed == 3 and again.computed == 0
        # shards written to URLs merge from URLs
        for i in range(2):
            scan(det, ["memory://t16/imgs"], output=f"memory://t16/out/p{i}.parquet", shard=(i, 2), allow_remote=True)
        r = invoke("merge", "memory://t16/out/p0.parquet", "memory://t16/out/p1.parquet", "-o",
                   "memory://t16/out/m.csv")
        assert r.exit_code == 0, r.output
        merged = pd.read_csv(io.BytesIO(fs.cat("/t16/out/m.csv")))
        assert len(merged) == 3
        missing = invoke("scan", "memory://t16/nothing-here.png", "--model", "ddpm", "--model-path",
                         det.adapter.source, "-q", "--allow-remote")
        assert missing.exit_code == 2 and "does not exist" in missing.output
        refused = invoke("scan", "memory://t16/imgs", "--model", "ddpm", "--model-path", det.adapter.source, "-q")
        assert refused.exit_code == 2 and "memory:// needs --allow-remote" in refused.output
    finally:
        fs.rm("/t16", recursive=True)


def test_a_missing_remote_file_in_a_manifest_is_an_error_row(det, tmp_path):
    pd.DataFrame({"url": ["memory://t16b/none.png"]}).to_csv(tmp_path / "m.csv", index=False)
    df = scan(det, [tmp_path / "m.csv"], allow_remote=True).frame
    assert df["error"].tolist() == ["not found"]
    df = scan(det, [tmp_path / "m.csv"]).frame  # without allow_remote: nothing is opened
    assert df["error"].str.contains("memory:// needs --allow-remote").tolist() == [True]


# -- torchrun ------------------------------------------------------------------------------------------------------

RANK_SCRIPT = Path(__file__).with_name("dist_scan_script.py")


def _torchrun(args, env_extra=None, timeout=240):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000), str(RANK_SCRIPT),
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_report_and_resume_after_a_kill(tiny_ddpm, tmp_path):
    write_images(tmp_path / "imgs", 7)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"nope")
    args = ["scan", tmp_path / "imgs", "--model", "ddpm", "--model-path", tiny_ddpm, "--device", "cpu",
            "--batch-size", 2, "--workers", 0, "-o"]
    # the same command in one process (the CLI's settings, allocator included, are part of each row's key)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(RANK_SCRIPT), *map(str, args), tmp_path / "single.csv"], env=env,
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stdout + one.stderr
    args.append(tmp_path / "dist.csv")
    # first run: rank 1 dies (SIGKILL) after its first batch; torchrun stops rank 0 too
    p = _torchrun(args, {"MEMDETECT_TEST_DIE_AFTER_BATCHES": "1", "MEMDETECT_TEST_DIE_RANK": "1"})
    assert p.returncode != 0, p.stdout + p.stderr
    assert not (tmp_path / "dist.csv").exists()
    journal = tmp_path / "dist.rank2of2.csv.journal.jsonl"
    assert len(journal.read_text().splitlines()) == 2  # one batch of two images was kept
    rank0 = tmp_path / "dist.rank1of2.csv.journal.jsonl"  # rank 0 may or may not have finished its part
    kept = 2 + (len(rank0.read_text().splitlines()) if rank0.exists() else 0)
    # rerun: each rank resumes from its own journal, rank 0 writes one report
    p = _torchrun(args)
    assert p.returncode == 0, p.stdout + p.stderr
    dist = read_report(tmp_path / "dist.csv")
    expected = read_report(tmp_path / "single.csv")
    pd.testing.assert_frame_equal(rows(dist.frame), rows(expected.frame))
    assert dist.frame["path"].is_unique and len(dist.frame) == 8
    assert f"({kept} rows reused from its journal)" in p.stdout  # nothing journaled was scored twice
    raw = pd.read_csv(tmp_path / "dist.csv")
    assert list(raw.columns) == list(pd.read_csv(tmp_path / "single.csv").columns)


# -- ranks: environment, devices -----------------------------------------------------------------------------------

def test_world_comes_from_the_launchers_environment():
    from memdetect.integrations.torchrun import World, rank_output, world
    from memdetect.errors import UsageError

    assert world({}) is None and world({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert world({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    assert world({"WORLD_SIZE": "2", "RANK": "1"}) == World(1, 2, 1)
    for bad, needle in [({"WORLD_SIZE": "2", "RANK": "2"}, "outside 0..1"), ({"WORLD_SIZE": "x"}, "integers")]:
        with pytest.raises(UsageError, match=needle):
            world(bad)
    assert rank_output(Path("out/r.csv"), 1, 8) == Path("out/r.rank2of8.csv")
    assert rank_output("s3://b/r.parquet", 0, 2) == "s3://b/r.rank1of2.parquet"


def test_each_rank_takes_its_own_gpu(monkeypatch):
    import torch

    from memdetect.integrations.torchrun import World, rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rank_device("auto", World(5, 8, 5)) == "cuda:1"
    assert rank_device("cuda", World(0, 8, 2)) == "cuda:2"
    assert rank_device("cpu", World(0, 8, 2)) == "cpu"
    assert rank_device("cuda:3", World(0, 8, 2)) == "cuda:3"  # an explicit device is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", World(1, 2, 1)) == "auto"


def test_a_scan_under_a_launcher_needs_an_output_and_no_shard_flag(tiny_ddpm, tmp_path, monkeypatch):
    write_images(tmp_path / "imgs", 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = invoke("scan", tmp_path / "imgs", "--model", "ddpm", "--model-path", tiny_ddpm, "--shard", "1/2")
    assert r.exit_code == 2 and "each rank already scores its own part: drop --shard" in r.output
    r = invoke("scan", tmp_path / "imgs", "--model", "ddpm", "--model-path", tiny_ddpm, "--device", "cpu")
    assert r.exit_code == 2 and "needs --output" in r.output


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_rank_gpu_scores_match_the_cpu(tiny_ddpm, tmp_path):
    import torch

    from memdetect.integrations.torchrun import World, rank_device

    write_images(tmp_path / "imgs", 4)
    dev = rank_device("auto", World(1, 2, 1))
    assert dev == f"cuda:{1 % torch.cuda.device_count()}"
    gpu = Detector.from_pretrained("ddpm", str(tiny_ddpm), device=dev, dtype="float32").scan([tmp_path / "imgs"])
    cpu = Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu").scan([tmp_path / "imgs"])
    np.testing.assert_allclose(gpu[SCORE_COLUMNS].to_numpy(), cpu[SCORE_COLUMNS].to_numpy(), rtol=1e-3)


def test_more_shards_than_images_merge(det, tmp_path):
    write_images(tmp_path / "imgs", 2)
    for i in range(4):
        scan(det, [tmp_path / "imgs"], output=tmp_path / f"p{i}.csv", shard=(i, 4))
    assert [len(pd.read_csv(tmp_path / f"p{i}.csv")) for i in range(4)] == [0, 1, 0, 1]
    for given in (range(4), (1, 3)):  # the empty parts may be given or left out: nothing is missing either way
        r = invoke("merge", *(tmp_path / f"p{i}.csv" for i in given), "-o", tmp_path / "m.csv")
        assert r.exit_code == 0, r.output
        assert list(pd.read_csv(tmp_path / "m.csv")["path"]) == [str(p) for p in sorted((tmp_path / "imgs").iterdir())]
    r = invoke("merge", tmp_path / "p1.csv", "-o", tmp_path / "m.csv")
    assert r.exit_code == 2 and "shard 4/4 missing" in r.output


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_p_values_survive_shards_and_merge(det, tmp_path, suffix):
    from memdetect.core.pvalues import Reference

    write_images(tmp_path / "imgs", 5)
    ref = Reference.from_scores(np.linspace(0.0, 2.0, 50))
    plain = scan(det, [tmp_path / "imgs"], output=tmp_path / f"plain{suffix}", reference=ref)
    assert plain.frame["p_value"].notna().all()
    parts = [tmp_path / f"part{i}{suffix}" for i in range(2)]
    for i, p in enumerate(parts):
        scan(det, [tmp_path / "imgs"], output=p, shard=(i, 2), reference=ref)
    r = invoke("merge", *parts, "--output", tmp_path / f"merged{suffix}")
    assert r.exit_code == 0, r.output
    merged = read_report(tmp_path / f"merged{suffix}").frame
    cols = ["path", "score", "p_value", "percentile"]
    pd.testing.assert_frame_equal(merged[cols].reset_index(drop=True), plain.frame[cols].reset_index(drop=True))
    # a part without p-values: the merge keeps only the columns every part has
    scan(det, [tmp_path / "imgs"], output=parts[1], shard=(1, 2), resume=False)
    r = invoke("merge", *parts, "--output", tmp_path / f"merged2{suffix}")
    assert r.exit_code == 0, r.output
    assert "p_value" not in read_report(tmp_path / f"merged2{suffix}").frame.columns


def test_evidence_needs_a_scan_in_one_process(tiny_ddpm, tmp_path, monkeypatch):
    write_images(tmp_path / "imgs", 2)
    base = ["scan", tmp_path / "imgs", "--model", "ddpm", "--model-path", tiny_ddpm, "-o", tmp_path / "r.csv"]
    r = invoke(*base, "--engine", "ray", "--evidence-json", tmp_path / "ev.json")
    assert r.exit_code == 2 and "need a scan in one process" in r.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = invoke(*base, "--reference-dir", tmp_path / "imgs")
    assert r.exit_code == 2 and "need a scan in one process" in r.output
    assert not (tmp_path / "r.csv").exists()
