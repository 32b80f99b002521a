"""Choosing the detector's configuration (layer, timestep, metric) from labelled examples, validated out of sample.

The paper reads one fixed layer at t=50 and scores the spikiness of its pooled activation vector. That layer is not the
best one on every model (issue 29: on an independent DiT the default layer is at chance while others separate
perfectly). ``select_configuration`` chooses among candidates from images known to be memorized and known to be novel:

* **candidates**: the layers the family's adapter proposes (``Adapter.selection_layers``: every transformer block's
  output and MLP activation; a UNet's encoder and decoder blocks at the two lowest resolutions; always the family
  default), optionally widened or narrowed by glob (``candidate_layers``), times a few timesteps, times the metrics of
  ``memdetect.core.scores.SCORES``. Every metric is oriented (higher = more memorized), and a scan flags
  ``score >= threshold``, so a candidate's sign is always +1: a layer where memorized images are *less* spiky is
  recorded as inverted in the evidence and never chosen.
* **capture** (``capture_features``): one forward pass per timestep and batch captures every candidate layer through
  ``memdetect.core.capture.Trace`` with a pooling transform, so only pooled ``[B, C]`` vectors are kept.
* **the rule** (``choose``): the candidate with the highest AUROC on the images it is given, then TPR at 1% FPR, then
  the standardised mean difference (d'), then the family default, then the earliest candidate. With normalised
  candidates, it ranks on *cross-fitted* scores (``FeatureScores.cross_fitted``, ``_ranking``): an image's
  normalised score uses channel statistics fitted without it (the other inner folds' novel images). Fitted on the
  very images they score, the statistics make novel images look less spiky than new ones, and on many channels per
  novel image that alone can lift a normalised candidate of pure noise above a real signal; chosen that way, the
  rule picked normalised maxmin candidates that did worse out of sample (RESULTS.md, "Which selection rule").
* **out-of-sample evidence** (``nested_evaluation``): stratified k-fold. For every fold the rule chooses on the
  other folds only, and the chosen candidate scores the fold's images, standardised by the mean and standard deviation
  of the *choosing* part's novel images (so that folds that chose different candidates can be pooled); the family
  default is standardised the same way. AUROC and TPR@1%FPR of the pooled out-of-fold scores come with stratified
  bootstrap intervals (``memdetect.core.metrics``), and so does the paired difference (selection minus default).
* **normalisation** (``FeatureScores``): every (layer, timestep, metric) is tried twice: raw, and of the pooled
  vector z-scored per channel with the mean and standard deviation of *novel* images (what ``calibrate --normalise
  reference`` and ``Detector(normalise=...)`` do). The statistics are fold-local: in every fold they are fitted on
  the novel images of the choosing part only (``reference_statistics``), never on the fold's images being scored; the
  final pick fits them on every novel image, and the config's statistics come from ``calibrate --normalise
  reference``'s own split of the reference (half fit them, half set the threshold).
* **the decision**: the rule chooses the final candidate on every image; it replaces the default only when the paired
  difference is clearly positive (an interval of AUROC or TPR above 0, neither below 0). Otherwise the default is
  kept, and the evidence says so.

Too few examples (``MIN_MEMORIZED``, ``MIN_NOVEL``) is refused with a ``UsageError`` that says how many are needed.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.capture import LayerSpec, Trace, pool
from ..errors import LayerError, UsageError
from ..store.io import image_seed
from ..config import provenance  # noqa: F401  (re-exported: where a config came from)
from ..core.scores import SCORES

log = logging.getLogger(__name__)

#: timesteps tried by default (DDPM scale; EDM maps them to sigma)
DEFAULT_TIMESTEPS = (10, 50, 200)
#: the fewest labelled images a selection accepts: 20 memorized (a TPR near 0.95 then has a 95% Clopper-Pearson
#: interval about 0.25 wide) and 100 novel (the first count at which a 1%-FPR threshold may flag one novel image)
MIN_MEMORIZED = 20
MIN_NOVEL = 100
FOLDS = 5
MAX_FPR = 0.01
#: inner folds of the cross-fitted ranking (``FeatureScores.cross_fitted``)
CROSSFIT_FOLDS = 5


@dataclass(frozen=True)
class Candidate:
    """One configuration of the detector: where to read, when, and how to score."""

    layer: str
    timestep: int
    metric: str
    sign: int = 1
    normalise: str = "none"  # "reference": the pooled vector z-scored per channel with novel images' statistics

    def __str__(self) -> str:
        return f"{self.layer} @ t={self.timestep}, {self.metric}" + (
            ", reference-normalised" if self.normalise == "reference" else "")


def needed_message(n_memorized: int, n_novel: int) -> str | None:
    """The one-line refusal for too few labelled images (None when there are enough)."""
    if n_memorized >= MIN_MEMORIZED and n_novel >= MIN_NOVEL:
        return None
    from ..core.pvalues import clopper_pearson

    lo, hi = clopper_pearson(round(0.95 * MIN_MEMORIZED), MIN_MEMORIZED)
    return (f"choosing a layer needs at least {MIN_MEMORIZED} memorized and {MIN_NOVEL} novel images, got "
            f"{n_memorized} memorized and {n_novel} novel: with {MIN_MEMORIZED} memorized a TPR of 0.95 has a 95% "
            f"interval {hi - lo:.2f} wide, and below {MIN_NOVEL} novel images no 1%-FPR threshold can flag any; "
            f"add labelled images or calibrate without --select-layer")


def check_counts(labels: np.ndarray) -> None:
    msg = needed_message(int((labels == 1).sum()), int((labels == 0).sum()))
    if msg:
        raise UsageError(msg)


# -- candidates --------------------------------------------------------------------------------------------------------
def candidate_layers(detector, patterns: Sequence[str] | None = None) -> list[str]:
    """The layers to try: the adapter's proposal (``Adapter.selection_layers``), or, with ``patterns`` (globs over
    the hookable layer names of ``memdetect layers``, e.g. ``"up_blocks.0.*"``), every hookable layer that matches
    one; the family default is always included. A pattern that matches nothing is refused."""
    a = detector.adapter
    default = str(detector.layer)
    if not patterns:
        layers = [str(LayerSpec.parse(s)) for s in a.selection_layers()]
    else:
        infos = [i for i in detector.layers(include_inputs=any(":in" in p for p in patterns))
                 if len(i.shape) in (2, 3, 4) and i.shape[0] == 1 and i.shape[1] >= 2 and _poolable(i.shape, a.pooling)]
        layers = []
        for p in patterns:
            hit = [i.spec for i in infos if fnmatch.fnmatchcase(i.spec, p)]
            if not hit:
                raise UsageError(f"--layers {p!r} matches no hookable layer of this model (see `memdetect layers`)")
            layers += hit
    out = list(dict.fromkeys([default, *layers]))
    for s in out:  # every name must resolve before any image is read
        Trace(a.denoiser, [s])
    return out


def _poolable(shape: tuple[int, ...], how: str) -> bool:
    try:
        pool(torch.zeros(shape), how)
    except LayerError:
        return False
    return True


# -- capture -----------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def capture_features(detector, images: torch.Tensor, *, layers: Sequence[str], timesteps: Sequence[int],
                     batch_size: int | None = None, seeds: Sequence[int] | None = None,
                     on_batch: Callable[[int], None] | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """Pooled activations ``[N, C]`` (float32, CPU) of uint8 ``images`` at every layer and timestep: one forward pass
    per timestep and batch, stopped after the last layer fired; only pooled vectors are kept. The noise draw of each
    image is the one a scan uses (``image_seed`` of its pixels and the detector's seed), so the scores equal a scan's
    at that layer and timestep."""
    a = detector.adapter
    n = len(images)
    if seeds is None:
        seeds = [image_seed(v, detector.seed) for v in images.numpy()]
    bs = batch_size or detector.batch_size
    parts: dict[tuple[str, int], list[torch.Tensor]] = {(s, int(t)): [] for t in timesteps for s in layers}
    transform = lambda z: pool(z, a.pooling).float().cpu()  # noqa: E731
    for start in range(0, n, bs):
        x = images[start:start + bs]
        x0 = a.encode(x)
        for t in timesteps:
            x_t = a.noise(x0, int(t), list(seeds[start:start + bs]))
            with Trace(a.denoiser, list(layers), stop=True, transform=transform) as tr:
                a.forward(x_t, int(t))
            for s in layers:
                parts[(s, int(t))].append(tr[s])
        if on_batch:
            on_batch(len(x))
    return {k: torch.cat(v) for k, v in parts.items()}


def score_matrix(features: dict[tuple[str, int], torch.Tensor], metrics: Sequence[str] = tuple(SCORES)
                 ) -> tuple[list[Candidate], np.ndarray]:
    """Every candidate (layer, timestep, metric) and its scores: a ``[K, N]`` float64 matrix. A candidate whose
    scores are not all finite or all equal is left out."""
    cands, rows = [], []
    for (layer, t), v in features.items():
        for m in metrics:
            s = SCORES[m](v).double().numpy()
            if not np.isfinite(s).all() or np.ptp(s) == 0:
                continue
            cands.append(Candidate(layer, int(t), m))
            rows.append(s)
    return cands, np.stack(rows) if rows else np.zeros((0, 0))


def reference_statistics(feats: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-channel ``mean`` and ``std`` (float64, unbiased) of novel images' pooled activations ``[n, C]``: the form
    ``Detector(normalise=...)`` and ``[calibration.channels]`` take."""
    f = feats.double()
    if len(f) < 2:
        raise UsageError("reference normalisation needs at least 2 novel images")
    return {"mean": f.mean(dim=0).numpy(), "std": f.std(dim=0).numpy()}


class FeatureScores:
    """Every candidate's scores from captured features, raw and (with ``normalise``) reference-normalised, for a
    fixed candidate list. Calling it with ``reference`` (indices of novel images) gives the ``[K, N]`` matrix whose
    normalised rows use statistics fitted on those images only (``reference_statistics``); a normalised row that is
    not all finite or all equal with those statistics is constant (AUROC 0.5, never the pick)."""

    def __init__(self, features: dict[tuple[str, int], torch.Tensor], metrics: Sequence[str] = tuple(SCORES), *,
                 normalise: bool = True):
        self.features = features
        self.metrics = list(metrics)
        raw_cands, self.raw = score_matrix(features, self.metrics)
        norm = [Candidate(lt[0], lt[1], m, normalise="reference") for lt in features for m in self.metrics]
        self.candidates = raw_cands + (norm if normalise else [])

    @property
    def n_raw(self) -> int:
        return len(self.raw)

    def __call__(self, reference: np.ndarray) -> np.ndarray:
        from ..core.scores import standardise

        reference = np.asarray(reference)
        n = len(self.candidates) - self.n_raw
        if not n:
            return self.raw
        rows = []
        for lt, v in self.features.items():
            st = reference_statistics(v[reference])
            z = standardise(v.double(), torch.from_numpy(st["mean"]), torch.from_numpy(st["std"]))
            for m in self.metrics:
                s = SCORES[m](z).double().numpy()
                rows.append(s if np.isfinite(s).all() and np.ptp(s) > 0 else np.zeros(len(s)))
        return np.concatenate([self.raw, np.stack(rows)]) if len(self.raw) else np.stack(rows)

    def cross_fitted(self, rows: np.ndarray, labels: np.ndarray, folds: int = CROSSFIT_FOLDS, seed: int = 0
                     ) -> np.ndarray:
        """``[K, len(rows)]``: every candidate's scores of the images ``rows``, for *ranking* them: raw rows as they
        are; a normalised row's score of an image uses statistics fitted on the novel images among ``rows`` outside
        the image's own inner fold (stratified ``folds``-fold of ``rows``, seeded), so no image is scored with
        statistics it helped fit. Fitted on the images they score, the statistics make those novel images look less
        spiky than new ones, most with many channels per novel image and with extreme-value metrics (maxmin): the
        ranking would favour exactly the normalised candidates that do worst out of sample (RESULTS.md, the rule
        study)."""
        from sklearn.model_selection import StratifiedKFold

        rows = np.asarray(rows)
        y = np.asarray(labels)[rows]
        out = np.empty((len(self.candidates), len(rows)))
        for fit, scored in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(rows)), y):
            out[:, scored] = self(rows[fit][y[fit] == 0])[:, rows[scored]]
        return out


