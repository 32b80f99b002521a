"""Guard a diffusers pipeline as it generates: score every image from the activations the pipeline computes anyway.

    import memdetect
    guarded = memdetect.guard(pipe, threshold=0.61)          # StableDiffusion-, DiT-, DDPM- or DDIMPipeline
    out = guarded(prompt="...", num_images_per_prompt=4)      # the pipeline's own call and output
    out.guard.scores["std"], out.guard.flagged                # one score and flag per image

What is read: the family's default layer (``Adapter.default_layer``) in the denoiser call whose timestep is the one
of the pipeline's schedule nearest ``step_t`` (t ~ 50 as the post-hoc scan), pooled and scored as ``Detector``
does (``capture.pool``, ``scores``). Which rows of that call carry the null condition is the adapter's knowledge
(``Adapter.guard_step``):

* an unconditional model (DDPM, DDIM): the call itself, every row;
* classifier-free guidance: the unconditional half of the batch (SD: the first, DiT: the second), no added pass;
* a conditional model without guidance, or SD with a negative prompt (whose half is not the empty prompt's): one
  extra denoiser forward with the null condition on the same x_t at that one step, stopped as soon as the layer has
  fired. ``GuardResult.extra_forward`` says so, with the reason.

The in-trajectory score is not the post-hoc score: the x_t is the sampler's own, not the final image noised with a
fresh draw. Its threshold is calibrated on its own (``memdetect calibrate --guard``, ``calibrate_guard``).

Hooks: a forward pre-hook on the denoiser reads each call's timestep and input, and at the guarded step a
``capture.Trace`` on the layer captures it; every hook is removed when the call returns or raises. diffusers'
``callback_on_step_end`` is not used: it runs after the scheduler step (it sees x_{t-1}, not the activations of
the forward at t), and the DiT, DDPM and DDIM pipelines do not offer it; the pipeline is not patched.

From a memdetect.toml (``guard(pipe, config="memdetect.toml")``, ``memdetect generate --guard --config``,
``guard_settings``): a ``[guard]`` table gives the guard's layer, step, metric, normalisation and threshold; a file
without one (``memdetect calibrate``, ``calibrate --select-layer``) gives its scan configuration (layer, timestep as
``step_t``, metric, reference normalisation with its ``[calibration.channels]``) and no threshold: a scan threshold
was chosen on final images noised with a fresh draw, not on the sampler's own x_t, so the guard's is calibrated
with those settings by ``memdetect calibrate --guard --config memdetect.toml`` (``calibrate_guard(base=...)``), which
keeps the scan configuration and adds the ``[guard]`` table: one file then drives scan, audit and the guard.

``on_memorized``: ``"flag"`` (return the flags), ``"regenerate"`` (generate the flagged images again with fresh,
recorded seeds, up to ``max_retries`` rounds, replacing them in the output; what is still flagged stays flagged) or
``"raise"`` (``MemorizedImageError``, carrying the result).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..core.capture import LayerSpec, Trace, pool
from ..settings import check_metric, check_seed, check_threshold, check_timestep
from ..errors import MemdetectError, UnsupportedModelError, UsageError
from ..models import ADAPTERS, Adapter, require
from ..models.capabilities import Guarding
from ..core.scores import channel_statistics, compute_all, standardise

ACTIONS = ("flag", "regenerate", "raise")


def generation_seed(seed: int, key: str, k: int = 0) -> int:
    """Seed of image ``k`` of call ``key`` in a run seeded ``seed`` (the same rule as ``bench.generate``, which sits
    above this module)."""
    import hashlib

    h = hashlib.blake2b(f"{int(seed)}:{key}:{int(k)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


class MemorizedImageError(MemdetectError):
    """``on_memorized="raise"``: the guard flagged an image. ``result`` holds the scores and flags."""

    def __init__(self, message: str, result: "GuardResult"):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Retry:
    """One round of ``regenerate``: which images were generated again, with which seeds, and their new scores."""

    attempt: int
    indices: list[int]
    seeds: list[int]
    scores: list[float]
    flagged: list[bool]


@dataclass
class GuardResult:
    """Per image of the (final) output: every metric's score (``scores[name]``, shape [N]) and ``flagged``
    (``scores[metric] >= threshold``; all False without a threshold). ``timestep``: the guarded step's timestep
    (nearest ``step_t`` in the pipeline's schedule). ``extra_forward``: whether one added null-condition forward was
    run (``note`` says why). ``retries``: what ``regenerate`` did; ``seconds``: the guard's own time (hooks, pooling,
    scoring and any extra forward; regenerated pipeline calls excluded)."""

    scores: dict[str, np.ndarray]
    metric: str
    threshold: float | None
    flagged: np.ndarray
    layer: str
    timestep: int
    step_t: int
    extra_forward: bool
    note: str
    retries: list[Retry] = field(default_factory=list)
    seconds: float = 0.0
    normalise: str = "none"  # "reference": scores of the pooled vector standardised with reference statistics

    def rows(self) -> list[dict]:
        """One dict per image: index, every score, flagged, and how many regenerations it took."""
        retried: dict[int, int] = {}
        for r in self.retries:
            for i in r.indices:
                retried[i] = r.attempt
        return [{"index": i, **{m: float(v[i]) for m, v in self.scores.items()}, "flagged": bool(self.flagged[i]),
                 "regenerated": retried.get(i, 0)} for i in range(len(self.flagged))]


@contextmanager
def _flags_kept(pipe):
    """Restore the train/eval mode of every submodule and ``requires_grad`` of every parameter of ``pipe``'s modules
    on exit: an adapter sets ``eval()`` and ``requires_grad_(False)`` on the networks it holds, which is right for a
    model memdetect loaded and wrong for the user's own pipeline (a guarded pipeline may be fine-tuned next)."""
    modules = [m for m in (getattr(pipe, "components", None) or {}).values() if isinstance(m, torch.nn.Module)]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode
        for param, flag in grads:
            param.requires_grad_(flag)


