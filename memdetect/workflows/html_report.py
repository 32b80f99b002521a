"""A self-contained HTML report: summary, score histogram, evidence for the top flagged images, a table of every
image (sortable, filtered: all / flagged / errors), settings.

Why self-contained: the file is a CI artifact that people open from a download or an e-mail, so it carries its
images as base64 PNGs, its style and its script inline, and loads nothing from the network (its Content Security
Policy allows only inline images, the inline style and the one inline script, by hash). Thumbnails show what the
model saw (the report's preprocessing recipe: centre crop of the shorter side), not the full image. Every name and
value taken from a file or a setting is written as text: control characters escaped (``memdetect.text.printable``),
then HTML-escaped, so a file name can neither add markup nor break a line.

Size stays bounded on a large audit: images are embedded for the ``evidence["images"]`` only (``memdetect.workflows.evidence``:
the top flagged images, ``--evidence-top``), and the table lists at most ``table_rows`` rows (flagged first, then
errors, then the highest scores; the report file has every row). Layout: one column under 600 px (a phone at 390 px
reads it), the table scrolls sideways in its own box.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io as _bytes_io
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .._version import __version__
from ..store.io import atomic_write, load_image
from ..progress import plural
from ..store.report import counts
from ..text import printable

THUMB = 128
#: rows of the table at most (the report file has them all)
TABLE_ROWS = 10_000
CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:1.5em auto;padding:0 1em;color:#222;max-width:1200px;line-height:1.35}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.8em}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;font-size:.9em}
.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#c62828;font-weight:bold}
.wrap{overflow-x:auto;max-width:100%}
img.hist{max-width:100%;height:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
.card{border:1px solid #ccc;border-left:5px solid #c62828;padding:.6em;border-radius:4px;min-width:0}
.card h3{font-size:.95em;margin:.1em 0 .4em;word-break:break-all}
.pics{display:flex;flex-wrap:wrap;gap:8px}
.pics figure{margin:0;font-size:.75em;width:128px;overflow-wrap:anywhere}
.pics img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #999;display:block}
.card table td,.card table th{font-size:.8em;padding:.1em .35em}
.place{display:block;max-width:100%}
.meta{font-size:.85em;color:#444}
.verdict{padding:.6em .9em;border-radius:4px;border:1px solid #999;font-size:1.05em;margin:.6em 0}
.verdict.fail{background:#fdecea;border-color:#c62828} .verdict.pass{background:#e8f5e9;border-color:#2e7d32}
.verdict.none{background:#f4f4f4}
#run-context th{white-space:nowrap} #run-context td{word-break:break-all}
nav a{margin-right:1em}
#rows th[data-sort]{cursor:pointer;user-select:none;white-space:nowrap}
#rows th[data-sort]::after{content:" \u2195";color:#999}
#rows td.path{word-break:break-all;min-width:12em}
#rows img{width:40px;height:40px;image-rendering:pixelated;vertical-align:middle}
#rows tr.flagged td:first-child{border-left:4px solid #c62828}
#rows tr.error td{color:#8a5a00}
#rows[data-filter=flagged] tr.row:not(.flagged),#rows[data-filter=errors] tr.row:not(.error){display:none}
.filters button{font:inherit;padding:.3em .8em;margin:0 .3em .4em 0;border:1px solid #888;background:#f4f4f4;
 border-radius:3px}
.filters button[aria-pressed=true]{background:#333;color:#fff}
@media (max-width:600px){
 body{margin:.6em auto;padding:0 .5em}
 .cards{grid-template-columns:1fr}
 .pics figure,.pics img{width:100px}
 .pics img{height:100px}
 td,th{font-size:.8em;padding:.2em .3em}
}
"""
#: sorting (click a header) and filtering (all / flagged / errors) of the table; no network, no other script
SCRIPT = """
(function(){
var t=document.getElementById('rows');if(!t)return;var b=t.tBodies[0];
function shown(){var n=0;for(var r of b.rows){if(r.offsetParent!==null)n++;}
 document.getElementById('shown').textContent=n;}
document.querySelectorAll('.filters button').forEach(function(btn){btn.addEventListener('click',function(){
 t.dataset.filter=btn.dataset.filter;
 document.querySelectorAll('.filters button').forEach(function(o){o.setAttribute('aria-pressed',o===btn);});
 shown();});});
t.querySelectorAll('th[data-sort]').forEach(function(th){th.addEventListener('click',function(){
 var i=th.cellIndex,num=th.dataset.sort==='num',dir=th.dataset.dir==='desc'?1:-1;th.dataset.dir=dir<0?'desc':'asc';
 var rows=Array.prototype.slice.call(b.rows);
 rows.sort(function(x,y){var a=x.cells[i].dataset.v,c=y.cells[i].dataset.v;
  if(num){a=a===''?-Infinity:+a;c=c===''?-Infinity:+c;return a<c?-dir:a>c?dir:0;}
  return dir*String(a).localeCompare(String(c));});
 rows.forEach(function(r){b.appendChild(r);});});});
shown();
})();
"""


