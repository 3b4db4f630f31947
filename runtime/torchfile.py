"""Read and write PyTorch ``.pt`` checkpoints without torch and without running pickled code.

A ``torch.save`` file (torch >= 1.6) is an uncompressed zip archive::

    <archive>/data.pkl          the pickled object tree; tensors refer to storages by key
    <archive>/data/<key>        raw little-endian bytes of one storage
    <archive>/version, byteorder, .format_version, .storage_alignment, ...

Reading (:func:`load`) unpickles ``data.pkl`` with mapc's restricted unpickler
(:mod:`mapc.runtime.unpickler`), which resolves globals only through the allow-list the
caller passes for its format (:func:`allow_list`; :data:`CORE_GLOBALS` by default): inert
stand-ins for the handful of globals a checkpoint legitimately names (tensor rebuild
functions, storage types, dtypes, ``argparse.Namespace``, numpy arrays, ...). Any other global
is refused with a :class:`MapcError`; no callable from the file is ever looked up in a real
module, and what unpickling builds is bounded in depth, size and work. Tensors come back as lazy
:class:`TensorRef` objects whose :meth:`TensorRef.numpy` maps the bytes straight from the
file with ``np.memmap``.

Writing (:class:`TorchWriter`) streams each tensor into the archive as soon as it is added,
64-byte aligned (so ``torch.load(mmap=True)`` works), and at the end pickles the object tree
with mapc's own pickler, which emits only the opcodes and globals that
``torch.load(weights_only=True)`` accepts.

The legacy (torch < 1.6, non-zip) format is read as well; it is never written.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import functools
import io
import math
import mmap
import os
import pickle
import struct
import types
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Iterator

import ml_dtypes
import numpy as np

from mapc.errors import MapcError
from mapc.runtime import unpickler as _unpickler

__all__ = [
    "ALLOWED_GLOBALS",
    "DTYPES",
    "Namespace",
    "Record",
    "StorageRef",
    "TensorPlaceholder",
    "TensorRef",
    "TorchDType",
    "TorchDevice",
    "TorchSize",
    "TorchWriter",
    "Call",
    "load",
    "AllowList",
    "CORE_GLOBALS",
    "allow_list",
    "copy_checked",
    "repickle",
    "record_type",
]

# --------------------------------------------------------------------------------------
# immutability helpers
# --------------------------------------------------------------------------------------
# The unpickler hands out a few shared objects (dtype records, storage types, record classes)
# and builds tensors from file data. A pickle's BUILD opcode can set attributes on whatever is
# on its stack, so all of these refuse attribute assignment.


class _SealedType(type):
    """Metaclass of the classes the unpickler hands out: their attributes cannot be changed
    after creation (a pickle's BUILD opcode would otherwise be able to set them)."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")


class _Frozen:
    """Base for objects that are immutable once built (``_init`` sets fields during
    construction); a pickle cannot re-point a loaded tensor at other memory."""

    __slots__ = ()

    def _init(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    # Immutable, so copies may share; pickling (by users, e.g. multiprocessing) goes
    # through _restore_frozen rather than slot-by-slot setattr.
    def __copy__(self) -> "_Frozen":
        return self

    def __deepcopy__(self, memo: dict) -> "_Frozen":
        return self

    def __reduce__(self) -> tuple:
        fields = {name: getattr(self, name) for cls in type(self).__mro__
                  for name in cls.__dict__.get("__slots__", ())}
        return (_restore_frozen, (type(self), fields))


def _restore_frozen(cls: type, fields: dict[str, Any]) -> Any:
    self = object.__new__(cls)
    self._init(**fields)
    return self


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------

#: Canonical dtype name (torch's name without the ``torch.`` prefix) -> numpy dtype.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(ml_dtypes, _name):
        DTYPES[_name] = np.dtype(getattr(ml_dtypes, _name))

# Legacy typed storage classes (``torch.FloatStorage`` ...) and the dtype of their elements.
# torch writes tensors of these dtypes as ``_rebuild_tensor_v2(<typed storage>, ...)``; the
# newer dtypes (uint16/32/64, float8) as ``_rebuild_tensor_v3(<UntypedStorage>, ..., dtype)``.
_TYPED_STORAGES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_STORAGE_FOR_DTYPE = {dtype: cls for cls, dtype in _TYPED_STORAGES.items()}

# Every torch dtype name a checkpoint may mention as a value (e.g. ``args.params_dtype``).
# Only those in DTYPES can be the dtype of a tensor mapc reads.
_TORCH_DTYPE_NAMES = sorted(
    set(DTYPES)
    | {"complex32", "qint8", "quint8", "qint32", "quint4x2", "quint2x4", "float8_e8m0fnu",
       "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16"}
    | {f"uint{n}" for n in range(1, 8)}
    | {f"int{n}" for n in range(1, 8)}
)


def _canonical_dtype(dtype: np.dtype) -> str | None:
    """The canonical name of a (native or little-endian) numpy dtype, or None."""
    for name, candidate in DTYPES.items():
        if dtype == candidate:
            return name
    return None


class TorchDType(_Frozen):
    """A ``torch.<name>`` dtype object found in (or to be written into) a checkpoint."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self._init(name=name)

    def __eq__(self, other: object) -> bool:
        return type(other) is TorchDType and other.name == self.name

    def __hash__(self) -> int:
        return hash(("TorchDType", self.name))

    def __repr__(self) -> str:
        return f"TorchDType({self.name!r})"

    def __str__(self) -> str:
        return f"torch.{self.name}"

    @property
    def numpy_dtype(self) -> np.dtype:
        """The equivalent numpy dtype (raises MapcError if there is none)."""
        try:
            return DTYPES[self.name]
        except KeyError:
            raise MapcError(f"torch.{self.name} has no numpy equivalent") from None


class TorchDevice(str):
    """A ``torch.device`` as its string form (``"cpu"``, ``"cuda:0"``); written back as one."""

    __slots__ = ()

    @property
    def type(self) -> str:
        return self.split(":", 1)[0]

    @property
    def index(self) -> int | None:
        _, _, index = self.partition(":")
        return int(index) if index else None

    def __repr__(self) -> str:
        return f"TorchDevice({str(self)!r})"


# --------------------------------------------------------------------------------------
# inert records for pickled Python objects
# --------------------------------------------------------------------------------------


class Record(metaclass=_SealedType):
    """An inert stand-in for a pickled instance of a plain Python class.

    The fields (the object's ``__dict__`` in the file) are kept as they are; no code of the
    original class runs. Fields read as attributes (``rec.lr``) and as items (``rec["lr"]``);
    a field whose name collides with a method here (``keys``, ``items``, ...) is reachable as
    an item. :class:`TorchWriter` writes a record back as an instance of the class it came
    from (``pickle_global``).
    """

    __slots__ = ("_fields",)
    #: (module, qualified name) of the class this record stands for.
    pickle_global: ClassVar[tuple[str, str]] = ("builtins", "object")
    #: the restricted unpickler may create it (NEWOBJ) and BUILD it (once, with a dict)
    _mapc_inert: ClassVar[bool] = True

    def __new__(cls, *args: Any, **kwargs: Any) -> "Record":
        self = object.__new__(cls)
        object.__setattr__(self, "_fields", {})
        return self

    def __init__(self, **fields: Any) -> None:
        self._fields.update(fields)

    # -- pickle protocol (used by the unpickler's BUILD, and by copy/deepcopy) --
    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if part:
                if not isinstance(part, dict):
                    raise MapcError(f"cannot restore a {self._global_name()} from a {type(part).__name__}")
                self._fields.update(part)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self._fields)

    def __reduce__(self) -> tuple:
        return (type(self), (), self.__getstate__())

    # -- attribute access --
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return object.__getattribute__(self, "_fields")[name]
        except KeyError:
            raise AttributeError(f"{self._global_name()} record has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self._fields[name]
        except KeyError:
            raise AttributeError(name) from None

    # -- mapping access --
    def __getitem__(self, name: str) -> Any:
        return self._fields[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def get(self, name: str, default: Any = None) -> Any:
        return self._fields.get(name, default)

    def keys(self):
        return self._fields.keys()

    def items(self):
        return self._fields.items()

    def values(self):
        return self._fields.values()

    def to_dict(self) -> dict[str, Any]:
        """A shallow copy of the fields."""
        return dict(self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields == other._fields

    __hash__ = None  # type: ignore[assignment]  # mutable, like the objects it stands for

    @classmethod
    def _global_name(cls) -> str:
        return ".".join(cls.pickle_global)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._fields.items())
        return f"{self._global_name()}({inner})"


class Namespace(Record):
    """Inert stand-in for ``argparse.Namespace`` (e.g. Megatron's saved ``args``)."""

    __slots__ = ()
    pickle_global = ("argparse", "Namespace")


# --------------------------------------------------------------------------------------
# storages and tensors
# --------------------------------------------------------------------------------------


class _MappedFile:
    """One read-only ``np.memmap`` of a whole checkpoint, created on first use and shared by
    all of its storages (one mapping per file rather than one per tensor)."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size
        self._map: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "_map": None}  # never pickle the mapping

    def bytes_at(self, offset: int, nbytes: int) -> np.ndarray:
        if nbytes == 0:
            return np.empty(0, np.uint8)
        if offset + nbytes > self.size:
            raise MapcError(
                f"truncated: needs {nbytes} bytes at offset {offset} but the file ends at "
                f"{self.size}", where=str(self.path), hint="re-copy the file")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[offset:offset + nbytes]

    def map_range(self, offset: int, nbytes: int) -> np.ndarray:
        """A read-only mapping of just these bytes, unmapped when the caller drops it (so a
        streaming reader's resident memory is bounded by what it holds, not by the file)."""
        if offset + nbytes > self.size:
            raise MapcError(
                f"truncated: needs {nbytes} bytes at offset {offset} but the file ends at "
                f"{self.size}", where=str(self.path), hint="re-copy the file")
        if nbytes == 0:
            return np.empty(0, np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))

    def read_at(self, offset: int, nbytes: int) -> np.ndarray:
        """A fresh copy of the bytes (``pread``; the mapping is not touched, so the memory is
        the caller's and is released when it drops the array)."""
        if offset + nbytes > self.size:
            raise MapcError(
                f"truncated: needs {nbytes} bytes at offset {offset} but the file ends at "
                f"{self.size}", where=str(self.path), hint="re-copy the file")
        buf = np.empty(nbytes, np.uint8)   # not zero-filled: every byte is read into
        view = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            got = 0
            while got < nbytes:
                k = os.preadv(f.fileno(), [view[got:]], offset + got)
                if k <= 0:
                    raise MapcError("truncated while reading", where=str(self.path))
                got += k
        return buf


class StorageRef(_Frozen):
    """A storage record of a checkpoint: ``numel`` elements of ``dtype`` at a file offset.

    Views of one storage (tied weights, slices, transposes) share one StorageRef.
    """

    __slots__ = ("key", "dtype", "numel", "_file", "_offset", "_parent")

    def __init__(self, key: str, dtype: str, numel: int, file: _MappedFile | None,
                 offset: int | None = None, parent: tuple["StorageRef", int] | None = None):
        # _offset: absolute byte offset, None until known (legacy format);
        # _parent: (root storage, byte delta) for legacy storage views
        self._init(key=key, dtype=dtype, numel=numel, _file=file, _offset=offset, _parent=parent)

    def _place(self, offset: int) -> None:
        """Set the data offset once it is known (legacy format)."""
        if self._offset is not None:
            raise MapcError(f"corrupt: storage {self.key} appears twice")
        object.__setattr__(self, "_offset", offset)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def _raw(self) -> np.ndarray:
        """The storage's bytes as a uint8 view of the file mapping."""
        if self._parent is not None:
            root, delta = self._parent
            return root._raw()[delta:delta + self.nbytes]
        if self._offset is None or self._file is None:
            raise MapcError(f"storage {self.key} has no data in the file")
        return self._file.bytes_at(self._offset, self.nbytes)

    def numpy(self) -> np.ndarray:
        """The whole storage as a 1-D read-only array (zero-copy)."""
        return self._raw().view(DTYPES[self.dtype])

    def __repr__(self) -> str:
        return f"StorageRef(key={self.key!r}, dtype={self.dtype!r}, numel={self.numel})"


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major element strides, as torch computes them (a 0-length dim counts as 1)."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class TensorRef(_Frozen):
    """A tensor in a loaded checkpoint; its data stays in the file until :meth:`numpy`.

    ``offset`` and ``stride`` count elements, like torch's ``storage_offset()`` and
    ``stride()``.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "requires_grad", "is_parameter")

    def __init__(self, storage: StorageRef, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...], dtype: str, requires_grad: bool = False):
        self._init(storage=storage, offset=offset, shape=shape, stride=stride, dtype=dtype,
                   requires_grad=requires_grad, is_parameter=False)

    def _mark_parameter(self, requires_grad: Any) -> "TensorRef":
        object.__setattr__(self, "requires_grad", bool(requires_grad))
        object.__setattr__(self, "is_parameter", True)
        return self

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_contiguous(self) -> bool:
        """Row-major contiguous (dims of size 1 may have any stride, as in torch)."""
        expected = _contiguous_strides(self.shape)
        return all(size <= 1 or st == ex for size, st, ex in zip(self.shape, self.stride, expected))

    def _extent(self) -> int:
        """Elements of the storage, from ``offset``, that the view reaches."""
        if self.numel == 0:
            return 0
        return 1 + sum((size - 1) * st for size, st in zip(self.shape, self.stride))

    def _location(self):
        """(file, byte offset) of a contiguous tensor's bytes, or None when it must go through
        :meth:`numpy` (strided, empty, or a legacy storage without a known offset)."""
        st = self.storage
        root, delta = st._parent if st._parent is not None else (st, 0)
        if not self.is_contiguous or self.numel == 0 or root._file is None or \
                root._offset is None:
            return None
        return root._file, root._offset + delta + self.offset * DTYPES[self.dtype].itemsize

    def read(self) -> np.ndarray:
        """The tensor as a fresh, writable, contiguous array, read with ``pread``: nothing of
        the file stays mapped, so streaming readers keep memory bounded."""
        loc = self._location()
        if loc is None:
            return np.array(self.numpy(), copy=True, order="C")
        return loc[0].read_at(loc[1], self.nbytes).view(DTYPES[self.dtype]).reshape(self.shape)

    def map(self) -> np.ndarray:
        """The tensor as a read-only view of its own mapping of the file (no copy; unmapped
        when dropped). Strided tensors are copied (C order)."""
        loc = self._location()
        if loc is None:
            return np.array(self.numpy(), copy=True, order="C")
        return loc[0].map_range(loc[1], self.nbytes).view(DTYPES[self.dtype]).reshape(self.shape)

    def numpy(self) -> np.ndarray:
        """The tensor as a read-only numpy array mapped from the file.

        Contiguous tensors are zero-copy views of the file mapping; other layouts are
        ``as_strided`` views of the storage (also zero-copy, but not contiguous).
        """
        dtype = DTYPES[self.dtype]
        if self.numel == 0:
            return np.zeros(self.shape, dtype)
        raw = self.storage._raw()
        start = self.offset * dtype.itemsize
        if self.is_contiguous:
            return raw[start:start + self.nbytes].view(dtype).reshape(self.shape)
        end = start + self._extent() * dtype.itemsize
        if end > raw.size:  # guaranteed by construction; as_strided must never read past it
            raise MapcError(f"tensor view runs past storage {self.storage.key}")
        # as_strided goes through __array_interface__, which cannot describe ml_dtypes types:
        # stride an opaque same-size view, then reinterpret.
        flat = raw[start:end].view(np.dtype(("V", dtype.itemsize)))
        strided = np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=tuple(s * dtype.itemsize for s in self.stride),
            writeable=False)
        return strided.view(dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"TensorRef(dtype={self.dtype!r}, shape={self.shape}, storage={self.storage.key!r})"


def _make_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str,
                 requires_grad: Any = False) -> TensorRef:
    """Build and validate a TensorRef from a rebuild call's arguments."""
    if not isinstance(storage, StorageRef):
        raise MapcError(f"corrupt tensor record: expected a storage, got {type(storage).__name__}")
    try:
        shape = tuple(int(s) for s in size)
        strides = tuple(int(s) for s in stride)
        offset = int(offset)
    except (TypeError, ValueError):
        raise MapcError(f"corrupt tensor record for storage {storage.key}: size/stride/offset "
                        f"are not integers") from None
    if len(shape) != len(strides) or min(shape + strides + (offset,), default=0) < 0:
        raise MapcError(f"corrupt tensor record for storage {storage.key}: size {shape}, "
                        f"stride {strides}, offset {offset}")
    if dtype not in DTYPES:
        raise MapcError(f"tensor of dtype torch.{dtype} is not supported (no numpy equivalent)")
    ref = TensorRef(storage, offset, shape, strides, dtype, bool(requires_grad))
    needed = (offset + ref._extent()) * ref.itemsize
    if ref.numel and needed > storage.nbytes:
        raise MapcError(f"corrupt tensor record: a {dtype}{list(shape)} view at offset {offset} "
                        f"needs {needed} bytes of storage {storage.key}, which holds "
                        f"{storage.nbytes}")
    return ref


# --------------------------------------------------------------------------------------
# the allow-list
# --------------------------------------------------------------------------------------


class _StorageType(_Frozen):
    """Stand-in for a storage class (``torch.FloatStorage``, ``torch.UntypedStorage``)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self._init(name=name, dtype=dtype)

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


class _TensorClass(metaclass=_SealedType):
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` as class objects; only
    meaningful as the ``new_type`` argument of ``_rebuild_from_type_v2``."""

    _mapc_inert = True      # NEWOBJ(Parameter, (tensor, requires_grad)) is allowed

    def __new__(cls, data: Any = None, requires_grad: bool = True) -> Any:
        if isinstance(data, TensorRef):  # Parameter(data, requires_grad) via NEWOBJ
            return data._mark_parameter(requires_grad)
        raise MapcError("unsupported tensor construction in the checkpoint (not a plain "
                        "torch.save of tensors)")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _make_tensor(storage, storage_offset, size, stride, getattr(storage, "dtype", ""))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _make_tensor(storage, storage_offset, size, stride, getattr(storage, "dtype", ""),
                        requires_grad)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, TorchDType):
        raise MapcError(f"corrupt tensor record: dtype is a {type(dtype).__name__}")
    return _make_tensor(storage, storage_offset, size, stride, dtype.name, requires_grad)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorRef):
        raise MapcError(f"corrupt parameter record: data is a {type(data).__name__}")
    return data._mark_parameter(requires_grad)


def _rebuild_from_type_v2(func, new_type, args, state):
    # ``func`` was itself resolved through the allow-list, so calling it runs no file code.
    if new_type is not _TensorClass:
        raise MapcError("tensor subclasses are not supported")
    return func(*args)


class TorchSize(tuple):
    """A ``torch.Size`` read from a checkpoint: a tuple of ints, written back as a
    ``torch.Size`` (DeepSpeed calls ``.numel()`` on the ``param_shapes`` it loads)."""

    __slots__ = ()

    def numel(self) -> int:
        return math.prod(self)


def _torch_size(dims=()):
    if not isinstance(dims, (list, tuple)):
        raise MapcError(f"corrupt torch.Size record: built from a {type(dims).__name__}")
    return TorchSize(int(d) for d in dims)


def _torch_device(spec, index=None):
    if not isinstance(spec, str):
        raise MapcError(f"corrupt torch.device record: {spec!r}")
    return TorchDevice(spec if index is None else f"{spec}:{int(index)}")


def _encode_text(text, encoding="utf-8", errors="strict"):
    # How protocol-2 pickles spell ``bytes``: ``_codecs.encode(str, "latin1")``.
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("iso8859-1", "utf-8", "ascii"):
        raise MapcError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r}) in pickle")
    return text.encode(encoding, errors)


