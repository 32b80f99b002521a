"""Hostile checkpoints (issue 15, "Bounded loading"): every class is refused with exit code 2, one line on stderr and
no traceback, within 20 s and 1 GB, by the real CLI.

How the CLI runs here. Importing memdetect's scan path (torch, diffusers, pandas) costs 3-9 s of a loaded 2-core
machine, more than all the cases together, so a helper process (``_ZYGOTE``) imports it once and forks one child per
case. The child sets RLIMIT_AS (its address space at the fork + 1 GiB) and RLIMIT_CPU (20 s), points fds 1 and 2 at
files, and runs ``memdetect/__main__.py`` through ``runpy`` with the case's argv: the code path of
``python -m memdetect scan ...``. The helper reaps it with ``wait4``, which gives its exit status, CPU time and peak
RSS; that peak, imports included (about 300-400 MB), must stay below 1 GiB. One case also runs as a fresh
``python -m memdetect`` with the limits set in ``preexec_fn``, to check the entry point itself.

The hostile files are built here, mostly as raw pickle opcodes (``emit``), some from the NVlabs-format writer of
``test_edm`` with other tensor views.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import resource
import select
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from memdetect.models.edm import safe_pickle
from memdetect.errors import ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError
from memdetect.models import edm
from memdetect.models.edm.safe_pickle import Limits, printable, short_repr

from .test_edm import SMALL, EvilStorage, small_net, write_nvlabs_pickle

HINT = "(set MEMDETECT_DEBUG=1 for the full traceback)"
GiB = 1 << 30
LIMIT_S = 20  # CPU seconds (RLIMIT_CPU) and wall seconds a case may take
HOSTILE_NAME = "[/x][bold]\x1b]0;pwned\x07\x1b[31m\u202eevil\r\nmemdetect: scan OK, 0 flagged"

# -- running the CLI -------------------------------------------------------------------------------------------------

_ZYGOTE = r'''
import json, os, resource, runpy, signal, sys, time, traceback
import memdetect.cli, memdetect.config, memdetect.detector, memdetect.models.edm, safetensors.torch  # scan path
import diffusers.utils.logging  # imported by the CLI's root callback

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmSize", "VmPeak", "VmRSS")}

print(json.dumps(status()), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    base = status()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            cap = base["VmSize"] + job["mem"]
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            resource.setrlimit(resource.RLIMIT_CPU, (job["cpu"], job["cpu"]))
            signal.alarm(job["wall"])
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(f, fd)
                os.close(f)
            os.chdir(job["cwd"])
            sys.argv = ["memdetect", *job["argv"]]
            try:
                runpy.run_module("memdetect", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:  # what the interpreter does with it
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, st, ru = os.wait4(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(st), "wall": time.monotonic() - start,
                      "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss * 1024}), flush=True)
'''


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MEMDETECT_DEBUG"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


@dataclass
class Run:
    argv: list
    rc: int
    stdout: str
    stderr: str
    wall: float
    cpu: float
    maxrss: int  # peak RSS of the child, the imports it shares with the helper included

    @property
    def error(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.startswith("memdetect: error: ")]
        return lines[0] if len(lines) == 1 else ""


class Zygote:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=_env(), text=True, cwd=workdir)
        self.base = json.loads(self._line(120))  # VmSize / VmPeak / VmRSS after the imports
        self.n = 0

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the CLI helper process gave no answer within {timeout} s")
        return line

    def run(self, *argv) -> Run:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        argv = [str(a) for a in argv]
        job = dict(argv=argv, mem=GiB, cpu=LIMIT_S, wall=3 * LIMIT_S, stdout=str(out), stderr=str(err),
                   cwd=str(self.workdir))
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        res = json.loads(self._line(4 * LIMIT_S))
        return Run(argv, res["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"), res["wall"],
                   res["cpu"], res["maxrss"])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("cli"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (8, 8), (90, 30, 200)).save(path)
    return path


def assert_refused(run: Run, *fragments: str):
    """Exit 2, one error line (besides the fixed debug hint), no traceback, no raw control character, in time and
    memory; the error line holds each fragment."""
    where = f"{run.argv[-1]}: rc {run.rc}, stderr {run.stderr[:2000]!r}"
    assert run.rc == 2, where
    assert run.error and all(line in (run.error, HINT) for line in run.stderr.splitlines()), where
    assert "Traceback" not in run.stderr, where
    assert not any(c in run.stderr + run.stdout for c in "\x1b\r\x07\x9b\u202e"), where
    assert run.wall < LIMIT_S and run.cpu < LIMIT_S, f"{where}: {run.wall:.1f} s wall, {run.cpu:.1f} s CPU"
    assert run.maxrss < GiB, f"{where}: {run.maxrss / 2**20:.0f} MB"
    for fragment in fragments:
        assert fragment in run.error, where


def scan(cli: Zygote, png: Path, model_path: Path) -> Run:
    return cli.run("scan", png, "--model", "edm", "--model-path", model_path, "--workers", "0")


# -- writing pickles opcode by opcode --------------------------------------------------------------------------------

class Raw(bytes):
    """Opcodes inserted as they are."""


def emit(v) -> bytes:
    """Protocol-2 opcodes that push ``v`` (None, bool, int, float, str, bytes, list, tuple, dict, Raw)."""
    if isinstance(v, Raw):
        return bytes(v)
    if v is None:
        return pickle.NONE
    if isinstance(v, bool):
        return pickle.NEWTRUE if v else pickle.NEWFALSE
    if isinstance(v, int):
        if -2**31 <= v < 2**31:
            return pickle.BININT + struct.pack("<i", v)
        data = pickle.encode_long(v)
        return pickle.LONG1 + bytes([len(data)]) + data
    if isinstance(v, float):
        return pickle.BINFLOAT + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        return pickle.BINUNICODE + struct.pack("<I", len(b)) + b
    if isinstance(v, bytes):
        return pickle.BINBYTES + struct.pack("<I", len(v)) + v
    if isinstance(v, list):
        return pickle.EMPTY_LIST + (pickle.MARK + b"".join(map(emit, v)) + pickle.APPENDS if v else b"")
    if isinstance(v, tuple):
        return pickle.MARK + b"".join(map(emit, v)) + pickle.TUPLE
    if isinstance(v, dict):
        body = b"".join(emit(k) + emit(x) for k, x in v.items())
        return pickle.EMPTY_DICT + (pickle.MARK + body + pickle.SETITEMS if v else b"")
    raise TypeError(type(v))


def dump(v) -> bytes:
    return pickle.PROTO + b"\x02" + emit(v) + pickle.STOP


def stack_global(module: str, name: str) -> Raw:
    return Raw(emit(module) + emit(name) + pickle.STACK_GLOBAL)


PERSISTENT = stack_global("torch_utils.persistence", "_reconstruct_persistent_obj")


def persistent(class_name="EDMPrecond", state=None, type_="class") -> Raw:
    """``_reconstruct_persistent_obj({...})``: an NVlabs network object."""
    meta = {"type": type_, "version": 6, "module_src": "", "class_name": class_name, "state": state or {}}
    return Raw(bytes(PERSISTENT) + emit((meta,)) + pickle.REDUCE)


def tuple_dag(levels: int) -> Raw:
    """t = (); t = (t, t) per level: 2 bytes a level, 2**levels leaves to hash."""
    return Raw(pickle.EMPTY_TUPLE + (pickle.DUP + pickle.TUPLE2) * levels)


def list_dag(levels: int) -> Raw:
    """l = []; l = [l, l] per level, through the memo (a list repr visits 2**levels lists)."""
    step = pickle.BINPUT + b"\x00" + pickle.POP + pickle.EMPTY_LIST + (pickle.BINGET + b"\x00" + pickle.APPEND) * 2
    return Raw(pickle.EMPTY_LIST + step * levels)


def list_chain(depth: int) -> Raw:
    """[[[...]]] ``depth`` deep: ``depth`` empty lists, then each appended into the one below it."""
    return Raw(pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1))


HOLE = Raw(b"<hole>")


def module_chain(depth: int) -> Raw:
    """An EDMPrecond record (valid arguments) whose ``_modules`` nest ``depth`` records deep: a recursive walk of
    the modules overflows the stack."""
    head, tail = bytes(persistent("M", {"_modules": {"c": HOLE}})).split(HOLE)
    top_head, top_tail = bytes(persistent("EDMPrecond", {"_init_args": (), "_init_kwargs": dict(SMALL),
                                                         "_modules": {"model": HOLE}})).split(HOLE)
    return Raw(top_head + head * depth + bytes(persistent("M", {})) + tail * depth + top_tail)


def legacy_storage_blob(values) -> bytes:
    """A storage as ``torch.save(..., _use_new_zipfile_serialization=False)`` writes it inside NVlabs pickles."""
    t = torch.as_tensor(values, dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=torch.float32, _internal=True),
                   buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


class View:
    """A tensor pickled as ``_rebuild_tensor_v2(storage, offset, size, stride)``; one ``storage`` object is pickled
    once and referenced through the memo by every view of it."""

    def __init__(self, storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), tuple(stride), offset

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                                  OrderedDict()))


def big_meta_net():
    """EDMPrecond with 890M parameters (3.6 GB in float32), built on the meta device: only its shapes are used."""
    return edm.build_network("EDMPrecond", {**SMALL, "model_channels": 512}, device="meta")


# -- the hostile files -----------------------------------------------------------------------------------------------

def stride0_bomb(d: Path) -> Path:
    """A well-formed NVlabs pickle whose 890M parameters are stride-0 views of one float (the issue's 'loaded,
    scanned and exited 0'): a few hundred KB of pickle claiming 3.6 GB of weights."""
    one = EvilStorage(legacy_storage_blob([0.01]))
    return write_nvlabs_pickle(d / "stride0.pkl", big_meta_net(), d / "src_ran",
                               tensor=lambda t: View(one, t.shape, (0,) * t.dim()))


def overlap_bomb(d: Path) -> Path:
    """Every tensor a view with all strides 1 over one 4096-float storage: inside the storage, elements shared."""
    small = EvilStorage(legacy_storage_blob(torch.rand(4096)))
    return write_nvlabs_pickle(d / "overlap.pkl", big_meta_net(), d / "src_ran",
                               tensor=lambda t: View(small, t.shape, (1,) * t.dim()))


def shared_views(d: Path) -> Path:
    """20,000 full, plain views of one 256 KB storage: 5 GB of tensors from a 1 MB file."""
    storage = EvilStorage(legacy_storage_blob(torch.zeros(65536)))
    path = d / "shared.pkl"
    path.write_bytes(pickle.dumps({"ema": [View(storage, (65536,), (1,)) for _ in range(20000)]}, protocol=2))
    return path


def zip_storage_blob(compress: str, numel: int) -> bytes:
    """A zip-format ``torch.save`` storage blob; ``compress`` names the member written deflated ("data.pkl" or
    "data/0"), ``numel`` the storage size it declares (its data member is zeros, streamed, never in memory)."""

    class Ref:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, Ref) else None

    pkl = io.BytesIO()
    Pickler(pkl, protocol=2).dump(Ref())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        def write(name, data=b"", zeros=0):
            info = zipfile.ZipInfo(f"archive/{name}")
            info.compress_type = zipfile.ZIP_DEFLATED if name == compress else zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as f:
                f.write(data)
                for start in range(0, zeros, 1 << 20):
                    f.write(bytes(min(1 << 20, zeros - start)))

        write("data.pkl", pkl.getvalue(), zeros=64 << 20 if compress == "data.pkl" else 0)  # pickle ignores the tail
        write("byteorder", b"little")
        write("data/0", zeros=numel * 4)
    return out.getvalue()


