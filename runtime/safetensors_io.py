"""safetensors files, read lazily and written in a stream.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and the raw
bytes. Reading parses the header only and fetches a tensor's bytes when asked (``pread`` into a
fresh buffer, so memory is released as soon as the caller drops the array). Writing plans the
whole header from shapes and dtypes first, then accepts tensors in any order and writes each at
its offset: nothing is held in memory. bfloat16 works without torch (ml_dtypes).
"""
from __future__ import annotations

import json
import os
import struct
from math import prod

import numpy as np

from mapc.errors import MapcError
from mapc.runtime.backends import DTYPES, dtype_name
from mapc.runtime.fastcopy import write_array

ST_TO_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn"}
NAME_TO_ST = {v: k for k, v in ST_TO_NAME.items()}
MAX_HEADER = 100 * 2**20


class SafetensorsFile:
    def __init__(self, path):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                raw = f.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
                text = f.read(n) if 8 + n <= size and n <= MAX_HEADER else b""
        except OSError as e:
            raise MapcError(f"cannot open: {e.strerror}", where=self.path) from None
        if len(raw) < 8:
            raise MapcError("truncated safetensors file (no header)", where=self.path,
                            hint="re-copy or re-save the file")
        if n > MAX_HEADER or 8 + n > size:
            raise MapcError(f"corrupt safetensors header (length {n}, file {size} bytes)",
                            where=self.path, hint="re-copy or re-save the file")
        try:
            header = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise MapcError(f"corrupt safetensors header: {e}", where=self.path,
                            hint="re-copy or re-save the file") from None
        self.base = 8 + n
        self.metadata, self.entries = _parse_header(header, size - self.base, self.path)

    def keys(self):
        return list(self.entries)

    def dtype(self, name) -> str:
        return self.entries[name][0]

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def read(self, name) -> np.ndarray:
        """The tensor as a read-only view of its own mapping of the file: no copy, and the
        pages are released when the caller drops the array."""
        dt, shape, begin = self.entries[name]
        dtype = DTYPES[dt]
        n = prod(shape) * dtype.itemsize
        if n == 0:
            return np.empty(shape, dtype)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.base + begin,
                         shape=(n,)).view(dtype).reshape(shape)


def _bad(what: str, where: str) -> MapcError:
    return MapcError(f"corrupt safetensors header: {what}", where=where,
                     hint="re-copy or re-save the file")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(header, data_size: int, where: str):
    """(metadata, {name: (dtype, shape, begin)}), checked as the safetensors library checks:
    a JSON object of entries with a known dtype, a shape of non-negative integers and
    ``data_offsets`` [begin, end] matching it, the entries tiling the data exactly (sorted by
    offset, each beginning where the previous ends: no overlap, no gap, nothing after)."""
    if not isinstance(header, dict):
        raise _bad(f"a JSON {type(header).__name__}, not an object", where)
    metadata = header.get("__metadata__")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad("__metadata__ is not an object of strings", where)
    entries, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _bad(f"tensor {name!r} is a {type(info).__name__}, not an object", where)
        st = info.get("dtype")
        if not isinstance(st, str) or st not in ST_TO_NAME:
            raise MapcError(f"tensor {name} has dtype {st!r}, which mapc does not handle",
                            where=where)
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _bad(f"tensor {name!r} has shape {shape!r} (not a list of non-negative "
                       "integers)", where)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and 0 <= offsets[0] <= offsets[1]):
            raise _bad(f"tensor {name!r} has data_offsets {offsets!r} (not [begin, end])", where)
        begin, end = offsets
        want = prod(shape) * DTYPES[ST_TO_NAME[st]].itemsize
        if end - begin != want:
            raise MapcError(f"tensor {name}: {end - begin} bytes for shape {shape}", where=where)
        if end > data_size:
            raise MapcError(f"truncated: tensor {name} needs bytes up to {end} after the "
                            f"header, the file has {data_size}", where=where,
                            hint="re-copy or re-save the file")
        entries[name] = (ST_TO_NAME[st], tuple(shape), begin)
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise _bad(f"tensor {name!r} at bytes {begin}..{end} "
                       + ("overlaps another tensor" if begin < at else f"leaves a gap after {at}")
                       + " (the safetensors library refuses such files)", where)
        at = end
    if at != data_size:
        raise _bad(f"{data_size - at} bytes after the last tensor (the safetensors library "
                   "refuses such files)", where)
    return metadata, entries


class SafetensorsWriter:
    """Write one safetensors file whose tensors are all known in advance."""

    ALIGN = 8

    def __init__(self, path, tensors: list[tuple[str, tuple, str]], metadata: dict | None = None):
        self.path = str(path)
        header = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self.slots = {}
        for name, shape, dt in tensors:
            n = prod(shape) * DTYPES[dt].itemsize
            header[name] = {"dtype": NAME_TO_ST[dt], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            self.slots[name] = (offset, n, dt, tuple(shape))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % self.ALIGN)
        self.base = 8 + len(raw)
        self.total = self.base + offset
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pending = set(self.slots)
        _write_all(self.fd, struct.pack("<Q", len(raw)) + raw, 0, self.path)

    def write(self, name, arr: np.ndarray):
        offset, n, dt, shape = self.slots[name]
        if tuple(arr.shape) != shape or dtype_name(arr.dtype) != dt:
            raise MapcError(f"internal: {name} is {arr.dtype}{list(arr.shape)}, planned "
                            f"{dt}{list(shape)}", where=self.path)
        write_array(self.fd, arr, self.base + offset, self.path)   # in-kernel when it can
        self.pending.discard(name)

    def close(self):
        if self.pending:
            raise MapcError(f"internal: {len(self.pending)} tensors never written "
                            f"(e.g. {sorted(self.pending)[0]})", where=self.path)
        os.close(self.fd)


def _write_all(fd, data, offset, path):
    view = memoryview(data)
    try:
        while len(view):
            k = os.pwrite(fd, view, offset)
            view, offset = view[k:], offset + k
    except OSError as e:
        raise MapcError(f"cannot write: {e.strerror}", where=path,
                        hint="free disk space or choose another destination") from None
