"""The empty prompt's condition, encoded once per model by the pipeline's own text encoders and cached on disk.

A prompt-free scan conditions every image on the empty prompt, so the text encoders (T5-XXL alone is 4.7B
parameters) are needed once per model, not per scan. ``empty_condition`` returns the cached tensors when there are
any; otherwise it runs ``compute()`` (which loads the encoders, encodes ``""`` and lets them go), stores the result and
returns it. The scan itself never holds a text encoder.

Cache: ``<memdetect cache>/conditions/<family>-<key>.safetensors`` (``hub.cache_dir()``: ``$MEMDETECT_CACHE`` or
``~/.cache/memdetect``). The key is the sha256 of the family, the encoding settings and the content hash of the
text-encoder and tokenizer files (``StateDir.files_digest``, whose per-file hashes are cached by ``stat``): other
weights, another tokenizer or other settings never meet an old entry. A model without local files (nothing to hash)
is encoded every time and not cached. A cache file that cannot be read or does not hold the expected tensors is
encoded again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..core.hub import cache_dir, component_files

log = logging.getLogger(__name__)

VERSION = 1


def cache_path(family: str, key: str) -> Path:
    return cache_dir() / "conditions" / f"{family}-{key[:32]}.safetensors"


def condition_key(family: str, source: str, components: Sequence[str], settings: dict) -> str | None:
    """The cache key of ``family``'s empty condition from ``source``'s ``components`` (None: nothing to hash)."""
    from ..store.state import StateDir

    files = component_files(source, components)
    if not files:
        return None
    digest = StateDir().files_digest(files)
    ident = json.dumps({"v": VERSION, "family": family, "settings": settings, "files": digest}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()


def empty_condition(family: str, source: str, components: Sequence[str], settings: dict, names: Sequence[str],
                    compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the empty prompt's condition (float32, CPU): cached, or ``compute()``d and cached."""
    from safetensors.torch import load_file, save_file

    key = condition_key(family, source, components, settings)
    path = cache_path(family, key) if key else None
    if path is not None and path.is_file():
        try:
            out = load_file(str(path))
            if set(out) == set(names) and all(torch.isfinite(v.float()).all() for v in out.values()):
                log.info("empty-prompt condition of %s from the cache (%s)", source, path)
                return out
            log.warning("cached condition %s does not hold %s; encoding again", path, ", ".join(names))
        except Exception as e:  # a truncated or foreign file: encode again
            log.warning("cannot read the cached condition %s (%s); encoding again", path, e)
    log.info("encoding the empty prompt with %s's text encoders (once per model)", source)
    with torch.no_grad():
        out = {k: v.detach().float().cpu().contiguous() for k, v in compute().items()}
    if set(out) != set(names):
        raise RuntimeError(f"the {family} condition must hold {sorted(names)}, got {sorted(out)}")
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            save_file(out, str(tmp), metadata={"family": family, "source": str(source)[:200]})
            os.replace(tmp, path)
        except OSError as e:
            log.info("cannot cache the condition in %s: %s", path.parent, e)
    return out
