"""runtime.retain_freed_memory: freed activation memory is reused instead of faulted in again; the command line opts
in, the library does not, and the state is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memdetect.speed import runtime
from .conftest import REPO

needs_glibc = pytest.mark.skipif(runtime.glibc() is None, reason="mallopt tuning applies to glibc (Linux) only")

# What a layer-by-layer forward does to the allocator: allocate a large activation, write it, free it, repeat.
PROBE = r"""
import json, resource, sys, torch
from memdetect.speed import runtime
on = runtime.retain_freed_memory() if sys.argv[1] in ("retain", "restore") else False
if sys.argv[1] == "restore":
    assert runtime.restore_allocator() is on
    on = runtime.retained()
for _ in range(10):  # warm-up: glibc's heap settles after a few rounds
    x = torch.empty(16 * 2**20)  # 64 MiB
    x.fill_(1.0)
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    y = torch.empty(16 * 2**20)
    y.fill_(1.0)
    del y
print(json.dumps({"on": on, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(script: str, *argv: str, env_value: str | None = None) -> dict:
    """Run ``script`` in a fresh interpreter (the allocator setting is per process); its last line is JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(runtime.ENV, None)
    if env_value is not None:
        env[runtime.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe(mode: str, env_value: str | None = None) -> dict:
    return _run(PROBE, mode, env_value=env_value)


@needs_glibc
def test_retained_memory_is_reused_without_page_faults():
    default = _probe("default")
    retained = _probe("retain")
    assert retained["on"] is True
    # 20 x 64 MiB written into fresh pages is ~330k minor faults (4 KiB pages); reused pages fault (almost) never
    assert default["faults"] > 20 * 16 * 2**20 * 4 / 4096 / 4, default
    assert retained["faults"] * 20 < default["faults"], (retained, default)


@needs_glibc
def test_restore_allocator_undoes_it():
    restored = _probe("restore")
    assert restored["on"] is False
    assert restored["faults"] > 20 * 16 * 2**20 * 4 / 4096 / 4, restored


@needs_glibc
def test_env_switch_leaves_the_allocator_alone():
    off = _probe("retain", env_value="0")
    assert off["on"] is False
    assert off["faults"] > 20 * 16 * 2**20 * 4 / 4096 / 4, off


def test_the_library_leaves_the_allocator_alone_and_the_cli_opts_in(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from memdetect.cli import app
    from memdetect.detector import Detector

    monkeypatch.delenv(runtime.ENV, raising=False)
    det = Detector.from_pretrained("demo", device="cpu")
    assert not runtime.retained() and det.settings.allocator == runtime.DEFAULT
    report = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["scan", str(REPO / "examples" / "demo" / "mem_0001.png"), "--model", "demo",
                                   "--device", "cpu", "--output", str(report), "--quiet"])
    assert res.exit_code == 0, res.output
    expected = runtime.RETAINED if runtime.glibc() is not None else runtime.DEFAULT
    assert runtime.allocator_state() == expected
    assert json.loads(report.read_text())["settings"]["allocator"] == expected  # recorded with the scores
    runtime.restore_allocator()
    assert not runtime.retained()


RELEASE = r"""
import json, torch
from memdetect.speed import runtime
def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) / 1024

runtime.retain_freed_memory()
x = torch.ones(64 * 2**20)  # 256 MiB written
del x
kept = rss_mib()
released = runtime.release_free_memory()
print(json.dumps({"kept": kept, "after": rss_mib(), "released": released}))
"""


@needs_glibc
def test_release_hands_retained_pages_back_before_a_fork():
    r = _run(RELEASE)
    assert r["released"] is True
    assert r["kept"] - r["after"] > 200, r  # the freed 256 MiB stayed resident until released


def test_detector_releases_free_memory_before_starting_workers(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from memdetect.detector import Detector

    calls = []
    monkeypatch.setattr(runtime, "release_free_memory", lambda: calls.append(1) or True)
    for i in range(5):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    det = Detector.from_pretrained("demo", device="cpu", batch_size=2)
    assert calls == [1]  # after loading and pruning
    assert len(det.scan([tmp_path], num_workers=0)) == 5 and calls == [1, 1]  # after the scan
    assert len(det.scan([tmp_path], num_workers=1)) == 5 and calls == [1, 1, 1, 1]  # also before forking


BOUND = r"""
import json, sys, torch
from memdetect.speed import runtime
def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) / 1024

runtime.retain_freed_memory()
assert runtime.working_set() == runtime.DEFAULT_WORKING_SET
runtime.set_working_set(int(sys.argv[1]) * 2**20)
before = rss_mib()
x = torch.ones(128 * 2**20)  # 512 MiB written (one batch's activations), then freed
y = torch.ones(1024)  # a small block allocated later: x is not at the heap's top
del x
trimmed = runtime.bound_heap()  # what the detector calls after every batch
print(json.dumps({"kept": rss_mib() - before, "working_set": runtime.working_set(), "trimmed": trimmed}))
"""


@needs_glibc
def test_the_retained_heap_is_bounded_by_one_batchs_working_set():
    small = _run(BOUND, "64")  # a working set of 64 MiB: what is freed beyond 1.5 x that goes back
    assert small["working_set"] == 64 * 2**20 and small["kept"] < 1.5 * 64 + 30, small
    large = _run(BOUND, "1024")  # 1 GiB: the freed 512 MiB stay for the next batch
    assert large["kept"] > 400 and not large["trimmed"], large


def test_set_working_set_is_a_no_op_unless_memory_is_retained():
    assert not runtime.retained() and runtime.set_working_set(2**30) is False and runtime.working_set() is None
    assert runtime.bound_heap() is False


def test_small_models_run_with_one_cpu_thread(monkeypatch):
    """bench on a tiny model: one torch thread on a CPU (intra-op threads cost many times what they save on a busy
    machine, benchmarks/RESULTS.md); a large model, a GPU or MEMDETECT_KEEP_THREADS=1 keep torch's setting."""
    import torch

    before = torch.get_num_threads()
    try:
        tiny, large = torch.nn.Linear(10, 10), torch.nn.Linear(5000, 4001)  # 110 and 20,009,001 parameters
        torch.set_num_threads(2)
        assert not runtime.one_thread_for_small_models([large], "cpu") and torch.get_num_threads() == 2
        assert not runtime.one_thread_for_small_models([tiny], "cuda") and torch.get_num_threads() == 2
        monkeypatch.setenv("MEMDETECT_KEEP_THREADS", "1")
        assert not runtime.one_thread_for_small_models([tiny], "cpu") and torch.get_num_threads() == 2
        monkeypatch.delenv("MEMDETECT_KEEP_THREADS")
        assert runtime.one_thread_for_small_models([tiny], torch.device("cpu")) and torch.get_num_threads() == 1
        assert not runtime.one_thread_for_small_models([tiny], "cpu")  # already one
    finally:
        torch.set_num_threads(before)
