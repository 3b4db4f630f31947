"""torch.distributed.checkpoint (DCP) directories of global, unsharded tensors.

A DCP checkpoint is ``.metadata`` (a pickled ``Metadata``: every tensor's global shape, dtype
and chunks, and where each chunk's bytes are) plus ``__{rank}_{i}.distcp`` files that hold
each chunk as a ``torch.save`` archive at a byte offset. ``dcp.load`` reshards plain global
tensors into any parallel layout, so it cannot express per-rank fused layouts: tensors are
written under their HF names, unsharded (``LAYOUT = "hf"``). mapc writes ``config.json`` and
``mapc.json`` beside ``.metadata``, so its output converts back with no flags.

Reading needs no torch. ``.metadata`` is read by a restricted unpickler whose allow-list holds
only inert stand-ins for torch's metadata dataclasses, dtypes and ``torch.Size``; no callable
named in the file is ever looked up in a real module. Each chunk's ``torch.save`` archive is
parsed in place (:func:`load_torch_at`) and its bytes are mapped lazily, one tensor at a time.
A tensor stored as several chunks (e.g. saved from FSDP or from a sharded ``DTensor``) is
assembled into its global shape when read.

Writing needs no torch either: each tensor becomes its own torch-format archive (mapc's
TorchWriter) appended to ``__0_0.distcp`` as soon as it is built, and ``.metadata`` is pickled
at the end by a tiny writer that names torch's metadata classes as globals, exactly as pickling
the real objects does. ``torch.distributed.checkpoint.load`` and ``dcp_to_torch_save`` read the
result (tested). Memory is bounded by one tensor.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.unpickler import Inert, unpickle
from mapc.runtime.backends import dtype_name
from mapc.runtime.containers.base import MAPC_JSON, Source, write_json
from mapc.runtime.plan_write import (MOMENTS, PlannedWriter, SourceFacts, WritePlan,
                                     WriteRequest, make_plan, planned_tensors)

LAYOUT = "hf"
METADATA = ".metadata"
SUFFIX = ".distcp"
STAGING = ".mapc-staging.bin"
SINGLE = ()
MAX_METADATA = 1 << 30


def detect(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file() and any(path.glob("*" + SUFFIX))


def plan_write(program, facts: SourceFacts, request: WriteRequest) -> WritePlan:
    """One data file, ``.metadata``, config.json and mapc.json; the optimizer moments (and
    Adam's step) when the source has them."""
    slots = ("param",) + MOMENTS
    tensors = planned_tensors(program, facts, request.dtype, slots)
    moments = [s for s in MOMENTS if s in facts.slots]
    dtypes = {dt for *_, dt in tensors}
    step = facts.training.get("step") if moments else None
    decisions = {"data file": DCPWriter.DATA, "optimizer slots": moments or "none",
                 "config dtype": next(iter(dtypes)) if len(dtypes) == 1 else None}
    if moments:
        decisions["optimizer step"] = step
    return make_plan("dcp", [DCPWriter.DATA, METADATA, MAPC_JSON] +
                     (["config.json"] if facts.has_config else []),
                     decisions=decisions, slots=slots, tensors=tensors,
                     detail=decisions["config dtype"],
                     serial=f"one data file ({DCPWriter.DATA}) holds every tensor")


# --------------------------------------------------------------------------------------
# a torch.save archive inside a larger file (a .distcp item, a member of a .nemo tar)
# --------------------------------------------------------------------------------------
class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a seekable read-only file."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self._fd, self._start, self._length, self._pos = f.fileno(), start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self._length - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def load_torch_at(path, offset: int, length: int, what: str = "archive",
                  allow: torchfile.AllowList | None = None) -> Any:
    """Load the ``torch.save`` zip archive stored at bytes ``[offset, offset + length)`` of
    ``path``, like :func:`mapc.runtime.torchfile.load`: restricted unpickling, tensors as lazy
    :class:`~mapc.runtime.torchfile.TensorRef` mapped from ``path`` itself (nothing is copied
    or extracted)."""
    path = Path(path)
    where = f"{path} ({what} at byte {offset})"
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise MapcError(f"cannot read: {e.strerror or e}", where=str(path)) from None
    with f:
        if offset < 0 or length < 0 or offset + length > size:
            raise MapcError(f"truncated: needs bytes {offset}..{offset + length} but the file "
                            f"ends at {size}", where=str(path), hint="re-copy the checkpoint")
        win = _Window(f, offset, length)
        if win.read(4) != b"PK\x03\x04":
            raise MapcError("not a torch.save zip archive (mapc reads the zip format that "
                            "torch >= 1.6 writes, uncompressed)", where=where)
        win.seek(0)
        try:
            zf = zipfile.ZipFile(win)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise MapcError(f"corrupt torch.save archive: {e}", where=where,
                            hint="re-copy the checkpoint") from None
        with zf:
            members = {info.filename: info for info in zf.infolist()}
            pickles = sorted((n for n in members if n == "data.pkl" or
                              (n.endswith("/data.pkl") and n.count("/") == 1)), key=len)
            if not pickles:
                raise MapcError("archive has no data.pkl, so it is not a torch.save archive",
                                where=where)
            prefix = pickles[0][:-len("data.pkl")]
            try:
                order = members.get(prefix + "byteorder")
                if order is not None and torchfile.read_member(zf, order, length).strip() \
                        not in (b"little", b""):
                    raise MapcError("big-endian archive; mapc reads little-endian data only",
                                    where=where)
                pickle_bytes = torchfile.read_member(zf, members[pickles[0]], length)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError,
                    NotImplementedError) as e:
                raise MapcError(f"corrupt archive member: {e}", where=where,
                                hint="re-copy the checkpoint") from None
        mapped = torchfile._MappedFile(path, size)
        storages: dict[str, torchfile.StorageRef] = {}

        def resolve(pid):
            key, stype, numel = torchfile._parse_storage_pid(pid)
            if key in storages:
                return storages[key]
            info = members.get(f"{prefix}data/{key}")
            if info is None:
                raise MapcError(f"storage {key} is referenced by data.pkl but missing",
                                where=where, hint="re-copy the checkpoint")
            if info.compress_type != zipfile.ZIP_STORED:
                raise MapcError(f"storage {key} is compressed; mapc maps storages in place",
                                where=where)
            needed = numel * torchfile.DTYPES[stype.dtype].itemsize
            if info.file_size < needed:
                raise MapcError(f"corrupt: storage {key} needs {needed} bytes, its member "
                                f"holds {info.file_size}", where=where)
            rel = torchfile._member_data_offset(win, info, length)
            if rel + needed > length:
                raise MapcError(f"truncated: storage {key} runs past the archive's end",
                                where=where, hint="re-copy the checkpoint")
            storages[key] = torchfile.StorageRef(key, stype.dtype, numel, mapped, offset + rel)
            return storages[key]

        try:
            return torchfile._unpickle(pickle_bytes, resolve, pickles[0], allow)
        except MapcError as e:
            if e.where is None:
                raise MapcError(e.message, where=where, hint=e.hint) from None
            raise


