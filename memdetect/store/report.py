"""Report rows: one per file (its scores, or an error), their columns, the table, the counts, the written report.

A row is ``path, score, <every score in scores.SCORES>, memorized, frame, error, key``: ``score`` is the chosen
metric's column and ``memorized`` is ``score >= threshold`` (empty without a threshold), both derived from the scores
when the row is made, so a row rebuilt from a journal with another metric or threshold is flagged by the new rule.
An animated / multi-page image is one row: each score is the highest over its frames, and ``frame`` is the index
(0-based) of the frame that gave the chosen metric's (0 for a still image; empty for an error row).
``key`` identifies the image's bytes and scoring settings (``memdetect.store.journal``). The written report adds the
settings that produced the scores as constant columns (``SETTINGS_COLUMNS``); a JSON report carries all of them.
A scan with a calibrated reference adds ``p_value`` and ``percentile`` after ``score`` (``add_p_values``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .io import write_report
from ..core.scores import SCORES
from ..settings import COLUMN_FIELDS, Settings

METRIC_COLUMNS = list(SCORES)
COLUMNS = ["path", "score", *METRIC_COLUMNS, "memorized", "frame", "error", "key"]
#: settings written into every CSV / Parquet report row
SETTINGS_COLUMNS = COLUMN_FIELDS  # and ``draws`` / ``normalise`` when not the default (``Settings.written``)


def make_row(path: str, scores: Mapping[str, float] | None, *, metric: str, threshold: float | None,
             error: str | None = None, key: str | None = None, frames: Mapping[str, int] | None = None) -> dict:
    """One report row: ``scores`` (every metric) for a scored file, or ``error`` (then ``scores`` is None).
    ``frames``: for each metric, the frame its score comes from (``frame`` is the chosen metric's; default 0)."""
    row = {"path": path, "score": None, **{m: None for m in METRIC_COLUMNS}, "memorized": None, "frame": None,
           "error": error, "key": key}
    if error is None:
        row.update({m: float(scores[m]) for m in METRIC_COLUMNS})
        row["score"] = row[metric]
        row["frame"] = int((frames or {}).get(metric, 0))
        if threshold is not None:
            row["memorized"] = bool(row["score"] >= threshold)
    return row


def rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a typed frame (``COLUMNS``; floats, nullable boolean ``memorized``, strings)."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ["score", *METRIC_COLUMNS]:
        df[c] = df[c].astype("float64")
    df["memorized"] = df["memorized"].astype("boolean")
    df["frame"] = df["frame"].astype("Int64")
    df["error"] = df["error"].astype("string")
    df["key"] = df["key"].astype("string")
    return df


def add_p_values(df: pd.DataFrame, reference) -> pd.DataFrame:
    """``p_value`` and ``percentile`` of each row's ``score`` against ``reference`` (``memdetect.core.pvalues.Reference``;
    empty for error rows), inserted after ``score``."""
    out = df.drop(columns=[c for c in ("p_value", "percentile") if c in df.columns])
    s = out["score"].to_numpy("float64", na_value=np.nan)
    at = list(out.columns).index("score") + 1
    out.insert(at, "p_value", reference.p_values(s))
    out.insert(at + 1, "percentile", reference.percentiles(s))
    return out


class Counted:
    """``counts`` and ``flagged`` of a result that holds a report ``frame`` (a scan's, a merge's)."""

    frame: pd.DataFrame

    @property
    def counts(self) -> dict:
        """``images``, ``scored``, ``errored``, ``flagged``."""
        return counts(self.frame)

    @property
    def flagged(self) -> bool:
        """Whether any image was flagged memorized (the exit-code contract's 1)."""
        return bool(self.frame["memorized"].fillna(False).any())


def counts(df: pd.DataFrame) -> dict:
    """``images``, ``scored``, ``errored``, ``flagged`` of a report frame."""
    errored = int(df["error"].notna().sum())
    flagged = int(df["memorized"].fillna(False).sum())
    return {"images": int(len(df)), "scored": int(len(df) - errored), "errored": errored, "flagged": flagged}


def write(df: pd.DataFrame, path: str | os.PathLike, settings: Mapping) -> Path:
    """Write the report (format from the suffix, atomically) with the settings columns added."""
    # with scores averaged over several noise draws or of reference-standardised activations, every row says so
    columns = Settings.written("column", settings)
    return write_report(df.assign(**columns), path, settings=dict(settings))


__all__ = ["COLUMNS", "METRIC_COLUMNS", "SETTINGS_COLUMNS", "add_p_values", "counts", "make_row", "rows_to_frame",
           "write"]


def write_anywhere(df: pd.DataFrame, output: str | os.PathLike, settings: Mapping):
    """``write`` to a local path, or to an fsspec URL (written to a temporary file, then copied)."""
    from .sources import is_url, upload

    if not is_url(str(output)):
        return write(df, output, settings)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="memdetect-report-") as tmp:
        local = Path(tmp) / ("report" + Path(str(output)).suffix.lower())
        write(df, local, settings)
        upload(local, str(output))
    return output
