"""Reading NVlabs network pickles (EDM, StyleGAN2/3-ADA) as data, without importing or running anything from them.

NVlabs saves networks with ``pickle.dump`` and its ``torch_utils.persistence`` module: each network object is
pickled as a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` is a dict with
``type`` ('class'), ``version``, ``module_src`` (the source code of the module defining the class), ``class_name`` and
``state`` (the object's ``__dict__``: ``_init_args`` / ``_init_kwargs`` with the constructor arguments, and for torch
modules ``_parameters``, ``_buffers`` and ``_modules``). ``pickle.load`` on such a file imports
``torch_utils.persistence``, which ``exec``s ``module_src``: loading the file runs code from it. Any pickle can also
name any other callable (``os.system``, ``builtins.exec``) and have it called on load.

``load`` here uses a restricted unpickler whose ``find_class`` allows an explicit list of globals and refuses every
other one with ``UnsafeCheckpointError`` before anything is called. The allowed globals are harmless stand-ins or
plain data types; none of them imports a module, runs a string or touches files:

* ``torch_utils.persistence._reconstruct_persistent_obj`` -> a ``PersistentObject`` record of the meta dict
  (``module_src`` is kept as a string and never executed);
* ``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``, ``_rebuild_parameter_with_state`` -> a tensor view
  of a storage, with offsets, sizes and strides checked against the storage;
* ``torch.storage._load_from_bytes`` -> the storage bytes. Under ``pickle.dump`` each tensor's storage pickles as a
  nested ``torch.save`` blob (legacy format: pickled header, a pickled storage reference, then raw little-endian
  data; or a zip archive holding ``data.pkl`` and ``data/<key>``). The real function calls ``torch.load`` without
  ``weights_only``, so it is replaced by a parser of these two formats whose own unpickler allows only the
  ``torch.<Type>Storage`` names;
* ``collections.OrderedDict``, ``builtins.set`` / ``frozenset``; ``torch.nn.ModuleDict`` / ``ModuleList`` /
  ``Sequential`` -> a ``TorchModule`` record of their state; ``copyreg._reconstructor`` and ``builtins.object`` for
  old protocols (only to create those records);
* ``numpy.dtype`` and ``numpy.(_)core.multiarray.scalar`` -> Python numbers (numeric dtypes only: NVlabs records
  arguments such as ``skip_scale=np.sqrt(0.5)``); ``_codecs.encode`` with latin-1 (how protocol 2 writes bytes).

The result is plain data: dicts, lists, numbers, strings, tensors, ``PersistentObject`` and ``TorchModule``
records. ``module_tensors`` flattens a record tree into a state dict. Rebuilding a network from a record is the
model adapter's job (``memdetect.models.edm.network_from_pickle``), which checks the constructor arguments against
what it implements.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import MemdetectError, ModelNotFoundError, UnsafeCheckpointError


class PersistentObject:
    """One NVlabs persistent object, as data: the class it names, its recorded state, the source it carries."""

    __slots__ = ("kind", "version", "class_name", "module_src", "state")

    def __init__(self, kind: str, version, class_name: str, module_src: str, state: dict):
        self.kind, self.version, self.class_name, self.module_src, self.state = (
            kind, version, class_name, module_src, state)

    @property
    def init_kwargs(self) -> dict:
        kw = self.state.get("_init_kwargs", self.state.get("init_kwargs"))
        return dict(kw) if isinstance(kw, dict) else {}

    @property
    def init_args(self) -> tuple:
        args = self.state.get("_init_args", self.state.get("init_args"))
        return tuple(args) if isinstance(args, (list, tuple)) else ()

    def __setstate__(self, state):  # a pickle may not BUILD onto a record
        raise UnsafeCheckpointError("the checkpoint tries to overwrite the attributes of a network record")

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r}, {len(self.module_src)} chars of source, not executed)"


class TorchModule:
    """A torch container module (``ModuleDict``, ...) from the pickle, as data: its class name and ``__dict__``."""

    __slots__ = ("state",)
    class_name: ClassVar[str] = "Module"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"the checkpoint gives a {self.class_name} a state that is not a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"TorchModule({self.class_name!r})"


_CONTAINERS = {name: type(name + "Record", (TorchModule,), {"__slots__": (), "class_name": name})
               for name in ("ModuleDict", "ModuleList", "Sequential")}

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Sealed:
    """Internal records a pickle may not modify (no BUILD opcode onto them)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Bad(f"an attempt to overwrite the attributes of a {type(self).__name__.strip('_')}")


