"""``memdetect models`` (the presets) and ``memdetect layers`` (a model's hookable layers)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from .common import load_detector
from .exits import handle_errors
from .options import Device, Dtype, Model, ModelPath
from .render import _p, err, out, table_width
from .ux import require_model


@handle_errors
def models():
    """List the model presets: family, weights, default layer and timestep, and the timestep's noise level sigma
    under the preset's schedule.

    Example: memdetect models"""
    from ..models import ADAPTERS, PRESETS
    from ..models.presets import schedule_sigma

    title = "presets (use with --model; --model-path overrides the weights)"
    t = Table(title=title, title_justify="left")
    for c in ("preset", "family", "weights", "layer", "t", "sigma (schedule)", "note"):
        t.add_column(c, overflow="fold")
    rows = []
    for p in PRESETS.values():
        cls = ADAPTERS.get(p.family)
        layer = p.layer or (cls.layer_hint(p.options) if cls else "(family not installed)")
        schedule = p.noise_schedule()
        sigma = (f"{schedule_sigma(schedule, p.timestep):.3f} ({schedule.get('beta_schedule', '?')})" if schedule
                 else "-")
        rows.append(tuple(map(_p, (p.name, p.family, p.source, layer, p.timestep, sigma, p.note))))
        t.add_row(*rows[-1])
    if out.width >= 140:
        out.print(t)
    else:  # a table of seven columns folds into unreadable slivers: one block per preset instead
        from .text_blocks import preset_blocks

        out.print(preset_blocks(title, rows, out.width), soft_wrap=True)
    out.print(f"families (with --model-path DIR): {', '.join(map(_p, sorted(ADAPTERS)))}")


@handle_errors
def layers(
    model: Model = None, model_path: ModelPath = None,
    contains: Annotated[Optional[str], typer.Option("--filter", help="Only names containing this text.")] = None,
    inputs: Annotated[bool, typer.Option("--inputs", help="Also list module inputs (NAME:in).")] = False,
    device: Device = "auto", dtype: Dtype = "auto",
):
    """List hookable layers with their output shape on a probe input and how often each fires per forward.

    Example: memdetect layers --model demo --filter up_blocks.0"""
    require_model(model, config_hint=None)
    det = load_detector(model, model_path, device=device, dtype=dtype, prune=False)  # the full forward
    default = str(det.layer)
    with err.status("probing one forward pass ..."):
        # inputs too: the default layer is often a module input (NAME:in), and is listed, marked, without --inputs
        infos = [i for i in det.layers(include_inputs=True) if inputs or ":in" not in i.spec or i.spec == default]
    title = f"{_p(det.name)}: hookable layers in forward order (batch 1; default: {_p(det.layer)})"
    rows = [(_p(i.spec), _p(i.module_type), "x".join(map(str, i.shape)) or "-", str(i.calls), i.spec == default)
            for i in infos if not contains or contains in i.spec]
    columns = ("layer", "module", "shape", "calls/forward")
    if table_width(columns, [r[:4] for r in rows], extra=len("<- default")) > out.width:
        # a layer's name is what the user copies into --layer: never folded; each on its own line instead
        from .text_blocks import layer_blocks

        out.print(layer_blocks(title, rows, out.width), soft_wrap=True)
        return
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, no_wrap=True)
    t.add_column("", no_wrap=True)  # the default layer's mark, apart: the layer's name stays whole
    for *cells, is_default in rows:
        t.add_row(*cells, Text("<- default", style="bold green") if is_default else "")
    out.print(t)
