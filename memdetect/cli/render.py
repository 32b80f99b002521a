"""What the commands print: the consoles, and one renderer per result (scan, calibration, audit, generation).

Everything printed is plain text: the consoles parse no rich markup and no emoji codes, and every name taken from a
file, a flag or a config (paths, model names, layer names, error messages) goes through ``memdetect.text.printable``
(control characters escaped), so a file name can neither style the output nor add a line of its own. Styled parts
are ``rich.text.Text``; log lines are escaped by the log formatter. The benches' tables are in ``render_bench``.
"""

from __future__ import annotations

import functools

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..core.scores import SCORES
from ..progress import plural
from ..text import printable

# no markup, no emoji codes, no highlighting: what is printed is the text given (names escaped with ``_p``)
err = Console(stderr=True, markup=False, emoji=False, highlight=False)
out = Console(markup=False, emoji=False, highlight=False)


def _p(value) -> str:
    """A name from a file, a flag or a config as plain one-line text (``memdetect.text.printable``)."""
    return printable(str(value))


def table_width(columns, rows, *, extra: int = 0) -> int:
    """The width a rich table (the default box, padding 1) needs to show ``rows`` under ``columns`` unwrapped, with one
    more column ``extra`` wide."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)] + ([extra] if extra else [])
    return sum(widths) + 3 * len(widths) + 1


def render_scan(result, det, *, top: int) -> None:
    df, s = result.frame, result.counts
    scored = df[df["error"].isna()].sort_values("score", ascending=False)
    if top and len(scored):
        t = Table(title=f"highest {det.metric} scores ({_p(det.name)}, {_p(det.layer)}, t={det.timestep})",
                  title_justify="left")
        t.add_column("path", overflow="fold")
        for c in ("score", *SCORES):
            t.add_column(c, justify="right")
        has_p = "p_value" in df.columns
        if has_p:
            t.add_column("p-value", justify="right")
        if det.threshold is not None:
            t.add_column("memorized")
        for _, r in scored.head(top).iterrows():
            cells = [_p(r["path"]), *(f"{r[c]:.4g}" for c in ("score", *SCORES))]
            if has_p:
                cells.append(f"{r['p_value']:.3g}")
            if det.threshold is not None:
                cells.append(Text("yes", style="bold red") if r["memorized"] else "no")
            t.add_row(*cells)
        out.print(t)
    errors = df[df["error"].notna()]
    for _, r in errors.head(5).iterrows():
        err.print(Text.assemble(("skipped", "yellow"), f" {_p(r['path'])}: {_p(r['error'])}"), soft_wrap=True)
    if len(errors) > 5:
        err.print(Text(f"... and {len(errors) - 5} more errors (see the report's error column)", style="yellow"))
    thr = f" at {det.metric} >= {det.threshold:g}" if det.threshold is not None else " (no threshold: nothing flagged)"
    dest = f"; report: {_p(result.output)}" if result.output else ""
    dest += f" ({result.resumed} rows reused from its journal)" if result.resumed else ""
    if result.rejected:
        dest += f"; {result.rejected} journal rows failed verification and were dropped"
    out.print(f"{plural(s['images'], 'images')}: {s['scored']} scored, {s['errored']} errored, "
              f"{s['flagged']} flagged memorized{thr}{dest}", soft_wrap=True)



def cal_detector(det, chosen):
    """A stand-in with the chosen configuration's name, layer and timestep for ``render_calibration``'s title."""
    from types import SimpleNamespace

    return SimpleNamespace(name=det.name, layer=chosen.layer, timestep=chosen.timestep)


def render_calibration(cal, det) -> None:
    from ..store.io import display_path

    labelled = cal.n_memorized is not None
    t = Table(title=f"thresholds at FPR <= {cal.fpr:g} on {cal.n_reference} reference images ({_p(det.name)}, "
                    f"{_p(det.layer)}, t={det.timestep})", title_justify="left")
    cols = ["metric", "threshold", "reference flagged"] + (["TPR", "AUROC"] if labelled else [])
    cols.insert(3, "FPR 95% CI")
    if labelled:
        cols.insert(5, "TPR 95% CI")
    for c in cols:
        t.add_column(c, justify="left" if c == "metric" else "right")
    for _, r in cal.table.iterrows():
        name = Text.assemble((r["metric"], "bold"), " (config)") if r["metric"] == cal.metric else r["metric"]
        cells = [name, f"{r['threshold']:.6g}", f"{r['flagged_reference']}/{r['n_reference']} "
                                               f"({r['fpr_reference']:.3g})",
                 f"[{r['fpr_low']:.3g}, {r['fpr_high']:.3g}]"]
        if labelled:
            cells += [f"{r['tpr']:.3f}", f"[{r['tpr_low']:.3g}, {r['tpr_high']:.3g}]",
                      f"{r['auroc']:.3f}" + (" (inverted)" if r["auroc"] < 0.5 else "")]
        t.add_row(*cells)
    out.print(t)
    row = cal.table.set_index("metric").loc[cal.metric]
    out.print(f"threshold {cal.metric} >= {row['threshold']:.6g}: flags {int(row['flagged_reference'])} of "
              f"{int(row['n_reference'])} reference images, FPR {row['fpr_reference']:.3g} (95% Clopper-Pearson "
              f"interval {row['fpr_low']:.3g} to {row['fpr_high']:.3g})", highlight=False)
    if labelled:
        out.print(f"TPR at that threshold: {int(row['flagged_memorized'])} of {cal.n_memorized} memorized images, "
                  f"{row['tpr']:.3g} (95% interval {row['tpr_low']:.3g} to {row['tpr_high']:.3g})", highlight=False)
    if cal.too_small:
        err.print(Text(f"warning: {cal.n_reference} reference images are too few for FPR {cal.fpr:g}: even with none "
                       f"flagged, the FPR's 95% upper bound stays above {cal.fpr:g} below {cal.min_reference} images "
                       f"(rule of three: 3/n). Add reference images for a threshold you can trust at this FPR.",
                       style="yellow"), soft_wrap=True)
    if cal.strict:
        out.print(f"note: {cal.fpr:g} x {cal.n_reference} reference images < 1, so no reference image may be flagged: "
                  f"each threshold sits just above the largest reference score. More reference images give a "
                  f"threshold that really has FPR {cal.fpr:g}.", highlight=False)
    if labelled:
        row = cal.table.set_index("metric").loc[cal.metric]
        out.print(f"ROC point of {cal.metric} >= {row['threshold']:.6g}: FPR {row['roc_fpr']:.3g}, TPR "
                  f"{row['tpr']:.3g} ({cal.n_memorized} memorized, {cal.n_reference} novel); AUROC "
                  f"{row['auroc']:.3f}", highlight=False)
    out.print(f"wrote {_p(display_path(cal.path))}", soft_wrap=True)



def render_selection(sel) -> None:
    """``calibrate --select-layer``'s evidence: the selection procedure against the family default, out of sample."""
    ev = sel.evidence
    iv = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
    dv = lambda v: f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"  # noqa: E731
    t = Table(title=f"--select-layer: {ev.n_candidates} candidates, {ev.n_memorized} memorized / {ev.n_novel} novel "
                    f"images, {ev.folds}-fold out-of-sample (95% bootstrap intervals)", title_justify="left")
    for c in ("configuration", "AUROC", "TPR@1%FPR"):
        t.add_column(c, justify="left" if c == "configuration" else "right")
    t.add_row(Text(f"selection procedure (now: {sel.best})"), iv(ev.selected_auroc), iv(ev.selected_tpr))
    t.add_row(Text(f"family default ({sel.default})"), iv(ev.default_auroc), iv(ev.default_tpr))
    t.add_row("difference (paired)", dv(ev.difference_auroc), dv(ev.difference_tpr))
    out.print(t)
    out.print(Text(f"chosen: {sel.chosen}: {sel.reason}"), soft_wrap=True)


