"""The documentation: README's relative links resolve, and the docs/ site builds with MkDocs in strict mode (a broken
link, a missing page or a page left out of the navigation fails it)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_links_resolve():
    links = relative_links((REPO / "README.md").read_text(encoding="utf-8"))
    assert any(t.startswith("docs/") for t in links)  # the deeper material lives in docs/
    missing = [t for t in links if not (REPO / t.split("#")[0]).exists()]
    assert not missing, missing


def test_relative_links_are_found_by_the_check():
    assert relative_links("see [a](docs/x.md#y), [b](https://x.org) and [c](#here)") == ["docs/x.md#y"]


def _build(config, tmp_path):
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d",
                           str(tmp_path / "site")], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[test]' installs it)")
def test_docs_site_builds_strict(tmp_path):
    res = _build(REPO / "mkdocs.yml", tmp_path)
    assert res.returncode == 0, res.stderr
    # and strict mode does fail on a broken link: the same site with one page linking to a page that does not exist
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    (docs / "index.md").write_text((docs / "index.md").read_text() + "\n[gone](no-such-page.md)\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text((REPO / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}"))
    res = _build(config, tmp_path)
    assert res.returncode != 0 and "no-such-page.md" in res.stderr
