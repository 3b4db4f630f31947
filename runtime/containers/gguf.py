"""GGUF files (llama.cpp), read and written with the ``gguf`` package (llama.cpp's gguf-py).

A GGUF file is a header (typed key/value metadata, then one info per tensor: name, dims, type,
offset) followed by the aligned tensor data. GGUF lists a tensor's dims innermost first, so a
numpy shape is the reverse of the listed dims. Tensors are F32, F16, BF16 or quantized (Q8_0,
Q4_K, ...); quantized tensors are dequantized to float32 when read (they cannot be written).

A source is a ``.gguf`` file, or a directory holding exactly one. mapc writes a directory,
like every other format: ``DST/model.gguf`` plus ``DST/mapc.json``. The record is also stored
in the file, as a JSON string under ``mapc.record``, so the file alone converts again without
flags. Which architecture the file holds (``general.architecture`` and the hyperparameter keys)
comes from the spec layout's ``meta``; this module knows only the file format. Reading a GGUF
that mapc did not write, the config comes back from that metadata (the bare-symbol ``meta``
entries). mapc converts no tokenizer: without one in the metadata it writes
``tokenizer.ggml.model = "no_vocab"``, which llama.cpp needs to load the weights.

Writing streams. GGUF puts the metadata before the data, and mapc's record is complete only
when the conversion ends, so the header is planned with the record replaced by
``RECORD_RESERVE`` spaces, each tensor is written at its offset the moment it arrives, and
``finish`` writes the real header over the planned one (the record padded with spaces to the
same length; JSON allows trailing spaces). A record longer than the reserve moves the data
once, in the kernel.
"""
from __future__ import annotations

import json
import os
from math import prod
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime.backends import DTYPES
from mapc.runtime.containers.base import MAPC_JSON, Source, write_json
from mapc.runtime.plan_write import PlannedWriter, make_plan, planned_tensors
from mapc.runtime.fastcopy import write_array
from mapc.runtime.safetensors_io import _write_all

LAYOUT = "gguf"
SINGLE = ()
FILE = "model.gguf"
SUFFIX = ".gguf"
RECORD_KEY = "mapc.record"
RECORD_RESERVE = 16 * 1024
ARCH_KEY = "general.architecture"
ALIGN_KEY = "general.alignment"
# llama.cpp refuses a file without this key; "no_vocab" loads the weights without a tokenizer
# (the vocabulary size then comes from ``<arch>.vocab_size``). mapc converts no tokenizer.
TOKENIZER_KEY = "tokenizer.ggml.model"
NO_VOCAB = "no_vocab"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MapcError("the GGUF format needs the 'gguf' package, which is not installed",
                        hint="pip install 'mapc[gguf]'") from None
    return gguf


