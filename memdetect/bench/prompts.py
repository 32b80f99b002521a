"""Prompt lists for ``memdetect bench laion``: local files in any common format, or the public lists, cached.

Formats: those of ``memdetect.store.prompts`` (``read_prompts``, ``detect_format``: JSON lines, JSON, CSV/TSV, text,
from the suffix or the content). Every list becomes a frame with ``row`` (0-based position in the file), ``prompt``
and the file's other columns, which ``--memorized-filter`` can select on (``type=VM``, ``max_sscd>=0.5``, ``in_ren_sd1_mem345=1``).

The public lists are pinned to the commits that ``../shared/data/prompts/README.md`` records and checked against
their git blob ids (``git hash-object``), so a cached or downloaded copy is known to be byte-identical to the
published file. They are cached in ``$MEMDETECT_CACHE/prompts`` (default ``~/.cache/memdetect/prompts``, see ``memdetect.core.hub``); in
offline mode (``HF_HUB_OFFLINE`` or ``MEMDETECT_OFFLINE``), a list that is not cached is a one-line error naming the
option that reads a local file instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..core import hub
from ..errors import InputError, UsageError
from ..store.prompts import read_prompts

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PublicList:
    """A published prompt list pinned to one commit and checked against its git blob id."""

    name: str
    url: str
    blob: str  # git blob id (sha1 of "blob <size>\\0" + content)
    what: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_WEN = "https://raw.githubusercontent.com/YuxinWenRick/diffusion_memorization/c8fe471d80b62213bdc8a384543ff44b44c62020"
_NEMO = ("https://raw.githubusercontent.com/ml-research/localizing_memorization_in_diffusion_models/"
         "f952eded64fca0bcf42e0bb3be9a01d64653cfdb")

PUBLIC_LISTS: dict[str, PublicList] = {p.name: p for p in [
    PublicList("wen-memorized", f"{_WEN}/examples/sdv1_500_memorized.jsonl",
               "a412754b278c546062c6629d033bb853cf2f6cb9",
               "Wen et al.'s 500 memorized SD v1 prompts (sdv1_500_memorized.jsonl)"),
    PublicList("nemo-memorized", f"{_NEMO}/prompts/memorized_laion_prompts.csv",
               "eac833b14e97a285d29793f22dbd60218239ed6f",
               "NeMo's memorized LAION prompts with VM/TM types (memorized_laion_prompts.csv)"),
    PublicList("nemo-unmemorized", f"{_NEMO}/prompts/unmemorized_laion_prompts.csv",
               "c18247e3bf83ea4a830e9b5115fea281d203a42f",
               "NeMo's 500 unmemorized LAION prompts (unmemorized_laion_prompts.csv)"),
]}

#: The defaults of ``bench laion``. With a ``--memorized-filter`` the memorized default is NeMo's copy of the same 500
#: prompts (same rows, order, captions), which carries the ``type`` (VM/TM) and SSCD columns to filter on.
DEFAULT_MEMORIZED, DEFAULT_MEMORIZED_LABELLED, DEFAULT_NORMAL = "wen-memorized", "nemo-memorized", "nemo-unmemorized"


def git_blob_id(data: bytes) -> str:
    """The id ``git hash-object`` gives ``data``: sha1 over ``b"blob <len>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def prompt_cache_dir() -> Path:
    return hub.cache_dir() / "prompts"


def fetch_public_list(name: str, *, option: str = "--memorized/--normal", timeout: float = 60.0) -> Path:
    """The cached, blob-checked copy of public list ``name``, downloaded on first use.

    ``option`` names the flag that reads a local file instead; it goes into the error messages.
    """
    pub = PUBLIC_LISTS[name]
    return hub.fetch_pinned_data(pub.url, prompt_cache_dir() / f"{pub.blob[:12]}-{pub.filename}",
                                 identify=lambda p: git_blob_id(p.read_bytes()), pinned=pub.blob, what=pub.what,
                                 hint=f"{option} FILE", timeout=timeout)


# -- filters -----------------------------------------------------------------------------------------------------------

_FILTER = re.compile(r"^\s*(?P<column>[^=!<>]+?)\s*(?P<op>==|=|!=|>=|<=|>|<)\s*(?P<value>.*?)\s*$")


def apply_filter(df: pd.DataFrame, spec: str) -> pd.DataFrame:
    """Rows of ``df`` matching ``COLUMN OP VALUE``: ``=`` / ``!=`` against comma-separated values (case-insensitive
    text), ``>=`` ``<=`` ``>`` ``<`` numerically (rows whose value is not a number are dropped)."""
    m = _FILTER.match(spec)
    if not m:
        raise UsageError(f"cannot read the filter {spec!r}; write COLUMN=VALUE[,VALUE], COLUMN!=VALUE or "
                         f"COLUMN>=NUMBER (also <=, >, <)")
    column, op, value = m["column"], m["op"], m["value"]
    by_lower = {str(c).lower(): c for c in df.columns}
    if column.lower() not in by_lower:
        raise UsageError(f"filter {spec!r}: the prompt list has no column {column!r} (columns: "
                         f"{', '.join(map(str, df.columns))})")
    col = df[by_lower[column.lower()]]
    if op in ("=", "==", "!="):
        wanted = {v.strip().lower() for v in value.split(",")}
        hit = col.astype(str).str.strip().str.lower().isin(wanted)
        return df[hit if op != "!=" else ~hit]
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"filter {spec!r}: {op} needs a number, got {value!r}") from None
    x = pd.to_numeric(col, errors="coerce")
    hit = {">=": x >= number, "<=": x <= number, ">": x > number, "<": x < number}[op]
    return df[hit.fillna(False)]


def load_list(source: str | os.PathLike | None, default: str, *, filters: Sequence[str] = (),
              limit: int | None = None, option: str = "--memorized") -> tuple[pd.DataFrame, str]:
    """A prompt list (a local file, or the public list ``default`` when ``source`` is None), filtered, then its
    first ``limit`` rows. Returns the frame and a description of where it came from."""
    if source is None:
        path = fetch_public_list(default, option=option)
        origin = f"{PUBLIC_LISTS[default].what}, {PUBLIC_LISTS[default].url}"
    else:
        path = Path(source)
        origin = str(path)
    df = read_prompts(path)
    for spec in filters:
        df = apply_filter(df, spec)
    if df.empty:
        raise InputError(f"no prompt of {origin} passes the filter(s) {', '.join(filters)}")
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be at least 1, got {limit}")
        df = df.head(limit)
    return df.reset_index(drop=True), origin
