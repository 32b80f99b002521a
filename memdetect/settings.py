"""The settings that determine a score, and one validator per option.

Every option a run is made of is checked by exactly one function here (``VALIDATORS``), wherever the value comes
from: a command-line flag, a ``memdetect.toml`` (``memdetect.config``), a ``Detector``/``Guard`` keyword in the
library. ``what`` names the value in the message (``"the threshold"`` for a flag or keyword, ``"threshold in
memdetect.toml"`` for a config key), so the same bad value gives the same one line from ``scan``, ``audit``,
``generate --guard`` and the library.

``Settings`` is the frozen record of what produced a scan's scores (``Detector.settings``). ``KEY_FIELDS`` (the
journal key, ``memdetect.store.journal.fingerprint``), ``COLUMN_FIELDS`` (a CSV / Parquet report's constant
columns, ``memdetect.store.report``), ``TOML_FIELDS`` (a ``memdetect.toml``'s settings, ``memdetect calibrate``)
and ``UNLESS_DEFAULT`` (in all three, only when not the default, so the keys, reports and configs of runs that
leave them alone stay the same) say where its fields are written (``Settings.written``).
A ``Settings`` validates its option fields when it is made: it cannot hold a NaN threshold or a 65-bit seed.
The settings *asked for* (flags merged with a config, before the model is loaded) are
``memdetect.config.ScanSettings``, validated by the same functions.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from ._version import __version__
from .core.scores import SCORES
from .errors import UsageError
from .text import printable

#: Seeds are unsigned 64-bit integers (``io.image_seed`` hashes 8 bytes of it).
MAX_SEED = 2**64 - 1
#: ``--draws``: at most this many noise draws per image (each is one more denoiser pass per image)
MAX_DRAWS = 64


def _integer(value) -> int | None:
    """``value`` as an int when it is an integer (Python or NumPy, not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _shown(value, bits: int) -> str:
    """A bad integer in a message: ``a N-bit integer`` past ``bits`` bits, else its short printable form."""
    k = _integer(value)
    return f"a {k.bit_length()}-bit integer" if k is not None and k.bit_length() > bits else printable(value, 40)


def check_threshold(threshold: float | None, what: str = "the threshold") -> None:
    """A threshold (None: none) must be a finite number (NaN would flag nothing, -inf everything)."""
    if threshold is None:
        return
    try:
        finite = not isinstance(threshold, bool) and math.isfinite(threshold)
    except TypeError:
        finite = False
    if not finite:
        raise UsageError(f"{what} must be a finite number, got {printable(threshold, 40)}")


def check_seed(seed: int, what: str = "the seed") -> None:
    """A seed must be an integer in [0, 2**64)."""
    s = _integer(seed)
    if s is None or not 0 <= s <= MAX_SEED:
        raise UsageError(f"{what} must be an integer in [0, 2**64), got {_shown(seed, 128)}")


def check_draws(draws: int, what: str = "--draws") -> None:
    """``draws`` (noise draws averaged per image) must be an integer in [1, ``MAX_DRAWS``]."""
    k = _integer(draws)
    if k is None or not 1 <= k <= MAX_DRAWS:
        why = " (noise draws averaged per image; each costs one more denoiser pass)" if what == "--draws" else ""
        raise UsageError(f"{what} must be an integer from 1 to {MAX_DRAWS}{why}, got {_shown(draws, 64)}")


def check_timestep(timestep: int | None, what: str = "the timestep") -> None:
    """A timestep (None: the model's default) must be a non-negative integer (the upper bound is the model's)."""
    if timestep is not None and (_integer(timestep) is None or timestep < 0):
        raise UsageError(f"{what} must be a non-negative integer, got {_shown(timestep, 128)}")


def check_sigma(sigma: float | None, what: str = "--sigma") -> None:
    """A noise level (None: the timestep's) must be a positive finite number."""
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                              or not 0 < float(sigma) < float("inf")):
        raise UsageError(f"{what} must be a positive finite number, got {printable(sigma, 40)}")


def check_metric(metric: str, where: str = "") -> None:
    """A metric must be one of ``SCORES`` (``where``: `` in FILE`` for a config key)."""
    if metric not in SCORES:
        raise UsageError(f"unknown metric {printable(repr(metric), 60)}{where}; choose one of {', '.join(SCORES)}")


def check_fpr(fpr: float | None, what: str = "--fpr") -> None:
    """A false-positive rate (None: none) must be in [0, 1)."""
    if fpr is not None and not 0.0 <= fpr < 1.0:
        raise UsageError(f"{what} must be in [0, 1), got {fpr}")


def check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise UsageError("batch size must be at least 1")


