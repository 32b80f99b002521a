"""The noise level of a flow-matching scan (SD3, Flux): the paper's t = 50, carried over by signal-to-noise ratio.

Rectified flow noises as x_t = (1 - s) x0 + s eps (s in (0, 1), the scheduler's ``sigma``; the model's timestep is
1000 s). There is no DDPM alpha-bar, so the paper's "t = 50" needs a definition. We match the signal-to-noise ratio:

* DDPM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, SNR = abar_t / (1 - abar_t); on SD 1.x's scaled-linear schedule
  (betas sqrt-linear from 0.00085 to 0.012 over 1000 steps, the schedule the paper's t = 50 was chosen on) t = 50 has
  abar = 0.9516 and noise-to-signal ratio r = sqrt((1 - abar) / abar) = 0.2256;
* flow: SNR = (1 - s)^2 / s^2, so the same SNR is s0 = r / (1 + r) = 0.1841 (``matched_sigma``).

Both write x_t / signal-coefficient = x0 + r eps: the same image under the same relative noise.

Resolution-dependent shift. SD3 and Flux sample on a shifted grid, s' = a s / (1 + (a - 1) s), i.e. the
noise-to-signal ratio times a (SD3 paper, sec. 5.3.2: at higher resolution the same per-pixel noise destroys less of
the image, so a is sqrt(pixel-count ratio) in theory; the models ship it as ``shift`` = 3.0 (SD3, SD3.5), or Flux's
``use_dynamic_shifting``: a = exp(mu), mu linear in the image's token count from ``base_shift`` at
``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``). We apply the model's own shift to s0 (``shift``):
the scan noises to where the model's sampler puts "t = 50 of 1000 on SD's schedule" at the scan's resolution, which is
the noise level the model itself treats as equivalent (SD3 and SD3.5, a = 3: s = 0.404; Flux.1-dev at 1024 px,
a = 3.16: s = 0.416; at 512 px, a = 1.88: s = 0.298). ``--sigma S`` sets s directly (no shift); ``--timestep T``
moves the DDPM reference timestep (then matched and shifted the same way).
"""

from __future__ import annotations

import functools
import math

#: the schedule the paper's t = 50 refers to (SD 1.x)
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def ddpm_ratio(t: int, schedule: dict = SD_SCHEDULE) -> float:
    """Noise-to-signal ratio sqrt((1 - abar_t) / abar_t) of DDPM timestep ``t`` (Python floats: no tensor work, so
    it runs the same inside the ``Detector``'s fake-tensor probe)."""
    abar = _abar(schedule["beta_schedule"], float(schedule["beta_start"]), float(schedule["beta_end"]),
                 int(schedule["num_train_timesteps"]))[int(t)]
    return math.sqrt((1 - abar) / abar)


@functools.lru_cache(maxsize=8)
def _abar(kind: str, start: float, end: float, n: int) -> tuple[float, ...]:
    if kind == "scaled_linear":
        betas = [(start ** 0.5 + (end ** 0.5 - start ** 0.5) * i / (n - 1)) ** 2 for i in range(n)]
    elif kind == "linear":
        betas = [start + (end - start) * i / (n - 1) for i in range(n)]
    else:
        raise ValueError(f"unsupported beta schedule {kind!r}")
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return tuple(out)


def matched_sigma(t: int) -> float:
    """The flow-matching s with the SNR of DDPM timestep ``t`` on SD's schedule: r / (1 + r)."""
    r = ddpm_ratio(t)
    return r / (1 + r)


def shift_sigma(sigma: float, shift: float) -> float:
    """s' = a s / (1 + (a - 1) s): the noise-to-signal ratio s / (1 - s) times ``shift`` (a)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def scheduler_shift(config, image_seq_len: int) -> float:
    """The shift a of a ``FlowMatchEulerDiscreteScheduler`` config at ``image_seq_len`` tokens: exp(mu) under
    ``use_dynamic_shifting`` (mu interpolated linearly in the token count, as diffusers' ``calculate_shift``), else
    ``shift``."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("use_dynamic_shifting", False):
        base_len, max_len = float(get("base_image_seq_len", 256)), float(get("max_image_seq_len", 4096))
        base, top = float(get("base_shift", 0.5)), float(get("max_shift", 1.15))
        m = (top - base) / (max_len - base_len)
        mu = image_seq_len * m + (base - m * base_len)
        return math.exp(mu) if get("time_shift_type", "exponential") == "exponential" else mu
    return float(get("shift", 1.0) or 1.0)


def flow_sigma(t: int, shift: float) -> float:
    """The scan's s for reference timestep ``t``: ``matched_sigma(t)`` shifted by ``shift``."""
    return shift_sigma(matched_sigma(t), shift)