# --------------------------------------------------------------------------------------
# .metadata: a restricted unpickler with inert stand-ins for torch's dataclasses
# --------------------------------------------------------------------------------------
class _Sealed(type):
    """Metaclass of the stand-in classes: a pickle cannot set attributes on them."""

    def __setattr__(cls, name, value):
        raise AttributeError(f"{cls.__name__} is read-only")


class _Inert(metaclass=_Sealed):
    """A pickled dataclass instance as plain data: its ``__dict__`` state (or, for
    ``TensorProperties``, its state tuple) is kept as given; no class code runs."""

    __slots__ = ("_fields", "_state")
    kind = ""
    _mapc_inert = True      # the restricted unpickler may create and BUILD it (once)

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "_fields", {})
        object.__setattr__(self, "_state", None)
        return self

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) \
                and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **state[1]}   # (dict state, slot state)
        if isinstance(state, dict):
            self._fields.update(state)
        else:
            object.__setattr__(self, "_state", state)

    def __setattr__(self, name, value):
        raise AttributeError(f"{self.kind} record is read-only")

    def get(self, name, default=None):
        return self._fields.get(name, default)

    def __repr__(self):
        return f"{self.kind}({self._fields or self._state!r})"


def _inert_class(name: str) -> type:
    return _Sealed(name, (_Inert,), {"__slots__": (), "kind": name})


