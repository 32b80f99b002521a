"""The EDM checkpoint formats: an NVlabs ``.pkl`` (read as data by ``safe_pickle``), a ``.safetensors`` state dict
with its JSON sidecar (constructor arguments it leaves out are inferred from the tensor shapes), a folder holding
one of them, or an https URL (downloaded once, checked against a sha256: ``memdetect.core.hub.fetch``). Every name a
file provides reaches messages through ``printable`` / ``short_repr``; see ``safe_pickle`` for the budgets of .pkl
files and ``LIMITS`` for those of safetensors headers."""

from __future__ import annotations

import json
import math
import os
import urllib.parse
from pathlib import Path

import torch

from ...core import hub
from ...errors import ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError
from .config import _INT_RANGES, _MAX_LEVELS, _PRECOND_ALIASES, build_network, load_state
from .network import _Precond
from .safe_pickle import LIMITS, printable

EDM_CIFAR10_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl"

# ------------------------------------------------------------------------------------------------------------------
# Checkpoint formats. Every name a file provides reaches messages through printable / short_repr (control characters
# escaped, length cut); see memdetect.models.edm.safe_pickle for the budgets of .pkl files.

def _scannable(net: _Precond, name: str) -> _Precond:
    """``net`` (still on the meta device), if memdetect can feed it: the adapter scans RGB images."""
    if net.img_channels != 3:
        raise UnsupportedModelError(f"{name} holds a network for {net.img_channels}-channel images; memdetect scans "
                                    f"RGB images (img_channels 3)")
    return net


_SIDECAR_MAX_BYTES = 1 << 20
_SIDECAR_MAX_DEPTH = 8  # a sidecar is {"class_name": ..., "init_kwargs": {"channel_mult": [...], ...}}: depth 3
_SAFETENSORS_MAX_HEADER = 8 << 20  # the real CIFAR-10 network's header: 425 tensors, about 40 KB


def network_from_pickle(path: str | os.PathLike) -> _Precond:
    """The EMA network of an NVlabs ``.pkl``, read as data (see ``memdetect.models.edm.safe_pickle``) into our classes."""
    from . import safe_pickle

    path = Path(path)
    name = printable(path.name)
    data = safe_pickle.load(path)
    if not isinstance(data, dict) or "ema" not in data:
        if isinstance(data, dict):
            keys = ", ".join(printable(str(k), 40) for k in list(data)[:8]) + (", ..." if len(data) > 8 else "")
        else:
            keys = type(data).__name__
        raise ModelNotFoundError(f"{name} is not an EDM network pickle: it has no 'ema' entry (found: {keys})")
    ema = data["ema"]
    if not isinstance(ema, safe_pickle.PersistentObject):
        raise ModelNotFoundError(f"{name}: 'ema' is not an NVlabs persistent network object")
    if ema.init_args:
        raise UnsupportedModelError(f"{name}: {printable(ema.class_name, 60)} was built with positional arguments, "
                                    f"which memdetect does not read")
    net = _scannable(build_network(ema.class_name, ema.init_kwargs, source=name, device="meta"), name)
    return load_state(net, safe_pickle.module_tensors(ema), name)


def _json_depth(obj) -> int:
    depth, todo = 0, [(obj, 1)]
    while todo:
        node, d = todo.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d)
            todo.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return depth


def _read_json(path: Path, what: str, max_bytes: int, *, offset: int = 0, exact: bool = False):
    """JSON from ``path``: the bytes from ``offset`` on, at most ``max_bytes`` of them (exactly that many if
    ``exact``). Nesting too deep for the parser is refused as unsafe, not raised as a RecursionError."""
    shown = printable(str(path), 200)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(max_bytes if exact else max_bytes + 1)
        if len(raw) > max_bytes:
            raise UnsafeCheckpointError(f"{what} {shown} is larger than memdetect's limit of {max_bytes:,} bytes")
        obj = json.loads(raw)
    except RecursionError:
        raise UnsafeCheckpointError(f"{what} {shown} nests too deeply for memdetect to read") from None
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read {what} {shown}: {printable(str(e), 160)}") from None
    return obj


def _sidecar(path: Path) -> dict | None:
    for p in (path.with_suffix(".json"), path.parent / "config.json"):
        if p.is_file():
            cfg = _read_json(p, "the EDM config", _SIDECAR_MAX_BYTES)
            if not isinstance(cfg, dict):
                raise ModelNotFoundError(f"the EDM config {printable(str(p), 200)} is not a JSON object")
            if _json_depth(cfg) > _SIDECAR_MAX_DEPTH:
                raise UnsafeCheckpointError(f"the EDM config {printable(str(p), 200)} nests more than "
                                            f"{_SIDECAR_MAX_DEPTH} levels deep, which memdetect refuses to read")
            return cfg
    return None


