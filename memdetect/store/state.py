"""memdetect's own state, kept outside the scanned tree and the repository: the journal secret, audit journals and
the cache of weight-file hashes.

Why: a resume journal says "these images were already scored, with these scores". Whoever can write it decides
what a rerun reuses, so a journal committed in a pull request (or edited by anyone) must never be trusted. memdetect
therefore signs every journal row it writes with a secret that lives in the state directory, and ``memdetect
audit`` keeps its journals there too, keyed by the scan's settings, the weights' content hash and the report path.

Layout (``StateDir``; default ``$MEMDETECT_STATE_DIR``, else ``$XDG_CACHE_HOME/memdetect/state``, else
``~/.cache/memdetect/state``), created 0700:

    secret                      64 hex characters (32 random bytes), then memdetect's marker line; created 0600
                                with O_EXCL, never rewritten
    journals/<id>.jsonl         audit journals; <id> = sha256(settings fingerprint with weights, report path)[:32]
    weights.json                sha256 of weight files, cached by real path, size, mtime, ctime, inode and device

The directory must belong to the current user and not be writable by group or others; the secret must be a regular
file (not a link) of the current user that nobody else may read. Anything else is a one-line ``UsageError`` that
says how to fix it: memdetect does not trust a secret others could read or replace.

Whose secret: a secret is only worth trusting if nobody else chose it, and a pull request can commit a state
directory (secret included) to the repository under audit. memdetect therefore writes a marker into every secret it
creates: ``created-by-memdetect <inode> <HMAC of the inode with the secret>``, bound to the file it created (a
checkout or copy of the file gets another inode, which nobody can choose in advance). ``audit --resume`` trusts the
secret only when memdetect created it here (``check_trusted``): the marker verifies and the state directory is not
inside a git checkout being audited (``checkout_roots``); anything else is refused with one line. A state directory
inside a scanned folder is refused by every scan (``check_outside``). A secret is only ever created when there is
none; nothing in a state directory that the new secret did not sign is trusted, so creating one in an existing
directory (e.g. after deleting a bad secret) gives an attacker nothing.

The weights' hash (``files_digest``): sha256 over the name and sha256 of each weight file the adapter loaded
(``Adapter.weight_files``). Hashing Stable Diffusion's 4 GB takes seconds, so each file's hash is cached by its
real path and ``stat`` (size, mtime_ns, ctime_ns, inode, device): a file rewritten in any way (ctime cannot be set
back by a user) is hashed again. The cache is best-effort: when the state directory cannot be written the files are
hashed every run.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Iterable

from ..errors import UsageError
from .io import display_path

log = logging.getLogger(__name__)

ENV = "MEMDETECT_STATE_DIR"
SECRET = "secret"
#: The secret file's second line, written by memdetect when it creates the secret (see the module docstring).
MARKER = "created-by-memdetect"
_MARKER_CONTEXT = b"memdetect state secret v1\n"
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
        self._own = False  # the secret carries memdetect's marker for this very file
        self._created = False  # this object created the secret

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
                self._secret, self._own = self._read_secret(path)
            except FileNotFoundError:
                self._created = self._create_secret(path)
                self._secret, self._own = self._read_secret(path)
        return self._secret

    # -- whose secret ----------------------------------------------------------------------------------------------
    def check_outside(self, inputs: Iterable[str | os.PathLike]) -> None:
        """Refuse a state directory inside a scanned folder: its secret would sit in the tree under audit."""
        state = os.path.realpath(self.path)
        for arg in inputs:
            folder = _local(arg)
            if folder is None or not os.path.isdir(folder):
                continue
            real = os.path.realpath(folder)
            if state == real or state.startswith(real.rstrip(os.sep) + os.sep):
                raise UsageError(f"state directory {display_path(self.path)} is inside the scanned input "
                                 f"{display_path(folder)}, where whoever wrote the inputs could have written it; "
                                 f"choose a --state-dir outside what is scanned (or set {ENV})")

    def check_trusted(self, inputs: Iterable[str | os.PathLike]) -> None:
        """For ``audit --resume``: the secret must be one memdetect created here. A secret made now is; an existing
        one needs memdetect's marker for this very file, and the state directory must not be inside a git checkout
        being audited (``checkout_roots`` of ``inputs``), where a pull request could have committed it."""
        self.secret()
        if self._created:
            return
        name = display_path(self.path)
        if not self._own:
            raise UsageError(f"the journal secret in {name} is one memdetect did not create (no marker for this file: "
                             f"written by someone else, copied, or made by an older memdetect); audit --resume trusts "
                             f"only its own: delete {name} (memdetect makes a new one) or audit without --resume")
        state = os.path.realpath(self.path)
        for root in checkout_roots(inputs):
            if state == root or state.startswith(root.rstrip(os.sep) + os.sep):
                raise UsageError(f"the state directory {name} is inside the git checkout {display_path(root)} being "
                                 f"audited, where a pull request could have committed a secret that memdetect did "
                                 f"not create; audit --resume needs a --state-dir outside it (or set {ENV})")

    def _create_secret(self, path: Path) -> bool:
        """Write a new secret and its marker to a private temporary file, then link it into place: the link fails
        when another run made one first, and no reader ever sees a half-written secret. True when this call made
        the secret."""
        tmp = path.with_name(f".{SECRET}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        key = secrets.token_bytes(32)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_secret_text(key, os.fstat(f.fileno()).st_ino))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # the same file, the same inode: the marker holds
                return True
            except FileExistsError:
                return False  # another run created it first: use theirs
            except OSError:  # a filesystem without hard links: create it directly, exclusively
                try:
                    fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
                except FileExistsError:
                    return False
                with os.fdopen(fd2, "w") as f:
                    f.write(_secret_text(key, os.fstat(f.fileno()).st_ino))
                    f.flush()
                    os.fsync(f.fileno())
                return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    @staticmethod
    def _read_secret(path: Path) -> tuple[bytes, bool]:
        """The secret, and whether it carries memdetect's marker for this very file."""
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
            lines = f.read(1024).splitlines()
        try:
            key = bytes.fromhex(lines[0].strip().decode("ascii")) if lines else b""
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) != 32:
            raise UsageError(f"journal secret {name} is damaged; delete it (memdetect makes a new one)")
        own = len(lines) > 1 and hmac.compare_digest(lines[1].strip(), _marker(key, st.st_ino).encode())
        return key, own

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


