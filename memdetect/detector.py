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
import os
import signal
from dataclasses import asdict, replace
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .core import capture
from .speed import runtime
from .speed import winograd
from .core.capture import LayerInfo, LayerSpec, Trace, pool, probe_layers
from .errors import LayerError, UsageError
from . import rows as _rows
from .store.io import PREPROCESS, draw_seed, image_seed
from .store.journal import fingerprint
from .models import ADAPTERS, ModelSpec, ScanAdapter, adapter_class, load_adapter, require, resolve_model
from .models.capabilities import Scanning
from .store.report import make_row
from .settings import (MAX_DRAWS, MAX_SEED, Settings, check_draws, check_options, check_seed, check_sigma,
                       check_threshold)
from .core.scores import channel_statistics, compute_all, standardise
from .store.sources import resolve
from .store.state import StateDir

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


# the options' validators and the ``Settings`` record live in ``memdetect.settings`` (re-exported here)


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
            check_sigma(sigma)
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
        checked = channel_statistics(stats)
        if checked is None:
            self._normalise, self._normalise_name = None, "none"
            return
        mean, scale = checked
        digest = hashlib.sha256(mean.numpy().tobytes() + scale.numpy().tobytes()).hexdigest()[:16]
        self._normalise, self._normalise_name = (mean, scale), f"reference:{digest}"

    @property
    def fingerprint(self) -> str:
        """The hash of the settings that change a score (``memdetect.store.journal``): part of every row's key."""
        return fingerprint(asdict(self.settings))

    def row_fingerprint(self, state: StateDir | None = None) -> str:
        """The settings part of every row's key, in every engine: ``fingerprint`` of the settings and the weights'
        content hash (``weights_digest``; ``state``: where file hashes are cached)."""
        return fingerprint(asdict(self.settings), weights=self.weights_digest(state))

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
        scored; its row keeps each score's highest over the frames. The rows are made by ``memdetect.rows`` (as
        every engine's are). ``on_features``: called with the pooled activations ``[B, C]`` of each group of at
        most ``batch_size`` frames scored (calibration keeps their channel statistics).
        Closing the generator (or an exception, such as an interrupt, raised through it) stops the decoding workers
        at once.
        """
        loader = _loader(files, self.adapter.resolution, self.batch_size, num_workers)
        fp = fingerprint or self.fingerprint
        batches = iter(loader)
        try:
            for items in batches:
                rows = _rows.score(self, items, fingerprint=fp, on_features=on_features)
                if on_batch:
                    on_batch(len(items))
                yield rows
        finally:
            _stop_workers(batches)
            runtime.release_free_memory()  # a finished scan hands its batches' memory back

    def scan(self, paths: Iterable[str | os.PathLike], *, num_workers: int | None = None,
             allow_remote: bool = False, state: StateDir | None = None) -> pd.DataFrame:
        """Score every image under ``paths`` (local files and folders, tar shards, manifests, and with
        ``allow_remote`` fsspec URLs: ``memdetect.store.sources.resolve``); one row per file, in input order, keyed
        as every engine keys them (``row_fingerprint``; ``state``: where weight-file hashes are cached). No journal
        and no files written: see ``memdetect.workflows.scan.scan`` for those."""
        files = resolve(paths, allow_remote=allow_remote)
        fp = self.row_fingerprint(state)
        return _rows.report_frame([r for batch in self.iter_files(files, fingerprint=fp, num_workers=num_workers)
                                   for r in batch])

    def score_images(self, images: Sequence) -> pd.DataFrame:
        """Score in-memory Pillow images (rows have ``path`` = their index, and no ``key``: there are no file
        bytes to hash), by the files' recipe (``memdetect.rows.from_image``: EXIF orientation, 16-bit rescaling,
        every frame); one that cannot be turned into pixels is an error row."""
        items = [_rows.from_image(im, self.adapter.resolution, str(i)) for i, im in enumerate(images)]
        return _rows.report_frame(_rows.score(self, items, fingerprint=self.fingerprint))


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

    def __getitem__(self, i: int) -> _rows.Item:
        return _rows.load(self.files[i], self.resolution)  # read once (a Source: a URL or a tar member)


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
