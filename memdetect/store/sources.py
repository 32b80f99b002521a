"""Where the images live: local files and folders, fsspec URLs, WebDataset-style tar shards and manifests.

    from memdetect.store.sources import resolve, shard
    items = resolve(["gen/", "s3://bucket/day/*.tar", "memory://x/list.csv"])
    mine = shard(items, 0, 4)                  # the first of four disjoint, contiguous parts, in input order

``resolve`` turns command-line inputs into one item per image, in input order:

* a local file or folder: what ``memdetect.store.io.discover`` finds (``pathlib.Path`` items, read by ``io.read_file``);
  ``file://`` URLs are local paths;
* with ``allow_remote=True`` (``--allow-remote``) only, any other fsspec URL (``s3://``, ``gs://``, ``hf://``,
  ``memory://``, ``http://``, ``ftp://`` ...): a file, a folder (searched recursively for image suffixes, sorted) or a
  glob (sorted). Credentials come from fsspec's usual environment variables and configuration files, never from a
  flag. Without it no connection is opened: such an input is a ``UsageError`` and such a manifest row an error row;
* with ``sniff=True`` (``memdetect audit``'s default), a local folder's or a tar shard's regular files and members
  without an image suffix are images too when their first bytes are an image signature (``io.looks_like_image``;
  a few bytes read per file); ``ItemList.by_content`` names them (the report's ``found_by`` column);
* a ``.tar`` shard (local or URL; WebDataset layout): one item per member with an image suffix, in archive order,
  named ``shard.tar::member``, and ``shard.tar::member#K`` for the K-th member of that name (K >= 2: a tar may hold
  several, and extracting it keeps the last). Members that are not regular files (links included), and the rest of a
  shard that is cut off or corrupt, become error rows;
* a manifest, ``.csv`` or ``.parquet`` (local or URL), with a ``path`` or ``url`` column: one item per row, each
  value a file, URL or ``shard.tar::member`` (relative paths are relative to the manifest's folder). An empty value
  is an error row. Manifests are read in chunks, and local paths are held as their bytes (``ItemList``: about the
  path's length plus 16 bytes a row), so a manifest of millions of rows costs little before the first image.

Identity is the real location, never the displayed name: a local path by its bytes, a tar member by its place in
the shard. Duplicates (the same identity twice) are removed, the first kept; names that merely print alike are two
rows. Names are displayed with ``io.display_path``, which escapes backslashes and undecodable bytes, so two
different names never print the same.

An item that is not a local path is a ``Source``: its ``name`` is the report's ``path`` and ``read()`` returns its
bytes (at most ``io.MAX_FILE_BYTES``) or raises ``ImageError`` with a one-line reason, so a bad remote file or tar
member is an error row exactly like a bad local file. ``open_source(name)`` rebuilds an item from its name (what the
Ray engine's workers do with a ``path`` column).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import sys
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError, UsageError
from .io import (IMAGE_EXTENSIONS, MAX_FILE_BYTES, SNIFF_BYTES, ImageError, content_digest, discover, display_name,
                 display_path, file_digest, looks_like_image, read_file, sniff_image)
from ..text import printable

#: Separates a tar shard from a member in an item's name (``shard.tar::member``).
MEMBER_SEP = "::"
TAR_SUFFIXES = (".tar",)
MANIFEST_SUFFIXES = (".csv", ".parquet")
#: Manifest columns holding the image locations, in order of preference.
MANIFEST_COLUMNS = ("path", "url")
#: Manifest rows read at a time.
MANIFEST_CHUNK = 1 << 16

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


def is_remote(value: str) -> bool:
    """Whether ``value`` is a URL that is not a local path (``file://`` and ``local://`` are local)."""
    return is_url(value) and _local_of(value) is None


def remote_refused(url: str) -> str:
    """The reason a remote URL is not read without ``allow_remote``."""
    scheme = url.partition("://")[0]
    return (f"remote URL not read: {printable(scheme, 20)}:// needs --allow-remote (memdetect reads local paths and "
            f"file:// URLs only unless asked)")


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

def _shown(location: str) -> str:
    """A local path or URL as the report shows it (``io.display_path``)."""
    return display_name(location) if is_url(location) else display_path(location)


def tar_members(shard: str, sniff: bool = False, by_content: list[Source] | None = None) -> list[Source]:
    """One item per image member of a tar shard, in archive order (``shard::member``, and ``shard::member#K`` for
    the K-th member of a name). A member with an image suffix that is not a regular file is an error row; a shard
    that cannot be opened, or is cut off or corrupt part way, adds one error row named after the shard (the members
    before the damage are kept). ``sniff=True``: a regular member without an image suffix is an image member too
    when its first ``SNIFF_BYTES`` are an image signature (appended to ``by_content`` when given)."""
    items: list[Source] = []
    seen: dict[str, int] = {}
    try:
        with _open_binary(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                sniffed = False
                if _suffix(m.name) not in IMAGE_EXTENSIONS:
                    if not (sniff and m.isfile()):
                        continue  # captions, class labels, JSON metadata of a WebDataset sample
                    f.seek(m.offset_data)  # the tar reader seeks back to the next header itself
                    if not looks_like_image(f.read(min(m.size, SNIFF_BYTES))):
                        continue
                    sniffed = True
                k = seen[m.name] = seen.get(m.name, 0) + 1
                name = f"{_shown(shard)}{MEMBER_SEP}{display_name(m.name)}{f'#{k}' if k > 1 else ''}"
                if not m.isfile():
                    items.append(Broken(name, reason="tar member is not a regular file"))
                else:
                    items.append(TarMember(name, shard=shard, offset=m.offset_data, size=m.size))
                    if sniffed and by_content is not None:
                        by_content.append(items[-1])
    except FileNotFoundError:
        raise FileNotFoundError(f"path {printable(shard)} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        where = f" after {len(items)} image members" if items else ""
        items.append(Broken(_shown(shard), reason=f"corrupt tar shard{where}: "
                                                  f"{printable(e, 200) or type(e).__name__}"))
    return items


@functools.lru_cache(maxsize=64)
def _tar_index(shard: str) -> dict[str, Source]:
    """A shard's members by their displayed member name (``member``, ``member#K``)."""
    prefix = _shown(shard) + MEMBER_SEP
    return {it.name[len(prefix):]: it for it in tar_members(shard) if it.name.startswith(prefix)}


# -- manifests -----------------------------------------------------------------------------------------------------

def _manifest_values(location: str):
    """``(column, values)``: the manifest's location column and an iterator over its values, read in chunks of
    ``MANIFEST_CHUNK`` rows (a CSV's as text, a Parquet's as stored)."""
    import pandas as pd

    name = printable(location)
    try:
        f = _open_binary(location)
    except FileNotFoundError:
        raise FileNotFoundError(f"path {name} does not exist") from None
    except OSError as e:
        raise InputError(f"manifest {name} cannot be read: {printable(e, 200)}") from None
    try:
        if _suffix(location) == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UsageError("reading a .parquet manifest needs pyarrow: pip install "
                                 "'memdetect[parquet]'") from None
            pf = pq.ParquetFile(f)
            columns = list(pf.schema_arrow.names)
            column = next((c for c in MANIFEST_COLUMNS if c in columns), None)
            chunks = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=MANIFEST_CHUNK, columns=[column])) \
                if column else iter(())
        else:
            columns = list(pd.read_csv(f, dtype=str, nrows=0).columns)  # the header, then only the one column
            column = next((c for c in MANIFEST_COLUMNS if c in columns), None)
            if f.seekable():
                f.seek(0)
            else:
                f.close()
                f = _open_binary(location)
            reader = pd.read_csv(f, dtype=str, keep_default_na=False, usecols=[column] if column else None,
                                 chunksize=MANIFEST_CHUNK)
            chunks = (chunk[column].tolist() for chunk in reader)
    except FileNotFoundError:
        f.close()
        raise FileNotFoundError(f"path {name} does not exist") from None
    except (ValueError, OSError) as e:
        f.close()
        raise InputError(f"manifest {name} cannot be read: {printable(e, 200)}") from None
    except BaseException:
        f.close()
        raise
    if column is None:
        f.close()
        raise InputError(f"manifest {name} has no {' or '.join(MANIFEST_COLUMNS)} column (columns: "
                         f"{printable(', '.join(map(str, columns)), 200) or 'none'})")

    def values():
        try:
            for chunk in chunks:
                yield from chunk
        except (ValueError, OSError) as e:
            raise InputError(f"manifest {name} cannot be read: {printable(e, 200)}") from None
        finally:
            f.close()

    return column, values()


def _manifest_into(location: str, out: "ItemList", allow_remote: bool = False) -> None:
    """Append one item per row of a CSV / Parquet manifest to ``out``, in row order, streaming: a local path is
    appended as its bytes, never as an object."""
    column, values = _manifest_values(location)
    remote_base = is_url(location)
    base = posixpath.dirname(location) if remote_base else os.path.dirname(location)
    shown = _shown(location)
    # the common row (a plain local path on POSIX) takes a short way: no Path object, one string join
    fast = os.sep == "/" and not remote_base
    prefix = base + "/" if base and not base.endswith("/") else base
    append_path = out.append_path
    for n, value in enumerate(values, start=1):
        if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
            out.append(Broken(f"{shown}#row{n}", reason=f"manifest row {n} has no {column}"))
            continue
        value = str(value)
        if fast and "://" not in value and MEMBER_SEP not in value:
            local = value if value[0] == "/" else prefix + value
            if _plain(local):
                append_path(local)
                continue
        head, sep, _ = value.partition(MEMBER_SEP)
        if not is_url(value) and not os.path.isabs(head):
            value = posixpath.join(base, value) if remote_base else os.path.join(base, value)
        if is_url(value) or (sep and _suffix(head) in TAR_SUFFIXES):
            out.append(open_source(value, allow_remote=allow_remote))
        else:
            out.append_path(os.fspath(Path(value)))


def _plain(path: str) -> bool:
    """Whether ``pathlib`` would keep this POSIX path as it is (no ``//``, ``.`` component or trailing slash)."""
    return ("//" not in path and "/./" not in path and not path.endswith(("/", "/.")) and not path.startswith("./")
            and path != ".")


def manifest_items(location: str, allow_remote: bool = False) -> "ItemList":
    """One item per row of a CSV / Parquet manifest's ``path`` (or ``url``) column, in row order."""
    out = ItemList()
    _manifest_into(location, out, allow_remote)
    return out


# -- resolving inputs ----------------------------------------------------------------------------------------------

def open_source(name: str, allow_remote: bool = False):
    """The item named ``name``: a local path, a URL, or ``shard.tar::member`` / ``shard.tar::member#K`` (error row
    if the member is absent). A name is never expanded (no folder walk, no manifest): it is one image. A remote URL
    (not ``file://``) is an error row unless ``allow_remote``: nothing is opened."""
    name = str(name)
    shard, sep, member = name.partition(MEMBER_SEP)
    if sep and _suffix(shard) in TAR_SUFFIXES:
        if is_remote(shard) and not allow_remote:
            return Broken(display_name(name), reason=remote_refused(shard))
        try:
            found = _tar_index(shard).get(member)
        except FileNotFoundError:
            found = None
        return found or Broken(f"{_shown(shard)}{MEMBER_SEP}{display_name(member)}", reason="no such tar member")
    if is_url(name):
        local = _local_of(name)
        if local is not None:
            return Path(local)
        return RemoteFile(name) if allow_remote else Broken(display_name(name), reason=remote_refused(name))
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


def _expand(location: str, out: "ItemList", allow_remote: bool, sniff: bool = False) -> None:
    suffix = _suffix(location)
    if suffix in TAR_SUFFIXES:
        sniffed: list[Source] = []
        out.extend(tar_members(location, sniff=sniff, by_content=sniffed))
        out.by_content.update(map(item_identity, sniffed))
    elif suffix in MANIFEST_SUFFIXES:
        _manifest_into(location, out, allow_remote)
    else:
        out.append(open_source(location, allow_remote=allow_remote))


def resolve(inputs: Iterable[str | os.PathLike], allow_remote: bool = False, sniff: bool = False) -> "ItemList":
    """Every image named by ``inputs``, one item each, in input order (see the module docstring). Local folders are
    searched as ``io.discover`` does; duplicates (the same real path, the same tar member) are removed, the first
    kept. FileNotFoundError for an input that does not exist; UsageError for a remote URL without
    ``allow_remote``. ``sniff``: local folders and tar shards are searched by content too (module docstring)."""
    out = ItemList()
    for arg in inputs:
        s = arg if isinstance(arg, str) else os.fspath(arg)
        if is_url(s) and _local_of(s) is not None:
            s = _local_of(s)
        if is_url(s):
            if not allow_remote:
                raise UsageError(f"{printable(s)}: {remote_refused(s)}")
            for loc in _remote_listing(s):
                _expand(loc, out, allow_remote, sniff=sniff)
        else:
            p = Path(s)
            if p.is_file() and _suffix(s) in TAR_SUFFIXES + MANIFEST_SUFFIXES:
                _expand(s, out, allow_remote, sniff=sniff)
            else:
                sniffed: set[Path] = set()
                out.extend(discover([p], sniff=sniff, by_content=sniffed))
                out.by_content.update(map(item_identity, sniffed))
    out.deduplicate()
    return out


def files_to_audit(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Split paths named one by one, as a pre-commit hook passes every staged file, into ``(kept, skipped)``: kept
    are what an audit reads (an image by suffix or by its first bytes, a ``.tar`` shard, and anything that is not a
    regular file: a folder, a missing path or a broken link, which the scan searches or reports as an error row);
    skipped are the other regular files, manifests included (a committed ``.csv`` lists images, it is not one)."""
    kept: list[str] = []
    skipped: list[str] = []
    for arg in paths:
        s = arg if isinstance(arg, str) else os.fspath(arg)
        p = Path(s)
        if is_url(s) or not p.is_file():
            kept.append(s)
        elif _suffix(s) in IMAGE_EXTENSIONS or _suffix(s) in TAR_SUFFIXES or sniff_image(p):
            kept.append(s)
        else:
            skipped.append(s)
    return kept, skipped


def item_identity(item) -> bytes:
    """What makes two items the same image: a local path's bytes, a tar member's shard and offset, else the name."""
    if isinstance(item, TarMember):
        return b"t\0" + item.shard.encode("utf-8", "surrogateescape") + b"\0" + str(item.offset).encode()
    if isinstance(item, Source):
        return b"s\0" + item.name.encode("utf-8", "surrogateescape")
    return b"p" + os.fsencode(item)


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


class ItemList(Sequence):
    """Resolved items, held compactly: a local path is its bytes in one buffer plus an 8-byte offset (no object per
    row); other items (``Source``) are kept as objects. Indexing builds the item (a ``Path`` or the ``Source``);
    slices and ``take`` are views that share the buffer."""

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("q")
        self._objects: list = []
        self._hashes: array | None = array("q")
        self._rows: np.ndarray | None = None  # the entries a view holds (None: all)
        #: identities (``item_identity``) of the items found by content, not by name (``resolve(sniff=True)``)
        self.by_content: set[bytes] = set()

    def append_path(self, path: str | os.PathLike) -> None:
        """Append a local path (as given: no normalisation)."""
        entry = b"p" + (path.encode(_FS_ENCODING, _FS_ERRORS) if type(path) is str else os.fsencode(path))
        self._blob += entry
        self._ends.append(len(self._blob))
        self._hashes.append(hash(entry))

    def append(self, item) -> None:
        if not isinstance(item, Source):
            self.append_path(item)
            return
        self._blob += b"o" + str(len(self._objects)).encode()
        self._ends.append(len(self._blob))
        self._objects.append(item)
        self._hashes.append(hash(item_identity(item)))

    def extend(self, items: Iterable) -> None:
        for it in items:
            self.append(it)

    def _entry(self, k: int) -> bytes:
        return bytes(self._blob[self._ends[k - 1] if k else 0:self._ends[k]])

    def _identity(self, k: int) -> bytes:
        e = self._entry(k)
        return e if e[:1] == b"p" else item_identity(self._objects[int(e[1:])])

    def _item(self, k: int):
        e = self._entry(k)
        return Path(os.fsdecode(e[1:])) if e[:1] == b"p" else self._objects[int(e[1:])]

    def deduplicate(self) -> None:
        """Drop every entry whose identity (``item_identity``) an earlier one has; only equal hashes are compared."""
        h = np.frombuffer(self._hashes, dtype=np.int64) if len(self._hashes) else np.zeros(0, np.int64)
        self._hashes = None
        order = np.argsort(h, kind="stable")  # equal hashes stay in input order
        hs = h[order]
        starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]]) if len(hs) else np.zeros(0, np.int64)
        sizes = np.diff(np.r_[starts, len(hs)])
        drop = []
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            kept: set[bytes] = set()
            for k in order[start:start + size]:
                ident = self._identity(int(k))
                if ident in kept:
                    drop.append(int(k))
                kept.add(ident)
        if drop:
            keep = np.ones(len(self._ends), dtype=bool)
            keep[drop] = False
            self._rows = np.flatnonzero(keep)

    def _view(self, rows: np.ndarray) -> "ItemList":
        v = ItemList.__new__(ItemList)
        v._blob, v._ends, v._objects, v._hashes, v._rows = self._blob, self._ends, self._objects, None, rows
        v.by_content = self.by_content
        return v

    def take(self, positions: Sequence[int]) -> "ItemList":
        """A view of the items at ``positions``."""
        pos = np.asarray(positions, dtype=np.int64)
        return self._view(pos if self._rows is None else self._rows[pos])

    def __len__(self) -> int:
        return len(self._ends) if self._rows is None else len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        return self._item(i if self._rows is None else int(self._rows[i]))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def nbytes(self) -> int:
        """Bytes held for the entries (buffer, offsets, view), not counting ``Source`` objects."""
        return len(self._blob) + self._ends.itemsize * len(self._ends) + (0 if self._rows is None
                                                                           else self._rows.nbytes)


def item_ref(item) -> str:
    """A text form of an item that ``from_ref`` turns back into the same item (a local path's bytes, a tar member's
    place): what a Ray worker is given, as the displayed name cannot always be opened again."""
    if isinstance(item, TarMember):
        return "t" + json.dumps([item.name, item.shard, item.offset, item.size])
    if isinstance(item, Broken):
        return "b" + json.dumps([item.name, item.reason])
    if isinstance(item, RemoteFile):
        return "u" + json.dumps([item.name])
    return "p" + os.fsencode(item).hex()


def from_ref(ref: str):
    """The item of ``item_ref``."""
    kind, body = ref[:1], ref[1:]
    if kind == "p":
        return Path(os.fsdecode(bytes.fromhex(body)))
    args = json.loads(body)
    if kind == "t":
        return TarMember(args[0], shard=args[1], offset=int(args[2]), size=int(args[3]))
    if kind == "b":
        return Broken(args[0], reason=args[1])
    if kind == "u":
        return RemoteFile(args[0])
    raise ValueError(f"not an item reference: {printable(ref, 40)}")


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


def shard(items: Sequence, index: int, count: int) -> Sequence:
    """Part ``index`` (0-based) of ``count``: contiguous blocks in input order, disjoint, covering every item, so
    concatenating the parts in order gives the items back (a view of an ``ItemList``, else a list)."""
    start, stop = shard_bounds(len(items), index, count)
    return items[start:stop] if isinstance(items, ItemList) else list(items[start:stop])


def inputs_digest(items: Sequence) -> str:
    """``COUNT:HASH``: how many items a scan has (all shards) and a short hash of their names, so shards of
    different inputs never merge and a missing row is noticed."""
    h = hashlib.sha256(b"memdetect-inputs-v1\n")
    for it in items:
        h.update(item_name(it).encode("utf-8", "backslashreplace") + b"\n")
    return f"{len(items)}:{h.hexdigest()[:16]}"


__all__ = ["Broken", "ItemList", "MEMBER_SEP", "RemoteFile", "Source", "TarMember", "files_to_audit", "from_ref", "inputs_digest",
           "is_remote", "is_url", "item_digest", "item_identity", "item_name", "item_ref", "manifest_items",
           "open_source", "parse_shard", "read_item", "remote_refused", "resolve", "shard", "shard_bounds",
           "tar_members", "upload", "open_binary"]
