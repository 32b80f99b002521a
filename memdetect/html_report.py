"""A self-contained HTML report: summary, score histogram with the threshold, top images as thumbnails, settings.

Why self-contained: the file is a CI artifact that people open from a download or an e-mail, so it carries its
images as base64 PNGs and its style inline, and loads nothing from the network. Thumbnails show what the model
saw (the report's preprocessing recipe: centre crop of the shorter side), not the full image. Every name and value
taken from a file or a setting is written as text: control characters escaped (``memdetect.text.printable``), then
HTML-escaped, so a file name can neither add markup nor break a line.
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from ._version import __version__
from .io import atomic_write, load_image
from .report import counts
from .text import printable

THUMB = 128
CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em}
.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:150px;font-size:.75em;word-break:break-all}
figure img{width:128px;height:128px;image-rendering:pixelated;border:3px solid #ccc}
figure.flag img{border-color:#c62828}
.bad{color:#c62828;font-weight:bold}
"""


def _png_b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def histogram_png(scores: np.ndarray, threshold: float | None, metric: str) -> bytes:
    """Histogram of the scored images' scores with the threshold as a vertical line (matplotlib, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = scores[np.isfinite(scores)]
    if finite.size:
        ax.hist(finite, bins=min(50, max(5, int(np.sqrt(finite.size)) * 2)), color="#5c6bc0")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="#c62828", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.legend(loc="upper right")
    ax.set_xlabel(f"{metric} (higher = spikier = more likely memorized)")
    ax.set_ylabel("images")
    fig.tight_layout()
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def thumbnail_png(path: str | os.PathLike, size: int = THUMB) -> bytes | None:
    """The image as the detector sees it (``load_image``'s recipe) at ``size``; None if it cannot be read."""
    from PIL import Image

    try:
        arr = load_image(path, size)
    except Exception:
        return None
    buf = _bytes_io.BytesIO()
    Image.fromarray(arr.transpose(1, 2, 0)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _esc(value) -> str:
    return html.escape(printable(str(value)), quote=True)


def render_html(df: pd.DataFrame, settings: dict, *, files: Mapping[str, os.PathLike] | None = None,
                top: int = 24, title: str = "memdetect report", resumed: int | None = None) -> str:
    """The report as one HTML string. ``files`` maps a row's ``path`` to the file to read its thumbnail from;
    ``resumed``: how many rows were taken from a journal (said under the counts)."""
    esc = _esc
    s = counts(df)
    metric, threshold = settings.get("metric", "score"), settings.get("threshold")
    scored = df[df["error"].isna()].sort_values("score", ascending=False)
    flagged = scored[scored["memorized"].fillna(False).astype(bool)]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"]
    thr = f"{esc(metric)} &ge; {threshold:.6g}" if threshold is not None else "no threshold (nothing flagged)"
    parts.append("<table><tr>" + "".join(f"<th>{k}</th>" for k in ("images", "scored", "errored", "flagged", "rule"))
                 + "</tr><tr>" + "".join(f"<td class='num'>{s[k]}</td>" for k in ("images", "scored", "errored"))
                 + f"<td class='num{' bad' if s['flagged'] else ''}'>{s['flagged']}</td><td>{thr}</td></tr></table>")
    if resumed is not None:
        parts.append(f"<p>{resumed} of {s['images']} rows reused from a verified journal; the others were scored "
                     f"in this run.</p>" if resumed else "<p>Every image was scored in this run.</p>")

    parts.append("<h2>Score distribution</h2>")
    if len(scored):
        png = histogram_png(scored["score"].to_numpy(np.float64), threshold, metric)
        parts.append(f"<img alt='histogram of {esc(metric)} scores' src='{_png_b64(png)}'>")
    else:
        parts.append("<p>No image could be scored.</p>")

    shown = flagged if threshold is not None else scored
    heading = (f"Flagged images ({len(flagged)}; top {min(top, len(flagged))} by score)" if threshold is not None
               else f"Highest scores (top {min(top, len(scored))})")
    parts.append(f"<h2>{esc(heading)}</h2><div class='grid'>")
    for _, r in shown.head(top).iterrows():
        src = (files or {}).get(r["path"], r["path"])
        png = thumbnail_png(src)
        img = f"<img alt='' src='{_png_b64(png)}'>" if png else "<div>(no preview)</div>"
        cls = " class='flag'" if pd.notna(r["memorized"]) and bool(r["memorized"]) else ""
        parts.append(f"<figure{cls}>{img}<figcaption><b>{r['score']:.4g}</b><br>{esc(r['path'])}"
                     f"</figcaption></figure>")
    if not len(shown):
        parts.append("<p>None.</p>")
    parts.append("</div>")

    errors = df[df["error"].notna()]
    if len(errors):
        parts.append(f"<h2>Not scored ({len(errors)})</h2><table><tr><th>path</th><th>reason</th></tr>")
        parts += [f"<tr><td>{esc(r['path'])}</td><td>{esc(r['error'])}</td></tr>"
                  for _, r in errors.head(200).iterrows()]
        parts.append("</table>" + (f"<p>... and {len(errors) - 200} more (see the report).</p>"
                                   if len(errors) > 200 else ""))

    parts.append("<h2>Settings</h2><table>")
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in settings.items()]
    parts.append(f"</table><p><small>memdetect {esc(__version__)}</small></p></body></html>\n")
    return "\n".join(parts)


def write_html(df: pd.DataFrame, path: str | os.PathLike, settings: dict, **kwargs) -> Path:
    """Render and write the report atomically."""
    text = render_html(df, settings, **kwargs)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


__all__ = ["histogram_png", "render_html", "thumbnail_png", "write_html"]
