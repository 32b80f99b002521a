"""The captured terminals in docs/ (issue 32: readability is judged by a person, from real output): every file in
docs/terminal/ is made by benchmarks/capture_terminal.py, docs/terminal.md shows each one verbatim, and the
captures without timings (``--help``, the one-line errors, ``memdetect models``) still match what the commands print
now, so they cannot rot silently. The fix when one fails: ``python benchmarks/capture_terminal.py``."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from .conftest import REPO

HINT = "rerun `python benchmarks/capture_terminal.py` and review the diff"


def _script():
    spec = importlib.util.spec_from_file_location("capture_terminal", REPO / "benchmarks" / "capture_terminal.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["capture_terminal"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


CAP = _script()
CHEAP = [c for c in CAP.CAPTURES if c.cheap]


def test_every_capture_file_is_made_by_the_script_and_shown_on_the_page():
    made = {c.name for c in CAP.CAPTURES}
    present = {p.name for p in CAP.OUT.iterdir()}
    assert present == made, f"not made by the script: {sorted(present - made)}; missing: {sorted(made - present)}"
    assert CAP.PAGE.read_text(encoding="utf-8") == CAP.page(), HINT
    nav = (REPO / "mkdocs.yml").read_text()
    assert "terminal.md" in nav
    assert "docs/terminal.md" in (REPO / "README.md").read_text()
    # the README's quick start command is the one captured, and what the audit capture promises is what it shows
    quick = (CAP.OUT / "quick-start.txt").read_text()
    first = CAP.CAPTURES[0].steps[0].command
    assert first in (REPO / "README.md").read_text() and f"$ {first}" in quick
    assert re.search(r"20 flagged memorized.*\n(?:.*\n)*\(exit 1\)\n$", quick)


def _versions_of(text: str) -> str:
    return text.splitlines()[0].rsplit("(", 1)[1].rstrip(")")


@pytest.mark.parametrize("capture", CHEAP, ids=[c.name for c in CHEAP])
def test_captures_without_timings_regenerate_byte_identically(capture, tmp_path):
    recorded = (CAP.OUT / capture.name).read_text(encoding="utf-8")
    CAP.prepare(tmp_path)
    now = CAP.render(capture, tmp_path)
    same_versions = _versions_of(recorded) == _versions_of(now)
    if same_versions or "--help" not in capture.steps[0].command:
        assert now.split("\n", 1)[1] == recorded.split("\n", 1)[1], f"{capture.name} is stale: {HINT}"
    else:  # another typer/rich lays the help out differently: the options it lists must still be the same
        options = lambda text: set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))  # noqa: E731
        assert options(now) == options(recorded), f"{capture.name} is stale: {HINT}"


def test_the_captures_are_80_columns_where_the_cli_lays_out_text():
    """`--help`, tables and the models list fit 80 columns (one-line messages are one line, however long)."""
    for name in ("scan-help-80-columns.txt", "models-80-columns.txt", "quick-start.txt"):
        for line in (CAP.OUT / name).read_text(encoding="utf-8").splitlines()[2:]:
            laid_out = line[:1] in "│╭╰┃┏┡└ " or name != "quick-start.txt"
            if laid_out and not line.startswith("$ "):
                assert len(line) <= 80, (name, line)

