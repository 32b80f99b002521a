"""What the command line tells a user, kept out of ``memdetect.cli``'s commands: the missing-model message, the
output errors that name their option, the shipped guard calibrations and the fast sampler ``generate`` picks.

Nothing here loads a model or reads an image; ``memdetect.cli`` calls these helpers and renders what they return.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from ..errors import UsageError
from ..text import printable

#: The shipped in-generation guard calibrations (``memdetect calibrate --guard`` documents), by preset.
SHIPPED_GUARDS = {"demo": "demo_guard", "demo-sd": "demo_sd_guard"}

#: ``generate``'s sampler where the family's own default is 1,000 ancestral DDPM steps: DDIM, this many steps, eta 0.
FAST_STEPS = 50
SLOW_DEFAULT = 1000


def require_model(model: Optional[str], *, config_hint: Optional[str] = "--config memdetect.toml") -> str:
    """``model``, or a UsageError (exit 2, one line) that lists the presets and says how to pick one (``config_hint``:
    the config that could name it instead; None for commands without one)."""
    if model:
        return model
    try:
        from ..models import PRESETS

        names = ", ".join(PRESETS)
    except Exception:  # pragma: no cover - the presets table always imports with the package
        names = "see `memdetect models`"
    alternative = f"; or {config_hint}, which names the model" if config_hint else ""
    raise UsageError(f"no model given: pass --model NAME, one of the presets {names} (`memdetect models` describes "
                     f"them; demo is a toy CIFAR-10 pixel model), a family with --model-path DIR, a Hugging Face hub "
                     f"id or a diffusers folder{alternative}")


# -- output errors ---------------------------------------------------------------------------------------------------

def _matches(filename: str, dest: Path) -> bool:
    """Whether ``filename`` (from an OSError) is ``dest``, a file memdetect writes beside it (its journal, lock, or
    an atomic write's temporary file), or a folder above it."""
    f = Path(os.path.abspath(filename))
    d = Path(os.path.abspath(dest))
    if f == d or d.is_relative_to(f):
        return True
    return f.parent == d.parent and d.name in f.name


def output_error(e: OSError, outputs: Mapping[str, object]) -> Optional[str]:
    """One line for an OSError raised while writing one of ``outputs`` (``{"--output": path, ...}``): the option,
    the path the user gave, what went wrong and the fix, never the internal journal or temporary file's name.
    None when the error is about none of them."""
    names = [n for n in (getattr(e, "filename", None), getattr(e, "filename2", None)) if n]
    for option, dest in outputs.items():
        if dest is None or "://" in str(dest):
            continue
        if any(_matches(str(n), Path(str(dest))) for n in names):
            reason = e.strerror or type(e).__name__
            folder = Path(str(dest)).parent
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                fix = f"free space there or give {option} a path on another disk"
            elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                fix = f"give {option} a path in a folder you can write to"
            else:
                fix = f"give {option} a path in a folder that exists and takes files (here: {printable(str(folder))})"
            return f"cannot write {option} {printable(str(dest))}: {reason.lower()}; {fix}"
    return None


# -- generate: the guard's calibration and the sampler ---------------------------------------------------------------

def shipped_guard(model: Optional[str], model_path) -> Optional[Path]:
    """The shipped guard calibration (a memdetect.toml with a [guard] table) of preset ``model`` with its own
    weights; None for any other model."""
    if model_path is not None or model not in SHIPPED_GUARDS:
        return None
    path = Path(__file__).resolve().parents[1] / "data" / SHIPPED_GUARDS[model] / "memdetect.toml"
    return path if path.is_file() else None


def no_guard_threshold(model: str, model_path=None) -> UsageError:
    """The refusal for ``generate --guard`` with no threshold: the command that makes one (its reference
    conditions as the model takes them: normal prompts, classes, or none)."""
    conditioning = "text"
    try:
        from ..models import adapter_class, resolve_model

        conditioning = adapter_class(resolve_model(model, str(model_path) if model_path else None).family).conditioning
    except Exception:  # an unknown model: the text form; loading it will say what is wrong
        pass
    conditions = {"text": " --prompt-file normal_prompts.txt", "class": " --class 0-9"}.get(conditioning, "")
    path = f" --model-path {printable(str(model_path))}" if model_path else ""
    return UsageError(f"--guard needs a threshold and {printable(model)} ships no guard calibration: make one with "
                      f"`memdetect calibrate --guard --model {printable(model)}{path}{conditions} -n 8 -o "
                      f"memdetect.toml`, then pass --config memdetect.toml (or --threshold X)")


def sampler(family_steps: int, family_eta: float, steps: Optional[int]):
    """``(steps, eta, description)`` for ``generate`` and ``calibrate --guard`` (the same rule, so that a guard
    calibration and the generations it guards sample alike): the given steps, else the family's, with the family's
    eta; except where the family's default is 1,000 (or more) ancestral DDPM steps: fewer steps (``FAST_STEPS`` when
    none are given) are DDIM steps with eta 0, as the shipped guard calibrations were made."""
    if family_steps >= SLOW_DEFAULT and (steps is None or steps < family_steps):
        steps, chosen_eta = steps or FAST_STEPS, 0.0
        why = f" (the pipeline's own default is {family_steps} ancestral DDPM steps; --steps {family_steps} for it)"
    else:
        steps, chosen_eta = steps or family_steps, family_eta
        why = ""
    kind = "DDIM" if chosen_eta == 0.0 else f"DDIM eta {chosen_eta:g}" if chosen_eta < 1.0 else "ancestral DDPM"
    return steps, chosen_eta, f"{kind}, {steps} steps{why}"


@contextlib.contextmanager
def count_steps(pipe, on_step: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_step(k)`` after each forward of ``pipe``'s denoiser (its UNet or transformer): the sampler's steps,
    for a progress bar. The hook is removed on the way out."""
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if module is None or not hasattr(module, "register_forward_hook"):
        yield
        return
    count = [0]

    def hook(_module, _args, _output):
        count[0] += 1
        on_step(count[0])

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["FAST_STEPS", "SHIPPED_GUARDS", "count_steps", "no_guard_threshold", "output_error", "require_model",
           "sampler", "shipped_guard"]
