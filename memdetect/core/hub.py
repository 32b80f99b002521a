"""Where weights and data files come from: the Hugging Face hub and plain URLs, one cache and one offline switch.

* Hugging Face: every diffusers / transformers component loads through ``from_pretrained`` (``load_component``),
  so the Hugging Face cache, ``HF_HOME`` and tokens work as they do for diffusers itself; weights load as
  safetensors when the repo has them (diffusers' default).
* URLs (EDM's NVlabs checkpoints, the public prompt lists): downloaded once into ``cache_dir()``
  (``$MEMDETECT_CACHE``, default ``~/.cache/memdetect``) and checked on every use (``fetch``, ``download``).
* Offline mode (``offline()``): ``MEMDETECT_OFFLINE`` or ``HF_HUB_OFFLINE`` set to 1/true/yes/on. It holds for
  both: a Hugging Face load is then local-only, and a file that is not cached is a one-sentence error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import InputError, ModelNotFoundError

log = logging.getLogger(__name__)

#: Environment variables that switch memdetect offline (either one).
OFFLINE_VARIABLES = ("MEMDETECT_OFFLINE", "HF_HUB_OFFLINE")


def offline() -> bool:
    """Whether offline mode is set (``MEMDETECT_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"} for v in OFFLINE_VARIABLES)


def cache_dir() -> Path:
    """memdetect's download cache: ``$MEMDETECT_CACHE`` or ``~/.cache/memdetect``."""
    return Path(os.environ.get("MEMDETECT_CACHE") or Path.home() / ".cache" / "memdetect").expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DownloadError(OSError):
    """A URL could not be downloaded; the message is the reason (callers say what to do instead)."""


def download(url: str, dest: Path, *, timeout: float = 60.0) -> tuple[str, int]:
    """Stream ``url`` into ``dest`` (through ``dest.part``, renamed when complete); returns (sha256, size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h, size = hashlib.sha256(), 0
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DownloadError(str(getattr(e, "reason", None) or e)) from None
    os.replace(tmp, dest)
    return h.hexdigest(), size


def fetch_pinned_data(url: str, dest: Path, *, identify, pinned: str, what: str, hint: str,
                      timeout: float = 60.0) -> Path:
    """``dest``, a cached data file (not a model) that must have the identity ``pinned`` (``identify(path)``: e.g.
    its sha256 or git blob id), downloaded from ``url`` when it is missing or no longer matches. ``what`` names the
    file and ``hint`` the flag that reads a local copy instead, in the errors. Raises InputError (one sentence) when
    it is not cached and offline mode is set, when the download fails, and when the download is not the pinned file
    (which is then deleted)."""
    if dest.is_file():
        if identify(dest) == pinned:
            return dest
        log.warning("cached %s does not match its pinned identity; downloading it again", dest)
    if offline():
        raise InputError(f"{what} is not cached in {dest.parent} and offline mode is set "
                         f"({' or '.join(OFFLINE_VARIABLES)}); run once with network access, or pass {hint}")
    part = dest.with_name(dest.name + ".download")
    try:
        download(url, part, timeout=timeout)
    except DownloadError as e:
        raise InputError(f"could not download {what} from {url} ({e}); pass {hint}") from None
    got = identify(part)
    if got != pinned:
        part.unlink(missing_ok=True)
        raise InputError(f"the download of {url} is not the pinned file ({got[:16]}..., expected {pinned[:16]}...); "
                         f"refusing to use it, pass {hint}")
    os.replace(part, dest)
    return dest


def fetch(url: str, *, pinned: tuple[str, int] | None = None, timeout: float = 60.0) -> Path:
    """The cached copy of the model file at ``url``, downloaded on first use; its sha256 is checked every time.

    ``pinned``: the (sha256, size) known in advance. Without it memdetect trusts on first use: the first download's
    sha256 is recorded next to the file (``<file>.sha256``) and every later use or re-download must match it. Trust
    on first use catches a corrupted or swapped cache file, not a file that was already wrong when first
    downloaded. Raises ModelNotFoundError (one sentence) when the file is not cached and cannot be downloaded, and
    when a checksum does not match.
    """
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache_dir() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    record = dest.with_name(dest.name + ".sha256")
    expected = pinned[0] if pinned else (record.read_text().split()[0] if record.is_file() else None)
    how = "pinned" if pinned else "recorded on first download"

    if dest.is_file():
        digest = sha256_file(dest)
        if expected and digest != expected:
            raise ModelNotFoundError(f"the cached {dest} has sha256 {digest[:16]}..., not the {how} "
                                     f"{expected[:16]}...; delete it to download it again")
        if not expected:
            record.write_text(f"{digest}  {url}\n")
        return dest
    if offline() and not url.startswith("file:"):
        raise ModelNotFoundError(f"{url} is not in the memdetect cache ({dest.parent}) and offline mode is set; "
                                 f"download it yourself and pass --model-path FILE")
    part = dest.with_name(dest.name + ".download")
    try:
        digest, size = download(url, part, timeout=timeout)
    except DownloadError as e:
        raise ModelNotFoundError(f"could not download {url} ({e}); download it yourself and pass "
                                 f"--model-path FILE") from None
    if expected and (digest != expected or (pinned and size != pinned[1])):
        part.unlink(missing_ok=True)
        raise ModelNotFoundError(f"the download of {url} has sha256 {digest[:16]}... ({size} bytes), not the {how} "
                                 f"{expected[:16]}...; refusing to use it")
    os.replace(part, dest)
    if not pinned:
        record.write_text(f"{digest}  {url}\n")
    return dest


# -- Hugging Face ------------------------------------------------------------------------------------------------

def _not_available() -> tuple[type[BaseException], ...]:
    try:  # huggingface_hub >= 0.20
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover
        from huggingface_hub.utils import HFValidationError
    return OSError, HFValidationError


def not_found(source: str, what: str, err: BaseException | None = None) -> ModelNotFoundError:
    """One sentence saying why ``what`` of ``source`` could not be had, and what to do."""
    path = Path(source).expanduser()
    if path.exists():
        reason = f": {str(err).splitlines()[0][:200]}" if err else ""
        return ModelNotFoundError(f"cannot load the {what} from folder {source}{reason}")
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        return ModelNotFoundError(f"model folder {source} does not exist")
    if offline():
        return ModelNotFoundError(
            f"model {source!r} ({what}) is not in the local Hugging Face cache and offline mode is set "
            f"({' or '.join(OFFLINE_VARIABLES)}); download it once with network access, or pass --model-path DIR")
    return ModelNotFoundError(
        f"model {source!r} ({what}) could not be loaded: it is not cached and the Hugging Face hub did not provide it "
        f"(no network, no such repo, or a gated repo needing `hf auth login`); pass --model-path DIR for a local copy")


def load_component(cls, source: str, subfolder: str | None = None, **kwargs):
    """``cls.from_pretrained(source, subfolder=...)`` (local files only when offline), ModelNotFoundError on failure."""
    if subfolder:
        kwargs["subfolder"] = subfolder
    if offline():
        kwargs.setdefault("local_files_only", True)
    try:
        return cls.from_pretrained(source, **kwargs)
    except _not_available() as err:
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
        return json.loads(Path(hf_hub_download(source, filename, local_files_only=offline())).read_text())
    except EntryNotFoundError:
        return None
    except _not_available() as err:
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


#: Suffixes of weight files that ``from_pretrained`` may read.
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx"})


def local_root(source: str) -> Path | None:
    """The local folder of a model: the folder itself, or a hub repo's cached snapshot (None if not cached)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception as e:  # not cached, no such repo, an old hub version: the caller hashes tensors instead
        log.debug("no local snapshot of %s: %s", source, e)
        return None


def component_files(source: str, subfolders) -> list[Path]:
    """The files ``from_pretrained`` reads for a model's components (``subfolders``: names, None for the root):
    every regular file of each folder (configs, vocabularies) except other copies of the weights. Of the weight
    files, the plain ``.safetensors`` ones are kept when there are any (what diffusers and transformers load),
    else the plain ones of any format, else all (a variant such as ``.fp16.``). Empty when the model has no local
    folder: the caller then hashes the loaded tensors. A component folder the model was saved without (SD3's T5:
    ``text_encoder_3`` null in model_index.json) has no files to read and is skipped."""
    root = local_root(source)
    if root is None:
        return []
    out: list[Path] = []
    for sub in subfolders:
        folder = root / sub if sub else root
        if sub and not folder.exists() and (read_json(str(root), "model_index.json") or {}).get(sub, [None])[0] is None:
            continue
        try:
            entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
        except OSError:
            return []
        weights = [p for p in entries if p.suffix in WEIGHT_SUFFIXES]
        plain = [p for p in weights if "." not in p.name[: -len(p.suffix)]]
        chosen = [p for p in plain if p.suffix == ".safetensors"] or plain or weights
        out += [p for p in entries if p.suffix not in WEIGHT_SUFFIXES] + chosen
    return out


__all__ = ["DownloadError", "OFFLINE_VARIABLES", "cache_dir", "download", "fetch", "has_subfolder",
           "component_files", "load_component", "local_root", "not_found", "offline", "read_json", "sha256_file"]
