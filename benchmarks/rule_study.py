"""Which selection rule? Nested cross-validation on the *selection halves* only (issue 29).

Reads the caches of ``benchmarks/rule_features.py`` (pooled activations of the selection half of ``split_halves``,
seed 0; the held-out half is never captured, so no number here can come from it) and compares rules that choose a
configuration among the same candidates as ``memdetect.workflows.select`` (every proposed layer x t in {10, 50, 200} x 4
metrics, raw and reference-normalised with fold-local statistics):

* ``current``: highest in-sample AUROC, then TPR@1%FPR, then d', then the default (``select.rank_candidates``);
* ``tie_fewer``: the candidates whose AUROC is within one standard error (Hanley-McNeil) of the best; among them the
  fewest changes from the default (layer, timestep, metric, normalisation), then the current rule's order;
* ``pauc``: the highest partial AUROC over FPR <= 5% (the mean TPR over the FPR grid k / n_novel, k <= 5% of
  n_novel), then the current rule's order;
* ``pauc_tie_fewer``: ``pauc`` with near-ties (within one bootstrap standard error of the best's partial AUROC, 50
  stratified replicates) broken towards the fewest changes from the default;
* ``crossfit``, ``crossfit_tie_fewer``, ``crossfit_pauc``: the three rules above, ranking on a *cross-fitted*
  matrix: a reference-normalised candidate's score of an image uses channel statistics fitted on the choosing part's
  novel images of the *other* 5 inner folds (the image's own fold never enters them), so that normalisation's
  in-sample optimism (the novel images that fitted the statistics look less spiky than new ones; worse with more
  channels per novel image and with extreme-value metrics such as maxmin) does not favour normalised candidates.
  (Added after the first run on demo-dit's selection half, where the rules above picked normalised maxmin
  candidates that did worse out of fold; see RESULTS.md.)
* ``zsum3``: the sum of the reference-z-scored scores of the current rule's top three (a combination);
* ``logreg8``: an L2 logistic regression over the reference-z-scored scores of the current rule's top eight, fitted
  on the choosing part (a combination).

Protocol: stratified 5-fold, 4 seeds; in every fold the rule sees only the choosing part (its normalisation
statistics included), and the fold's images are scored by its choice, standardised by the choosing part's novel
images; the pooled out-of-fold scores give AUROC, TPR@1%FPR, TPR@5%FPR and the partial AUROC (FPR <= 5%); the
numbers are means over the 4 seeds (the spread: min-max over seeds). Fixed rows ``default`` and
``default_normalised`` are the family default raw and reference-normalised, scored the same way.

Decision criterion, fixed before the run: among the single-configuration rules (a combination cannot be written to
memdetect.toml or scanned by ``scan``/``audit``/the guard today, so combinations are reported, not adopted), adopt
the one with the highest mean over the four models of the out-of-fold TPR@1%FPR, provided its out-of-fold AUROC is
not below ``current``'s by more than 0.002 on any model; a rule within 0.01 of the best mean TPR that changes less
(``tie_fewer`` over ``pauc_tie_fewer`` over ``pauc``) is preferred; if no rule beats ``current`` by 0.01, keep it.

python benchmarks/rule_study.py /tmp/rule29/demo-dit.npz /tmp/rule29/demo-sd.npz ... [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from memdetect.workflows.select import Candidate, FeatureScores, _aurocs, _tprs, rank_candidates

FPR_MAX = 0.05


def load(path: str):
    z = np.load(path)
    feats = {}
    for k in z.files:
        if "|" in k:
            layer, t = k.rsplit("|", 1)
            feats[(layer, int(t))] = torch.from_numpy(z[k])
    d = z["default"]
    return feats, z["labels"].astype(int), Candidate(str(d[0]), int(d[1]), str(d[2]))


def pauc(scores: np.ndarray, labels: np.ndarray, max_fpr: float = FPR_MAX) -> np.ndarray:
    """Mean TPR over the FPR grid k / n_novel, k = 0 .. floor(max_fpr * n_novel), per row (strictly above the
    (k+1)-th highest novel score, as ``_tprs``)."""
    neg = -np.sort(-scores[:, labels == 0], axis=1)
    pos = scores[:, labels == 1]
    k = int(np.floor(max_fpr * neg.shape[1] + 1e-9))
    cuts = neg[:, :k + 1]
    return (pos[:, None, :] > cuts[:, :, None]).mean(axis=2).mean(axis=1)


def hanley_se(a: np.ndarray, p: int, q: int) -> np.ndarray:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return np.sqrt(np.maximum(a * (1 - a) + (p - 1) * (q1 - a * a) + (q - 1) * (q2 - a * a), 0) / (p * q))


def changes(cands, default: Candidate) -> np.ndarray:
    return np.array([(c.layer != default.layer) + (c.timestep != default.timestep) + (c.metric != default.metric)
                     + (c.normalise != default.normalise) for c in cands])


def rule_current(m, y, d, cands, default):
    return int(rank_candidates(m, y, d)[0])


def rule_tie_fewer(m, y, d, cands, default):
    order = rank_candidates(m, y, d)
    auc = _aurocs(m, y)
    best = auc[order[0]]
    se = hanley_se(np.array([best]), int(y.sum()), int((1 - y).sum()))[0]
    near = [i for i in order if auc[i] >= best - se]
    ch = changes(cands, default)
    return int(min(near, key=lambda i: (ch[i], near.index(i))))


def _pauc_order(m, y, d):
    pa = pauc(m, y)
    base = rank_candidates(m, y, d)
    pos = np.empty(len(base), int)
    pos[base] = np.arange(len(base))
    return np.lexsort((pos, -np.round(pa, 9))), pa


def rule_pauc(m, y, d, cands, default):
    return int(_pauc_order(m, y, d)[0][0])


def rule_pauc_tie_fewer(m, y, d, cands, default, n_boot: int = 50, seed: int = 0):
    order, pa = _pauc_order(m, y, d)
    b = order[0]
    rng = np.random.default_rng(seed)
    pi, ni = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    reps = []
    for _ in range(n_boot):
        idx = np.r_[rng.choice(pi, len(pi)), rng.choice(ni, len(ni))]
        reps.append(pauc(m[[b]][:, idx], y[idx])[0])
    se = float(np.std(reps))
    near = [i for i in order if pa[i] >= pa[b] - se]
    ch = changes(cands, default)
    return int(min(near, key=lambda i: (ch[i], near.index(i))))


def _z(m, rows, y):
    ref = m[:, rows][:, y[rows] == 0]
    return (m - ref.mean(axis=1, keepdims=True)) / (ref.std(axis=1, keepdims=True) + 1e-12)


def combo_zsum(k: int):
    def rule(m, y_all, inner, d, cands, default):
        top = rank_candidates(m[:, inner], y_all[inner], d)[:k]
        return _z(m[top], inner, y_all).mean(axis=0)
    return rule


def combo_logreg(k: int):
    def rule(m, y_all, inner, d, cands, default):
        from sklearn.linear_model import LogisticRegression

        top = rank_candidates(m[:, inner], y_all[inner], d)[:k]
        x = _z(m[top], inner, y_all).T
        lr = LogisticRegression(C=1.0, max_iter=2000).fit(x[inner], y_all[inner])
        return lr.decision_function(x)
    return rule


SINGLE = {"current": rule_current, "tie_fewer": rule_tie_fewer, "pauc": rule_pauc,
          "pauc_tie_fewer": rule_pauc_tie_fewer}
CROSSFIT = {"crossfit": rule_current, "crossfit_tie_fewer": rule_tie_fewer, "crossfit_pauc": rule_pauc}


def crossfit_matrix(scorer: FeatureScores, rows: np.ndarray, y: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """``[K, len(rows)]``: raw rows as they are; every normalised row of image ``rows[j]`` with statistics fitted on
    the novel images among ``rows`` outside ``j``'s inner fold (stratified ``k``-fold of ``rows``)."""
    from sklearn.model_selection import StratifiedKFold

    out = np.empty((len(scorer.candidates), len(rows)))
    yr = y[rows]
    for fit, score in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(rows)), yr):
        m = scorer(rows[fit][yr[fit] == 0])
        out[:, score] = m[:, rows[score]]
    return out