def infer_config(state: dict[str, torch.Tensor]) -> dict:
    """SongUNet constructor arguments implied by the tensor names and shapes of a preconditioner state dict.

    Reads only what the names and shapes say, within bounds (a resolution in the ``_INT_RANGES`` range, at most
    ``_MAX_LEVELS`` levels, a resample filter of shape [1, 1, k, k]); ``build_network`` checks the rest.
    """
    def fail(why: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"cannot infer the EDM network from the state dict: {why}")

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        t = state.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise fail(f"{printable(key, 80)} is not a {ndim}-D tensor")
        return tuple(int(s) for s in t.shape)

    convs = [k for k in state if k.startswith("model.enc.") and k.endswith("_conv.weight")]
    if len(convs) != 1:
        raise fail("no single model.enc.*_conv")
    head = convs[0].split(".")[2].split("x")[0]
    lo, hi = _INT_RANGES["img_resolution"]
    if not (head.isascii() and head.isdigit() and len(head) <= 4 and lo <= int(head) <= hi):
        raise fail(f"its input convolution {printable(convs[0], 80)} names a resolution outside [{lo}, {hi}]")
    res = int(head)
    mc, channels = shape(convs[0], 4)[:2]
    if mc < 1:
        raise fail(f"{printable(convs[0], 80)} has no output channels")
    emb, noise = shape("model.map_layer0.weight", 2)
    levels, r = [], res
    while r >= 1 and len(levels) <= _MAX_LEVELS and f"model.enc.{r}x{r}_block0.conv0.weight" in state:
        levels.append(r)
        r //= 2
    if not levels:
        raise fail("no encoder blocks")
    num_blocks = sum(1 for k in state if k.startswith(f"model.enc.{res}x{res}_block") and k.endswith("conv0.weight"))
    cfg = dict(img_resolution=res, img_channels=channels, model_channels=mc,
               channel_mult=[shape(f"model.enc.{r}x{r}_block0.conv0.weight", 4)[0] // mc for r in levels],
               channel_mult_emb=emb // mc, channel_mult_noise=noise // mc, num_blocks=num_blocks,
               attn_resolutions=[r for r in levels if f"model.enc.{r}x{r}_block0.qkv.weight" in state],
               label_dim=shape("model.map_label.weight", 2)[1] if "model.map_label.weight" in state else 0,
               augment_dim=shape("model.map_augment.weight", 2)[1] if "model.map_augment.weight" in state else 0)
    key, filt = next(((k, v) for k, v in state.items() if k.endswith("resample_filter")), (None, None))
    if key is not None:
        k = filt.shape[-1] if isinstance(filt, torch.Tensor) and filt.dim() == 4 else 0
        if not (tuple(filt.shape) == (1, 1, k, k) and 2 <= k <= 8 and filt.is_floating_point()
                and bool(torch.isfinite(filt).all())):
            got = tuple(filt.shape) if isinstance(filt, torch.Tensor) else type(filt).__name__
            raise fail(f"its resample filter {printable(key, 80)} has shape {got}, not [1, 1, k, k] of finite "
                       f"numbers with k from 2 to 8")
        cfg["resample_filter"] = [float(x) for x in filt[0, 0].double().sum(dim=1)]
    return cfg


def _safetensors_header(path: Path, name: str) -> int:
    """Check a .safetensors header before the library reads it: a bounded JSON object with at most
    ``LIMITS.tensors`` entries. Returns the file size. (The library checks that the tensors exactly tile the data
    after the header, so their bytes never exceed the file's.)"""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelNotFoundError(f"cannot read {name}: {printable(str(e), 160)}") from None
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < n <= size - 8:
        raise ModelNotFoundError(f"cannot read {name}: it is not a safetensors file (no header)")
    if n > _SAFETENSORS_MAX_HEADER:
        raise UnsafeCheckpointError(f"{name} has a safetensors header of {n:,} bytes, more than memdetect's limit of "
                                    f"{_SAFETENSORS_MAX_HEADER:,}")
    header = _read_json(path, "the safetensors header of", n, offset=8, exact=True)
    if not isinstance(header, dict):
        raise ModelNotFoundError(f"cannot read {name}: its safetensors header is not a JSON object")
    if len(header) > LIMITS.tensors:
        raise UnsafeCheckpointError(f"{name} holds {len(header):,} tensors, more than memdetect's limit of "
                                    f"{LIMITS.tensors:,}")
    return size


def network_from_safetensors(path: str | os.PathLike) -> _Precond:
    """A preconditioner state dict in safetensors with its JSON sidecar (see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    name = printable(path.name)
    _safetensors_header(path, name)
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError, MemoryError) as e:
        raise ModelNotFoundError(f"cannot read {name}: {printable(str(e), 160)}") from None
    if not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    cfg = _sidecar(path)
    cls = cfg.get("class_name") if cfg else None
    if cls is None and cfg and isinstance(cfg.get("precond"), str):
        cls = _PRECOND_ALIASES.get(cfg["precond"].lower(), cfg["precond"])
    if not cls:
        raise ModelNotFoundError(f"{name} needs a JSON sidecar {printable(path.with_suffix('.json').name)} naming its "
                                 f"preconditioning, e.g. {{\"class_name\": \"EDMPrecond\"}} (VPPrecond, VEPrecond "
                                 f"or EDMPrecond)")
    given = cfg.get("init_kwargs") or {}
    if not isinstance(given, dict):
        raise ModelNotFoundError(f"the init_kwargs in the config of {name} are not a JSON object")
    try:
        inferred = infer_config(state)
    except (KeyError, IndexError, ValueError, ZeroDivisionError, RuntimeError, TypeError) as e:
        raise ModelNotFoundError(f"cannot infer the EDM network of {name} from its tensors "
                                 f"({printable(str(e), 160)})") from None
    kwargs = {**inferred, **given}
    net = _scannable(build_network(cls, kwargs, source=name, device="meta"), name)
    return load_state(net, state, name)


def _strict_kwargs(net: _Precond) -> dict:
    """``net.init_kwargs`` as strict JSON can hold them: a non-finite float (EDMPrecond's ``sigma_max = inf``) is
    left out when it is the class's own default, which restores it on loading; any other one is refused."""
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(type(net).__init__).parameters.items()}
    kwargs = {}
    for k, v in net.init_kwargs.items():
        if isinstance(v, float) and not math.isfinite(v):
            if k in defaults and isinstance(defaults[k], (int, float)) and float(defaults[k]) == v:
                continue
            raise ValueError(f"{type(net).__name__} argument {k} = {v} has no strict-JSON form")
        kwargs[k] = v
    return kwargs


def save_safetensors(net: _Precond, path: str | os.PathLike) -> Path:
    """Write ``net``'s state dict to ``path`` (.safetensors) and its constructor arguments to the .json sidecar,
    in strict JSON (no ``Infinity``: an infinite default is left out; older sidecars holding it still load)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"class_name": type(net).__name__,
                                                     "init_kwargs": _strict_kwargs(net)}, indent=1,
                                                    allow_nan=False))
    return path


def load_network(source: str | os.PathLike) -> _Precond:
    """A .pkl, a .safetensors, a folder holding exactly one of them, or an https URL (downloaded and verified)."""
    path = checkpoint_path(source)
    if path.suffix == ".safetensors":
        return network_from_safetensors(path)
    return network_from_pickle(path)


def checkpoint_path(source: str | os.PathLike) -> Path:
    """The local checkpoint file ``load_network`` reads for ``source`` (a URL is downloaded and verified)."""
    source = str(source)
    if urllib.parse.urlparse(source).scheme in ("http", "https", "file"):
        path = hub.fetch(source, pinned=KNOWN_DOWNLOADS.get(source))
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".pkl", ".safetensors"))
        if len(found) != 1:
            raise ModelNotFoundError(f"folder {path} must hold exactly one .pkl or .safetensors EDM checkpoint "
                                     f"(found {len(found)})")
        path = found[0]
    if not path.is_file():
        raise ModelNotFoundError(f"EDM checkpoint {path} does not exist")
    return path


# ------------------------------------------------------------------------------------------------------------------
# Downloads (``memdetect.core.hub.fetch``: cached, checksummed).

#: URL -> (sha256, size in bytes) of files whose checksum is known in advance. NVIDIA publishes no checksums for the
#: EDM pickles. The values below were recorded by an independent public project that downloaded the same URL
#: (github.com/hjjjs4vbmv-netizen/recurrence_of_ect, artifacts/baseline/checkpoint_manifest.json, also md5
#: 0cb62d16b8617fd703a697cc17ae422e) and are repeated consistently across its manifests; memdetect could not download
#: the file to confirm them. A mismatch stops the load (see ``memdetect.core.hub.fetch``).
KNOWN_DOWNLOADS: dict[str, tuple[str, int]] = {
    EDM_CIFAR10_URL: ("4d5dcc1f1d0d41c8934ad21626eeddbdc0460182becf9fc059a0631b1eedb4da", 223_173_327),
}