def gguf_file(path: Path) -> Path | None:
    """The GGUF file at ``path``: the file itself, or the only ``.gguf`` in a directory."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == SUFFIX else None
    if path.is_dir():
        found = [p for p in path.glob("*" + SUFFIX) if p.is_file()]
        return found[0] if len(found) == 1 else None
    return None


def detect(path: Path) -> bool:
    return gguf_file(path) is not None


def plan_write(program, facts, request):
    """One ``model.gguf`` (F32, F16 or BF16 tensors, the layout's metadata, mapc's record)
    and mapc.json."""
    tensors = planned_tensors(program, facts, request.dtype, ("param",))
    for coord, name, shape, dt in tensors:
        if dt not in GGML_NAME:
            raise MapcError(f"GGUF output takes float32, float16 or bfloat16 tensors, and "
                            f"{name} would be {dt}", hint="pass --dtype fp32, fp16 or bf16")
    types = sorted({GGML_NAME[dt] for *_, dt in tensors})
    return make_plan("gguf", [FILE, MAPC_JSON], decisions={"tensor types": types},
                     tensors=tensors, serial="one .gguf file holds every tensor")


# ---- reading ------------------------------------------------------------------------------------
MAGIC = b"GGUF"
HEADER_BYTES = 24     # magic, version, tensor count, key/value count

# unquantized GGML types -> mapc dtypes; every other (quantized) type reads as float32
PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
         "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}


def _plain(value, is_f32: bool):
    """A metadata value as plain Python; f32 values as the shortest decimal that is the same
    float32 (so 1e-06 stored as f32 reads back as 1e-06, not 9.99999997e-07)."""
    if is_f32:
        if isinstance(value, list):
            return [float(str(np.float32(v))) for v in value]
        return float(str(np.float32(value)))
    return value


def _check_magic(file: Path):
    with open(file, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:len(MAGIC)] != MAGIC[:len(head)]:
        raise MapcError("not a GGUF file (it does not start with 'GGUF')", where=str(file))
    if len(head) < HEADER_BYTES:
        raise MapcError(f"truncated GGUF file ({len(head)} bytes, shorter than the header)",
                        where=str(file), hint="re-copy or re-convert the file")


class GGUFSource(Source):
    format = "gguf"
    layout = LAYOUT

    def __init__(self, path):
        super().__init__(path)
        gguf = _gguf()
        self.file = gguf_file(self.path)
        if self.file is None:
            n = len(list(self.path.glob("*" + SUFFIX))) if self.path.is_dir() else 0
            raise MapcError(f"expected one {SUFFIX} file, found {n}", where=str(self.path),
                            hint="pass the file itself; split GGUF files must be merged first "
                                 "(gguf-split --merge)")
        _check_magic(self.file)
        try:
            reader = gguf.GGUFReader(self.file)
            f32 = gguf.GGUFValueType.FLOAT32
            meta = {key: _plain(field.contents(), field.types[-1:] == [f32])
                    for key, field in reader.fields.items() if not key.startswith("GGUF.")}
            # name -> (GGML type, numpy shape, byte offset, byte count)
            self.tensors = {t.name: (t.tensor_type, tuple(reversed(t.shape.tolist())),
                                     int(t.data_offset), int(t.n_bytes))
                            for t in reader.tensors}
        except Exception as e:   # gguf raises ValueError, KeyError, IndexError, ... on bad input
            raise MapcError(f"truncated or corrupt GGUF file (the gguf reader says: {e})",
                            where=str(self.file), hint="re-copy or re-convert the file") from None
        del reader                # its memory map; tensors are mapped one at a time in read()
        self.dequantize = gguf.quants.dequantize
        text = meta.pop(RECORD_KEY, None)
        if text is not None:
            try:
                self.record = json.loads(text)
            except ValueError as e:
                raise MapcError(f"corrupt {RECORD_KEY}: {e}", where=str(self.file)) from None
        self.format_meta = meta
        self.config = self.record.get("config")

    def coords(self):
        return [SINGLE]

    def names(self, coord=SINGLE):
        return list(self.tensors)

    def _entry(self, name):
        try:
            return self.tensors[name]
        except KeyError:
            raise MapcError(f"tensor {name} is not in the file", where=str(self.file)) from None

    def shape(self, name, coord=SINGLE):
        return self._entry(name)[1]

    def dtype(self, name, coord=SINGLE):
        return PLAIN.get(self._entry(name)[0].name, "float32")

    def read(self, name, coord=SINGLE):
        """The tensor in numpy orientation: unquantized ones as a read-only view of their own
        mapping of the file (released when dropped), quantized ones dequantized to float32."""
        qtype, shape, offset, n = self._entry(name)
        raw = np.memmap(self.file, dtype=np.uint8, mode="r", offset=offset, shape=(n,)) \
            if n else np.empty(0, np.uint8)
        plain = PLAIN.get(qtype.name)
        if plain is not None:
            return raw.view(DTYPES[plain]).reshape(shape)
        try:
            return self.dequantize(raw.reshape(shape[:-1] + (-1,)), qtype)
        except (NotImplementedError, ValueError) as e:
            raise MapcError(f"cannot dequantize {name} ({qtype.name}): {e}",
                            where=str(self.file)) from None

    def describe_coord(self, coord):
        return self.file.name


Source = GGUFSource


# ---- writing ------------------------------------------------------------------------------------
GGML_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}   # what mapc writes


def _add_value(w, vtypes, key, value):
    """Add one metadata entry with the type llama.cpp expects: integers u32 (i32, u64 or i64 when
    out of range), floats f32, booleans, strings and arrays of one of these."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        if not value:
            return
        sub = {_value_type(vtypes, key, v) for v in value}
        if len(sub) > 1 and sub <= {vtypes.UINT32, vtypes.INT32, vtypes.UINT64, vtypes.INT64}:
            sub = {vtypes.INT64}
        if len(sub) > 1:
            raise MapcError(f"GGUF metadata {key} mixes value types: {value!r}")
        w.add_key_value(key, list(value), vtypes.ARRAY, sub.pop())
    else:
        w.add_key_value(key, value, _value_type(vtypes, key, value))


def _value_type(vtypes, key, v):
    if isinstance(v, bool):
        return vtypes.BOOL
    if isinstance(v, int):
        if 0 <= v < 2**32:
            return vtypes.UINT32
        if -2**31 <= v < 0:
            return vtypes.INT32
        return vtypes.UINT64 if v >= 0 else vtypes.INT64
    if isinstance(v, float):
        return vtypes.FLOAT32
    if isinstance(v, str):
        return vtypes.STRING
    raise MapcError(f"GGUF metadata {key} = {v!r} is not a number, boolean, string or list",
                    hint="fix the spec layout's meta")


