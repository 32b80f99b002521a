"""``memdetect.toml``: a calibrated threshold together with the settings it is valid for.

Why a file: a threshold means nothing without the model, layer, timestep, seed and metric that produced the scores
it was chosen on (the clean-fid lesson: statistics are keyed by every setting). ``memdetect calibrate`` writes one;
``memdetect scan --config`` and ``memdetect audit --config`` read it, and refuse command-line flags that would
silently change those settings. A config is only ever read when given with ``--config``: a ``./memdetect.toml`` is
never picked up by itself (in CI it may come from the pull request under audit), the command line wins over it, and
``audit --config-sha256`` pins its bytes.

    model = "demo"                                   # required: preset, family, hub id or folder
    model_path = "weights/demo"                      # optional; relative paths are relative to this file
    layer = "up_blocks.0.resnets.2.conv2:in"         # optional: the model's default layer
    timestep = 50                                    # optional: the model's default timestep
    seed = 0
    draws = 4                                        # optional: noise draws averaged per score (absent: 1)
    normalise = "reference"                          # optional: scores of (v - mean) / std with the reference
                                                     # images' [calibration.channels] (absent: "none")
    metric = "std"
    threshold = 0.6123                               # required: flag when score >= threshold
    allow_errors = false                             # optional: audit reports unreadable inputs, not fails
    allow_remote = false                             # optional: read URLs other than file:// (s3://, http:// ...)

    [calibration.thresholds]                         # the same rule applied to every metric (for --metric)
    std = 0.6123
    ...

    [calibration.reference_scores]                   # each metric's reference scores, largest first
    n = 100                                          # (every score, or 2,000 order statistics of a larger set)
    std = [0.61, 0.58, ...]
    [calibration.channels]                           # reference images' pooled activations, per channel
    mean = [...]
    std = [...]

Other tables (``[calibration]``, ``[versions]``) are a record of how the file was made; they are not read back
except ``[calibration.thresholds]``, ``[calibration.reference_scores]`` (conformal p-values and ``--fpr``
thresholds, ``memdetect.core.pvalues``) and ``[calibration.channels]`` (evidence).

Numbers are checked as strictly as the command-line flags: thresholds (also those in ``[calibration.thresholds]``)
and ``sigma`` finite (``sigma`` positive), ``timestep`` a non-negative integer, ``seed`` an integer in [0, 2**64).
A stored calibration must agree with itself: ``[calibration.reference_scores]`` holds every one of its ``n`` scores,
or ``MAX_STORED`` order statistics of them. A ``[calibration]`` or ``[calibration.thresholds]`` that is not a table is
refused. Every problem is one line naming the file and the key.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UsageError
from .store.io import display_path
from .core.pvalues import Reference
from .core.scores import SCORES
from .settings import VALIDATORS, check_fpr, check_metric
from .text import printable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (a pyproject dependency there)
    import tomli as tomllib

log = logging.getLogger(__name__)

TOP_KEYS = {"version": int, "model": str, "model_path": str, "layer": str, "timestep": int, "sigma": float,
            "seed": int, "metric": str, "threshold": float, "allow_errors": bool, "allow_remote": bool,
            "draws": int, "normalise": str}
#: ``normalise``: how the pooled vector is normalised before a score (``Detector(normalise=...)``)
NORMALISE = ("none", "reference")
TABLES = ("calibration", "versions", "guard", "selection")  # [selection]: `calibrate --select-layer`'s evidence
#: ``[guard]`` keys read back (``memdetect calibrate --guard`` writes them; ``memdetect generate --guard`` reads them)
GUARD_KEYS = {"threshold": float, "metric": str, "layer": str, "step_t": int, "steps": int, "guidance": float,
              "normalise": str}  # normalise = "reference": the guard standardises with [calibration.channels]
CONFIG_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Config:
    """The scan settings a threshold was calibrated for (``None``: the model's default)."""

    model: str
    threshold: float | None  # None: a guard-only config (``[guard]``, from ``memdetect calibrate --guard``)
    metric: str = "std"
    model_path: str | None = None
    layer: str | None = None
    timestep: int | None = None
    sigma: float | None = None
    seed: int = 0
    draws: int = 1  # noise draws averaged per score (``--draws``); a file without the key was calibrated with 1
    normalise: str = "none"  # "reference": scores standardise with ``channels`` (``calibrate --normalise``)
    thresholds: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    guard: dict[str, Any] | None = None  # the ``[guard]`` table's GUARD_KEYS (in-generation threshold and settings)
    references: dict[str, Reference] = field(default_factory=dict)
    channels: dict[str, tuple[float, ...]] | None = None
    allow_errors: bool = False  # audit: error rows are reported, not failed (``--allow-errors``)
    allow_remote: bool = False  # inputs and manifest rows may name URLs other than file:// (``--allow-remote``)
    selection: dict[str, Any] | None = None  # ``[selection]`` (memdetect.workflows.select): where layer/timestep/metric came from
    weights: str | None = None  # ``calibration.weights``: the content hash of the weights calibrated on (identity)

    def reference_for(self, metric: str) -> Reference | None:
        """The reference score distribution of ``metric`` (None: the file has none; recalibrate)."""
        return self.references.get(metric)

    def threshold_for(self, metric: str) -> float:
        """The threshold of ``metric``: the top-level one for the config's metric, else ``[calibration.thresholds]``."""
        if self.threshold is None:
            where = f"{display_path(self.path)} " if self.path else "the config "
            raise UsageError(f"{where}holds only an in-generation guard threshold ([guard], from `memdetect calibrate "
                             f"--guard`); scanning images needs `memdetect calibrate` on image files")
        if metric == self.metric:
            return self.threshold
        if metric in self.thresholds:
            return self.thresholds[metric]
        where = f" in {display_path(self.path)}" if self.path else ""
        have = ", ".join([self.metric, *self.thresholds])
        raise UsageError(f"no threshold for metric {metric!r}{where} (has: {have}); recalibrate with --metric {metric}")


def check_weights(detector, expected: str | None, state=None, config: str | os.PathLike | None = None) -> None:
    """Refuse a model whose weights are not the ones the config was calibrated on (``calibration.weights``, the
    content hash of the weight files, ``Detector.weights_digest``: the same bytes give the same hash in any folder,
    on any machine). A config without the key (written by an older memdetect) is not checked."""
    if not expected:
        return
    got = detector.weights_digest(state)
    if got != expected:
        where = display_path(config) if config is not None else "the config"
        raise UsageError(f"the model's weights (content hash {got[:22]}...) are not the ones {where} was calibrated "
                         f"on ({expected[:22]}...): point --model-path at those weights, or recalibrate")


def portable_model(model: str, model_path: str | None, source: str | None, family: str,
                   config: str | os.PathLike) -> tuple[str, str | None, str | None]:
    """``(model, model_path, source)`` as a config meant to be committed records them: a preset, family or hub id by
    name; a local model folder (given as ``--model DIR`` or ``--model-path DIR``) by its path relative to the config
    file's folder (``load_config`` resolves it against the file), so the file names no absolute path of this
    machine and still works when the config and the model folder move together."""
    base = Path(config).resolve().parent

    def relative(p: str) -> str:
        full = Path(p).expanduser().resolve()
        try:
            return Path(os.path.relpath(full, base)).as_posix()
        except ValueError:  # another drive (Windows): no relative path exists
            return str(full)

    from .models import PRESETS

    if model_path:
        model_path = relative(model_path)
    elif model not in PRESETS and Path(model).expanduser().is_dir():  # --model DIR: the family and its folder
        model, model_path = family, relative(model)
    if source and model_path and Path(source).expanduser().exists():
        source = model_path  # where the weights were read from: the same folder, relative to the config
    elif source and model in PRESETS and Path(source).expanduser().is_absolute():
        source = f"preset {model}"  # a shipped model: its files are in the installed package
    return model, model_path, source


def portable_paths(items: list[str], config: str | os.PathLike) -> list[str]:
    """Local absolute paths made relative to the config file's folder (URLs and relative paths unchanged)."""
    base = Path(config).resolve().parent
    out = []
    for item in items:
        if os.path.isabs(item):
            try:
                item = Path(os.path.relpath(item, base)).as_posix()
            except ValueError:  # another drive (Windows)
                pass
        out.append(item)
    return out


def check_sha256(text: str) -> str:
    """A SHA-256 given on the command line (``--config-sha256``): 64 hexadecimal digits, returned lower-case."""
    t = str(text).strip().lower()
    if len(t) != 64 or any(c not in "0123456789abcdef" for c in t):
        raise UsageError(f"--config-sha256 takes the config file's SHA-256 as 64 hexadecimal digits (`sha256sum "
                         f"memdetect.toml`), got {printable(repr(text), 80)}")
    return t


def load_config(path: str | os.PathLike, *, sha256: str | None = None) -> Config:
    """Read and validate a config file; every problem is a one-line ``UsageError`` naming the file and key.

    ``sha256``: the file's expected SHA-256 (``audit --config-sha256``), checked on the bytes that are then parsed
    (a file changed in between cannot slip through)."""
    p = Path(path)
    name = display_path(p)
    try:
        if p.is_dir():
            raise UsageError(f"config {name} is a directory; give the memdetect.toml file")
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise UsageError(f"config {name} is larger than {MAX_CONFIG_BYTES // 1024} KB; a memdetect.toml is a few "
                             f"hundred KB at most (reference scores and channel statistics included)")
        if sha256 is not None:
            want, got = check_sha256(sha256), hashlib.sha256(data).hexdigest()
            if got != want:
                raise UsageError(f"config {name} has SHA-256 {got}, not the pinned {want} (--config-sha256): it was "
                                 f"changed; refusing to use it")
        doc = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config {name} does not exist (write one with `memdetect calibrate`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config {name}: {e}") from None
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, an integer too long to parse, deep nesting
        raise UsageError(f"config {name} is not valid TOML: {printable(str(e) or type(e).__name__, 200)}") from None
    unknown = [k for k in doc if k not in TOP_KEYS and k not in TABLES]
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} in {name}; known keys: {', '.join([*TOP_KEYS, *TABLES])}")
    values = _typed_keys(doc, TOP_KEYS, "", name, _check_range)
    guard = _guard_table(doc.get("guard"), name)
    for key in ("model", "threshold"):
        if key == "threshold" and guard is not None:
            continue
        if key not in values:
            raise UsageError(f"{name} has no {key!r} (write the file with `memdetect calibrate`)")
    if values.get("version", CONFIG_VERSION) > CONFIG_VERSION:
        raise UsageError(f"{name} has config version {values['version']}; this memdetect reads version "
                         f"{CONFIG_VERSION} (upgrade memdetect)")
    metric = values.get("metric", "std")
    check_metric(metric, f" in {name}")
    calibration = doc.get("calibration", {})
    if not isinstance(calibration, dict):
        raise UsageError(f"[calibration] in {name} must be a table, got {type(calibration).__name__}")
    table = calibration.get("thresholds", {})
    if not isinstance(table, dict):
        raise UsageError(f"[calibration.thresholds] in {name} must be a table of metric = number, got "
                         f"{type(table).__name__}")
    thresholds = {}
    for m, v in table.items():
        if m not in SCORES:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UsageError(f"calibration.thresholds.{m} in {name} must be a number, got {_shown(v)}")
        _check_range("threshold", float(v), f"calibration.thresholds.{m} in {name}")
        thresholds[m] = float(v)
    references = _references(calibration.get("reference_scores"), name)
    channels = _channels(calibration.get("channels"), name)
    normalise = values.get("normalise", "none")
    if normalise not in NORMALISE:
        raise UsageError(f"normalise in {name} must be one of {', '.join(NORMALISE)}, got {_shown(normalise)}")
    if normalise == "reference" and channels is None:
        raise UsageError(f"normalise = \"reference\" in {name} needs the reference statistics in "
                         f"[calibration.channels]; recalibrate with --normalise reference")
    if guard is not None and guard.get("normalise") == "reference" and channels is None:
        raise UsageError(f"guard.normalise = \"reference\" in {name} needs the reference statistics in "
                         f"[calibration.channels]; recalibrate the guard with --config")
    weights = calibration.get("weights")
    if weights is not None and (not isinstance(weights, str) or len(weights) > 200):
        raise UsageError(f"calibration.weights in {name} must be the weights' content hash (a string), got "
                         f"{_shown(weights)}")
    model_path = values.get("model_path")
    if model_path and not Path(model_path).expanduser().is_absolute():
        model_path = str(p.resolve().parent / model_path)
    return Config(model=values["model"], threshold=values.get("threshold"), metric=metric, model_path=model_path,
                  layer=values.get("layer"), timestep=values.get("timestep"), sigma=values.get("sigma"),
                  seed=values.get("seed", 0), thresholds=thresholds, path=p, references=references,
                  channels=channels, guard=guard, allow_errors=values.get("allow_errors", False),
                  allow_remote=values.get("allow_remote", False), draws=values.get("draws", 1), normalise=normalise,
                  selection=_selection(doc.get("selection"), name), weights=weights)


def _numbers(v: Any, where: str) -> tuple[float, ...]:
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
        got = _shown(v) if not isinstance(v, list) else "a list with other values"
        raise UsageError(f"{where} must be a list of numbers, got {got}")
    try:
        out = tuple(float(x) for x in v)
    except OverflowError:
        raise UsageError(f"{where} must hold finite numbers") from None
    if not all(math.isfinite(x) for x in out):
        raise UsageError(f"{where} must hold finite numbers")
    return out


def _references(table: Any, name: str) -> dict[str, Reference]:
    """``[calibration.reference_scores]``: ``n`` and one descending list of scores per metric."""
    if table is None:
        return {}
    where = f"[calibration.reference_scores] in {name}"
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table, got {_shown(table)}")
    n = table.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 2**53:
        raise UsageError(f"calibration.reference_scores.n in {name} must be a positive integer, got {_shown(n)}")
    out = {}
    for m, v in table.items():
        if m == "n" or m not in SCORES:
            continue
        key = f"calibration.reference_scores.{m} in {name}"
        scores = _numbers(v, key)
        _check_stored_count(n, len(scores), m, name)
        try:
            out[m] = Reference(n, scores)
        except ValueError as e:
            raise UsageError(f"{key}: {e}") from None
    return out


def _check_stored_count(n: int, k: int, metric: str, name: str) -> None:
    """A stored calibration agrees with itself: ``calibrate`` keeps every score (``k == n``) or, of a larger set,
    exactly the ``MAX_STORED`` order statistics ``stored_ranks(n, MAX_STORED)``. Anything else claims reference images
    that no stored score stands for (``n = 10**12`` beside 100 scores would give p-values of 1e-12)."""
    from .core.pvalues import MAX_STORED, stored_ranks

    expected = n if n <= MAX_STORED else len(stored_ranks(n, MAX_STORED))
    if k != expected:
        raise UsageError(f"calibration.reference_scores.{metric} in {name} holds {k} stored scores, which cannot stand "
                         f"for n = {n} reference images (a calibration stores every score, or {MAX_STORED} order "
                         f"statistics of a larger set); the file was edited or damaged: recalibrate")


def _channels(table: Any, name: str) -> dict[str, tuple[float, ...]] | None:
    """``[calibration.channels]``: ``mean`` and ``std`` lists of the same length."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError(f"[calibration.channels] in {name} must be a table, got {_shown(table)}")
    out = {k: _numbers(table.get(k), f"calibration.channels.{k} in {name}") for k in ("mean", "std")}
    if len(out["mean"]) != len(out["std"]) or any(x < 0 for x in out["std"]):
        raise UsageError(f"calibration.channels in {name} must hold a mean and a non-negative std per channel")
    return out


def _selection(table: Any, name: str) -> dict[str, Any] | None:
    """``[selection]`` (``memdetect calibrate --select-layer``'s record): a table, shown in reports, never used to
    score (the top-level layer, timestep and metric are)."""
    if table is not None and not isinstance(table, dict):
        raise UsageError(f"[selection] in {name} must be a table, got {_shown(table)}")
    return table


def _guard_table(table: Any, name: str) -> dict[str, Any] | None:
    """``[guard]``: the in-generation threshold and the settings it was calibrated for (None when absent)."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError(f"[guard] in {name} must be a table, got {type(table).__name__}")
    out = _typed_keys(table, GUARD_KEYS, "guard.", name, _check_guard_value)
    if "threshold" not in out:
        raise UsageError(f"[guard] in {name} has no threshold (write it with `memdetect calibrate --guard`)")
    check_metric(out.get("metric", "std"), f" (guard.metric) in {name}")
    if out.get("normalise", "none") not in NORMALISE:
        raise UsageError(f"guard.normalise in {name} must be one of {', '.join(NORMALISE)}, got "
                         f"{_shown(out['normalise'])}")
    return out


def _check_guard_value(key: str, v: Any, where: str) -> None:
    """A ``[guard]`` value: threshold and step_t by the options' own validators, as for the flags; other numbers
    finite and non-negative."""
    typ = GUARD_KEYS[key]
    if key in ("threshold", "step_t"):
        VALIDATORS["timestep" if key == "step_t" else key](v, where)
    elif typ is float and not math.isfinite(v):
        raise UsageError(f"{where} must be a finite number, got {v}")
    elif typ is int and v < 0:
        raise UsageError(f"{where} must be a non-negative integer, got {v}")


def _typed_keys(table: dict, keys: Mapping[str, type], prefix: str, name: str,
                check: Callable[[str, Any, str], None]) -> dict[str, Any]:
    """The ``keys`` (key -> type) that the TOML ``table`` holds, each typed (``_typed``) and then checked by
    ``check(key, value, where)``, messages naming it ``where`` = ``{prefix}{key} in {name}``."""
    out: dict[str, Any] = {}
    for key, typ in keys.items():
        if key in table:
            where = f"{prefix}{key} in {name}"
            out[key] = _typed(table[key], typ, where)
            check(key, out[key], where)
    return out


def _typed(v: Any, typ: type, what: str) -> Any:
    """A config value ``v`` checked to be of ``typ`` (an integer where a number is asked for becomes a float; a
    boolean is no number); ``what`` names it in the message (``"timestep in memdetect.toml"``)."""
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        try:
            v = float(v)
        except OverflowError:
            raise UsageError(f"{what} must be a finite number, got a {v.bit_length()}-bit integer") from None
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
        kind = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}[typ]
        raise UsageError(f"{what} must be {kind}, got {_shown(v)}")
    return v


def _shown(v: Any) -> str:
    """A config value in a message: its type for containers and tables, a short printable repr otherwise."""
    if isinstance(v, (dict, list)):
        return f"a {'table' if isinstance(v, dict) else 'list'}"
    if isinstance(v, int) and v.bit_length() > 128:
        return f"a {v.bit_length()}-bit integer"
    return printable(repr(v), 60)


def _check_range(key: str, v: Any, where: str) -> None:
    """Each key's value checked by the option's one validator (``memdetect.settings.VALIDATORS``), as the flags are;
    the message names the key and the file (``where``)."""
    if key in ("threshold", "sigma", "timestep", "seed", "draws"):
        VALIDATORS[key](v, where)
    if key == "version" and v < 1:
        raise UsageError(f"{where} must be a positive integer, got {v}")


#: Settings a calibrated threshold depends on: a command-line flag may not change them behind the config's back.
PINNED = ("model", "layer", "timestep", "sigma", "seed", "draws")


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "layer":
        from .core.capture import LayerSpec

        try:
            return str(LayerSpec.parse(str(a))) == str(LayerSpec.parse(str(b)))
        except Exception:
            return str(a) == str(b)
    if name == "sigma":
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def combine(config: Config | None, flags: dict, given: set[str]) -> dict:
    """The scan settings from a config and the command line (``given``: the flags typed explicitly), as a dict of
    the flags' names (``ScanSettings.from_sources`` makes the validated, frozen object of it).

    The config supplies model, layer, timestep, sigma, seed, metric, threshold and model path; a flag typed on the
    command line always wins over it. An explicit flag that contradicts a pinned setting (``PINNED``) is refused
    unless ``--threshold`` is given too (the config's threshold would silently stop meaning anything); with it, the
    flags are used and the config's reference scores and channel statistics (made with other settings) are not.
    Allowed on top of a config: ``--model-path`` (where the weights are on this machine), ``--metric`` (uses that
    metric's calibrated threshold from ``[calibration.thresholds]``), ``--threshold`` (an explicit override) and
    ``--fpr`` (the threshold that flags at most that fraction of the config's reference images, from
    ``[calibration.reference_scores]``; not together with ``--threshold``).
    ``draws`` and ``normalise`` come from the config too (``draws`` is pinned; ``normalise`` has no scan flag).
    """
    out = dict(flags)
    fpr = flags.get("fpr")
    if fpr is not None:
        check_fpr(fpr)
        if flags.get("threshold") is not None:
            raise UsageError("give --threshold or --fpr, not both")
        if config is None:
            raise UsageError("--fpr needs a calibrated reference: --config memdetect.toml (write one with "
                             "`memdetect calibrate`)")
    if config is None:
        return out
    out["channels"] = config.channels  # evidence: the reference images' per-channel statistics
    out["normalise"] = config.normalise  # "reference": every score standardises with those statistics
    out["configuration"] = provenance(config.selection)  # reports say where layer/timestep/metric came from
    name = display_path(config.path) if config.path else "the config"
    explicit_threshold = "threshold" in given and flags.get("threshold") is not None
    overridden = []
    for key in PINNED:
        value = getattr(config, key)
        if value is None:  # the config leaves it to the model's default
            continue
        if key in given and flags.get(key) is not None and not _same(key, flags[key], value):
            if not explicit_threshold:
                raise UsageError(f"--{key} {flags[key]} differs from {key} = {value!r} in {name}, which the threshold "
                                 f"was calibrated for; drop the flag, give --threshold too, or recalibrate")
            overridden.append(key)  # the command line wins, with its own threshold
            continue
        out[key] = value
    for key in ("allow_errors", "allow_remote"):  # a flag given on the command line wins
        if key not in given:
            out[key] = getattr(config, key)
    if "model_path" not in given and config.model_path and "model" not in overridden:
        out["model_path"] = config.model_path
    if "model" not in overridden:  # the weights the threshold was calibrated on, wherever they are now
        out["weights"] = config.weights
    if "metric" not in given:
        out["metric"] = config.metric
    if overridden:  # the config's reference scores and channel statistics describe other settings: not used
        log.info("%s overridden on the command line: the config's reference scores are not used", ", ".join(overridden))
        out["channels"] = out["reference"] = None
        return out
    out["reference"] = config.reference_for(out["metric"])  # p-values: the metric's reference scores
    if fpr is not None:
        ref = config.reference_for(out["metric"])
        if ref is None:
            raise UsageError(f"{name} keeps no reference scores for {out['metric']} (written by an older memdetect); "
                             f"recalibrate to use --fpr")
        out["threshold"] = ref.threshold(fpr)
    elif "threshold" not in given or flags.get("threshold") is None:
        out["threshold"] = config.threshold_for(out["metric"])
    return out


@dataclass(frozen=True)
class ScanSettings:
    """The settings a scan or an audit asks for, made once from the flags and ``--config`` (``from_sources``) and
    passed on as they are: frozen, and every option checked by its one validator (``memdetect.settings``) when made.

    The score-determining fields (model, layer, timestep, sigma, seed, draws, metric, threshold) are named as in
    ``memdetect.settings.Settings``, the record the loaded ``Detector`` resolves them to (``None``: the model's
    default). From a config also: ``reference`` (its reference scores for ``metric``: p-values), ``channels`` and
    ``normalise`` (reference channel statistics), ``weights`` (the content hash of the weights calibrated on) and
    ``configuration`` (where its layer, timestep and metric came from)."""

    model: str | None = None
    model_path: str | os.PathLike | None = None
    layer: str | None = None
    timestep: int | None = None
    sigma: float | None = None
    seed: int = 0
    draws: int = 1
    metric: str = "std"
    threshold: float | None = None
    fpr: float | None = None
    allow_errors: bool = False
    allow_remote: bool = False
    normalise: str = "none"
    channels: dict[str, tuple[float, ...]] | None = None
    reference: Reference | None = None
    weights: str | None = None
    configuration: str | None = None

    def __post_init__(self) -> None:
        for name in ("metric", "threshold", "seed", "timestep", "sigma", "draws", "fpr"):
            VALIDATORS[name](getattr(self, name))

    @classmethod
    def from_sources(cls, config: Config | None, flags: dict, given: set[str]) -> "ScanSettings":
        """The flags (``given``: those typed on the command line) combined with a config (``combine``)."""
        return cls(**combine(config, flags, given))

    @property
    def reference_stats(self) -> dict[str, tuple[float, ...]] | None:
        """The config's reference channel statistics when it says ``normalise = "reference"`` (else None): what
        ``Detector(normalise=...)`` takes."""
        return self.channels if self.normalise == "reference" else None

    def detector_options(self) -> dict[str, Any]:
        """The keywords ``Detector.from_pretrained`` takes from these settings."""
        return {"layer": self.layer, "timestep": self.timestep, "metric": self.metric, "threshold": self.threshold,
                "seed": self.seed, "sigma": self.sigma, "draws": self.draws, "normalise": self.reference_stats}


# -- writing: a tiny TOML writer for the few value types a config holds ------------------------------------------
def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7F or 0xD800 <= o <= 0xDFFF:  # control characters and lone surrogates
            out.append(f"\\u{o:04X}" if not 0xD800 <= o <= 0xDFFF else "\\uFFFD")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    """One TOML value: str, bool, int, float (incl. inf/nan), or a list of those."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _bare(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key) else _toml_str(key)


def to_toml(doc: dict, header: str = "") -> str:
    """Serialise a dict of scalars and (nested) dicts to TOML; ``None`` values are left out."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []

    def emit(table: dict, prefix: str) -> None:
        scalars = [(k, v) for k, v in table.items() if v is not None and not isinstance(v, dict)]
        if prefix and scalars:
            lines.extend(["", f"[{prefix}]"])
        lines.extend(f"{_bare(k)} = {toml_value(v)}" for k, v in scalars)
        for k, v in table.items():
            if isinstance(v, dict):
                emit(v, f"{prefix}.{_bare(k)}" if prefix else _bare(k))

    emit(doc, "")
    return "\n".join(lines) + "\n"




def provenance(selection: dict | None) -> str:
    """One line for reports: where a config's layer, timestep and metric came from (its ``[selection]`` table, or
    none: the model's default or the calibrating command's flags)."""
    if not selection:
        return "calibrated config: layer, timestep and metric as calibrated (the model's default or flags)"
    c, d = selection.get("chosen"), selection.get("default")
    c, d = (c if isinstance(c, dict) else {}), (d if isinstance(d, dict) else {})

    def iv(key: str) -> str:
        v = selection.get(key)
        try:
            return f"{float(v[0]):.3f} [{float(v[1]):.3f}, {float(v[2]):.3f}]"
        except (TypeError, ValueError, IndexError, KeyError):
            return "?"

    what = "selected" if selection.get("decision") == "selected" else "family default kept"
    labels = selection.get("labels", "labelled images")
    norm = ", reference-normalised" if c.get("normalise") == "reference" else ""
    return printable(f"{what} by `memdetect calibrate --select-layer` from {labels} "
            f"({selection.get('n_memorized')} memorized, {selection.get('n_novel')} novel, "
            f"{selection.get('n_candidates')} candidates): {c.get('layer')} at t={c.get('timestep')}, "
            f"{c.get('metric')}{norm}; out of sample AUROC {iv('selected_auroc')}, TPR@1%FPR {iv('selected_tpr')}; "
            f"default {d.get('layer')} at t={d.get('timestep')}, {d.get('metric')}: AUROC {iv('default_auroc')}, "
            f"TPR@1%FPR {iv('default_tpr')}", 600)


__all__ = ["CONFIG_VERSION", "PINNED", "Config", "ScanSettings", "combine", "load_config", "provenance", "to_toml",
           "toml_value"]
