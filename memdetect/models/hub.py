"""Loading diffusers components from a hub id or a local folder, with one-sentence errors.

Everything goes through ``from_pretrained``: the Hugging Face cache, ``HF_HOME``, ``HF_HUB_OFFLINE`` and tokens work
as they do for diffusers itself. Weights load as safetensors when the repo has them (diffusers' default).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelNotFoundError

try:  # huggingface_hub >= 0.20
    from huggingface_hub.errors import HFValidationError
except ImportError:  # pragma: no cover
    from huggingface_hub.utils import HFValidationError

_NOT_AVAILABLE = (OSError, HFValidationError)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def not_found(source: str, what: str, err: BaseException | None = None) -> ModelNotFoundError:
    """One sentence saying why ``what`` of ``source`` could not be had, and what to do."""
    path = Path(source).expanduser()
    if path.exists():
        reason = f": {str(err).splitlines()[0][:200]}" if err else ""
        return ModelNotFoundError(f"cannot load the {what} from folder {source}{reason}")
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        return ModelNotFoundError(f"model folder {source} does not exist")
    if _offline():
        return ModelNotFoundError(
            f"model {source!r} ({what}) is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it once with network access, or pass --model-path DIR")
    return ModelNotFoundError(
        f"model {source!r} ({what}) could not be loaded: it is not cached and the Hugging Face hub did not provide it "
        f"(no network, no such repo, or a gated repo needing `hf auth login`); pass --model-path DIR for a local copy")


def load_component(cls, source: str, subfolder: str | None = None, **kwargs):
    """``cls.from_pretrained(source, subfolder=...)`` with ModelNotFoundError on failure."""
    try:
        if subfolder:
            return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
        return cls.from_pretrained(source, **kwargs)
    except _NOT_AVAILABLE as err:
        raise not_found(source, f"{subfolder or 'model'} ({cls.__name__})", err) from err


def read_json(source: str, filename: str) -> dict | None:
    """A JSON file from a local folder or hub repo; None if the repo exists but lacks the file."""
    path = Path(source).expanduser()
    if path.is_dir():
        f = path / filename
        return json.loads(f.read_text()) if f.is_file() else None
    if path.exists():
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, filename)).read_text())
    except EntryNotFoundError:
        return None
    except _NOT_AVAILABLE as err:
        raise not_found(source, filename, err) from err


def has_subfolder(source: str, name: str) -> bool:
    """Whether a diffusers repo/folder keeps a component in ``name/`` (new layout) rather than at its root."""
    index = read_json(source, "model_index.json") or {}
    if name not in index:
        return False
    path = Path(source).expanduser()
    if path.is_dir():
        return (path / name).is_dir()
    return read_json(source, f"{name}/config.json") is not None or read_json(
        source, f"{name}/scheduler_config.json") is not None