def render_guard_calibration(cal, *, fpr: float, model: str, layer: str) -> None:
    """``calibrate --guard``'s thresholds, then the config written."""
    from ..store.io import display_path

    t = Table(title=f"guard thresholds at FPR <= {fpr:g} on {cal.n_reference} reference generations "
                    f"({_p(model)}, {_p(layer)}, step t={cal.document['guard']['timestep']})",
              title_justify="left")
    for c in ("metric", "threshold", "reference flagged"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for _, r in cal.table.iterrows():
        t.add_row(r["metric"], f"{r['threshold']:.6g}", f"{r['flagged_reference']}/{r['n_reference']}")
    out.print(t)
    out.print(f"wrote {_p(display_path(cal.path))}", soft_wrap=True)


def render_generated(gen, *, output, metric: str, report) -> None:
    """``generate``'s table of images (the first 50), the guard's line, and the report written."""
    t = Table(title=f"{plural(len(gen.rows), 'images')} in {gen.seconds:.1f} s -> {_p(output)}", title_justify="left")
    cols = ["file", "condition", "seed"] + ([metric, "flagged", "regenerated"] if gen.result else [])
    for c in cols:
        t.add_column(c)
    for r in gen.rows[:50]:
        cells = [f"{r['index']:05d}.png", _p(r["condition"]) if r["condition"] is not None else "-", str(r["seed"])]
        if gen.result:
            cells += [f"{r[metric]:.5g}", "FLAGGED" if r["flagged"] else "", str(r["regenerated"] or "")]
        t.add_row(*cells)
    out.print(t)
    if gen.result:
        res = gen.result
        how = ("one extra null-condition forward at that step (" + res.note + ")" if res.extra_forward
               else "read from the pipeline's own forward, no extra pass")
        out.print(f"guard: {res.layer} at timestep {res.timestep} (nearest {res.step_t}), {how}; "
                  f"{int(res.flagged.sum())} flagged" + (f" at {metric} >= {res.threshold:.6g}" if res.threshold
                                                           is not None else " (no threshold)")
                  + (f"; {len(res.retries)} regeneration round(s)" if res.retries else ""), soft_wrap=True)
    out.print(f"wrote {_p(report)}", soft_wrap=True)


def render_audit(doc: dict, *, top: int) -> None:
    """The audit's short summary: counts, then the flagged images by name (paths printed escaped, never wrapped)."""
    say = functools.partial(out.print, soft_wrap=True)
    cfg = f", config {_p(doc['config'])}" if doc["config"] else ""
    say(f"memdetect audit: {plural(doc['images'], 'images')}: {doc['scored']} scored, {doc['errored']} errored, "
        f"{doc['flagged']} flagged memorized ({doc['metric']} >= {doc['threshold']:.6g}{cfg})")
    for f in doc["flagged_images"][:top]:
        p = f"; p = {f['p_value']:.3g}" if "p_value" in f else ""
        say(f"  flagged: {_p(f['path'])}  ({doc['metric']} {f['score']:.4g}{p})")
    if len(doc["flagged_images"]) > top:
        say(f"  ... and {len(doc['flagged_images']) - top} more flagged (see the report)")
    what = "not scored" if doc.get("allow_errors") else "not checked"
    for e in doc["errors"][:5]:
        err.print(f"  {what}: {_p(e['path'])}: {_p(e['error'])}", soft_wrap=True)
    if len(doc["errors"]) > 5:
        err.print(f"  ... and {len(doc['errors']) - 5} more {what} (see the report's error column)")
    if doc.get("not_checked"):
        err.print(f"  {len(doc['not_checked'])} images not checked: the audit fails (exit 1); --allow-errors reports "
                  f"them without failing", soft_wrap=True)
    if doc.get("resume"):
        resumed = f" ({doc['resumed']} rows reused from its journal)" if doc["resumed"] else " (nothing reused)"
    else:
        resumed = " (no journal read: every image scored)"
    if doc.get("journal_rows_rejected"):
        resumed += f"; {doc['journal_rows_rejected']} journal rows failed verification and were dropped"
    say(f"report: {_p(doc['report'])}{resumed}")

