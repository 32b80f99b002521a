"""Joining the reports of a sharded scan into the report one process would have written.

    memdetect scan gen/ --shard 1/4 -o part1.csv      # ... up to 4/4, on any scheduler (Slurm arrays, k8s jobs)
    memdetect merge part*.csv --output report.csv

A shard's report (``scan(..., shard=(i, n))``) carries three constant columns, and a JSON report the same keys in
its settings:

* ``shard``: ``I/N`` (1-based);
* ``shard_inputs``: ``COUNT:HASH``, the number and a hash of the names of *every* input of the scan (all shards), so
  parts of two different scans never merge and a missing row is noticed;
* ``shard_settings``: a hash of everything that changes a row: the scoring settings (``journal.KEY_SETTINGS``), the
  weights' content hash, the metric and the threshold (not the device: ranks run on ``cuda:0``, ``cuda:1`` ...).

``merge_parts`` refuses parts whose marks differ (naming the settings that differ when the reports carry them),
duplicate or missing shards and row counts that do not add up; it concatenates the parts in shard order (shards are
contiguous blocks of the inputs, ``sources.shard``) and drops the marks: the result has the rows, order and columns
of a single-process report.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import pandas as pd

from . import report
from .errors import InputError
from .journal import KEY_SETTINGS
from .sources import is_url, open_binary, shard_bounds
from .text import printable

SHARD_COLUMNS = ("shard", "shard_inputs", "shard_settings")
#: the columns a scan with reference scores adds (``report.add_p_values``); kept by a merge when every part has them
P_COLUMNS = ("p_value", "percentile")
#: Settings compared between parts (besides the hash): what a report may carry of them.
COMPARED = (*KEY_SETTINGS, "weights", "metric", "threshold")


def settings_digest(settings: dict) -> str:
    """A short hash of the settings that change a report's rows (see the module docstring)."""
    keep = {k: settings.get(k) for k in COMPARED}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mark_shard(frame: pd.DataFrame, settings: dict, shard: tuple[int, int], inputs: str) -> tuple[pd.DataFrame, dict]:
    """The report frame and settings of part ``shard=(i, n)`` (0-based ``i``) with the shard's marks added."""
    marks = {"shard": f"{shard[0] + 1}/{shard[1]}", "shard_inputs": inputs, "shard_settings": settings_digest(settings)}
    return frame.assign(**marks), {**settings, **marks}


@dataclass(frozen=True)
class Part:
    """One shard's report: its rows (``report.COLUMNS``), its settings (all of them for JSON, the constant columns
    for CSV / Parquet) and where it came from."""

    frame: pd.DataFrame
    settings: dict
    source: str


def read_report(location: str | os.PathLike) -> Part:
    """A report written by ``memdetect scan`` (.csv, .json or .parquet; a local path or an fsspec URL)."""
    name = str(location)
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in report_formats():
        raise InputError(f"{printable(name)} is not a report (.csv, .json or .parquet)")
    try:
        with open_binary(name) as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"report {printable(name)} does not exist") from None
    try:
        if suffix == ".json":
            doc = json.loads(data)
            if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
                raise ValueError("no rows")
            df = pd.DataFrame(doc["rows"])
            settings = dict(doc.get("settings") or {})
        elif suffix == ".csv":
            df = pd.read_csv(_io.BytesIO(data), dtype={"path": str, "error": str, "key": str}, keep_default_na=False,
                             na_values=[""], float_precision="round_trip")
            settings = {}
        else:
            df = pd.read_parquet(_io.BytesIO(data))
            settings = {}
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise InputError(f"report {printable(name)} cannot be read: {printable(e, 200)}") from None
    missing = [c for c in report.COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"report {printable(name)} lacks the columns {', '.join(missing)}: not a memdetect report")
    for c in (*report.SETTINGS_COLUMNS, *SHARD_COLUMNS):  # CSV / Parquet: constant columns
        if c in df.columns and c not in settings and len(df):
            values = df[c].dropna().unique()
            if len(values) > 1:
                raise InputError(f"report {printable(name)} mixes several values of {c}: not one scan's report")
            if len(values):
                v = values[0]
                settings[c] = v.item() if hasattr(v, "item") else v
    rows = df[report.COLUMNS].astype(object).where(df[report.COLUMNS].notna(), None).to_dict("records")
    return Part(_keep_p_values(report.rows_to_frame(rows), df), settings, name)