def _enum_value(value=None, *rest):
    return value


def _path_str(*parts):
    return "/".join(str(p) for p in parts)


def _layout_name(name=None, *rest):
    return str(name)


def _torch_size(dims=()):
    return tuple(int(d) for d in dims)


_MODS = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
         "torch.distributed.checkpoint.filesystem",
         "torch.distributed._shard.sharded_tensor.metadata",
         "torch.distributed._shard.metadata")
_RECORDS = {name: _inert_class(name) for name in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
    "TensorProperties", "MetadataIndex", "StorageMeta", "_StorageInfo", "_StoragePrefix",
    "ShardMetadata",
    # megatron-core keeps every rank's save plan in the metadata (all_local_plans)
    "SavePlan", "WriteItem", "TensorWriteData")}
_FUNCS = {
    "_MEM_FORMAT_ENCODING": _enum_value, "MEM_FORMAT_ENCODING": _enum_value,
    "WriteItemType": _enum_value,
}
METADATA_GLOBALS: dict[str, Any] = {}
for _mod in _MODS:
    METADATA_GLOBALS.update({f"{_mod}.{n}": c for n, c in _RECORDS.items()})
    METADATA_GLOBALS.update({f"{_mod}.{n}": Inert(fn) for n, fn in _FUNCS.items()})
METADATA_GLOBALS.update({
    "torch.Size": Inert(_torch_size),
    "torch.serialization._get_layout": Inert(_layout_name),
    "torch.strided": "torch.strided",
    "torch.contiguous_format": "torch.contiguous_format",
    "pathlib.PosixPath": Inert(_path_str), "pathlib.PurePosixPath": Inert(_path_str),
    "pathlib.WindowsPath": Inert(_path_str), "pathlib.PureWindowsPath": Inert(_path_str),
    "pathlib.Path": Inert(_path_str),
    "collections.OrderedDict": torchfile.CORE_GLOBALS["collections.OrderedDict"],
})
METADATA_GLOBALS.update({k: v for k, v in torchfile.CORE_GLOBALS.items()
                         if isinstance(v, torchfile.TorchDType)})


METADATA_GLOBALS = torchfile.AllowList("torch.distributed.checkpoint .metadata",
                                       METADATA_GLOBALS)


def _refuse_metadata_global(full):
    return MapcError(f"the metadata pickle references {full}; mapc never runs code from a "
                     f"checkpoint and {full} is not on its allow-list of inert objects")


def read_metadata(path: Path):
    """The ``.metadata`` of a DCP directory as inert records."""
    f = Path(path) / METADATA
    try:
        if f.stat().st_size > MAX_METADATA:
            raise MapcError(f"{METADATA} is implausibly large", where=str(f))
        data = f.read_bytes()
    except OSError as e:
        raise MapcError(f"cannot read: {e.strerror or e}", where=str(f)) from None
    try:
        md, _ = unpickle(data, METADATA_GLOBALS, refuse=_refuse_metadata_global)
    except MapcError as e:
        raise MapcError(e.message, where=str(f), hint=e.hint or "re-copy the checkpoint") \
            from None
    if type(md) is not _RECORDS["Metadata"] or not isinstance(
            md.get("state_dict_metadata"), dict):
        raise MapcError("not a torch.distributed.checkpoint Metadata", where=str(f))
    return md


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
class _Chunk:
    __slots__ = ("offsets", "sizes", "file", "offset", "length")

    def __init__(self, offsets, sizes, file, offset, length):
        self.offsets, self.sizes, self.file = offsets, sizes, file
        self.offset, self.length = offset, length


