"""Plain-text layouts for narrow terminals (``memdetect models`` at 80 columns)."""

from __future__ import annotations

import textwrap
from typing import Sequence


def preset_blocks(title: str, rows: Sequence[Sequence[str]], width: int) -> str:
    """One block per preset: ``name: family, t=T, sigma S`` then indented weights, layer and note lines, each
    wrapped to ``width`` columns (``rows``: name, family, weights, layer, t, sigma, note)."""
    width = max(int(width), 40)
    label = 10
    lines = [title, ""]
    for name, family, weights, layer, t, sigma, note in rows:
        lines.append(f"{name}: {family} family, t={t}, sigma {sigma}")
        for key, value in (("weights", weights), ("layer", layer), ("note", note)):
            if not value:
                continue
            lines.extend(textwrap.wrap(value, width=width, initial_indent=f"  {key:<{label - 2}}",
                                       subsequent_indent=" " * label, break_on_hyphens=False))
        lines.append("")
    return "\n".join(lines).rstrip("\n")


__all__ = ["preset_blocks"]