def _numpy_multiarray():
    core = getattr(np, "_core", None)
    return core.multiarray if core is not None and hasattr(core, "multiarray") else np.core.multiarray


_MULTIARRAY = _numpy_multiarray()


def _ordered_dict(items=()):
    if not isinstance(items, (list, tuple, dict)):
        raise MapcError(f"corrupt OrderedDict record: built from a {type(items).__name__}")
    return collections.OrderedDict(items)


def _counter(items=()):
    if not isinstance(items, (list, tuple, dict)):
        raise MapcError(f"corrupt Counter record: built from a {type(items).__name__}")
    return collections.Counter(items)


def _set(items=()):
    if not isinstance(items, (list, tuple)):
        raise MapcError(f"corrupt set record: built from a {type(items).__name__}")
    return set(items)


def _frozenset(items=()):
    if not isinstance(items, (list, tuple)):
        raise MapcError(f"corrupt frozenset record: built from a {type(items).__name__}")
    return frozenset(items)


def _complex(real=0.0, imag=0.0):
    if not all(type(x) in (int, float) for x in (real, imag)):
        raise MapcError("corrupt complex record: parts are not numbers")
    return complex(real, imag)


def _slice(*args):
    if not all(x is None or type(x) is int for x in args):
        raise MapcError("corrupt slice record: bounds are not integers")
    return slice(*args)


