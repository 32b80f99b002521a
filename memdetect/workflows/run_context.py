"""The context of a run, for the HTML report's reviewers: the command line, the UTC time, memdetect's version, the
config file (name and SHA-256 of its bytes) and the git commit of the scanned checkout.

The commit is read from the ``.git`` files (``HEAD``, the ref it names, ``packed-refs``; a worktree's ``.git`` file
and ``commondir`` are followed), never by running ``git``: the scanned checkout may be untrusted, and its git config
could name programs that ``git`` runs. Anything that cannot be read is left out (None), never an error.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from .._version import __version__

_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def _read(path: Path, limit: int = 1 << 20) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def _git_dir(start: Path) -> Path | None:
    """The git directory of the checkout holding ``start`` (a ``.git`` folder, or the one a ``.git`` file names)."""
    here = start if start.is_dir() else start.parent
    for folder in (here, *here.parents):
        dot = folder / ".git"
        if dot.is_dir():
            return dot
        if dot.is_file():
            text = _read(dot, 4096) or ""
            if text.startswith("gitdir:"):
                target = Path(text[len("gitdir:"):].strip())
                return target if target.is_absolute() else (folder / target)
            return None
    return None


def git_commit(path: str | os.PathLike) -> str | None:
    """The commit checked out in the git checkout holding ``path`` (40 or 64 hex digits), or None."""
    try:
        gitdir = _git_dir(Path(os.path.abspath(path)))
        if gitdir is None:
            return None
        head = (_read(gitdir / "HEAD", 4096) or "").strip()
        if _SHA.match(head):
            return head
        if not head.startswith("ref:"):
            return None
        ref = head[len("ref:"):].strip()
        if ".." in ref.split("/"):
            return None
        common = gitdir
        named = (_read(gitdir / "commondir", 4096) or "").strip()
        if named:
            common = Path(named) if Path(named).is_absolute() else gitdir / named
        for folder in dict.fromkeys((gitdir, common)):
            value = (_read(folder / ref, 4096) or "").strip()
            if _SHA.match(value):
                return value
        for line in (_read(common / "packed-refs") or "").splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref and _SHA.match(sha):
                return sha
    except (OSError, ValueError):
        return None
    return None


def file_sha256(path: str | os.PathLike) -> str | None:
    """The SHA-256 of a file's bytes, or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed (``memdetect`` for the program, arguments shell-quoted)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "memdetect"
    return " ".join(["memdetect", *map(shlex.quote, argv[1:])])


def run_context(paths: Iterable[str | os.PathLike] = (), *, config: str | os.PathLike | None = None,
                argv: Sequence[str] | None = None, now: datetime | None = None) -> dict:
    """``command``, ``time_utc``, ``memdetect``, ``config`` (file name), ``config_sha256``, ``git_commit`` (of the
    first local path's checkout that has one)."""
    commit = None
    for p in list(paths)[:16]:  # the first inputs: a checkout is found from any of them
        if isinstance(p, str) and "://" in p:
            continue
        commit = git_commit(p)
        if commit:
            break
    return {"command": command_line(argv),
            "time_utc": (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "memdetect": __version__,
            "config": Path(config).name if config is not None else None,
            "config_sha256": file_sha256(config) if config is not None else None,
            "git_commit": commit}


__all__ = ["command_line", "file_sha256", "git_commit", "run_context"]
