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

Budgets: what a file costs is bounded by its size, not by what it claims. ``load`` runs Python's pure-Python
unpickler (``pickle._Unpickler``) with every opcode handler wrapped, so each opcode is counted and each container it
builds is tracked (the numbers are ``Limits``; a real EDM CIFAR-10 pickle is far below each, see ``LIMITS``):

* opcodes, calls of allowed globals, memo entries, containers, the elements of all containers together and of one;
* every container's nesting depth, and its expanded size (its elements counted once per path that reaches them, as
  hash, ==, repr or json would visit them), known when it is built. A container may not be changed once it is inside
  another one (a pickler never does that), so these numbers stay exact and the result has no cycles: a DAG of tuples
  whose hash doubles per level, or of lists whose repr doubles, is refused while it is built;
* dict keys and set members are str, bytes, bool, None or ints of magnitude below 2**61 - 1 (the hash modulus):
  str and bytes hashes are randomised per process and such ints hash to distinct values, so no file can fill a dict
  with colliding keys, and no key is a container whose hash could be expensive;
* a length read from the file never exceeds what is left of the file (nothing is allocated from a forged length),
  and integers are at most ``Limits.long_bytes`` bytes;
* tensors: each a view with no stride 0 over a dimension longer than 1 and no overlapping elements (NVlabs networks
  store each parameter as its own contiguous storage; torch's own formats can hold such views, e.g. a saved
  ``expand()``, but no network pickle needs them); all views together, and all storages decoded, at most
  ``Limits.tensor_bytes_factor`` times the file size;
* nested ``torch.save`` zip blobs: every member stored uncompressed (torch never compresses) and inside the blob,
  checked before anything is read.

Going over a budget, or a refused construct, raises ``UnsafeCheckpointError``; a damaged file ``ModelNotFoundError``;
both with one sentence. Anything from the file that a message shows goes through ``printable`` (control characters
escaped, length cut) or ``short_repr`` (a bounded ``reprlib``), so no name can put an escape sequence or a newline
on a terminal, or make a message long.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import reprlib
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...errors import MemdetectError, ModelNotFoundError, UnsafeCheckpointError
from ...text import printable as _printable

# ------------------------------------------------------------------------------------------------------------------
# Messages: names and values from a checkpoint, made safe to show.


def printable(text: str, limit: int = 120) -> str:
    """``memdetect.text.printable`` with a default limit of 120 characters: one line, control and format characters
    written as escapes (``\x1b``, ``\n``, ``\u202e``), cut to ``limit`` characters (then "...")."""
    return _printable(text, limit)


class _ShortRepr(reprlib.Repr):
    """``reprlib`` with small limits that never calls ``repr`` on an object it does not know, never sorts a whole
    container, and survives ints too long for ``repr``."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = self.maxset = self.maxfrozenset = 4
        self.maxdeque = 4
        self.maxstring, self.maxlong, self.maxother = 60, 40, 60

    def _items(self, x, level, left, right, limit):
        if not x:
            return left + right
        if level <= 0:
            return left + "..." + right
        parts = []
        for i, v in enumerate(x):
            if i == limit:
                parts.append("...")
                break
            parts.append(self.repr1(v, level - 1))
        return left + ", ".join(parts) + right

    def repr_dict(self, x, level):
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        parts = []
        for i, (k, v) in enumerate(x.items()):
            if i == self.maxdict:
                parts.append("...")
                break
            parts.append(f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}")
        return "{" + ", ".join(parts) + "}"

    def repr_OrderedDict(self, x, level):
        return "OrderedDict(" + self.repr_dict(x, level) + ")"

    def repr_set(self, x, level):
        return self._items(x, level, "{", "}", self.maxset) if x else "set()"

    def repr_frozenset(self, x, level):
        return "frozenset(" + self._items(x, level, "{", "}", self.maxfrozenset) + ")" if x else "frozenset()"

    def repr_list(self, x, level):
        return self._items(x, level, "[", "]", self.maxlist)

    def repr_tuple(self, x, level):
        return self._items(x, level, "(", ",)" if len(x) == 1 else ")", self.maxtuple)

    def repr_bytes(self, x, level):
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_int(self, x, level):
        if x.bit_length() > 128:
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_instance(self, x, level):
        if isinstance(x, torch.Tensor):
            return f"tensor{tuple(x.shape)}"
        if isinstance(x, (PersistentObject, TorchModule)):
            return repr(x)  # bounded: see their __repr__
        if isinstance(x, (float, complex, bool)) or x is None:
            return repr(x)
        return f"<{type(x).__name__}>"


_SHORT = _ShortRepr()


def short_repr(obj: Any, limit: int = 120) -> str:
    """A bounded, printable repr of anything a checkpoint holds (a few containers deep, a few items each)."""
    return printable(_SHORT.repr(obj), limit)


# ------------------------------------------------------------------------------------------------------------------
# Records.


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
        return f"PersistentObject('{printable(self.class_name, 60)}', {len(self.module_src)} chars of source, " \
               f"not executed)"


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
    return UnsafeCheckpointError(f"checkpoint {printable(name, 200)} asks for {printable(what)}, which memdetect "
                                 f"refuses to load (it could run code)")


class _Bad(Exception):
    """Malformed but not dangerous data; becomes a ModelNotFoundError naming the file."""


class _Refused(Exception):
    """A construct no network pickle needs that could cost unbounded memory or CPU: an UnsafeCheckpointError."""


class _OverLimit(Exception):
    """A budget of ``Limits`` exceeded: an UnsafeCheckpointError."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------------------------