class GGUFFileWriter(PlannedWriter):
    keeps_arrays = False    # every array is written before write() returns

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        self.gguf = _gguf()
        self.meta = dict(program.target.meta())
        self.path = self.dir / FILE
        self.align = int(self.meta.get(ALIGN_KEY, self.gguf.GGUF_DEFAULT_ALIGNMENT))
        self.fd = None

    def begin(self, tensors):
        self.infos = []        # (name, numpy shape, dtype, GGML type, bytes), in header order
        self.slots = {}        # name -> (offset in the data section, byte count)
        offset = 0
        for coord, name, shape, dt in tensors:
            if dt not in GGML_NAME:
                raise MapcError(f"GGUF output takes float32, float16 or bfloat16 tensors, and "
                                f"{name} would be {dt}", hint="pass --dtype fp32, fp16 or bf16")
            n = prod(shape) * DTYPES[dt].itemsize
            qtype = self.gguf.GGMLQuantizationType[GGML_NAME[dt]]
            self.infos.append((name, tuple(shape), DTYPES[dt], qtype, n))
            self.slots[name] = (offset, n)
            offset += -(-n // self.align) * self.align
        self.data_bytes = offset
        self.base = len(self._header(" " * RECORD_RESERVE))
        self.pending = set(self.slots)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.base + self.data_bytes)

    def _header(self, record_text: str) -> bytes:
        """Everything before the tensor data, written by gguf's own GGUFWriter, padded to the
        alignment."""
        tmp = self.dir / f".{FILE}.header"
        w = self.gguf.GGUFWriter(tmp, arch=str(self.meta.get(ARCH_KEY, "")))
        w.data_alignment = self.align
        vtypes = self.gguf.GGUFValueType
        for key, value in self.meta.items():
            if key != ARCH_KEY:
                _add_value(w, vtypes, key, value)
        if TOKENIZER_KEY not in self.meta:
            w.add_key_value(TOKENIZER_KEY, NO_VOCAB, vtypes.STRING)
        w.add_key_value(RECORD_KEY, record_text, vtypes.STRING)
        for name, shape, dtype, qtype, n in self.infos:
            w.add_tensor_info(name, shape, dtype, n, raw_dtype=qtype)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        finally:
            w.close()
        raw = tmp.read_bytes()
        tmp.unlink()
        return raw + b"\0" * (-len(raw) % self.align)

    def write(self, coord, name, arr):
        offset, n = self.slots[name]
        if arr.nbytes != n:
            raise MapcError(f"internal: {name} has {arr.nbytes} bytes, planned {n}",
                            where=str(self.path))
        write_array(self.fd, arr, self.base + offset, str(self.path))   # in-kernel when it can
        self.pending.discard(name)

    def finish(self, record: dict):
        if self.pending:
            raise MapcError(f"internal: {len(self.pending)} tensors never written "
                            f"(e.g. {sorted(self.pending)[0]})", where=str(self.path))
        text = json.dumps(record)          # ASCII: as many bytes as characters
        if len(text) <= RECORD_RESERVE:
            header = self._header(text.ljust(RECORD_RESERVE))
            if len(header) != self.base:
                raise MapcError(f"internal: the header is {len(header)} bytes, planned "
                                f"{self.base}", where=str(self.path))
            _write_all(self.fd, header, 0, str(self.path))
        else:
            self._move_data(self._header(text))
        os.close(self.fd)
        self.fd = None
        write_json(self.dir / MAPC_JSON, record)

    def _move_data(self, header: bytes):
        """Rewrite the file with a header of another size: the data moves, in the kernel."""
        moved = self.dir / f".{FILE}.moving"
        out = os.open(moved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(out, header, 0, str(moved))
            _copy_range(self.fd, out, self.base, len(header), self.data_bytes, str(self.path))
        finally:
            os.close(out)
        os.replace(moved, self.path)

    def abort(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _copy_range(src_fd, dst_fd, src, dst, n, path, chunk=64 * 2**20):
    """Copy ``n`` bytes between files, in the kernel where the OS can (Linux)."""
    while n:
        try:
            k = os.copy_file_range(src_fd, dst_fd, n, src, dst)
        except (AttributeError, OSError):
            data = os.pread(src_fd, min(n, chunk), src)
            _write_all(dst_fd, data, dst, path)
            k = len(data)
        if k == 0:
            raise MapcError("internal: the file ended early while moving its data", where=path)
        src, dst, n = src + k, dst + k, n - k


Writer = GGUFFileWriter