class _Storage(_Sealed):
    """A flat tensor holding one storage's elements (what ``_load_from_bytes`` stands in for)."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data


class _StorageType(_Sealed):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _StorageRef(_Sealed):
    __slots__ = ("key", "dtype", "numel", "view", "data")

    def __init__(self, key, dtype, numel, view):
        self.key, self.dtype, self.numel, self.view, self.data = key, dtype, numel, view, None


class _NumpyDtype:
    """``numpy.dtype(name, align, copy)`` recorded as a name and byte order, made real only for numeric kinds."""

    __slots__ = ("name", "byteorder")

    def __init__(self, name, align=False, copy=False):
        self.name, self.byteorder = name, "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def refusal(name: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"checkpoint {name} asks for {what}, which memdetect refuses to load "
                                 f"(it could run code)")


class _Bad(Exception):
    """Malformed but not dangerous data; becomes a ModelNotFoundError naming the file."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Unpickler(pickle.Unpickler):
    """Outer unpickler: resolves only the globals in ``_ALLOWED`` to the stand-ins below."""

    _ALLOWED: ClassVar[dict[tuple[str, str], str]] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): "_reconstruct_persistent_obj",
        ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor_v2",
        ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
        ("torch._utils", "_rebuild_parameter_with_state"): "_rebuild_parameter",
        ("torch.storage", "_load_from_bytes"): "_load_from_bytes",
        ("collections", "OrderedDict"): "_ordered_dict",
        ("builtins", "set"): "_set",
        ("builtins", "frozenset"): "_frozenset",
        ("builtins", "object"): "_object",
        ("copyreg", "_reconstructor"): "_reconstructor",
        ("numpy", "dtype"): "_numpy_dtype",
        ("numpy.core.multiarray", "scalar"): "_numpy_scalar",
        ("numpy._core.multiarray", "scalar"): "_numpy_scalar",
        ("_codecs", "encode"): "_codecs_encode",
        **{("torch.nn.modules.container", n): "_container" for n in _CONTAINERS},
    }

    def __init__(self, file, name: str):
        super().__init__(file)
        self.name = name

    def find_class(self, module, name):
        attr = self._ALLOWED.get((module, name))
        if attr is None:
            raise refusal(self.name, f"{module}.{name}")
        if attr == "_container":
            return _CONTAINERS[name]
        return getattr(self, attr)

    def persistent_load(self, pid):
        raise refusal(self.name, "a persistent reference (NVlabs pickles have none)")

    # -- stand-ins -----------------------------------------------------------------------------------------------
    _ordered_dict = OrderedDict
    _set = set
    _frozenset = frozenset
    _object = object
    _numpy_dtype = _NumpyDtype

    def _reconstructor(self, cls, base, state=None):
        if not (isinstance(cls, type) and issubclass(cls, TorchModule)) or base is not object or state is not None:
            raise refusal(self.name, f"copyreg._reconstructor of {getattr(cls, '__name__', type(cls).__name__)}")
        return cls.__new__(cls)

    def _reconstruct_persistent_obj(self, meta):
        if not isinstance(meta, dict):
            raise _Bad("a persistent object without its meta dict")
        kind, class_name, src, state = meta.get("type"), meta.get("class_name"), meta.get("module_src"), \
            meta.get("state")
        if kind != "class" or not isinstance(class_name, str) or not isinstance(state, dict):
            raise _Bad(f"a persistent object of type {kind!r} with class {class_name!r}")
        return PersistentObject(kind, meta.get("version"), class_name, src if isinstance(src, str) else "", state)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        if not isinstance(storage, _Storage):
            raise _Bad("a tensor whose storage is not a storage")
        if not (_is_int(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) <= 16 and all(_is_int(v) and v >= 0 for v in (*size, *stride))
                and storage_offset >= 0):
            raise _Bad(f"a tensor with size {size!r}, stride {stride!r}, offset {storage_offset!r}")
        n = storage.data.numel()
        if math.prod(size) > 0 and storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) >= n:
            raise _Bad(f"a tensor of size {size} that reaches beyond its storage of {n} elements")
        return torch.as_strided(storage.data, size, stride, storage_offset)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, torch.Tensor):
            raise _Bad("a parameter without a tensor")
        return data

    def _numpy_scalar(self, dtype, data=None):
        import numpy as np

        if not isinstance(dtype, _NumpyDtype) or not isinstance(dtype.name, str) or not isinstance(data, bytes):
            raise refusal(self.name, "a numpy scalar that is not a plain number")
        try:
            dt = np.dtype(dtype.name).newbyteorder(dtype.byteorder)
        except (TypeError, ValueError):
            raise refusal(self.name, f"a numpy scalar of dtype {dtype.name!r}") from None
        if dt.kind not in "biufc" or dt.itemsize != len(data):
            raise refusal(self.name, f"a numpy scalar of dtype {dtype.name!r}")
        return np.frombuffer(data, dtype=dt)[0].item()

    def _codecs_encode(self, obj, encoding="utf-8"):
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
            raise refusal(self.name, f"_codecs.encode with {encoding!r}")
        return obj.encode("latin1")

    def _load_from_bytes(self, blob):
        if not isinstance(blob, (bytes, bytearray)):
            raise _Bad("a storage that is not bytes")
        blob = bytes(blob)
        if blob[:4] == b"PK\x03\x04":
            return _storage_from_zip(blob, self.name)
        return _storage_from_legacy(blob, self.name)


