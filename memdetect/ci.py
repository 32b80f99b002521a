"""Outputs for CI systems: a JSON summary, JUnit XML and GitHub Actions annotations.

Why three: the JSON summary is for scripts (counts, exit code, flagged paths); JUnit XML is what most CI servers
(GitLab, Jenkins, Azure, GitHub test reporters) render as a test list, one test case per image; GitHub reads
``::error file=...::`` lines from a step's output and pins them to the files in the pull request.

The mapping is the exit-code contract's: a flagged image is a *failure*; an unreadable file is *skipped* with its
reason (it does not fail the run, as it does not change the exit code); a scored, unflagged image passes.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from . import __version__
from .io import _atomic_write

#: Characters XML 1.0 forbids (even escaped); they can occur in file names.
_XML_BAD = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_safe(s: str) -> str:
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def _flagged(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["memorized"].fillna(False).astype(bool)].sort_values("score", ascending=False)


def _errored(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["error"].notna()]


def _reason(row, metric: str, threshold: float | None) -> str:
    return f"memorized: {metric} {row['score']:.6g} >= threshold {threshold:.6g}"


def summary(df: pd.DataFrame, *, exit_code: int, settings: dict, config: str | None = None,
            report: str | None = None, resumed: int = 0) -> dict:
    """The machine-readable result of a run: counts, exit code, flagged images (highest first) and errors."""
    from .detector import scan_summary

    flagged, errored = _flagged(df), _errored(df)
    return {
        "memdetect": __version__,
        "exit_code": exit_code,
        **scan_summary(df),
        "resumed": int(resumed),
        "metric": settings.get("metric"),
        "threshold": settings.get("threshold"),
        "config": config,
        "report": report,
        "flagged_images": [{"path": r["path"], "score": float(r["score"])} for _, r in flagged.iterrows()],
        "errors": [{"path": r["path"], "error": str(r["error"])} for _, r in errored.iterrows()],
        "settings": settings,
    }


def write_json(doc: dict, path: str | os.PathLike) -> Path:
    p = Path(path)
    _atomic_write(p, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, default=str) + "\n"))
    return p


def junit_xml(df: pd.DataFrame, settings: dict, *, suite: str = "memdetect audit") -> bytes:
    """One ``<testcase>`` per image: ``<failure>`` when flagged, ``<skipped>`` when unreadable."""
    metric, threshold = settings.get("metric", "score"), settings.get("threshold")
    flagged, errored = _flagged(df), _errored(df)
    counts = {"tests": str(len(df)), "failures": str(len(flagged)), "errors": "0", "skipped": str(len(errored))}
    root = ET.Element("testsuites", {"name": "memdetect", **counts})
    ts = ET.SubElement(root, "testsuite", {"name": suite, **counts})
    props = ET.SubElement(ts, "properties")
    for k, v in settings.items():
        ET.SubElement(props, "property", {"name": k, "value": _xml_safe(str(v))})
    flagged_idx = set(flagged.index)
    for i, r in df.iterrows():
        tc = ET.SubElement(ts, "testcase", {"classname": "memdetect", "name": _xml_safe(str(r["path"])), "time": "0"})
        if pd.notna(r["error"]):
            ET.SubElement(tc, "skipped", {"message": _xml_safe(f"not scored: {r['error']}")})
        elif i in flagged_idx:
            f = ET.SubElement(tc, "failure", {"type": "memorized", "message": _xml_safe(_reason(r, metric, threshold))})
            f.text = _xml_safe(" ".join(f"{m}={r[m]:.6g}" for m in ("std", "l4l2", "entropy", "maxmin")))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(df: pd.DataFrame, path: str | os.PathLike, settings: dict) -> Path:
    p = Path(path)
    data = junit_xml(df, settings)
    _atomic_write(p, lambda tmp: Path(tmp).write_bytes(data))
    return p


# -- GitHub Actions ----------------------------------------------------------------------------------------------
def _gh_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


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


def github_annotations(df: pd.DataFrame, settings: dict, workspace: str | None = None) -> list[str]:
    """Workflow commands: ``::error`` per flagged image, ``::warning`` per unreadable file."""
    metric, threshold = settings.get("metric", "score"), settings.get("threshold")
    workspace = workspace if workspace is not None else os.environ.get("GITHUB_WORKSPACE")
    lines = []
    for _, r in _flagged(df).iterrows():
        lines.append(f"::error file={_gh_prop(_repo_path(r['path'], workspace))},title=memdetect%3A memorized image::"
                     f"{_gh_data(_reason(r, metric, threshold))}")
    for _, r in _errored(df).iterrows():
        lines.append(f"::warning file={_gh_prop(_repo_path(r['path'], workspace))},title=memdetect%3A not scored::"
                     f"{_gh_data(str(r['error']))}")
    return lines


def step_summary_markdown(doc: dict, limit: int = 50) -> str:
    """A short Markdown summary for ``$GITHUB_STEP_SUMMARY``."""
    md = ["### memdetect audit", "",
          "| images | scored | errored | flagged | exit code |", "|---|---|---|---|---|",
          f"| {doc['images']} | {doc['scored']} | {doc['errored']} | {doc['flagged']} | {doc['exit_code']} |", ""]
    if doc["threshold"] is not None:
        md.append(f"Flagged when `{doc['metric']}` >= {doc['threshold']:.6g}.")
    if doc["flagged_images"]:
        md += ["", "| flagged image | score |", "|---|---|"]
        md += [f"| `{f['path'].replace('|', '%7C').replace('`', '%60')}` | {f['score']:.4g} |"
               for f in doc["flagged_images"][:limit]]
        if len(doc["flagged_images"]) > limit:
            md.append(f"\n... and {len(doc['flagged_images']) - limit} more (see the report).")
    return "\n".join(md) + "\n"


__all__ = ["github_annotations", "junit_xml", "running_on_github", "step_summary_markdown", "summary", "write_json",
           "write_junit"]
