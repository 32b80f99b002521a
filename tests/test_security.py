"""Hostile inputs other than checkpoints (issue 15; checkpoints: test_hostile_checkpoints.py): forged journals,
numbers out of range, files replaced mid-scan, names that try to act on the terminal or forge lines, signals during a
scan, destinations that cannot be written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from memdetect.cli import app
from memdetect.detector import Detector
from memdetect.errors import UsageError
from memdetect.store.journal import fingerprint, journal_path, record_mac, row_key
from memdetect.workflows.scan import scan
from memdetect.store.state import StateDir
from memdetect.text import printable

from .conftest import REPO, write_images

runner = CliRunner()
EXAMPLES = REPO / "examples"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_error_line(output: str) -> str:
    """The ``memdetect: error: ...`` line of a failed command, checked to be the only one and without traceback."""
    lines = [line for line in output.splitlines() if line.startswith("memdetect:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed) with what would show a write: size, mtime and content hash."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def det(tiny_ddpm):
    return Detector.from_pretrained("ddpm", str(tiny_ddpm), batch_size=4)


# -- 1. journal trust ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    """memdetect.toml calibrated on examples/demo-reference (the README's quick start)."""
    from memdetect.workflows.calibrate import calibrate_paths

    d = tmp_path_factory.mktemp("config")
    det = Detector.from_pretrained("demo", batch_size=64, device="cpu")
    calibrate_paths(det, [EXAMPLES / "demo-reference"], fpr=0.01, output=d / "memdetect.toml", num_workers=0)
    return d / "memdetect.toml"


def _forged_rows(det: Detector, folder: Path, weights: str, secret: bytes | None) -> list[dict]:
    """Journal rows an attacker can compute: the right key for every image (content hash, settings, weights' hash),
    every score set to 0.01, signed with ``secret`` (the attacker's own) or not at all."""
    fp = fingerprint(asdict(det.settings), weights=weights)
    rows = []
    for f in sorted(folder.glob("*.png")):
        rec = {"key": row_key(hashlib.sha256(f.read_bytes()).hexdigest(), fp), "path": str(f), "std": 0.01,
               "l4l2": 0.01, "entropy": 0.01, "maxmin": 0.01}
        rows.append({**rec, "mac": record_mac(rec, secret)} if secret else rec)
    return rows


def _flagged(report: Path) -> list[str]:
    df = pd.read_csv(report)
    return sorted(Path(p).name for p in df.loc[df["memorized"].astype(bool), "path"])


def test_a_forged_journal_never_passes_an_audit(demo_config, tmp_path, monkeypatch):
    """Forged journals wherever an attacker could put one: committed in the scanned folder, in its ``.memdetect/``,
    in the repository's ``.memdetect/`` (a symlink to a victim file, too), signed with another state directory's
    secret at the real journal's place, and the real journal with its scores edited. The audit (with --resume)
    flags exactly the 20 memorized examples every time, says which rows it dropped, and writes nothing but its
    outputs and its state directory."""
    state = tmp_path / "state"
    monkeypatch.setenv("MEMDETECT_STATE_DIR", str(state))
    scanned = tmp_path / "demo"
    shutil.copytree(EXAMPLES / "demo", scanned)
    repo = tmp_path / "repo"
    (repo / ".memdetect").mkdir(parents=True)
    monkeypatch.chdir(repo)
    from memdetect.speed import runtime
    runtime.retain_freed_memory()  # as the command does: the allocator setting is part of the key
    det = Detector.from_pretrained("demo", device="cpu")
    weights = det.weights_digest(StateDir(state))
    forged = "".join(json.dumps(r) + "\n" for r in _forged_rows(det, scanned, weights, None))
    for p in (scanned / "report.csv.journal.jsonl", scanned / ".memdetect" / "report.csv.journal.jsonl",
              scanned / ".memdetect" / "report.csv", repo / ".memdetect" / "report.csv.journal.jsonl.bak"):
        p.parent.mkdir(exist_ok=True)
        p.write_text(forged)
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch\n")
    os.symlink(victim, repo / ".memdetect" / "report.csv.journal.jsonl")  # what `git add -f` can commit
    memorized = sorted(f.name for f in scanned.glob("mem_*.png"))
    assert len(memorized) == 20
    before_scanned, before_victim = tree(scanned), victim.read_bytes()
    args = ["audit", scanned, "--config", demo_config, "--workers", 0, "--annotations", "none", "--top", 0]

    res = invoke(*args, "--resume", "--summary-json", tmp_path / "s.json")
    assert res.exit_code == 1, res.output
    assert _flagged(repo / ".memdetect" / "report.csv") == memorized
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["resume"], summary["resumed"], summary["flagged"]) == (True, 0, 20)
    forged_keys = {json.loads(line)["key"] for line in forged.splitlines()}
    assert set(pd.read_csv(repo / ".memdetect" / "report.csv")["key"]) == forged_keys  # the forger's keys were right
    assert summary["settings"]["weights"] == weights

    # the real journal's place, filled with rows signed by another state directory's secret
    journal = StateDir(state).journal_path(fingerprint(asdict(det.settings), weights=weights),
                                           repo / ".memdetect" / "report.csv")
    assert journal.is_file() and journal.parent.parent == state
    journal.write_text("".join(json.dumps(r) + "\n" for r in _forged_rows(det, scanned, weights, b"x" * 32)))
    res = invoke(*args, "--resume", "--summary-json", tmp_path / "s.json")
    assert res.exit_code == 1 and "40 journal rows failed verification and were dropped" in res.output, res.output
    assert _flagged(repo / ".memdetect" / "report.csv") == memorized
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["resumed"], summary["journal_rows_rejected"]) == (0, 40)

    # the rows it wrote itself, with edited scores: dropped; the untouched ones are reused
    rows = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len(rows) == 40 and all("mac" in r for r in rows)
    for r in rows[:25]:
        r["std"] = 0.01
    journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke(*args, "--resume", "--summary-json", tmp_path / "s.json")
    assert res.exit_code == 1, res.output
    assert _flagged(repo / ".memdetect" / "report.csv") == memorized
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["resumed"], summary["journal_rows_rejected"]) == (15, 25)
    res = invoke(*args, "--resume")
    assert res.exit_code == 1 and "(40 rows reused from its journal)" in res.output, res.output

    # without --resume nothing is read (and the report says so)
    res = invoke(*args)
    assert res.exit_code == 1 and "(no journal read: every image scored)" in res.output

    # a symlinked journal in the state directory is refused, not followed
    journal.unlink()
    os.symlink(victim, journal)
    res = invoke(*args, "--resume")
    assert res.exit_code == 2 and "is a symbolic link" in one_error_line(res.output)

    assert tree(scanned) == before_scanned and victim.read_bytes() == before_victim
    assert sorted(os.listdir(repo / ".memdetect")) == [".gitignore", "report.csv", "report.csv.journal.jsonl",
                                                       "report.csv.journal.jsonl.bak"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "repo", "s.json", "state", "victim.txt"]


