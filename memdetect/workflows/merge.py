"""Joining the reports of a sharded scan into the report one process would have written.

    memdetect scan gen/ --shard 1/4 -o part1.csv      # ... up to 4/4, on any scheduler (Slurm arrays, k8s jobs)
    memdetect merge part*.csv --output report.csv

A shard's report (``scan(..., shard=(i, n))``) carries constant columns, and a JSON report the same keys in its
settings:

* ``shard``: ``I/N`` (1-based);
* ``shard_inputs``: ``COUNT:HASH``, the number and a hash of the names of *every* input of the scan (all shards), so
  parts of two different scans never merge and a missing row is noticed;
* ``shard_meta``: the settings that change a row, as canonical JSON: the scoring settings (``journal.KEY_SETTINGS``),
  the weights' content hash, the metric and the threshold (not the device: ranks run on ``cuda:0``, ``cuda:1`` ...);
* ``shard_settings``: a hash of ``shard_meta``;
* ``shard_mac`` (with a shard key): HMAC-SHA256 with the key over ``MAC_CONTEXT`` and the report's canonical bytes
  (``canonical``: the marks above and every row's values, floats bit for bit), as ``merge`` reads them back.

``merge_parts`` believes nothing a part says about itself that it can check: it recomputes the ``shard_settings``
hash from ``shard_meta``, compares the settings themselves between parts (naming those that differ), recomputes
``score`` and ``memorized`` from the metric's column and the threshold, and refuses malformed marks, duplicate or
missing shards, a part that does not hold its shard's number of rows, an image name that occurs twice and names that
do not hash to ``shard_inputs``. With a key (``load_shard_key``: ``--shard-key-file`` or ``MEMDETECT_SHARD_KEY``)
every part must carry a MAC that verifies. Without one, a part that is edited consistently (every mark recomputed)
cannot be told from a real one: ``memdetect merge`` says that the shards are trusted as given. It concatenates the
parts in shard order (shards are contiguous blocks of the inputs, ``sources.shard``) and drops the marks: the result
has the rows, order and columns of a single-process report.
"""

from __future__ import annotations

import hashlib
import hmac
import io as _io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..store import report
from ..errors import InputError, UsageError
from ..store.journal import KEY_SETTINGS
from ..core.scores import SCORES
from ..store.sources import inputs_digest, is_url, open_binary, shard_bounds
from ..text import printable

#: the marks every shard's report carries, then the MAC (only with a shard key)
MARKS = ("shard", "shard_inputs", "shard_settings", "shard_meta")
MAC_COLUMN = "shard_mac"
SHARD_COLUMNS = (*MARKS, MAC_COLUMN)
#: the columns a scan with reference scores adds (``report.add_p_values``); kept by a merge when every part has them
P_COLUMNS = ("p_value", "percentile")
#: Settings compared between parts: the ones that change a row (``shard_meta``).
COMPARED = (*KEY_SETTINGS, "weights", "metric", "threshold")
#: What a shard report's MAC is computed over, before its canonical bytes (a version: the format can change).
MAC_CONTEXT = b"memdetect shard report v1\n"
KEY_ENV = "MEMDETECT_SHARD_KEY"
MIN_KEY_BYTES = 16
MAX_KEY_FILE = 4096
_INPUTS = re.compile(r"(\d{1,15}):([0-9a-f]{16})")
_SHARD = re.compile(r"(\d{1,9})/(\d{1,9})")


def settings_meta(settings: dict) -> str:
    """``shard_meta``: the settings that change a report's rows, as canonical JSON."""
    return json.dumps({k: settings.get(k) for k in COMPARED}, sort_keys=True, separators=(",", ":"), default=str,
                      ensure_ascii=True)


def _digest(meta: str) -> str:
    return hashlib.sha256(meta.encode()).hexdigest()[:16]


def settings_digest(settings: dict) -> str:
    """A short hash of the settings that change a report's rows (``shard_settings``; see the module docstring)."""
    return _digest(settings_meta(settings))


