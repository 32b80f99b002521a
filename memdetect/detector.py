"""The library API: ``Detector`` turns images into score rows.

    from memdetect import Detector
    det = Detector.from_pretrained("demo")             # or "sd14", "dit", a hub id, a local folder
    df = det.scan(["generated/"])                      # pandas DataFrame, one row per file
    feats = det.features(uint8_images, seeds)          # pooled [B, C] activations

``memdetect.workflows.scan.scan(det, paths, output=...)`` adds the resumable journal, the written report and the HTML page.

Data flows one way: pixels -> ``adapter.encode`` -> ``adapter.noise`` (per-image seed) -> ``Trace`` around
``adapter.forward`` (stops once the layer fired) -> ``pool`` -> ``scores`` -> rows.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import operator
import os
import signal
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .core import capture
from .speed import runtime
from .speed import winograd
from ._version import __version__
from .core.capture import LayerInfo, LayerSpec, Trace, pool, probe_layers
from .errors import LayerError, UsageError
from .store.io import PREPROCESS, ImageError, content_digest, decode_frames, discover, draw_seed, image_seed, read_file
from .store.journal import FRAMES_FIELD, fingerprint, row_key
from .models import ADAPTERS, ModelSpec, ScanAdapter, adapter_class, load_adapter, require, resolve_model
from .models.capabilities import Scanning
from .store.report import make_row, rows_to_frame
from .core.scores import SCORES, compute_all, standardise
from .store.sources import Source, item_name, read_item
from .store.state import StateDir
from .text import printable

log = logging.getLogger(__name__)

#: live tensors of a batch at its widest point, in units of the largest activation (a ResNet block holds its input,
#: a normalised copy and a convolution's output; attention and the allocator's slack take the rest)
WORKING_SET_FACTOR = 4
#: on a CPU, what encoding may hold at once (``Detector.encode_batch``)
ENCODE_BYTES = 512 * 2**20

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "meta":  # shapes only, no weights read (``memdetect layers --device meta``; sdxl/sd3/flux/pixart)
        return torch.device("meta")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N or meta")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}") from None


def batch_for_memory(free_bytes: int, per_image_bytes: int, *, fraction: float = 0.8, cap: int = 1024) -> int:
    """How many images fit in ``fraction`` of ``free_bytes`` at ``per_image_bytes`` each: at least 1, at most
    ``cap``."""
    if per_image_bytes <= 0:
        return cap
    return int(max(1, min(cap, (free_bytes * fraction) // per_image_bytes)))


#: Seeds are unsigned 64-bit integers (``io.image_seed`` hashes 8 bytes of it).
MAX_SEED = 2**64 - 1
#: ``--draws``: at most this many noise draws per image (each is one more denoiser pass per image)
MAX_DRAWS = 64


def check_threshold(threshold: float | None) -> None:
    """A threshold must be a finite number (NaN would flag nothing, -inf everything)."""
    if threshold is None:
        return
    try:
        finite = not isinstance(threshold, bool) and math.isfinite(threshold)
    except TypeError:
        finite = False
    if not finite:
        raise UsageError(f"the threshold must be a finite number, got {printable(threshold, 40)}")


def _integer(value) -> int | None:
    """``value`` as an int when it is an integer (Python or NumPy, not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_seed(seed: int) -> None:
    s = _integer(seed)
    if s is None or not 0 <= s <= MAX_SEED:
        shown = f"a {s.bit_length()}-bit integer" if s is not None and s.bit_length() > 128 else printable(seed, 40)
        raise UsageError(f"the seed must be an integer in [0, 2**64), got {shown}")


def check_draws(draws: int) -> None:
    """``draws`` (noise draws averaged per image) must be an integer in [1, ``MAX_DRAWS``]."""
    k = _integer(draws)
    if k is None or not 1 <= k <= MAX_DRAWS:
        shown = f"a {k.bit_length()}-bit integer" if k is not None and k.bit_length() > 64 else printable(draws, 40)
        raise UsageError(f"--draws must be an integer from 1 to {MAX_DRAWS} (noise draws averaged per image; each "
                         f"costs one more denoiser pass), got {shown}")


def check_options(*, metric: str = "std", batch_size: int | None = None, threshold: float | None = None,
                  seed: int = 0, timestep: int | None = None, sigma: float | None = None,
                  num_workers: int | None = None, draws: int = 1) -> None:
    """The checks that need no model: a typo in an option fails before the (slow) model load. Numbers must be
    finite and in range (the timestep's upper bound is the model's, checked when it is loaded)."""
    if metric not in SCORES:
        raise UsageError(f"unknown metric {printable(metric, 60)!r}; choose one of {', '.join(SCORES)}")
    if batch_size is not None and batch_size < 1:
        raise UsageError("batch size must be at least 1")
    check_threshold(threshold)
    check_seed(seed)
    if timestep is not None and (_integer(timestep) is None or timestep < 0):
        raise UsageError(f"the timestep must be a non-negative integer, got {printable(timestep, 40)}")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                              or not 0 < float(sigma) < float("inf")):
        raise UsageError(f"--sigma must be a positive finite number, got {printable(sigma, 40)}")
    if num_workers is not None and num_workers < 0:
        raise UsageError("the number of workers must be 0 or more")
    check_draws(draws)