def _png_b64(data: bytes) -> str:
    """A data URI for PNG or JPEG bytes."""
    kind = "jpeg" if data[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def _encode(arr: np.ndarray) -> bytes:
    """An ``[H, W, 3]`` uint8 picture as PNG up to 64 px (pixel-exact, small) and as JPEG above (a tenth the size)."""
    from PIL import Image

    buf = _bytes_io.BytesIO()
    if max(arr.shape[:2]) <= 64:
        Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


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
    """The image as the detector sees it (``load_image``'s recipe) at ``size`` (PNG up to 64 px, else JPEG); None if
    it cannot be read."""
    try:
        arr = load_image(path, size)
    except Exception:
        return None
    return _encode(np.ascontiguousarray(arr.transpose(1, 2, 0)))


def _esc(value) -> str:
    return html.escape(printable(str(value)), quote=True)


def _num(x, fmt: str = ".4g") -> tuple[str, str]:
    """(shown text, sort value) of a number cell; empty for a missing value."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)) or pd.isna(x):
        return "", ""
    return format(float(x), fmt), repr(float(x))


def overlay_png(path: str | os.PathLike, grid, size: int = THUMB) -> bytes | None:
    """The image as the detector saw it with ``grid`` (``[h, w]``, the top channels' activation) upsampled over it:
    min-max scaled, drawn in yellow-to-red with opacity growing with the activation."""
    from PIL import Image

    try:
        arr = load_image(path, size).transpose(1, 2, 0).astype(np.float32)
    except Exception:
        return None
    g = np.asarray(grid, np.float32)
    if g.ndim != 2 or not g.size or not np.isfinite(g).all():
        return None
    span = float(g.max() - g.min())
    g = (g - g.min()) / span if span > 0 else np.zeros_like(g)
    m = np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR), np.float32)[..., None]
    colour = np.concatenate([np.full_like(m, 255.0), 230.0 * (1 - m), np.zeros_like(m)], axis=2)
    alpha = 0.7 * m
    return _encode((arr * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8))


def place_svg(reference: dict, score: float, threshold: float | None, width: int = 260, height: int = 64) -> str:
    """The reference (novel) score histogram as inline SVG bars, with the threshold (dashed) and this score (red)."""
    edges, counts = reference["edges"], reference["counts"]
    lo, hi = float(edges[0]), float(edges[-1])
    marks = [v for v in (score, threshold) if v is not None and np.isfinite(v)]
    lo, hi = min([lo, *marks]), max([hi, *marks])
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.03 * span, hi + 0.03 * span
    x = lambda v: (float(v) - lo) / (hi - lo) * width  # noqa: E731
    top = max(counts) or 1
    h = height - 14
    bars = "".join(f"<rect x='{x(edges[i]):.1f}' y='{h - h * c / top:.1f}' "
                   f"width='{max(x(edges[i + 1]) - x(edges[i]) - 0.5, 0.5):.1f}' height='{h * c / top:.1f}' "
                   f"fill='#9fa8da'/>" for i, c in enumerate(counts) if c)
    parts = [f"<svg class='place' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='score {score:.4g} on the histogram of {reference['n']} reference scores'>", bars,
             f"<line x1='0' y1='{h}' x2='{width}' y2='{h}' stroke='#666'/>"]
    if threshold is not None and np.isfinite(threshold):
        parts.append(f"<line x1='{x(threshold):.1f}' y1='0' x2='{x(threshold):.1f}' y2='{h}' stroke='#333' "
                     f"stroke-dasharray='3,2'/>")
    parts.append(f"<line x1='{x(score):.1f}' y1='0' x2='{x(score):.1f}' y2='{h}' stroke='#c62828' stroke-width='2.5'/>")
    parts.append(f"<text x='0' y='{height - 2}' font-size='10'>{lo:.3g}</text><text x='{width}' y='{height - 2}' "
                 f"font-size='10' text-anchor='end'>{hi:.3g}</text></svg>")
    return "".join(parts)


def _figure(png: bytes | None, caption: str, cls: str = "") -> str:
    img = f"<img class='{cls}' alt='{caption}' src='{_png_b64(png)}'>" if png else "<div>(no preview)</div>"
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _card(i: int, ev: dict, doc: dict, src, metric: str, threshold: float | None,
          size: int = THUMB) -> tuple[str, bytes | None]:
    """One flagged image's evidence as an HTML card (and its overlay picture, reused in the table); pictures at
    ``size`` px (shown at 128)."""
    esc = _esc
    over = overlay_png(src, ev["map"]["values"], size)
    pics = [_figure(thumbnail_png(src, size), "as the model saw it", "ev-image"),
            _figure(over, f"where the top {len(ev['map']['channels'])} channels fire "
                          f"({ev['map']['shape'][0]}x{ev['map']['shape'][1]} grid)", "ev-map")]
    near = ev.get("nearest")
    if near:
        px = near["pixels"]
        how = ", ".join(x for x in ("mirrored" if px["flipped"] else "", f"shifted {px['dy']},{px['dx']} px"
                                    if px["dy"] or px["dx"] else "") if x)
        pics.append(_figure(thumbnail_png(px["path"], size), f"nearest by pixels: corr {px['similarity']:.3f}"
                                                       f"{' (' + how + ')' if how else ''}<br>{esc(px['path'])}",
                            "ev-nearest"))
        for f in near["features"][:2]:
            pics.append(_figure(thumbnail_png(f["path"], size), f"nearest by features: cos {f['similarity']:.3f}"
                                                          f"<br>{esc(f['path'])}", "ev-nearest"))
    head = f"{esc(metric)} {ev['score']:.4g}"
    if "p_value" in ev:
        head += f" &middot; p = {ev['p_value']:.3g} &middot; percentile {ev['percentile']:.1f}"
    parts = [f"<section class='card' id='ev-{i}'><h3>{esc(ev['path'])}</h3><p class='meta'>{head}</p>",
             "<div class='pics'>" + "".join(pics) + "</div>"]
    if ev.get("note"):
        parts.append(f"<p class='bad'>{esc(ev['note'])}</p>")
    if doc.get("reference"):
        parts.append(f"<p class='meta'>Place among {doc['reference']['n']} reference (novel) scores "
                     f"(red: this image; dashed: threshold):</p>" + place_svg(doc["reference"], ev["score"], threshold))
    ref = doc.get("channel_reference")
    cols = "<th>channel</th><th>pooled</th>" + ("<th>ref. mean</th><th>ref. std</th><th>z</th>" if ref else "")
    rows = []
    for c in ev["channels"]:
        cells = f"<td class='num'>{c['channel']}</td><td class='num'>{c['value']:.4g}</td>"
        if ref:
            z = "" if c.get("z") is None else f"{c['z']:.1f}"
            cells += (f"<td class='num'>{c['reference_mean']:.4g}</td><td class='num'>{c['reference_std']:.3g}</td>"
                      f"<td class='num'>{z}</td>")
        rows.append(f"<tr>{cells}</tr>")
    parts.append(f"<div class='wrap'><table><tr>{cols}</tr>{''.join(rows)}</table></div></section>")
    return "".join(parts), over


def _table_rows(df: pd.DataFrame, limit: int) -> pd.DataFrame:
    """At most ``limit`` rows: flagged first (highest score first), then errors, then the other rows by score."""
    flagged = df["memorized"].fillna(False).astype(bool)
    errored = df["error"].notna()
    order = pd.concat([df[flagged].sort_values("score", ascending=False, kind="stable"), df[errored],
                       df[~flagged & ~errored].sort_values("score", ascending=False, kind="stable")])
    return order.head(limit)


def verdict(df: pd.DataFrame, settings: Mapping, *, not_checked: bool = False) -> dict:
    """The run's outcome as the command's exit code says it: ``exit_code`` (1 when an image is flagged, or, with
    ``not_checked`` (``memdetect audit`` without --allow-errors), when one could not be checked; else 0), ``status``
    (``fail``, ``pass``, or ``none`` without a threshold: nothing can be flagged) and the counts."""
    s = counts(df)
    failed = s["flagged"] > 0 or (not_checked and s["errored"] > 0)
    status = "fail" if failed else ("none" if settings.get("threshold") is None else "pass")
    return {**s, "exit_code": 1 if failed else 0, "status": status, "not_checked": s["errored"]}


def _verdict_html(v: dict, audit: bool) -> str:
    word = {"fail": "FAIL", "pass": "PASS", "none": "NOT JUDGED (no threshold: nothing can be flagged)"}[v["status"]]
    what = [f"{v['flagged']} flagged"]
    if audit:
        what.append(f"{v['not_checked']} not checked")
    what.append(f"{v['scored']} of {v['images']} images scored")
    return (f"<p class='verdict {v['status']}' id='verdict'><strong>{word}</strong> &middot; exit code "
            f"<strong>{v['exit_code']}</strong> &middot; {', '.join(what)}</p>")


#: the run context's rows: (key in the context or the settings, label)
_CONTEXT_ROWS = (("command", "command line"), ("time_utc", "time (UTC)"), ("memdetect", "memdetect version"),
                 ("config", "config file"), ("config_sha256", "config SHA-256"),
                 ("git_commit", "git commit of the scanned checkout"), ("model", "model"), ("weights", "weights"),
                 ("layer", "layer"), ("timestep", "timestep"), ("metric", "metric"), ("threshold", "threshold"))


def _context_html(context: Mapping, settings: Mapping) -> str:
    rows = []
    for key, label in _CONTEXT_ROWS:
        value = context.get(key, settings.get(key))
        if key == "memdetect" and value is None:
            value = __version__
        if value is None:
            value = {"config": "none (options on the command line)", "config_sha256": "none",
                     "threshold": "none (nothing flagged)",
                     "git_commit": "not found (the inputs are not in a git checkout)"}.get(key, "unknown")
        elif key == "threshold":
            value = f"{float(value):.6g}"
        rows.append(f"<tr><th>{label}</th><td>{_esc(value)}</td></tr>")
    return ("<h2 id='context'>Run context</h2><div class='wrap'><table id='run-context'>" + "".join(rows)
            + "</table></div>")


#: what the copy search is, for a reviewer who has not read the README
COPY_SEARCH = ("<section id='copy-search'><h2>Reading the evidence: is it a copy, and of what?</h2>"
               "<p>A high score says the model reproduces this image more confidently than it reproduces images it "
               "never saw (the activation statistic of one forward pass); it does <strong>not</strong> say which "
               "training image was copied. That needs a <em>copy search</em>: <code>--reference-dir DIR</code> "
               "compares every flagged image with the images in DIR (the training images you can share, or a sample "
               "of them) and shows the nearest ones. A <em>nearest training image</em> is the image of DIR most "
               "similar to the flagged one, by pixel correlation (near 1: an exact, shifted, mirrored or tinted copy) "
               "and by the model's own features (close features with a lower pixel correlation: a template copy, "
               "same layout, other details). It is evidence for a human to judge: a near-copy found is strong "
               "evidence of memorization; none found means only that DIR holds no near copy, not that the image is "
               "novel.</p></section>")


def render_html(df: pd.DataFrame, settings: dict, *, files: Mapping[str, os.PathLike] | None = None,
                title: str = "memdetect report", resumed: int | None = None, evidence: dict | None = None,
                table_rows: int = TABLE_ROWS, top: int | None = None, not_checked: bool = False,
                context: Mapping | None = None, audit: bool | None = None) -> str:
    """The report as one HTML string. ``files`` maps a row's ``path`` to the file to read its images from;
    ``resumed``: how many rows were taken from a journal (said under the counts); ``evidence``: the document of
    ``memdetect.workflows.evidence.collect`` (cards for its images); ``table_rows``: the table's row limit. ``top`` is
    accepted for older callers and ignored (``evidence`` decides which images are shown). ``not_checked``: error rows
    fail the run (``memdetect audit``): they are said to be not checked, above the table and in their rows.
    ``context``: the run's context (``memdetect.workflows.run_context.run_context``: command line, time, config and its hash,
    git commit), shown under the verdict with the scoring settings; ``audit`` (default: the context's ``audit``, else
    ``not_checked``): the verdict counts images not checked (an audit's page)."""
    esc = _esc
    files = files or {}
    s = counts(df)
    metric, threshold = settings.get("metric", "score"), settings.get("threshold")
    scored = df[df["error"].isna()]
    has_p = "p_value" in df.columns
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'; "
           f"base-uri 'none'; form-action 'none'")
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<meta http-equiv='Content-Security-Policy' content=\"{csp}\">",
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
             _verdict_html(verdict(df, settings, not_checked=not_checked),
                           (context or {}).get("audit", not_checked) if audit is None else audit)]
    thr = f"{esc(metric)} &ge; {threshold:.6g}" if threshold is not None else "no threshold (nothing flagged)"
    parts.append("<div class='wrap'><table id='counts'><tr>" + "".join(
        f"<th>{k}</th>" for k in ("images", "scored", "errored", "flagged", "rule")) + "</tr><tr>"
        + "".join(f"<td class='num'>{s[k]}</td>" for k in ("images", "scored", "errored"))
        + f"<td class='num{' bad' if s['flagged'] else ''}'>{s['flagged']}</td><td>{thr}</td></tr></table></div>")
    if not_checked and s["errored"]:
        parts.append(f"<p class='bad'>{plural(s['errored'], 'images')} {'was' if s['errored'] == 1 else 'were'} not checked (unreadable, too large or not an image: "
                     f"see the errors filter); an image that is not checked fails the audit.</p>")
    ref = (evidence or {}).get("reference")
    if has_p and ref:
        parts.append(f"<p class='meta'>p-values: conformal, against {ref['n']} reference images known to be novel "
                     f"(the smallest possible is 1/{ref['n'] + 1} = {1 / (ref['n'] + 1):.3g}); a novel image gets "
                     f"p &le; a with probability at most a.</p>")
    parts.append("<nav><a href='#context'>run context</a>"
                 + ("<a href='#evidence'>evidence</a>" if evidence is not None else "")
                 + "<a href='#copy-search'>copy search</a><a href='#all'>all images</a>"
                   "<a href='#settings'>settings</a></nav>")
    if context is None:  # a caller that gives none (a merged or Ray scan): this process's command line and time
        from .run_context import run_context

        context = run_context()
    parts.append(_context_html(context, settings))
    if resumed is not None:
        parts.append(f"<p>{resumed} of {s['images']} rows reused from a verified journal; the others were scored "
                     f"in this run.</p>" if resumed else "<p>Every image was scored in this run.</p>")

    parts.append("<h2>Score distribution</h2>")
    if len(scored):
        png = histogram_png(scored["score"].to_numpy(np.float64), threshold, metric)
        parts.append(f"<img class='hist' alt='histogram of {esc(metric)} scores' src='{_png_b64(png)}'>")
    else:
        parts.append("<p>No image could be scored.</p>")

    overlays: dict[str, tuple[int, bytes | None]] = {}
    size = min(THUMB, int(settings.get("resolution") or THUMB))  # a 32 px model's images are not upsampled
    images = (evidence or {}).get("images", [])
    if evidence is not None:
        what = "Flagged images" if evidence.get("selected") == "flagged" else "Highest scores"
        total = s["flagged"] if evidence.get("selected") == "flagged" else s["scored"]
        parts.append(f"<h2 id='evidence'>{what} ({total}; evidence for the top {len(images)})</h2>")
        if evidence.get("reference_dir"):
            rd = evidence["reference_dir"]
            parts.append(f"<p class='meta'>Copy search in {esc(rd['path'])} ({rd['images']} images): nearest by the "
                         f"model's pooled features (cosine) and by pixel correlation at {rd['pixel_resolution']} px "
                         f"(mirror, shifts of up to 2 px and a colour cast tried). Near 1 by pixels: an exact or "
                         f"tinted copy; close features "
                         f"with lower pixel correlation: a template copy.</p>")
        cards = []
        for i, ev in enumerate(images):
            html_card, over = _card(i, ev, evidence, files.get(ev["path"], ev["path"]), metric, threshold, size)
            overlays[ev["path"]] = (i, over)
            cards.append(html_card)
        parts.append("<div class='cards'>" + "".join(cards) + "</div>" if cards else "<p>None.</p>")
    parts.append(COPY_SEARCH)
    rd = (evidence or {}).get("reference_dir")
    if rd:
        parts.append(f"<p id='copy-search-done'>Searched in this run: {esc(rd['path'])} ({rd['images']} images); "
                     f"each evidence card above shows its nearest images.</p>")
    else:
        parts.append("<p id='copy-search-done' class='bad'>No training images were searched in this run (no "
                     "--reference-dir): the evidence above shows where the model's activations spike, not which "
                     "training image was copied.</p>")

    shown = _table_rows(df, table_rows)
    parts.append(f"<h2 id='all'>All images</h2><div class='filters' role='group' aria-label='filter rows'>"
                 f"<button data-filter='all' aria-pressed='true'>all ({s['images']})</button>"
                 f"<button data-filter='flagged' aria-pressed='false'>flagged ({s['flagged']})</button>"
                 f"<button data-filter='errors' aria-pressed='false'>errors ({s['errored']})</button>"
                 f" <span class='meta'><span id='shown'>{len(shown)}</span> rows shown</span></div>")
    if len(shown) < len(df):
        parts.append(f"<p class='meta'>The table holds {len(shown)} of {len(df)} rows (flagged, then errors, then "
                     f"the highest scores); the report file has every row.</p>")
    head = ["<th data-sort='num'>#</th>", "<th data-sort='text'>path</th>", f"<th data-sort='num'>{esc(metric)}</th>"]
    if has_p:
        head += ["<th data-sort='num'>p-value</th>", "<th data-sort='num'>percentile</th>"]
    head += [f"<th data-sort='text'>{k}</th>" for k in ("flagged", "evidence", "error")]
    body = []
    position = {p: i for i, p in enumerate(df["path"])}
    for r in shown.itertuples(index=False):
        r = r._asdict()
        err = r["error"] if not pd.isna(r["error"]) else None
        flag = bool(r["memorized"]) if not pd.isna(r["memorized"]) else False
        cls = "row flagged" if flag else ("row error" if err is not None else "row")
        t, v = _num(r["score"])
        cells = [f"<td class='num' data-v='{position[r['path']]}'>{position[r['path']] + 1}</td>",
                 f"<td class='path' data-v='{esc(r['path'])}'>{esc(r['path'])}</td>",
                 f"<td class='num' data-v='{v}'>{t}</td>"]
        if has_p:
            pt, pv = _num(r["p_value"], ".3g")
            ct, cv = _num(r["percentile"], ".1f")
            cells += [f"<td class='num' data-v='{pv}'>{pt}</td>", f"<td class='num' data-v='{cv}'>{ct}</td>"]
        cells.append(f"<td data-v='{int(flag)}'>{'yes' if flag else ''}</td>")
        ev = overlays.get(r["path"])
        if ev is not None:
            img = f"<img class='ev-thumb' alt='evidence map' src='{_png_b64(ev[1])}'>" if ev[1] else ""
            cells.append(f"<td data-v='{ev[0]}'><a href='#ev-{ev[0]}'>{img} see</a></td>")
        else:
            cells.append("<td data-v=''></td>")
        shown_err = f"not checked: {err}" if err is not None and not_checked else err
        cells.append(f"<td data-v='{esc(err or '')}'>{esc(shown_err) if err else ''}</td>")
        body.append(f"<tr class='{cls}'>{''.join(cells)}</tr>")
    parts.append(f"<div class='wrap'><table id='rows' data-filter='all'><thead><tr>{''.join(head)}</tr></thead>"
                 f"<tbody>{''.join(body)}</tbody></table></div>")

    parts.append("<h2 id='settings'>Settings</h2><div class='wrap'><table>")
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in settings.items()]
    parts.append(f"</table></div><p><small>memdetect {esc(__version__)}</small></p>"
                 f"<script>{SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


def write_html(df: pd.DataFrame, path: str | os.PathLike, settings: dict, **kwargs) -> Path:
    """Render and write the report atomically."""
    text = render_html(df, settings, **kwargs)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


__all__ = ["COPY_SEARCH", "TABLE_ROWS", "histogram_png", "overlay_png", "place_svg", "render_html", "thumbnail_png",
           "verdict", "write_html"]
