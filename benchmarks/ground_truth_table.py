"""Render the ground-truth tables of RESULTS.md from ``memdetect bench demo`` output folders.

    for m in demo demo-sd demo-dit demo-edm; do memdetect bench demo --model $m --sweep-layers -o bench-demo-$m; done
    python benchmarks/ground_truth_table.py bench-demo-demo bench-demo-demo-sd bench-demo-demo-dit bench-demo-demo-edm

Prints markdown: one table of methods x models (AUROC and TPR@1%FPR with their bootstrap 95% intervals), recall per
duplication grade at each method's own 1%-FPR threshold, the paired comparisons of ours_std where their interval
excludes 0, and the default-layer proof of each model. Every number comes from the folders' CSV / JSON files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def cell(r, v, lo, hi) -> str:
    return "–" if pd.isna(r[v]) else f"{r[v]:.3f} [{r[lo]:.3f}, {r[hi]:.3f}]"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args(argv)
    runs = {}
    for f in args.folders:
        res = pd.read_csv(f / "results.csv")
        proof = json.loads((f / "layer_proof.json").read_text()) if (f / "layer_proof.json").is_file() else None
        model = proof["model"] if proof else f.name
        runs[model] = (res.set_index("method"), pd.read_csv(f / "recall_by_grade.csv"),
                       pd.read_csv(f / "pairs.csv"), proof)
    models = list(runs)
    methods = list(dict.fromkeys(m for res, *_ in runs.values() for m in res.index))

    print("| method | " + " | ".join(f"{m} AUROC | {m} TPR@1%FPR" for m in models) + " |")
    print("|---|" + "---|---|" * len(models))
    for meth in methods:
        cells = []
        for m in models:
            res = runs[m][0]
            if meth in res.index:
                r = res.loc[meth]
                cells += [cell(r, "auroc", "auroc_lo", "auroc_hi"), cell(r, "tpr_at_1pct_fpr", "tpr_lo", "tpr_hi")]
            else:
                cells += ["n/a", "n/a"]
        shown = f"{meth} (held-out half)" if meth == "ours_selected" else meth  # issue 29: measured on half
        print(f"| {shown} | " + " | ".join(cells) + " |")
    print("| memorized / generalized | " + " | ".join(
        f"{int(runs[m][0].iloc[0]['n_memorized'])} / {int(runs[m][0].iloc[0]['n_generalized'])} | " for m in models)
        + " |")
    print("| s/sample, ours / denoising loss / FLIPD | " + " | ".join(
        " / ".join(f"{runs[m][0].loc[k, 'seconds_per_sample']:.4f}" for k in ("ours_std", "denoising_loss", "flipd"))
        + " | " for m in models) + " |")

    for m in models:
        rec = runs[m][1]
        wide = rec.pivot(index="method", columns="grade", values="recall").reindex(methods).dropna(how="all")
        n = rec.drop_duplicates("grade").set_index("grade")["n"]
        order = sorted([g for g in wide.columns if g != "generalized (FPR)"],
                       key=lambda g: (g.split("-")[0], int(g.split("-")[1]) if g.split("-")[-1].isdigit() else 0))
        order.append("generalized (FPR)")
        print(f"\n**{m}: recall per grade at each method's own 1%-FPR threshold** "
              f"(n = memorized samples of the grade)\n")
        print("| method | " + " | ".join(f"{g} (n={int(n[g])})" for g in order) + " |")
        print("|---|" + "---|" * len(order))
        for meth, r in wide.iterrows():
            print(f"| {meth} | " + " | ".join("–" if pd.isna(r[g]) else f"{r[g]:.2f}" for g in order) + " |")

    print("\n**Paired bootstrap, ours_std minus each method (only intervals that exclude 0)**\n")
    for m in models:
        p = runs[m][2]
        p = p[p["method"] == "ours_std"] if "method" in p.columns else p  # ours_selected's rows: held-out half
        parts = []
        for _, r in p.iterrows():
            for k in ("auroc", "tpr"):
                if r[f"{k}_verdict"] != "no difference":
                    verdict = "ahead of" if r[f"{k}_verdict"] == "ahead" else "behind"
                    parts.append(f"{verdict} {r['versus']} in {k.upper()} by {r[f'd_{k}']:+.3f} "
                                 f"[{r[f'd_{k}_lo']:+.3f}, {r[f'd_{k}_hi']:+.3f}]")
        print(f"* {m}: " + ("; ".join(parts) if parts else "no difference excludes 0"))

    print("\n**Default layer, selection / held-out halves (layer_proof.json)**\n")
    print("| model | default layer, t | held-out AUROC | held-out TPR@1%FPR | meets 0.98 / 0.90 | best on selection "
          "(layer, t) | its held-out AUROC | its held-out TPR |")
    print("|---|---|---|---|---|---|---|---|")
    for m in models:
        proof = runs[m][3]
        if not proof:
            continue
        d, s = proof.get("default"), proof["selected"]
        dd = (f"`{d['layer']}`, {d['timestep']} | {d['heldout']['auroc']} | {d['heldout']['tpr_at_1pct_fpr']} | "
              f"{'yes' if d['meets_bar_heldout'] else 'no'}") if d else "– | – | – | –"
        print(f"| {m} | {dd} | `{s['layer']}`, {s['timestep']} | {s['heldout']['auroc']} | "
              f"{s['heldout']['tpr_at_1pct_fpr']} |")


if __name__ == "__main__":
    main()