def adapter_for_pipeline(pipe) -> Adapter:
    """The adapter of the pipeline's family (by class name, ``Adapter.pipeline_classes``), over its modules; the
    modules' train/eval and requires_grad flags are left as the pipeline had them."""
    name = type(pipe).__name__
    for cls in ADAPTERS.values():
        if name in cls.pipeline_classes:
            with _flags_kept(pipe):
                return require(cls, Guarding, "memdetect.guard").from_pipeline(pipe)
    supported = sorted({c for cls in ADAPTERS.values() for c in cls.pipeline_classes if c.endswith("Pipeline")})
    raise UnsupportedModelError(f"memdetect.guard does not support a {name}; supported: {', '.join(supported)}")


class _Capture:
    """The hooks of one pipeline call: a pre-hook on the denoiser; at the guarded step, the pooled layer."""

    def __init__(self, guard: "Guard", call: dict):
        self.guard, self.call = guard, call
        self.target: int | None = None
        self.pooled: torch.Tensor | None = None
        self.extra = False
        self.captured_t: int | None = None
        self.seconds = 0.0
        self._trace: Trace | None = None
        self._rows: slice | None = None
        self._nested = False
        self._handles: list = []

    def __enter__(self) -> "_Capture":
        d = self.guard.adapter.denoiser
        self._handles.append(d.register_forward_pre_hook(self._before, with_kwargs=True))
        self._handles.append(d.register_forward_hook(self._after, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._trace is not None:  # the forward raised between the two hooks: remove the layer's hook too
            trace, self._trace = self._trace, None
            trace.__exit__(*exc) if exc[0] is not None else trace.__exit__(RuntimeError, RuntimeError(), None)
        return False

    def _target(self) -> int:
        steps = getattr(self.guard.pipe.scheduler, "timesteps", None)
        if steps is None or len(steps) == 0:
            raise UnsupportedModelError("the pipeline's scheduler has no timesteps set")
        ts = np.asarray([float(t) for t in steps])
        target = int(round(ts[int(np.argmin(np.abs(ts - self.guard.step_t)))]))
        if abs(target - self.guard.step_t) > max(self.guard.step_t / 2, 10):
            warnings.warn(f"memdetect.guard: the pipeline's schedule has no step near t={self.guard.step_t}; the "
                          f"guard reads t={target} (a threshold calibrated at another step does not apply: calibrate "
                          f"the guard with these sampler settings)", UserWarning, stacklevel=2)
        return target

    def _before(self, module, args, kwargs):
        if self._nested or self.pooled is not None:
            return None
        start = time.perf_counter()
        g = self.guard
        if self.target is None:
            self.target = self._target()
        step = g.adapter.guard_step(g.pipe, self.call, args, kwargs)
        if step.t != self.target:
            self.seconds += time.perf_counter() - start
            return None
        self.captured_t = step.t
        if step.unconditional:  # the pipeline's own forward carries the null condition: read it
            self._rows = step.rows
            self._trace = Trace(g.adapter.denoiser, [g.layer], stop=False, transform=self._pool_rows).__enter__()
        else:  # no unconditional row: one extra forward with the null condition on the same x_t
            self.extra = True
            self._nested = True
            try:
                with torch.no_grad(), Trace(g.adapter.denoiser, [g.layer], stop=True,
                                            transform=lambda a: pool(a, g.adapter.pooling)) as tr:
                    g.adapter.forward(step.x[step.rows], step.t)
                self.pooled = tr[g.layer].float().cpu()
            finally:
                self._nested = False
        self.seconds += time.perf_counter() - start
        return None

    def _pool_rows(self, a: torch.Tensor) -> torch.Tensor:
        return pool(a[self._rows], self.guard.adapter.pooling)

    def _after(self, module, args, kwargs, output):
        if self._trace is not None and not self._nested:
            start = time.perf_counter()
            tr, self._trace = self._trace, None
            tr.__exit__(None, None, None)
            self.pooled = tr[self.guard.layer].float().cpu()
            self.seconds += time.perf_counter() - start
        return None


class Guard:
    """A pipeline with a memorization guard; call it as the pipeline (keywords only). See the module docstring."""

    def __init__(self, pipe, *, threshold: float | None, layer: str | None = None, step_t: int = 50,
                 metric: str = "std", on_memorized: str = "flag", max_retries: int = 2, seed: int = 0,
                 normalise: Mapping[str, Sequence[float]] | None = None):
        if on_memorized not in ACTIONS:
            raise UsageError(f"on_memorized must be one of {', '.join(ACTIONS)}, got {on_memorized!r}")
        check_metric(metric)
        check_threshold(threshold)
        check_seed(seed)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise UsageError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        check_timestep(step_t, "step_t")
        if threshold is None and on_memorized != "flag":
            raise UsageError(f"on_memorized={on_memorized!r} needs a threshold")
        self.pipe = pipe
        self.adapter = adapter_for_pipeline(pipe)
        self.layer = LayerSpec.parse(layer or self.adapter.default_layer())
        Trace(self.adapter.denoiser, [self.layer])  # resolve now: a typo fails before generating
        self.threshold = threshold
        self.step_t = step_t
        self.metric = metric
        self.on_memorized = on_memorized
        self.max_retries = max_retries
        self.seed = int(seed)
        self.normalise = channel_statistics(normalise)
        self.calls = 0  # pipeline calls made (regenerations included), to number fresh seeds

    def _run(self, call: dict):
        if call.get("return_dict") is False:
            raise UsageError("memdetect.guard needs return_dict=True (the default): the result is attached to it")
        with _Capture(self, call) as cap:
            out = self.pipe(**call)
        self.calls += 1
        if cap.pooled is None:
            raise UsageError(f"the guarded step (timestep {cap.target}) never ran; the pipeline's denoiser was not "
                             f"called with it")
        start = time.perf_counter()
        pooled = cap.pooled
        if self.normalise is not None:  # as ``Detector.scores_of`` with ``normalise``: per channel, then the score
            mean, scale = self.normalise
            if pooled.shape[1] != len(mean):
                raise UsageError(f"the reference channel statistics hold {len(mean)} channels, but {self.layer} gives "
                                 f"{pooled.shape[1]}: they were made for another model or layer; recalibrate")
            pooled = standardise(pooled.double(), mean, scale)
        # float64, as report rows hold them: a threshold just above a float32 score must not round down onto it
        scores = {k: v.double().numpy() for k, v in compute_all(pooled).items()}
        cap.seconds += time.perf_counter() - start
        return out, scores, cap

    def _flags(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        s = scores[self.metric]
        return s >= self.threshold if self.threshold is not None else np.zeros(len(s), dtype=bool)

    def __call__(self, *args, **call) -> Any:
        if args:
            raise UsageError("call a guarded pipeline with keyword arguments only (prompt=..., class_labels=...)")
        out, scores, cap = self._run(call)
        n = len(scores[self.metric])
        images = out.images
        if len(images) != n:
            raise UnsupportedModelError(f"the pipeline returned {len(images)} images for {n} guarded rows")
        flagged = self._flags(scores)
        note = ""
        if cap.extra:
            note = ("no unconditional rows in the pipeline's batch (a conditional model without classifier-free "
                    "guidance, or a negative prompt): one extra null-condition forward at the guarded step")
        result = GuardResult(scores=scores, metric=self.metric, threshold=self.threshold, flagged=flagged,
                             layer=str(self.layer), timestep=int(cap.captured_t), step_t=self.step_t,
                             extra_forward=cap.extra, note=note, seconds=cap.seconds,
                             normalise="none" if self.normalise is None else "reference")
        if self.on_memorized == "regenerate":
            self._regenerate(out, call, result, n)
        object.__setattr__(out, "guard", result)
        if self.on_memorized == "raise" and result.flagged.any():
            idx = np.flatnonzero(result.flagged).tolist()
            raise MemorizedImageError(f"memdetect.guard flagged {len(idx)} of {n} images as memorized (indices "
                                      f"{idx[:10]}{' ...' if len(idx) > 10 else ''}; {self.metric} >= "
                                      f"{self.threshold:g})", result)
        return out

    def _regenerate(self, out, call: dict, result: GuardResult, n: int) -> None:
        for attempt in range(1, self.max_retries + 1):
            idx = np.flatnonzero(result.flagged).tolist()
            if not idx:
                return
            sub = self.adapter.guard_subset(call, idx, n)
            seeds = [generation_seed(self.seed, f"guard-{self.calls}", k) for k in range(len(idx))]
            sub["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
            new, scores, cap = self._run(sub)
            _replace(out, new, idx)
            for m in result.scores:
                result.scores[m][idx] = scores[m]
            flags = self._flags(scores)
            result.flagged[idx] = flags
            result.extra_forward = result.extra_forward or cap.extra
            result.seconds += cap.seconds
            result.retries.append(Retry(attempt, idx, seeds, [float(v) for v in scores[self.metric]],
                                        [bool(f) for f in flags]))


def _replace(out, new, indices: Sequence[int]) -> None:
    """Put ``new``'s images (and the other per-image fields, such as SD's NSFW flags) at ``indices`` of ``out``."""
    n = len(out.images)
    for key in list(out.keys()):
        old, fresh = out[key], new.get(key)
        if fresh is None or old is None or len(old) != n:
            continue
        if isinstance(old, list):
            for j, i in enumerate(indices):
                old[i] = fresh[j]
        else:  # numpy array or tensor
            old[list(indices)] = fresh


def guard_settings(cfg) -> dict[str, Any]:
    """The guard's settings from a loaded memdetect.toml (``memdetect.config.Config``): its ``[guard]`` table where it
    has one (``memdetect calibrate --guard``), else the scan configuration the file holds (``calibrate``,
    ``calibrate --select-layer``): its layer, its timestep as ``step_t``, its metric and its normalisation, with
    ``threshold`` None (a scan threshold does not apply to the sampler's own x_t; see the module docstring).

    Keys: ``layer`` (None: the family's), ``step_t``, ``metric``, ``threshold``, ``steps``, ``guidance``,
    ``normalise`` (the ``[calibration.channels]`` statistics, or None) and ``source`` (``"guard"`` or ``"scan"``)."""
    g = cfg.guard
    if g is not None:
        norm = g.get("normalise", "none") == "reference"
        return {"layer": g.get("layer"), "step_t": g.get("step_t", 50), "metric": g.get("metric", "std"),
                "threshold": g["threshold"], "steps": g.get("steps"), "guidance": g.get("guidance"),
                "normalise": dict(cfg.channels) if norm else None, "source": "guard"}
    return {"layer": cfg.layer, "step_t": 50 if cfg.timestep is None else int(cfg.timestep), "metric": cfg.metric,
            "threshold": None, "steps": None, "guidance": None,
            "normalise": dict(cfg.channels) if cfg.normalise == "reference" else None, "source": "scan"}


_GIVEN_NOTHING: Any = object()


def guard(pipe, *, threshold: float | None = _GIVEN_NOTHING, layer: str | None = None, step_t: int | None = None,
          metric: str | None = None, on_memorized: str = "flag", max_retries: int = 2, seed: int = 0,
          config=None) -> Guard:
    """Wrap a diffusers pipeline (StableDiffusionPipeline, DiTPipeline, DDPMPipeline, DDIMPipeline) so that each call
    scores every image in-generation and returns the pipeline's output with ``.guard`` (a ``GuardResult``).

    ``threshold``: flag when ``scores[metric] >= threshold`` (a guard threshold: ``memdetect calibrate --guard``);
    None scores without flagging. ``layer``: default the family's; ``step_t``: the timestep to read (default 50), the
    nearest in the pipeline's schedule is used; ``metric``: default ``std``. ``seed``: numbers the fresh seeds of
    ``regenerate``. ``config``: a memdetect.toml (path) whose settings the guard uses (``guard_settings``: the
    ``[guard]`` table with its threshold, or the file's scan configuration, e.g. from ``calibrate --select-layer``,
    without one); a ``layer``, ``step_t`` or ``metric`` given here that differs from the file's is refused unless
    ``threshold`` is given too. Without ``config``, ``threshold`` must be given (None: score only)."""
    if config is None:
        if threshold is _GIVEN_NOTHING:
            raise UsageError("memdetect.guard needs threshold= (None: score without flagging) or config=")
        return Guard(pipe, threshold=threshold, layer=layer, step_t=50 if step_t is None else step_t,
                     metric=metric or "std", on_memorized=on_memorized, max_retries=max_retries, seed=seed)
    from ..config import load_config

    s = guard_settings(load_config(config))
    own = threshold is not _GIVEN_NOTHING
    for key, value in (("layer", layer), ("step_t", step_t), ("metric", metric)):
        if value is None:
            continue
        same = str(LayerSpec.parse(value)) == str(LayerSpec.parse(s[key])) if key == "layer" and s[key] else \
            value == s[key]
        if not same and not own:
            raise UsageError(f"{key}={value!r} differs from {key} = {s[key]!r} in {config}, which its settings were "
                             f"calibrated for; drop it, give threshold= too, or recalibrate")
        s[key] = value
    if own:
        s["threshold"] = threshold
    elif s["threshold"] is None and on_memorized != "flag":
        raise UsageError(f"{config} holds no in-generation threshold ([guard]); on_memorized={on_memorized!r} needs "
                         f"one: `memdetect calibrate --guard --config {config}` writes it, or give threshold=")
    return Guard(pipe, threshold=s["threshold"], layer=s["layer"], step_t=s["step_t"], metric=s["metric"],
                 on_memorized=on_memorized, max_retries=max_retries, seed=seed, normalise=s["normalise"])


# -- generate, and calibrate the guard's threshold (``memdetect generate``, ``memdetect calibrate --guard``) ------

def load_guardable(model: str, model_path: str | None = None, *, device: str = "auto", dtype: str = "auto"):
    """A preset, family (+ folder), hub id or folder -> (its diffusers pipeline, the preset's layer or None)."""
    from ..detector import resolve_device, resolve_dtype
    from ..models import adapter_class, resolve_model

    spec = resolve_model(model, model_path)
    dev = resolve_device(device)
    family = require(adapter_class(spec.family), Guarding, "memdetect generate")
    pipe = family.load_pipeline(spec.source, device=dev, dtype=resolve_dtype(dtype, dev))
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec


def _images_uint8(images) -> np.ndarray:
    """A pipeline's images (PIL list, [N, H, W, 3] floats in [0, 1], or a tensor) -> uint8 [N, H, W, 3]."""
    if isinstance(images, list):
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return np.round(arr * 255.0).clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Generated:
    """What ``generate`` made: uint8 images [N, H, W, 3], their report rows (one per image) and the guard's
    result (None unguarded), with the seconds the pipeline calls took."""

    images: np.ndarray
    rows: list[dict]
    result: GuardResult | None
    seconds: float


def generate(guard_or_pipe, conditions: Sequence | None, n: int, *, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, eta: float | None = None) -> Generated:
    """``n`` images per condition (prompt, class; None: unconditional) from a ``Guard`` or a bare pipeline, with
    one seed per image (``generation_seed(seed, "generate", k)``, recorded in the rows). ``eta``: the DDIM eta of
    pipelines that take one (default: the family's)."""
    g = guard_or_pipe if isinstance(guard_or_pipe, Guard) else None
    pipe = g.pipe if g else guard_or_pipe
    adapter = g.adapter if g else adapter_for_pipeline(pipe)
    call = adapter.pipeline_call(list(conditions) if conditions else None, n, steps=steps, guidance=guidance)
    if eta is not None and "eta" in call:
        call["eta"] = float(eta)
    total = n * (len(conditions) if conditions else 1)
    seeds = [generation_seed(seed, "generate", k) for k in range(total)]
    call["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
    call["output_type"] = "np"
    start = time.perf_counter()
    out = (g or pipe)(**call)
    seconds = time.perf_counter() - start
    result = getattr(out, "guard", None)
    per = [c for c in (conditions or [None]) for _ in range(n)]
    rows = []
    for i in range(total):
        row = {"index": i, "condition": per[i], "seed": seeds[i]}
        if result is not None:
            row.update({k: v for k, v in result.rows()[i].items() if k != "index"})
            retry = [r for r in result.retries if i in r.indices]
            if retry:
                row["seed"] = retry[-1].seeds[retry[-1].indices.index(i)]
        rows.append(row)
    return Generated(_images_uint8(out.images), rows, result, seconds)


def write_generated(gen: Generated, output) -> Path:
    """Images as ``DIR/00000.png`` ... and ``DIR/report.csv`` (one row per image: file, condition, seed, the guard's
    scores and flags). Returns the report's path."""
    import pandas as pd

    from PIL import Image

    from ..store.io import atomic_write

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{i:05d}.png" for i in range(len(gen.images))]
    for img, name in zip(gen.images, names):  # lossless: scanning the files later reads the same pixels
        atomic_write(out / name, lambda tmp, img=img: Image.fromarray(np.ascontiguousarray(img)).save(tmp,
                                                                                                     format="PNG"))
    frame = pd.DataFrame([{"file": n, **r} for n, r in zip(names, gen.rows)])
    report = out / "report.csv"
    atomic_write(report, lambda tmp: frame.to_csv(tmp, index=False))
    return report


@dataclass(frozen=True)
class GuardCalibration:
    """``calibrate_guard``'s choice: per metric the threshold and the reference FPR it gives, and the document
    written to ``path``."""

    table: "Any"
    document: dict
    path: "Any"
    n_reference: int


def calibrate_guard(g: Guard, conditions: Sequence | None, n: int, *, fpr: float = 0.01, steps: int | None = None,
                    guidance: float | None = None, seed: int = 0, output="memdetect.toml", force: bool = False,
                    model: str = "", model_path: str | None = None, eta: float | None = None,
                    base=None) -> GuardCalibration:
    """Generate ``n`` reference images per condition (normal prompts or classes; an unconditional model: ``n``
    generations, which include any memorized ones it makes) under ``g`` and choose each metric's guard threshold at
    ``fpr`` with ``calibrate.fpr_threshold``; write them to ``output`` as a ``[guard]`` table keyed by the settings
    that produced the scores (model, layer, step_t and the guarded timestep, sampler steps, guidance, normalisation).

    ``base``: the memdetect.toml ``g`` was built from (``guard(pipe, config=base)``): the written file keeps every
    key and table of it (the scan configuration, its ``[calibration]`` and ``[selection]``) and adds or replaces the
    ``[guard]`` table, so one file drives ``scan``, ``audit`` and ``generate --guard``. A guard that normalises
    (``normalise=``) records ``normalise = "reference"`` and, without ``base``, its statistics in
    ``[calibration.channels]``."""
    import platform
    from datetime import datetime, timezone
    from pathlib import Path

    import diffusers
    import pandas as pd

    from .._version import __version__
    from .calibrate import RULE, check_fpr, check_output, fpr_threshold
    from ..config import CONFIG_VERSION, to_toml
    from ..store.io import atomic_write

    check_fpr(fpr)
    check_output(output, force)
    from ..config import load_config, tomllib

    base_cfg = load_config(base) if base is not None else None
    norm = None if g.normalise is None else {"mean": g.normalise[0].tolist(), "std": g.normalise[1].tolist()}
    if base_cfg is not None and norm is not None and (
            base_cfg.channels is None or not np.allclose(base_cfg.channels["mean"], norm["mean"])
            or not np.allclose(base_cfg.channels["std"], norm["std"])):
        raise UsageError(f"the guard's channel statistics are not those of {base}'s [calibration.channels]")
    if g.on_memorized != "flag" or g.threshold is not None:
        g = Guard(g.pipe, threshold=None, layer=str(g.layer), step_t=g.step_t, metric=g.metric, seed=g.seed,
                  normalise=norm)
    gen = generate(g, conditions, n, steps=steps, guidance=guidance, seed=seed, eta=eta)
    scores = gen.result.scores
    rows = []
    for m, v in scores.items():
        t = fpr_threshold(v, fpr)
        rows.append({"metric": m, "threshold": t, "fpr_reference": float((v >= t).mean()),
                     "flagged_reference": int((v >= t).sum()), "n_reference": int(v.size)})
    table = pd.DataFrame(rows).set_index("metric")
    call = g.adapter.pipeline_call(list(conditions) if conditions else None, n, steps=steps, guidance=guidance)
    if eta is not None and "eta" in call:
        call["eta"] = float(eta)
    doc = {"version": CONFIG_VERSION, "model": model or g.adapter.source, "model_path": model_path,
           "guard": {"threshold": float(table.loc[g.metric, "threshold"]), "metric": g.metric, "layer": str(g.layer),
                     "step_t": g.step_t, "timestep": gen.result.timestep,
                     "steps": int(call.get("num_inference_steps", 0)),
                     "eta": float(call["eta"]) if "eta" in call else None,
                     "guidance": float(call["guidance_scale"]) if "guidance_scale" in call else None,
                     "extra_forward": gen.result.extra_forward, "fpr": fpr, "rule": RULE,
                     "n_reference": int(gen.images.shape[0]), "seed": seed,
                     "reference": [str(c) for c in conditions][:10] if conditions else ["unconditional generations"],
                     "family": g.adapter.family, "device": str(g.adapter.device),
                     "dtype": str(g.adapter.dtype).replace("torch.", ""),
                     "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "thresholds": {m: float(table.loc[m, "threshold"]) for m in scores},
                     "fpr_reference": {m: float(table.loc[m, "fpr_reference"]) for m in scores}},
           "versions": {"memdetect": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                        "python": platform.python_version()}}
    if norm is not None:
        doc["guard"]["normalise"] = "reference"
    out = Path(output)
    from ..config import portable_model

    if base_cfg is not None:  # the scan configuration stays; the [guard] table is added (or replaced)
        kept = tomllib.loads(Path(base).read_text(encoding="utf-8"))
        kept["guard"] = {**doc["guard"], "base": Path(base).name}
        doc = kept
        model_path = model_path or base_cfg.model_path
    elif norm is not None:
        doc["calibration"] = {"channels": norm}
    # committed beside the code: a preset by name, a local model folder relative to this file
    doc["model"], doc["model_path"], _ = portable_model(doc["model"] if base_cfg is None else base_cfg.model,
                                                        model_path, None, g.adapter.family, out)
    header = (f"memdetect guard calibration ({gen.images.shape[0]} reference generations, target FPR {fpr:g}).\n"
              f"Use: memdetect generate --guard --config {out.name} ...")
    atomic_write(out, lambda tmp: Path(tmp).write_text(to_toml(doc, header), encoding="utf-8"))
    return GuardCalibration(table.reset_index(), doc, out, int(gen.images.shape[0]))


__all__ = ["ACTIONS", "Generated", "Guard", "GuardCalibration", "GuardResult", "MemorizedImageError", "Retry",
           "adapter_for_pipeline", "calibrate_guard", "generate", "guard", "load_guardable", "write_generated"]
