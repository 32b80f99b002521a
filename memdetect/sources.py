"""Where the images live: local files and folders, fsspec URLs, WebDataset-style tar shards and manifests.

    from memdetect.sources import resolve, shard
    items = resolve(["gen/", "s3://bucket/day/*.tar", "memory://x/list.csv"])
    mine = shard(items, 0, 4)                  # the first of four disjoint, contiguous parts, in input order

``resolve`` turns command-line inputs into one item per image, in input order:

* a local file or folder: what ``memdetect.io.discover`` finds (``pathlib.Path`` items, read by ``io.read_file``);
  ``file://`` URLs are local paths;
* any other fsspec URL (``s3://``, ``gs://``, ``hf://``, ``memory://`` ...): a file, a folder (searched
  recursively for image suffixes, sorted) or a glob (sorted). Credentials come from fsspec's usual environment
  variables and configuration files, never from a flag;
* a ``.tar`` shard (local or URL; WebDataset layout): one item per member with an image suffix, in archive order,
  named ``shard.tar::member``. Members that are not regular files, and the rest of a shard that is cut off or corrupt,
  become error rows;
* a manifest, ``.csv`` or ``.parquet`` (local or URL), with a ``path`` or ``url`` column: one item per row, each
  value a file, URL or ``shard.tar::member`` (relative paths are relative to the manifest's folder). An empty value
  is an error row.

An item that is not a local path is a ``Source``: its ``name`` is the report's ``path`` and ``read()`` returns its
bytes (at most ``io.MAX_FILE_BYTES``) or raises ``ImageError`` with a one-line reason, so a bad remote file or tar
member is an error row exactly like a bad local file. ``open_source(name)`` rebuilds an item from its name (what the
Ray engine's workers do with a ``path`` column).
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import InputError, UsageError
from .io import (IMAGE_EXTENSIONS, MAX_FILE_BYTES, ImageError, content_digest, discover, display_path, file_digest,
                 read_file)
from .text import printable

#: Separates a tar shard from a member in an item's name (``shard.tar::member``).
MEMBER_SEP = "::"
TAR_SUFFIXES = (".tar",)
MANIFEST_SUFFIXES = (".csv", ".parquet")
#: Manifest columns holding the image locations, in order of preference.
MANIFEST_COLUMNS = ("path", "url")

def is_url(value: str | os.PathLike) -> bool:
    """Whether ``value`` names an fsspec URL (``scheme://...``) rather than a local path."""
    s = value if isinstance(value, str) else os.fspath(value)
    if isinstance(s, bytes):
        return False
    head, sep, _ = s.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").replace(".", "").isalnum() and len(head) > 1


def _local_of(url: str) -> str | None:
    """The local path of a ``file://`` URL (or a ``local://`` one), else None."""
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return None


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise UsageError("reading URLs needs fsspec: pip install fsspec (plus s3fs, gcsfs ... for the cloud)") from None
    return fsspec


def _filesystem(url: str):
    """``(filesystem, path inside it)`` for an fsspec URL; UsageError (one line) for an unknown protocol."""
    fsspec = _fsspec()
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UsageError(f"cannot open {printable(url)}: {printable(e, 200)}") from None


def _suffix(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


@dataclass(frozen=True)
class Source:
    """One image that is not a local file: ``name`` (the report's path); ``read()`` gives its bytes."""

    name: str

    def read(self, limit: int = MAX_FILE_BYTES) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def digest(self) -> str | None:
        """sha256 of the bytes (None when they cannot be read: such an item is an error row, never journaled)."""
        try:
            return content_digest(self.read())
        except ImageError:
            return None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class RemoteFile(Source):
    """A file behind an fsspec URL."""

    def read(self, limit: int = MAX_FILE_BYTES) -> bytes:
        fs, path = _filesystem(self.name)
        try:
            size = fs.size(path)
            if size is not None and size > limit:
                raise ImageError(f"file too large ({size} bytes > {limit} bytes limit)")
            with fs.open(path, "rb") as f:
                data = f.read(limit + 1)
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError("not found") from None
        except IsADirectoryError:
            raise ImageError("is a directory, not an image file") from None
        except PermissionError:
            raise ImageError("permission denied") from None
        except Exception as e:  # network, credentials, protocol errors: one line for the error column
            raise ImageError(f"cannot read: {type(e).__name__}: {printable(e, 200)}") from None
        if len(data) > limit:
            raise ImageError(f"file too large (> {limit} bytes limit)")
        return data


@dataclass(frozen=True)
class TarMember(Source):
    """A member of a tar shard: ``size`` bytes at ``offset`` in ``shard`` (a local path or URL)."""

    shard: str = ""
    offset: int = 0
    size: int = 0

    def read(self, limit: int = MAX_FILE_BYTES) -> bytes:
        if self.size > limit:
            raise ImageError(f"tar member too large ({self.size} bytes > {limit} bytes limit)")
        try:
            with _open_binary(self.shard) as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except Exception as e:
            raise ImageError(f"cannot read tar member: {type(e).__name__}: {printable(e, 200)}") from None
        if len(data) != self.size:
            raise ImageError(f"tar member cut off ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True)
class Broken(Source):
    """An item known to be unreadable before any read (a tar member that is not a file, an empty manifest row)."""

    reason: str = "unreadable"

    def read(self, limit: int = MAX_FILE_BYTES) -> bytes:
        raise ImageError(self.reason)


def _open_binary(location: str):
    local = _local_of(location) if is_url(location) else location
    if local is not None:
        return open(local, "rb")
    fs, path = _filesystem(location)
    return fs.open(path, "rb")


def upload(local: str | os.PathLike, url: str) -> str:
    """Copy a finished local file to an fsspec URL (a report written to ``s3://...``); returns ``url``."""
    fs, path = _filesystem(url)
    try:
        parent = posixpath.dirname(path)
        if parent and not fs.exists(parent):
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(os.fspath(local), path)
    except Exception as e:
        raise UsageError(f"cannot write {printable(url)}: {type(e).__name__}: {printable(e, 200)}") from None
    return url


def open_binary(location: str):
    """A binary file object for reading a local path or an fsspec URL."""
    return _open_binary(location)


# -- reading and hashing any item ----------------------------------------------------------------------------------

def read_item(item, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of an item (a local path or a ``Source``); ``ImageError`` for anything unreadable."""
    if isinstance(item, Source):
        return item.read(limit)
    return read_file(item, limit)


def item_digest(item) -> str | None:
    """sha256 of an item's bytes, None when they cannot be read (``io.file_digest`` for local paths)."""
    if isinstance(item, Source):
        return item.digest()
    return file_digest(item)


def item_name(item) -> str:
    """The report's ``path`` of an item."""
    return item.name if isinstance(item, Source) else display_path(item)


# -- tar shards ----------------------------------------------------------------------------------------------------

def tar_members(shard: str) -> list[Source]:
    """One item per image member of a tar shard, in archive order (``shard::member``). A member with an image
    suffix that is not a regular file is an error row; a shard that cannot be opened, or is cut off or corrupt part
    way, adds one error row named after the shard (the members before the damage are kept)."""
    items: list[Source] = []
    try:
        with _open_binary(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if _suffix(m.name) not in IMAGE_EXTENSIONS:
                    continue  # captions, class labels, JSON metadata of a WebDataset sample
                name = f"{shard}{MEMBER_SEP}{m.name}"
                if not m.isfile():
                    items.append(Broken(name, reason="tar member is not a regular file"))
                else:
                    items.append(TarMember(name, shard=shard, offset=m.offset_data, size=m.size))
    except FileNotFoundError:
        raise FileNotFoundError(f"path {printable(shard)} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        where = f" after {len(items)} image members" if items else ""
        items.append(Broken(shard, reason=f"corrupt tar shard{where}: {printable(e, 200) or type(e).__name__}"))
    return items


@functools.lru_cache(maxsize=64)
def _tar_index(shard: str) -> dict[str, Source]:
    return {it.name: it for it in tar_members(shard)}


# -- manifests -----------------------------------------------------------------------------------------------------

def _read_manifest(location: str):
    import pandas as pd

    try:
        with _open_binary(location) as f:
            if _suffix(location) == ".parquet":
                return pd.read_parquet(f)
            return pd.read_csv(f, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"path {printable(location)} does not exist") from None
    except ImportError:
        raise UsageError("reading a .parquet manifest needs pyarrow: pip install 'memdetect[parquet]'") from None
    except (ValueError, OSError) as e:
        raise InputError(f"manifest {printable(location)} cannot be read: {printable(e, 200)}") from None


def manifest_items(location: str) -> list:
    """One item per row of a CSV / Parquet manifest's ``path`` (or ``url``) column, in row order."""
    df = _read_manifest(location)
    column = next((c for c in MANIFEST_COLUMNS if c in df.columns), None)
    if column is None:
        raise InputError(f"manifest {printable(location)} has no {' or '.join(MANIFEST_COLUMNS)} column (columns: "
                         f"{printable(', '.join(map(str, df.columns)), 200) or 'none'})")
    base = posixpath.dirname(location) if is_url(location) else os.path.dirname(location)
    items = []
    for n, value in enumerate(df[column].tolist(), start=1):
        if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
            items.append(Broken(f"{location}#row{n}", reason=f"manifest row {n} has no {column}"))
            continue
        value = str(value)
        if not is_url(value) and not os.path.isabs(value.split(MEMBER_SEP)[0]):
            value = posixpath.join(base, value) if is_url(location) else os.path.join(base, value)
        items.append(open_source(value))
    return items


# -- resolving inputs ----------------------------------------------------------------------------------------------

def open_source(name: str):
    """The item named ``name``: a local path, a URL, or ``shard.tar::member`` (error row if the member is absent).
    A name is never expanded (no folder walk, no manifest): it is one image."""
    name = str(name)
    shard, sep, member = name.partition(MEMBER_SEP)
    if sep and _suffix(shard) in TAR_SUFFIXES:
        try:
            found = _tar_index(shard).get(name)
        except FileNotFoundError:
            found = None
        return found or Broken(name, reason="no such tar member")
    if is_url(name):
        local = _local_of(name)
        return Path(local) if local is not None else RemoteFile(name)
    return Path(name)


def _remote_listing(url: str) -> list[str]:
    """Files under an fsspec URL: the file itself, a folder's image files and tar shards (recursively, sorted), or a
    glob's matches (sorted). FileNotFoundError when there is nothing there."""
    fs, path = _filesystem(url)
    def full(p: str) -> str:
        return p if is_url(p) else fs.unstrip_protocol(p)

    if any(c in path for c in "*?["):
        found = sorted(fs.glob(path))
        if not found:
            raise FileNotFoundError(f"no file matches {printable(url)}")
        return [full(p) for p in found if not fs.isdir(p)]
    if fs.isdir(path):
        return [full(p) for p in sorted(fs.find(path)) if _suffix(p) in IMAGE_EXTENSIONS]
    if not fs.exists(path):
        raise FileNotFoundError(f"path {printable(url)} does not exist")
    return [url]


def _expand(location: str) -> list:
    suffix = _suffix(location)
    if suffix in TAR_SUFFIXES:
        return tar_members(location)
    if suffix in MANIFEST_SUFFIXES:
        return manifest_items(location)
    return [open_source(location)]


def resolve(inputs: Iterable[str | os.PathLike]) -> list:
    """Every image named by ``inputs``, one item each, in input order (see the module docstring). Local folders are
    searched as ``io.discover`` does; duplicates are removed, the first kept. FileNotFoundError for an input that
    does not exist."""
    out: list = []
    seen: set[str] = set()
    for arg in inputs:
        s = arg if isinstance(arg, str) else os.fspath(arg)
        if is_url(s) and _local_of(s) is not None:
            s = _local_of(s)
        if is_url(s):
            found = [it for loc in _remote_listing(s) for it in _expand(loc)]
        else:
            p = Path(s)
            if p.is_file() and _suffix(s) in TAR_SUFFIXES + MANIFEST_SUFFIXES:
                found = _expand(s)
            else:
                found = discover([p])
        for it in found:
            key = item_name(it)
            if key not in seen:
                seen.add(key)
                out.append(it)
    return out


# -- shards of the work ----------------------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1-based, as Slurm array and Kubernetes job indices are easy to shift) -> ``(I - 1, N)``."""
    index, sep, count = str(text).partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()):
        raise UsageError(f"--shard takes I/N with 1 <= I <= N (e.g. 1/4), got {printable(text, 40)!r}")
    i, n = int(index), int(count)
    if not 1 <= i <= n:
        raise UsageError(f"--shard takes I/N with 1 <= I <= N (e.g. 1/4), got {printable(text, 40)!r}")
    return i - 1, n


def shard_bounds(total: int, index: int, count: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` (0-based) of ``count`` contiguous, near-equal parts of ``total`` items."""
    if not 0 <= index < count:
        raise UsageError(f"shard index {index} is outside 0..{count - 1}")
    return total * index // count, total * (index + 1) // count


def shard(items: Sequence, index: int, count: int) -> list:
    """Part ``index`` (0-based) of ``count``: contiguous blocks in input order, disjoint, covering every item, so
    concatenating the parts in order gives the items back."""
    start, stop = shard_bounds(len(items), index, count)
    return list(items[start:stop])


def inputs_digest(items: Sequence) -> str:
    """``COUNT:HASH``: how many items a scan has (all shards) and a short hash of their names, so shards of
    different inputs never merge and a missing row is noticed."""
    h = hashlib.sha256(b"memdetect-inputs-v1\n")
    for it in items:
        h.update(item_name(it).encode("utf-8", "backslashreplace") + b"\n")
    return f"{len(items)}:{h.hexdigest()[:16]}"


__all__ = ["Broken", "MEMBER_SEP", "RemoteFile", "Source", "TarMember", "inputs_digest", "is_url", "item_digest",
           "item_name", "manifest_items", "open_source", "parse_shard", "read_item", "resolve", "shard",
           "shard_bounds", "tar_members", "upload", "open_binary"]
