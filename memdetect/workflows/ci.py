"""The CI audit: a scan with a calibrated threshold, and its outputs for CI systems (a JSON summary, JUnit XML,
GitHub Actions annotations and step summary).

    from memdetect.workflows.ci import audit
    done = audit(detector_with_threshold, ["generated/"], junit="junit.xml", summary_json="summary.json")
    done.exit_code                                     # 0: all checked, nothing flagged; 1: flagged or not checked

Why three: the JSON summary is for scripts (counts, exit code, flagged paths); JUnit XML is what most CI servers
(GitLab, Jenkins, Azure, GitHub test reporters) render as a test list, one test case per image; GitHub reads
``::error file=...::`` lines from a step's output and pins them to the files in the pull request.

The mapping is the exit-code contract's: a flagged image is a *failure*; a scored, unflagged image passes. The audit
fails closed: an input that could not be checked (an error row: unreadable, too large, not a regular file or tar
member, undecodable, too many frames, a remote URL without ``--allow-remote``) is listed as *not checked* (a JUnit
``<error>``, the summary's ``not_checked``, a GitHub ``::error``) and makes the exit code 1, as a flagged image does:
an attacker who controls the inputs must not pass by making an image unreadable. ``allow_errors=True``
(``--allow-errors``, or ``allow_errors = true`` in the config) restores reporting them as *skipped* without failing.

The default report goes to ``.memdetect/report.csv``; a report folder named ``.memdetect`` gets a ``.gitignore``
that keeps it out of git. The audit's journal is not there: it lives in the state directory (``memdetect.store.state``),
keyed by the settings, the weights' content hash and the report path, and is only read with ``resume=True``
(``--resume``). Every destination is checked before any image is read.

Names in CI outputs are escaped for the place they go: control characters become escapes
(``memdetect.text.printable``) in annotations, the step summary (where ``|`` and backticks are escaped too, so a file
name cannot break the table) and JUnit XML; GitHub's own ``%``-escapes keep a newline in a file name from starting
a workflow command.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TextIO

import pandas as pd

from .._version import __version__
from ..detector import Detector
from ..settings import check_threshold as check_finite_threshold
from ..errors import UsageError
from ..store.io import atomic_write, check_destinations, display_path
from ..store.report import counts
from ..store.sources import files_to_audit
from .run_context import run_context
from .scan import ScanResult, scan
from ..core.scores import SCORES
from ..store.state import StateDir
from ..text import printable

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FLAGGED = 0, 1
DEFAULT_REPORT = Path(".memdetect") / "report.csv"
ANNOTATIONS = ("auto", "github", "none")

#: Characters XML 1.0 forbids (even escaped); they can occur in file names.
_XML_BAD = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_safe(s: str) -> str:
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", printable(s))


def _flagged(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["memorized"].fillna(False).astype(bool)].sort_values("score", ascending=False)


def _errored(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["error"].notna()]


def _reason(row, metric: str, threshold: float | None) -> str:
    p = row.get("p_value") if hasattr(row, "get") else None
    shown = f" (p = {p:.3g})" if p is not None and pd.notna(p) else ""
    return f"memorized: {metric} {row['score']:.6g} >= threshold {threshold:.6g}{shown}"


def _flagged_entry(r) -> dict:
    """A flagged image in the summary: path, score and, with a calibrated reference, p-value and percentile."""
    entry = {"path": r["path"], "score": float(r["score"])}
    if "found_by" in r and pd.notna(r["found_by"]):
        entry["found_by"] = str(r["found_by"])
    for k in ("p_value", "percentile"):
        if k in r and pd.notna(r[k]):
            entry[k] = float(r[k])
    return entry


def summary(df: pd.DataFrame, *, exit_code: int, settings: dict, config: str | None = None,
            report: str | None = None, resumed: int = 0, resume: bool = False, rejected: int = 0,
            allow_errors: bool = False) -> dict:
    """The machine-readable result of a run: counts, exit code, whether a journal was read (``resume``), how many
    rows it gave (``resumed``) and how many of its rows failed verification (``journal_rows_rejected``), flagged
    images (highest first), errors, and ``not_checked``: the error rows that fail the audit (empty with
    ``allow_errors``)."""
    flagged, errored = _flagged(df), _errored(df)
    errors = [{"path": r["path"], "error": str(r["error"])} for _, r in errored.iterrows()]
    return {
        "memdetect": __version__,
        "exit_code": exit_code,
        **counts(df),
        "resume": bool(resume),
        "resumed": int(resumed),
        "journal_rows_rejected": int(rejected),
        "metric": settings.get("metric"),
        "threshold": settings.get("threshold"),
        "config": config,
        "report": report,
        "flagged_images": [_flagged_entry(r) for _, r in flagged.iterrows()],
        "errors": errors,
        "allow_errors": bool(allow_errors),
        "not_checked": [] if allow_errors else errors,
        "settings": settings,
    }


def write_json(doc: dict, path: str | os.PathLike) -> Path:
    from ..store.strict_json import dumps

    return atomic_write(path, lambda tmp: Path(tmp).write_text(dumps(doc, indent=1, default=str) + "\n"))


def junit_xml(df: pd.DataFrame, settings: dict, *, suite: str = "memdetect audit", allow_errors: bool = False) -> bytes:
    """One ``<testcase>`` per image: ``<failure>`` when flagged; when unreadable, ``<error>`` ("not checked": it
    fails the audit), or ``<skipped>`` with ``allow_errors``."""
    metric, threshold = settings.get("metric", "score"), settings.get("threshold")
    flagged, errored = _flagged(df), _errored(df)
    n_err = len(errored)
    counts = {"tests": str(len(df)), "failures": str(len(flagged)), "errors": "0" if allow_errors else str(n_err),
              "skipped": str(n_err) if allow_errors else "0"}
    root = ET.Element("testsuites", {"name": "memdetect", **counts})
    ts = ET.SubElement(root, "testsuite", {"name": suite, **counts})
    props = ET.SubElement(ts, "properties")
    for k, v in settings.items():
        ET.SubElement(props, "property", {"name": k, "value": _xml_safe(str(v))})
    flagged_idx = set(flagged.index)
    for i, r in df.iterrows():
        tc = ET.SubElement(ts, "testcase", {"classname": "memdetect", "name": _xml_safe(str(r["path"])), "time": "0"})
        if pd.notna(r["error"]):
            if allow_errors:
                ET.SubElement(tc, "skipped", {"message": _xml_safe(f"not scored: {r['error']}")})
            else:
                ET.SubElement(tc, "error", {"type": "not checked", "message": _xml_safe(f"not checked: {r['error']}")})
        elif i in flagged_idx:
            f = ET.SubElement(tc, "failure", {"type": "memorized", "message": _xml_safe(_reason(r, metric, threshold))})
            f.text = _xml_safe(" ".join(f"{m}={r[m]:.6g}" for m in SCORES))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(df: pd.DataFrame, path: str | os.PathLike, settings: dict, allow_errors: bool = False) -> Path:
    data = junit_xml(df, settings, allow_errors=allow_errors)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# -- GitHub Actions ----------------------------------------------------------------------------------------------
def _gh_data(s: str) -> str:
    """A workflow command's data: GitHub's %-escapes for ``%``, CR and LF (it decodes them back), every other
    control character written as an escape."""
    return printable(s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


def _gh_prop(s: str) -> str:
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def running_on_github() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _repo_path(path: str, workspace: str | None) -> str:
    """GitHub pins annotations to paths relative to the repository root (``GITHUB_WORKSPACE``)."""
    if workspace and os.path.isabs(path):
        try:
            rel = os.path.relpath(path, workspace)
            if not rel.startswith(".."):
                return rel
        except ValueError:
            pass
    return path


def github_annotations(df: pd.DataFrame, settings: dict, workspace: str | None = None,
                       allow_errors: bool = False) -> list[str]:
    """Workflow commands: ``::error`` per flagged image and per file not checked (``::warning`` with
    ``allow_errors``)."""
    metric, threshold = settings.get("metric", "score"), settings.get("threshold")
    workspace = workspace if workspace is not None else os.environ.get("GITHUB_WORKSPACE")
    lines = []
    for _, r in _flagged(df).iterrows():
        lines.append(f"::error file={_gh_prop(_repo_path(r['path'], workspace))},title=memdetect%3A memorized image::"
                     f"{_gh_data(_reason(r, metric, threshold))}")
    level, title = ("warning", "not scored") if allow_errors else ("error", "not checked")
    for _, r in _errored(df).iterrows():
        lines.append(f"::{level} file={_gh_prop(_repo_path(r['path'], workspace))},title=memdetect%3A {title}::"
                     f"{_gh_data(str(r['error']))}")
    return lines


def _md_cell(s: str) -> str:
    """A name inside a code span in a Markdown table cell: one line, no ``|`` (ends the cell) and no backtick (ends
    the span)."""
    return printable(s).replace("|", "%7C").replace("`", "%60")


def step_summary_markdown(doc: dict, limit: int = 50) -> str:
    """A short Markdown summary for ``$GITHUB_STEP_SUMMARY``."""
    md = ["### memdetect audit", "",
          "| images | scored | errored | flagged | exit code |", "|---|---|---|---|---|",
          f"| {doc['images']} | {doc['scored']} | {doc['errored']} | {doc['flagged']} | {doc['exit_code']} |", ""]
    if doc["threshold"] is not None:
        md.append(f"Flagged when `{_md_cell(doc['metric'])}` >= {doc['threshold']:.6g}.")
    md.append(f"Rows reused from a verified journal: {doc.get('resumed', 0)}." if doc.get("resume")
              else "Every image was scored in this run (no journal read).")
    if doc["flagged_images"]:
        md += ["", "| flagged image | score |", "|---|---|"]
        md += [f"| `{_md_cell(f['path'])}` | {f['score']:.4g} |" for f in doc["flagged_images"][:limit]]
        if len(doc["flagged_images"]) > limit:
            md.append(f"\n... and {len(doc['flagged_images']) - limit} more (see the report).")
    if doc.get("not_checked"):
        md += ["", f"{len(doc['not_checked'])} images were not checked (this fails the audit):", "",
               "| not checked | why |", "|---|---|"]
        md += [f"| `{_md_cell(e['path'])}` | {_md_cell(e['error'])} |" for e in doc["not_checked"][:limit]]
    return "\n".join(md) + "\n"


# -- the audit ---------------------------------------------------------------------------------------------------


def check_annotations(annotations: str) -> None:
    if annotations not in ANNOTATIONS:
        raise UsageError(f"--annotations must be {', '.join(ANNOTATIONS[:-1])} or {ANNOTATIONS[-1]}, got "
                         f"{annotations!r}")


def check_threshold(threshold: float | None) -> None:
    """An audit needs a threshold; its value is checked by the threshold's one validator
    (``memdetect.settings.check_threshold``)."""
    if threshold is None:
        raise UsageError("audit needs a threshold: --config memdetect.toml (write one with `memdetect calibrate`) "
                         "or --threshold X")
    check_finite_threshold(threshold)


def ignore_report_folder(report: str | os.PathLike) -> Path | None:
    """Write ``.gitignore`` (``*``) into the report's folder when it is named ``.memdetect`` and has none; returns
    the file written. The file is created exclusively and never through a link (a committed ``.gitignore`` link
    must not make memdetect write elsewhere)."""
    folder = Path(report).parent
    ignore = folder / ".gitignore"
    if folder.name != DEFAULT_REPORT.parent.name or ignore.exists() or ignore.is_symlink():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(ignore, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write("# written by memdetect audit: keep its reports out of git\n*\n")
    return ignore


def check_report_folder(report: str | os.PathLike) -> None:
    """A report folder named ``.memdetect`` (the default's) must not be a link: one committed to a repository could
    send the report anywhere."""
    folder = Path(report).parent
    if folder.name == DEFAULT_REPORT.parent.name and folder.is_symlink():
        raise UsageError(f"report folder {display_path(folder)} is a symbolic link; memdetect does not write through "
                         f"links (remove it, or pass --output)")


def write_ci_outputs(result: ScanResult, *, config: str | os.PathLike | None = None,
                     junit: str | os.PathLike | None = None, summary_json: str | os.PathLike | None = None,
                     annotations: str = "auto", stream: TextIO | None = None, allow_errors: bool = False) -> dict:
    """Everything a CI system reads from an audit's scan: the summary document (returned; also written to
    ``summary_json``), JUnit XML (``junit``), and under GitHub Actions (``annotations="auto"`` when
    ``GITHUB_ACTIONS=true``, or ``"github"``) the workflow annotations on ``stream`` (default stdout) and a Markdown
    table appended to ``$GITHUB_STEP_SUMMARY``. A report folder named ``.memdetect`` gets its ``.gitignore``. The exit
    code is 1 when an image is flagged or, unless ``allow_errors``, when any row is an error (not checked)."""
    check_annotations(annotations)
    settings = result.settings_dict
    if result.output is not None:
        ignore_report_folder(result.output)
    unchecked = not allow_errors and bool(result.frame["error"].notna().any())
    code = EXIT_FLAGGED if result.flagged or unchecked else EXIT_OK
    doc = summary(result.frame, exit_code=code, settings=settings, config=str(config) if config else None,
                  report=str(result.output) if result.output else None, resumed=result.resumed,
                  resume=result.resume, rejected=result.rejected, allow_errors=allow_errors)
    if summary_json is not None:
        write_json(doc, summary_json)
    if junit is not None:
        write_junit(result.frame, junit, settings, allow_errors=allow_errors)
    if annotations == "github" or (annotations == "auto" and running_on_github()):
        stream = stream or sys.stdout
        stream.write("".join(line + "\n" for line in github_annotations(result.frame, settings,
                                                                         allow_errors=allow_errors)))
        stream.flush()
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as f:
                f.write(step_summary_markdown(doc))
    return doc


@dataclass(frozen=True)
class Audit:
    """An audit's scan, its summary document (``summary``) and its exit code (0: every image checked and none flagged;
    1: flagged, or not checked)."""

    result: ScanResult
    summary: dict

    @property
    def exit_code(self) -> int:
        return int(self.summary["exit_code"])


def audit(detector: Detector, paths: Iterable[str | os.PathLike], *, output: str | os.PathLike = DEFAULT_REPORT,
          resume: bool = False, html: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
          junit: str | os.PathLike | None = None, summary_json: str | os.PathLike | None = None,
          annotations: str = "auto", stream: TextIO | None = None, on_batch: Callable[[int], None] | None = None,
          num_workers: int | None = None, state_dir: str | os.PathLike | StateDir | None = None,
          reference=None, channels: dict | None = None, evidence_top: int = 20,
          evidence_json: str | os.PathLike | None = None, reference_dir: str | os.PathLike | None = None,
          allow_errors: bool = False, allow_remote: bool = False, allow_empty: bool = False,
          suffix_only: bool = False, any_file: bool = False) -> Audit:
    """Scan with the detector's threshold into ``output``, then ``write_ci_outputs``.

    ``reference`` (the config's reference scores, ``memdetect.core.pvalues.Reference``) adds p-values to the report and
    the summary; ``channels``, ``evidence_top``, ``evidence_json`` and ``reference_dir``: the flagged images'
    evidence in the HTML page and JSON (``memdetect.workflows.scan.scan``). ``allow_errors``: error rows are reported as skipped
    instead of failing the audit; ``allow_remote``: inputs and manifest rows may name URLs other than ``file://``.
    Folders and tar shards are searched by content too: a file without an image suffix whose first bytes are an
    image signature is scored (its row's ``found_by`` is ``content``); ``suffix_only=True`` searches by suffix only.
    ``allow_empty``: paths holding no image file pass
    (exit 0, empty report and CI outputs) instead of raising InputError (a pull request that adds no images).
    ``any_file``: the paths are files named one by one, any kind (a pre-commit hook passes every staged file): those
    that are neither images (by suffix or content) nor tar shards are skipped (``sources.files_to_audit``), and none
    left passes as with ``allow_empty``.

    The journal lives in the state directory (``state_dir``; see ``memdetect.store.state``) and is written on every run;
    ``resume=True`` also reads it, so a rerun after an interruption scores only what is missing, and only when the
    state directory's secret is one memdetect created there, outside the git checkout under audit
    (``StateDir.check_trusted``). A state directory inside a scanned folder is refused. Nothing is read from the
    scanned tree or the report's folder. Every destination is checked before any image is read."""
    check_threshold(detector.threshold)
    check_annotations(annotations)
    check_report_folder(output)
    check_destinations({"report": output, "HTML report": html, "JUnit XML": junit, "summary JSON": summary_json,
                        "evidence JSON": evidence_json})
    paths = list(paths)
    if any_file:
        paths, skipped = files_to_audit(paths)
        allow_empty = True
        if skipped:
            log.info("%d of the files are neither images nor tar shards (not audited)", len(skipped))
    state = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    state.check_outside(paths)
    if resume:  # only a secret memdetect created, outside the checkout under audit, vouches for journal rows
        state.check_trusted(paths)
    ignore_report_folder(output)
    result = scan(detector, paths, output=output, resume=resume, html=html, on_batch=on_batch,
                  num_workers=num_workers, state_dir=state, journal_in_state=True, reference=reference,
                  channels=channels, evidence_top=evidence_top, evidence_json=evidence_json,
                  reference_dir=reference_dir, allow_remote=allow_remote, errors_fail=not allow_errors,
                  allow_empty=allow_empty, sniff=not suffix_only,
                  context={**run_context(paths, config=config), "audit": True} if html is not None else None)
    doc = write_ci_outputs(result, config=config, junit=junit, summary_json=summary_json, annotations=annotations,
                           stream=stream, allow_errors=allow_errors)
    return Audit(result, doc)


__all__ = ["ANNOTATIONS", "Audit", "DEFAULT_REPORT", "audit", "check_annotations", "check_threshold",
           "check_report_folder", "github_annotations", "ignore_report_folder", "junit_xml", "running_on_github", "step_summary_markdown",
           "summary", "write_ci_outputs", "write_json", "write_junit"]