def index_tensors(path: Path, md) -> dict:
    """``{fqn: (global shape, dtype name, [chunk])}`` of every tensor in a DCP ``.metadata``
    (bytes entries, i.e. pickled objects, are left out); every chunk is checked to lie inside
    the checkpoint directory and inside its tensor, and the chunks to cover the tensor."""
    where = str(Path(path) / METADATA)
    storage = {}
    for index, info in (md.get("storage_data") or {}).items():
        fqn, off = index.get("fqn"), index.get("offset")
        storage[(fqn, tuple(off) if off is not None else None)] = info
    tensors = {}
    sizes_on_disk: dict = {}
    for fqn, entry in md.get("state_dict_metadata").items():
        if type(entry) is not _RECORDS["TensorStorageMetadata"]:
            continue        # bytes entries (non-tensor objects) are not weights
        props, size = entry.get("properties"), entry.get("size")
        state = getattr(props, "_state", None)
        dtype = state[0] if isinstance(state, tuple) and state else \
            props.get("dtype") if props is not None else None
        if not isinstance(dtype, torchfile.TorchDType) or dtype.name not in \
                torchfile.DTYPES:
            raise MapcError(f"tensor {fqn} has an unsupported dtype {dtype!r}", where=where)
        shape = tuple(int(s) for s in size)
        chunks = []
        for ch in entry.get("chunks") or []:
            offs = tuple(int(x) for x in ch.get("offsets"))
            sizes = tuple(int(x) for x in ch.get("sizes"))
            info = storage.get((fqn, offs))
            if info is None:
                raise MapcError(f"no storage entry for chunk {list(offs)} of {fqn}",
                                where=where, hint="re-copy the checkpoint")
            if info.get("transform_descriptors"):
                raise MapcError(f"{fqn} is stored with transforms "
                                f"{list(info.get('transform_descriptors'))} (e.g. "
                                f"compression), which mapc does not read", where=where)
            rel = PurePosixPath(str(info.get("relative_path")))
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise MapcError(f"storage path '{rel}' of {fqn} leaves the checkpoint",
                                where=where)
            file = Path(path) / rel
            if len(offs) != len(shape) or len(sizes) != len(shape) or any(
                    o < 0 or o + s > d for o, s, d in zip(offs, sizes, shape)):
                raise MapcError(f"chunk {list(offs)}+{list(sizes)} of {fqn} does not fit "
                                f"its shape {list(shape)}", where=where)
            offset, length = int(info.get("offset")), int(info.get("length"))
            if file not in sizes_on_disk:
                try:
                    sizes_on_disk[file] = file.stat().st_size
                except OSError as e:
                    raise MapcError(f"cannot read the storage of {fqn}: "
                                    f"{e.strerror or e}", where=str(file)) from None
            if offset < 0 or length < 0 or offset + length > sizes_on_disk[file] or \
                    math.prod(sizes) * torchfile.DTYPES[dtype.name].itemsize > length:
                raise MapcError(f"chunk {list(offs)} of {fqn} ({list(sizes)} of "
                                f"{dtype.name}) does not fit bytes {offset}+{length} of "
                                f"{rel} ({sizes_on_disk[file]} bytes)", where=where,
                                hint="re-copy the checkpoint")
            chunks.append(_Chunk(offs, sizes, file, offset, length))
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape):
            raise MapcError(f"the chunks of {fqn} do not cover its shape {list(shape)}",
                            where=where, hint="the checkpoint is incomplete")
        tensors[fqn] = (shape, dtype.name, chunks)
    return tensors


def chunk_ref(name, chunk: _Chunk, dtype: str):
    """The stored chunk of tensor ``name`` as a lazy TensorRef, checked against the metadata."""
    ref = load_torch_at(chunk.file, chunk.offset, chunk.length, f"chunk of {name}")
    if not isinstance(ref, torchfile.TensorRef):
        raise MapcError(f"the stored chunk of {name} is a {type(ref).__name__}, not a "
                        f"tensor", where=str(chunk.file))
    if tuple(ref.shape) != chunk.sizes or ref.dtype != dtype:
        raise MapcError(f"the stored chunk of {name} is {ref.dtype}{list(ref.shape)}, the "
                        f"metadata says {dtype}{list(chunk.sizes)}", where=str(chunk.file))
    return ref