def _bytes(data=b"", *rest):
    # protocol-2 pickles spell b"" as bytes(); a count would allocate that many zero bytes
    if not isinstance(data, (bytes, list, tuple)) or rest:
        raise MapcError(f"corrupt bytes record: built from a {type(data).__name__}")
    return bytes(data)


def _bytearray(data=b"", encoding=None):
    # bytearray(b"...") or bytearray("...", "latin-1"); never a count (bytearray(2**31))
    if isinstance(data, str) and encoding is not None:
        return bytearray(_encode_text(data, encoding))
    if not isinstance(data, (bytes, bytearray)) or encoding is not None:
        raise MapcError(f"corrupt bytearray record: built from a {type(data).__name__}")
    return bytearray(data)


class AllowList(Mapping):
    """The globals a pickle of one format may name, each mapped to its inert stand-in.

    Built per format with :func:`allow_list` and passed to :func:`load` on every call, so
    what a megatron file may name does not depend on which other containers were imported.
    """

    def __init__(self, name: str, entries: Mapping[str, Any]):
        self.name = name
        self._entries = dict(entries)

    def __getitem__(self, key: str) -> Any:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<allow-list {self.name}: {len(self)} globals>"


def _inert(value: Any) -> Any:
    return _unpickler.Inert(value) if isinstance(value, types.FunctionType) else value


_core: dict[str, Any] = {
    "collections.OrderedDict": _ordered_dict,
    "collections.Counter": _counter,
    "builtins.set": _set,
    "builtins.frozenset": _frozenset,
    "builtins.slice": _slice,
    "builtins.complex": _unpickler.Inert(_complex, newobj=True),
    "builtins.bytes": _bytes,
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _encode_text,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": _TensorClass,
    "torch.nn.parameter.Parameter": _TensorClass,
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "torch.storage.UntypedStorage": _StorageType("UntypedStorage", "uint8"),
    "torch.UntypedStorage": _StorageType("UntypedStorage", "uint8"),
    "numpy.ndarray": _unpickler.NDARRAY,
    "numpy.dtype": _unpickler.np_dtype,
    "numpy.core.multiarray._reconstruct": _unpickler.np_reconstruct,
    "numpy._core.multiarray._reconstruct": _unpickler.np_reconstruct,
    "numpy.core.multiarray.scalar": _unpickler.np_scalar,
    "numpy._core.multiarray.scalar": _unpickler.np_scalar,
    "argparse.Namespace": Namespace,
}
_core.update({f"torch.{cls}": _StorageType(cls, dtype) for cls, dtype in _TYPED_STORAGES.items()})
_core.update({f"torch.{name}": TorchDType(name) for name in _TORCH_DTYPE_NAMES})
_core.update({f"ml_dtypes.{name}": DTYPES[name].type for name in DTYPES
              if DTYPES[name].type.__module__.startswith("ml_dtypes")})

_RECORD_TYPES: dict[tuple[str, str], type] = {}
#: Every global some format's allow-list names: what :class:`Call` may write.
_KNOWN_GLOBALS: set[str] = set()


def record_type(module: str, name: str) -> type[Record]:
    """The inert :class:`Record` class standing for instances of ``module.name``: put it in a
    format's :func:`allow_list` to read them, and use it to write them with
    :class:`TorchWriter`. (Creating it allows nothing by itself.)"""
    key = (module, name)
    cls = _RECORD_TYPES.get(key)
    if cls is None:
        cls = _RECORD_TYPES[key] = _SealedType(
            name, (Record,), {"__slots__": (), "pickle_global": key, "__module__": __name__})
    return cls


def allow_list(name: str, *extras: Any) -> AllowList:
    """The core globals (tensors, storages, dtypes, containers, numpy values, ``argparse
    .Namespace``) plus ``extras`` for one format: record classes (from :func:`record_type`)
    and ``{"module.name": function}`` maps (each function gets the call's arguments and must
    check them; it runs no code from the file)."""
    entries = dict(_core)
    for extra in extras:
        if isinstance(extra, type) and issubclass(extra, Record):
            entries[".".join(extra.pickle_global)] = extra
        elif isinstance(extra, Mapping):
            entries.update(extra)
        else:
            raise TypeError(f"allow_list takes record classes and maps, not {extra!r}")
    entries = {k: _inert(v) for k, v in entries.items()}
    _KNOWN_GLOBALS.update(entries)
    return AllowList(name, entries)


# Transformer Engine keeps layer metadata ("_extra_state") as io.BytesIO; read it as an inert
# record (its bytes are never interpreted).
BytesIORecord = record_type("_io", "BytesIO")
_core["_io.BytesIO"] = BytesIORecord

