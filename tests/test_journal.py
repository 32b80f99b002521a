"""Resumable scans: the journal's file format, resume in-process (each file hashed once), a real SIGKILL mid-scan,
and bounded memory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memdetect.workflows import scan as scan_mod
from memdetect.detector import Detector
from memdetect.errors import UsageError
from memdetect.store.journal import Journal, fingerprint, journal_path, read_journals, record_scores, row_key, scan_record
from memdetect.workflows.scan import scan

from .conftest import write_images


#: Subprocesses use one torch thread: on a shared 2-core machine a second intra-op thread that must wait for a busy
#: core makes each forward many times slower, and these tiny models gain nothing from threads.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def det(tiny_ddpm):
    return Detector.from_pretrained("ddpm", str(tiny_ddpm), batch_size=4)


def _lines(path: Path) -> list[dict]:
    """The complete (newline-terminated) rows of a journal."""
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def _rec(key, path="a.png", **scores):
    return {"key": key, "path": path, **{m: scores.get(m, 0.5) for m in ("std", "l4l2", "entropy", "maxmin")}}


def test_journal_appends_reads_back_and_cuts_a_torn_line(tmp_path):
    p = tmp_path / "r.csv.journal.jsonl"
    with Journal(p) as j:
        assert j.done == {}
        assert j.append([_rec("k1"), _rec("k2")]) == 2
        assert j.append([]) == 0
        with pytest.raises(ValueError, match="string key"):
            j.append([{"path": "x"}])
    p.write_bytes(p.read_bytes() + b'{"key": "k9", "path": "torn')  # the process died mid-write
    with Journal(p) as j:
        assert set(j.done) == {"k1", "k2"}
        j.append([_rec("k4")])
    assert [r["key"] for r in _lines(p)] == ["k1", "k2", "k4"]  # torn tail cut, next row on its own line
    p.write_bytes(p.read_bytes() + b"not json\n[1, 2]\n" + b'{"key": "k5", "path": "x", "std": null}\n'
                  + b'{"key": "k1", "path": "b.png", "std": 2}\n')
    with Journal(p) as j:
        assert set(j.done) == {"k1", "k2", "k4", "k5"} and j.skipped_lines == 2
        assert j.done["k1"]["path"] == "b.png"  # the last record of a key wins
        assert record_scores(j.done["k5"]) is None and record_scores(j.done["k2"])["std"] == 0.5
    assert read_journals([p, tmp_path / "missing.jsonl"]).keys() == {"k1", "k2", "k4", "k5"}
    with Journal(p, fresh=True) as j:
        assert j.done == {}
    assert p.read_bytes() == b""
    # scan records: scored rows only, every score
    row = {"path": "a.png", "key": "k", "error": None, "score": 0.5, "memorized": None, "std": 0.5, "l4l2": 0.1,
           "entropy": 0.2, "maxmin": 3.0}
    assert scan_record(row) == {"key": "k", "path": "a.png", "std": 0.5, "l4l2": 0.1, "entropy": 0.2, "maxmin": 3.0}
    assert scan_record({**row, "error": "bad"}) is None and scan_record({**row, "key": None}) is None


def test_journal_refuses_a_concurrent_writer(tmp_path):
    pytest.importorskip("fcntl")
    p = tmp_path / "j.jsonl"
    with Journal(p):
        with pytest.raises(UsageError, match="another memdetect run is writing"):
            with Journal(p):
                pass
    with Journal(p):  # released on exit
        pass


def test_key_covers_content_and_scoring_settings(det):
    s = vars(det.settings)
    fp = fingerprint(s)
    assert row_key("abc", fp) == row_key("abc", fingerprint(dict(s)))
    assert row_key(None, fp) is None
    changed = [dict(s, seed=1), dict(s, layer="x"), dict(s, timestep=10), dict(s, model="other"),
               dict(s, memdetect="9.9"), dict(s, winograd=not s["winograd"]), dict(s, allocator="retain-freed")]
    assert s["allocator"] == "default"  # nothing in the library changes the allocator by itself
    assert len({row_key("abc", fp), row_key("abd", fp), *(row_key("abc", fingerprint(c)) for c in changed)}) == 9
    # metric, threshold and device do not change the key: rows keep every metric, flags are re-derived
    assert fingerprint(dict(s, metric="l4l2", threshold=0.3, device="cuda")) == fp
    assert journal_path("out/r.csv") == Path("out/r.csv.journal.jsonl")


def test_resume_reuses_rows_and_rederives_flags(det, tmp_path):
    write_images(tmp_path / "imgs", 10)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"nope")
    out = tmp_path / "r.csv"
    first = scan(det, [tmp_path / "imgs"], output=out, num_workers=0)
    assert (first.resumed, first.computed) == (0, 11) and first.output == out and out.is_file()
    jp = journal_path(out)
    assert len(_lines(jp)) == 10  # the error row is not journaled
    det.threshold = float(np.median(first.frame["std"].dropna()))
    try:
        again = scan(det, [tmp_path / "imgs"], output=out, num_workers=0)
    finally:
        det.threshold = None
    assert (again.resumed, again.computed) == (10, 1)  # only the unreadable file is tried again
    assert len(_lines(jp)) == 10
    a, b = first.frame, again.frame
    assert list(a["path"]) == list(b["path"]) and list(a["key"]) == list(b["key"])
    np.testing.assert_array_equal(a["std"].to_numpy(float), b["std"].to_numpy(float))
    flags = b["memorized"].dropna()
    assert len(flags) == 10 and 0 < flags.sum() < 10  # the new threshold applies to reused rows
    assert b.loc[b["path"].str.endswith("bad.png"), "error"].item() == "not a recognised image format"
    assert pd.read_csv(out)["memorized"].sum() == flags.sum()  # and the report is written from them
    fresh = scan(det, [tmp_path / "imgs"], output=out, resume=False, num_workers=0)
    assert (fresh.resumed, fresh.computed) == (0, 11)


def test_resume_hashes_up_front_and_scores_what_the_loader_read(det, tmp_path, monkeypatch):
    """With a journal to consult, every file is hashed up front to look its key up; a file still to score is read
    once more, by the loader, which hashes and decodes those same bytes (its key names what was scored)."""
    files = write_images(tmp_path / "imgs", 6)
    out = tmp_path / "r.csv"
    scan(det, files[:3], output=out, num_workers=0)
    hashed, read = [], []
    from memdetect import rows as detector_mod

    digest, read_file = scan_mod.file_digest, detector_mod.read_file
    monkeypatch.setattr(scan_mod, "file_digest", lambda p: hashed.append(Path(p).name) or digest(p))
    monkeypatch.setattr(detector_mod, "read_file", lambda p: read.append(Path(p).name) or read_file(p))
    res = scan(det, files, output=out, num_workers=0)
    assert (res.resumed, res.computed) == (3, 3)
    assert sorted(hashed) == sorted(f.name for f in files)  # six lookups
    assert read == [f.name for f in files[3:]]  # one read per scored file
    hashed.clear(), read.clear()
    scan(det, files, output=tmp_path / "fresh.csv", num_workers=0)  # no journal yet: nothing hashed up front
    assert hashed == [] and read == [f.name for f in files]


def test_a_crash_after_k_batches_leaves_exactly_k_batches(det, tmp_path):
    files = write_images(tmp_path / "imgs", 14)
    out = tmp_path / "r.csv"
    seen = []

    def boom(done, total):
        seen.append(done)
        if len(seen) == 1 + 3 + 1:  # called with the total, then as batch 4 finishes scoring, before it is journaled
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(det, files, output=out, num_workers=0, on_batch=boom)
    assert seen == [0, 4, 8, 12, 14] and not out.exists()
    assert len(_lines(journal_path(out))) == 3 * det.batch_size  # batches 1-3 are on disk; only batch 4 is lost
    res = scan(det, files, output=out, num_workers=0)
    assert (res.resumed, res.computed) == (12, 2)
    keys = [r["key"] for r in _lines(journal_path(out))]
    assert len(keys) == 14 == len(set(keys))


def test_sigkill_mid_scan_then_rerun_loses_and_duplicates_nothing(tiny_ddpm, tmp_path):
    """A real ``kill -9`` of the console script part-way through, then the same command again."""
    n, batch = 160, 4
    rng = np.random.default_rng(1)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):  # 256 px images: decoding and resizing them takes a few ms each
        a = np.full((256, 256, 3), i, np.uint8)
        a[:8, :8] = rng.integers(0, 256, (8, 8, 3))
        Image.fromarray(a).save(d / f"img_{i:03d}.png", compress_level=1)
    out = tmp_path / "report.csv"
    journal = journal_path(out)
    cmd = [sys.executable, "-m", "memdetect", "-v", "scan", str(d), "--model", "ddpm", "--model-path", str(tiny_ddpm),
           "--output", str(out), "--batch-size", str(batch), "--workers", "0", "--quiet"]
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ONE_THREAD)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= 2 * batch:
                break
            time.sleep(0.002)
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert running, f"the scan ended before it could be killed (rc {proc.returncode}): {log.read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the report is only ever written whole, at the end

    done = _lines(journal)
    computed_before_kill = log.read_text().count(" scored (")
    assert 0 < len(done) < n, "the kill should land mid-scan"
    assert len(done) % batch == 0  # whole batches are journaled at once
    assert 0 <= computed_before_kill * batch - len(done) <= batch  # lost work: at most the batch in flight

    rerun = subprocess.run(cmd[:3] + cmd[4:], capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert rerun.returncode == 0, rerun.stderr
    rows = _lines(journal)
    keys = [r["key"] for r in rows]
    assert len(keys) == n == len(set(keys))  # no missing, no duplicate rows
    assert keys[: len(done)] == [r["key"] for r in done]  # earlier rows kept, the rerun appended only the rest
    report = pd.read_csv(out)
    assert len(report) == n and report["path"].is_unique and report["score"].notna().all()
    assert sorted(report["key"]) == sorted(keys)
    assert report["path"].tolist() == sorted(report["path"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_memory_stays_bounded_while_streaming(tiny_ddpm, tmp_path, one_thread):
    """RSS must not grow with the number of images: 600 images of 256 x 256 (196 kB decoded each) would add
    ~90 MB between the first quarter and the end if decoded images were kept."""
    d = tmp_path / "many"
    d.mkdir()
    for i in range(600):
        a = np.full((256, 256, 3), i % 256, np.uint8)
        a[:4, :4] = (i * 7) % 256
        Image.fromarray(a).save(d / f"{i:04d}.png", compress_level=1)

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    det = Detector.from_pretrained("ddpm", str(tiny_ddpm), batch_size=24)
    samples = []
    res = scan(det, [d], output=tmp_path / "r.csv", num_workers=0, on_batch=lambda done, total: samples.append(rss_mb()))
    assert len(res.frame) == 600 and len(samples) == 1 + 600 // det.batch_size  # the total, then each batch
    growth = samples[-1] - samples[len(samples) // 4]
    assert growth < 30, f"RSS grew {growth:.0f} MB over 450 images"
