"""The benches' tables: ``bench demo``'s table and notes, and the paper benches' (laion, imagenet, cifar10)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .render import _p, out


def _interval(r, value: str, lo: str, hi: str) -> str:
    return f"{r[value]:.3f} [{r[lo]:.3f}, {r[hi]:.3f}]" if r[value] == r[value] else "-"


def render_bench_demo(res: dict, *, model: str, output: Path, sweep_layers: bool) -> None:
    """``bench demo``: every method's AUROC and TPR@1%FPR with intervals, the paired verdicts, the selection and the
    sweep, and the files written."""
    st = res["settings"]
    t = Table(title=f"bench demo --model {model}: {_p(st.layer)}, t={st.timestep}, device {st.device}, batch "
                    f"{res['batch_size']} (95% bootstrap intervals)", title_justify="left")
    for c in ("method", "AUROC", "TPR@1%FPR", "s/sample", "memorized", "generalized"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for _, r in res["results"].iterrows():
        t.add_row(_p(r["method"]), _interval(r, "auroc", "auroc_lo", "auroc_hi"),
                  _interval(r, "tpr_at_1pct_fpr", "tpr_lo", "tpr_hi"), f"{r['seconds_per_sample']:.4f}",
                  str(r["n_memorized"]), str(r["n_generalized"]))
    out.print(t)
    pairs = res["pairs"]
    if len(pairs):
        ahead = pairs.loc[pairs["auroc_verdict"] == "ahead", "versus"].tolist()
        behind = pairs.loc[pairs["auroc_verdict"] == "behind", "versus"].tolist()
        out.print(f"ours_std AUROC, paired bootstrap: ahead of {', '.join(map(_p, ahead)) or 'none'}; behind "
                  f"{', '.join(map(_p, behind)) or 'none'}; the rest within noise", soft_wrap=True)
    if "selection" in res:
        c, sel = res["selection"]["chosen"], res["selection"]
        out.print(f"ours_selected (chosen on the selection half, measured on the held-out half): {_p(c['layer'])} at "
                  f"t={c['timestep']}, {c['metric']}; {_p(sel['reason'])}", soft_wrap=True)
    if "sweep" in res:
        sw, proof = res["sweep"], res["proof"]
        out.print(f"sweep: {sw['layer'].nunique()} layers x {sw['timestep'].nunique()} timesteps; "
                  f"{int(sw['inverted'].sum())} (layer, t) pairs inverted (AUROC < 0.5)")
        b = proof["selected"]
        out.print(f"best on the selection half: {_p(b['layer'])} at t={b['timestep']}: AUROC "
                  f"{b['select']['auroc']} (selection), {b['heldout']['auroc']} (held-out)", soft_wrap=True)
        if "default" in proof:
            d = proof["default"]
            out.print(f"default layer {_p(d['layer'])} at t={d['timestep']}: held-out AUROC {d['heldout']['auroc']}, "
                      f"TPR@1%FPR {d['heldout']['tpr_at_1pct_fpr']}; meets >= 0.98 / 0.90: "
                      f"{'yes' if d['meets_bar_heldout'] else 'no'}", soft_wrap=True)
    files = "results.csv, recall_by_grade.csv, pairs.csv, scores.csv, roc.png" + \
        (", selection.json" if "selection" in res else "")
    out.print(f"wrote {_p(output)}/{files}" + (", sweep.csv, sweep.png, layer_proof.json" if sweep_layers else ""),
              soft_wrap=True)


def render_paper_results(results, differences, title: str, metric: str = "std") -> None:
    """The paper benches' table: per unit and method, AUROC and TPR@1%FPR with their 95% intervals; then ours
    (``metric``) minus each baseline, with a paired interval, "ahead" only where it excludes 0."""
    t = Table(title=title, title_justify="left")
    for c in ("method", "unit", "AUROC [95% CI]", "TPR@1%FPR [95% CI]", "s/sample", "mem", "gen"):
        t.add_column(c, justify="left" if c in ("method", "unit") else "right")
    for _, r in results.iterrows():
        t.add_row(_p(r["method"]), _p(r["unit"]), f"{r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]",
                  f"{r['tpr_at_1pct_fpr']:.3f} [{r['tpr_lo']:.3f}, {r['tpr_hi']:.3f}]",
                  f"{r['seconds_per_sample']:.4f}", str(r["n_memorized"]), str(r["n_generalized"]))
    out.print(t)
    d = differences[differences["ours"] == f"ours_{metric}"]
    if len(d):
        t = Table(title=f"ours_{metric} minus each baseline (paired bootstrap, 95%)", title_justify="left")
        for c in ("baseline", "unit", "dAUROC [95% CI]", "dTPR@1%FPR [95% CI]", "ahead (CI > 0)"):
            t.add_column(c, justify="left" if c in ("baseline", "unit") else "right")
        for _, r in d.iterrows():
            t.add_row(_p(r["baseline"]), _p(r["unit"]), f"{r['d_auroc']:+.3f} [{r['d_auroc_lo']:+.3f}, "
                      f"{r['d_auroc_hi']:+.3f}]", f"{r['d_tpr']:+.3f} [{r['d_tpr_lo']:+.3f}, {r['d_tpr_hi']:+.3f}]",
                      "yes" if r["ahead"] else "no")
        out.print(t)


def render_paper(res: dict, title: str, output: Path, extra: str, files: str) -> None:
    if "results" not in res:  # a non-main process under accelerate: the main one writes the tables
        return
    render_paper_results(res["results"], res["differences"], title)
    st = res["settings"]
    out.print(f"generated {res['generated']}, reused {res['skipped']} from earlier runs; {_p(st['sampler'])}, "
              f"{st['steps']} steps; FLIPD {st['flipd_probes']} probe(s) at t={st['flipd_timestep']}{_p(extra)}",
              soft_wrap=True)
    out.print("seconds/sample: time per generated image on one device, generation excluded except for "
              "wen_all_steps and carlini, whose criteria need it (see the timing column)")
    out.print(f"wrote {_p(output)}/results.csv, differences.csv, {files}, roc.png, settings.json", soft_wrap=True)