#: What every format's pickles may name (and what :func:`load` allows by default).
CORE_GLOBALS = allow_list("PyTorch")
ALLOWED_GLOBALS = CORE_GLOBALS     # the former name


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50


def load(path: str | os.PathLike, allow: AllowList | None = None, *,
         expect: type | None = None) -> Any:
    """Load a ``torch.save`` file into plain Python objects, with tensors as :class:`TensorRef`.

    ``allow`` is the format's :func:`allow_list` (default :data:`CORE_GLOBALS`): the only
    globals the pickle may name. Never imports torch and never runs code from the file.
    Raises :class:`MapcError` naming the file for anything unreadable, truncated, too large or
    deep to unpickle within bounds, or not on the allow-list, and (``expect``) when the file
    holds something other than an instance of ``expect`` (e.g. ``dict``).
    """
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise MapcError(f"cannot read checkpoint: {e.strerror or e}", where=where) from None
    try:
        if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
            return _expected(_load_zip(path, size, allow), expect)
        if head[:1] == b"\x80":
            return _expected(_load_legacy(path, size, allow), expect)
        if not head:
            raise MapcError("empty file; re-copy the checkpoint")
        if _looks_like_tar(path):
            raise MapcError("this is torch's pre-1.0 tar checkpoint format, which mapc does "
                            "not read", hint="load it with an old torch and torch.save it again")
        raise MapcError("not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    except MapcError as e:
        if e.where is None:
            raise MapcError(e.message, where=where, hint=e.hint) from e
        raise


def _expected(obj: Any, expect: type | None) -> Any:
    if expect is not None and not isinstance(obj, expect):
        raise MapcError(f"the file holds a {type(obj).__name__}, not the {expect.__name__} a "
                        f"checkpoint file of this kind holds", hint="is it the right file?")
    return obj


def _looks_like_tar(path: Path) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _refusal(allow: AllowList) -> Callable[[str], MapcError]:
    def refuse(full: str) -> MapcError:
        return MapcError(
            f"the pickle references {full}; mapc never runs code from a checkpoint and {full} "
            f"is not on its allow-list of inert objects for {allow.name} files",
            hint="re-save the checkpoint with only tensors, containers and plain values "
                 "(e.g. a state_dict)")
    return refuse


def _unpickle_at(buf: Any, pos: int, resolve_storage: Callable[[Any], StorageRef] | None,
                 what: str, allow: AllowList | None = None) -> tuple[Any, int]:
    """Unpickle the pickle at ``buf[pos]`` with the restricted unpickler; (object, end)."""
    allow = CORE_GLOBALS if allow is None else allow
    return _unpickler.unpickle(buf, allow, pos=pos, persistent_load=resolve_storage,
                               refuse=_refusal(allow))


def _unpickle(data: Any, resolve_storage: Callable[[Any], StorageRef] | None, what: str,
              allow: AllowList | None = None) -> Any:
    """Unpickle ``data`` (bytes or a BytesIO) with the restricted unpickler."""
    if isinstance(data, io.BytesIO):
        data = data.getvalue()
    return _unpickle_at(data, 0, resolve_storage, what, allow)[0]


#: Deflate expands at most ~1032:1; a member claiming more than that is corrupt.
_MAX_INFLATE = 1032


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int) -> bytes:
    """A zip member's bytes, after checking its declared sizes against the archive's (so a
    corrupt directory entry cannot make ``zipfile`` allocate what the file does not hold)."""
    if info.compress_size > archive_size or info.file_size > (
            info.compress_size if info.compress_type == zipfile.ZIP_STORED
            else _MAX_INFLATE * info.compress_size + 1024):
        raise MapcError(f"corrupt archive member {info.filename}: it declares {info.file_size} "
                        f"bytes ({info.compress_size} stored) in a {archive_size}-byte archive",
                        hint="re-copy the file")
    return zf.read(info)


def _load_zip(path: Path, size: int, allow: AllowList | None = None) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise MapcError(
            f"truncated or corrupt: the file starts like a torch zip checkpoint but its zip "
            f"directory cannot be read ({e}; the file is {size} bytes)",
            hint="re-copy the file") from None
    with zf:
        members = {info.filename: info for info in zf.infolist()}
        pickles = sorted((n for n in members if n.endswith("data.pkl")
                          and (n == "data.pkl" or n.endswith("/data.pkl")) and n.count("/") <= 1),
                         key=len)
        if not pickles:
            hint = "a TorchScript archive?" if any(n.endswith("constants.pkl") for n in members) else None
            raise MapcError("zip archive has no data.pkl, so it is not a torch.save checkpoint",
                            hint=hint)
        pkl_name = pickles[0]
        prefix = pkl_name[: -len("data.pkl")]
        order = members.get(prefix + "byteorder")
        try:
            if order is not None and read_member(zf, order, size).strip() not in (b"little", b""):
                raise MapcError("big-endian checkpoint; mapc reads little-endian files only")
            pickle_bytes = read_member(zf, members[pkl_name], size)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError,
                NotImplementedError) as e:
            raise MapcError(f"corrupt or truncated archive member: {e}", hint="re-copy the file") from None

    mapped = _MappedFile(path, size)
    storages: dict[str, StorageRef] = {}

    with open(path, "rb") as f:

        def resolve(pid: Any) -> StorageRef:
            key, stype, numel = _parse_storage_pid(pid)
            if key in storages:
                return storages[key]
            info = members.get(f"{prefix}data/{key}")
            if info is None:
                raise MapcError(f"storage {key} is referenced by data.pkl but {prefix}data/{key} "
                                f"is missing from the archive", hint="re-copy the file")
            if info.compress_type != zipfile.ZIP_STORED:
                raise MapcError(f"storage {key} is compressed in the archive; mapc maps storages "
                                f"straight from the file", hint="re-save it with torch.save")
            needed = numel * DTYPES[stype.dtype].itemsize
            if info.file_size < needed:
                raise MapcError(f"corrupt: storage {key} needs {needed} bytes but its archive "
                                f"member holds {info.file_size}", hint="re-copy the file")
            offset = _member_data_offset(f, info, size)
            if offset + needed > size:
                raise MapcError(f"truncated: storage {key} needs {needed} bytes at offset "
                                f"{offset} but the file ends at {size}", hint="re-copy the file")
            storages[key] = StorageRef(key, stype.dtype, numel, mapped, offset)
            return storages[key]

        return _unpickle(pickle_bytes, resolve, pkl_name, allow)


