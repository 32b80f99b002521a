"""Named presets: model family, where the weights come from, and the paper's layer and timestep for it.

A preset is one row of the table in ``memdetect/data/presets.json`` (``read_table``); a new family adds its rows
there or calls ``register_preset`` (a plug-in package, a test).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

#: The DDPM noise schedules of the presets' weights (from their scheduler configs): a timestep's noise level differs
#: between them (``schedule_sigma``), which ``memdetect models`` shows.
SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
LINEAR = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}
#: Flow-matching models (``models/flow.py``): the SNR of DDPM t on SD's schedule, times the model's shift (SD3 and
#: SD3.5: ``shift`` 3.0; Flux.1-dev at 1024 px: exp(max_shift 1.15), its dynamic shift at 4096 image tokens).
FLOW_SD3 = {"beta_schedule": "flow, shift 3.0", "flow_shift": 3.0}
FLOW_FLUX_1024 = {"beta_schedule": "flow, shift 3.16 at 1024 px", "flow_shift": math.exp(1.15)}


def packaged(name: str) -> str:
    """Path of a model folder shipped inside the package (``memdetect/data/<name>``)."""
    return str(resources.files("memdetect") / "data" / name)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    source: str  # hub id, local folder, or a checkpoint URL (edm)
    layer: str | None = None  # None: the adapter's default for the loaded architecture
    timestep: int = 50
    options: dict = field(default_factory=dict)  # extra adapter options (e.g. DiT reading)
    note: str = ""
    schedule: dict | None = None  # DDPM schedule (DDPMScheduler keywords); None: the local scheduler config
    nemo_published: bool = False  # NeMo's published neuron statistics (SD 1.4, 50k LAION prompts) fit these weights

    def noise_schedule(self) -> dict | None:
        """``schedule``, or the ``scheduler/scheduler_config.json`` of a local source (None when neither)."""
        if self.schedule is not None:
            return self.schedule
        config = Path(self.source) / "scheduler" / "scheduler_config.json"
        if not config.is_file():
            return None
        cfg = json.loads(config.read_text())
        if cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            shift = float(cfg.get("shift", 1.0) or 1.0)
            return None if cfg.get("use_dynamic_shifting") else {"beta_schedule": f"flow, shift {shift:g}",
                                                                   "flow_shift": shift}
        return {k: cfg[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps") if k in cfg}


def schedule_sigma(schedule: dict, t: int) -> float:
    """Noise-to-signal ratio sqrt((1 - abar_t) / abar_t) of timestep ``t`` under a DDPM ``schedule`` (the
    ``DDPMScheduler`` keywords of ``SCALED_LINEAR`` / ``LINEAR``): what ``Adapter.sigma`` gives for loaded weights.
    For a flow-matching schedule (``flow_shift``) it is the s of x_t = (1 - s) x0 + s eps (``models/flow.py``)."""
    from diffusers import DDPMScheduler

    if "flow_shift" in schedule:
        from .flow import flow_sigma

        return flow_sigma(int(t), float(schedule["flow_shift"]))

    abar = float(DDPMScheduler(**schedule).alphas_cumprod[int(t)])
    return math.sqrt((1 - abar) / abar)


#: The schedules a row of the preset table names.
SCHEDULES = {"SCALED_LINEAR": SCALED_LINEAR, "LINEAR": LINEAR, "FLOW_SD3": FLOW_SD3, "FLOW_FLUX_1024": FLOW_FLUX_1024}
#: The preset table (package data): one JSON object per preset, the ``Preset`` fields by name; ``source`` may be
#: ``packaged:NAME`` (a model shipped in ``memdetect/data``) and ``schedule`` names one of ``SCHEDULES``.
TABLE = "presets.json"


def read_table(text: str) -> dict[str, Preset]:
    """The presets of a table (``TABLE``'s format), in its order. A key that is not a ``Preset`` field, or an unknown
    schedule, is a ValueError: a misspelt key would otherwise drop a setting without a word."""
    known = {f.name for f in fields(Preset)}
    out: dict[str, Preset] = {}
    for row in json.loads(text):
        if set(row) - known or row.get("schedule", "LINEAR") not in SCHEDULES:
            raise ValueError(f"preset row {row.get('name')!r}: unknown keys {sorted(set(row) - known)} or schedule "
                             f"{row.get('schedule')!r}")
        source = str(row["source"])
        if source.startswith("packaged:"):
            source = packaged(source[len("packaged:"):])
        schedule = row.get("schedule")
        out[row["name"]] = Preset(row["name"], row["family"], source, row.get("layer"), int(row.get("timestep", 50)),
                                  dict(row.get("options", {})), row.get("note", ""),
                                  None if schedule is None else SCHEDULES[schedule], bool(row.get("nemo_published")))
    return out


PRESETS: dict[str, Preset] = read_table((resources.files("memdetect") / "data" / TABLE).read_text(encoding="utf-8"))


def register_preset(preset: Preset) -> Preset:
    """Add ``preset`` to ``PRESETS`` (a later row of the same name replaces it)."""
    PRESETS[preset.name] = preset
    return preset