class _StorageUnpickler(pickle.Unpickler):
    """Inner unpickler of a storage blob: only ``torch.<Type>Storage`` names and ``('storage', ...)`` references."""

    def __init__(self, file, name: str, refs: dict, fill=None):
        super().__init__(file)
        self.name, self.refs, self.fill = name, refs, fill

    def find_class(self, module, name):
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise refusal(self.name, f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])
                and pid[4] >= 0):
            raise _Bad(f"a malformed storage reference {pid!r:.80}")
        key, view = pid[2], pid[5] if len(pid) == 6 else None
        if view is not None and not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                                     and _is_int(view[1]) and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0):
            raise _Bad(f"a storage view {view!r:.80}")
        ref = self.refs.get(key)
        if ref is None:
            ref = self.refs[key] = _StorageRef(key, pid[1].dtype, pid[4], view)
            if self.fill is not None:
                self.fill(ref)
        elif ref.view != view:
            raise _Bad("a storage blob with several views of one storage")
        return ref


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _resolve(root, name: str) -> _Storage:
    if not isinstance(root, _StorageRef) or not isinstance(root.data, torch.Tensor):
        raise _Bad("a storage blob without its data")
    data = root.data
    if root.view is not None:  # a view into another storage (old torch): copy it, so offsets start at 0
        _, offset, size = root.view
        if offset + size > data.numel():
            raise _Bad("a storage view beyond its storage")
        data = data[offset:offset + size].clone()
    return _Storage(data)


def _storage_from_legacy(blob: bytes, name: str) -> _Storage:
    """The legacy ``torch.save`` layout: magic, protocol, sys info, storage reference, keys, then raw data."""
    f = io.BytesIO(blob)
    refs: dict[str, _StorageRef] = {}

    def next_pickle():
        return _StorageUnpickler(f, name, refs).load()

    if next_pickle() != _LEGACY_MAGIC or next_pickle() != _LEGACY_PROTOCOL:
        raise _Bad("a storage blob that is not in torch's legacy format")
    info = next_pickle()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise _Bad("a big-endian storage blob")
    root = next_pickle()
    keys = next_pickle()
    if not isinstance(keys, list) or not all(isinstance(k, str) and k in refs for k in keys):
        raise _Bad("a storage blob whose keys do not match its references")
    for key in keys:
        ref = refs[key]
        header = f.read(8)
        numel = int.from_bytes(header, "little", signed=True) if len(header) == 8 else -1
        size = _element_size(ref.dtype)
        if numel < 0 or numel * size > len(blob) - f.tell():
            raise _Bad("a truncated storage blob")
        ref.data = torch.frombuffer(bytearray(f.read(numel * size)), dtype=ref.dtype) if numel else \
            torch.empty(0, dtype=ref.dtype)
    return _resolve(root, name)


