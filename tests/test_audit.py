"""`memdetect audit`: the bad-file corpus (every file a row, no traceback, exit code per the contract) and the CI
outputs (JSON summary, JUnit XML, GitHub annotations, HTML report)."""

import json
import os
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from memdetect.workflows import ci
from memdetect.cli import app
from memdetect.store.io import ImageError, display_path, load_image

runner = CliRunner()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def invoke(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (a decompression bomb's header) but carries no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def make_corpus(d: Path) -> dict[str, str | None]:
    """Write the bad-file corpus into ``d``; return {display path: expected error substring, or None if scored}."""
    d.mkdir()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    expect: dict[Path, str | None] = {}

    def save(name, img, ok=True, **kw):
        img.save(d / name, **kw)
        expect[d / name] = None if ok else ok

    (d / "zero_bytes.png").write_bytes(b"")
    expect[d / "zero_bytes.png"] = "empty file (0 bytes)"
    photo.save(d / "full.jpg", quality=90)
    (d / "truncated.jpg").write_bytes((d / "full.jpg").read_bytes()[:700])
    (d / "full.jpg").unlink()
    expect[d / "truncated.jpg"] = "corrupt or unreadable image"
    photo.save(d / "full.png")
    (d / "truncated.png").write_bytes((d / "full.png").read_bytes()[:400])
    (d / "full.png").unlink()
    expect[d / "truncated.png"] = "corrupt or unreadable image"
    (d / "text.png").write_text("just some text, named like an image\n")
    expect[d / "text.png"] = "not a recognised image format"
    save("rgba.png", photo.convert("RGBA"))
    save("la.png", photo.convert("LA"))
    save("palette.png", photo.convert("P"))
    save("palette_transparent.gif", photo.convert("P"), transparency=0)
    save("cmyk.jpg", photo.convert("CMYK"))
    save("sixteen_bit.png", Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)))
    save("one_bit.png", photo.convert("1"))
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    (d / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))
    expect[d / "bomb.png"] = "decompression bomb"
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    expect[d / "animated.gif"] = None
    frames[0].save(d / "multipage.tiff", save_all=True, append_images=frames[1:])
    expect[d / "multipage.tiff"] = None
    save("photo.webp", photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("exif_rotated.jpg", photo, exif=exif.tobytes())
    if not IS_ROOT:  # root reads anything: the file-permission case is tested where it can be
        photo.save(d / "unreadable.png")
        os.chmod(d / "unreadable.png", 0)
        expect[d / "unreadable.png"] = "permission denied"
    os.symlink(d / "does_not_exist.png", d / "broken_link.png")
    expect[d / "broken_link.png"] = "broken symbolic link"
    os.symlink(d / "loop_b.png", d / "loop_a.png")
    os.symlink(d / "loop_a.png", d / "loop_b.png")
    expect[d / "loop_a.png"] = expect[d / "loop_b.png"] = "broken symbolic link"
    (d / "folder.png").mkdir()
    expect[d / "folder.png"] = "is a directory"
    os.mkfifo(d / "fifo.png")  # opening it would block forever
    expect[d / "fifo.png"] = "not a regular file (fifo)"
    raw = os.fsencode(d) + b"/latin1_\xe9t\xe9.png"  # not valid UTF-8
    with open(raw, "wb") as f:
        photo.save(f, format="PNG")
    expect[Path(os.fsdecode(raw))] = None
    (d / "[").mkdir()  # rich markup in a path ("[/bold]", "[/b]") must be printed, not parsed
    save("[/bold] markup [red].png", photo)
    (d / "[/b]broken.png").write_bytes(b"x")
    expect[d / "[/b]broken.png"] = "not a recognised image format"
    save("new\nline, comma %0A.png", photo)  # CSV quoting, annotation escaping
    save("UPPER.PNG", photo)
    save("png_named.jpg", photo, format="PNG")  # decoded by content, not by suffix
    os.symlink(d / "rgba.png", d / "good_link.png")
    expect[d / "good_link.png"] = None
    (d / "notes.txt").write_text("not an image suffix: not part of the scan")
    return {display_path(p): v for p, v in expect.items()}


def test_bad_file_corpus_every_file_accounted_for(tiny_ddpm, tmp_path):
    """Twenty-odd kinds of awkward input through the real console script (with a decoding worker process)."""
    corpus = tmp_path / "corpus"
    expect = make_corpus(corpus)
    assert len(expect) >= 25
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "memdetect", "audit", str(corpus), "--model", "ddpm", "--model-path", str(tiny_ddpm),
           "--threshold", "-1e9", "--output", str(out), "--summary-json", str(tmp_path / "s.json"),
           "--junit", str(tmp_path / "j.xml"), "--html", str(tmp_path / "r.html"), "--annotations", "github",
           "--batch-size", "4", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see test_journal.ONE_THREAD
    proc = subprocess.run(cmd, capture_output=True, timeout=300, cwd=tmp_path, env=env)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr and "Traceback" not in proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 1, stderr  # every scored image is flagged at -1e9 (and unreadable files fail too)

    records = json.loads(out.read_text())["rows"]
    rows = pd.DataFrame(records)
    assert sorted(rows["path"]) == sorted(expect)  # exactly one row per file: none dropped, none doubled
    got = {r["path"]: r["error"] for r in records}
    for path, needle in expect.items():
        if needle is None:
            assert got[path] is None, f"{path!r} should be scored: {got[path]}"
        else:
            assert got[path] is not None and needle in got[path], f"{path!r}: {got[path]!r} lacks {needle!r}"
    scored = rows[rows["error"].isna()]
    assert np.isfinite(scored[["score", "std", "l4l2", "entropy", "maxmin"]].to_numpy(float)).all()
    assert scored["key"].notna().all()

    n_bad = sum(v is not None for v in expect.values())
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["images"], summary["scored"], summary["errored"], summary["flagged"]) == (
        len(expect), len(expect) - n_bad, n_bad, len(expect) - n_bad)
    assert f"{len(expect)} images: {len(expect) - n_bad} scored, {n_bad} errored" in proc.stdout.decode()
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert len(suite.findall("testcase")) == len(expect)
    assert len(suite.findall("testcase/failure")) == len(expect) - n_bad
    assert len(suite.findall("testcase/error")) == n_bad  # not checked: fails the audit
    annotations = [line for line in proc.stdout.decode().splitlines() if line.startswith("::")]
    assert len(annotations) == len(expect)  # one ::error per flagged and per file not checked
    assert any("new%0Aline%2C comma %250A.png" in a for a in annotations)
    assert (tmp_path / "r.html").stat().st_size > 1000