def _parse_storage_pid(pid: Any) -> tuple[str, _StorageType, int]:
    """Validate a zip-format persistent id ``('storage', type, key, location, numel)``."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
        raise MapcError(f"unexpected persistent id {_unpickler._short(pid)} in data.pkl")
    _, stype, key, _location, numel = pid
    if not isinstance(stype, _StorageType):
        raise MapcError(f"unexpected storage type {_unpickler._short(stype)} in data.pkl")
    if isinstance(key, bytes):
        key = key.decode("ascii")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise MapcError(f"corrupt storage record {_unpickler._short(pid)} in data.pkl")
    return key, stype, numel


def _member_data_offset(f: Any, info: zipfile.ZipInfo, size: int) -> int:
    """Where a stored member's bytes start: after its *local* header, whose extra field (the
    alignment padding) may differ in length from the central directory's."""
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
        raise MapcError(f"truncated: the header of {info.filename} at offset {info.header_offset} "
                        f"runs past the end of the file ({size} bytes)", hint="re-copy the file")
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_SIG:
        raise MapcError(f"corrupt: no zip entry header for {info.filename} at offset "
                        f"{info.header_offset}", hint="re-copy the file")
    name_len, extra_len = fields[9], fields[10]
    name = f.read(name_len)
    if name.decode("utf-8", "replace") != info.filename:
        raise MapcError(f"corrupt: the entry header at offset {info.header_offset} names "
                        f"{name!r}, not {info.filename!r}", hint="re-copy the file")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _load_legacy(path: Path, size: int, allow: AllowList | None = None) -> Any:
    """The torch < 1.6 format: magic, protocol and sys-info pickles, the object pickle, a pickle
    of storage keys, then each storage as an int64 element count followed by its bytes."""
    mapped = _MappedFile(path, size)
    roots: dict[str, StorageRef] = {}

    def resolve(pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage")):
            raise MapcError(f"unexpected persistent id {_unpickler._short(pid)} in legacy checkpoint")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0 or \
                not (view is None or isinstance(view, tuple) and len(view) == 3 and
                     all(type(x) is int and x >= 0 for x in view[1:])):
            raise MapcError(f"corrupt storage record {_unpickler._short(pid)}")
        key = str(key)
        root = roots.get(key)
        if root is None:
            root = roots[key] = StorageRef(key, stype.dtype, numel, mapped)
        if view is None:
            return root
        view_key, view_offset, view_numel = view
        itemsize = DTYPES[stype.dtype].itemsize
        if (view_offset + view_numel) * itemsize > root.nbytes:
            raise MapcError(f"corrupt storage view {view_key} of storage {key}")
        return StorageRef(str(view_key), stype.dtype, view_numel, mapped,
                          parent=(root, view_offset * itemsize))

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = []
        pos = 0
        for what in ("magic number", "protocol version", "system info"):
            value, pos = _unpickle_at(buf, pos, None, f"legacy checkpoint header ({what})", allow)
            header.append(value)
        magic, protocol, sys_info = header
        if magic != _LEGACY_MAGIC:
            raise MapcError("not a PyTorch checkpoint (a pickle without torch's magic number)")
        if protocol != _LEGACY_PROTOCOL:
            raise MapcError(f"unsupported legacy checkpoint protocol {_unpickler._short(protocol)}")
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise MapcError("big-endian checkpoint; mapc reads little-endian files only")
        result, pos = _unpickle_at(buf, pos, resolve, "legacy checkpoint object pickle", allow)
        keys, pos = _unpickle_at(buf, pos, None, "legacy checkpoint storage list", allow)
        if not isinstance(keys, list):
            raise MapcError("corrupt legacy checkpoint storage list")
        offset = pos
        for key in keys:
            key = str(key)
            if offset + 8 > size:
                raise MapcError(f"truncated: storage {key} starts at offset {offset} but the "
                                f"file ends at {size}", hint="re-copy the file")
            f.seek(offset)
            (numel,) = struct.unpack("<q", f.read(8))
            storage = roots.get(key)
            if storage is None:
                raise MapcError(f"corrupt: storage {key} is listed but never used")
            nbytes = numel * storage.itemsize
            if numel != storage.numel:
                raise MapcError(f"corrupt: storage {key} holds {numel} elements, the pickle says "
                                f"{storage.numel}")
            if offset + 8 + nbytes > size:
                raise MapcError(f"truncated: storage {key} needs {nbytes} bytes at offset "
                                f"{offset + 8} but the file ends at {size}", hint="re-copy the file")
            storage._place(offset + 8)
            offset += 8 + nbytes
        missing = [k for k, s in roots.items() if s._offset is None]
        if missing:
            raise MapcError(f"corrupt: storages {missing} have no data in the file")
    return result


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------

_ALIGNMENT = 64
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes/offsets at or above this use zip64 fields
_ZIP64_COUNT_LIMIT = 0xFFFF
_CHUNK = 16 << 20
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01: fixed, so output is reproducible
_PAD_FIELD_ID = 0x4D50  # local extra-field id used for alignment padding (ignored by readers)
_ARCHIVE = "archive"


@dataclass(frozen=True, eq=False)
class TensorPlaceholder:
    """Returned by :meth:`TorchWriter.add_tensor`; put it in the object passed to ``finish``."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool = False     # torch's flag in _rebuild_tensor_v2 (e.g. fp32 master copies)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Call:
    """``module.name(*args)`` as a pickle REDUCE, for values whose class is not plain data and
    that pickle by calling their type: ``Call("torch", "Size", ((3, 4),))`` is a ``torch.Size``,
    ``Call("some.module", "SomeIntEnum", (1,))`` an enum member. The global must be one the
    reader allows (``module.name`` on some format's :func:`allow_list`), so mapc reads back
    what it writes."""

    module: str
    name: str
    args: tuple = ()

    def __post_init__(self):
        if f"{self.module}.{self.name}" not in _KNOWN_GLOBALS:
            raise MapcError(f"cannot write a call to {self.module}.{self.name}: it is not on the "
                            f"read allow-list")


@dataclass(frozen=True)
class _Global:
    """A ``module.name`` global to write into the pickle without importing it."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce insists on a callable
        raise TypeError(f"{self.module}.{self.name} is only a name to write into a pickle")


_REBUILD_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_REBUILD_V3 = _Global("torch._utils", "_rebuild_tensor_v3")
_UNTYPED_STORAGE = _Global("torch.storage", "UntypedStorage")
_TORCH_DEVICE = _Global("torch", "device")


class _StorageId:
    """Pickled as the persistent id of one written storage."""

    def __init__(self, placeholder: TensorPlaceholder):
        if placeholder.dtype in _STORAGE_FOR_DTYPE:
            stype, numel = _Global("torch", _STORAGE_FOR_DTYPE[placeholder.dtype]), placeholder.numel
        else:  # torch keeps newer dtypes in an UntypedStorage, counted in bytes
            stype, numel = _UNTYPED_STORAGE, placeholder.numel * DTYPES[placeholder.dtype].itemsize
        self.pid = ("storage", stype, placeholder.key, "cpu", numel)


def _writable_globals() -> dict[int, tuple[Any, str, str]]:
    """Real objects that plain values pickle through (``OrderedDict``, numpy reconstruction,
    ...), by id, with the global name written for them. All are on the read allow-list."""
    table: dict[int, tuple[Any, str, str]] = {}
    for obj, module, name in [
        (collections.OrderedDict, "collections", "OrderedDict"),
        (collections.Counter, "collections", "Counter"),
        (codecs.encode, "_codecs", "encode"),
        (set, "builtins", "set"),
        (frozenset, "builtins", "frozenset"),
        (slice, "builtins", "slice"),
        (complex, "builtins", "complex"),
        (bytearray, "builtins", "bytearray"),
        (np.ndarray, "numpy", "ndarray"),
        (np.dtype, "numpy", "dtype"),
        (_MULTIARRAY._reconstruct, _MULTIARRAY.__name__, "_reconstruct"),
        (_MULTIARRAY.scalar, _MULTIARRAY.__name__, "scalar"),
        *((DTYPES[n].type, "ml_dtypes", n) for n in DTYPES
          if DTYPES[n].type.__module__.startswith("ml_dtypes")),
    ]:
        assert f"{module}.{name}" in CORE_GLOBALS, (module, name)
        table[id(obj)] = (obj, module, name)
    return table


_WRITABLE_GLOBALS = _writable_globals()
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, tuple, list, dict,
                collections.OrderedDict, collections.Counter, set, frozenset, bytearray, slice)


class _CheckpointPickler(pickle._Pickler):  # the pure-Python pickler, so save() can be extended
    """Pickles an object tree as protocol 2 using only opcodes and globals that
    ``torch.load(weights_only=True)`` understands (plus numpy values, which need
    ``weights_only=False`` or an allow-list in torch)."""

    def __init__(self, file: Any, writer: "TorchWriter"):
        super().__init__(file, protocol=2, fix_imports=False)
        self._writer = writer
        self._names: dict[tuple[str, str], Any] = {}

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, (_Global, TorchDType)):
            # one instance per name, so the memo turns repeats into a back-reference
            key = (obj.module, obj.name) if isinstance(obj, _Global) else ("torch", obj.name)
            obj = self._names.setdefault(key, obj)
        if isinstance(obj, _StorageId):
            self.save_pers(obj.pid)
            return
        memo = self.memo.get(id(obj))
        if memo is not None:
            self.write(self.get(memo[0]))
            return
        if isinstance(obj, TensorPlaceholder):
            self._save_tensor(obj)
        elif isinstance(obj, _Global):
            self._write_global(obj.module, obj.name)
            self.memoize(obj)
        elif isinstance(obj, TorchDType):
            self._write_global("torch", obj.name)
            self.memoize(obj)
        elif isinstance(obj, TorchDevice):
            self.save_reduce(_TORCH_DEVICE, (str(obj),), obj=obj)
        elif type(obj) is TorchSize:
            self.save_reduce(_Global("torch", "Size"), (tuple(obj),), obj=obj)
        elif isinstance(obj, Call):
            self.save_reduce(_Global(obj.module, obj.name), tuple(obj.args), obj=obj)
        elif isinstance(obj, Record):
            self._save_instance(obj.pickle_global, obj.to_dict(), obj)
        elif type(obj) is argparse.Namespace:
            self._save_instance(Namespace.pickle_global, dict(vars(obj)), obj)
        elif type(obj) is bytes:
            # protocol 2 has no bytes opcode; torch's reader accepts this spelling (even for b"")
            self.save_reduce(codecs.encode, (obj.decode("latin1"), "latin1"), obj=obj)
        elif isinstance(obj, (TensorRef, StorageRef)):
            raise MapcError(f"a {type(obj).__name__} cannot be written directly; pass it to "
                            f"TorchWriter.add_tensor and put the returned placeholder in its place")
        elif isinstance(obj, np.ndarray) and type(obj) is not np.ndarray:
            super().save(np.asarray(obj), save_persistent_id)  # e.g. np.memmap: save as ndarray
        elif (type(obj) in _PLAIN_TYPES or isinstance(obj, (np.ndarray, np.generic, np.dtype))
              or id(obj) in _WRITABLE_GLOBALS):
            super().save(obj, save_persistent_id)
        else:
            raise MapcError(f"cannot write a {type(obj).__module__}.{type(obj).__qualname__} "
                            f"into a .pt file: mapc writes only tensors, containers, plain values, "
                            f"numpy arrays, dtypes, devices and records")

    def save_global(self, obj: Any, name: str | None = None) -> None:
        entry = _WRITABLE_GLOBALS.get(id(obj))
        if entry is None or entry[0] is not obj:
            raise MapcError(f"cannot write a reference to {obj!r} into a .pt file")
        self._write_global(entry[1], entry[2])
        self.memoize(obj)

    def _write_global(self, module: str, name: str) -> None:
        self.write(pickle.GLOBAL + module.encode("utf-8") + b"\n" + name.encode("utf-8") + b"\n")

    def _save_instance(self, cls: tuple[str, str], fields: dict[str, Any], obj: Any) -> None:
        # cls.__new__(cls) via NEWOBJ, then BUILD with the field dict: what torch accepts.
        self.save(_Global(*cls))
        self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
        self.memoize(obj)
        self.save(fields)
        self.write(pickle.BUILD)

    def _save_tensor(self, ph: TensorPlaceholder) -> None:
        if self._writer._placeholders.get(ph.key) is not ph:
            raise MapcError(f"tensor placeholder {ph.key} was not created by this TorchWriter")
        args: tuple = (_StorageId(ph), 0, ph.shape, _contiguous_strides(ph.shape),
                       bool(ph.requires_grad), collections.OrderedDict())
        if ph.dtype in _STORAGE_FOR_DTYPE:
            self.save_reduce(_REBUILD_V2, args, obj=ph)
        else:
            self.save_reduce(_REBUILD_V3, args + (TorchDType(ph.dtype),), obj=ph)