def _matrix(scores, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The score matrix for a choice made on ``rows``: ``scores`` itself, or (a ``FeatureScores``) with the
    normalisation statistics fitted on the novel images among ``rows`` only."""
    if callable(scores):
        return scores(rows[labels[rows] == 0])
    return scores


def _ranking(scores, labels: np.ndarray, rows: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The matrix the rule ranks on when it chooses on ``rows``: ``m`` (``_matrix``), with the columns ``rows``
    cross-fitted where ``scores`` has normalised candidates (``FeatureScores.cross_fitted``); the other columns are
    ``m``'s (the rule never reads them)."""
    if not isinstance(scores, FeatureScores) or scores.n_raw == len(scores.candidates):
        return m
    r = m.copy()
    r[:, rows] = scores.cross_fitted(rows, labels)
    return r


# -- the rule ----------------------------------------------------------------------------------------------------------
def _aurocs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every row of ``scores`` [K, n] (Mann-Whitney, ties one half)."""
    from scipy.stats import rankdata

    pos = labels == 1
    p, q = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(scores, axis=1)
    return (ranks[:, pos].sum(axis=1) - p * (p + 1) / 2) / (p * q)


def _tprs(scores: np.ndarray, labels: np.ndarray, max_fpr: float = MAX_FPR) -> np.ndarray:
    """TPR at FPR <= ``max_fpr`` of every row (``memdetect.core.metrics``' rule, as ``_fast_tpr``)."""
    neg = scores[:, labels == 0]
    k = int(np.floor(max_fpr * neg.shape[1] + 1e-9))
    if k >= neg.shape[1]:
        return np.ones(len(scores))
    cut = -np.partition(-neg, k, axis=1)[:, k]
    return (scores[:, labels == 1] > cut[:, None]).mean(axis=1)


def _dprime(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    pos, neg = scores[:, labels == 1], scores[:, labels == 0]
    spread = np.sqrt(0.5 * (pos.var(axis=1) + neg.var(axis=1))) + 1e-12
    return (pos.mean(axis=1) - neg.mean(axis=1)) / spread


def rank_candidates(scores: np.ndarray, labels: np.ndarray, default: int | None = None) -> np.ndarray:
    """Candidate indices, best first, by the rule (AUROC, TPR@1%FPR, d', default first, earliest first)."""
    auc, tpr, dp = _aurocs(scores, labels), _tprs(scores, labels), _dprime(scores, labels)
    is_default = np.zeros(len(scores))
    if default is not None:
        is_default[default] = 1
    # np.lexsort sorts by the last key first, ascending: negate what should be largest first
    order = np.lexsort((np.arange(len(scores)), -is_default, -np.round(dp, 9), -np.round(tpr, 9),
                        -np.round(auc, 9)))
    return order


def choose(scores: np.ndarray, labels: np.ndarray, rows: np.ndarray, default: int | None = None) -> int:
    """The candidate the rule picks on images ``rows`` only (columns of ``scores`` [K, N]; ``labels`` [N])."""
    rows = np.asarray(rows)
    return int(rank_candidates(scores[:, rows], labels[rows], default)[0])


# -- out-of-sample evidence ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evidence:
    """What the nested evaluation measured (``nested_evaluation``); intervals are ``[value, lo, hi]``."""

    folds: int
    seed: int
    n_memorized: int
    n_novel: int
    n_candidates: int
    selected_auroc: list[float]
    selected_tpr: list[float]
    default_auroc: list[float]
    default_tpr: list[float]
    difference_auroc: list[float]
    difference_tpr: list[float]
    fold_choices: list[str]

    @property
    def clearly_better(self) -> bool:
        """The selection beats the default out of sample: a paired interval above 0, none below 0."""
        up = self.difference_auroc[1] > 0 or self.difference_tpr[1] > 0
        down = self.difference_auroc[2] < 0 or self.difference_tpr[2] < 0
        return up and not down


def nested_evaluation(scores: np.ndarray | FeatureScores, labels: np.ndarray, candidates: Sequence[Candidate],
                      default: int, *,
                      folds: int = FOLDS, seed: int = 0, n_boot: int = 1000,
                      chooser: Callable[[np.ndarray, np.ndarray, np.ndarray, int | None], int] = choose) -> Evidence:
    """Out-of-sample AUROC and TPR@1%FPR of the selection procedure and of the default, and their paired
    difference, by stratified k-fold: each fold is scored by the candidate chosen on the other folds (see the module
    docstring). ``scores``: ``[K, N]``, or a ``FeatureScores`` whose normalisation statistics are fitted in each fold
    on the choosing part's novel images only. ``chooser`` is the rule (a test passes a spy)."""
    from sklearn.model_selection import StratifiedKFold

    from ..core.metrics import bootstrap_metrics, paired_difference

    labels = np.asarray(labels, int)
    oos_sel = np.full(len(labels), np.nan)
    oos_def = np.full(len(labels), np.nan)
    choices = []
    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for inner, outer in kfold.split(np.zeros(len(labels)), labels):
        m = _matrix(scores, labels, inner)
        pick = chooser(_ranking(scores, labels, inner, m), labels, inner, default)
        choices.append(str(candidates[pick]))
        for k, dest in ((pick, oos_sel), (default, oos_def)):
            ref = m[k, inner][labels[inner] == 0]
            dest[outer] = (m[k, outer] - ref.mean()) / (ref.std() + 1e-12)
    sel = bootstrap_metrics(labels, oos_sel, n_boot=n_boot, seed=seed)
    dfl = bootstrap_metrics(labels, oos_def, n_boot=n_boot, seed=seed)
    diff = paired_difference(labels, oos_sel, oos_def, n_boot=n_boot, seed=seed)
    iv = lambda i: [float(i.value), float(i.lo), float(i.hi)]  # noqa: E731
    return Evidence(folds=folds, seed=seed, n_memorized=int(labels.sum()), n_novel=int((1 - labels).sum()),
                    n_candidates=len(candidates), selected_auroc=iv(sel["auroc"]), selected_tpr=iv(sel["tpr"]),
                    default_auroc=iv(dfl["auroc"]), default_tpr=iv(dfl["tpr"]),
                    difference_auroc=iv(diff["auroc"]), difference_tpr=iv(diff["tpr"]), fold_choices=choices)


@dataclass(frozen=True)
class Selection:
    """The outcome: the configuration to use (``chosen``: the rule's pick on every image, or the default when that is
    not clearly better out of sample), the rule's pick, the default, and the evidence."""

    chosen: Candidate
    best: Candidate
    default: Candidate
    kept_default: bool
    reason: str
    evidence: Evidence
    inverted: int  # candidates with AUROC < 0.5 on every image (never chosen: a scan flags score >= threshold)
    best_in_sample: dict = field(default_factory=dict)
    normalisation_considered: bool = False

    def record(self) -> dict:
        """The ``[selection]`` table of memdetect.toml (evidence included)."""
        ev = asdict(self.evidence)
        return {"method": "nested stratified k-fold: choose on the other folds, score the held-out fold",
                "rule": "highest AUROC, then TPR@1%FPR, then d', then the default; normalised candidates ranked on "
                        "cross-fitted scores (statistics fitted without the image's inner fold)",
                "normalise": self.chosen.normalise, "normalisation_considered": self.normalisation_considered,
                "decision": "selected" if not self.kept_default else "kept default", "reason": self.reason,
                "chosen": _cand(self.chosen), "best": _cand(self.best), "default": _cand(self.default),
                "inverted_candidates": self.inverted, "best_in_sample": self.best_in_sample, **ev}


def _cand(c: Candidate) -> dict:
    return {"layer": c.layer, "timestep": c.timestep, "metric": c.metric, "sign": c.sign, "normalise": c.normalise}


def select_configuration(scores: np.ndarray | FeatureScores, labels: np.ndarray, candidates: Sequence[Candidate],
                         default: Candidate,
                         *, folds: int = FOLDS, seed: int = 0, n_boot: int = 1000,
                         chooser: Callable = choose) -> Selection:
    """Choose the configuration from ``scores`` ([K, N]: every candidate on every labelled image) and ``labels``
    (1 memorized, 0 novel), or a ``FeatureScores`` (raw and reference-normalised candidates, fold-local statistics):
    see the module docstring. Refuses too few images (``check_counts``)."""
    labels = np.asarray(labels, int)
    check_counts(labels)
    if default not in candidates:
        raise UsageError(f"the family default ({default}) is not among the candidates")
    d = list(candidates).index(default)
    ev = nested_evaluation(scores, labels, candidates, d, folds=folds, seed=seed, n_boot=n_boot, chooser=chooser)
    everything = np.arange(len(labels))
    full = _matrix(scores, labels, everything)
    best_i = chooser(_ranking(scores, labels, everything, full), labels, everything, d)
    best = candidates[best_i]
    auc = _aurocs(full, labels)
    in_sample = {"auroc": float(auc[best_i]), "tpr": float(_tprs(full[[best_i]], labels)[0]),
                 "default_auroc": float(auc[d]), "default_tpr": float(_tprs(full[[d]], labels)[0])}
    if best == default:
        keep, reason = True, "the rule picks the family default"
    elif ev.clearly_better:
        keep, reason = False, ("out of sample the selection beats the default: paired AUROC difference "
                               f"{_iv(ev.difference_auroc)}, TPR difference {_iv(ev.difference_tpr)}")
    else:
        keep, reason = True, ("not clearly better than the default out of sample (paired AUROC difference "
                              f"{_iv(ev.difference_auroc)}, TPR difference {_iv(ev.difference_tpr)}): kept the default")
    return Selection(chosen=default if keep else best, best=best, default=default, kept_default=keep, reason=reason,
                     evidence=ev, inverted=int((auc < 0.5).sum()), best_in_sample=in_sample,
                     normalisation_considered=any(c.normalise != "none" for c in candidates))


def _iv(v: Sequence[float]) -> str:
    return f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def select_from_images(detector, images: torch.Tensor, labels: np.ndarray, *, layers: Sequence[str] | None = None,
                       timesteps: Sequence[int] = DEFAULT_TIMESTEPS, batch_size: int | None = None,
                       folds: int = FOLDS, seed: int = 0, n_boot: int = 1000, normalise: bool = True,
                       on_batch: Callable[[int], None] | None = None) -> tuple[Selection, list[Candidate], np.ndarray]:
    """The whole procedure on uint8 ``images`` with ``labels``: candidates, capture, selection. ``detector``: loaded
    with ``prune=False`` (the candidates may lie past its own layer). ``normalise``: try every candidate raw and
    reference-normalised too (fold-local statistics, ``FeatureScores``). Returns the selection, the candidates and
    their score matrix (normalised rows with statistics from every novel image)."""
    labels = np.asarray(labels, int)
    check_counts(labels)
    layers = list(layers) if layers else candidate_layers(detector)
    default_layer = str(detector.layer)
    steps = list(dict.fromkeys([*map(int, timesteps)]))
    if int(detector.timestep) not in steps:
        steps.append(int(detector.timestep))
    for t in steps:
        if not 0 <= t < detector.adapter.num_train_timesteps:
            raise UsageError(f"timestep {t} is outside the model's schedule "
                             f"[0, {detector.adapter.num_train_timesteps})")
    log.info("selecting among %d layers x %d timesteps x %d metrics on %d memorized and %d novel images",
             len(layers), len(steps), len(SCORES), int(labels.sum()), int((1 - labels).sum()))
    feats = capture_features(detector, images, layers=layers, timesteps=steps, batch_size=batch_size,
                             on_batch=on_batch)
    scorer = FeatureScores(feats, normalise=normalise)
    cands = scorer.candidates
    default = Candidate(default_layer, int(detector.timestep), detector.metric)
    sel = select_configuration(scorer, labels, cands, default, folds=folds, seed=seed, n_boot=n_boot)
    return sel, cands, scorer(np.flatnonzero(labels == 0))




# -- from image files: `memdetect calibrate --select-layer` ----------------------------------------------------------
def parse_timesteps(text: str) -> list[int]:
    """``"10,50,200"`` -> [10, 50, 200] (non-negative integers, at least one)."""
    try:
        steps = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--timesteps takes comma-separated integers, got {text!r}") from None
    if not steps or any(t < 0 for t in steps):
        raise UsageError(f"--timesteps takes comma-separated non-negative integers, got {text!r}")
    return steps


def read_images(paths: Sequence, resolution: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """Decode every image under ``paths`` (files, folders, quoted globs, sources) at the model's ``resolution``:
    uint8 ``[N, 3, R, R]``, the names of the decoded files, and one ``"name: reason"`` per file that could not be
    read (left out, as a scan leaves an error row)."""
    from ..store.io import ImageError, decode_image, expand_globs, read_file
    from ..store.sources import Source, item_name, read_item, resolve

    files = resolve(expand_globs(paths))
    arrays, names, errors = [], [], []
    for f in files:
        try:
            data = read_item(f) if isinstance(f, Source) else read_file(f)
            arrays.append(decode_image(data, resolution))
            names.append(item_name(f) if isinstance(f, Source) else str(f))
        except ImageError as e:
            errors.append(f"{item_name(f)}: {e}")
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, resolution, resolution,
                                                                           dtype=torch.uint8)
    return pixels, names, errors


#: ``--training-duplicates``: a training image present at least this many times is a memorized example
MIN_COPIES = 10


def training_duplicate_examples(folder, resolution: int, *, min_copies: int = MIN_COPIES, threshold: float = 0.95
                                ) -> tuple[torch.Tensor, list[str], str]:
    """Labelled examples from a model's training images when no labelled copies exist: one image of every group of
    near-duplicates (``memdetect.core.similarity.near_duplicates``, pixel correlation >= ``threshold``) with at least
    ``min_copies`` members is a memorized example (copies of one image give one score: each is kept once); the images
    with no near-duplicate are novel examples. Returns the memorized pixels, the unique images' paths and a short
    description of what was found."""
    from ..core.similarity import near_duplicates

    pixels, names, errors = read_images([folder], resolution)
    if not len(pixels):
        raise UsageError(f"--training-duplicates {folder}: no readable image")
    counts, group = near_duplicates(pixels, threshold=threshold)
    reps = torch.unique(group[counts >= min_copies])
    unique = [names[i] for i in torch.nonzero(counts == 1).flatten().tolist()]
    found = (f"{len(pixels)} training images: {len(reps)} groups of >= {min_copies} near-duplicates (correlation >= "
             f"{threshold:g}) as memorized, {len(unique)} unique images as novel")
    log.info("%s; %d unreadable", found, len(errors))
    return pixels[reps], unique, found


def calibrate_selected(detector, reference: Sequence, memorized: Sequence, *, fpr: float = 0.01,
                       layers: Sequence[str] | None = None, patterns: Sequence[str] | None = None,
                       timesteps: Sequence[int] = DEFAULT_TIMESTEPS, output="memdetect.toml", force: bool = False,
                       model: str | None = None, model_path=None, sigma: float | None = None, folds: int = FOLDS,
                       n_boot: int = 1000,
                       on_batch: Callable[[int, int], None] | None = None, num_workers: int | None = None,
                       positives: torch.Tensor | None = None, source: str = "labelled images"):
    """``memdetect calibrate --select-layer``: choose (layer, timestep, metric, normalisation) on ``reference`` (novel)
    and ``memorized`` images (``select_from_images``), then calibrate the chosen configuration's threshold at ``fpr`` on
    the reference images exactly as ``memdetect.workflows.calibrate.calibrate_paths`` does (a reference-normalised pick with
    ``normalise="reference"``: half the reference fits the channel statistics, half sets the threshold; considered
    only when the reference allows that split, ``calibrate.split_reference``), and write memdetect.toml with a
    ``[selection]`` table (the evidence). ``detector``: loaded with ``prune=False``; its layer, timestep and metric
    are the default the selection must beat. ``positives``: memorized images given as pixels instead of files
    (``--training-duplicates``), ``source`` says where the labels came from. Returns (Calibration, Selection)."""
    from .calibrate import calibrate_paths, check_fpr, check_output, split_reference
    from ..detector import Detector

    check_fpr(fpr)
    check_output(output, force)
    a = detector.adapter
    ref_px, _, ref_err = read_images(reference, a.resolution)
    if positives is None:
        mem_px, _, mem_err = read_images(memorized, a.resolution)
    else:
        mem_px, mem_err = positives, []
    for e in ref_err + mem_err:
        log.warning("left out of the selection: %s", e)
    check_counts(np.r_[np.ones(len(mem_px), int), np.zeros(len(ref_px), int)])
    images = torch.cat([mem_px, ref_px])
    labels = np.r_[np.ones(len(mem_px), int), np.zeros(len(ref_px), int)]
    layers = list(layers) if layers else candidate_layers(detector, patterns)
    try:  # a normalised pick is calibrated with --normalise reference's split of the reference: it must be possible
        split_reference(reference)
        normalise = True
    except UsageError as e:
        normalise = False
        log.info("reference normalisation not considered: %s", e)
    total = len(images)
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if on_batch:
            on_batch(done[0], total)

    sel, cands, _ = select_from_images(detector, images, labels, layers=layers, timesteps=timesteps, folds=folds,
                                       n_boot=n_boot, on_batch=progress, normalise=normalise)
    c = sel.chosen
    final = Detector(a, layer=c.layer, timestep=c.timestep, metric=c.metric, seed=detector.seed,
                     batch_size=detector.batch_size, prune=False, name=detector.name)
    record = {**sel.record(), "labels": source, "timesteps": [int(t) for t in timesteps], "metrics": list(SCORES),
              "layers": list(layers), "n_errored": len(ref_err) + len(mem_err)}
    cal = calibrate_paths(final, reference, fpr=fpr, memorized=memorized if positives is None else (),
                          output=output, force=True, model=model or detector.name, model_path=model_path, sigma=sigma,
                          on_batch=on_batch, num_workers=num_workers, selection=record, normalise=c.normalise)
    return cal, sel




__all__ = ["Candidate", "DEFAULT_TIMESTEPS", "Evidence", "FeatureScores", "MIN_MEMORIZED", "MIN_NOVEL", "Selection",
           "calibrate_selected", "candidate_layers", "capture_features", "check_counts", "choose", "needed_message",
           "nested_evaluation", "provenance", "rank_candidates", "read_images", "reference_statistics",
           "score_matrix", "select_configuration", "select_from_images", "training_duplicate_examples"]