def test_scan_journal_beside_the_report_is_signed_and_never_followed(det, tmp_path):
    files = write_images(tmp_path / "imgs", 6)
    out = tmp_path / "r.csv"
    first = scan(det, files, output=out, num_workers=0)
    jp = journal_path(out)
    rows = [json.loads(line) for line in jp.read_text().splitlines()]
    secret = StateDir().secret()
    assert len(rows) == 6 and all(r["mac"] == record_mac(r, secret) for r in rows)
    assert stat.S_IMODE(jp.stat().st_mode) == 0o600
    assert stat.S_IMODE((StateDir().path / "secret").stat().st_mode) == 0o600

    for r in rows:  # a journal edited by anyone else: every row is recomputed, with the true scores
        r["std"] = 123.0
    jp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = scan(det, files, output=out, num_workers=0)
    assert (again.resumed, again.computed, again.rejected) == (0, 6, 6)
    np.testing.assert_array_equal(again.frame["std"], first.frame["std"])
    assert [json.loads(line)["std"] for line in jp.read_text().splitlines()] == list(first.frame["std"])

    victim = tmp_path / "victim.txt"
    victim.write_text("x\n")
    jp.unlink()
    os.symlink(victim, jp)
    with pytest.raises(UsageError, match="is a symbolic link"):
        scan(det, files, output=out, num_workers=0)
    jp.unlink()
    os.link(victim, jp)  # a hard link to a file elsewhere is refused too
    with pytest.raises(UsageError, match="has other hard links"):
        scan(det, files, output=out, num_workers=0)
    assert victim.read_text() == "x\n"
    jp.unlink()
    out.unlink()
    os.symlink(victim, out)
    with pytest.raises(UsageError, match="report .* is a symbolic link"):
        scan(det, files, output=out, num_workers=0)
    assert victim.read_text() == "x\n"


