"""Moving bytes at the speed of the disk.

A target tensor whose bytes are one contiguous range of a source file (same dtype, no
rearrangement: an unsplit tensor, or a block of rows of a row-split one) is copied by the
kernel (``os.copy_file_range``; ``sendfile``, then ``pread``/``pwrite`` through one reused
buffer where the file systems refuse it): its bytes never reach user space. The readers hand
out read-only views of per-tensor file mappings (``np.memmap``), so ``file_range`` can tell
where a view's bytes live without the reader saying so.

A shard that must be rebuilt (strided, concatenated, cast) is built in ``Scratch``: one buffer
allocated once and reused for every shard, so its pages are touched once per conversion instead
of fresh, zero-filled pages for every tensor (first touch of fresh memory was measured as the
main cost of writing from user space).
"""
from __future__ import annotations

import errno
import mmap
import os
from math import prod

import numpy as np

from mapc.errors import MapcError

# errors meaning "this kernel or file system cannot do that copy": fall back, never fail
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF,
                errno.ETXTBSY, errno.EPERM}
FALLBACK_CHUNK = 8 << 20
# below this a tensor is written from its mapping: opening the source costs more than a copy
MIN_KERNEL_COPY = 256 << 10
# Bytes per write() from memory. Measured on this project's VM (Firecracker, ext4), 1 GB
# megatron -> hf: whole-tensor writes cost 3.3-3.8 s of kernel time, 1 MiB writes 0.55-0.72 s
# (the same bytes; MAPC_WRITE_CHUNK overrides it, for such comparisons).
WRITE_CHUNK = int(os.environ.get("MAPC_WRITE_CHUNK", 1 << 20))


def _address(a: np.ndarray) -> int:
    return a.reshape(-1).view(np.uint8).__array_interface__["data"][0]


MAX_RANGES = 1 << 16


def _mapping(x):
    """The read-only file mapping (root ``np.memmap``) that ``x`` is a view of, or None."""
    m = x
    while m is not None:
        if isinstance(m, np.memmap) and isinstance(m.base, mmap.mmap):
            return m if m.mode == "r" and m.filename is not None else None
        m = m.base if isinstance(m, np.ndarray) else None
    return None