def read_entry(name, entry, index: int | None = None):
    """Tensor ``name`` (an ``index_tensors`` entry) assembled from its chunks; with ``index``,
    only its slab ``[index]`` on the leading axis (reading just the chunks that hold it)."""
    shape, dtype, chunks = entry
    lo, hi = (0, shape[0] if shape else 1) if index is None else (index, index + 1)
    if index is not None:
        chunks = [c for c in chunks if c.offsets[0] < hi and c.offsets[0] + c.sizes[0] > lo]
    if len(chunks) == 1 and chunks[0].sizes == shape and index is None:
        return chunk_ref(name, chunks[0], dtype).map()
    if index is not None and len(chunks) == 1 and chunks[0].sizes[0] == 1 and \
            chunks[0].sizes[1:] == shape[1:]:
        return chunk_ref(name, chunks[0], dtype).map()[0]
    out = np.empty((hi - lo,) + tuple(shape[1:]) if shape else (), torchfile.DTYPES[dtype])
    for c in chunks:
        data = chunk_ref(name, c, dtype).read()
        if not shape:
            out[...] = data
            continue
        a, b = max(lo, c.offsets[0]), min(hi, c.offsets[0] + c.sizes[0])
        region = (slice(a - lo, b - lo),) + tuple(
            slice(o, o + s) for o, s in zip(c.offsets[1:], c.sizes[1:]))
        out[region] = data[a - c.offsets[0]:b - c.offsets[0]]
    return out if index is None else out[0]


class DCPSource(Source):
    format = "dcp"
    layout = "hf"

    def __init__(self, path):
        super().__init__(path)
        if not self.path.is_dir():
            raise MapcError("a DCP checkpoint is a directory", where=str(self.path))
        megatron = self.path / "metadata.json"
        if megatron.is_file() and "sharded_backend" in megatron.read_text(errors="replace"):
            raise MapcError("this is a Megatron distributed (torch_dist) checkpoint, whose "
                            "tensors are megatron-core's, not HF tensors",
                            where=str(self.path), hint="read it with --from torch_dist")
        cfg = self.path / "config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text())
            except (OSError, ValueError) as e:
                raise MapcError(f"cannot read config.json: {e}", where=str(self.path)) \
                    from None
        else:
            self.config = self.record.get("config")
        self.format_meta = self.config or {}
        md = read_metadata(self.path)
        try:
            self.tensors = self._index(md)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError,
                OverflowError) as e:   # a field of the wrong type in the (untrusted) metadata
            raise MapcError(f"corrupt {METADATA}: {type(e).__name__}: {e}",
                            where=str(self.path / METADATA),
                            hint="re-copy the checkpoint") from None
        # Optimizer state saved as get_state_dict lays it out: optim.state.<fqn>.<slot>
        self.optim = {k: v for k, v in self.tensors.items() if k.startswith("optim.state.")}
        for k in self.optim:
            del self.tensors[k]
        self._slots = sorted({k.rsplit(".", 1)[1] for k in self.optim} & {"exp_avg",
                                                                          "exp_avg_sq"})

    def _index(self, md) -> dict:
        return self._unnest(index_tensors(self.path, md), md.get("planner_data") or {})

    @staticmethod
    def _unnest(tensors: dict, planner: dict) -> dict:
        """``dcp.save({"model": state_dict})`` flattens keys to ``model.<name>``; when every
        tensor sits under one such top-level key, name tensors by their key inside it."""
        paths = [planner.get(fqn) for fqn in tensors]
        if not tensors or not all(isinstance(p, (tuple, list)) and len(p) == 2
                                  and all(isinstance(x, str) for x in p) for p in paths):
            return tensors
        if len({p[0] for p in paths}) != 1 or len({p[1] for p in paths}) != len(paths):
            return tensors
        return {p[1]: t for p, t in zip(paths, tensors.values())}

    def coords(self):
        return [SINGLE]

    def names(self, coord=SINGLE):
        return list(self.tensors)

    def _get(self, name):
        try:
            return self.tensors[name]
        except KeyError:
            raise MapcError(f"tensor {name} is not in the checkpoint", where=str(self.path)) \
                from None

    def slots(self):
        return ["param"] + self._slots

    def stateless(self, coord=SINGLE):
        """With optimizer state: the tensors that have none (kinds as mapc recorded them, else
        non-float tensors are buffers and float ones frozen parameters)."""
        if not self._slots:
            return {}
        kinds = self.record.get("tensor_kinds") or {}
        return {n: kinds.get(n) or ("frozen" if self.tensors[n][1] in _FLOATS else "buffer")
                for n in self.tensors if f"optim.state.{n}.{self._slots[0]}" not in self.optim}

    def aliases(self):
        return dict(self.record.get("aliases") or {})

    def training_state(self):
        steps = [k for k in self.optim if k.endswith(".step")]
        if not steps:
            return dict(self.record.get("training") or {})
        step = float(np.asarray(self._read_entry(steps[0], self.optim[steps[0]])))
        return dict(self.record.get("training") or {}, step=step)

    def shape(self, name, coord=SINGLE):
        return self._get(name)[0]

    def dtype(self, name, coord=SINGLE, slot="param"):
        if slot != "param":
            return self.optim[f"optim.state.{name}.{slot}"][1]
        return self._get(name)[1]

    def read(self, name, coord=SINGLE, slot="param"):
        if slot != "param":
            key = f"optim.state.{name}.{slot}"
            if key not in self.optim:
                raise MapcError(f"no {slot} for {name} in the checkpoint", where=str(self.path))
            return self._read_entry(key, self.optim[key])
        return self._read_entry(name, self._get(name))

    def _read_entry(self, name, entry):
        return read_entry(name, entry)

    def describe_coord(self, coord):
        return "global tensors"