def test_the_key_covers_the_weights_content(tiny_ddpm, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_ddpm, model)
    files = write_images(tmp_path / "imgs", 3)
    out = tmp_path / "r.csv"
    res = scan(Detector.from_pretrained("ddpm", str(model)), files, output=out, num_workers=0)
    assert res.weights.startswith("files:") and res.computed == 3
    assert scan(Detector.from_pretrained("ddpm", str(model)), files, output=out, num_workers=0).resumed == 3
    from safetensors.torch import load_file, save_file

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 0.5  # the same folder, the same settings, other weights
    save_file(state, str(weights))
    changed = scan(Detector.from_pretrained("ddpm", str(model)), files, output=out, num_workers=0)
    assert changed.weights != res.weights and (changed.resumed, changed.computed) == (0, 3)


def test_state_dir_and_secret_are_private(tmp_path):
    sd = StateDir(tmp_path / "s")
    key = sd.secret()
    assert len(key) == 32 and StateDir(tmp_path / "s").secret() == key  # made once, then read
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    secret = tmp_path / "s" / "secret"
    os.chmod(secret, 0o644)
    with pytest.raises(UsageError, match="can be read by others"):
        StateDir(tmp_path / "s").secret()
    secret.unlink()
    os.symlink(tmp_path / "elsewhere", secret)
    with pytest.raises(UsageError, match="symbolic link"):
        StateDir(tmp_path / "s").secret()
    os.chmod(tmp_path / "s", 0o777)
    with pytest.raises(UsageError, match="writable by others"):
        StateDir(tmp_path / "s").ensure()
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="state directory"):
        StateDir(tmp_path / "f").ensure()


