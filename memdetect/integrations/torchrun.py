"""Several processes, one report: ``torchrun`` and ``accelerate launch`` run ``memdetect scan`` once per rank.

    torchrun --nproc-per-node 8 -m memdetect scan gen/ -o report.csv
    accelerate launch -m memdetect scan gen/ -o report.csv          # also across nodes (--num_machines ...)

The rank and world size come from the launchers' standard environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` / ``MASTER_PORT``). Each rank scores a disjoint, deterministic part of the inputs (contiguous blocks
in input order, ``sources.shard``), on ``cuda:LOCAL_RANK`` when there are GPUs, and writes its own report and
journal (``report.rank1of8.csv`` and ``report.rank1of8.csv.journal.jsonl``), so a killed run resumes per rank with
the same number of processes. The ranks then hand their rows to rank 0 over a gloo process group (CPU: no GPU
collective is needed, and it works across nodes), which checks them like ``memdetect merge`` and writes the one
report, with the rows and order of a single process (``memdetect.workflows.scan.scan(..., engine="torchrun")``
uses this module's ``world`` and ``Group``). Only rank 0 prints. The ranks wait for the slowest one for at
most ``MEMDETECT_DIST_TIMEOUT`` seconds (default 86400).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..errors import UsageError
from ..text import printable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 86400


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int


def world(environ=None) -> World | None:
    """This process's place among several launched by torchrun / accelerate, or None when it runs alone."""
    env = os.environ if environ is None else environ
    raw = env.get("WORLD_SIZE")
    if raw in (None, ""):
        return None
    try:
        size = int(raw)
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers, got {printable(raw, 20)!r}, "
                         f"{printable(env.get('RANK'), 20)!r}, {printable(env.get('LOCAL_RANK'), 20)!r}") from None
    if size <= 1:
        return None
    if not 0 <= rank < size:
        raise UsageError(f"RANK {rank} is outside 0..{size - 1} (WORLD_SIZE {size})")
    return World(rank, size, local)


def rank_output(output: str | os.PathLike, rank: int, size: int) -> str | Path:
    """Where rank ``rank`` keeps its part of ``output``: ``report.csv`` -> ``report.rank1of2.csv``."""
    s = str(output)
    stem, suffix = os.path.splitext(s)
    part = f"{stem}.rank{rank + 1}of{size}{suffix}"
    return part if isinstance(output, str) else Path(part)


def rank_device(device: str, w: World) -> str:
    """``auto`` / ``cuda`` -> this rank's GPU (``cuda:LOCAL_RANK``, modulo the GPUs visible) when there are GPUs."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank % torch.cuda.device_count()}"
    return device


def _timeout() -> timedelta:
    raw = os.environ.get("MEMDETECT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        return timedelta(seconds=float(raw))
    except ValueError:
        raise UsageError(f"MEMDETECT_DIST_TIMEOUT must be a number of seconds, got {printable(raw, 20)!r}") from None


class Group:
    """A gloo process group for the gather: the default one when it is gloo, else a new gloo group (an
    ``accelerate`` program may already have initialised NCCL). Destroyed on exit only if made here. Joined before a
    rank scores anything, so a launcher's misconfiguration fails before any image is read."""

    def __enter__(self):
        import torch.distributed as dist

        self.dist = dist
        self.created = not dist.is_initialized()
        if self.created:
            dist.init_process_group("gloo", timeout=_timeout())
            self.group = None
        elif dist.get_backend() == "gloo":
            self.group = None
        else:
            self.group = dist.new_group(backend="gloo", timeout=_timeout())
        return self

    def gather(self, obj, w: World) -> list | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
        gathered = [None] * w.size if w.rank == 0 else None
        self.dist.gather_object(obj, gathered, dst=0, group=self.group)
        return gathered

    def __exit__(self, *exc):
        if self.created and self.dist.is_initialized():
            self.dist.destroy_process_group()
        return False


__all__ = ["Group", "World", "rank_device", "rank_output", "world"]