def _ptr(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


def array_ranges(x: np.ndarray) -> list[tuple[str, int, int]] | None:
    """The byte ranges ``(path, offset, length)`` of source files that, one after the other,
    hold ``x`` in row-major order; None when ``x`` is not a view of a file mapping (or would
    take more than MAX_RANGES ranges)."""
    if not isinstance(x, np.ndarray):
        return None
    if x.size == 0:
        return []
    m = _mapping(x)
    if m is None or any(st < 0 for st in x.strides):
        return None
    k, inner = x.ndim, x.dtype.itemsize
    while k > 0 and (x.shape[k - 1] == 1 or x.strides[k - 1] == inner):
        inner *= x.shape[k - 1]          # the trailing axes that are contiguous together
        k -= 1
    outer = x.shape[:k]
    if prod(outer) > MAX_RANGES:
        return None
    offs = np.zeros(outer, np.int64) + (m.offset + _ptr(x) - _ptr(m))
    for d, (n, st) in enumerate(zip(outer, x.strides[:k])):
        offs = offs + (np.arange(n, dtype=np.int64) * st).reshape(
            [n if j == d else 1 for j in range(k)])
    offs = offs.reshape(-1)
    if int(offs.min()) < m.offset or int(offs.max()) + inner > m.offset + m.nbytes:
        return None
    return [(m.filename, int(o), inner) for o in offs]


def release(x) -> None:
    """Let go of the resident pages of the read-only file mapping that ``x`` is a view of,
    over the span of ``x`` (``madvise(MADV_DONTNEED)``): a writer walking a large mapped tensor
    a piece at a time keeps only the piece resident, not every page it has read (a mapped
    1 GB embedding slice counts in RSS until unmapped). The bytes stay in the page cache;
    touching them again maps them again. Not a view of a file mapping: nothing."""
    m = _mapping(x) if isinstance(x, np.ndarray) and x.size else None
    if m is None or not hasattr(mmap, "MADV_DONTNEED") or any(st < 0 for st in x.strides):
        return
    mm = m.base
    lo = _ptr(x) - (_ptr(m) - m.offset % mmap.ALLOCATIONGRANULARITY)    # from mm's start
    hi = lo + sum((n - 1) * st for n, st in zip(x.shape, x.strides)) + x.itemsize
    lo -= lo % mmap.PAGESIZE
    hi = min(len(mm), -(-hi // mmap.PAGESIZE) * mmap.PAGESIZE)
    if 0 <= lo < hi:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def merge_ranges(ranges):
    out = []
    for path, off, n in ranges:
        if out and out[-1][0] == path and out[-1][1] + out[-1][2] == off:
            out[-1] = (path, out[-1][1], out[-1][2] + n)
        else:
            out.append((path, off, n))
    return out


class Concat:
    """A concatenation not yet made (the last step of a shard's recipe): its pieces, the
    axis, and the shape the recipe gives the result."""

    def __init__(self, pieces, axis, shape=None):
        self.pieces, self.axis = list(pieces), axis
        cat = list(self.pieces[0].shape)
        cat[axis] = sum(p.shape[axis] for p in self.pieces)
        self.cat_shape = tuple(cat)
        self.shape = tuple(shape) if shape is not None else self.cat_shape
        self.dtype = np.result_type(*[p.dtype for p in self.pieces])
        self.nbytes = prod(self.shape) * self.dtype.itemsize

    def reshape(self, shape):
        shape = tuple(shape)
        if prod(shape) != prod(self.shape):
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return Concat(self.pieces, self.axis, shape)

    def ranges(self):
        outer = self.cat_shape[:self.axis]
        if prod(outer) * len(self.pieces) > MAX_RANGES:
            return None
        out = []
        for idx in np.ndindex(*outer):
            for p in self.pieces:
                r = byte_ranges(p[idx]) if idx else byte_ranges(p)
                if r is None:
                    return None
                out += r
        return out

    def fill(self, out: np.ndarray) -> np.ndarray:
        pieces = [np.asarray(p) if isinstance(p, Stack) else p for p in self.pieces]
        np.concatenate(pieces, axis=self.axis, out=out.reshape(self.cat_shape))
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.fill(np.empty(self.shape, self.dtype))
        return out if dtype is None else out.astype(dtype)


class Stack:
    """Same-shaped arrays stacked along leading axes, not yet copied: a logical tensor that a
    gather rebuilt from many source tensors (e.g. a MoE layer's experts, one file tensor each).
    ``lead`` is an object array of the pieces; the ops a recipe applies that only move the
    leading axes or only touch the pieces stay lazy, so a target shard that takes one expert
    (or the experts as ranges of the source files) never needs the whole stack in memory."""

    def __init__(self, lead: np.ndarray):
        self.lead = lead
        first = lead.reshape(-1)[0]
        self.piece_shape, self.dtype = tuple(first.shape), first.dtype
        self.shape = tuple(lead.shape) + self.piece_shape
        self.ndim, self.size = len(self.shape), prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize

    @classmethod
    def of(cls, xs, axis):
        """The lazy ``np.stack(xs, axis)``, or None when it cannot be one (axis not leading
        over the pieces, or pieces of different shapes/dtypes)."""
        lead_of = [x.lead if isinstance(x, Stack) else None for x in xs]
        k = lead_of[0].ndim if lead_of[0] is not None else 0
        if any((l.ndim if l is not None else 0) != k for l in lead_of) or axis > k:
            return None
        pieces = np.empty((len(xs),) + (lead_of[0].shape if k else ()), dtype=object)
        for i, x in enumerate(xs):
            if k:
                pieces[i] = x.lead
            else:
                pieces[i] = x
        if axis:
            pieces = np.moveaxis(pieces, 0, axis)
        flat = pieces.reshape(-1)
        if any(p.shape != flat[0].shape or p.dtype != flat[0].dtype for p in flat):
            return None
        return cls(pieces)

    def _map(self, lead, fn=None):
        if lead.ndim == 0:
            piece = lead.item()
            return piece if fn is None else fn(piece)
        if fn is not None:
            out = np.empty(lead.shape, dtype=object)
            for idx in np.ndindex(*lead.shape):
                out[idx] = fn(lead[idx])
            lead = out
        return Stack(lead)

    def reshape(self, shape):
        shape, n = tuple(shape), self.lead.size
        for j in range(len(shape) + 1):
            if prod(shape[:j]) == n and prod(shape[j:]) == prod(self.piece_shape):
                rest = shape[j:]
                return self._map(self.lead.reshape(shape[:j]), lambda p: p.reshape(rest))
        return None

    def transpose(self, perm):
        k = self.lead.ndim
        if sorted(perm[:k]) != list(range(k)) or any(p < k for p in perm[k:]):
            return None
        inner = [p - k for p in perm[k:]]
        return self._map(self.lead.transpose(perm[:k]), lambda p: p.transpose(inner))

    def take(self, axis, key):
        """``x[(slice(None),) * axis + (key,)]`` (an int or a slice)."""
        k = self.lead.ndim
        if axis < k:
            if isinstance(key, slice):
                return self._map(self.lead[(slice(None),) * axis + (key,)])
            # an integer index of an object array that leaves no axis returns the piece itself,
            # not a 0-d array of it (whose elements _map would then take for pieces: one per
            # number, hours for a layer of experts): index with a slice and drop the axis
            sub = self.lead[(slice(None),) * axis + (slice(key, key + 1 if key != -1 else None),)]
            return self._map(sub.reshape(sub.shape[:axis] + sub.shape[axis + 1:]))
        sel = (slice(None),) * (axis - k) + (key,)
        return self._map(self.lead, lambda p: p[sel])

    def __getitem__(self, idx):
        x = self
        for i in (idx if isinstance(idx, tuple) else (idx,)):
            x = x.take(0, i) if isinstance(x, Stack) else x[i]
        return x

    def ranges(self):
        out = []
        for idx in np.ndindex(*self.lead.shape):
            r = byte_ranges(self.lead[idx])
            if r is None:
                return None
            out += r
        return out

    def fill(self, out: np.ndarray) -> np.ndarray:
        for idx in np.ndindex(*self.lead.shape):
            piece = self.lead[idx]
            out[idx] = np.asarray(piece) if isinstance(piece, (Stack, Concat)) else piece
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.fill(np.empty(self.shape, self.dtype))
        return out if dtype is None else out.astype(dtype)


def byte_ranges(x):
    """``array_ranges`` of an array or a pending ``Concat``, adjacent ranges merged."""
    r = x.ranges() if isinstance(x, (Concat, Stack)) else array_ranges(x)
    return None if r is None else merge_ranges(r)


class FileBytes:
    """A target tensor that is a sequence of ranges of source files: writers that know it
    copy the ranges in-kernel; ``np.asarray`` reads it (for anything else)."""

    def __init__(self, shape, dtype, ranges):
        self.shape, self.dtype, self.ranges = tuple(shape), np.dtype(dtype), list(ranges)
        self.ndim, self.size = len(self.shape), prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        assert sum(n for _, _, n in self.ranges) == self.nbytes

    def mapped(self, window: int = 64 << 20):
        """The ranges as read-only views of mappings, ``window`` bytes at a time, e.g. for a
        checksum. Each window is its own mapping, unmapped once the caller drops its view, so
        the mapped pages (which count as resident) stay bounded: one 1.85 GB embedding mapped
        whole put a conversion at 1.9 GB of RSS."""
        import mmap
        grain = mmap.ALLOCATIONGRANULARITY
        files: dict = {}                 # one open file per path (a fused shard has many ranges)
        try:
            for path, off, n in self.ranges:
                if path not in files:
                    files[path] = open(path, "rb")
                pos, end = off, off + n
                while pos < end:
                    start = pos - pos % grain
                    stop = min(end, pos + window)
                    m = mmap.mmap(files[path].fileno(), stop - start, access=mmap.ACCESS_READ,
                                  offset=start)
                    view = memoryview(m)[pos - start:]
                    del m                      # the view keeps the mapping until released
                    yield view
                    del view
                    pos = stop
        finally:
            for fh in files.values():
                fh.close()

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.nbytes, np.uint8)
        at = 0
        for chunk in self.mapped():
            out[at:at + len(chunk)] = np.frombuffer(chunk, np.uint8)
            at += len(chunk)
        out = out.view(self.dtype).reshape(self.shape)
        return out if dtype is None else out.astype(dtype)

    def copy_to(self, fd: int, offset: int, where: str) -> None:
        for path, off, n in self.ranges:
            copy_range(path, off, fd, offset, n, where)
            offset += n


def file_range(arr) -> tuple[str, int] | None:
    """``(path, byte offset)`` when ``arr``'s bytes are one contiguous range of a read-only
    file mapping (an ``np.memmap`` opened with mode ``"r"``, or a view of one), else None."""
    if not isinstance(arr, np.ndarray) or arr.nbytes == 0 or not arr.flags.c_contiguous:
        return None
    m = arr
    while m is not None:
        if isinstance(m, np.memmap) and isinstance(m.base, mmap.mmap):
            break
        m = m.base if isinstance(m, np.ndarray) else None
    if m is None or m.mode != "r" or m.filename is None or not m.flags.c_contiguous:
        return None
    delta = _address(arr) - _address(m)
    if delta < 0 or delta + arr.nbytes > m.nbytes:
        return None
    return m.filename, m.offset + delta


class _Fallback:
    """One buffer for pread/pwrite copies, allocated on first need."""
    buf: np.ndarray | None = None


def copy_range(src: str, src_offset: int, dst_fd: int, dst_offset: int, n: int,
               where: str) -> None:
    """Copy ``n`` bytes of file ``src`` at ``src_offset`` to ``dst_fd`` at ``dst_offset``
    (the file position of ``dst_fd`` is not used and may move)."""
    try:
        fd = os.open(src, os.O_RDONLY)
    except OSError as e:
        raise MapcError(f"cannot open: {e.strerror}", where=src) from None
    try:
        done = _copy_file_range(fd, src_offset, dst_fd, dst_offset, n, src, where)
        if done < n:
            done += _sendfile(fd, src_offset + done, dst_fd, dst_offset + done, n - done,
                              src, where)
        if done < n:
            _pread_pwrite(fd, src_offset + done, dst_fd, dst_offset + done, n - done,
                          src, where)
    finally:
        os.close(fd)


def _copy_file_range(fd, off, dst_fd, dst_off, n, src, where) -> int:
    if not hasattr(os, "copy_file_range"):
        return 0
    done = 0
    while done < n:
        try:
            k = os.copy_file_range(fd, dst_fd, n - done, off + done, dst_off + done)
        except OSError as e:
            if e.errno in _UNSUPPORTED and done == 0:
                return 0
            _raise(e, src, where)
        if k == 0:
            _truncated(src, off + done)
        done += k
    return done


def _sendfile(fd, off, dst_fd, dst_off, n, src, where) -> int:
    done = 0
    try:
        os.lseek(dst_fd, dst_off, os.SEEK_SET)
    except OSError:
        return 0
    while done < n:
        try:
            k = os.sendfile(dst_fd, fd, off + done, n - done)
        except OSError as e:
            if e.errno in _UNSUPPORTED and done == 0:
                return 0
            _raise(e, src, where)
        if k == 0:
            _truncated(src, off + done)
        done += k
    return done


def _pread_pwrite(fd, off, dst_fd, dst_off, n, src, where) -> None:
    if _Fallback.buf is None:
        _Fallback.buf = np.empty(FALLBACK_CHUNK, np.uint8)
    view = memoryview(_Fallback.buf)
    done = 0
    while done < n:
        want = min(n - done, len(view))
        try:
            k = os.preadv(fd, [view[:want]], off + done)
        except OSError as e:
            _raise(e, src, where)
        if k == 0:
            _truncated(src, off + done)
        chunk, at = view[:k], dst_off + done
        try:
            while len(chunk):
                w = os.pwrite(dst_fd, chunk, at)
                chunk, at = chunk[w:], at + w
        except OSError as e:
            _raise(e, src, where)
        done += k


def _raise(e: OSError, src: str, where: str):
    raise MapcError(f"cannot copy from {src}: {e.strerror}", where=where,
                    hint="free disk space or choose another destination"
                    if e.errno in (errno.ENOSPC, errno.EDQUOT) else None) from None


def _truncated(src: str, at: int):
    raise MapcError(f"truncated: the file ends before byte {at}", where=src,
                    hint="re-copy the source checkpoint")


def write_array(fd: int, arr: np.ndarray, offset: int, where: str) -> None:
    """Write ``arr``'s bytes (row-major) at ``offset`` of ``fd``: in-kernel when they are a
    range of a source file (or ``FileBytes``), else one ``pwrite``."""
    if isinstance(arr, FileBytes):
        arr.copy_to(fd, offset, where)
        return
    found = file_range(arr) if arr.nbytes >= MIN_KERNEL_COPY else None
    if found is not None:
        copy_range(found[0], found[1], fd, offset, arr.nbytes, where)
        return
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    view = memoryview(data)
    try:
        while len(view):
            k = os.pwrite(fd, view[:WRITE_CHUNK], offset)
            view, offset = view[k:], offset + k
    except OSError as e:
        raise MapcError(f"cannot write: {e.strerror}", where=where,
                        hint="free disk space or choose another destination") from None


class Scratch:
    """A buffer reused for every shard that has to be materialized.

    ``take(shape, dtype)`` returns an uninitialized array over the start of the buffer, valid
    until the next ``take``; the buffer grows (at least twofold each time, up to the largest
    shard it was asked for) and never shrinks.
    """

    def __init__(self):
        self.buf: np.ndarray | None = None

    def take(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = prod(shape) * dtype.itemsize
        if self.buf is None or self.buf.nbytes < n:
            # grow at least twofold, so a conversion touches fresh pages a few times at most
            size = max(n, 2 * self.buf.nbytes if self.buf is not None else 0, 1)
            self.buf = None                      # release the old one before growing
            self.buf = np.empty(size, np.uint8)
        return self.buf[:n].view(dtype).reshape(shape)

    def materialize(self, x, dtype=None) -> np.ndarray:
        """``x`` (a numpy array or view, not a ``Concat``), cast to ``dtype``, C-contiguous,
        in the buffer; a C-contiguous array already of that dtype is returned as it is."""
        dtype = np.dtype(dtype) if dtype is not None else x.dtype
        if x.flags.c_contiguous and x.dtype == dtype:
            return x
        out = self.take(x.shape, dtype)
        np.copyto(out, x, casting="unsafe")
        return out


class ShardBuilder:
    """Turns what a recipe built into what the writer gets: ``FileBytes`` when the shard's
    bytes are a few large ranges of source files and the writer takes them, else a
    C-contiguous array (views passed through, the rest built in two reused buffers: one for
    concatenations, one for casts and strided copies)."""

    def __init__(self, takes_ranges: bool):
        self.takes_ranges = takes_ranges
        self.cat, self.out = Scratch(), Scratch()

    def concat(self, xs, axis):          # the backend op the recipe calls
        return xs[0] if len(xs) == 1 else Concat(xs, axis)

    def build(self, x, dtype):
        dtype = np.dtype(dtype)
        if self.takes_ranges and x.dtype == dtype and x.nbytes >= MIN_KERNEL_COPY:
            ranges = byte_ranges(x)
            if ranges and x.nbytes // len(ranges) >= MIN_KERNEL_COPY:
                return FileBytes(x.shape, dtype, ranges)
        if isinstance(x, (Concat, Stack)):
            x = x.fill(self.cat.take(x.shape, x.dtype))
        return self.out.materialize(x, dtype)


class Arena:
    """Buffers reused from one unit to the next, for the logical tensors a unit rebuilds
    from split sources (the stacks of a gather). ``reset()`` when a unit starts frees them all
    at once; ``take`` hands out the smallest free buffer that fits, else replaces the largest
    free one by a bigger one, so the arena holds about one unit's worth of memory."""

    def __init__(self):
        self.free: list[np.ndarray] = []
        self.used: list[np.ndarray] = []

    def reset(self):
        self.free += self.used
        self.used = []

    def take(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = max(prod(shape) * dtype.itemsize, 1)
        fits = [i for i, b in enumerate(self.free) if b.nbytes >= n]   # (by index: arrays
        if fits:                                                          # do not compare)
            buf = self.free.pop(min(fits, key=lambda i: self.free[i].nbytes))
        else:
            if self.free:
                self.free.pop(max(range(len(self.free)), key=lambda i: self.free[i].nbytes))
            buf = np.empty(n, np.uint8)
        self.used.append(buf)
        return buf[:prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