# Budgets.


@dataclass(frozen=True)
class Limits:
    """What reading one checkpoint may cost.

    An NVlabs-format pickle of the EDM CIFAR-10 network (223 MB, 55.7M parameters in 425 tensors, 247 modules, the
    storages nested as legacy torch.save blobs) needs 59,557 opcodes (the nested blobs' included), 4,377 calls,
    8,388 memo entries, 8,174 containers holding 16,946 elements (the largest 21), nesting depth 20, expanded size
    10,348 and 223 MB of tensors in a 223 MB file. The defaults leave 5x (depth) to 30x or more above that, and are
    small enough that a file built to reach any one of them is refused within a few seconds and a few hundred MB.
    """

    opcodes: int = 2_000_000
    calls: int = 200_000  # REDUCE / NEWOBJ / INST / OBJ calls of the allowed globals
    memo: int = 500_000
    containers: int = 200_000  # lists, tuples, dicts, sets, records built
    items: int = 2_000_000  # elements stored in all containers together
    container_len: int = 100_000  # elements of one container
    depth: int = 100  # nesting depth of containers
    expanded: int = 2_000_000  # elements of one container counted once per path that reaches them
    tensors: int = 100_000
    tensor_bytes_factor: float = 2.0  # bytes of all tensor views (and of all decoded storages) / file size
    long_bytes: int = 256  # bytes of one pickled integer (LONG4)
    zip_members: int = 256  # members of one nested torch.save zip blob


LIMITS = Limits()
_HASH_MODULUS = (1 << 61) - 1  # sys.hash_info.modulus (64-bit): ints of smaller magnitude hash to distinct values
_TRACKED_TYPES = frozenset({list, tuple, dict, OrderedDict, set, frozenset})


class _Budget:
    """What one ``load`` has spent, shared by the outer unpickler and those of nested storage blobs."""

    __slots__ = ("limits", "file_size", "opcodes", "calls", "containers", "items", "tensors", "bytes")

    def __init__(self, limits: Limits, file_size: int):
        self.limits, self.file_size = limits, file_size
        self.opcodes = self.calls = self.containers = self.items = self.tensors = 0
        self.bytes = {"tensor": 0, "storage": 0}

    def spend_bytes(self, kind: str, n: int, what: str):
        self.bytes[kind] += n
        cap = self.limits.tensor_bytes_factor * self.file_size
        if self.bytes[kind] > cap:
            raise _OverLimit(f"{what} of more than {self.limits.tensor_bytes_factor:g} x its {self.file_size:,} "
                             f"bytes")


def _safe_key(k) -> bool:
    t = type(k)
    if t is str or t is bytes or t is bool or k is None:
        return True
    return t is int and -_HASH_MODULUS < k < _HASH_MODULUS


def _check_keys(keys):
    for k in keys:
        if not _safe_key(k):
            raise _Refused(f"a dict key or set member of type {type(k).__name__} ({short_repr(k, 60)}); network "
                           f"pickles key by strings, and other keys can be made slow to hash or to collide")


class _Reader:
    """A stream of known size whose reads never ask for more than what is left: a length field in the file cannot
    make the reader allocate more than the file holds."""

    def __init__(self, f, size: int):
        self._f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise _Bad(f"a length of {n:,} bytes where only {self.left:,} are left (a truncated or forged length)")
        data = self._f.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._f.readline()
        self.left -= len(line)
        return line