def compressed_member(d: Path, member: str) -> Path:
    """A tensor whose zip storage blob has ``member`` deflate-compressed: 64 MB of zeros in about 64 KB."""
    numel = 1 if member == "data.pkl" else 16 << 20
    blob = EvilStorage(zip_storage_blob(member, numel))
    path = d / f"compressed-{member.replace('/', '_')}.pkl"
    path.write_bytes(pickle.dumps({"ema": View(blob, (numel,), (1,))}, protocol=2))
    return path


def hash_dag(d: Path) -> Path:
    """{'ema': {t: None}} with t a 64-level tuple DAG: hashing it visits 2**64 tuples."""
    path = d / "hash_dag.pkl"
    path.write_bytes(dump({"ema": Raw(pickle.EMPTY_DICT + tuple_dag(64) + pickle.NONE + pickle.SETITEM)}))
    return path


def repr_dag(d: Path) -> Path:
    """A persistent object whose type is a 40-level list DAG, which a message about the bad type would repr."""
    path = d / "repr_dag.pkl"
    path.write_bytes(dump({"ema": persistent(type_=list_dag(40))}))
    return path


def collisions(d: Path) -> Path:
    """A dict of 50,000 int keys k * (2**61 - 1): all hash alike, so inserting them is quadratic."""
    path = d / "collisions.pkl"
    keys = b"".join(emit(k * ((1 << 61) - 1)) + pickle.NONE for k in range(1, 50001))
    path.write_bytes(dump({"ema": Raw(pickle.EMPTY_DICT + pickle.MARK + keys + pickle.SETITEMS)}))
    return path