Source = DCPSource
_FLOATS = ("float32", "bfloat16", "float16", "float64")


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
class _MetadataPickler:
    """Writes DCP's ``.metadata`` pickle without torch: the few classes it references
    (Metadata, TensorStorageMetadata, TensorProperties, ChunkStorageMetadata, MetadataIndex,
    _StorageInfo, StorageMeta, torch.Size, dtypes) are emitted as globals by name, each
    dataclass as NEWOBJ + BUILD of its fields, exactly as pickling torch's own objects does."""

    MD = "torch.distributed.checkpoint.metadata"

    def __init__(self):
        self.out = bytearray(b"\x80\x02")          # PROTO 2

    def dumps(self, obj) -> bytes:
        self.value(obj)
        self.out += b"."
        return bytes(self.out)

    def global_(self, module, name):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def dataclass(self, module, name, fields: dict):
        self.global_(module, name)
        self.out += b")\x81"                        # EMPTY_TUPLE NEWOBJ
        self.value(fields)
        self.out += b"b"                             # BUILD

    def reduce(self, module, name, *args):
        self.global_(module, name)
        self.value(tuple(args))
        self.out += b"R"

    def value(self, v):
        if isinstance(v, _Emit):
            v.emit(self)
        elif v is None:
            self.out += b"N"
        elif v is True or v is False:
            self.out += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            if -2**31 <= v < 2**31:
                self.out += b"J" + v.to_bytes(4, "little", signed=True)
            else:
                raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                self.out += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(v, str):
            raw = v.encode()
            self.out += b"X" + len(raw).to_bytes(4, "little") + raw
        elif isinstance(v, tuple):
            self.out += b"("
            for x in v:
                self.value(x)
            self.out += b"t"
        elif isinstance(v, list):
            self.out += b"]("
            for x in v:
                self.value(x)
            self.out += b"e"
        elif isinstance(v, dict):
            self.out += b"}("
            for k, x in v.items():
                self.value(k)
                self.value(x)
            self.out += b"u"
        else:
            raise MapcError(f"internal: cannot write {type(v).__name__} into DCP metadata")