def check_num_workers(num_workers: int | None) -> None:
    if num_workers is not None and num_workers < 0:
        raise UsageError("the number of workers must be 0 or more")


#: option -> its one validator (``check_options``, ``Settings``, ``memdetect.config``)
VALIDATORS: dict[str, Callable[..., None]] = {
    "metric": check_metric, "threshold": check_threshold, "seed": check_seed, "timestep": check_timestep,
    "sigma": check_sigma, "draws": check_draws, "fpr": check_fpr, "batch_size": check_batch_size,
    "num_workers": check_num_workers,
}


def check_options(*, metric: str = "std", batch_size: int | None = None, threshold: float | None = None,
                  seed: int = 0, timestep: int | None = None, sigma: float | None = None,
                  num_workers: int | None = None, draws: int = 1) -> None:
    """The checks that need no model: a typo in an option fails before the (slow) model load. Numbers must be
    finite and in range (the timestep's upper bound is the model's, checked when it is loaded)."""
    for name, value in (("metric", metric), ("batch_size", batch_size), ("threshold", threshold), ("seed", seed),
                        ("timestep", timestep), ("sigma", sigma), ("num_workers", num_workers), ("draws", draws)):
        VALIDATORS[name](value)


#: The journal key (``memdetect.store.journal.fingerprint``): these fields always, in this order ...
KEY_FIELDS = ("model", "source", "family", "layer", "timestep", "sigma", "pooling", "seed", "preprocess",
              "resolution", "dtype", "winograd", "allocator", "memdetect")
#: ... a report's constant columns (``memdetect.store.report.write``): these, in this order ...
COLUMN_FIELDS = ("model", "layer", "timestep", "seed", "metric")
#: ... the top-level settings of a ``memdetect.toml`` that ``memdetect calibrate`` takes from them ...
TOML_FIELDS = ("layer", "timestep", "seed")
#: ... and, in all three, these when not their default (so keys, reports and configs of runs that leave them alone
#: stay the same; a config says ``normalise = "reference"``, its statistics are in ``[calibration.channels]``)
UNLESS_DEFAULT = ("draws", "normalise")


@dataclass(frozen=True)
class Settings:
    """Everything that determines a score (written into reports, journals' keys and calibration files).

    ``winograd``: whether the wide 3x3 convolutions ran with Winograd's algorithm (CPU float32; scores differ by
    float rounding, ~1e-5 relative); ``allocator``: the process's allocator setting (``memdetect.speed.runtime``);
    ``draws``: noise draws per image whose scores are averaged (``Detector``; in the journal key when not 1);
    ``normalise``: ``"none"``, or ``"reference:<digest>"`` when the pooled vector is standardised per channel with a
    reference set's statistics before every score (the digest hashes them; in the journal key when not none).
    Which fields the journal key and the report columns hold: ``KEY_FIELDS``, ``COLUMN_FIELDS``, ``UNLESS_DEFAULT``
    (``Settings.written``). A ``Settings`` validates its option fields when made (``VALIDATORS``).
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

    def __post_init__(self) -> None:
        for name in ("metric", "threshold", "seed", "timestep", "draws"):
            VALIDATORS[name](getattr(self, name))

    @classmethod
    def written(cls, where: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        """What ``where`` holds of ``settings`` (a ``Settings`` as a dict, ``dataclasses.asdict``): ``"key"``, the
        journal key's fields (a missing one is None), ``"column"``, a report's constant columns, or ``"toml"``, a
        config's settings (each must be there); then each ``UNLESS_DEFAULT`` field whose value is not its default."""
        if where == "key":
            out = {k: settings.get(k) for k in KEY_FIELDS}
        elif where in ("column", "toml"):
            out = {k: settings[k] for k in (COLUMN_FIELDS if where == "column" else TOML_FIELDS)}
        else:
            raise ValueError(f"where must be 'key', 'column' or 'toml', got {where!r}")
        defaults = {f.name: f.default for f in fields(cls)}
        out.update({k: settings[k] for k in UNLESS_DEFAULT if settings.get(k, defaults[k]) != defaults[k]})
        if where == "toml" and "normalise" in out:  # "reference:<digest>" -> "reference"
            out["normalise"] = str(out["normalise"]).partition(":")[0]
        return out


__all__ = ["COLUMN_FIELDS", "KEY_FIELDS", "MAX_DRAWS", "MAX_SEED", "Settings", "TOML_FIELDS", "UNLESS_DEFAULT",
           "VALIDATORS", "check_batch_size", "check_draws", "check_fpr",
           "check_metric", "check_num_workers", "check_options", "check_seed", "check_sigma", "check_threshold",
           "check_timestep"]
