"""memdetect's own state, kept outside the scanned tree and the repository: the journal secret, audit journals and
the cache of weight-file hashes.

Why: a resume journal says "these images were already scored, with these scores". Whoever can write it decides
what a rerun reuses, so a journal committed in a pull request (or edited by anyone) must never be trusted. memdetect
therefore signs every journal row it writes with a secret that lives in the state directory, and ``memdetect
audit`` keeps its journals there too, keyed by the scan's settings, the weights' content hash and the report path.

Layout (``StateDir``; default ``$MEMDETECT_STATE_DIR``, else ``$XDG_CACHE_HOME/memdetect/state``, else
``~/.cache/memdetect/state``), created 0700:

    secret                      64 hex characters (32 random bytes), created 0600 with O_EXCL, never rewritten
    journals/<id>.jsonl         audit journals; <id> = sha256(settings fingerprint with weights, report path)[:32]
    weights.json                sha256 of weight files, cached by real path, size, mtime, ctime, inode and device

The directory must belong to the current user and not be writable by group or others; the secret must be a regular
file (not a link) of the current user that nobody else may read. Anything else is a one-line ``UsageError`` that
says how to fix it: memdetect does not trust a secret others could read or replace.

The weights' hash (``files_digest``): sha256 over the name and sha256 of each weight file the adapter loaded
(``Adapter.weight_files``). Hashing Stable Diffusion's 4 GB takes seconds, so each file's hash is cached by its
real path and ``stat`` (size, mtime_ns, ctime_ns, inode, device): a file rewritten in any way (ctime cannot be set
back by a user) is hashed again. The cache is best-effort: when the state directory cannot be written the files are
hashed every run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Iterable

from .errors import UsageError
from .io import display_path

log = logging.getLogger(__name__)

ENV = "MEMDETECT_STATE_DIR"
SECRET = "secret"
WEIGHTS_CACHE = "weights.json"
#: Entries kept in the weight-hash cache (the most recently used).
MAX_CACHED_FILES = 4096
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def default_state_dir() -> Path:
    """``$MEMDETECT_STATE_DIR``, else ``$XDG_CACHE_HOME/memdetect/state``, else ``~/.cache/memdetect/state``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache and Path(cache).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "memdetect" / "state"


def _euid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