def deep_lists(d: Path) -> Path:
    """A persistent object whose type is a list nested 100,000 deep."""
    path = d / "deep_lists.pkl"
    path.write_bytes(dump({"ema": persistent(type_=list_chain(100_000))}))
    return path


def deep_modules(d: Path) -> Path:
    """An EDMPrecond record whose submodules nest 5,000 records deep."""
    path = d / "deep_modules.pkl"
    path.write_bytes(dump({"ema": module_chain(5000)}))
    return path


def memo_flood(d: Path) -> Path:
    path = d / "memo.pkl"
    path.write_bytes(pickle.PROTO + b"\x04" + pickle.NONE + pickle.MEMOIZE * 600_000 + pickle.STOP)
    return path


def opcode_flood(d: Path) -> Path:
    path = d / "opcodes.pkl"
    path.write_bytes(pickle.PROTO + b"\x02" + pickle.NONE * 2_100_000 + pickle.STOP)
    return path


def hostile_global(d: Path) -> Path:
    """A pickle global whose module and name carry markup, ANSI/OSC escapes, a bidi override and a forged line, in a
    file whose name carries markup and an escape too."""
    path = d / "evil[red]\x1b[1m.pkl"
    path.write_bytes(dump({"ema": Raw(bytes(stack_global(HOSTILE_NAME, HOSTILE_NAME)) + emit(()) + pickle.REDUCE)}))
    return path


