"""One item in, one report row out: the core every engine builds rows with.

    from memdetect import rows
    items = [rows.load(path, det.adapter.resolution) for path in files]    # read once, hash, decode every frame
    batch = rows.score(det, items, fingerprint=det.fingerprint)          # score every frame, key, one row each
    table = rows.report_frame(batch)                                      # the typed report frame

An item is a local path, a ``memdetect.store.sources.Source`` (a tar member, a URL), the bytes of an image file, or
an open Pillow image (``from_image``: the Python API). ``load`` reads it once: the row's key hashes exactly the bytes
that were decoded (``memdetect.store.journal.row_key``), and every frame is decoded by the ``pil-fit-bicubic`` recipe
(``memdetect.store.io``). A file that cannot be read or decoded is an ``Item`` with an ``error``, then an error row.
``score`` scores every frame of the good items, ``batch_size`` frames at a time, each with its own noise seed (the
run seed and its pixels: ``io.image_seed``), and keeps, per score, the highest over an image's frames
(``frame_scores``). The local scan (``Detector.iter_files``, ``memdetect.workflows.scan``), torchrun's ranks, Ray's
actors (``memdetect.integrations.ray``) and ``Detector.score_images`` all make their rows here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from .store.io import ImageError, content_digest, decode_frames, image_frames, image_seed, read_file
from .store.journal import FRAMES_FIELD, row_key
from .store.report import make_row, rows_to_frame
from .store.sources import Source, item_name, read_item
from .text import printable


@dataclass(frozen=True)
class Item:
    """One image to score: its report ``name``, the sha256 of the bytes decoded (``digest``; None for an in-memory
    image or bytes that could not be read), its frames (uint8 ``[F, 3, R, R]``) or the ``error`` that stopped it."""

    name: str
    digest: str | None = None
    pixels: np.ndarray | None = None
    error: str | None = None


class Scorer(Protocol):
    """What ``score`` needs of a detector (``memdetect.detector.Detector`` is one)."""

    batch_size: int
    seed: int
    metric: str
    threshold: float | None

    def draw_features(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor: ...

    def scores_of(self, draw_feats: torch.Tensor) -> dict[str, torch.Tensor]: ...


def error_text(e: BaseException) -> str:
    """An exception as an error row's one line: an ``ImageError``'s reason, else its type and message."""
    return str(e) if isinstance(e, ImageError) else printable(f"{type(e).__name__}: {e}", 300)


def load(source: os.PathLike | Source | bytes | bytearray | memoryview | None, resolution: int, *,
         name: str | None = None) -> Item:
    """Read ``source`` once, hash the bytes and decode every frame (never raises: a failure is the item's
    ``error``). ``name``: the row's path (default: the item's display name; for bytes, ``bytes:`` and the first 16
    hex digits of their sha256)."""
    if name is None and not isinstance(source, (bytes, bytearray, memoryview)) and source is not None:
        name = item_name(source)
    digest = None
    try:
        if source is None:
            raise ImageError("no bytes")
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:  # read once: the key hashes exactly the bytes that are decoded
            data = read_item(source) if isinstance(source, Source) else read_file(source)
        digest = content_digest(data)
        if name is None:
            name = f"bytes:{digest[:16]}"
        return Item(name, digest, decode_frames(data, resolution))
    except Exception as e:  # never let one file stop the scan
        return Item(name if name is not None else "bytes:", digest, error=error_text(e))


def from_image(image, resolution: int, name: str) -> Item:
    """An open Pillow image as an item, by the same recipe as a file's bytes (every frame, EXIF orientation, 16-bit
    rescaling; ``io.image_frames``); no bytes, so its row has no key. The image is left as it was."""
    try:
        return Item(name, None, image_frames(image, resolution))
    except Exception as e:
        return Item(name, None, error=error_text(e))


def frame_scores(scores: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, int]]:
    """One image's scores from its frames' (``{metric: [F]}``): each metric's highest over the frames (every score is
    oriented higher = more likely memorized, so one memorized frame flags the image), and the frame it came from."""
    best = {k: float(v.max()) for k, v in scores.items()}
    where = {k: int(v.argmax()) for k, v in scores.items()}
    return best, where


def score(det: Scorer, items: Sequence[Item], *, fingerprint: str,
          on_features: Callable[[torch.Tensor], None] | None = None) -> list[dict]:
    """One report row per item, in order: the scores of a good item's frames (``batch_size`` frames per call, each
    seeded by its pixels), each score's highest over the frames and the frame it came from, keyed by the item's
    digest and ``fingerprint``; an error row for a failed one. A multi-frame row also carries the frames of every
    score for the journal (``memdetect.store.journal.FRAMES_FIELD``, not a column). ``on_features``: called with the
    pooled activations ``[B, C]`` of each group of frames (the mean over the draws)."""
    frames = [f for it in items if it.error is None for f in it.pixels]  # every frame of every image, in order
    per_frame: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(frames), det.batch_size):
        chunk = frames[start:start + det.batch_size]
        drawn = det.draw_features(torch.from_numpy(np.stack(chunk)), [image_seed(f, det.seed) for f in chunk])
        if on_features is not None:
            on_features(drawn[:, 0] if drawn.shape[1] == 1 else drawn.mean(dim=1))
        for k, v in det.scores_of(drawn).items():
            per_frame.setdefault(k, []).append(v.numpy())
    scores = {k: np.concatenate(v) for k, v in per_frame.items()}
    rows, j = [], 0
    for it in items:
        key = row_key(it.digest, fingerprint)
        if it.error is None:
            n = len(it.pixels)
            best, where = frame_scores({k: v[j:j + n] for k, v in scores.items()})
            rows.append(make_row(it.name, best, metric=det.metric, threshold=det.threshold, key=key, frames=where))
            if n > 1:
                rows[-1][FRAMES_FIELD] = where  # journaled with the scores (not a column)
            j += n
        else:
            rows.append(make_row(it.name, None, metric=det.metric, threshold=det.threshold, error=it.error, key=key))
    return rows


def report_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as the typed report frame (``memdetect.store.report.rows_to_frame``)."""
    return rows_to_frame(rows)


__all__ = ["Item", "Scorer", "error_text", "frame_scores", "from_image", "load", "report_frame", "score"]
