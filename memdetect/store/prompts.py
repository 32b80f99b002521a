"""Prompt files: a list of prompts in any common format, read into a frame (``memdetect generate --prompt-file``,
``memdetect bench laion --memorized/--normal``).

Formats (detected from the suffix, else from the content):

* ``.jsonl`` (JSON lines): one object per line with a ``caption``, ``prompt`` or ``text`` key (any case), or one
  JSON string per line. Wen et al.'s ``sdv1_500_memorized.jsonl`` is of this kind.
* ``.json``: a list of strings or of such objects (e.g. ``match_verbatim_captions.json``).
* ``.csv`` / ``.tsv``: a header with a ``prompt``, ``caption`` or ``text`` column (any case); the delimiter
  (``,`` ``;`` tab ``|``) is sniffed, since NeMo's lists are ``;``-separated.
* ``.txt`` and anything else: one prompt per line, blank lines skipped.

Every list becomes a frame with ``row`` (0-based position in the file), ``prompt`` and the file's other columns.
The public lists the benchmarks download, and the filters on those columns, are ``memdetect.bench.prompts``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import InputError, UsageError

PROMPT_KEYS = ("prompt", "caption", "text")
FORMATS = ("jsonl", "json", "csv", "txt")


def detect_format(path: str | os.PathLike, text: str | None = None) -> str:
    """``jsonl``, ``json``, ``csv`` or ``txt``: from the suffix when it is one of those, else from the content."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".txt":
        return "txt"
    text = _read_text(path) if text is None else text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "txt"
    first = lines[0].lstrip()
    if first.startswith("["):
        return "json"
    if first.startswith("{"):
        return "jsonl"
    if _csv_header(text) is not None:
        return "csv"
    return "txt"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt list {path} does not exist") from None
    except UnicodeDecodeError:
        raise InputError(f"prompt list {path} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read prompt list {path}: {e.strerror or e}") from None


def _csv_header(text: str) -> tuple[str, str] | None:
    """(delimiter, prompt column) when ``text`` looks like a CSV with a prompt column in its header, else None."""
    sample = "\n".join(text.splitlines()[:20])
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return None
    header = next(csv.reader(io.StringIO(sample), delimiter=delimiter), [])
    column = _prompt_key(header)
    return (delimiter, column) if column is not None and len(header) > 1 else None


def _prompt_key(keys: Sequence[str]) -> str | None:
    lower = {str(k).strip().lower(): k for k in keys}
    return next((lower[k] for k in PROMPT_KEYS if k in lower), None)


def _records_frame(items: list, path: Path) -> pd.DataFrame:
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            rows.append({"prompt": item})
        elif isinstance(item, dict):
            key = _prompt_key(list(item))
            if key is None:
                raise InputError(f"{path}: entry {i} has no {'/'.join(PROMPT_KEYS)} key (keys: "
                                 f"{', '.join(map(str, item)) or 'none'})")
            rows.append({**{k: v for k, v in item.items() if k != key}, "prompt": item[key]})
        else:
            raise InputError(f"{path}: entry {i} is a {type(item).__name__}, not a prompt string or object")
    return pd.DataFrame(rows)


def read_prompts(path: str | os.PathLike, fmt: str | None = None) -> pd.DataFrame:
    """A prompt list as a frame: ``row``, ``prompt`` and the file's other columns (empty prompts dropped)."""
    path = Path(path)
    text = _read_text(path)
    fmt = fmt or detect_format(path, text)
    if fmt not in FORMATS:
        raise UsageError(f"unknown prompt list format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {n} is not JSON ({e.msg})") from None
        df = _records_frame(items, path)
    elif fmt == "json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(doc, dict) and isinstance(doc.get("prompts"), list):
            doc = doc["prompts"]
        if not isinstance(doc, list):
            raise InputError(f"{path}: expected a JSON list of prompts (or {{\"prompts\": [...]}})")
        df = _records_frame(doc, path)
    elif fmt == "csv":
        found = _csv_header(text)
        if found is None:
            raise InputError(f"{path}: no {'/'.join(PROMPT_KEYS)} column in the CSV header")
        delimiter, column = found
        df = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False)
        df = df.rename(columns={column: "prompt"})
        df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed:") or str(c) == ""])
    else:
        df = pd.DataFrame({"prompt": [ln.strip() for ln in text.splitlines()]})
    if "prompt" not in df.columns:
        df["prompt"] = []
    df["prompt"] = df["prompt"].map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v).strip())
    df = df[df["prompt"] != ""].reset_index(drop=True)
    if "row" in df.columns:  # the file's own row column keeps its values under another name
        df = df.rename(columns={"row": "file_row"})
    if df.empty:
        raise InputError(f"prompt list {path} holds no prompts")
    df.insert(0, "row", range(len(df)))
    return df[["row", "prompt", *[c for c in df.columns if c not in ("row", "prompt")]]]


__all__ = ["FORMATS", "PROMPT_KEYS", "detect_format", "read_prompts"]