def hostile_class_name(d: Path) -> Path:
    """A well-formed NVlabs pickle naming its network class with markup and escapes."""
    path = d / "class_name.pkl"
    path.write_bytes(dump({"ema": persistent(HOSTILE_NAME, {"_init_args": (), "_init_kwargs": {}})}))
    return path


def hostile_model_type(d: Path) -> Path:
    path = d / "model_type.pkl"
    state = {"_init_args": (), "_init_kwargs": {**SMALL, "model_type": HOSTILE_NAME}}
    path.write_bytes(dump({"ema": persistent("EDMPrecond", state)}))
    return path


PICKLE_CASES = {  # builder, fragments of the one error line
    "stride-0 views": (stride0_bomb, ["stride 0", "stride0.pkl"]),
    "overlapping views": (overlap_bomb, ["elements overlap"]),
    "shared storage views": (shared_views, ["exceeds a loading limit", "tensors of more than 2 x its"]),
    "compressed data.pkl": (lambda d: compressed_member(d, "data.pkl"), ["compressed member archive/data.pkl"]),
    "compressed data/<key>": (lambda d: compressed_member(d, "data/0"), ["compressed member archive/data/0"]),
    "hash DAG": (hash_dag, ["expands to more than 2,000,000 elements"]),
    "repr DAG": (repr_dag, ["expands to more than 2,000,000 elements"]),
    "collisions": (collisions, ["dict key or set member of type int"]),
    "deep lists": (deep_lists, ["nested more than 100 deep"]),
    "deep modules": (deep_modules, ["nested more than 100 deep"]),
    "memo flood": (memo_flood, ["more than 500,000 memo entries"]),
    "opcode flood": (opcode_flood, ["more than 2,000,000 pickle opcodes"]),
    "markup and ANSI global": (hostile_global, ["asks for [/x][bold]\\x1b]0;pwned\\x07\\x1b[31m\\u202eevil\\r\\n",
                                                "evil[red]\\x1b[1m.pkl"]),
    "markup and ANSI class name": (hostile_class_name, ["holds a [/x][bold]\\x1b]0;pwned"]),
    "markup and ANSI model_type": (hostile_model_type, ["model_type='[/x][bold]\\x1b]0;pwned"]),
}


@pytest.mark.parametrize("case", list(PICKLE_CASES))
def test_hostile_pickle_is_refused_by_the_cli(case, cli, png, tmp_path):
    build, fragments = PICKLE_CASES[case]
    path = build(tmp_path)
    assert path.stat().st_size < 3 << 20  # small files, all of them (a flood needs a byte per opcode)
    assert_refused(scan(cli, png, path), *fragments)
    assert not (tmp_path / "src_ran").exists()


def test_fresh_python_m_memdetect_refuses_the_stride0_bomb(cli, png, tmp_path):
    """The entry point itself, in a fresh interpreter: limits set in preexec_fn (address space: what the imports
    take, measured by the helper, + 1 GiB)."""
    path = stride0_bomb(tmp_path)
    cap = cli.base["VmPeak"] + GiB

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))

    p = subprocess.run([sys.executable, "-m", "memdetect", "scan", str(png), "--model", "edm", "--model-path",
                        str(path), "--workers", "0"], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                       preexec_fn=limits, timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("memdetect: error: ")]
    assert p.returncode == 2 and len(errors) == 1 and "stride 0" in errors[0], p.stderr[-2000:]
    assert all(line in (errors[0], HINT) for line in p.stderr.splitlines()), p.stderr[-2000:]


