"""Process-level settings that keep a CPU scan at the arithmetic floor without keeping its peak memory for good.

The one that matters: glibc's ``malloc`` serves every block above 128 KiB-32 MiB with a fresh ``mmap`` and gives
it back to the kernel with ``munmap`` on free. A 512 px SD1.4 scan allocates and frees 134 MB activation tensors
dozens of times per image, so every layer's output is written into pages the kernel must fault in and zero first:
measured on 2 CPU cores with SD1.4's real architecture (torch.profiler, one 512 px image), that was 31% of the
scan: 13.6 s per image, 9.4 s once freed memory is kept. ``MEMDETECT_RETAIN_MEMORY=0 python benchmarks/perf.py
--models sd14`` measures the scan without it. ``retain_freed_memory`` tells glibc to serve large blocks from its
heap (``M_MMAP_MAX`` 0), so a freed activation's pages are reused by the next layer.

What the heap keeps is bounded by one batch's working set, not by the process's peak: ``M_TRIM_THRESHOLD`` and
``M_TOP_PAD`` are set to it (``set_working_set``; the ``Detector`` sizes it from its model's largest activation and
its batch, ``DEFAULT_WORKING_SET`` until then), so free memory beyond one batch's worth at the top of the heap goes
back to the kernel as it is freed, and ``bound_heap`` (called by the ``Detector`` after every batch) hands back every
free page (glibc's ``malloc_trim``, ``release_free_memory``) once the process holds more than that above its
loaded model: a freed block below a live one is not at the top, and glibc would keep it. The ``Detector`` also
releases free memory after loading and pruning its model, at the end of a scan and before it forks DataLoader
workers. (Measured before the bound, with trimming off: SD1.4 kept 20.9 GB resident
after a scan that peaked there.)

It holds for the whole process, so the library never sets it by itself: the ``memdetect`` command calls
``retain_freed_memory`` for CPU scans, and a program that embeds memdetect opts in by calling
``memdetect.retain_freed_memory()`` (and can undo it with ``restore_allocator``). ``MEMDETECT_RETAIN_MEMORY=0``
makes the call a no-op. The state is part of a scan's ``Settings`` (``allocator``; the working-set bound is not:
it changes no score). Other C libraries are left as they are.

One interaction needs care: a process forked while its heap holds gigabytes of freed-but-retained pages shares
them copy-on-write, and every page the parent then reuses is copied, doubling physical memory (measured: a
DataLoader worker forked after an SD1.4 run was OOM-killed on a 24 GiB machine). Hence the release before forking.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # <malloc.h>: free memory above this at the heap's top goes back to the kernel
_M_TOP_PAD = -2  # <malloc.h>: what a trim leaves at the top (and the extra asked of the kernel when growing)
_M_MMAP_MAX = -4  # <malloc.h>: how many blocks may be served by mmap at once (0: none; the heap serves all)
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD, _DEFAULT_TOP_PAD = 65536, 128 * 1024, 128 * 1024  # mallopt(3): defaults
_MAX_INT = 2**31 - 1  # mallopt takes an int
#: what the heap keeps free until a detector says how much one batch needs
DEFAULT_WORKING_SET = 256 * 2**20
#: ``bound_heap`` trims above this many working sets
TRIM_SLACK = 1.5
ENV = "MEMDETECT_RETAIN_MEMORY"
#: ``allocator_state()`` values, as ``Settings.allocator`` records them
RETAINED, DEFAULT = "retain-freed", "default"

_state: dict[str, bool | int] = {}


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The running glibc, or None on other C libraries / platforms (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Keep freed large blocks in the process for reuse (glibc only; process-wide). True when in effect.

    Idempotent and cheap; a no-op returning False when ``MEMDETECT_RETAIN_MEMORY=0`` or the C library is not glibc.
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if "done" in _state:
        return _state["done"]
    libc = glibc()
    ok = False
    if libc is not None:
        ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and _bound(libc, DEFAULT_WORKING_SET)
        if not ok:
            log.debug("mallopt refused; the allocator is left as it was")
    _state["done"] = ok
    if ok:
        _state["working_set"] = DEFAULT_WORKING_SET
    return ok


def _bound(libc, nbytes: int) -> bool:
    n = int(min(max(nbytes, _DEFAULT_TRIM_THRESHOLD), _MAX_INT))
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, n)) and bool(libc.mallopt(_M_TOP_PAD, n))


def set_working_set(nbytes: int) -> bool:
    """While freed memory is retained, keep at most ``nbytes`` of it free at the heap's top (glibc's trim threshold
    and top pad; at least 128 KiB, at most 2 GiB - 1): one batch's working set. True when applied; a no-op
    otherwise. It replaces ``DEFAULT_WORKING_SET``; after that the largest size asked for wins (detectors may share
    a process)."""
    libc = glibc()
    if not _state.get("done") or libc is None:
        return False
    nbytes = max(int(nbytes), int(_state.get("sized", 0)))
    if not _bound(libc, nbytes):
        return False
    _state["working_set"] = _state["sized"] = nbytes
    _state["baseline"] = resident_bytes()
    return True


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def bound_heap() -> bool:
    """Between batches: when the process holds more than ``TRIM_SLACK`` working sets above what it held when the
    working set was set (the loaded model), hand the heap's free pages back (``release_free_memory``). True when it
    did. (The slack covers the estimate's error: trimming after every batch would fault the next one's pages in
    again.)

    The trim threshold alone cannot guarantee the bound: a freed block below a live one is not at the heap's top,
    and glibc returns only the top on free. This check costs one read of ``/proc/self/statm``."""
    if not _state.get("done") or "baseline" not in _state:
        return False
    if resident_bytes() <= int(_state["baseline"]) + TRIM_SLACK * int(_state["working_set"]):
        return False
    return release_free_memory()


def working_set() -> int | None:
    """The bound ``set_working_set`` applied (None while freed memory is not retained)."""
    return int(_state["working_set"]) if _state.get("done") else None


def retained() -> bool:
    """Whether ``retain_freed_memory`` is in effect in this process."""
    return bool(_state.get("done"))


def allocator_state() -> str:
    """``"retain-freed"`` while freed memory is retained, else ``"default"`` (recorded in a scan's ``Settings``)."""
    return RETAINED if retained() else DEFAULT


def restore_allocator() -> bool:
    """Undo ``retain_freed_memory``: glibc's documented defaults again (mmap for large blocks, trimming at 128 KiB),
    and free pages handed back (glibc's dynamic mmap threshold stays off once set). True when the allocator was
    changed back; the next ``retain_freed_memory`` applies it again."""
    was = retained()
    _state.clear()
    libc = glibc()
    if not was or libc is None:
        return False
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.mallopt(_M_TOP_PAD, _DEFAULT_TOP_PAD)
    libc.malloc_trim(0)
    return True


def release_free_memory() -> bool:
    """Return the heap's free pages to the kernel now (glibc ``malloc_trim(0)``), whatever the allocator setting:
    after loading, between phases, before forking.

    True when glibc reported memory released. Safe to call any time; the next allocations fault pages in again.
    """
    libc = glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


#: below this many parameters (every network of the model), a CPU forward's operations are too small to be worth
#: splitting across threads: measured on the tiny SD of the tests on a busy 2-core machine, one UNet call took 68 ms
#: with 1 thread and 390 ms with 2 (benchmarks/RESULTS.md, "bench laion on a tiny SD")
SMALL_MODEL_PARAMS = 20_000_000


def one_thread_for_small_models(modules, device) -> bool:
    """On a CPU, run a model of fewer than ``SMALL_MODEL_PARAMS`` parameters with one torch thread (process-wide:
    for commands such as ``memdetect bench``, whose process is the run). Returns whether it changed the setting;
    ``MEMDETECT_KEEP_THREADS=1`` keeps torch's own choice."""
    import torch

    if os.environ.get("MEMDETECT_KEEP_THREADS") or torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        return False
    n = sum(p.numel() for m in modules for p in m.parameters())
    if n >= SMALL_MODEL_PARAMS:
        return False
    log.info("small model (%d parameters) on a CPU: torch uses 1 thread instead of %d (MEMDETECT_KEEP_THREADS=1 "
             "keeps them)", n, torch.get_num_threads())
    torch.set_num_threads(1)
    return True