class _Emit:
    def __init__(self, fn):
        self.emit = fn


def _size(dims):
    return _Emit(lambda p: p.reduce("torch", "Size", tuple(dims)))


def _tensor_metadata(shape, dtype, chunks=None):
    """TensorStorageMetadata of a tensor of global ``shape``; ``chunks``: its
    ``(offsets, sizes)`` (default: one chunk, the whole tensor)."""
    md = _MetadataPickler.MD

    def properties(p):
        p.global_(md, "TensorProperties")
        p.out += b")\x81"
        p.out += b"("
        p.global_("torch", dtype)                                 # dtype
        p.reduce("torch.serialization", "_get_layout", "torch.strided")
        p.value(False)                                            # requires_grad
        p.reduce(md, "_MEM_FORMAT_ENCODING", 0)                   # torch.contiguous_format
        p.value(False)                                            # pin_memory
        p.out += b"tb"
    chunks = chunks or [((0,) * len(shape), tuple(shape))]
    return _Emit(lambda p: p.dataclass(md, "TensorStorageMetadata", {
        "properties": _Emit(properties), "size": _size(shape),
        "chunks": [_Emit(lambda q, o=o, z=z: q.dataclass(md, "ChunkStorageMetadata",
                                                         {"offsets": _size(o), "sizes": _size(z)}))
                   for o, z in chunks]}))


def write_chunked_metadata(path: Path, tensors: dict, objects: dict, relative: str,
                           planner_data=None) -> None:
    """A ``.metadata`` of tensors stored as several chunks and of pickled objects, all in the
    data file ``relative`` beside ``path``. ``tensors``: fqn -> (global shape, dtype,
    [(offsets, sizes, byte offset, length)]); ``objects``: fqn -> (byte offset, length) of a
    ``torch.save`` archive (a bytes entry, as DCP stores non-tensor objects)."""
    import uuid
    md = _MetadataPickler.MD
    fs = "torch.distributed.checkpoint.filesystem"

    def info(offset, length):
        return _Emit(lambda p: p.dataclass(fs, "_StorageInfo", {
            "relative_path": relative, "offset": offset, "length": length,
            "transform_descriptors": None}))
    storage, entries = {}, {}
    for fqn, (shape, dtype, chunks) in tensors.items():
        entries[fqn] = _tensor_metadata(shape, dtype, [(o, z) for o, z, _, _ in chunks])
        for k, (offs, _, offset, length) in enumerate(chunks):
            key = _Emit(lambda p, fqn=fqn, offs=offs, k=k: p.dataclass(md, "MetadataIndex", {
                "fqn": fqn, "index": k, "offset": _size(offs)}))
            storage[key] = info(offset, length)
    for fqn, (offset, length) in objects.items():
        entries[fqn] = _Emit(lambda p: p.dataclass(md, "BytesStorageMetadata", {}))
        key = _Emit(lambda p, fqn=fqn: p.dataclass(md, "MetadataIndex", {
            "fqn": fqn, "index": None, "offset": None}))
        storage[key] = info(offset, length)
    meta = _Emit(lambda p: p.dataclass(md, "Metadata", {
        "state_dict_metadata": entries, "planner_data": planner_data, "storage_data": storage,
        "storage_meta": _Emit(lambda q: q.dataclass(
            md, "StorageMeta",
            {"checkpoint_id": None, "save_id": str(uuid.uuid4()), "load_id": None,
             "modules": []})),
        "version": "1.0.0"}))
    Path(path).write_bytes(_MetadataPickler().dumps(meta))


