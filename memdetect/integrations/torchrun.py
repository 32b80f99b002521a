"""Several processes, one report: ``torchrun`` and ``accelerate launch`` run ``memdetect scan`` once per rank.

    torchrun --nproc-per-node 8 -m memdetect scan gen/ -o report.csv
    accelerate launch -m memdetect scan gen/ -o report.csv          # also across nodes (--num_machines ...)

The rank and world size come from the launchers' standard environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` / ``MASTER_PORT``). Each rank scores a disjoint, deterministic part of the inputs (contiguous blocks
in input order, ``sources.shard``), on ``cuda:LOCAL_RANK`` when there are GPUs, and writes its own report and
journal (``report.rank1of8.csv`` and ``report.rank1of8.csv.journal.jsonl``), so a killed run resumes per rank with
the same number of processes. The ranks then hand their rows to rank 0 over a gloo process group (CPU: no GPU
collective is needed, and it works across nodes), which checks them like ``memdetect merge`` and writes the one
report, with the rows and order of a single process. Only rank 0 prints. The ranks wait for the slowest one for at
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


class _Group:
    """A gloo process group for the gather: the default one when it is gloo, else a new gloo group (an
    ``accelerate`` program may already have initialised NCCL). Destroyed on exit only if made here."""

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

    def __exit__(self, *exc):
        if self.created and self.dist.is_initialized():
            self.dist.destroy_process_group()
        return False


def scan_distributed(detector, paths, *, output, w: World, html=None, **scan_kwargs):
    """This rank's part of a scan of ``paths`` (``memdetect.workflows.scan.scan`` with ``shard=(rank, size)`` and the rank's
    own report and journal), then rank 0 gathers every part and writes ``output``. Returns the merged
    ``ScanResult`` on rank 0 and this rank's own result elsewhere."""
    from dataclasses import replace

    from ..store import report
    from ..workflows.html_report import write_html
    from ..workflows.merge import Part, mark_shard, merge_parts
    from ..workflows.scan import scan

    if output is None:
        raise UsageError("a scan under torchrun / accelerate needs --output: each rank keeps its part and journal "
                         "beside it, and rank 0 writes the report there")
    with _Group() as g:  # joined before the scan: a launcher's misconfiguration fails before any image is scored
        mine = scan(detector, paths, output=rank_output(output, w.rank, w.size), shard=(w.rank, w.size),
                    **scan_kwargs)
        settings = mine.settings_dict
        frame, marked = mark_shard(mine.frame, settings, (w.rank, w.size), mine.inputs)
        part = (Part(frame, marked, f"rank {w.rank}"), mine.resumed, mine.computed, mine.rejected)
        gathered = [None] * w.size if w.rank == 0 else None
        g.dist.gather_object(part, gathered, dst=0, group=g.group)
    if w.rank != 0:
        return mine
    merged, merged_settings = merge_parts([p for p, *_ in gathered])
    report.write_anywhere(merged, output, merged_settings)
    html_path = write_html(merged, html, merged_settings) if html is not None else None
    log.info("rank 0 merged %d parts into %s", w.size, output)
    return replace(mine, frame=merged, files=(), resumed=sum(r for _, r, _, _ in gathered),
                   computed=sum(c for *_, c, _ in gathered), rejected=sum(x for *_, x in gathered), output=output,
                   html=html_path, shard=None)


__all__ = ["World", "rank_device", "rank_output", "scan_distributed", "world"]