def load_shard_key(path: str | os.PathLike | None = None) -> bytes | None:
    """The shared secret that signs shard reports: the file ``path`` (``--shard-key-file``; the command line wins),
    else ``$MEMDETECT_SHARD_KEY``, else None. Surrounding whitespace is dropped; at least 16 bytes."""
    if path is not None:
        name = printable(str(path), 200)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEY_FILE + 1)
        except OSError as e:
            raise UsageError(f"cannot read the shard key file {name} ({e.strerror or e})") from None
        if len(data) > MAX_KEY_FILE:
            raise UsageError(f"shard key file {name} is larger than {MAX_KEY_FILE} bytes: not a key")
        where = f"shard key file {name}"
    else:
        text = os.environ.get(KEY_ENV, "")
        if not text.strip():
            return None
        data, where = os.fsencode(text), f"${KEY_ENV}"
    key = data.strip()
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"the shard key ({where}) must hold at least {MIN_KEY_BYTES} bytes, e.g. `python -c \"import "
                         f"secrets; print(secrets.token_hex(32))\"`")
    return key


def _cells(col: pd.Series) -> bytes:
    """One column in the canonical bytes: floats as their exact little-endian float64 bits (one NaN), anything else
    as a compact JSON list (None for a missing value, booleans as booleans, the rest as text)."""
    if col.dtype.kind == "f":
        a = col.to_numpy("float64", na_value=np.nan)
        return b"f8:" + np.where(np.isnan(a), np.nan, a).astype("<f8").tobytes()
    values = col.astype(object).where(col.notna(), None).tolist()
    if str(col.dtype) == "boolean" or col.dtype.kind == "b":
        values = [None if v is None else bool(v) for v in values]
    else:
        values = [None if v is None else str(v) for v in values]
    return b"js:" + json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def canonical(frame: pd.DataFrame, marks: dict) -> bytes:
    """The bytes a shard report's MAC covers: a JSON header (its marks, ``MARKS``; its columns, ``report.COLUMNS``
    and the p-value columns when present; its number of rows), then each column (``_cells``), every part preceded by
    its length. ``frame`` is typed as ``read_report`` types it (``report.rows_to_frame``), so the writer and the
    reader see the same cells."""
    cols = [c for c in (*report.COLUMNS, *P_COLUMNS) if c in frame.columns]
    head = {"marks": {k: None if marks.get(k) is None else str(marks[k]) for k in MARKS}, "columns": cols,
            "rows": len(frame)}
    parts = [json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii"),
             *(_cells(frame[c]) for c in cols)]
    return b"".join(len(b).to_bytes(8, "big") + b for b in parts)


def report_mac(frame: pd.DataFrame, marks: dict, key: bytes) -> str:
    """HMAC-SHA256 (hex) of a shard report's canonical bytes (``frame`` as ``read_report`` gives it back)."""
    return hmac.new(key, MAC_CONTEXT + canonical(frame, marks), hashlib.sha256).hexdigest()


def _as_read(frame: pd.DataFrame, suffix: str | None) -> pd.DataFrame:
    """``frame`` as ``read_report`` will read it back from a ``suffix`` report: the MAC covers what merge reads (a
    JSON report keeps 10 decimals of a float; CSV and Parquet keep them exactly)."""
    cols = [c for c in (*report.COLUMNS, *P_COLUMNS) if c in frame.columns]
    if suffix == ".json":
        raw = pd.DataFrame(json.loads(frame[cols].to_json(orient="records")), columns=cols)
    elif suffix == ".csv":
        raw = pd.read_csv(_io.BytesIO(frame[cols].to_csv(index=False).encode("utf-8")), **_CSV)
    else:  # Parquet keeps the types: the frame is already as it will be read
        return frame[cols]
    return _rows(raw)