class _ZipEntry:
    __slots__ = ("name", "crc", "size", "offset")

    def __init__(self, name: bytes, crc: int, size: int, offset: int):
        self.name, self.crc, self.size, self.offset = name, crc, size, offset


class _Reserved:
    """A member laid out by ``reserve_tensor``: its entry, where its data starts, and the
    (offset, length, crc32) of every piece filled so far."""
    __slots__ = ("entry", "data", "pieces")

    def __init__(self, entry: _ZipEntry, data: int):
        self.entry, self.data, self.pieces = entry, data, []


_CRC_POOL = None


def _crc_pool():
    global _CRC_POOL
    if _CRC_POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _CRC_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapc-crc")
    return _CRC_POOL


def _crc32_chunks(chunks) -> int:
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return crc


# -- CRC-32 of a concatenation from the CRCs of its parts (GF(2) polynomial arithmetic) --
#
# A CRC-32 is the message's polynomial times x^32 modulo the generator P, pre- and
# post-conditioned. The CRC of A || B is crc(A) * x^(8 len(B)) mod P xor crc(B), since the
# conditioning terms cancel. Polynomials are 32-bit ints in zlib's reflected bit order
# (bit 31 is x^0), so multiplying by x is a right shift, reduced by the reflected generator.

_CRC_POLY = 0xEDB88320


def _mult_mod_p(a: int, b: int) -> int:
    """a(x) * b(x) mod P, both reflected."""
    product = 0
    bit = 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


def _x_powers() -> list[int]:
    """x^(2^k) mod P for k = 0..63 (x^1 = bit 30)."""
    out = [1 << 30]
    for _ in range(63):
        out.append(_mult_mod_p(out[-1], out[-1]))
    return out


_X_POW2 = _x_powers()