def write_metadata(path: Path, entries: dict, relative: str, paths: dict | None = None) -> None:
    """``entries``: fqn -> (offset, length, shape, dtype) of each tensor's archive in
    ``relative`` (a .distcp file beside ``path``); ``paths``: fqn -> its path in the nested
    state dict, for entries that are not top-level (e.g. optimizer state)."""
    paths = paths or {}
    import uuid
    md = _MetadataPickler.MD
    storage = {}
    for fqn, (offset, length, shape, _) in entries.items():
        key = _Emit(lambda p, fqn=fqn, shape=shape: p.dataclass(md, "MetadataIndex", {
            "fqn": fqn, "index": 0, "offset": _size([0] * len(shape))}))
        storage[key] = _Emit(lambda p, offset=offset, length=length: p.dataclass(
            "torch.distributed.checkpoint.filesystem", "_StorageInfo",
            {"relative_path": relative, "offset": offset, "length": length,
             "transform_descriptors": None}))
    meta = _Emit(lambda p: p.dataclass(md, "Metadata", {
        "state_dict_metadata": {fqn: _tensor_metadata(shape, dt)
                                for fqn, (_, _, shape, dt) in entries.items()},
        "planner_data": {fqn: paths.get(fqn, (fqn,)) for fqn in entries},
        "storage_data": storage,
        "storage_meta": _Emit(lambda q: q.dataclass(
            md, "StorageMeta",
            {"checkpoint_id": None, "save_id": str(uuid.uuid4()), "load_id": None,
             "modules": []})),
        "version": "1.0.0"}))
    Path(path).write_bytes(_MetadataPickler().dumps(meta))


class DCPWriter(PlannedWriter):
    """Writes a single-rank DCP checkpoint without torch, streaming: every tensor becomes its
    own torch-format archive appended to ``__0_0.distcp`` as soon as it arrives; ``.metadata``
    is written at the end.

    Optimizer state, when the source has it, is stored as torch's ``get_state_dict`` lays it
    out: ``optim.state.<fqn>.{exp_avg,exp_avg_sq,step}``, so ``dcp.load`` fills an optimizer
    state dict directly. Param-group hyper-parameters are kept in mapc.json's ``training``."""
    keeps_arrays = False    # every array is written before write() returns

    DATA = "__0_0" + SUFFIX

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        self.entries: dict[str, tuple] = {}
        self.paths: dict[str, tuple] = {}
        self.order: list[str] = []
        self.optim_names: list[str] = []
        self.file = None

    def begin_slot(self, slot, tensors):
        for _, name, _, _ in tensors:
            self.order.append(f"optim.state.{name}.{slot}")
            if name not in self.optim_names:
                self.optim_names.append(name)

    def write_slot(self, slot, coord, name, arr):
        key = f"optim.state.{name}.{slot}"
        self.paths[key] = ("optim", "state", name, slot)
        self.write(coord, key, arr)

    def begin(self, tensors):
        self.order = [name for _, name, _, _ in tensors]
        self.file = open(self.dir / self.DATA, "wb")

    def write(self, coord, name, arr):
        offset, length = torchfile.append_archive(self.file, self.dir / self.DATA, array=arr)
        self.entries[name] = (offset, length, tuple(arr.shape), dtype_name(arr.dtype))

    def finish(self, record: dict):
        step = (record.get("training") or {}).get("step")
        if self.optim_names and step is not None:   # Adam's per-parameter step counter
            for name in self.optim_names:
                key = f"optim.state.{name}.step"
                self.paths[key] = ("optim", "state", name, "step")
                self.write((), key, np.asarray(step, dtype=np.float32))
                self.order.append(key)
        self.file.close()
        missing = [n for n in self.order if n not in self.entries]
        if missing:
            raise MapcError(f"internal: {len(missing)} tensors were never written, e.g. "
                            f"{missing[0]}")
        write_metadata(self.dir / METADATA, {n: self.entries[n] for n in self.order}, self.DATA,
                       self.paths)
        if "config.json" in self.plan.files:    # generic mode may have no model config
            config = dict(record["config"])
            if self.plan.detail is not None:      # the one dtype of every tensor
                config["dtype"] = self.plan.detail
            write_json(self.dir / "config.json", config)
        write_json(self.dir / MAPC_JSON, record)

    def abort(self):
        if self.file is not None and not self.file.closed:
            self.file.close()


Writer = DCPWriter