class StateDir:
    """One state directory (``path``; default ``default_state_dir()``). Nothing is created until it is used."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path is not None else default_state_dir()
        self._secret: bytes | None = None

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    # -- the directory -----------------------------------------------------------------------------------------
    def ensure(self) -> Path:
        """Create the directory (0700) if needed and check that it is safe to keep a secret in."""
        name = display_path(self.path)
        try:
            self.path.mkdir(parents=True, mode=0o700, exist_ok=True)
            st = os.stat(self.path)
        except FileExistsError:
            raise UsageError(f"state directory {name} exists and is not a folder; choose another --state-dir") \
                from None
        except OSError as e:
            raise UsageError(f"cannot create the state directory {name} ({e.strerror or e}); choose a writable "
                             f"--state-dir (or set {ENV})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"state directory {name} is not a folder; choose another --state-dir")
        euid = _euid()
        if euid is not None and st.st_uid != euid:
            raise UsageError(f"state directory {name} belongs to another user (uid {st.st_uid}); choose a "
                             f"--state-dir of your own")
        if euid is not None and st.st_mode & 0o022:
            raise UsageError(f"state directory {name} is writable by others; run `chmod 700 {name}` or choose "
                             f"another --state-dir")
        return self.path

    # -- the secret ----------------------------------------------------------------------------------------------
    def secret(self) -> bytes:
        """The directory's 32-byte journal secret, created on first use (0600, O_EXCL; see the module docstring)."""
        if self._secret is None:
            path = self.ensure() / SECRET
            try:
                self._secret = self._read_secret(path)
            except FileNotFoundError:
                self._create_secret(path)
                self._secret = self._read_secret(path)
        return self._secret

    def _create_secret(self, path: Path) -> None:
        """Write a new secret to a private temporary file, then link it into place: the link fails when another run
        made one first, and no reader ever sees a half-written secret."""
        tmp = path.with_name(f".{SECRET}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another run created it first: use theirs
            except OSError:  # a filesystem without hard links: create it directly, exclusively
                try:
                    fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
                except FileExistsError:
                    return
                with os.fdopen(fd2, "w") as f:
                    f.write(Path(tmp).read_text())
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            Path(tmp).unlink(missing_ok=True)

    @staticmethod
    def _read_secret(path: Path) -> bytes:
        name = display_path(path)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(f"journal secret {name} is a symbolic link; delete it (memdetect makes a new "
                                 f"one)") from None
            if e.errno == errno.ENOENT:
                raise FileNotFoundError(path) from None
            raise UsageError(f"cannot read the journal secret {name} ({e.strerror or e})") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            euid = _euid()
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"journal secret {name} is not a regular file; delete it")
            if euid is not None and st.st_uid != euid:
                raise UsageError(f"journal secret {name} belongs to another user (uid {st.st_uid}); delete it")
            if euid is not None and st.st_mode & 0o077:
                raise UsageError(f"journal secret {name} can be read by others (mode {st.st_mode & 0o777:o}); "
                                 f"delete it (memdetect makes a new one; earlier journals are then recomputed)")
            text = f.read(256).strip()
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) != 32:
            raise UsageError(f"journal secret {name} is damaged; delete it (memdetect makes a new one)")
        return key

    # -- journals ------------------------------------------------------------------------------------------------
    def journal_path(self, fingerprint: str, report: str | os.PathLike) -> Path:
        """Where an audit keeps the journal of ``report`` for the settings (and weights) ``fingerprint``."""
        where = str(report) if "://" in str(report) else os.path.realpath(report)  # a URL is its own name
        ident = json.dumps({"fingerprint": fingerprint, "report": where}, sort_keys=True)
        return self.ensure() / "journals" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.jsonl"

    # -- weight files --------------------------------------------------------------------------------------------
    def files_digest(self, files: Iterable[str | os.PathLike]) -> str:
        """sha256 over the names and contents of ``files`` (in the order given), each file's hash cached."""
        files = list(files)
        cache, writable = self._load_cache()
        h = hashlib.sha256(b"memdetect-weights-v1\n")
        changed = False
        for f in files:
            real = os.path.realpath(f)
            try:
                st = os.stat(real)
            except OSError as e:
                raise UsageError(f"cannot read the weight file {display_path(f)} ({e.strerror or e})") from None
            sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
            entry = cache.pop(real, None)
            if not (isinstance(entry, list) and len(entry) == 6 and entry[:5] == sig and isinstance(entry[5], str)):
                log.info("hashing weight file %s (%.0f MB)", display_path(f), st.st_size / 1e6)
                entry = [*sig, _sha256_file(real)]
                changed = True
            cache[real] = entry  # re-inserted: the most recently used entries are kept
            h.update(f"{Path(f).name}\t{entry[5]}\n".encode("utf-8", "backslashreplace"))
        if changed and writable:
            self._save_cache(cache)
        return h.hexdigest()

    def _load_cache(self) -> tuple[dict, bool]:
        try:
            self.ensure()
        except UsageError as e:
            log.info("weight hashes are not cached: %s", e)
            return {}, False
        path = self.path / WEIGHTS_CACHE
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read(64 * 2**20))
            return (data if isinstance(data, dict) else {}), True
        except (OSError, ValueError):
            return {}, True

    def _save_cache(self, cache: dict) -> None:
        keep = dict(list(cache.items())[-MAX_CACHED_FILES:])
        path = self.path / WEIGHTS_CACHE
        tmp = path.with_name(f".{WEIGHTS_CACHE}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(keep, f)
            os.replace(tmp, path)
        except OSError as e:
            log.info("cannot write the weight-hash cache %s: %s", path, e)
            Path(tmp).unlink(missing_ok=True)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["ENV", "StateDir", "default_state_dir"]