def _x_pow_8n(n: int) -> int:
    """x^(8n) mod P: the shift of a CRC past n bytes."""
    power, k = 1 << 31, 3                   # x^0; 8n = n * 2^3
    while n:
        if n & 1:
            power = _mult_mod_p(_X_POW2[k], power)
        n >>= 1
        k += 1
    return power


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(A + B) from crc1 = zlib.crc32(A), crc2 = zlib.crc32(B) and len(B)."""
    if len2 <= 0:
        return crc1
    return _mult_mod_p(_x_pow_8n(len2), crc1) ^ crc2


# A member filled by rows (a strided fill) has as many pieces as rows; each combine above
# costs ~9 us, so a length that recurs this often gets its shift as four byte tables
_TABLE_AFTER = 32


@functools.lru_cache(maxsize=64)
def _shift_tables(n: int) -> tuple[list[int], ...]:
    """x^(8n) * c mod P as four 256-entry tables, one per byte of c (the product is linear
    in c): a CRC shifted past n bytes by four lookups."""
    power = _x_pow_8n(n)
    tables = []
    for j in range(4):
        basis = [_mult_mod_p(power, 1 << (8 * j + b)) for b in range(8)]
        table = [0] * 256
        for v in range(1, 256):
            low = v & -v
            table[v] = table[v ^ low] ^ basis[low.bit_length() - 1]
        tables.append(table)
    return tuple(tables)


def _crc32_each(views) -> list[int]:
    return [zlib.crc32(v) for v in views]


_ZEROS = bytes(1 << 20)


def crc32_zeros(n: int, crc: int = 0) -> int:
    """zlib.crc32 of n zero bytes, continuing ``crc``."""
    tail = n % len(_ZEROS)
    if n >= len(_ZEROS):                    # whole MiBs: the CRC of one, shifted and doubled
        crc = zlib.crc32(_ZEROS, crc)
        ones = (n // len(_ZEROS)) - 1
        if ones:
            block, size, m = zlib.crc32(_ZEROS), len(_ZEROS), ones   # by doubling
            acc, acc_len = None, 0
            while m:
                if m & 1:
                    acc = block if acc is None else crc32_combine(acc, block, size)
                    acc_len += size
                m >>= 1
                if m:
                    block = crc32_combine(block, block, size)
                    size *= 2
            crc = crc32_combine(crc, acc, acc_len)
    return zlib.crc32(_ZEROS[:tail], crc)


def _array_chunks(array: np.ndarray) -> Iterator[memoryview]:
    """The array's bytes in row-major order, a bounded chunk at a time (no full copy)."""
    if array.size == 0:
        return
    if array.flags.c_contiguous:
        # 1 MiB per write: on this project's VMs one write() of a whole large tensor costs
        # 5x the kernel time of the same bytes in 1 MiB writes (runtime/fastcopy.py)
        from mapc.runtime.fastcopy import WRITE_CHUNK
        data = memoryview(array.reshape(-1).view(np.uint8))
        for start in range(0, len(data), WRITE_CHUNK):
            yield data[start:start + WRITE_CHUNK]
        return
    rows = max(1, _CHUNK // max(1, array[0].nbytes))
    for start in range(0, array.shape[0], rows):
        yield memoryview(np.ascontiguousarray(array[start:start + rows]).reshape(-1).view(np.uint8))


def repickle(obj: Any, path: str | os.PathLike) -> None:
    """Write an object tree as :func:`load` returns it (tensors as :class:`TensorRef`, records)
    into a new ``.pt`` file with mapc's pickler: only inert values, never a byte of the file
    it came from except tensor data. Tensors shared in ``obj`` stay shared."""
    with TorchWriter(path) as w:
        placeholders: dict[int, TensorPlaceholder] = {}

        def convert(x: Any) -> Any:
            if isinstance(x, TensorRef):
                ph = placeholders.get(id(x))
                if ph is None:
                    ph = placeholders[id(x)] = w.add_tensor(x.read(), x.requires_grad)
                return ph
            if type(x) in (dict, collections.OrderedDict):
                new = type(x)((k, convert(v)) for k, v in x.items())
                if getattr(x, "__dict__", None):       # a state_dict's _metadata
                    new.__dict__.update((k, convert(v)) for k, v in x.__dict__.items())
                return new
            if type(x) in (list, tuple, TorchSize):
                return type(x)(convert(v) for v in x)
            if isinstance(x, Record):
                rec = type(x)()
                rec._fields.update((k, convert(v)) for k, v in x.items())
                return rec
            return x

        w.finish(convert(obj))


def copy_checked(src: str | os.PathLike, dst: str | os.PathLike,
                 allow: AllowList | None = None) -> None:
    """"Copy" a ``.pt`` file mapc does not otherwise use: read it with the restricted unpickler
    (``allow``: its format's allow-list) and :func:`repickle` what was read. The copy holds
    only what mapc checked, so a pickle that would run code under ``torch.load`` (or anything
    unreadable) is refused instead of being passed on byte for byte."""
    repickle(load(src, allow), dst)


def append_archive(file, path, obj: Any = None, array: Any = None) -> tuple[int, int]:
    """A ``torch.save`` archive of one tensor (``array``, its shape kept, 0-d included) or of
    a plain object, written at ``file``'s position, as DCP stores each item: (offset, length).
    The tensor's bytes go straight into the file (in-kernel when they are a range of a source
    file), not through an archive built in memory first. ``path`` names the file in errors."""
    from mapc.runtime.fastcopy import FileBytes
    offset = file.tell()
    w = TorchWriter(path, append_to=file)
    if array is not None and not isinstance(array, FileBytes):
        array = np.require(array, requirements="C")
    w.finish(w.add_tensor(array) if array is not None else obj)
    return offset, file.tell() - offset


class _Shifted:
    """A real file seen from byte ``base`` on: positions count from there (an archive written
    inside a larger file, TorchWriter's ``append_to``); ``fileno`` is the file's own."""

    def __init__(self, f, base: int):
        self.f, self.base = f, base

    def tell(self) -> int:
        return self.f.tell() - self.base

    def seek(self, pos: int) -> int:
        return self.f.seek(self.base + pos) - self.base

    def write(self, data) -> int:
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def truncate(self, pos: int) -> None:
        self.f.seek(self.base + pos)
        self.f.truncate()


class TorchWriter:
    """Write a ``.pt`` checkpoint incrementally, loadable by ``torch.load``.

    ::

        w = TorchWriter(path)
        ph = w.add_tensor(array)          # bytes go to the file now
        w.finish({"weight": ph, ...})     # pickle, zip directory; closes the file

    Each tensor is stored uncompressed with its bytes 64-byte aligned, so
    ``torch.load(mmap=True)`` and :func:`load` map it without copying. Used as a context
    manager, the partial file is deleted if the block exits without ``finish``.
    """

    def __init__(self, path: str | os.PathLike, fileobj: Any = None, *, append_to: Any = None):
        """Write to ``path``; or, given ``fileobj`` (a seekable binary file such as BytesIO),
        into it (it is left open; ``path`` then only names it in messages); or, given
        ``append_to`` (a real file open for writing, e.g. a DCP ``.distcp`` data file), at its
        current position as a self-contained archive (its zip offsets count from its own
        start), with the kernel copies and ``pwrite`` of a file of its own: the file is left
        open after :meth:`finish`, and :meth:`abort` truncates it back to where the archive
        began."""
        self.path = Path(path)
        self._owns_file = fileobj is None and append_to is None
        self._base = 0          # where the archive starts in the file (append_to)
        self._fd_writes = fileobj is None   # bytes may go in by descriptor (in-kernel, pwrite)
        if append_to is not None:
            self._base = append_to.tell()
            self._file = _Shifted(append_to, self._base)
        elif fileobj is not None:
            self._file = fileobj
        else:
            try:
                self._file = open(self.path, "wb")
            except OSError as e:
                raise MapcError(f"cannot create checkpoint: {e.strerror or e}",
                                where=str(self.path)) from None
        self._entries: list[_ZipEntry] = []
        self._placeholders: dict[str, TensorPlaceholder] = {}
        self._reserved: dict[str, _Reserved] = {}   # members whose bytes come by fill()
        self._end: int | None = None                # set while suspended (file closed)
        self._closed = False

    def __enter__(self) -> "TorchWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._closed:
            self.abort()

    def add_tensor(self, array: np.ndarray | TensorRef,
                   requires_grad: bool = False) -> TensorPlaceholder:
        """Write one tensor's bytes now; returns the placeholder to use in ``finish``'s object
        (``requires_grad`` sets torch's flag on the loaded tensor)."""
        self._check_open()
        self._reopen()
        if isinstance(array, TensorRef):
            array = array.numpy()
        from mapc.runtime.fastcopy import FileBytes
        if isinstance(array, FileBytes):
            if not self._fd_writes:
                array = np.asarray(array)
            else:      # bytes of source files: copied in-kernel, checksummed from the mapping
                return self._add_member(array, array.mapped(), array.ranges, requires_grad)
        if not isinstance(array, np.ndarray):
            raise MapcError(f"add_tensor takes a numpy array, not a {type(array).__name__}",
                            where=str(self.path))
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        found = self._file_range(array)
        if found is not None:      # copied in-kernel; checksummed from windows of their own
            fb = FileBytes(array.shape, array.dtype, [found + (array.nbytes,)])
            return self._add_member(array, fb.mapped(), fb.ranges, requires_grad)
        return self._add_member(array, _array_chunks(array), None, requires_grad)

    def _add_member(self, array, chunks, ranges, requires_grad) -> TensorPlaceholder:
        dtype = _canonical_dtype(array.dtype)
        if dtype is None:
            raise MapcError(f"cannot write a tensor of numpy dtype {array.dtype}; supported: "
                            f"{', '.join(DTYPES)}", where=str(self.path))
        key = str(len(self._placeholders))
        self._write_member(f"{_ARCHIVE}/data/{key}", chunks, array.nbytes, ranges)
        placeholder = TensorPlaceholder(key, dtype, tuple(int(s) for s in array.shape),
                                        bool(requires_grad))
        self._placeholders[key] = placeholder
        return placeholder

    def reserve_tensor(self, dtype: str, shape, requires_grad: bool = False) -> TensorPlaceholder:
        """Lay out one tensor's member now (local header, space for its bytes) and return its
        placeholder; its bytes come later, in any order, by :meth:`fill`. What no ``fill``
        covers reads as zeros (a hole in the file). The member's CRC-32 is combined from the
        CRCs of the filled pieces at :meth:`finish`: no byte is read back."""
        self._check_open()
        self._reopen()
        if dtype not in DTYPES:
            raise MapcError(f"cannot write a tensor of dtype {dtype}; supported: "
                            f"{', '.join(DTYPES)}", where=str(self.path))
        shape = tuple(int(d) for d in shape)
        size = math.prod(shape) * DTYPES[dtype].itemsize
        key = str(len(self._placeholders))
        f = self._file
        try:
            offset = f.tell()
            data = self._local_header(f"{_ARCHIVE}/data/{key}".encode("utf-8"), size, offset)
            f.seek(data + size)
        except OSError as e:
            self.abort()
            raise MapcError(f"cannot write checkpoint: {e.strerror or e}", where=str(self.path)) from None
        entry = _ZipEntry(f"{_ARCHIVE}/data/{key}".encode("utf-8"), None, size, offset)
        self._entries.append(entry)
        self._reserved[key] = _Reserved(entry, data)
        placeholder = TensorPlaceholder(key, dtype, shape, bool(requires_grad))
        self._placeholders[key] = placeholder
        return placeholder

    def fill(self, placeholder: TensorPlaceholder, at: int, array: np.ndarray,
             stride: int | None = None) -> None:
        """Write ``array``'s bytes (row-major) at byte ``at`` of a reserved tensor's data: by
        ``pwrite`` (in-kernel when they are a range of a source file), while their CRC-32 is
        computed from memory on another core. With ``stride``, the rows of ``array`` (its
        first axis) land ``stride`` bytes apart, row k at byte ``at + k * stride``: a slice of
        a tensor concatenated on an inner axis, written without the rest of it. Pieces must
        not overlap. A suspended writer opens its file for this write only."""
        self._check_open()
        res = self._reserved.get(placeholder.key)
        if res is None or self._placeholders.get(placeholder.key) is not placeholder:
            raise MapcError(f"internal: tensor {placeholder.key} was not reserved by this "
                            f"TorchWriter", where=str(self.path))
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        array = np.ascontiguousarray(array)
        if stride is not None and array.ndim >= 2 and array.shape[0] > 1:
            rows = list(array.reshape(array.shape[0], -1))
        else:
            rows, stride = [array], 0
        n = rows[0].nbytes
        if n == 0:
            return
        end = at + stride * (len(rows) - 1) + n
        if at < 0 or end > res.entry.size:
            raise MapcError(f"internal: bytes {at}..{end} fall outside tensor "
                            f"{placeholder.key} ({res.entry.size} bytes)", where=str(self.path))
        if len(rows) > 1 and stride < n:
            raise MapcError(f"internal: rows of {n} bytes every {stride} bytes overlap in "
                            f"tensor {placeholder.key}", where=str(self.path))
        views = [memoryview(r.reshape(-1).view(np.uint8)) for r in rows]
        job = _crc_pool().submit(_crc32_each, views) if n * len(rows) > _CHUNK else None
        crcs = None
        try:
            if not self._fd_writes:
                f = self._file
                back = f.tell()
                for k, view in enumerate(views):
                    f.seek(res.data + at + k * stride)
                    f.write(view)
                f.seek(back)
            else:
                from mapc.runtime.fastcopy import write_array
                if self._file is not None:
                    self._file.flush()
                    fd, close = self._file.fileno(), False
                else:
                    fd, close = os.open(self.path, os.O_WRONLY), True
                try:
                    for k, row in enumerate(rows):
                        write_array(fd, row, self._base + res.data + at + k * stride,
                                    str(self.path))
                finally:
                    if close:
                        os.close(fd)
        except OSError as e:
            raise MapcError(f"cannot write checkpoint: {e.strerror or e}",
                            where=str(self.path)) from None
        finally:
            crcs = job.result() if job is not None else _crc32_each(views)
        res.pieces.extend((at + k * stride, n, crc) for k, crc in enumerate(crcs))

    def suspend(self) -> None:
        """Close the file until it is next needed (``fill`` opens it per write; ``add_tensor``,
        ``reserve_tensor`` and ``finish`` reopen it): a process writing many files at once
        holds no descriptor for them in between."""
        self._check_open()
        if self._owns_file and self._file is not None:
            self._end = self._file.tell()
            self._file.close()
            self._file = None

    def _reopen(self) -> None:
        if self._file is None:
            try:
                self._file = open(self.path, "r+b")
            except OSError as e:
                self.abort()
                raise MapcError(f"cannot reopen checkpoint: {e.strerror or e}",
                                where=str(self.path)) from None
            self._file.seek(self._end)
            self._end = None

    def _seal_reserved(self) -> None:
        """Every reserved member's CRC-32, from its pieces in order and the zeros between
        them, patched into its local header."""
        f = self._file
        for key, res in self._reserved.items():
            crc, pos = 0, 0
            lengths = collections.Counter(n for _, n, _ in res.pieces)
            for at, n, piece in sorted(res.pieces):
                if at < pos:
                    raise MapcError(f"internal: overlapping writes into tensor {key} at byte "
                                    f"{at}", where=str(self.path))
                if at > pos:
                    crc = crc32_zeros(at - pos, crc)
                if lengths[n] >= _TABLE_AFTER:     # the rows of a strided fill: by lookups
                    t0, t1, t2, t3 = _shift_tables(n)
                    crc = t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ \
                        t3[crc >> 24] ^ piece
                else:
                    crc = crc32_combine(crc, piece, n)
                pos = at + n
            crc = crc32_zeros(res.entry.size - pos, crc)
            res.entry.crc = crc
            end = f.tell()
            f.seek(res.entry.offset + 14)
            f.write(struct.pack("<I", crc))
            f.seek(end)
        self._reserved = {}

    def finish(self, obj: Any) -> None:
        """Pickle ``obj`` (tensors as placeholders), write the zip directory and close.

        If ``obj`` holds something that cannot be written, raises MapcError and leaves the
        writer open (call :meth:`abort` or fix the object and call ``finish`` again).
        """
        self._check_open()
        self._reopen()
        buffer = io.BytesIO()
        try:
            _CheckpointPickler(buffer, self).dump(obj)
        except MapcError as e:
            raise MapcError(e.message, where=str(self.path), hint=e.hint) from None
        except RecursionError:
            raise MapcError("object is nested too deeply (or contains a cycle through a "
                            "container mapc cannot reference)", where=str(self.path)) from None
        try:
            self._seal_reserved()
            records = [
                ("data.pkl", buffer.getvalue()),
                (".format_version", b"1"),
                (".storage_alignment", str(_ALIGNMENT).encode()),
                ("byteorder", b"little"),
                ("version", b"3\n"),
            ]
            for name, data in records:
                self._write_member(f"{_ARCHIVE}/{name}", [memoryview(data)], len(data))
            self._write_directory()
            if self._owns_file:
                self._file.close()
            self._closed = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the partial file (safe to call more than once)."""
        if not self._closed:
            self._closed = True
            if self._owns_file and self._file is not None:
                self._file.close()
        if not self._owns_file:
            if isinstance(self._file, _Shifted):
                self._file.truncate(0)      # the archive's start
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    # -- zip layout --

    def _check_open(self) -> None:
        if self._closed:
            raise MapcError("TorchWriter is already finished or aborted", where=str(self.path))

    def _file_range(self, array: np.ndarray):
        """Where ``array``'s bytes lie in a source file, when this writer owns a real file
        the kernel can copy them into (see runtime/fastcopy.py), else None."""
        from mapc.runtime import fastcopy
        if not self._fd_writes or array.nbytes < fastcopy.MIN_KERNEL_COPY:
            return None
        return fastcopy.file_range(array)

    def _write_member(self, name: str, chunks: Any, size: int, source=None) -> None:
        """Write one stored member: local header (CRC patched afterwards), aligned data.

        With ``source`` ([(path, offset, length), ...]: ranges of files holding the same bytes
        as ``chunks``), the kernel copies them (copy_file_range) while the CRC reads them from
        the mapping on another core."""
        f = self._file
        try:
            offset = f.tell()
            name_bytes = name.encode("utf-8")
            self._local_header(name_bytes, size, offset)
            # The CRC runs on another core while the bytes are written (both release the GIL).
            # Bytes copied from source files (``source``) are read only by the CRC: their chunks
            # stay a generator of windows, mapped one at a time (fastcopy.FileBytes.mapped).
            if source is None:
                chunks = list(chunks)
            crc_job = _crc_pool().submit(_crc32_chunks, chunks) if size > _CHUNK else None
            crc = 0 if crc_job is not None else _crc32_chunks(chunks)
            written = 0
            if source is not None:
                from mapc.runtime.fastcopy import copy_range
                f.flush()
                at = f.tell()
                for path, off, n in source:
                    copy_range(path, off, f.fileno(), self._base + at + written, n,
                               str(self.path))
                    written += n
                f.seek(at + written)
            else:
                for chunk in chunks:
                    f.write(chunk)
                    written += len(chunk)
            if crc_job is not None:
                crc = crc_job.result()
            if written != size:
                raise MapcError(f"internal error: wrote {written} bytes for {name}, expected {size}")
            end = f.tell()
            f.seek(offset + 14)
            f.write(struct.pack("<I", crc))
            f.seek(end)
        except OSError as e:
            self.abort()
            raise MapcError(f"cannot write checkpoint: {e.strerror or e}", where=str(self.path)) from None
        self._entries.append(_ZipEntry(name_bytes, crc, size, offset))

    def _local_header(self, name_bytes: bytes, size: int, offset: int) -> int:
        """Write a stored member's local header at ``offset`` (the file's position), CRC 0
        (patched once known), padded so its data starts 64-byte aligned; returns that start."""
        f = self._file
        zip64 = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        unpadded = offset + _LOCAL_HEADER.size + len(name_bytes) + len(extra) + 4
        pad = -unpadded % _ALIGNMENT
        extra += struct.pack("<HH", _PAD_FIELD_ID, pad) + b"\0" * pad
        size32 = 0xFFFFFFFF if zip64 else size
        f.write(_LOCAL_HEADER.pack(_LOCAL_SIG, 45 if zip64 else 20, 0, 0, 0, _DOS_DATE, 0,
                                   size32, size32, len(name_bytes), len(extra)))
        f.write(name_bytes)
        f.write(extra)
        return offset + _LOCAL_HEADER.size + len(name_bytes) + len(extra)

    def _write_directory(self) -> None:
        f = self._file
        start = f.tell()
        for e in self._entries:
            big_size = e.size >= _ZIP64_LIMIT
            big_offset = e.offset >= _ZIP64_LIMIT
            z64 = ([e.size, e.size] if big_size else []) + ([e.offset] if big_offset else [])
            extra = struct.pack(f"<HH{len(z64)}Q", 1, 8 * len(z64), *z64) if z64 else b""
            version = 45 if z64 else 20
            f.write(struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, 0, 0, _DOS_DATE, e.crc,
                0xFFFFFFFF if big_size else e.size, 0xFFFFFFFF if big_size else e.size,
                len(e.name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF if big_offset else e.offset))
            f.write(e.name)
            f.write(extra)
        end = f.tell()
        count, cd_size = len(self._entries), end - start
        if count >= _ZIP64_COUNT_LIMIT or cd_size >= _ZIP64_LIMIT or start >= _ZIP64_LIMIT:
            f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count,
                                cd_size, start))
            f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
            count16 = 0xFFFF
            cd_size32 = 0xFFFFFFFF if cd_size >= _ZIP64_LIMIT else cd_size
            start32 = 0xFFFFFFFF
        else:
            count16, cd_size32, start32 = count, cd_size, start
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, cd_size32, start32, 0))
