"""The library API: ``Detector`` turns images into score rows.

    from memdetect import Detector
    det = Detector.from_pretrained("demo")             # or "sd14", "dit", a hub id, a local folder
    df = det.scan(["generated/"])                      # pandas DataFrame, one row per file
    feats = det.features(uint8_images, seeds)          # pooled [B, C] activations

Data flows one way: pixels -> ``adapter.encode`` -> ``adapter.noise`` (per-image seed) -> ``Trace`` around
``adapter.forward`` (stops once the layer fired) -> ``pool`` -> ``scores`` -> rows.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from . import __version__
from .capture import LayerSpec, Trace, pool
from .errors import InputError, UsageError
from .io import PREPROCESS, ImageError, discover, display_path, file_digest, image_seed, load_image
from .journal import fingerprint, row_key
from .models import ADAPTERS, Adapter, ModelSpec, load_adapter, resolve_model
from .runtime import release_free_memory, retain_freed_memory
from .scores import SCORES, compute_all

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METRIC_COLUMNS = list(SCORES)
COLUMNS = ["path", "score", *METRIC_COLUMNS, "memorized", "error", "key"]  # key: see memdetect.journal


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N")
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


@dataclass(frozen=True)
class Settings:
    """Everything that determines a score (written into reports and calibration files)."""

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
    memdetect: str = __version__


class Detector:
    """Score images for memorization with one partial forward pass of a diffusion model."""

    def __init__(self, adapter: Adapter, *, layer: str | None = None, timestep: int = 50, metric: str = "std",
                 threshold: float | None = None, seed: int = 0, batch_size: int | None = None,
                 early_exit: bool = True, name: str = ""):
        if metric not in SCORES:
            raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(SCORES)}")
        if not 0 <= int(timestep) < adapter.num_train_timesteps:
            raise UsageError(f"timestep {timestep} is outside the model's schedule [0, {adapter.num_train_timesteps})")
        if batch_size is not None and batch_size < 1:
            raise UsageError("batch size must be at least 1")
        self.adapter = adapter
        self.layer = LayerSpec.parse(layer or adapter.default_layer())
        self.timestep = int(timestep)
        self.metric = metric
        self.threshold = threshold
        self.seed = int(seed)
        self.batch_size = batch_size or adapter.default_batch_size()
        self.early_exit = early_exit
        self.name = name or adapter.source
        if adapter.device.type == "cpu":
            retain_freed_memory()  # reuse freed activation pages instead of faulting in fresh ones (runtime.py)
        Trace(adapter.denoiser, [self.layer])  # resolve the layer now: a typo fails before any image is read

    @classmethod
    def from_pretrained(cls, model: str = "demo", model_path: str | None = None, *, layer: str | None = None,
                        timestep: int | None = None, device: str = "auto", dtype: str = "auto",
                        sigma: float | None = None, **kwargs) -> "Detector":
        """Load a preset, family + folder, hub id or local folder (see ``memdetect models``).

        ``sigma``: noise level used instead of the timestep's, for families that take one (EDM).
        """
        spec: ModelSpec = resolve_model(model, model_path)
        if sigma is not None:
            if not getattr(ADAPTERS.get(spec.family), "accepts_sigma", False):
                raise UsageError(f"--sigma applies to EDM models only; {spec.family} models take --timestep")
            if not 0 < float(sigma) < float("inf"):
                raise UsageError(f"--sigma must be a positive number, got {sigma}")
            spec = replace(spec, options={**spec.options, "sigma": float(sigma)})
        dev = resolve_device(device)
        adapter = load_adapter(spec, dev, resolve_dtype(dtype, dev))
        return cls(adapter, layer=layer or spec.layer, timestep=spec.timestep if timestep is None else timestep,
                   name=spec.name, **kwargs)

    @property
    def settings(self) -> Settings:
        a = self.adapter
        return Settings(model=self.name, family=a.family, source=a.source, layer=str(self.layer),
                        timestep=self.timestep, sigma=round(a.sigma(self.timestep), 6), pooling=a.pooling,
                        metric=self.metric, threshold=self.threshold, seed=self.seed, preprocess=PREPROCESS,
                        resolution=a.resolution, dtype=str(a.dtype).replace("torch.", ""), device=str(a.device))

    # -- tensors -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def features(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 ``[B, 3, R, R]`` -> pooled activations ``[B, C]`` (float32, CPU).

        ``seeds``: one noise seed per image; by default derived from the run seed and the pixels (``image_seed``).
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if seeds is None:
            arr = images.numpy()
            seeds = [image_seed(arr[i], self.seed) for i in range(len(arr))]
        a = self.adapter
        x0 = a.encode(images)
        x_t = a.noise(x0, self.timestep, seeds)
        with Trace(a.denoiser, [self.layer], stop=self.early_exit) as tr:
            a.forward(x_t, self.timestep)
        return pool(tr[self.layer], a.pooling).float().cpu()

    def score_tensor(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Every metric for a batch of uint8 images."""
        return {k: v.numpy() for k, v in compute_all(self.features(images, seeds)).items()}

    # -- files ---------------------------------------------------------------------------------------------------
    def iter_rows(self, paths: Iterable[str | os.PathLike], *, num_workers: int | None = None,
                  on_batch: Callable[[int], None] | None = None) -> Iterator[list[dict]]:
        """Yield the report rows batch by batch (one row per file: scores, or an ``error``)."""
        files = discover(paths)
        yield from self.iter_files(files, num_workers=num_workers, on_batch=on_batch)

    def iter_files(self, files: Sequence[os.PathLike], *, num_workers: int | None = None,
                   on_batch: Callable[[int], None] | None = None) -> Iterator[list[dict]]:
        loader = _loader(files, self.adapter.resolution, self.batch_size, num_workers)
        fp = fingerprint(asdict(self.settings))
        for items in loader:
            rows: list[dict] = []
            for it in items:
                it["key"] = row_key(it.get("digest"), fp)
            good = [it for it in items if it["error"] is None]
            if good:
                pixels = torch.from_numpy(np.stack([it["pixels"] for it in good]))
                seeds = [image_seed(it["pixels"], self.seed) for it in good]
                scores = self.score_tensor(pixels, seeds)
                for j, it in enumerate(good):
                    it["scores"] = {k: float(v[j]) for k, v in scores.items()}
            for it in items:
                rows.append(self._row(it))
            if on_batch:
                on_batch(len(items))
            yield rows

    def _row(self, item: dict) -> dict:
        row = {"path": item["path"], "score": None, **{m: None for m in METRIC_COLUMNS}, "memorized": None,
               "error": item["error"], "key": item.get("key")}
        if item["error"] is None:
            row.update(item["scores"])
            row["score"] = row[self.metric]
            if self.threshold is not None:
                row["memorized"] = bool(row["score"] >= self.threshold)
        return row

    def scan(self, paths: Iterable[str | os.PathLike], **kwargs) -> pd.DataFrame:
        """Score every image under ``paths``; one row per file, in discovery order."""
        rows = [r for batch in self.iter_rows(paths, **kwargs) for r in batch]
        return rows_to_frame(rows)

    def score_images(self, images: Sequence) -> pd.DataFrame:
        """Score in-memory PIL images (rows have ``path`` = their index)."""
        from PIL import ImageOps

        arrs = [np.asarray(ImageOps.fit(im.convert("RGB"), (self.adapter.resolution,) * 2)).transpose(2, 0, 1)
                for im in images]
        rows = []
        for start in range(0, len(arrs), self.batch_size):
            chunk = arrs[start:start + self.batch_size]
            seeds = [image_seed(a, self.seed) for a in chunk]
            s = self.score_tensor(torch.from_numpy(np.stack(chunk)), seeds)
            for j in range(len(chunk)):
                rows.append(self._row({"path": str(start + j), "error": None,
                                       "scores": {k: float(v[j]) for k, v in s.items()}}))
        return rows_to_frame(rows)


def rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ["score", *METRIC_COLUMNS]:
        df[c] = df[c].astype("float64")
    df["memorized"] = df["memorized"].astype("boolean")
    df["error"] = df["error"].astype("string")
    df["key"] = df["key"].astype("string")
    return df


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[os.PathLike], resolution: int):
        self.files = list(files)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        item = {"path": display_path(path), "pixels": None, "error": None, "digest": None}
        try:
            item["digest"] = file_digest(path)  # the resume key's content part (memdetect.journal)
            item["pixels"] = load_image(path, self.resolution)
        except ImageError as e:
            item["error"] = str(e)
        except Exception as e:  # never let one file stop the scan
            item["error"] = f"{type(e).__name__}: {e}"
        return item


def _loader(files, resolution: int, batch_size: int, num_workers: int | None):
    if num_workers is None:
        num_workers = 0 if len(files) <= batch_size else min(4, max(1, (os.cpu_count() or 2) // 2))
    if num_workers:
        release_free_memory()  # workers are forked: retained free pages must not be shared copy-on-write
    return torch.utils.data.DataLoader(_Images(files, resolution), batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, collate_fn=list,
                                       prefetch_factor=2 if num_workers else None,
                                       persistent_workers=False)


def scan_summary(df: pd.DataFrame) -> dict:
    errored = int(df["error"].notna().sum())
    flagged = int(df["memorized"].fillna(False).sum())
    return {"images": int(len(df)), "scored": int(len(df) - errored), "errored": errored, "flagged": flagged}


__all__ = ["COLUMNS", "Detector", "Settings", "resolve_device", "resolve_dtype", "rows_to_frame", "scan_summary",
           "InputError"]