def mark_shard(frame: pd.DataFrame, settings: dict, shard: tuple[int, int], inputs: str, *,
               key: bytes | None = None, suffix: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The report frame and settings of part ``shard=(i, n)`` (0-based ``i``) with the shard's marks added; with a
    ``key``, the MAC of the report as it will be read back from a ``suffix`` file (``.csv``, ``.json``,
    ``.parquet``)."""
    meta = settings_meta(settings)
    marks = {"shard": f"{shard[0] + 1}/{shard[1]}", "shard_inputs": inputs, "shard_settings": _digest(meta),
             "shard_meta": meta}
    if key is not None:
        marks[MAC_COLUMN] = report_mac(_as_read(frame, suffix), marks, key)
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
            df = pd.read_csv(_io.BytesIO(data), **_CSV)
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
    return Part(_rows(df), settings, name)


#: how a CSV report is read: names, errors, keys and the shard marks as text, floats exactly
_CSV = dict(dtype={"path": str, "error": str, "key": str, **{c: str for c in SHARD_COLUMNS}}, keep_default_na=False,
            na_values=[""], float_precision="round_trip")


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    """A report's rows as ``report.rows_to_frame`` types them, with its p-value columns (built column by column: a
    dict per row costs seconds per 100,000 rows)."""
    columns = {c: df[c].astype(object).where(df[c].notna(), None).tolist() for c in report.COLUMNS}
    return _keep_p_values(report.rows_to_frame(columns), df)


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
    from ..store.io import REPORT_FORMATS

    return REPORT_FORMATS


@dataclass(frozen=True)
class _Marks:
    """A part's checked marks: shard ``index`` of ``count`` (1-based), the scan's number of inputs and their names'
    hash, and its settings (``shard_meta``, parsed)."""

    index: int
    count: int
    total: int
    names: str
    meta: dict


def _marks_of(part: Part) -> _Marks:
    """A part's marks, each checked for form, and its ``shard_settings`` hash recomputed from ``shard_meta``."""
    s, src = part.settings, printable(part.source)
    if s.get("shard") is not None and s.get("shard_meta") is None:
        raise InputError(f"{src} carries no shard_meta: a shard report of an older memdetect, or edited; scan the "
                         f"shard again")
    if any(s.get(k) is None for k in MARKS):
        raise InputError(f"{src} is not a shard's report (made without --shard): nothing says which part of which "
                         f"scan it is")
    text = str(s["shard"])
    m = _SHARD.fullmatch(text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise InputError(f"{src} has a malformed shard mark {printable(text, 40)!r} (I/N with 1 <= I <= N)")
    inputs = str(s["shard_inputs"])
    m2 = _INPUTS.fullmatch(inputs)
    if not m2:
        raise InputError(f"{src} has a malformed shard_inputs mark {printable(inputs, 60)!r} (COUNT:HASH): edited, or "
                         f"not a memdetect shard report")
    meta_text = str(s["shard_meta"])
    try:
        meta = json.loads(meta_text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or set(meta) != set(COMPARED) or meta.get("metric") not in SCORES or not (
            meta.get("threshold") is None or (isinstance(meta["threshold"], (int, float))
                                              and not isinstance(meta["threshold"], bool)
                                              and math.isfinite(meta["threshold"]))):
        raise InputError(f"{src} has a malformed shard_meta mark: edited, or not a memdetect shard report")
    if _digest(meta_text) != str(s["shard_settings"]):
        raise InputError(f"{src}: its shard_settings hash does not match the settings it carries (shard_meta): the "
                         f"report was edited; refusing to merge it")
    carried = [k for k in COMPARED if k in s and str(s[k]) != str(meta[k])]
    if carried:
        raise InputError(f"{src}: its {carried[0]} ({printable(s[carried[0]], 60)}) differs from the shard_meta "
                         f"mark ({printable(meta[carried[0]], 60)}): the report was edited; refusing to merge it")
    return _Marks(int(m[1]), int(m[2]), int(m2[1]), m2[2], meta)


def _check_mac(part: Part, key: bytes) -> None:
    src = printable(part.source)
    mac = part.settings.get(MAC_COLUMN)
    if mac is None or (isinstance(mac, float) and math.isnan(mac)):
        raise InputError(f"{src} carries no MAC: it was written without the shard key ({KEY_ENV} or "
                         f"--shard-key-file), or the MAC was removed; refusing to merge it")
    if not hmac.compare_digest(str(mac).encode(), report_mac(part.frame, part.settings, key).encode()):
        raise InputError(f"{src}: its MAC does not verify with this shard key: the report was edited, or signed "
                         f"with another key; refusing to merge it")


def _rederive(frame: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """``score`` (the metric's column) and ``memorized`` (``score >= threshold``) recomputed, as ``report.make_row``
    derives them: a part's own ``memorized`` column is never believed."""
    out = frame.copy()
    scored = out["error"].isna()
    out["score"] = out[meta["metric"]].where(scored)
    if meta["threshold"] is None:
        out["memorized"] = pd.array([pd.NA] * len(out), dtype="boolean")
    else:
        flags = pd.array(out["score"].to_numpy("float64", na_value=np.nan) >= float(meta["threshold"]),
                         dtype="boolean")
        out["memorized"] = flags
        out.loc[~scored.to_numpy(), "memorized"] = pd.NA
    return out


def merge_parts(parts: Sequence[Part], *, key: bytes | None = None) -> tuple[pd.DataFrame, dict]:
    """The rows of every part in shard order, and their common settings without the marks. InputError (one line)
    when the parts are not exactly the shards of one scan with one set of settings (see the module docstring);
    with a ``key``, also when a part's MAC is missing or does not verify."""
    if not parts:
        raise InputError("no reports to merge")
    # a CSV / Parquet shard with no rows has nowhere to carry its marks: it adds nothing, and its shard is checked
    # below as one that the arithmetic makes empty
    empty = [p for p in parts if len(p.frame) == 0 and p.settings.get("shard") is None]
    parts = [p for p in parts if not (len(p.frame) == 0 and p.settings.get("shard") is None)] or empty[:1]
    marks = [_marks_of(p) for p in parts]
    if key is not None:
        for p in parts:
            _check_mac(p, key)
    first, mine = parts[0], marks[0]
    for p, m in zip(parts[1:], marks[1:]):
        if m.meta != mine.meta:
            differ = [k for k in COMPARED if str(m.meta[k]) != str(mine.meta[k])]
            what = ("; they differ in " + ", ".join(f"{k} ({printable(mine.meta[k], 60)} vs "
                                                      f"{printable(m.meta[k], 60)})" for k in differ)) if differ else ""
            raise InputError(f"{printable(p.source)} and {printable(first.source)} were scanned with different "
                             f"settings{what}: refusing to merge them")
        if (m.total, m.names) != (mine.total, mine.names):
            raise InputError(f"{printable(p.source)} and {printable(first.source)} are shards of different inputs: "
                             f"refusing to merge them")
    counts = {m.count for m in marks}
    if len(counts) != 1:
        raise InputError(f"the reports split the scan into different numbers of shards ({', '.join(map(str, sorted(counts)))})")
    n, total = counts.pop(), mine.total
    seen: dict[int, str] = {}
    for m, p in zip(marks, parts):
        if m.index in seen:
            raise InputError(f"shard {m.index}/{n} is given twice ({printable(seen[m.index])} and "
                             f"{printable(p.source)})")
        seen[m.index] = p.source
        lo, hi = shard_bounds(total, m.index - 1, n)
        if len(p.frame) != hi - lo:
            raise InputError(f"{printable(p.source)} (shard {m.index}/{n} of {total} inputs) holds {len(p.frame)} "
                             f"rows, not {hi - lo}: a report is incomplete or was edited")
    missing = [i for i in range(1, n + 1) if i not in seen and shard_bounds(total, i - 1, n)[0] <
               shard_bounds(total, i - 1, n)[1]]
    if missing:
        raise InputError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{n}' for i in missing)} "
                         f"missing: merge needs all {n}")
    order = sorted(range(len(parts)), key=lambda k: marks[k].index)
    frame = pd.concat([parts[k].frame for k in order], ignore_index=True)
    if total != len(frame):
        raise InputError(f"the shards hold {len(frame)} rows but the scan had {total} inputs: a report is "
                         f"incomplete or was edited")
    twice = frame["path"][frame["path"].duplicated()]
    if len(twice):
        raise InputError(f"the shards hold {printable(twice.iloc[0], 200)} more than once: a shard was replaced by a "
                         f"copy of another, or edited; refusing to merge them")
    if inputs_digest([str(x) for x in frame["path"]]) != f"{total}:{mine.names}":
        raise InputError("the shards' image names are not the scan's inputs (they do not hash to its shard_inputs "
                         "mark): a report was edited, or belongs to another scan; refusing to merge them")
    frame = _rederive(frame, mine.meta)
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
    """The merged report; ``verified``: every part's MAC verified with a shard key (False: trusted as given)."""

    frame: pd.DataFrame
    settings: dict
    output: str | os.PathLike
    parts: int
    verified: bool = False


def merge_reports(reports: Iterable[str | os.PathLike], output: str | os.PathLike, *,
                  key: bytes | None = None) -> MergeResult:
    """Read the shards' reports, check they are one scan's parts (with a ``key``: that each carries a MAC that
    verifies), and write the joined report to ``output`` (a local path or an fsspec URL; format from its suffix)."""
    from ..store.io import check_destination, check_report_path

    check_report_path(output)
    if not is_url(str(output)):
        check_destination(output, "report")
    parts = [read_report(r) for r in reports]
    frame, settings = merge_parts(parts, key=key)
    report.write_anywhere(frame, output, settings)
    return MergeResult(frame, settings, output, len(parts), verified=key is not None)


__all__ = ["COMPARED", "KEY_ENV", "MARKS", "MergeResult", "Part", "SHARD_COLUMNS", "canonical", "load_shard_key",
           "mark_shard", "merge_parts", "merge_reports", "read_report", "report_mac", "settings_digest",
           "settings_meta"]