def _keep_p_values(frame: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``source``'s ``p_value`` and ``percentile`` columns (a scan with a config's reference scores
    writes them) after ``score``, as ``report.add_p_values`` places them; ``frame`` as it is when they are absent."""
    if not all(c in source.columns for c in P_COLUMNS):
        return frame
    at = list(frame.columns).index("score") + 1
    for k, c in enumerate(P_COLUMNS):
        frame.insert(at + k, c, pd.to_numeric(source[c], errors="coerce").astype("float64").to_numpy())
    return frame


def report_formats() -> tuple[str, ...]:
    from .io import REPORT_FORMATS

    return REPORT_FORMATS


def _shard_of(part: Part) -> tuple[int, int]:
    text = part.settings.get("shard")
    if text is None or any(part.settings.get(k) is None for k in SHARD_COLUMNS):
        raise InputError(f"{printable(part.source)} is not a shard's report (made without --shard): nothing says "
                         f"which part of which scan it is")
    i, _, n = str(text).partition("/")
    try:
        return int(i), int(n)
    except ValueError:
        raise InputError(f"{printable(part.source)} has a malformed shard mark {printable(text, 40)!r}") from None


def merge_parts(parts: Sequence[Part]) -> tuple[pd.DataFrame, dict]:
    """The rows of every part in shard order, and their common settings without the marks. InputError (one line)
    when the parts are not exactly the shards of one scan with one set of settings."""
    if not parts:
        raise InputError("no reports to merge")
    # a CSV / Parquet shard with no rows has nowhere to carry its marks: it adds nothing, and its shard is checked
    # below as one that the arithmetic makes empty
    empty = [p for p in parts if len(p.frame) == 0 and p.settings.get("shard") is None]
    parts = [p for p in parts if not (len(p.frame) == 0 and p.settings.get("shard") is None)] or empty[:1]
    shards = [_shard_of(p) for p in parts]
    first = parts[0]
    for p in parts[1:]:
        if p.settings.get("shard_settings") != first.settings.get("shard_settings"):
            differ = [k for k in COMPARED if k in p.settings and k in first.settings
                      and str(p.settings[k]) != str(first.settings[k])]
            what = ("; they differ in " + ", ".join(f"{k} ({printable(first.settings[k], 60)} vs "
                                                      f"{printable(p.settings[k], 60)})" for k in differ)
                    if differ else "")
            raise InputError(f"{printable(p.source)} and {printable(first.source)} were scanned with different "
                             f"settings{what}: refusing to merge them")
        if p.settings.get("shard_inputs") != first.settings.get("shard_inputs"):
            raise InputError(f"{printable(p.source)} and {printable(first.source)} are shards of different inputs: "
                             f"refusing to merge them")
    counts = {n for _, n in shards}
    if len(counts) != 1:
        raise InputError(f"the reports split the scan into different numbers of shards ({', '.join(map(str, sorted(counts)))})")
    n = counts.pop()
    seen: dict[int, str] = {}
    for (i, _), p in zip(shards, parts):
        if i in seen:
            raise InputError(f"shard {i}/{n} is given twice ({printable(seen[i])} and {printable(p.source)})")
        seen[i] = p.source
    total = str(first.settings["shard_inputs"]).split(":", 1)[0]
    total = int(total) if total.isdigit() else None
    missing = [i for i in range(1, n + 1) if i not in seen
               and (total is None or shard_bounds(total, i - 1, n)[0] < shard_bounds(total, i - 1, n)[1])]
    if missing:
        raise InputError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{n}' for i in missing)} "
                         f"missing: merge needs all {n}")
    order = sorted(range(len(parts)), key=lambda k: shards[k][0])
    frame = pd.concat([parts[k].frame for k in order], ignore_index=True)
    expected = str(first.settings["shard_inputs"]).split(":", 1)[0]
    if expected.isdigit() and int(expected) != len(frame):
        raise InputError(f"the shards hold {len(frame)} rows but the scan had {expected} inputs: a report is "
                         f"incomplete or was edited")
    devices = sorted({str(p.settings["device"]) for p in parts if "device" in p.settings})
    settings = {k: v for k, v in first.settings.items() if k not in SHARD_COLUMNS}
    if len(devices) > 1:
        settings["device"] = ",".join(devices)
    merged = report.rows_to_frame(frame.astype(object).where(frame.notna(), None).to_dict("records"))
    if all(c in parts[k].frame.columns for k in order for c in P_COLUMNS):  # p-values only when every part has them
        merged = _keep_p_values(merged, frame)
    return merged, settings


@dataclass(frozen=True)
class MergeResult(report.Counted):
    frame: pd.DataFrame
    settings: dict
    output: str | os.PathLike
    parts: int


def merge_reports(reports: Iterable[str | os.PathLike], output: str | os.PathLike) -> MergeResult:
    """Read the shards' reports, check they are one scan's parts, and write the joined report to ``output`` (a
    local path or an fsspec URL; format from its suffix)."""
    from .io import check_destination, check_report_path

    check_report_path(output)
    if not is_url(str(output)):
        check_destination(output, "report")
    parts = [read_report(r) for r in reports]
    frame, settings = merge_parts(parts)
    report.write_anywhere(frame, output, settings)
    return MergeResult(frame, settings, output, len(parts))


__all__ = ["COMPARED", "MergeResult", "Part", "SHARD_COLUMNS", "mark_shard", "merge_parts", "merge_reports",
           "read_report", "settings_digest"]
