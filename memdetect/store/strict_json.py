"""Strict JSON out: every document memdetect writes parses with any JSON parser (RFC 8259 has no NaN or Infinity).

``dumps`` writes a non-finite float (a NaN score of an error row, an infinite bound) as ``null`` and refuses
nothing else that ``json.dumps`` would take.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (also numpy's) replaced by None, in dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # a numpy scalar
        return finite(obj.item())
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` in strict JSON: non-finite floats become ``null`` (``finite``), ``allow_nan=False``."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


__all__ = ["dumps", "finite"]