COMBOS = {"zsum3": combo_zsum(3), "logreg8": combo_logreg(8)}


def metrics(y, s) -> dict:
    row = s[None, :]
    return {"auroc": float(_aurocs(row, y)[0]), "tpr1": float(_tprs(row, y, 0.01)[0]),
            "tpr5": float(_tprs(row, y, 0.05)[0]), "pauc5": float(pauc(row, y)[0])}


def study(path: str, seeds=(0, 1, 2, 3), folds: int = 5) -> dict:
    from sklearn.model_selection import StratifiedKFold

    feats, y, default = load(path)
    scorer = FeatureScores(feats)
    cands = scorer.candidates
    d = cands.index(default)
    dn = cands.index(Candidate(default.layer, default.timestep, default.metric, normalise="reference"))
    names = [*SINGLE, *CROSSFIT, *COMBOS, "default", "default_normalised"]
    per_seed = {n: [] for n in names}
    picks = {n: [] for n in [*SINGLE, *CROSSFIT]}
    for seed in seeds:
        oos = {n: np.full(len(y), np.nan) for n in names}
        for inner, outer in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
            m = scorer(inner[y[inner] == 0])
            ref = lambda s: s[inner][y[inner] == 0]  # noqa: E731
            for n, rule in SINGLE.items():
                k = rule(m[:, inner], y[inner], d, cands, default)
                picks[n].append(str(cands[k]))
                r = ref(m[k])
                oos[n][outer] = (m[k, outer] - r.mean()) / (r.std() + 1e-12)
            cf = crossfit_matrix(scorer, inner, y, seed=seed)
            for n, rule in CROSSFIT.items():
                k = rule(cf, y[inner], d, cands, default)
                picks[n].append(str(cands[k]))
                r = ref(m[k])
                oos[n][outer] = (m[k, outer] - r.mean()) / (r.std() + 1e-12)
            for n, rule in COMBOS.items():
                s = rule(m, y, inner, d, cands, default)
                r = ref(s)
                oos[n][outer] = (s[outer] - r.mean()) / (r.std() + 1e-12)
            for n, k in (("default", d), ("default_normalised", dn)):
                r = ref(m[k])
                oos[n][outer] = (m[k, outer] - r.mean()) / (r.std() + 1e-12)
        for n in names:
            per_seed[n].append(metrics(y, oos[n]))
    out = {"path": path, "n_memorized": int(y.sum()), "n_novel": int((1 - y).sum()), "n_candidates": len(cands),
           "rules": {}}
    for n in names:
        vals = {k: [r[k] for r in per_seed[n]] for k in per_seed[n][0]}
        out["rules"][n] = {k: [float(np.mean(v)), float(np.min(v)), float(np.max(v))] for k, v in vals.items()}
    from collections import Counter

    out["picks"] = {n: Counter(p).most_common(3) for n, p in picks.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("caches", nargs="+")
    ap.add_argument("--json")
    a = ap.parse_args()
    results = []
    for p in a.caches:
        start = time.perf_counter()
        r = study(p)
        results.append(r)
        print(f"== {p}: {r['n_memorized']} memorized / {r['n_novel']} novel, {r['n_candidates']} candidates "
              f"({time.perf_counter() - start:.0f} s)")
        for n, v in r["rules"].items():
            print(f"  {n:20s} " + "  ".join(f"{k} {m[0]:.3f} [{m[1]:.3f}-{m[2]:.3f}]" for k, m in v.items()))
        for n, p2 in r["picks"].items():
            print(f"  picks {n}: {p2}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
