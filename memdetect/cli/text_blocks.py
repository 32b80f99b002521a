"""Plain-text layouts for narrow terminals (``memdetect models`` and ``memdetect layers`` at 80 columns)."""

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


def layer_blocks(title: str, rows: Sequence[Sequence], width: int) -> str:
    """One block per layer: its name alone on a line (whole, never folded: it is what ``--layer`` takes), marked
    ``<- default`` where it is the default, then the module, the output shape and the calls per forward, indented
    (``rows``: name, module, shape, calls, is_default). The title wraps at ``width`` columns between words."""
    lines = [*textwrap.wrap(title, width=max(int(width), 40), break_long_words=False, break_on_hyphens=False), ""]
    for name, module, shape, calls, is_default in rows:
        lines.append(f"{name}  <- default" if is_default else name)
        lines.append(f"    {module}, {shape}, {calls} call{'' if str(calls) == '1' else 's'}/forward")
    return "\n".join(lines)


__all__ = ["layer_blocks", "preset_blocks"]