def test_corpus_without_threshold_exits_0(tiny_ddpm, tmp_path):
    expect = make_corpus(tmp_path / "corpus")
    res = invoke("scan", tmp_path / "corpus", "--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 0,
                 "-o", tmp_path / "r.csv")
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    assert len(df) == len(expect)


@pytest.mark.skipif(IS_ROOT, reason="root can read a chmod 000 file")
def test_unreadable_file_is_an_error_row(tmp_path):
    p = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(p)
    os.chmod(p, 0)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(p, 8)


def test_permission_error_maps_to_a_row_even_as_root(tmp_path, monkeypatch):
    """The same code path as a chmod 000 file, simulated so that it also runs as root."""
    p = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(p)

    real_open = os.open

    def denied(path, *args, **kwargs):  # what opening a chmod 000 file does (the file is read once, with os.open)
        if os.fspath(path) == os.fspath(p):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ImageError, match="^permission denied$"):
        load_image(p, 8)


# -- CI outputs --------------------------------------------------------------------------------------------------
def _frame():
    from memdetect.store.report import rows_to_frame

    rows = [
        {"path": "a.png", "score": 2.0, "std": 2.0, "l4l2": 0.5, "entropy": 0.1, "maxmin": 9.0, "memorized": True,
         "error": None, "key": "k1"},
        {"path": "b.png", "score": 0.1, "std": 0.1, "l4l2": 0.2, "entropy": 0.0, "maxmin": 1.0, "memorized": False,
         "error": None, "key": "k2"},
        {"path": "c\x01d,e:f.png", "score": None, "std": None, "l4l2": None, "entropy": None, "maxmin": None,
         "memorized": None, "error": "not a recognised image format", "key": None},
    ]
    return rows_to_frame(rows)


SETTINGS = {"model": "demo", "metric": "std", "threshold": 1.5, "layer": "x"}


def test_junit_xml_maps_flagged_to_failures_and_errors_to_not_checked_errors():
    root = ET.fromstring(ci.junit_xml(_frame(), SETTINGS))
    suite = root.find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "1" and suite.get("errors") == "1"
    assert suite.get("skipped") == "0"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"a.png", "b.png", "c\\x01d,e:f.png"}  # a control character is not valid XML 1.0
    assert cases["a.png"].find("failure").get("message") == "memorized: std 2 >= threshold 1.5"
    assert list(cases["b.png"]) == []
    assert cases["c\\x01d,e:f.png"].find("error").get("message") == "not checked: not a recognised image format"
    # --allow-errors: an unreadable file is skipped, as before the audit failed closed
    suite = ET.fromstring(ci.junit_xml(_frame(), SETTINGS, allow_errors=True)).find("testsuite")
    assert suite.get("errors") == "0" and suite.get("skipped") == "1"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert "not a recognised image format" in cases["c\\x01d,e:f.png"].find("skipped").get("message")