# -- safetensors and sidecars ----------------------------------------------------------------------------------------

TINY = dict(img_resolution=8, img_channels=3, model_channels=4, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[], augment_dim=0)


def tiny_safetensors(d: Path, sidecar, state=None, name="net") -> Path:
    """A tiny legitimate network as .safetensors (or ``state`` instead of its tensors) with ``sidecar`` as its
    JSON (an object, or raw text)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.safetensors"
    if state is None:
        torch.manual_seed(0)
        state = edm.build_network("EDMPrecond", TINY).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.with_suffix(".json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return path


def with_kwargs(**over):
    return {"class_name": "EDMPrecond", "init_kwargs": over}


def resolution0_state():
    """Tensor names that say resolution 0 (``0x0``): halving it never ends."""
    return {"model.enc.0x0_conv.weight": torch.zeros(4, 3, 3, 3), "model.map_layer0.weight": torch.zeros(16, 4),
            "model.enc.0x0_block0.conv0.weight": torch.zeros(4, 4, 3, 3)}


def bad_filter_state():
    state = edm.build_network("EDMPrecond", TINY).state_dict()
    return {k: torch.ones(2, 2, 2) if k.endswith("resample_filter") else v for k, v in state.items()}


SIDECAR_CASES = {  # sidecar, state (None: the tiny network's), fragments
    "resolution 0 in the tensor names": ({"precond": "edm"}, resolution0_state,
                                         ["names a resolution outside [8, 512]"]),
    "img_resolution 0": (with_kwargs(img_resolution=0), None, ["img_resolution=0 is not supported"]),
    "img_resolution 4096": (with_kwargs(img_resolution=4096), None, ["img_resolution=4096", "[8, 512]"]),
    "img_resolution not halving": (with_kwargs(img_resolution=10, channel_mult=[1, 2, 2]), None,
                                   ["img_resolution=10", "a multiple of 4"]),
    "model_channels 10**6": (with_kwargs(model_channels=10**6), None, ["model_channels=1000000"]),
    "feature maps too large": (with_kwargs(img_resolution=512, model_channels=256), None, ["feature maps of"]),
    "channel_mult 100 levels": (with_kwargs(channel_mult=[1] * 100), None, ["channel_mult=[1, 1, 1, 1, ...]"]),
    "channel_mult nested": (with_kwargs(channel_mult=[[[[1]]]]), None, ["channel_mult=[[[["]),
    "num_blocks 10**9": (with_kwargs(num_blocks=10**9), None, ["num_blocks=1000000000"]),
    "img_channels 0": (with_kwargs(img_channels=0), None, ["img_channels=0"]),
    "img_channels 1": ({"precond": "edm"}, lambda: edm.build_network("EDMPrecond", {**TINY, "img_channels": 1})
                       .state_dict(), ["network for 1-channel images; memdetect scans RGB images"]),
    "channel_mult null": (with_kwargs(channel_mult=None), None, ["channel_mult=None"]),
    "img_resolution null": (with_kwargs(img_resolution=None), None, ["img_resolution=None"]),
    "odd noise channels": (with_kwargs(model_channels=3), None, ["model_channels=3", "cos and sin"]),
    "group norm split": (with_kwargs(model_channels=132, channel_mult=[1, 1]), None, ["group normalisation"]),
    "beta_d 1e308": ({"class_name": "VPPrecond", "init_kwargs": {"beta_d": 1e308}}, None, ["beta_d=1e+308"]),
    "sigma_data NaN": ('{"class_name": "EDMPrecond", "init_kwargs": {"sigma_data": NaN}}', None, ["sigma_data=nan"]),
    "filter with NaN": ('{"class_name": "EDMPrecond", "init_kwargs": {"resample_filter": [1, NaN]}}', None,
                        ["resample_filter=[1, nan]"]),
    "filter of one tap": (with_kwargs(resample_filter=[1]), None, ["resample_filter=[1]"]),
    "filter zero sum": (with_kwargs(resample_filter=[1, -1]), None, ["resample_filter=[1, -1]"]),
    "filter a string": (with_kwargs(resample_filter="1111"), None, ["resample_filter='1111'"]),
    "filter tensor of shape (2, 2, 2)": ({"precond": "edm"}, bad_filter_state, ["resample filter", "(2, 2, 2)"]),
    "sidecar nested 100,000 deep": ('{"class_name": "EDMPrecond", "init_kwargs": {"channel_mult": '
                                    + "[" * 100_000 + "]" * 100_000 + "}}", None, ["nests too deeply"]),
    "sidecar nested 20 deep": (with_kwargs(channel_mult=json.loads("[" * 20 + "]" * 20)), None,
                               ["nests more than 8 levels deep"]),
    "markup and ANSI sidecar class name": ({"class_name": HOSTILE_NAME}, None,
                                           ["holds a [/x][bold]\\x1b]0;pwned\\x07\\x1b[31m\\u202eevil\\r\\n"]),
    "sidecar class name a list": ({"class_name": [[1] * 100] * 100}, None, ["names its network with a list"]),
}


@pytest.mark.parametrize("case", list(SIDECAR_CASES))
def test_hostile_safetensors_or_sidecar_is_refused_by_the_cli(case, cli, png, tmp_path):
    sidecar, state, fragments = SIDECAR_CASES[case]
    path = tiny_safetensors(tmp_path, sidecar, state() if state else None)
    assert_refused(scan(cli, png, path), *fragments)


def test_legitimate_files_still_scan(cli, png, tmp_path):
    """The same runner and limits pass a legitimate NVlabs pickle and a safetensors + sidecar (exit 0)."""
    pkl = write_nvlabs_pickle(tmp_path / "edm.pkl", small_net(), tmp_path / "src_ran")
    st = tiny_safetensors(tmp_path / "st", {"precond": "vp"})
    for path in (pkl, st):
        run = cli.run("scan", png, "--model", "edm", "--model-path", path, "--workers", "0", "--output",
                      tmp_path / f"{path.stem}.json")
        assert run.rc == 0 and run.wall < LIMIT_S and run.maxrss < GiB, run.stderr[-2000:]
    assert not (tmp_path / "src_ran").exists()


# -- the budgets, one at a time (in process) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def legit_pkl(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("legit")
    return write_nvlabs_pickle(d / "net.pkl", small_net(), d / "src_ran")


@pytest.mark.parametrize("field,value,fragment", [
    ("opcodes", 500, "pickle opcodes"), ("calls", 20, "calls"), ("memo", 20, "memo entries"),
    ("containers", 20, "containers"), ("items", 50, "elements in containers"),
    ("container_len", 5, "a container of more than 5 elements"), ("depth", 4, "nested more than 4 deep"),
    ("expanded", 100, "expands to more than 100 elements"), ("tensors", 3, "more than 3 tensors"),
    ("tensor_bytes_factor", 0.5, "x its"),
])
def test_each_budget_refuses_a_legitimate_pickle_when_set_below_its_needs(legit_pkl, field, value, fragment):
    safe_pickle.load(legit_pkl)  # the defaults pass it
    with pytest.raises(UnsafeCheckpointError, match="exceeds a loading limit") as e:
        safe_pickle.load(legit_pkl, limits=Limits(**{field: value}))
    assert fragment in str(e.value) and "net.pkl" in str(e.value)


def _load_bytes(data: bytes, **limits):
    return safe_pickle.load(io.BufferedReader(io.BytesIO(data)), name="t.pkl", limits=Limits(**limits))


@pytest.mark.parametrize("value,kind", [
    (Raw(emit(1.5) + pickle.NONE), "float"), (Raw(emit((1, 2)) + pickle.NONE), "tuple"),
    (Raw(emit((1 << 61) - 1) + pickle.NONE), "int"), (Raw(emit(-(1 << 61) + 1) + pickle.NONE), "int"),
])
def test_dict_keys_must_be_cheap_to_hash_and_unable_to_collide(value, kind):
    with pytest.raises(UnsafeCheckpointError, match=f"dict key or set member of type {kind}"):
        _load_bytes(dump({"ema": Raw(pickle.EMPTY_DICT + pickle.MARK + value + pickle.SETITEMS)}))
    members = Raw(pickle.MARK + bytes(value)[:-1] + pickle.FROZENSET)
    with pytest.raises(UnsafeCheckpointError, match=f"of type {kind}"):
        _load_bytes(dump({"ema": members}))
    assert _load_bytes(dump({"ema": {"a": 1, 7: 2, b"k": 3, None: 4, True: 5, (1 << 61) - 2: 6}}))["ema"][7] == 2


def test_sets_and_ordered_dicts_are_checked_too():
    made_set = Raw(bytes(stack_global("builtins", "set")) + emit(([(1, 2)],)) + pickle.REDUCE)
    with pytest.raises(UnsafeCheckpointError, match="of type tuple"):
        _load_bytes(dump({"ema": made_set}))
    od = Raw(bytes(stack_global("collections", "OrderedDict")) + emit(([(1.5, 2)],)) + pickle.REDUCE)
    with pytest.raises(ModelNotFoundError, match="OrderedDict built from arguments"):
        _load_bytes(dump({"ema": od}))


def test_containers_cannot_change_once_inside_another():
    """Building a DAG through the memo (append into a list already placed elsewhere) or a cycle is refused: the
    tracked depth and size would otherwise be wrong."""
    a_in_b_then_grow_a = Raw(pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.EMPTY_LIST + pickle.BINGET + b"\x00"
                             + pickle.APPEND + pickle.POP + pickle.BINGET + b"\x00" + pickle.NONE + pickle.APPEND)
    with pytest.raises(UnsafeCheckpointError, match="changed after it was put into another one"):
        _load_bytes(dump({"ema": a_in_b_then_grow_a}))
    cycle = Raw(pickle.EMPTY_LIST + pickle.DUP + pickle.APPEND)
    with pytest.raises(UnsafeCheckpointError, match="contains itself"):
        _load_bytes(dump({"ema": cycle}))


@pytest.mark.parametrize("opcodes,fragment", [
    (pickle.BINBYTES8 + struct.pack("<Q", 1 << 62), "a length of"),
    (pickle.BINUNICODE + struct.pack("<I", 1 << 31), "a length of"),
    (pickle.BYTEARRAY8 + struct.pack("<Q", 1 << 40), "a bytearray of"),
    (pickle.FRAME + struct.pack("<Q", 1 << 40), "a length of"),
    (pickle.LONG4 + struct.pack("<i", 1 << 30), "an integer of"),
    (pickle.PUT + b"99999999999999999999\n", "a memo index"),
    (pickle.BININT, "cannot read t.pkl"),  # truncated: struct.error inside the pickle machinery
])
def test_forged_lengths_allocate_nothing(opcodes, fragment):
    start = time.monotonic()
    with pytest.raises((ModelNotFoundError, UnsafeCheckpointError)) as e:
        _load_bytes(pickle.PROTO + b"\x04" + pickle.NONE + opcodes)
    assert fragment in str(e.value) and time.monotonic() - start < 1


def test_repeated_decoding_of_one_storage_blob_is_budgeted():
    """One 256 KB blob in the memo, decoded again and again (each call a new storage), is limited like tensors."""
    blob = legacy_storage_blob(torch.zeros(65536))

    def decoded(times: int) -> bytes:
        return dump({"ema": Raw(bytes(stack_global("torch.storage", "_load_from_bytes")) + pickle.BINPUT + b"\x01"
                                + pickle.POP + emit(blob) + pickle.BINPUT + b"\x02" + pickle.POP
                                + pickle.EMPTY_LIST + pickle.MARK
                                + (pickle.BINGET + b"\x01" + pickle.BINGET + b"\x02" + pickle.TUPLE1
                                   + pickle.REDUCE) * times + pickle.APPENDS)})

    assert len(_load_bytes(decoded(1))["ema"]) == 1
    with pytest.raises(UnsafeCheckpointError, match="tensor storages of more than 2 x its"):
        _load_bytes(decoded(50))


def test_zip_blob_member_limits():
    blob = zip_storage_blob("nothing", 4)
    tensor = pickle.dumps({"ema": View(EvilStorage(blob), (4,), (1,))}, protocol=2)
    assert torch.equal(_load_bytes(tensor)["ema"], torch.zeros(4))
    with pytest.raises(UnsafeCheckpointError, match="more than 2 members"):
        _load_bytes(tensor, zip_members=2)


def test_module_walk_depth_is_bounded():
    records = node = safe_pickle.TorchModule()
    for _ in range(3000):  # built directly, not unpickled: module_tensors guards its own walk
        child = safe_pickle.TorchModule()
        node.state = {"_modules": {"c": child}}
        node = child
    node.state = {}
    with pytest.raises(UnsafeCheckpointError, match="more than 32 deep"):
        safe_pickle.module_tensors(records)


# -- messages --------------------------------------------------------------------------------------------------------

def test_printable_escapes_control_and_format_characters_and_cuts():
    assert printable("a\x1b[31mb\nc\rd\x9be\u2028f\u202eg\x00h\x7f") == \
        "a\\x1b[31mb\\nc\\rd\\x9be\\u2028f\\u202eg\\x00h\\x7f"
    assert printable("x" * 500, 10) == "x" * 10 + "..."
    assert printable("plain [/x] text, ünïcode") == "plain [/x] text, ünïcode"


def test_short_repr_is_bounded_on_anything():
    deep = []
    for _ in range(10_000):
        deep = [deep]
    row = list(range(1000))
    wide = {f"k{i}": row for i in range(10_000)}
    for obj in (deep, wide, 10 ** 5000, torch.zeros(1).expand(10_000, 10_000),
                "\x1b" * 10**6, b"\x1b" * 10**6, OrderedDict(a=1), {1, 2, 3}, object()):
        start = time.monotonic()
        text = short_repr(obj)
        assert len(text) <= 123 and text.isprintable() and time.monotonic() - start < 0.5, text


def test_checkpoint_names_in_edm_messages_are_printable(tmp_path):
    with pytest.raises(UnsupportedModelError) as e:
        edm.build_network(HOSTILE_NAME, {})
    with pytest.raises(UnsupportedModelError) as f:
        edm.build_network("EDMPrecond", {**SMALL, HOSTILE_NAME: 1})
    state = {**edm.build_network("EDMPrecond", TINY).state_dict(), HOSTILE_NAME: torch.zeros(1)}
    with pytest.raises(ModelNotFoundError) as g:
        edm.load_state(edm.build_network("EDMPrecond", TINY, device="meta"), state, HOSTILE_NAME)
    for err in (e, f, g):
        message = str(err.value)
        assert message.isprintable() and "[/x]" in message and "\\x1b" in message, message


def test_load_state_refuses_integer_tensors():
    state = {k: v.to(torch.int8) for k, v in edm.build_network("EDMPrecond", TINY).state_dict().items()}
    with pytest.raises(ModelNotFoundError, match="int8 values, not floating-point"):
        edm.load_state(edm.build_network("EDMPrecond", TINY, device="meta"), state, "x")


def test_safetensors_header_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(edm.loaders, "LIMITS", Limits(tensors=10))  # the default, 100,000, works the same way
    path = tmp_path / "h.safetensors"
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(11)}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    path.with_suffix(".json").write_text('{"precond": "edm"}')
    with pytest.raises(UnsafeCheckpointError, match="holds 11 tensors, more than memdetect's limit of 10"):
        edm.network_from_safetensors(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ModelNotFoundError, match="not a safetensors file"):
        edm.network_from_safetensors(path)


def test_legitimate_real_size_configuration_passes_the_checks():
    """The released CIFAR-10 configuration and a 64x64 FFHQ-like one pass _checked_kwargs and build on meta."""
    for kw in ({**SMALL, "model_channels": 128}, {**SMALL, "img_resolution": 64, "model_channels": 128,
                                                   "channel_mult": [1, 2, 2, 2], "attn_resolutions": [16]}):
        net = edm.build_network("VPPrecond", {**kw, "beta_d": 19.9, "beta_min": 0.1, "M": 1000,
                                              "epsilon_t": 1e-5}, device="meta")
        assert sum(p.numel() for p in net.parameters()) > 50_000_000
    assert math.isinf(edm.build_network("EDMPrecond", TINY, device="meta").sigma_max)


def test_load_tensors_reads_torch_save_archives_as_data(tmp_path):
    """``safe_pickle.load_tensors``: a torch.save zip of tensors in plain containers reads back equal; any other
    global is refused before it is called; a compressed member or a non-archive is refused too."""
    import os
    import zipfile

    g = torch.Generator().manual_seed(0)
    obj = ([torch.rand(5, generator=g), torch.rand(3, 2, generator=g)[:, 1]], {"n": torch.arange(4)}, (1.5, "x"))
    torch.save(obj, tmp_path / "ok.pt")
    back = safe_pickle.load_tensors(tmp_path / "ok.pt")
    assert torch.equal(back[0][0], obj[0][0]) and torch.equal(back[0][1], obj[0][1])
    assert torch.equal(back[1]["n"], obj[1]["n"]) and back[2] == (1.5, "x")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    torch.save([Evil()], tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        safe_pickle.load_tensors(tmp_path / "evil.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "deflated.pt", "w",
                                                                      zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(UnsafeCheckpointError, match="compressed member"):
        safe_pickle.load_tensors(tmp_path / "deflated.pt")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ModelNotFoundError, match="not a torch.save zip archive"):
        safe_pickle.load_tensors(tmp_path / "plain.pt")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        safe_pickle.load_tensors(tmp_path / "missing.pt")