def _counted(handler):
    def run(self):
        budget = self.budget
        budget.opcodes += 1
        if budget.opcodes > budget.limits.opcodes:
            raise _OverLimit(f"more than {budget.limits.opcodes:,} pickle opcodes")
        handler(self)

    run.__name__ = handler.__name__
    return run


class _BoundedUnpickler(pickle._Unpickler):
    """Python's own unpickler with each opcode counted and each container tracked (see "Budgets" above).

    ``_tracked`` maps id(container) -> [container, depth, expanded size, sealed]; holding the container keeps its
    id from being reused. Atoms (everything else) have depth 0 and size 1. Subclasses define ``find_class``,
    ``persistent_load`` and the functions they allow; calls go through ``_call``.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, reader: _Reader, name: str, budget: _Budget):
        super().__init__(reader)
        self.name, self.budget, self.limits = name, budget, budget.limits
        self._tracked: dict[int, list] = {}
        self._found: dict[int, Any] = {}  # id -> object of what find_class returned (the only callables)

    # -- tracking ------------------------------------------------------------------------------------------------
    def _new(self, obj, children, n_items: int):
        """Record a newly built container holding ``children``; they are sealed (may no longer change)."""
        lim, budget = self.limits, self.budget
        budget.containers += 1
        if budget.containers > lim.containers:
            raise _OverLimit(f"more than {lim.containers:,} containers")
        self._tracked[id(obj)] = [obj, 0, 1, False]
        self._add(obj, children, n_items, held=0)

    def _add(self, obj, children, n_items: int, held: int | None = None):
        """Account for ``children`` (``n_items`` elements) entering the tracked container ``obj``, which holds
        ``held`` elements before them (default: its length)."""
        lim, budget, tracked = self.limits, self.budget, self._tracked
        entry = tracked.get(id(obj))
        if entry is None:
            raise _Bad(f"an item added to a {type(obj).__name__} that the pickle did not build")
        if entry[3]:
            raise _Refused("a container that is changed after it was put into another one (pickle never writes "
                           "that; it is how a few bytes build structures that cost unbounded time to walk)")
        depth, size = entry[1], entry[2]
        for c in children:
            sub = tracked.get(id(c))
            if sub is None:
                size += 1
                continue
            if sub[0] is obj:
                raise _Refused("a container that contains itself")
            sub[3] = True
            if sub[1] >= depth:
                depth = sub[1] + 1
            size += sub[2]
        depth = max(depth, 1)
        if depth > lim.depth:
            raise _OverLimit(f"containers nested more than {lim.depth} deep")
        if size > lim.expanded:
            raise _OverLimit(f"a container that expands to more than {lim.expanded:,} elements when shared parts are "
                             f"counted each time (it would take unbounded time to hash, compare or print)")
        budget.items += n_items
        if budget.items > lim.items:
            raise _OverLimit(f"more than {lim.items:,} elements in containers")
        if held is None:
            held = len(obj) if hasattr(obj, "__len__") else 0
        if held + n_items > lim.container_len:
            raise _OverLimit(f"a container of more than {lim.container_len:,} elements")
        entry[1], entry[2] = depth, size

    @staticmethod
    def _is_container(obj) -> bool:
        return type(obj) in _TRACKED_TYPES or isinstance(obj, (PersistentObject, TorchModule))

    def _call(self, func, args: tuple):
        budget = self.budget
        budget.calls += 1
        if budget.calls > self.limits.calls:
            raise _OverLimit(f"more than {self.limits.calls:,} calls")
        if id(func) not in self._found or self._found[id(func)] is not func:
            raise _Bad(f"a call of a {type(func).__name__} (only the allowed functions can be called)")
        if type(args) is not tuple:
            raise _Bad("a call whose arguments are not a tuple")
        out = func(*args)
        if self._is_container(out) and id(out) not in self._tracked:
            self._new(out, args, len(out) if hasattr(out, "__len__") else len(args))
        return out

    def _found_global(self, obj):
        self._found[id(obj)] = obj
        return obj

    # -- opcodes that build or change containers -----------------------------------------------------------------
    def load_empty_list(self):
        obj = []
        self._new(obj, (), 0)
        self.append(obj)
    dispatch[pickle.EMPTY_LIST[0]] = load_empty_list

    def load_empty_dictionary(self):
        obj = {}
        self._new(obj, (), 0)
        self.append(obj)
    dispatch[pickle.EMPTY_DICT[0]] = load_empty_dictionary

    def load_empty_set(self):
        obj = set()
        self._new(obj, (), 0)
        self.append(obj)
    dispatch[pickle.EMPTY_SET[0]] = load_empty_set

    def _tuple(self, items):
        if not items:
            return ()
        obj = tuple(items)
        self._new(obj, items, len(items))
        return obj

    def load_tuple(self):
        items = self.pop_mark()  # before looking up self.append, which pop_mark rebinds
        self.append(self._tuple(items))
    dispatch[pickle.TUPLE[0]] = load_tuple

    def load_tuple1(self):
        self.stack[-1] = self._tuple(self.stack[-1:])
    dispatch[pickle.TUPLE1[0]] = load_tuple1

    def load_tuple2(self):
        self.stack[-2:] = [self._tuple(self.stack[-2:])]
    dispatch[pickle.TUPLE2[0]] = load_tuple2

    def load_tuple3(self):
        self.stack[-3:] = [self._tuple(self.stack[-3:])]
    dispatch[pickle.TUPLE3[0]] = load_tuple3

    def load_list(self):
        items = self.pop_mark()
        obj = list(items)
        self._new(obj, items, len(items))
        self.append(obj)
    dispatch[pickle.LIST[0]] = load_list

    def load_dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise _Bad("a dict with a key and no value")
        _check_keys(items[0::2])
        obj = {}
        self._new(obj, items, len(items) // 2)
        for i in range(0, len(items), 2):
            obj[items[i]] = items[i + 1]
        self.append(obj)
    dispatch[pickle.DICT[0]] = load_dict

    def load_frozenset(self):
        items = self.pop_mark()
        _check_keys(items)
        obj = frozenset(items)
        self._new(obj, items, len(items))
        self.append(obj)
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def _grow(self, kinds: tuple[type, ...], what: str, items, count: int):
        """The container under the stack top, checked to be of ``kinds`` and charged for ``count`` new entries."""
        target = self.stack[-1]
        if type(target) not in kinds:
            raise _Bad(f"{what} a {type(target).__name__}")
        self._add(target, items, count)
        return target

    def load_append(self):
        value = self.stack.pop()
        self._grow((list,), "an append to", (value,), 1).append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._grow((list,), "an append to", items, len(items)).extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def _setitems(self, items):
        if len(items) % 2:
            raise _Bad("a dict update with a key and no value")
        _check_keys(items[0::2])
        target = self._grow((dict, OrderedDict), "an item assignment to", items, len(items) // 2)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._setitems([key, value])
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        self._setitems(self.pop_mark())
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        items = self.pop_mark()
        _check_keys(items)
        self._grow((set,), "a set update of", items, len(items)).update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, TorchModule):
            if id(inst) not in self._tracked:
                raise _Bad("a module record the pickle did not build")
            self._add(inst, (state,), 0)
            inst.__setstate__(state)
        elif isinstance(inst, (_NumpyDtype, PersistentObject, _Sealed)):
            inst.__setstate__(state)  # records raise; a dtype keeps only its byte order
        else:
            raise _Bad(f"attributes set on a {type(inst).__name__}")
    dispatch[pickle.BUILD[0]] = load_build

    # -- calls ---------------------------------------------------------------------------------------------------
    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass, args):  # INST and OBJ
        self.append(self._call(klass, tuple(args)))

    def _newobj(self, cls, args, kwargs=None):
        if not (isinstance(cls, type) and issubclass(cls, TorchModule) and id(cls) in self._found):
            raise _Bad(f"a NEWOBJ of a {type(cls).__name__} (only module records are built that way)")
        if args != () or kwargs:
            raise _Bad("a module record built with arguments")
        self.budget.calls += 1
        if self.budget.calls > self.limits.calls:
            raise _OverLimit(f"more than {self.limits.calls:,} calls")
        obj = cls.__new__(cls)
        self._new(obj, (), 0)
        self.append(obj)

    def load_newobj(self):
        args = self.stack.pop()
        self._newobj(self.stack.pop(), args)
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        self._newobj(self.stack.pop(), args, kwargs)
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    # -- memo and sizes ------------------------------------------------------------------------------------------
    def _put(self, i):
        if not 0 <= i < 1 << 32:
            raise _Bad(f"a memo index {short_repr(i, 40)}")
        if i not in self.memo and len(self.memo) >= self.limits.memo:
            raise _OverLimit(f"more than {self.limits.memo:,} memo entries")
        self.memo[i] = self.stack[-1]

    def load_put(self):
        self._put(int(self.readline()[:-1]))
    dispatch[pickle.PUT[0]] = load_put

    def load_binput(self):
        self._put(self.read(1)[0])
    dispatch[pickle.BINPUT[0]] = load_binput

    def load_long_binput(self):
        self._put(int.from_bytes(self.read(4), "little"))
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput

    def load_memoize(self):
        self._put(len(self.memo))
    dispatch[pickle.MEMOIZE[0]] = load_memoize

    def load_get(self):
        i = int(self.readline()[:-1])
        if not 0 <= i < 1 << 32 or i not in self.memo:
            raise _Bad(f"a reference to memo entry {short_repr(i, 40)}, which does not exist")
        self.append(self.memo[i])
    dispatch[pickle.GET[0]] = load_get

    def load_long4(self):
        n = int.from_bytes(self.read(4), "little", signed=True)
        if not 0 <= n <= self.limits.long_bytes:
            raise _OverLimit(f"an integer of {n:,} bytes (at most {self.limits.long_bytes})")
        self.append(pickle.decode_long(self.read(n)))
    dispatch[pickle.LONG4[0]] = load_long4

    def load_bytearray8(self):
        n = int.from_bytes(self.read(8), "little")
        if n > self.budget.file_size:
            raise _Bad(f"a bytearray of {n:,} bytes in a file of {self.budget.file_size:,}")
        self.append(bytearray(self.read(n)))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


_BoundedUnpickler.dispatch = {code: _counted(fn) for code, fn in _BoundedUnpickler.dispatch.items()}


class _Unpickler(_BoundedUnpickler):
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

    def __init__(self, reader: _Reader, name: str, budget: _Budget):
        super().__init__(reader, name, budget)
        self._globals: dict[str, Any] = {}

    def find_class(self, module, name):
        attr = self._ALLOWED.get((module, name))
        if attr is None:
            raise refusal(self.name, f"{module}.{name}")
        if attr not in self._globals:  # one object per name, so that _call can recognise it
            self._globals[attr] = _CONTAINERS[name] if attr == "_container" else getattr(self, attr)
        return self._found_global(self._globals[attr])

    def persistent_load(self, pid):
        raise refusal(self.name, "a persistent reference (NVlabs pickles have none)")

    # -- stand-ins -----------------------------------------------------------------------------------------------
    _object = object
    _numpy_dtype = _NumpyDtype

    def _ordered_dict(self, *args):
        if args:  # pickle writes an OrderedDict as OrderedDict() followed by its items
            raise _Bad("an OrderedDict built from arguments")
        return OrderedDict()

    def _set(self, items=()):
        if type(items) not in (list, tuple):
            raise _Bad(f"a set built from a {type(items).__name__}")
        _check_keys(items)
        return set(items)

    def _frozenset(self, items=()):
        return frozenset(self._set(items))

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
            raise _Bad(f"a persistent object of type {short_repr(kind, 40)} with class {short_repr(class_name, 60)}")
        return PersistentObject(kind, meta.get("version"), class_name, src if isinstance(src, str) else "", state)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        if not isinstance(storage, _Storage):
            raise _Bad("a tensor whose storage is not a storage")
        if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride) <= 16
                and all(_is_int(v) and 0 <= v < 1 << 48 for v in (storage_offset, *size, *stride))):
            raise _Bad(f"a tensor with size {short_repr(size, 60)}, stride {short_repr(stride, 60)}, offset "
                       f"{short_repr(storage_offset, 30)}")
        n = storage.data.numel()
        numel = math.prod(size)
        if numel:
            reach = 0  # the largest element offset reachable through the dimensions checked so far
            for st, sz in sorted((st, sz) for sz, st in zip(size, stride) if sz > 1):
                if st == 0:
                    raise _Refused(f"a tensor view with stride 0 (size {size}, stride {stride}), which repeats one "
                                   f"value: network pickles store plain tensors, and such views can expand a few "
                                   f"bytes into gigabytes of parameters")
                if st <= reach:
                    raise _Refused(f"a tensor view whose elements overlap (size {size}, stride {stride}): network "
                                   f"pickles store plain tensors, and such views can expand a few bytes into "
                                   f"gigabytes of parameters")
                reach += st * (sz - 1)
            if storage_offset + reach >= n:
                raise _Bad(f"a tensor of size {size} that reaches beyond its storage of {n} elements")
        budget = self.budget
        budget.tensors += 1
        if budget.tensors > self.limits.tensors:
            raise _OverLimit(f"more than {self.limits.tensors:,} tensors")
        budget.spend_bytes("tensor", numel * storage.data.element_size(), "tensors")
        return torch.as_strided(storage.data, size, stride, storage_offset)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, torch.Tensor):
            raise _Bad("a parameter without a tensor")
        return data

    def _numpy_scalar(self, dtype, data=None):
        import numpy as np

        if not isinstance(dtype, _NumpyDtype) or not isinstance(dtype.name, str) or not isinstance(data, bytes) \
                or len(dtype.name) > 16:
            raise refusal(self.name, "a numpy scalar that is not a plain number")
        try:
            dt = np.dtype(dtype.name).newbyteorder(dtype.byteorder)
        except (TypeError, ValueError):
            raise refusal(self.name, f"a numpy scalar of dtype {short_repr(dtype.name, 40)}") from None
        if dt.kind not in "biufc" or dt.itemsize != len(data):
            raise refusal(self.name, f"a numpy scalar of dtype {short_repr(dtype.name, 40)}")
        return np.frombuffer(data, dtype=dt)[0].item()

    def _codecs_encode(self, obj, encoding="utf-8"):
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
            raise refusal(self.name, f"_codecs.encode with {short_repr(encoding, 40)}")
        self.budget.spend_bytes("storage", len(obj), "bytes decoded")
        return obj.encode("latin1")

    def _load_from_bytes(self, blob):
        if not isinstance(blob, (bytes, bytearray)):
            raise _Bad("a storage that is not bytes")
        self.budget.spend_bytes("storage", len(blob), "tensor storages")
        blob = bytes(blob)
        if blob[:4] == b"PK\x03\x04":
            return _storage_from_zip(blob, self.name, self.budget)
        return _storage_from_legacy(blob, self.name, self.budget)


class _StorageUnpickler(_BoundedUnpickler):
    """Inner unpickler of a storage blob: only ``torch.<Type>Storage`` names and ``('storage', ...)`` references."""

    def __init__(self, reader: _Reader, name: str, budget: _Budget, refs: dict, fill=None):
        super().__init__(reader, name, budget)
        self.refs, self.fill = refs, fill

    def find_class(self, module, name):
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise refusal(self.name, f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])
                and 0 <= pid[4] < 1 << 48):
            raise _Bad(f"a malformed storage reference {short_repr(pid, 80)}")
        key, view = pid[2], pid[5] if len(pid) == 6 else None
        if view is not None and not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                                     and all(_is_int(v) and 0 <= v < 1 << 48 for v in view[1:])):
            raise _Bad(f"a storage view {short_repr(view, 80)}")
        ref = self.refs.get(key)
        if ref is None:
            if len(self.refs) >= self.limits.zip_members:
                raise _OverLimit(f"a storage blob with more than {self.limits.zip_members} storages")
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


def _storage_from_legacy(blob: bytes, name: str, budget: _Budget) -> _Storage:
    """The legacy ``torch.save`` layout: magic, protocol, sys info, storage reference, keys, then raw data."""
    f = io.BytesIO(blob)
    refs: dict[str, _StorageRef] = {}

    def next_pickle():
        return _StorageUnpickler(_Reader(f, len(blob) - f.tell()), name, budget, refs).load()

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


def _zip_archive(blob: bytes, budget: _Budget):
    """Open a ``torch.save`` zip archive held in ``blob``: ``(zipfile, data.pkl member, fill)``, where ``fill(ref)``
    reads a storage reference's data from ``<dir>/data/<key>``.

    Every member must be stored (torch writes no compressed member; a compressed one could expand a few bytes into
    gigabytes) and lie inside the blob; this is checked on the central directory before any member is read.
    """
    zf = zipfile.ZipFile(io.BytesIO(blob))
    infos = zf.infolist()
    if len(infos) > budget.limits.zip_members:
        raise _OverLimit(f"a zipped storage blob of more than {budget.limits.zip_members} members")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Refused(f"a compressed member {printable(info.filename, 60)} in a zipped tensor storage "
                           f"(torch never compresses them, and a small compressed member can expand into "
                           f"gigabytes)")
        if info.compress_size != info.file_size:
            raise _Bad(f"a zipped storage member {printable(info.filename, 60)} whose sizes disagree")
    if sum(info.file_size for info in infos) > len(blob):
        raise _Bad("a zipped storage blob whose members are larger than the blob")
    names = [info.filename for info in infos]
    pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise _Bad("a zipped storage blob without one data.pkl")
    prefix = pkls[0][:-len("data.pkl")]
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
        raise _Bad("a big-endian storage blob")

    def fill(ref: _StorageRef):
        member = f"{prefix}data/{ref.key}"
        size = ref.numel * _element_size(ref.dtype)
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise _Bad(f"a zipped storage blob without {printable(member, 80)}") from None
        if info.file_size != size:
            raise _Bad(f"a zipped storage {printable(member, 80)} of {info.file_size} bytes, expected {size}")
        ref.data = torch.frombuffer(bytearray(zf.read(member)), dtype=ref.dtype) if size else \
            torch.empty(0, dtype=ref.dtype)

    return zf, pkls[0], fill


def _storage_from_zip(blob: bytes, name: str, budget: _Budget) -> _Storage:
    """The zip ``torch.save`` layout: ``<dir>/data.pkl`` referencing ``<dir>/data/<key>`` (``_zip_archive``)."""
    try:
        zf, pkl, fill = _zip_archive(blob, budget)
        data = zf.read(pkl)
        root = _StorageUnpickler(_Reader(io.BytesIO(data), len(data)), name, budget, {}, fill).load()
    except zipfile.BadZipFile as e:
        raise _Bad(f"a damaged zipped storage blob ({printable(str(e), 80)})") from None
    return _resolve(root, name)


class _TensorArchiveUnpickler(_Unpickler):
    """``data.pkl`` of a top-level ``torch.save`` archive: the outer allow-list (tensors, plain containers) plus the
    ``torch.<Type>Storage`` names, and storage references read from the archive (``load_tensors``)."""

    def __init__(self, reader: _Reader, name: str, budget: _Budget, fill):
        super().__init__(reader, name, budget)
        self._storages = _StorageUnpickler(reader, name, budget, {}, fill)  # its reference checks, its refs table

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return _resolve(self._storages.persistent_load(pid), self.name)


def load_tensors(source: str | os.PathLike, *, limits: Limits = LIMITS) -> Any:
    """Read a ``torch.save`` zip archive of tensors in plain containers (lists, tuples, dicts) as data: what
    ``torch.load(weights_only=True)`` reads, through the same allow-list and budgets as ``load`` (no code runs, no
    other global is resolved). Raises ModelNotFoundError for a missing or unreadable file and UnsafeCheckpointError
    for anything refused, each with one sentence."""
    path = Path(source)
    shown = printable(path.name)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ModelNotFoundError(f"{printable(str(path), 200)} does not exist") from None
    except IsADirectoryError:
        raise ModelNotFoundError(f"{printable(str(path), 200)} is a folder, not a torch.save file") from None
    if blob[:4] != b"PK\x03\x04":
        raise ModelNotFoundError(f"{shown} is not a torch.save zip archive")
    budget = _Budget(limits, len(blob))
    try:
        zf, pkl, fill = _zip_archive(blob, budget)
        data = zf.read(pkl)
        return _TensorArchiveUnpickler(_Reader(io.BytesIO(data), len(data)), shown, budget, fill).load()
    except MemdetectError:
        raise
    except zipfile.BadZipFile as e:
        raise ModelNotFoundError(f"cannot read {shown}: a damaged zip archive ({printable(str(e), 80)})") from None
    except _Bad as e:
        raise ModelNotFoundError(f"cannot read {shown}: it holds {e}") from None
    except _Refused as e:
        raise UnsafeCheckpointError(f"{shown} holds {e}, which memdetect refuses to load") from None
    except _OverLimit as e:
        raise UnsafeCheckpointError(f"{shown} exceeds a loading limit ({e}), so memdetect refuses to load it") \
            from None
    except Exception as e:  # anything else a damaged file provokes in the pickle machinery
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise ModelNotFoundError(f"cannot read {shown} as a torch.save file ({type(e).__name__}: "
                                 f"{printable(detail, 160)})") from None


def _stream_size(source) -> tuple[Any, int]:
    """``source`` and how many bytes are left in it (a stream that cannot seek is read into memory)."""
    try:
        pos = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(pos)
        return source, end - pos
    except (AttributeError, OSError, ValueError):
        data = source.read()
        return io.BytesIO(data), len(data)


def load(source: str | os.PathLike | io.BufferedIOBase, *, name: str | None = None,
         limits: Limits = LIMITS) -> Any:
    """Unpickle an NVlabs pickle as data (see the module docstring).

    Raises UnsafeCheckpointError when the pickle asks for anything outside the allow-list (before calling it) or
    exceeds ``limits``, and ModelNotFoundError when the file is missing or is not a readable pickle of this kind.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or path.name
        try:
            with open(path, "rb") as f:
                return load(f, name=name, limits=limits)
        except FileNotFoundError:
            raise ModelNotFoundError(f"checkpoint {printable(str(path), 200)} does not exist") from None
        except IsADirectoryError:
            raise ModelNotFoundError(f"checkpoint {printable(str(path), 200)} is a folder, not a pickle file") \
                from None
    shown = printable(name or "checkpoint")
    head = source.peek(4)[:4] if hasattr(source, "peek") else b""
    if head == b"PK\x03\x04":
        raise ModelNotFoundError(f"{shown} is a torch.save zip archive, not an NVlabs network pickle")
    source, size = _stream_size(source)
    try:
        return _Unpickler(_Reader(source, size), shown, _Budget(limits, size)).load()
    except MemdetectError:
        raise
    except _Bad as e:
        raise ModelNotFoundError(f"cannot read {shown}: it holds {e}") from None
    except _Refused as e:
        raise UnsafeCheckpointError(f"checkpoint {shown} holds {e}, which memdetect refuses to load") from None
    except _OverLimit as e:
        raise UnsafeCheckpointError(f"checkpoint {shown} exceeds a loading limit ({e}), so memdetect refuses to "
                                    f"load it") from None
    except Exception as e:  # anything else a damaged file provokes in the pickle machinery
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise ModelNotFoundError(f"cannot read {shown} as a network pickle ({type(e).__name__}: "
                                 f"{printable(detail, 160)})") from None


