"""Issue 30 family: `memdetect audit` finds images by content, not only by name. A memorized image committed as
``x.bin``, ``x.png.txt`` or with no suffix at all (a web app serves it with an image content type) is found in a
folder or tar shard by its leading bytes and scored; files that are not images by content are ignored as before;
``--suffix-only`` restores searching by suffix only. Played against the shipped demo model with a threshold
calibrated on examples/demo-reference (as tests/test_input_routes.py does)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

# the demo model's threshold and the in-process audit of tests/test_input_routes.py (one copy of each)
from .test_input_routes import GEN, MEM, audit, demo_config  # noqa: F401  (demo_config: a fixture)


def _pr_folder(d: Path) -> Path:
    """A pull request's files: code and text, a novel image, and the memorized one under names without an image
    suffix."""
    (d / "src").mkdir(parents=True)
    (d / "src" / "app.py").write_text("print('hello')\n")
    (d / "README").write_text("Python notes: P6 is a PPM magic, BM a BMP one, but this is text\n")
    (d / "data.bin").write_bytes(os.urandom(4096))
    (d / "empty").write_bytes(b"")
    (d / "gen.png").write_bytes(GEN.read_bytes())
    (d / "x.bin").write_bytes(MEM.read_bytes())
    (d / "src" / "avatar").write_bytes(MEM.read_bytes())  # served with an image content type, no suffix
    (d / "x.png.txt").write_bytes(MEM.read_bytes())
    return d


def test_a_memorized_image_without_an_image_suffix_in_a_folder_fails_the_audit(demo_config, tmp_path):
    d = _pr_folder(tmp_path / "pr")
    code, doc, df, out = audit(tmp_path, demo_config, d, extra=["--html", tmp_path / "r.html", "--junit",
                                                                tmp_path / "j.xml", "--annotations", "github"])
    assert code == 1, out
    assert "x.bin" in (tmp_path / "r.html").read_text() and "x.bin" in (tmp_path / "j.xml").read_text()
    assert "::error file=" in out and "x.bin" in out
    flagged = sorted(Path(p["path"]).name for p in doc["flagged_images"])
    assert flagged == ["avatar", "x.bin", "x.png.txt"], out
    # the text, code, random bytes and empty file are not rows; no error row either
    assert sorted(Path(p).name for p in df["path"]) == ["avatar", "gen.png", "x.bin", "x.png.txt"]
    assert doc["errored"] == 0
    by = dict(zip(df["path"].map(lambda p: Path(p).name), df["found_by"]))
    assert by == {"avatar": "content", "gen.png": "name", "x.bin": "content", "x.png.txt": "content"}
    assert {f["found_by"] for f in doc["flagged_images"]} == {"content"}


def test_suffix_only_restores_the_old_search(demo_config, tmp_path):
    d = _pr_folder(tmp_path / "pr")
    code, doc, df, out = audit(tmp_path, demo_config, d, extra=["--suffix-only"])
    assert code == 0, out
    assert [Path(p).name for p in df["path"]] == ["gen.png"]
    assert "found_by" not in df.columns  # a report with no row found by content is as before


def test_a_memorized_member_without_an_image_suffix_in_a_tar_fails_the_audit(demo_config, tmp_path):
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("000.txt", b"a caption\n"), ("000.png", GEN.read_bytes()), ("001.bin", MEM.read_bytes()),
                           ("001.json", b'{"label": 3}'), ("002", MEM.read_bytes())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("003")  # not a regular file, no image suffix: not sniffed, not a row (as before)
        link.type, link.linkname = tarfile.SYMTYPE, "001.bin"
        tar.addfile(link)
    code, doc, df, out = audit(tmp_path, demo_config, shard)
    assert code == 1, out
    assert list(df["path"]) == [f"{shard}::000.png", f"{shard}::001.bin", f"{shard}::002"]
    assert sorted(p["path"] for p in doc["flagged_images"]) == [f"{shard}::001.bin", f"{shard}::002"]
    assert list(df["found_by"]) == ["name", "content", "content"]
    code, doc, df, out = audit(tmp_path, demo_config, shard, extra=["--suffix-only"])
    assert code == 0, out
    assert list(df["path"]) == [f"{shard}::000.png"]


def test_a_text_file_named_like_an_image_still_fails_closed(demo_config, tmp_path):
    d = tmp_path / "pr"
    d.mkdir()
    (d / "notes.png").write_text("not an image\n")
    (d / "gen.png").write_bytes(GEN.read_bytes())
    (d / "notes.txt").write_text("text\n")
    code, doc, df, out = audit(tmp_path, demo_config, d)
    assert code == 1, out
    assert [n["path"] for n in doc["not_checked"]] == [str(d / "notes.png")]
    assert sorted(Path(p).name for p in df["path"]) == ["gen.png", "notes.png"]


def test_a_file_with_an_image_signature_that_does_not_decode_fails_closed(demo_config, tmp_path):
    d = tmp_path / "pr"
    d.mkdir()
    (d / "gen.png").write_bytes(GEN.read_bytes())
    (d / "blob.dat").write_bytes(MEM.read_bytes()[:200])  # a PNG cut off: claims to be an image, cannot be checked
    code, doc, df, out = audit(tmp_path, demo_config, d)
    assert code == 1, out
    assert [n["path"] for n in doc["not_checked"]] == [str(d / "blob.dat")]
    code, doc, df, out = audit(tmp_path, demo_config, d, extra=["--suffix-only"])
    assert code == 0, out


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM"])
def test_sniff_knows_every_format_of_the_image_suffixes(tmp_path, fmt):
    from memdetect.store.io import SNIFF_BYTES, looks_like_image, sniff_image

    buf = io.BytesIO()
    Image.open(GEN).convert("RGB").save(buf, format=fmt)
    p = tmp_path / "x"
    p.write_bytes(buf.getvalue())
    assert sniff_image(p)
    assert looks_like_image(buf.getvalue()[:SNIFF_BYTES])


@pytest.mark.parametrize("head", [b"", b"Python is nice\n", b"P6 not a size\n", b"BM but text that goes on\n",
                                  b"\x89PNG", b"GIF8", b"RIFF\x10\x00\x00\x00WAVEfmt ", b"#!/bin/sh\n",
                                  b"\x7fELF\x02\x01\x01\x00", b"PK\x03\x04", b"%PDF-1.7\n"])
def test_sniff_ignores_what_is_not_an_image(tmp_path, head):
    from memdetect.store.io import sniff_image

    p = tmp_path / "x"
    p.write_bytes(head)
    assert not sniff_image(p)


def test_sniff_reads_a_few_leading_bytes_only_and_skips_what_is_not_a_regular_file(tmp_path, monkeypatch):
    from memdetect.store import io as mio
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * (1 << 20))
    reads = []
    real_read = os.read
    monkeypatch.setattr(mio.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    assert not mio.sniff_image(big)
    assert reads and sum(reads) <= mio.SNIFF_BYTES
    monkeypatch.undo()
    os.mkfifo(tmp_path / "fifo")
    assert not mio.sniff_image(tmp_path / "fifo")  # never waited on
    (tmp_path / "dir").mkdir()
    assert not mio.sniff_image(tmp_path / "dir")
    os.symlink(tmp_path / "missing", tmp_path / "broken")
    assert not mio.sniff_image(tmp_path / "broken")
    assert mio.discover([tmp_path], sniff=True) == []


def test_git_s_own_folder_is_not_searched_by_content(tmp_path):
    from memdetect.store.io import discover

    lfs = tmp_path / ".git" / "lfs" / "objects" / "ab" / "cd"
    lfs.mkdir(parents=True)
    (lfs / "abcd1234").write_bytes(MEM.read_bytes())  # an LFS cache: raw bytes of images of other commits
    (tmp_path / "x.bin").write_bytes(MEM.read_bytes())
    assert discover([tmp_path], sniff=True) == [tmp_path / "x.bin"]
    assert discover([tmp_path / ".git"], sniff=True) == [lfs / "abcd1234"]  # asked for by name: searched