@dataclass(frozen=True)
class Settings:
    """Everything that determines a score (written into reports, journals' keys and calibration files).

    ``winograd``: whether the wide 3x3 convolutions ran with Winograd's algorithm (CPU float32; scores differ by
    float rounding, ~1e-5 relative); ``allocator``: the process's allocator setting (``memdetect.speed.runtime``);
    ``draws``: noise draws per image whose scores are averaged (``Detector``; in the journal key when not 1);
    ``normalise``: ``"none"``, or ``"reference:<digest>"`` when the pooled vector is standardised per channel with a
    reference set's statistics before every score (the digest hashes them; in the journal key when not none).
    """

    model: str
    family: str
    source: str
    layer: str
    timestep: int
    sigma: float
    pooling: str
    metric: str
    threshold: float | None
    seed: int
    preprocess: str
    resolution: int
    dtype: str
    device: str
    winograd: bool
    allocator: str
    memdetect: str = __version__
    draws: int = 1
    normalise: str = "none"


class Detector:
    """Score images for memorization with one partial forward pass of a diffusion model.

    ``winograd``: Winograd's algorithm for the wide 3x3 convolutions of a CPU float32 scan (None: on unless
    ``MEMDETECT_WINOGRAD=0``), for the layers that run where it pays (``memdetect.speed.winograd``). It configures the
    adapter's modules in place (a detector owns its adapter: two detectors sharing one adapter share the last one's
    setting) and is recorded in ``settings``. The process-wide allocator setting is not the detector's to make: see
    ``memdetect.retain_freed_memory``.

    ``prune``: drop the weights the scan never runs (None: when ``early_exit``). A probe forward on fake tensors
    (``capture.trace_usage``: shapes only, no arithmetic) records which parameters and buffers the scan path reads
    before its early exit; the others (SD: the VAE decoder and the UNet after the hooked layer) are replaced by
    empty ``meta`` tensors, in place, before the weights are placed (``Adapter.place``), so their memory is freed
    or, when loaded from safetensors, never read. Scores are bit-identical to the full model's: nothing that runs
    changes. The adapter is then only good for this layer's scan: a full forward, ``layers()``, generation or
    decoding need ``prune=False`` (``memdetect layers`` and the benchmarks load that way), and calling a dropped
    module raises ``PrunedModuleError``.

    ``batch_size``: None picks the adapter's CPU default, or on a GPU as many images as fit in the free device
    memory (``batch_for_memory``). On an out-of-memory error the batch is halved and retried (logged once).

    ``draws``: K noise draws per image (``--draws``): every score is the mean of the K draws' scores. Draw 0 uses
    the image's own seed, so K = 1 is the one-draw score; draw k's seed is ``io.draw_seed(image seed, k)``. The K
    noised copies go through the denoiser together, at most ``batch_size`` inputs per forward pass (the images of a
    batch are split so that images x K stays within it): memory stays that of ``batch_size``, time grows K-fold.

    ``normalise``: per-channel ``mean`` and ``std`` of known-novel reference images' pooled activations (what
    ``memdetect calibrate --normalise reference`` writes to ``[calibration.channels]``): every score is then taken
    of (v - mean) / std (``scores.standardise``) instead of v. ``features`` stay the raw pooled activations.
    """

    def __init__(self, adapter: ScanAdapter, *, layer: str | None = None, timestep: int = 50, metric: str = "std",
                 threshold: float | None = None, seed: int = 0, batch_size: int | None = None,
                 early_exit: bool = True, name: str = "", winograd: bool | None = None, prune: bool | None = None,
                 draws: int = 1, normalise: Mapping[str, Sequence[float]] | None = None):
        check_options(metric=metric, batch_size=batch_size, threshold=threshold, seed=seed, timestep=timestep,
                      draws=draws)
        require(adapter, Scanning, "the Detector")
        if not 0 <= int(timestep) < adapter.num_train_timesteps:
            raise UsageError(f"timestep {timestep} is outside the model's schedule [0, {adapter.num_train_timesteps})")
        self.adapter = adapter
        self.layer = LayerSpec.parse(layer or adapter.default_layer())
        self.timestep = int(timestep)
        self.metric = metric
        self.threshold = threshold
        self.seed = int(seed)
        self.draws = int(draws)
        self.normalise = normalise
        self.name = name or adapter.source
        #: where the layer, timestep and metric came from (a config's ``[selection]``, ``memdetect.workflows.select``): shown in
        #: reports, not part of ``settings`` (it changes no score)
        self.configuration: str | None = None
        self._weights: str | None = None
        Trace(adapter.denoiser, [self.layer])  # resolve the layer now: a typo fails before any image is read
        prune = early_exit if prune is None else bool(prune)
        if prune and not early_exit:
            raise UsageError("prune=True needs early_exit=True: a full forward runs every module")
        if adapter.pruned_for is not None and (not prune or adapter.pruned_for != str(self.layer)):
            raise UsageError(f"this model was pruned for a scan of {adapter.pruned_for} (a detector with prune=True "
                             f"dropped every module after it); load it again for another layer or a full forward")
        self._early_exit = early_exit
        self.encode_usage: capture.Usage | None = None
        self._forward_largest = 0
        self.usage = self._probe()
        if prune and self.usage is not None and adapter.pruned_for is None:
            if not adapter.weight_files():  # the resume key hashes the loaded tensors: all of them, before dropping
                self._weights = "tensors:" + tensors_digest(adapter.networks())
            freed = capture.prune(adapter.networks(), self.usage,
                                  f"the detector keeps only what its scan of {self.layer} runs (prune=True); load "
                                  f"the model with prune=False for a full forward, other layers or generation")
            adapter.pruned_for = str(self.layer)
            log.debug("pruned %.0f MB of weights the scan of %s never reads", freed / 1e6, self.layer)
        adapter.place()
        self.batch_size = batch_size or self._default_batch_size()
        self.encode_batch = self._encode_batch()
        self.winograd = self._configure_winograd(winograd)
        self._oom_limit: int | None = None
        self._working_set = self._estimate_working_set()
        runtime.release_free_memory()  # what loading and pruning freed goes back now
        runtime.set_working_set(self._working_set)  # what a scan may keep free beyond what it holds now

    @property
    def early_exit(self) -> bool:
        """Whether the forward pass stops once the layer fired (False: the full forward, for checking)."""
        return self._early_exit

    @early_exit.setter
    def early_exit(self, value: bool) -> None:
        if not value and self.adapter.pruned_for is not None:
            raise UsageError("this detector dropped the modules after its layer (prune=True), so it cannot run a "
                             "full forward; create it with prune=False")
        self._early_exit = bool(value)

    @property
    def pruned(self) -> bool:
        """Whether the adapter's networks hold only what this detector's scan runs (``prune``)."""
        return self.adapter.pruned_for is not None

    def _probe(self) -> capture.Usage | None:
        """What the scan path reads and runs for one blank image, up to the early exit, on fake tensors
        (``capture.trace_usage``), in two parts: encoding (``self.encode_usage``), then noising and the denoiser.
        None when the model cannot be probed so: then nothing is pruned and Winograd's plan falls back to the
        channel rule."""
        a, x0 = self.adapter, {}

        def encode():
            out = a.encode(torch.zeros(1, 3, a.resolution, a.resolution, dtype=torch.uint8))
            x0["shape"], x0["dtype"] = tuple(out.shape), out.dtype

        def forward():
            with Trace(a.denoiser, [self.layer], stop=True):
                a.forward(x0["x_t"], self.timestep)

        try:
            with winograd.disabled():
                self.encode_usage = capture.trace_usage(a.networks(), encode)
                # noising one image for real is cheap, and keeps the schedule's arithmetic out of the probe
                x0["x_t"] = a.noise(torch.zeros(x0["shape"], dtype=x0["dtype"], device=a.device), self.timestep, [0])
                fwd = capture.trace_usage(a.networks(), forward)
            self._forward_largest = fwd.largest_bytes
            return self.encode_usage | fwd
        except LayerError:
            raise
        except Exception as e:  # a forward that needs real values: keep the whole model
            log.info("could not probe %s on fake tensors (%s: %s); keeping every module", self.name,
                     type(e).__name__, e)
            return None

    def _configure_winograd(self, on: bool | None) -> bool:
        a = self.adapter
        on = winograd.default() if on is None else bool(on)
        applies = on and a.device.type == "cpu" and a.dtype == torch.float32
        tiles = None
        if self.usage is not None:  # the convolutions that run, with their tiles per call at the default batch
            n = a.default_batch_size()
            tiles = {m: n * -(-shape[-2] // 4) * -(-shape[-1] // 4) for m, shape in self.usage.fired.items()
                     if isinstance(m, torch.nn.Conv2d) and len(shape) == 4}
        return winograd.configure(a.networks(), applies, tiles=tiles) > 0

    def _encode_batch(self) -> int | None:
        """How many images ``adapter.encode`` takes at once on a CPU (None: the whole batch): as many as keep its
        working set within ``ENCODE_BYTES`` (SD1.4's VAE at 512 px: one; its activations are 134 MB per image, and
        a batch of 4 measured +2.8 GB while encoding; one image fills 2 cores as well as four)."""
        if self.adapter.device.type != "cpu" or self.usage is None:
            return None
        per_image = WORKING_SET_FACTOR * self.encode_usage.largest_bytes
        return max(1, ENCODE_BYTES // per_image) if per_image else None

    def _estimate_working_set(self) -> int:
        """Bytes one batch allocates and frees: ``WORKING_SET_FACTOR`` x the largest activation per image (from the
        probe) x the images in flight, plus Winograd's chunked transforms."""
        if self.usage is None:
            return 0
        enc = self.encode_usage.largest_bytes * min(self.batch_size, self.encode_batch or self.batch_size)
        fwd = self._forward_largest * self.batch_size
        extra = 5 * winograd.CHUNK_BYTES if self.winograd else 0
        return WORKING_SET_FACTOR * max(enc, fwd) + extra

    def _default_batch_size(self) -> int:
        a = self.adapter
        if a.device.type == "cuda" and self.usage is not None:
            free, _ = torch.cuda.mem_get_info(a.device)
            n = batch_for_memory(free, WORKING_SET_FACTOR * self.usage.largest_bytes)
            log.info("batch size %d from %.1f GB of free GPU memory", n, free / 1e9)
            return n
        return a.default_batch_size()

    @classmethod
    def from_pretrained(cls, model: str = "demo", model_path: str | None = None, *, layer: str | None = None,
                        timestep: int | None = None, device: str = "auto", dtype: str = "auto",
                        sigma: float | None = None, **kwargs) -> "Detector":
        """Load a preset, family + folder, hub id or local folder (see ``memdetect models``).

        ``sigma``: noise level used instead of the timestep's, for families that take one (EDM). Other keyword
        arguments go to ``Detector`` (``prune=False`` keeps the whole model).
        """
        spec: ModelSpec = resolve_model(model, model_path)
        if sigma is not None:
            if not adapter_class(spec.family).accepts_sigma:
                takes = sorted(f for f, c in ADAPTERS.items() if c.accepts_sigma)
                raise UsageError(f"--sigma applies to {', '.join(takes)} models only; {spec.family} models take "
                                 f"--timestep")
            if not 0 < float(sigma) < float("inf"):
                raise UsageError(f"--sigma must be a positive number, got {sigma}")
            spec = replace(spec, options={**spec.options, "sigma": float(sigma)})
        dev = resolve_device(device)
        adapter = load_adapter(spec, dev, resolve_dtype(dtype, dev), place=False)  # the detector prunes, then places
        return cls(adapter, layer=layer or spec.layer, timestep=spec.timestep if timestep is None else timestep,
                   name=spec.name, **kwargs)

    @property
    def settings(self) -> Settings:
        a = self.adapter
        return Settings(model=self.name, family=a.family, source=a.source, layer=str(self.layer),
                        timestep=self.timestep, sigma=round(a.sigma(self.timestep), 6), pooling=a.pooling,
                        metric=self.metric, threshold=self.threshold, seed=self.seed, preprocess=PREPROCESS,
                        resolution=a.resolution, dtype=str(a.dtype).replace("torch.", ""), device=str(a.device),
                        winograd=self.winograd, allocator=runtime.allocator_state(), draws=self.draws,
                        normalise=self._normalise_name)

    @property
    def normalise(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reference channel statistics (mean, std) every score standardises with, or None."""
        return self._normalise

    @normalise.setter
    def normalise(self, stats: Mapping[str, Sequence[float]] | None) -> None:
        if stats is None:
            self._normalise, self._normalise_name = None, "none"
            return
        try:
            mean, scale = (torch.as_tensor(np.asarray(stats[k], dtype=np.float64)) for k in ("mean", "std"))
        except (KeyError, TypeError, ValueError):
            raise UsageError("normalise needs per-channel 'mean' and 'std' numbers") from None
        if mean.ndim != 1 or mean.shape != scale.shape or len(mean) < 2 or not torch.isfinite(mean).all() \
                or not torch.isfinite(scale).all() or (scale < 0).any():
            raise UsageError("normalise needs finite per-channel 'mean' and non-negative 'std' lists of one length")
        digest = hashlib.sha256(mean.numpy().tobytes() + scale.numpy().tobytes()).hexdigest()[:16]
        self._normalise, self._normalise_name = (mean, scale), f"reference:{digest}"

    @property
    def fingerprint(self) -> str:
        """The hash of the settings that change a score (``memdetect.store.journal``): part of every row's key."""
        return fingerprint(asdict(self.settings))

    def weights_digest(self, state: StateDir | None = None) -> str:
        """The content hash of the model's weights, once per detector: the files the adapter loaded
        (``Adapter.weight_files``, each file's hash cached in the state directory), or, for an adapter that names
        none, the loaded parameters and buffers themselves."""
        if self._weights is None:
            files = self.adapter.weight_files()
            if files:
                self._weights = "files:" + (state or StateDir()).files_digest(files)
            else:
                self._weights = "tensors:" + tensors_digest(self.adapter.networks())
        return self._weights

    def row(self, path: str, scores: dict[str, float] | None, *, error: str | None = None,
            key: str | None = None, frames: dict[str, int] | None = None) -> dict:
        """A report row with this detector's metric and threshold (``memdetect.store.report.make_row``)."""
        return make_row(path, scores, metric=self.metric, threshold=self.threshold, error=error, key=key,
                        frames=frames)

    # -- tensors -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def features(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 ``[B, 3, R, R]`` -> pooled activations ``[B, C]`` (float32, CPU); with ``draws`` > 1, the mean over
        the draws of each draw's pooled activations (the scores are the mean of each draw's scores:
        ``draw_features`` and ``scores_of``).

        ``seeds``: one noise seed per image; by default derived from the run seed and the pixels (``image_seed``).
        The images go through in one batch; after an out-of-memory error, in batches of half the size that failed
        (the smaller size is kept for later calls and ``batch_size``; each image's score does not depend on its
        batch).
        """
        f = self.draw_features(images, seeds)
        return f[:, 0] if f.shape[1] == 1 else f.mean(dim=1)

    @torch.inference_mode()
    def draw_features(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 ``[B, 3, R, R]`` -> pooled activations of every noise draw, ``[B, draws, C]`` (float32, CPU)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if seeds is None:
            arr = images.numpy()
            seeds = [image_seed(arr[i], self.seed) for i in range(len(arr))]
        seeds = list(seeds)
        out, i = [], 0
        while i < len(images):
            # inputs per forward pass: the images given (one draw each), at most the batch size with more draws
            # (then every image is encoded once, and its noised copies go through ``rows`` at a time)
            rows = self._oom_limit or (len(images) if self.draws == 1 else max(self.batch_size, len(images)))
            n = min(len(images) - i, rows) if self.draws == 1 else len(images) - i
            try:
                out.append(self._features(images[i:i + n], seeds[i:i + n], rows))
                i += n
                runtime.bound_heap()
                continue
            except torch.OutOfMemoryError:
                if min(rows, n * self.draws) == 1:
                    raise
            self._out_of_memory(min(rows, n * self.draws))  # outside the except block: the batch's tensors are gone
        return torch.cat(out) if len(out) != 1 else out[0]

    def scores_of(self, draw_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every metric of ``draw_features``' output ``[B, K, C]``: each draw's score, averaged over the K draws."""
        b, k, c = draw_feats.shape
        if self._normalise is not None:
            mean, scale = self._normalise
            if c != len(mean):
                raise UsageError(f"the reference channel statistics hold {len(mean)} channels, but {self.layer} gives "
                                 f"{c}: they were made for another model or layer; recalibrate")
            draw_feats = standardise(draw_feats.reshape(b * k, c), mean, scale).reshape(b, k, c)
        if k == 1:
            return compute_all(draw_feats[:, 0])
        return {name: v.reshape(b, k).mean(dim=1) for name, v in compute_all(draw_feats.reshape(b * k, c)).items()}

    def _out_of_memory(self, n: int) -> None:
        half = max(1, n // 2)
        if self._oom_limit is None:
            log.warning("out of memory at a batch of %d images on %s; halving the batch to %d and retrying (set "
                        "--batch-size to choose it)", n, self.adapter.device, half)
        else:
            log.debug("out of memory again at %d images; batch %d", n, half)
        self._oom_limit = half
        self.batch_size = min(self.batch_size, half)
        if self.adapter.device.type == "cuda":
            torch.cuda.empty_cache()

    def _features(self, images: torch.Tensor, seeds: Sequence[int], rows: int) -> torch.Tensor:
        """``[n, draws, C]``; the n x draws noised inputs go through the denoiser ``rows`` at a time."""
        a = self.adapter
        k = self.encode_batch or len(images)
        x0 = a.encode(images) if k >= len(images) else torch.cat([a.encode(images[i:i + k])
                                                                 for i in range(0, len(images), k)])
        if self.draws == 1:
            return self._forward(x0, seeds)[:, None]
        x0 = x0.repeat_interleave(self.draws, dim=0)  # image-major: image i's draws are rows i*K ... i*K + K-1
        row_seeds = [draw_seed(s, j) for s in seeds for j in range(self.draws)]
        out = [self._forward(x0[r:r + rows], row_seeds[r:r + rows]) for r in range(0, len(row_seeds), rows)]
        return torch.cat(out).reshape(len(images), self.draws, -1)

    def _forward(self, x0: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        a = self.adapter
        x_t = a.noise(x0, self.timestep, seeds)
        with Trace(a.denoiser, [self.layer], stop=self.early_exit) as tr:
            a.forward(x_t, self.timestep)
        return pool(tr[self.layer], a.pooling).float().cpu()

    def score_tensor(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Every metric for a batch of uint8 images (with ``draws`` > 1: the mean over the draws)."""
        return {k: v.numpy() for k, v in self.scores_of(self.draw_features(images, seeds)).items()}

    @torch.inference_mode()
    def activation_maps(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 ``[B, 3, R, R]`` -> the layer's activations laid out on their spatial grid, ``[B, C, h, w]``
        (float32, CPU; ``Adapter.activation_grid``: a UNet's feature map, a DiT's token grid): where each channel
        fires. Max-pooling this over ``(h, w)`` gives ``features``. Same noise as ``features`` (same seeds)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if seeds is None:
            arr = images.numpy()
            seeds = [image_seed(arr[i], self.seed) for i in range(len(arr))]
        a = self.adapter
        x_t = a.noise(a.encode(images), self.timestep, list(seeds))
        with Trace(a.denoiser, [self.layer], stop=self.early_exit) as tr:
            a.forward(x_t, self.timestep)
        return a.activation_grid(tr[self.layer]).float().cpu()

    @torch.inference_mode()
    def layers(self, *, include_inputs: bool = False) -> list[LayerInfo]:
        """Every hookable layer in forward order, with its shape on a probe input (batch 1: seeded noise in model
        space, noised to the detector's timestep) and how often it fires per forward pass."""
        if self.pruned:
            raise UsageError("listing layers runs the full forward, but this detector dropped the modules after its "
                             "layer (prune=True); create it with prune=False")
        a = self.adapter
        x0 = torch.randn(1, *a.latent_shape(), generator=torch.Generator().manual_seed(0)).to(a.device, a.dtype)
        x_t = a.noise(x0, self.timestep, [0])
        return probe_layers(a.denoiser, lambda: a.forward(x_t, self.timestep), include_inputs=include_inputs)

    # -- files ---------------------------------------------------------------------------------------------------
    def iter_files(self, files: Sequence[os.PathLike], *, fingerprint: str | None = None,
                   num_workers: int | None = None, on_batch: Callable[[int], None] | None = None,
                   on_features: Callable[[torch.Tensor], None] | None = None) -> Iterator[list[dict]]:
        """Yield the report rows of ``files`` batch by batch, in order (one row per file: scores, or an ``error``).

        Each file is read once; its row's ``key`` hashes the bytes that were decoded and scored
        (``fingerprint``: the key's settings part, default ``self.fingerprint``). Every frame of an animated file is
        scored; its row keeps each score's highest over the frames (``frame_scores``). ``on_features``: called with
        the pooled activations ``[B, C]`` of each group of at most ``batch_size`` frames scored (calibration keeps
        their channel statistics).
        Closing the generator (or an exception, such as an interrupt, raised through it) stops the decoding workers
        at once.
        """
        loader = _loader(files, self.adapter.resolution, self.batch_size, num_workers)
        fp = fingerprint or self.fingerprint
        batches = iter(loader)
        try:
            for items in batches:
                good = [it for it in items if it["error"] is None]
                frames = [f for it in good for f in it["pixels"]]  # every frame of every image, in order
                per_frame: dict[str, list[np.ndarray]] = {}
                for start in range(0, len(frames), self.batch_size):
                    chunk = frames[start:start + self.batch_size]
                    drawn = self.draw_features(torch.from_numpy(np.stack(chunk)),
                                               [image_seed(f, self.seed) for f in chunk])
                    if on_features is not None:
                        on_features(drawn[:, 0] if drawn.shape[1] == 1 else drawn.mean(dim=1))
                    for k, v in self.scores_of(drawn).items():
                        per_frame.setdefault(k, []).append(v.numpy())
                scores = {k: np.concatenate(v) for k, v in per_frame.items()}
                rows, j = [], 0
                for it in items:
                    key = row_key(it["digest"], fp)
                    if it["error"] is None:
                        n = len(it["pixels"])
                        best, where = frame_scores({k: v[j:j + n] for k, v in scores.items()})
                        rows.append(self.row(it["path"], best, key=key, frames=where))
                        if n > 1:
                            rows[-1][FRAMES_FIELD] = where  # journaled with the scores (not a column)
                        j += n
                    else:
                        rows.append(self.row(it["path"], None, error=it["error"], key=key))
                if on_batch:
                    on_batch(len(items))
                yield rows
        finally:
            _stop_workers(batches)
            runtime.release_free_memory()  # a finished scan hands its batches' memory back

    def scan(self, paths: Iterable[str | os.PathLike], *, num_workers: int | None = None) -> pd.DataFrame:
        """Score every image under ``paths``; one row per file, in discovery order (no journal, no files written:
        see ``memdetect.workflows.scan.scan`` for those)."""
        files = discover(paths)
        return rows_to_frame([r for batch in self.iter_files(files, num_workers=num_workers) for r in batch])

    def score_images(self, images: Sequence) -> pd.DataFrame:
        """Score in-memory PIL images (rows have ``path`` = their index)."""
        from PIL import ImageOps

        arrs = [np.asarray(ImageOps.fit(im.convert("RGB"), (self.adapter.resolution,) * 2)).transpose(2, 0, 1)
                for im in images]
        rows = []
        for start in range(0, len(arrs), self.batch_size):
            chunk = arrs[start:start + self.batch_size]
            s = self.score_tensor(torch.from_numpy(np.stack(chunk)), [image_seed(a, self.seed) for a in chunk])
            rows += [self.row(str(start + j), {k: float(v[j]) for k, v in s.items()}) for j in range(len(chunk))]
        return rows_to_frame(rows)


def frame_scores(scores: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, int]]:
    """One image's scores from its frames' (``{metric: [F]}``): each metric's highest over the frames (every score is
    oriented higher = more likely memorized, so one memorized frame flags the image), and the frame it came from."""
    best = {k: float(v.max()) for k, v in scores.items()}
    where = {k: int(v.argmax()) for k, v in scores.items()}
    return best, where


def tensors_digest(modules: Sequence[torch.nn.Module]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the modules' state dicts (parameters and buffers)."""
    h = hashlib.sha256(b"memdetect-tensors-v1\n")
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            if not isinstance(t, torch.Tensor):
                continue
            t = t.detach().to("cpu").contiguous()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[os.PathLike], resolution: int):
        self.files = files if isinstance(files, Sequence) else list(files)  # an ItemList builds items on demand
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        item = {"path": item_name(path), "pixels": None, "error": None, "digest": None}
        try:
            # read once: the key hashes exactly the bytes that are decoded (a Source: a URL or a tar member)
            data = read_item(path) if isinstance(path, Source) else read_file(path)
            item["digest"] = content_digest(data)
            item["pixels"] = decode_frames(data, self.resolution)
        except ImageError as e:
            item["error"] = str(e)
        except Exception as e:  # never let one file stop the scan
            item["error"] = printable(f"{type(e).__name__}: {e}", 300)
        return item


def _worker_init(_: int, *, parent: int) -> None:
    """In each decoding worker: die with the scan (Linux ``PR_SET_PDEATHSIG``: even when the scan is SIGKILLed, no
    worker is left behind), and ignore SIGINT (Ctrl-C reaches the whole process group; the scan stops its workers
    itself, and a worker's KeyboardInterrupt would only print a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers still stop when the scan stops them or exits
        pass
    if os.getppid() != parent:  # the scan died before the setting took effect
        os._exit(1)


def _stop_workers(batches) -> None:
    """Stop a DataLoader iterator's worker processes now (what its finaliser does, without waiting for garbage
    collection: an exception's traceback keeps the iterator alive)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _loader(files, resolution: int, batch_size: int, num_workers: int | None):
    if num_workers is None:
        num_workers = 0 if len(files) <= batch_size else min(4, max(1, (os.cpu_count() or 2) // 2))
    if num_workers:
        runtime.release_free_memory()  # workers are forked: retained free pages must not be shared copy-on-write
    return torch.utils.data.DataLoader(_Images(files, resolution), batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, collate_fn=list,
                                       prefetch_factor=2 if num_workers else None,
                                       persistent_workers=False,
                                       worker_init_fn=functools.partial(_worker_init, parent=os.getpid())
                                       if num_workers else None)


__all__ = ["DTYPES", "MAX_DRAWS", "MAX_SEED", "Detector", "Settings", "check_draws", "check_options", "check_seed",
           "check_threshold", "resolve_device", "resolve_dtype", "tensors_digest"]
