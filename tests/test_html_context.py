"""The HTML page for reviewers (issue 32): the verdict and exit code at the top, the run context (command line, UTC
time, version, config name and SHA-256, git commit of the scanned checkout, model, layer, timestep, metric,
threshold), and the copy search explained, with a line saying whether training images were searched."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memdetect.cli import app
from memdetect.workflows.run_context import git_commit

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
SHA = "0123456789abcdef0123456789abcdef01234567"


class Page(HTMLParser):
    """The parts of the page the tests read: text by element id, the context table, every src/href."""

    def __init__(self, text: str):
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.context: dict[str, str] = {}
        self.links: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self._cell: list[str] = []
        self._row: list[str] = []
        self.order: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if a.get(k)]
        if a.get("id"):
            self.order.append(a["id"])
        if tag in ("meta", "img", "br", "link", "input"):
            return
        self._open.append((tag, a.get("id")))
        if tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag):
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break
        if tag in ("th", "td"):
            self._row.append("".join(self._cell).strip())
        if tag == "tr":
            if any(i == "run-context" for t, i in self._open if t == "table") and len(self._row) == 2:
                self.context[self._row[0]] = self._row[1]
            self._row = []

    def handle_data(self, data):
        self._cell.append(data)
        for _, i in self._open:
            if i:
                self.by_id[i] = self.by_id.get(i, "") + data


def fake_checkout(root: Path) -> Path:
    """A git checkout's files as git writes them (HEAD names a branch; the branch's ref is packed)."""
    (root / ".git" / "refs" / "heads").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled fully-peeled sorted\n{SHA} refs/heads/main\n")
    return root


def test_git_commit_read_from_the_checkout_files(tmp_path):
    repo = fake_checkout(tmp_path / "repo")
    (repo / "a" / "b").mkdir(parents=True)
    assert git_commit(repo / "a" / "b") == SHA
    (repo / ".git" / "refs" / "heads" / "main").write_text("f" * 40 + "\n")  # a loose ref wins over packed-refs
    assert git_commit(repo / "a") == "f" * 40
    (repo / ".git" / "HEAD").write_text("e" * 40 + "\n")  # detached HEAD
    assert git_commit(repo) == "e" * 40
    (repo / ".git" / "HEAD").write_text("ref: ../../etc/passwd\n")
    assert git_commit(repo) is None
    assert git_commit(tmp_path / "elsewhere") is None
    if shutil.which("git"):  # the real thing, where git is installed: the same commit as `git rev-parse HEAD`
        real = tmp_path / "real"
        real.mkdir()
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        run = lambda *a: subprocess.run(["git", *a], cwd=real, env=env, check=True, capture_output=True,  # noqa: E731
                                        text=True).stdout.strip()
        run("init", "-q")
        (real / "x.txt").write_text("x")
        run("add", "x.txt")
        run("commit", "-qm", "x")
        assert git_commit(real / "x.txt") == run("rev-parse", "HEAD")
        run("pack-refs", "--all")
        assert git_commit(real) == run("rev-parse", "HEAD")


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory):
    from memdetect import Detector
    from memdetect.workflows.calibrate import calibrate_paths

    tmp = tmp_path_factory.mktemp("cfg")
    det = Detector.from_pretrained("demo", device="cpu")
    refs = sorted((REPO / "examples" / "demo-reference").glob("*.png"))[:40]
    calibrate_paths(det, refs, fpr=0.05, output=tmp / "memdetect.toml", num_workers=0)
    return tmp / "memdetect.toml"


def _checkout(tmp_path: Path) -> Path:
    repo = fake_checkout(tmp_path / "checkout")
    images = repo / "images"
    images.mkdir()
    demo = sorted((REPO / "examples" / "demo").glob("*.png"))
    for p in [q for q in demo if q.name.startswith("mem_")][:2] + [q for q in demo if q.name.startswith("gen_")][:2]:
        shutil.copy(p, images / p.name)
    (images / "broken.png").write_bytes(b"not an image")
    return images


def test_audit_page_verdict_context_and_copy_search(tmp_path, demo_config, monkeypatch):
    images = _checkout(tmp_path)
    html = tmp_path / "out" / "report.html"
    args = ["audit", str(images), "--config", str(demo_config), "--html", str(html), "--output",
            str(tmp_path / "out" / "report.csv"), "--annotations", "none", "--workers", "0",
            "--state-dir", str(tmp_path / "state")]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/memdetect", *args])  # what the console script sees
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output  # flagged, and one image not checked
    text = html.read_text()
    page = Page(text)
    df = pd.read_csv(tmp_path / "out" / "report.csv")
    flagged = int(df["memorized"].fillna(False).astype(bool).sum())
    verdict = " ".join(page.by_id["verdict"].split())
    assert verdict.startswith("FAIL") and "exit code 1" in verdict, verdict
    assert f"{flagged} flagged" in verdict and "1 not checked" in verdict and "4 of 5 images scored" in verdict
    assert page.order.index("verdict") < page.order.index("counts") < page.order.index("context")  # at the top
    assert len(page.order) == len(set(page.order))  # ids are unique
    ctx = page.context
    assert ctx["command line"] == "memdetect " + " ".join(args)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", ctx["time (UTC)"])
    from memdetect import __version__
    assert ctx["memdetect version"] == __version__
    assert ctx["config file"] == "memdetect.toml"
    assert ctx["config SHA-256"] == hashlib.sha256(demo_config.read_bytes()).hexdigest()
    assert ctx["git commit of the scanned checkout"] == SHA
    assert ctx["model"] == "demo" and ctx["metric"] == "std" and ctx["layer"] and ctx["timestep"]
    from memdetect.config import load_config
    assert float(ctx["threshold"]) == pytest.approx(load_config(demo_config).threshold, rel=1e-5)
    assert "nearest training image" in page.by_id["copy-search"].lower()
    assert "No training images were searched" in page.by_id["copy-search-done"]
    assert not [u for u in page.links if not u.startswith(("data:", "#"))]  # self-contained


def test_scan_page_with_reference_dir_and_without_threshold(tmp_path):
    images = _checkout(tmp_path)
    (images / "broken.png").unlink()
    html = tmp_path / "scan.html"
    res = runner.invoke(app, ["scan", str(images), "--model", "demo", "--html", str(html), "--workers", "0",
                              "--quiet", "--state-dir", str(tmp_path / "state")])
    assert res.exit_code == 0, res.output
    page = Page(html.read_text())
    verdict = " ".join(page.by_id["verdict"].split())
    assert verdict.startswith("NOT JUDGED") and "exit code 0" in verdict and "not checked" not in verdict
    assert page.context["config file"].startswith("none") and page.context["threshold"].startswith("none")
    assert page.context["config SHA-256"] == "none"
    assert page.context["git commit of the scanned checkout"] == SHA

    res = runner.invoke(app, ["scan", str(images), "--model", "demo", "--threshold", "0", "--html", str(html),
                              "--workers", "0", "--quiet", "--reference-dir", str(REPO / "examples" / "demo"),
                              "--evidence-top", "1", "--state-dir", str(tmp_path / "state")])
    assert res.exit_code == 1, res.output
    page = Page(html.read_text())
    verdict = " ".join(page.by_id["verdict"].split())
    assert verdict.startswith("FAIL") and "exit code 1" in verdict and "4 flagged" in verdict
    done = page.by_id["copy-search-done"]
    assert "Searched in this run" in done and "images)" in done and "No training images" not in done