def module_tensors(obj, prefix: str = "", *, max_depth: int = 32) -> dict[str, torch.Tensor]:
    """Flatten a record tree (PersistentObject / TorchModule with torch module state) into a state dict.

    Follows ``_modules`` (at most ``max_depth`` levels); takes ``_parameters`` and the persistent ``_buffers`` (None
    entries skipped), as ``nn.Module.state_dict`` would have.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    todo = [(obj, prefix, 0)]
    while todo:
        node, pre, depth = todo.pop()
        where = printable(pre, 160) or "the root"
        if depth > max_depth:
            raise UnsafeCheckpointError(f"the network record nests modules more than {max_depth} deep (at {where})")
        if id(node) in seen:
            raise ModelNotFoundError(f"the network record contains a cycle at {where}")
        seen.add(id(node))
        state = getattr(node, "state", None)
        if not isinstance(state, dict):
            raise ModelNotFoundError(f"the network record {where} has no module state")
        skip = state.get("_non_persistent_buffers_set") or frozenset()
        if not isinstance(skip, (set, frozenset)):
            raise ModelNotFoundError(f"the network record {where} has a malformed _non_persistent_buffers_set")
        for group in ("_parameters", "_buffers"):
            items = state.get(group) or {}
            if not isinstance(items, dict):
                raise ModelNotFoundError(f"the network record {where} has a malformed {group}")
            for k, v in items.items():
                if v is None or (group == "_buffers" and k in skip):
                    continue
                if not isinstance(v, torch.Tensor):
                    raise ModelNotFoundError(f"{printable(pre + str(k), 160)} in the network record is a "
                                             f"{type(v).__name__}, not a tensor")
                out[pre + str(k)] = v
        children = state.get("_modules") or {}
        if not isinstance(children, dict):
            raise ModelNotFoundError(f"the network record {where} has malformed submodules")
        for k, child in reversed(children.items()):
            if child is None:
                continue
            if not isinstance(child, (PersistentObject, TorchModule)):
                raise ModelNotFoundError(f"submodule {printable(pre + str(k), 160)} in the network record is a "
                                         f"{type(child).__name__}")
            todo.append((child, f"{pre}{k}.", depth + 1))
    return out


__all__ = ["LIMITS", "Limits", "PersistentObject", "TorchModule", "load", "module_tensors", "printable", "refusal",
           "short_repr"]