def test_github_annotations_are_escaped_and_relative_to_the_workspace(tmp_path):
    df = _frame()
    df.loc[0, "path"] = str(tmp_path / "imgs" / "a.png")
    lines = ci.github_annotations(df, SETTINGS, workspace=str(tmp_path))
    assert lines[0] == ("::error file=imgs/a.png,title=memdetect%3A memorized image::"
                        "memorized: std 2 >= threshold 1.5")
    assert lines[1] == ("::error file=c\\x01d%2Ce%3Af.png,title=memdetect%3A not checked::"
                        "not a recognised image format")  # a control character is written as an escape
    assert len(lines) == 2
    assert ci.github_annotations(df, SETTINGS, workspace=str(tmp_path), allow_errors=True)[1] == (
        "::warning file=c\\x01d%2Ce%3Af.png,title=memdetect%3A not scored::not a recognised image format")
    doc = ci.summary(df, exit_code=1, settings=SETTINGS)
    md = ci.step_summary_markdown(doc)
    assert "| 3 | 2 | 1 | 1 | 1 |" in md and "imgs/a.png" in md


def test_audit_needs_a_threshold_and_valid_annotations(tiny_ddpm, images_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./memdetect.toml here
    res = invoke("audit", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm)
    assert res.exit_code == 2 and "audit needs a threshold" in res.output
    res = invoke("audit", images_dir, "--threshold", "1", "--annotations", "gitlab")
    assert res.exit_code == 2 and "--annotations must be" in res.output
    res = invoke("audit", images_dir, "--config", tmp_path / "nope.toml")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_audit_uses_the_memdetect_toml_it_is_given(tiny_ddpm, images_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # named with --config: ./memdetect.toml is never read by itself (tests/test_trust.py)
    Path("memdetect.toml").write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = 1e9\n')
    res = invoke("audit", images_dir, "--config", "memdetect.toml", "--workers", 0,
                 env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": "s.md"})
    assert res.exit_code == 0, res.output
    assert "5 images: 5 scored, 0 errored, 0 flagged memorized (std >= 1e+09, config memdetect.toml)" in res.output
    assert "| 5 | 5 | 0 | 0 | 0 |" in Path("s.md").read_text()
    res = invoke("audit", images_dir, "--config", "memdetect.toml", "--threshold", "-1", "--workers", 0,
                 env={"GITHUB_ACTIONS": "true"})
    assert res.exit_code == 1 and "(no journal read: every image scored)" in res.output  # resuming is opt-in
    assert res.output.count("::error file=") == 5
    res = invoke("audit", images_dir, "--config", "memdetect.toml", "--threshold", "-1", "--workers", 0, "--resume",
                 env={"GITHUB_ACTIONS": "true"})
    assert res.exit_code == 1 and "5 rows reused from its journal" in res.output
    assert res.output.count("::error file=") == 5
    assert sorted(os.listdir(".memdetect")) == [".gitignore", "report.csv"]  # the journal is in the state dir


def test_html_report(tiny_ddpm, images_dir, tmp_path):
    html = tmp_path / "r.html"
    (images_dir / "bad <b>.png").write_bytes(b"")
    res = invoke("scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "-1",
                 "--html", html, "--workers", 0)
    assert res.exit_code == 1, res.output
    text = html.read_text()
    # the histogram; per flagged image its thumbnail and activation map, and the map again in the table
    assert text.count("data:image/png;base64,") == 1 + 5 * 3 and text.count("<tr class='row") == 6
    assert "Flagged images (5" in text and "threshold" in text and "up_blocks.0.resnets.2.conv2:in" in text
    assert "bad &lt;b&gt;.png" in text and "<b>.png" not in text  # names are escaped
    assert "http" not in text.replace("http-equiv", "")  # self-contained: nothing to fetch


def test_unwritable_output_is_one_line_and_exit_2(tiny_ddpm, images_dir, tmp_path):
    (tmp_path / "a_file").write_text("x")
    res = invoke("audit", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "1",
                 "--output", tmp_path / "a_file" / "r.csv")
    assert res.exit_code == 2 and "memdetect: error:" in res.output and "a_file" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_a_folder_that_cannot_be_listed_is_reported_not_skipped(tmp_path, monkeypatch):
    from memdetect.store.io import discover

    (tmp_path / "ok").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "ok" / "a.png")
    (tmp_path / "locked").mkdir()
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # what os.walk meets in a chmod 000 folder, also as root
    assert discover([tmp_path]) == [tmp_path / "locked", tmp_path / "ok" / "a.png"]


@pytest.mark.skipif(IS_ROOT, reason="root can list a chmod 000 folder")
def test_unlistable_folder_is_an_error_row(tmp_path):
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", 0)
    try:
        with pytest.raises(ImageError, match="folder cannot be listed"):
            load_image(tmp_path / "locked", 8)
    finally:
        os.chmod(tmp_path / "locked", 0o700)