def test_state_dir_defaults_to_the_xdg_cache(monkeypatch, tmp_path):
    from memdetect.store.state import default_state_dir

    monkeypatch.delenv("MEMDETECT_STATE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "memdetect" / "state"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_state_dir() == Path.home() / ".cache" / "memdetect" / "state"


# -- 2. validated numbers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--threshold", "nan"], "threshold must be a finite number"),
    (["--threshold", "inf"], "threshold must be a finite number"),
    (["--threshold", "-inf"], "threshold must be a finite number"),
    (["--seed", str(2**64)], "seed must be an integer in [0, 2**64)"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
    (["--sigma", "nan"], "--sigma must be a positive finite number"),
    (["--timestep", "-1"], "timestep must be a non-negative integer"),
    (["--workers", "-1"], "workers must be 0 or more"),
])
@pytest.mark.parametrize("command", ["scan", "audit"])
def test_numbers_out_of_range_are_one_line_and_exit_2(command, args, needle, tiny_ddpm, images_dir, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--threshold", "1"] if command == "audit" and "--threshold" not in args else []
    res = invoke(command, images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, *extra, *args)
    assert res.exit_code == 2 and needle in one_error_line(res.output), res.output


@pytest.mark.parametrize("toml,needle", [
    ("threshold = nan", "threshold in"),
    ("threshold = inf", "threshold in"),
    ("threshold = -inf", "threshold in"),
    ("threshold = 1\nseed = 18446744073709551616", "seed in"),
    ("threshold = 1\nseed = -1", "seed in"),
    ("threshold = 1\ntimestep = -5", "timestep in"),
    ("threshold = 1\nsigma = nan", "sigma in"),
    ("threshold = 1\nsigma = -0.5", "sigma in"),
    ("threshold = 1e999", "threshold in"),
    ("threshold = 1\nseed = " + "9" * 5000, "not valid TOML"),
    ("threshold = 1\ncalibration = 'x'", "[calibration] in"),
    ("threshold = 1\n[calibration]\nthresholds = 'std=0.1'", "[calibration.thresholds] in"),
    ("threshold = 1\n[calibration]\nthresholds = [0.1, 0.2]", "[calibration.thresholds] in"),
    ("threshold = 1\n[calibration.thresholds]\nl4l2 = nan", "calibration.thresholds.l4l2 in"),
    ("threshold = 1\n[calibration.thresholds]\nl4l2 = 'high'", "calibration.thresholds.l4l2 in"),
    ("threshold = 1\nlayer = " + "[" * 2000 + "]" * 2000, "not valid TOML"),
])
def test_config_numbers_and_tables_are_checked(toml, needle, images_dir, tmp_path):
    cfg = tmp_path / "memdetect.toml"
    cfg.write_text(f'model = "demo"\n{toml}\n')
    res = invoke("audit", images_dir, "--config", cfg)
    assert res.exit_code == 2 and needle in one_error_line(res.output), res.output


# -- 3. read once ---------------------------------------------------------------------------------------------------

def _versions(folder: Path, n: int, size: int = 48) -> list[tuple[bytes, bytes]]:
    """Two different PNG encodings (A, B) of ``n`` images."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        pair = []
        for _ in range(2):
            path = folder / "tmp.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            pair.append(path.read_bytes())
        out.append(tuple(pair))
    (folder / "tmp.png").unlink()
    return out


def _consistent(det: Detector, frame: pd.DataFrame, versions, tmp_path: Path) -> None:
    """Every row's key is the hash of the bytes whose scores the row holds: (std, key) is one version's pair."""
    ref = tmp_path / "reference"
    ref.mkdir(exist_ok=True)
    for i, pair in enumerate(versions):
        for v, data in enumerate(pair):
            (ref / f"{i:03d}_{v}.png").write_bytes(data)
    names = sorted(ref.iterdir())
    scored = det.scan(names, num_workers=0)
    fp = fingerprint(asdict(det.settings), weights=det.weights_digest())
    pairs: dict[int, list] = {}
    for std, name in zip(scored["std"], names):
        pairs.setdefault(int(name.name[:3]), []).append((std, row_key(hashlib.sha256(name.read_bytes()).hexdigest(),
                                                                       fp)))
    for _, r in frame.iterrows():
        i = int(Path(r["path"]).stem.split("_")[1])
        keys = [key for std, key in pairs[i] if abs(std - r["std"]) <= 1e-5 * max(1.0, abs(std))]
        assert len(keys) == 1, f"row {r['path']}: scores of neither version"
        assert r["key"] == keys[0], f"row {r['path']}: the key of other bytes than those scored"


def test_a_file_replaced_between_batches_is_keyed_by_what_was_scored(det, tmp_path):
    """Resume hashes every file up front; files replaced after that must not keep the up-front key."""
    d = tmp_path / "imgs"
    d.mkdir()
    versions = _versions(tmp_path, 12)
    for i, (a, _) in enumerate(versions):
        (d / f"img_{i:03d}.png").write_bytes(a)
    out = tmp_path / "r.csv"
    scan(det, sorted(d.iterdir())[:4], output=out, num_workers=0)  # a journal to resume from
    swapped = threading.Event()

    def swap_all():
        for i, (_, b) in enumerate(versions):
            tmp = d / f".swap_{i}"
            tmp.write_bytes(b)
            os.replace(tmp, d / f"img_{i:03d}.png")
        swapped.set()

    def between_batches(done, total):  # called once the journal's rows are taken, then after each batch
        if not swapped.is_set():
            t = threading.Thread(target=swap_all)
            t.start()
            t.join()

    res = scan(det, [d], output=out, num_workers=0, on_batch=between_batches)
    assert swapped.is_set() and (res.resumed, res.computed) == (4, 8)
    _consistent(det, res.frame, versions, tmp_path)
    rescan = scan(det, [d], output=out, num_workers=0)  # the journal holds only keys of bytes that were scored
    _consistent(det, rescan.frame, versions, tmp_path)


def test_files_swapped_continuously_while_workers_decode(det, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    versions = _versions(tmp_path, 16, size=160)
    for i, (a, _) in enumerate(versions):
        (d / f"img_{i:03d}.png").write_bytes(a)
    stop = threading.Event()

    def swapper():
        k = 0
        while not stop.is_set():
            k += 1
            for i, pair in enumerate(versions):
                tmp = d / f".swap_{i}"
                tmp.write_bytes(pair[k % 2])
                os.replace(tmp, d / f"img_{i:03d}.png")

    t = threading.Thread(target=swapper)
    t.start()
    try:
        frames = [scan(det, sorted(d.glob("img_*.png")), output=tmp_path / f"r{k}.csv", num_workers=2).frame
                  for k in range(2)]
    finally:
        stop.set()
        t.join()
    for frame in frames:
        assert frame["error"].isna().all()
        _consistent(det, frame, versions, tmp_path)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_decoding_is_bounded_per_image(tmp_path):
    """A 124 KB 16-bit 8000 x 8000 PNG is decoded with a few hundred MB (it took 2.5 GB); bigger frames and files
    are error rows, read no further than the limit."""
    import struct
    import zlib

    from memdetect.store import io
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    def png(w, h, depth, colour):
        raw = zlib.compress((b"\x00" * (1 + w * depth // 8 * {0: 1, 2: 3, 6: 4}[colour])) * h, 9)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
                + chunk(b"IDAT", raw) + chunk(b"IEND", b""))

    big16 = tmp_path / "big16.png"
    big16.write_bytes(png(8000, 8000, 16, 0))
    assert big16.stat().st_size < 200_000
    # VmHWM: this process's peak (ru_maxrss would also count the forked pytest it was exec'd from)
    code = ("import re, sys; from memdetect.store.io import load_image; a = load_image(sys.argv[1], 32); "
            "print(a.shape, re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    proc = subprocess.run([sys.executable, "-c", code, str(big16)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr
    shape, peak_kb = proc.stdout.rsplit(" ", 1)
    assert shape == "(3, 32, 32)" and int(peak_kb) < 600_000, proc.stdout
    header_only = tmp_path / "header.png"  # claims 8100 x 8100 (65.6 MP): refused before any pixel is decoded
    header_only.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8100, 8100, 16, 6, 0, 0, 0))
                            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(io.ImageError, match="image too large"):
        io.load_image(header_only, 32)
    with pytest.raises(io.ImageError, match=r"file too large \(\d+ bytes > 1000 bytes limit\)"):
        io.read_file(big16, limit=1000)
    old = io.MAX_DECODED_BYTES
    try:
        io.MAX_DECODED_BYTES = 100 * 2**20
        with pytest.raises(io.ImageError, match="too large to decode"):
            io.load_image(big16, 32)  # 8000 x 8000 x 2 bytes = 122 MB
    finally:
        io.MAX_DECODED_BYTES = old


# -- 4. every message is safe ----------------------------------------------------------------------------------------

HOSTILE = {
    "[/x]markup[bold].png": True,
    "newline\nmemdetect: scan OK, 0 flagged.png": True,
    "ansi\x1b]0;pwned\x07\x1b[31mred\x1b[0m.png": True,
    "pipe|tick`<b>bold</b>.png": True,
    "carriage\rreturn.png": True,
    "bidi\u202egnp.exe.png": True,
    "[/x]broken\n\x1b[2J.png": False,
}


def _hostile_folder(d: Path) -> Path:
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, ok in HOSTILE.items():  # a "/" in a name is a folder: "[/x]..." is the file "x]..." in folder "["
        (d / name).parent.mkdir(exist_ok=True)
        if ok:
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / name, format="PNG")
        else:
            (d / name).write_bytes(b"not an image")
    return d


def _safe(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text and "\x07" not in text, repr(text)
    assert "Traceback" not in text
    assert not any(line.startswith("memdetect: scan OK") for line in text.splitlines()), text


def test_hostile_file_names_are_escaped_everywhere(tiny_ddpm, tmp_path, monkeypatch):
    """Markup, ANSI/OSC escapes, newlines, carriage returns, bidi overrides, pipes and HTML in file names: the
    terminal (tables, summaries, skipped lines), logs, GitHub annotations and step summary, JUnit XML and HTML get
    them escaped, nothing tracebacks, exit codes follow the contract."""
    d = _hostile_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    scored = sum(HOSTILE.values())
    base = ["--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 0, "--threshold", "-1"]
    res = runner.invoke(app, ["-v", "scan", str(d), *map(str, base), "--top", "20", "-o", "new\nline\x1b[31m.csv",
                              "--html", "r.html"], env={"COLUMNS": "300"})
    assert res.exit_code == 1, res.output
    _safe(res.output)
    assert "[/x]markup[bold].png" in res.output and "newline\\nmemdetect: scan OK" in res.output
    assert "ansi\\x1b]0;pwned\\x07" in res.output and "skipped" in res.output
    html = Path("r.html").read_text()
    _safe(html)
    assert "<b>bold</b>" not in html and "pipe|tick`&lt;b&gt;bold&lt;/b&gt;.png" in html

    summary_md = tmp_path / "step.md"
    res = runner.invoke(app, ["audit", str(d), *map(str, base), "--junit", "j.xml", "--annotations", "github",
                              "-o", "a.csv"], env={"GITHUB_STEP_SUMMARY": str(summary_md), "COLUMNS": "300"})
    assert res.exit_code == 1, res.output
    _safe(res.output)
    annotations = [line for line in res.output.splitlines() if line.startswith("::")]
    assert len(annotations) == len(HOSTILE)  # one per file: no name started a command of its own
    assert any("newline%0Amemdetect%3A scan OK%2C 0 flagged.png" in a for a in annotations)
    md = summary_md.read_text()
    _safe(md)
    table = [line for line in md.splitlines() if line.startswith("| `")]
    # the flagged images' table, then the not-checked files' (an unreadable file fails the audit)
    assert len(table) == len(HOSTILE) and all(line.count("|") == 3 for line in table), md
    cases = ET.parse("j.xml").getroot().find("testsuite").findall("testcase")
    names = [c.get("name") for c in cases]
    assert len(names) == len(HOSTILE) and all(n.isprintable() for n in names)
    assert any("newline\\nmemdetect: scan OK" in n for n in names)


def test_log_lines_are_escaped(tiny_ddpm, tmp_path):
    """-v logs name files (weight files being hashed, journals): a name cannot add a line or an escape sequence."""
    model = tmp_path / "model\nFAKE: scan OK\x1b[31m"
    shutil.copytree(tiny_ddpm, model)
    write_images(tmp_path / "imgs", 2)
    cmd = [sys.executable, "-m", "memdetect", "-v", "scan", str(tmp_path / "imgs"), "--model", "ddpm", "--model-path",
           str(model), "--workers", "0", "--quiet", "-o", str(tmp_path / "r\nFAKE\x1b[2J.csv")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr
    assert "hashing weight file" in proc.stderr and "model\\nFAKE: scan OK\\x1b[31m" in proc.stderr
    _safe(proc.stderr)
    assert not any(line.startswith("FAKE") for line in proc.stderr.splitlines())


@pytest.mark.parametrize("args,needle", [
    (["--model", "[x]\x1b[31mred\nmemdetect: scan OK"], "unknown model"),
    (["--model", "[/x]\x1b[31mred\nmemdetect: scan OK"], "model"),
    (["--model", "ddpm", "--model-path", "/nonexistent/[/x]\x1b]0;t\x07"], "does not exist"),
    (["--model", "ddpm", "--model-path", "MODEL", "--layer", "no.[/x]\x1b[1m\nlayer"], "layer"),
    (["--model", "ddpm", "--model-path", "MODEL", "--metric", "[/x]\x1b[1m"], "unknown metric"),
    (["--model", "ddpm", "--model-path", "MODEL", "-o", "r.[/x]\n\x1b"], "report format"),
])
def test_hostile_flag_values_are_one_escaped_line(args, needle, tiny_ddpm, images_dir):
    args = [str(tiny_ddpm) if a == "MODEL" else a for a in args]
    res = runner.invoke(app, ["scan", str(images_dir), *args])
    assert res.exit_code == 2, res.output
    _safe(res.output)
    assert needle in one_error_line(res.output)


def test_a_hostile_model_name_in_a_config_is_one_escaped_line(images_dir, tmp_path):
    cfg = tmp_path / "memdetect.toml"
    cfg.write_text('model = "[x]\\u001b]0;title\\u0007\\nmemdetect: scan OK[/x]"\nthreshold = 1\n')
    res = invoke("audit", images_dir, "--config", cfg)
    assert res.exit_code == 2
    _safe(res.output)
    assert "model '[x]\\x1b]0;title\\x07\\nmemdetect: scan OK[/x]'" in one_error_line(res.output)


def test_an_empty_folder_with_a_hostile_name_is_one_line(tmp_path):
    d = tmp_path / "a\nmemdetect: scan OK\x1b[2J"
    d.mkdir()
    res = invoke("scan", d, "--model", "demo")
    assert res.exit_code == 2
    _safe(res.output)
    assert "no image files found under" in one_error_line(res.output)


def test_printable_is_the_one_helper():
    from memdetect.models.edm import safe_pickle
    assert printable("a\x1b[31m\n\r\x9b\u202e\ud800|`[/x]") == "a\\x1b[31m\\n\\r\\x9b\\u202e\\ud800|`[/x]"
    assert printable("x" * 10, 4) == "xxxx..." and printable("ünï") == "ünï"
    assert safe_pickle.printable("\x1b" * 200) == printable("\x1b" * 200, 120)


# -- 5. clean shutdown -----------------------------------------------------------------------------------------------

def _descendants(pid: int) -> set[int]:
    """Every process whose chain of parents leads to ``pid`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, parent in parents.items() if parent == p}
        todo += list(kids - found)
        found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 2), (signal.SIGINT, 130)])
def test_a_signal_mid_scan_stops_the_workers_and_keeps_the_journal(sig, code, tiny_ddpm, tmp_path):
    n, batch = 120, 4
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):  # 192 px images: decoding takes long enough for the workers to be busy when it lands
        Image.fromarray(np.full((192, 192, 3), i, np.uint8)).save(d / f"img_{i:03d}.png", compress_level=1)
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "memdetect", "scan", str(d), "--model", "ddpm", "--model-path", str(tiny_ddpm),
           "--output", str(out), "--batch-size", str(batch), "--workers", "2", "--quiet"]
    env = {**os.environ, **ONE_THREAD}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    journal = journal_path(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 2 * batch:
            break
        time.sleep(0.01)
    tree_before = _descendants(proc.pid)
    assert proc.poll() is None and len(tree_before) >= 2, "the scan should be running with its two workers"
    proc.send_signal(sig)
    start = time.monotonic()
    stdout, stderr = proc.communicate(timeout=30)
    while any(_alive(p) for p in tree_before) and time.monotonic() - start < 10:
        time.sleep(0.05)
    gone_after = time.monotonic() - start
    assert not any(_alive(p) for p in tree_before | {proc.pid}), "a worker outlived the scan"
    assert gone_after < 5, f"the process tree took {gone_after:.1f} s to go"
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and len([ln for ln in stderr.splitlines() if ln.startswith("memdetect:")]) == 1
    assert "rerun the command to continue" in stderr
    kept = journal.read_bytes().count(b"\n")
    assert kept >= 2 * batch and not out.exists()

    rerun = invoke(*cmd[3:-1])  # the same command, in this process
    assert rerun.exit_code == 0, rerun.output
    assert f"({kept} rows reused from its journal)" in rerun.output
    assert len(pd.read_csv(out)) == n


# -- 6. destinations checked before the scan ---------------------------------------------------------------------

@pytest.mark.parametrize("flag,target,needle", [
    ("--output", "folder.csv", "is a directory"),
    ("--output", "a_file/r.csv", "is not a folder"),
    ("--output", "link.csv", "is a symbolic link"),
    ("--html", "folder", "is a directory"),
    ("--junit", "folder", "is a directory"),
    ("--summary-json", "a_file/s.json", "is not a folder"),
    ("--junit", "a.csv", "are the same file"),
])
@pytest.mark.parametrize("command", ["scan", "audit"])
def test_destinations_are_checked_before_any_image_is_scored(command, flag, target, needle, tiny_ddpm, images_dir,
                                                             tmp_path, monkeypatch):
    if command == "scan" and flag in ("--junit", "--summary-json"):
        pytest.skip("audit only")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "a_file").write_text("")
    os.symlink(tmp_path / "victim", tmp_path / "link.csv")
    from memdetect.detector import Detector as D

    def scored(*a, **k):
        raise AssertionError("an image was scored before the destinations were checked")

    monkeypatch.setattr(D, "score_tensor", scored)
    out = [] if flag == "--output" else ["--output", "a.csv"]
    res = invoke(command, images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "1", *out,
                 flag, target)
    assert res.exit_code == 2 and needle in one_error_line(res.output), res.output
    assert one_error_line(res.output).startswith(f"memdetect: error: {flag} ") or target == "a.csv"  # the option
    assert not (tmp_path / "victim").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_refused_before_the_scan(tiny_ddpm, images_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        res = invoke("scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "-o", locked / "r.csv")
        assert res.exit_code == 2 and "no permission" in one_error_line(res.output)
    finally:
        os.chmod(locked, 0o700)


def test_a_symlinked_report_folder_or_gitignore_is_not_written_through(tiny_ddpm, images_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / ".memdetect")
    res = invoke("audit", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "1")
    assert res.exit_code == 2 and "is a symbolic link" in one_error_line(res.output)
    (tmp_path / ".memdetect").unlink()
    (tmp_path / ".memdetect").mkdir()
    os.symlink(elsewhere / "planted", tmp_path / ".memdetect" / ".gitignore")
    res = invoke("audit", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "1e9",
                 "--workers", 0)
    assert res.exit_code == 0, res.output
    assert os.listdir(elsewhere) == []