def _storage_from_zip(blob: bytes, name: str) -> _Storage:
    """The zip ``torch.save`` layout: ``<dir>/data.pkl`` referencing ``<dir>/data/<key>`` (stored, not compressed)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
        pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise _Bad("a zipped storage blob without one data.pkl")
        prefix = pkls[0][:-len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() != b"little":
            raise _Bad("a big-endian storage blob")

        def fill(ref: _StorageRef):
            member = f"{prefix}data/{ref.key}"
            size = ref.numel * _element_size(ref.dtype)
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise _Bad(f"a zipped storage blob without {member}") from None
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != size:
                raise _Bad(f"a zipped storage {member} of {info.file_size} bytes, expected {size} stored bytes")
            ref.data = torch.frombuffer(bytearray(zf.read(member)), dtype=ref.dtype) if size else \
                torch.empty(0, dtype=ref.dtype)

        root = _StorageUnpickler(io.BytesIO(zf.read(pkls[0])), name, {}, fill).load()
    except zipfile.BadZipFile as e:
        raise _Bad(f"a damaged zipped storage blob ({e})") from None
    return _resolve(root, name)


def load(source: str | os.PathLike | io.BufferedIOBase, *, name: str | None = None) -> Any:
    """Unpickle an NVlabs pickle as data (see the module docstring).

    Raises UnsafeCheckpointError when the pickle asks for anything outside the allow-list (before calling it), and
    ModelNotFoundError when the file is missing or is not a readable pickle of this kind.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or path.name
        try:
            with open(path, "rb") as f:
                return load(f, name=name)
        except FileNotFoundError:
            raise ModelNotFoundError(f"checkpoint {path} does not exist") from None
        except IsADirectoryError:
            raise ModelNotFoundError(f"checkpoint {path} is a folder, not a pickle file") from None
    name = name or "checkpoint"
    head = source.peek(4)[:4] if hasattr(source, "peek") else b""
    if head == b"PK\x03\x04":
        raise ModelNotFoundError(f"{name} is a torch.save zip archive, not an NVlabs network pickle")
    try:
        return _Unpickler(source, name).load()
    except MemdetectError:
        raise
    except _Bad as e:
        raise ModelNotFoundError(f"cannot read {name}: it holds {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RecursionError, MemoryError, OverflowError, RuntimeError, UnicodeDecodeError) as e:
        raise ModelNotFoundError(f"cannot read {name} as a network pickle ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None


def module_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a record tree (PersistentObject / TorchModule with torch module state) into a state dict.

    Follows ``_modules``; takes ``_parameters`` and the persistent ``_buffers`` (None entries skipped), as
    ``nn.Module.state_dict`` would have.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(node, pre: str):
        if id(node) in seen:
            raise ModelNotFoundError(f"the network record contains a cycle at {pre or 'the root'}")
        seen.add(id(node))
        state = getattr(node, "state", None)
        if not isinstance(state, dict):
            raise ModelNotFoundError(f"the network record {pre or 'root'} has no module state")
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            items = state.get(group) or {}
            if not isinstance(items, dict):
                raise ModelNotFoundError(f"the network record {pre or 'root'} has a malformed {group}")
            for k, v in items.items():
                if v is None or (group == "_buffers" and k in skip):
                    continue
                if not isinstance(v, torch.Tensor):
                    raise ModelNotFoundError(f"{pre}{k} in the network record is a {type(v).__name__}, not a tensor")
                out[pre + str(k)] = v
        children = state.get("_modules") or {}
        if not isinstance(children, dict):
            raise ModelNotFoundError(f"the network record {pre or 'root'} has malformed submodules")
        for k, child in children.items():
            if child is None:
                continue
            if not isinstance(child, (PersistentObject, TorchModule)):
                raise ModelNotFoundError(f"submodule {pre}{k} in the network record is a {type(child).__name__}")
            walk(child, f"{pre}{k}.")

    walk(obj, prefix)
    return out


__all__ = ["PersistentObject", "TorchModule", "load", "module_tensors", "refusal"]