def _marker(key: bytes, inode: int) -> str:
    """The marker line memdetect writes into a secret it creates: bound to the file's inode by an HMAC."""
    mac = hmac.new(key, _MARKER_CONTEXT + str(inode).encode(), hashlib.sha256).hexdigest()
    return f"{MARKER} {inode} {mac}"


def _secret_text(key: bytes, inode: int) -> str:
    return f"{key.hex()}\n{_marker(key, inode)}\n"


def _local(arg: str | os.PathLike) -> str | None:
    """The local path of a scan input (None for a URL other than ``file://``)."""
    s = os.fsdecode(arg) if not isinstance(arg, str) else arg
    if s.startswith("file://"):
        return s[len("file://"):]
    return None if "://" in s else s


def checkout_roots(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """The git checkouts (folders holding ``.git``) around the local ``inputs`` and the working directory: where a
    pull request under audit can put files. Real paths."""
    roots: list[str] = []
    for start in [os.getcwd(), *(p for p in map(_local, inputs) if p is not None)]:
        here = os.path.realpath(start)
        if not os.path.isdir(here):
            here = os.path.dirname(here)
        while True:
            if os.path.lexists(os.path.join(here, ".git")):
                if here not in roots:
                    roots.append(here)
                break
            parent = os.path.dirname(here)
            if parent == here:
                break
            here = parent
    return roots


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["ENV", "MARKER", "StateDir", "checkout_roots", "default_state_dir"]
