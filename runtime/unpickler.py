"""mapc's restricted unpickler: a small pickle interpreter that builds only inert data.

Python's own ``pickle.Unpickler`` (even with a strict ``find_class``) lets a file apply
``BUILD`` to any object on its stack (a class on the allow-list is patched for the whole
process), call allow-listed callables with any arguments (``bytearray(2**31)`` from a 40-byte
file), rebuild numpy dtypes and arrays from raw state (object fields over raw bytes: a
segfault when the value is printed), and build object graphs of exponential size through memo
references or a nesting deep enough to overflow every recursive walker. This interpreter reads
protocols 0-5 opcode by opcode and refuses all of that:

* a global resolves only through the allow-list passed to :func:`unpickle` (one per format and
  call; see :mod:`mapc.runtime.torchfile`). Its values are inert: :class:`Inert` functions (our
  own code, which checks its arguments), classes marked ``_mapc_inert`` (records whose
  ``__setstate__`` only stores fields), or plain values (dtype singletons, storage types);
* ``BUILD`` applies only to instances of ``_mapc_inert`` classes and to numpy dtypes and arrays
  being reconstructed, never to classes or shared objects, and at most once;
* numpy dtypes are rebuilt by mapc from their name (no object, structured or sub-array dtype)
  and arrays are read-only views of the pickle's own bytes of such a dtype;
* a container may be filled only until it is put into another object (so no cycle can form),
  and every object's nesting depth (:data:`MAX_DEPTH`) and size counted as a tree
  (:data:`MAX_NODES`, which bounds walking it however the memo shares it) are checked as it is
  built; the total work of one load is bounded the same way, and lengths read from the stream
  are checked against the bytes that remain before anything is allocated.

Every refusal is a :class:`~mapc.errors.MapcError` with the word "corrupt" or the name of the
global; the caller adds the file.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import math
import struct
from typing import Any, Callable, Mapping

import numpy as np

from mapc.errors import MapcError

__all__ = ["Inert", "MAX_DEPTH", "MAX_NODES", "NDARRAY", "np_dtype", "np_reconstruct",
           "np_scalar", "unpickle"]

#: Deepest nesting of containers a checkpoint may have (real ones nest fewer than 20 levels;
#: mapc's recursive walkers need headroom below Python's recursion limit).
MAX_DEPTH = 100
#: Most nodes one object may have counted as a tree (memo references counted every time they
#: are used), and most work units one load may spend (an opcode is one, a call one per node of
#: its arguments, a byte copy one per 16 bytes).
MAX_NODES = 1 << 24
_BYTES_PER_UNIT = 16
#: Longest integer (in bytes) a LONG opcode may carry; pickled checkpoints hold 64-bit values.
_MAX_LONG_BYTES = 1024
#: Largest numpy dtype item mapc rebuilds (a string dtype of 1 MiB characters is already odd).
_MAX_ITEMSIZE = 1 << 22


class Inert:
    """A function of ours handed to the unpickler for an allow-listed global. It cannot be
    modified by the pickle (``BUILD`` never applies to it) and checks its own arguments."""

    __slots__ = ("_fn", "newobj")

    def __init__(self, fn: Callable[..., Any], newobj: bool = False):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "newobj", newobj)   # may also be used through NEWOBJ

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {getattr(self._fn, '__name__', self._fn)!r}>"


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")

    def __repr__(self) -> str:
        return f"<{self.name}>"


#: What ``numpy.ndarray`` resolves to: only meaningful as the subtype of ``_reconstruct``.
NDARRAY = _Sentinel("numpy.ndarray")

# ------------------------------------------------------------------------------------------
# numpy: dtypes and arrays rebuilt by mapc, never through numpy's __setstate__
# ------------------------------------------------------------------------------------------
_SAFE_KINDS = set("biufcSUV")


class _PendingDType:
    """``numpy.dtype(name, align, copy)`` before its BUILD state arrives."""

    __slots__ = ("base", "state")

    def __init__(self, base: np.dtype):
        self.base, self.state = base, None

    def resolve(self) -> np.dtype:
        base, state = self.base, self.state
        if state is None:
            return base
        if not (isinstance(state, tuple) and len(state) in (8, 9) and
                all(x is None for x in state[2:5])):
            raise MapcError(f"corrupt numpy dtype state {_short(state)} (mapc rebuilds only "
                            f"plain numeric and string dtypes)")
        order, elsize = state[1], state[5]
        if order not in ("<", ">", "|", "=") or type(elsize) is not int:
            raise MapcError(f"corrupt numpy dtype state {_short(state)}")
        if base.itemsize == 0 and elsize > 0:      # flexible: "S"/"U"/"V" with its size
            if elsize > _MAX_ITEMSIZE or (base.kind == "U" and elsize % 4):
                raise MapcError(f"corrupt numpy dtype: item size {elsize}")
            base = np.dtype(f"{base.kind}{elsize // 4 if base.kind == 'U' else elsize}")
        elif elsize not in (-1, base.itemsize):
            raise MapcError(f"corrupt numpy dtype state: item size {elsize} for {base}")
        if order in "<>" and base.byteorder != "|":
            base = base.newbyteorder(order)
        return base


def _safe_dtype(d: np.dtype) -> np.dtype:
    if d.hasobject or d.fields is not None or d.subdtype is not None or \
            d.kind not in _SAFE_KINDS and d.type.__module__ != "ml_dtypes":
        raise MapcError(f"corrupt numpy value: dtype {d} is refused (mapc builds no object, "
                        f"structured or sub-array dtypes from a checkpoint)")
    return d


def np_dtype(spec: Any, align: Any = False, copy: Any = True) -> _PendingDType:
    """``numpy.dtype(name, align, copy)``; its BUILD state follows."""
    if isinstance(spec, str):
        if len(spec) > 16:
            raise MapcError(f"corrupt numpy dtype name {_short(spec)}")
        try:
            d = np.dtype(spec)
        except (TypeError, ValueError) as e:
            raise MapcError(f"corrupt numpy dtype name {spec!r}: {e}") from None
    elif isinstance(spec, type) and spec.__module__ == "ml_dtypes" and \
            issubclass(spec, np.generic):
        d = np.dtype(spec)
    else:
        raise MapcError(f"corrupt numpy dtype: built from a {type(spec).__name__}")
    return _PendingDType(_safe_dtype(d))


class _PendingArray:
    """``numpy.core.multiarray._reconstruct(ndarray, ...)`` before its BUILD state."""

    __slots__ = ()


def np_reconstruct(subtype: Any, shape: Any = None, typecode: Any = None) -> _PendingArray:
    if subtype is not NDARRAY:
        raise MapcError(f"numpy array subclass {_short(subtype)} is not supported")
    return _PendingArray()


def _build_array(state: Any) -> np.ndarray:
    if not (isinstance(state, tuple) and len(state) == 5):
        raise MapcError(f"corrupt numpy array state {_short(state)}")
    _version, shape, dtype, fortran, raw = state
    dtype = _as_dtype(dtype)
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)) or not isinstance(shape, tuple) or \
            not all(type(s) is int and s >= 0 for s in shape):
        raise MapcError(f"corrupt numpy array state: shape {_short(shape)}, data "
                        f"{type(raw).__name__}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(raw):
        raise MapcError(f"corrupt numpy array: {list(shape)} of {dtype} needs "
                        f"{count * dtype.itemsize} bytes, the pickle has {len(raw)}")
    if count == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(bytes(raw), dtype).reshape(shape, order="F" if fortran else "C")


def _as_dtype(d: Any) -> np.dtype:
    if isinstance(d, _PendingDType):
        return d.resolve()
    if isinstance(d, np.dtype):     # only mapc's own (resolved above) reach here
        return _safe_dtype(d)
    raise MapcError(f"corrupt numpy value: dtype is a {type(d).__name__}")


def np_scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _as_dtype(dtype)
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise MapcError(f"corrupt numpy scalar of {dtype}: {_short(data)}")
    return np.frombuffer(data, dtype)[0]


# ------------------------------------------------------------------------------------------
# the interpreter
# ------------------------------------------------------------------------------------------
def _short(value: Any) -> str:
    try:
        text = repr(value) if isinstance(value, (str, bytes, int, float, type(None), Inert,
                                                 type)) else f"a {type(value).__name__}"
    except Exception:     # an int too long to print
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


_LEAF = (0, 1)
_STRUCTS = {fmt: struct.Struct(fmt) for fmt in ("<B", "<H", "<I", "<i", "<Q", ">d")}


class _Machine:
    def __init__(self, buf: Any, pos: int, end: int, allow: Mapping[str, Any],
                 persistent_load: Callable[[Any], Any] | None, refuse: Callable[[str], MapcError]):
        self.buf, self.pos, self.end = buf, pos, end
        self.allow, self.persistent_load, self.refuse = allow, persistent_load, refuse
        self.stack: list = []
        self.marks: list = []
        self.memo: dict = {}
        self.info: dict[int, tuple[int, int]] = {}    # id -> (depth, tree size) of containers
        self.sealed: set[int] = set()                 # ids that may no longer change
        self.keep: list = []                          # keeps tracked ids alive (no reuse)
        self.pending: dict[int, list] = {}            # id of a pending numpy object -> memo keys
        self.work = 0
        self.numpy = False                            # a numpy dtype/array was started

    # -- bookkeeping --------------------------------------------------------------------------
    def charge(self, units: int) -> None:
        self.work += units
        if self.work > MAX_NODES:
            raise MapcError(f"corrupt pickle: it asks for more than {MAX_NODES} units of work "
                            f"(objects built or bytes copied); real checkpoints need far less")

    def node(self, obj: Any) -> tuple[int, int]:
        return self.info.get(id(obj), _LEAF)

    def track(self, obj: Any, depth: int, size: int) -> Any:
        if depth > MAX_DEPTH:
            raise MapcError(f"corrupt pickle: objects nested more than {MAX_DEPTH} deep")
        if size > MAX_NODES:
            raise MapcError(f"corrupt pickle: an object of more than {MAX_NODES} nodes when "
                            f"walked (memo references repeating a value exponentially)")
        key = id(obj)
        if key not in self.info:
            self.keep.append(obj)
        self.info[key] = (depth, size)
        return obj

    def adopt(self, parent: Any, children: Any) -> None:
        """``children`` go into ``parent``: they are sealed, the parent grows."""
        info, sealed = self.info, self.sealed
        depth, size = info.get(id(parent), _LEAF)
        for child in children:
            node = info.get(id(child))
            if node is None:
                if isinstance(child, _PendingArray):
                    raise MapcError("corrupt pickle: a numpy array used before it was built")
                size += 1
                continue
            if child is parent:
                raise MapcError("corrupt pickle: an object contains itself")
            sealed.add(id(child))
            d, s = node
            if d >= depth:
                depth = d + 1
            size += s
        self.track(parent, max(depth, 1), size)

    def new(self, obj: Any, children: Any = ()) -> Any:
        key = id(obj)
        if key not in self.info:
            self.keep.append(obj)
        self.info[key] = (1, 1)
        if children:
            self.adopt(obj, children)
        return obj

    def open(self, target: Any, kinds: tuple, what: str) -> None:
        if type(target) not in kinds:
            raise MapcError(f"corrupt pickle: {what} on a {type(target).__name__}")
        if id(target) in self.sealed:
            raise MapcError(f"corrupt pickle: {what} changes an object after it was used "
                            f"(mapc reads no self-referencing or re-opened objects)")

    def pop_mark(self) -> list:
        if not self.marks:
            raise MapcError("corrupt pickle: no MARK on the stack")
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def pop(self) -> Any:
        if not self.stack:
            raise MapcError("corrupt pickle: stack underflow")
        return self.stack.pop()

    # -- reading the stream -------------------------------------------------------------------
    def read(self, n: int) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise MapcError(f"corrupt or truncated pickle: needs {n} bytes at offset "
                            f"{self.pos}, {self.end - self.pos} remain")
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(data)

    def line(self) -> bytes:
        at = self.buf.find(b"\n", self.pos, self.end)
        if at < 0:
            raise MapcError("corrupt or truncated pickle: a text field has no end of line")
        data = bytes(self.buf[self.pos:at])
        self.pos = at + 1
        return data

    def uint(self, fmt: str) -> Any:
        st = _STRUCTS[fmt]
        pos = self.pos
        if st.size > self.end - pos:
            raise MapcError(f"corrupt or truncated pickle: needs {st.size} bytes at offset "
                            f"{pos}, {self.end - pos} remain")
        self.pos = pos + st.size
        return st.unpack_from(self.buf, pos)[0]

    def text(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise MapcError("corrupt pickle: a string is not valid UTF-8") from None

    # -- globals and calls --------------------------------------------------------------------
    def find(self, module: Any, name: Any) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise MapcError("corrupt pickle: a global's module or name is not a string")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full not in self.allow:
            raise self.refuse(full)
        return self.allow[full]

    def call(self, func: Any, args: Any, kwargs: Any = None, newobj: bool = False) -> Any:
        if not isinstance(args, tuple) or (kwargs is not None and not isinstance(kwargs, dict)):
            raise MapcError("corrupt pickle: call arguments are not a tuple")
        d, s = self.node(args)
        if kwargs:
            d2, s2 = self.node(kwargs)
            d, s = max(d, d2), s + s2
        self.charge(s)
        if isinstance(func, Inert) and (func.newobj or not newobj):
            fn = func
        elif isinstance(func, type) and getattr(func, "_mapc_inert", False):
            fn = (lambda *a, **k: func.__new__(func, *a, **k)) if newobj else func
        else:
            raise MapcError(f"corrupt pickle: it calls {_short(func)}, which is not a "
                            f"constructor on the allow-list")
        try:
            result = fn(*args, **(kwargs or {}))
        except MapcError:
            raise
        except RecursionError:
            raise MapcError(f"corrupt pickle: objects nested more than {MAX_DEPTH} deep") \
                from None
        except Exception as e:       # TypeError, ValueError, ... from checked arguments
            raise MapcError(f"corrupt pickle: {_short(func)} refused its arguments "
                            f"({type(e).__name__}: {e})") from None
        if isinstance(result, (bytes, bytearray, str)):
            self.charge(len(result) // _BYTES_PER_UNIT)
        elif isinstance(result, (_PendingDType, _PendingArray)):
            self.numpy = True
        self.sealed.add(id(args))
        if kwargs:
            self.sealed.add(id(kwargs))
        if id(result) in self.info or isinstance(result, (int, float, str, bytes, type(None))):
            return result     # a shared object (e.g. a cached TensorRef) or a plain value
        return self.track(result, d + 1, s + 1)

    def build(self, obj: Any, state: Any) -> Any:
        """BUILD: returns the object that replaces ``obj`` on the stack and in the memo."""
        if id(obj) in self.sealed:
            raise MapcError("corrupt pickle: BUILD changes an object after it was used")
        self.adopt(obj, [state])
        self.sealed.add(id(obj))
        if isinstance(obj, _PendingDType):
            obj.state = state
            return self.track(obj.resolve(), 0, 1)
        if isinstance(obj, _PendingArray):
            result = _build_array(state)
            return self.track(result, 1, 1)
        if type(obj) in (_ODICT, collections.Counter):
            # torch's state_dict() is an OrderedDict with a ``_metadata`` attribute: instance
            # attributes only, by string name, into the instance's own __dict__
            if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
                state = state[0]
            if not isinstance(state, dict) or not all(type(k) is str for k in state):
                raise MapcError(f"corrupt pickle: BUILD of a {type(obj).__name__} with "
                                f"{_short(state)}")
            obj.__dict__.update(state)
            return obj
        if isinstance(obj, type) or not getattr(type(obj), "_mapc_inert", False):
            raise MapcError(f"corrupt pickle: BUILD on {_short(obj)}, which mapc never "
                            f"modifies from a checkpoint")
        try:
            obj.__setstate__(state)
        except MapcError:
            raise
        except Exception as e:
            raise MapcError(f"corrupt pickle: cannot restore a {type(obj).__name__} "
                            f"({type(e).__name__}: {e})") from None
        return obj

    def replace(self, old: Any, new: Any) -> None:
        if new is old:
            return
        for key in self.pending.pop(id(old), ()):
            if self.memo.get(key) is old:
                self.memo[key] = new

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> Any:
        buf, ops, end = self.buf, _OPS, self.end
        while True:
            pos = self.pos
            if pos >= end:
                raise MapcError("corrupt or truncated pickle: it ends without a STOP opcode")
            code = buf[pos]
            self.pos = pos + 1
            self.work += 1
            if self.work > MAX_NODES:
                self.charge(0)
            op = ops.get(code)
            if op is None:
                raise MapcError(f"corrupt pickle: unknown opcode {bytes([code])!r} at offset "
                                f"{pos}")
            if op is _stop:
                value = self.pop()
                if isinstance(value, _PendingArray):
                    raise MapcError("corrupt pickle: a numpy array that was never built")
                if isinstance(value, _PendingDType):
                    value = value.resolve()
                return value
            op(self)


def _stop(m: _Machine) -> None:  # handled in run()
    pass


def _resolve_pending(value: Any) -> Any:
    return value.resolve() if isinstance(value, _PendingDType) else value


def _resolved(m: "_Machine", items: list) -> list:
    """Pending numpy dtypes among ``items`` resolved (only once one was ever made)."""
    if m.numpy:
        return [_resolve_pending(x) for x in items]
    return items


def _push_leaf(m: _Machine, value: Any) -> None:
    m.stack.append(value)


def _op_mark(m):
    m.marks.append(m.stack)
    m.stack = []


def _op_pop(m):
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


def _op_pop_mark(m):
    m.pop_mark()


def _op_dup(m):
    m.stack.append(m.stack[-1] if m.stack else m.pop())


def _op_int(m):
    data = m.line()
    if data == b"00":
        value: Any = False
    elif data == b"01":
        value = True
    else:
        value = _parse_int(data)
    m.stack.append(value)


def _parse_int(data: bytes) -> int:
    if len(data.strip().rstrip(b"L")) > 2 * _MAX_LONG_BYTES:
        raise MapcError("corrupt pickle: an integer is implausibly long")
    try:
        return int(data.strip().rstrip(b"L"))
    except ValueError:
        raise MapcError(f"corrupt pickle: bad integer {_short(data)}") from None


def _op_long(m):
    m.stack.append(_parse_int(m.line()))


def _op_float(m):
    data = m.line()
    try:
        m.stack.append(float(data))
    except ValueError:
        raise MapcError(f"corrupt pickle: bad float {_short(data)}") from None


def _op_long_n(fmt):
    def op(m):
        n = m.uint(fmt)
        if n > _MAX_LONG_BYTES:
            raise MapcError(f"corrupt pickle: an integer of {n} bytes is implausibly long")
        m.stack.append(int.from_bytes(m.read(n), "little", signed=True))
    return op


def _op_string(m):
    data = m.line().strip()
    if len(data) < 2 or data[:1] != data[-1:] or data[:1] not in (b"'", b'"'):
        raise MapcError("corrupt pickle: a STRING opcode without quotes")
    try:
        raw = codecs.escape_decode(data[1:-1])[0]
    except ValueError as e:
        raise MapcError(f"corrupt pickle: bad STRING ({e})") from None
    m.stack.append(m.text(raw))


def _op_unicode(m):
    try:
        m.stack.append(str(m.line(), "raw-unicode-escape"))
    except UnicodeDecodeError:
        raise MapcError("corrupt pickle: bad UNICODE string") from None


def _sized(fmt, kind):
    def op(m):
        data = m.read(m.uint(fmt))
        if kind == "str":
            m.stack.append(m.text(data))
        elif kind == "bytes":
            m.stack.append(data)
        elif kind == "bytearray":
            m.stack.append(m.new(bytearray(data)))
        else:          # py2 str: decoded like the old encoding="utf-8" unpickler
            m.stack.append(m.text(data))
    return op


def _op_persid(m):
    _persistent(m, m.text(m.line()))


def _op_binpersid(m):
    _persistent(m, m.pop())


def _persistent(m, pid):
    if m.persistent_load is None:
        raise MapcError(f"corrupt pickle: unexpected persistent id {_short(pid)}")
    m.sealed.add(id(pid))
    try:
        value = m.persistent_load(pid)
    except MapcError:
        raise
    except Exception as e:
        raise MapcError(f"corrupt pickle: bad persistent id {_short(pid)} "
                        f"({type(e).__name__}: {e})") from None
    m.stack.append(value)


def _op_reduce(m):
    args = m.pop()
    func = m.pop()
    m.stack.append(m.call(func, args))


def _op_newobj(m):
    args = m.pop()
    cls = m.pop()
    m.stack.append(m.call(cls, args, newobj=True))


def _op_newobj_ex(m):
    kwargs = m.pop()
    args = m.pop()
    cls = m.pop()
    m.stack.append(m.call(cls, args, kwargs, newobj=True))


def _op_build(m):
    state = m.pop()
    obj = m.pop()
    built = m.build(obj, _resolve_pending(state))
    m.replace(obj, built)
    m.stack.append(built)


def _op_global(m):
    module = m.text(m.line())
    name = m.text(m.line())
    m.stack.append(m.find(module, name))


def _op_stack_global(m):
    name = m.pop()
    module = m.pop()
    m.stack.append(m.find(module, name))


def _op_inst(m):
    module = m.text(m.line())
    name = m.text(m.line())
    cls = m.find(module, name)
    args = tuple(m.pop_mark())
    m.new(args, args)
    m.stack.append(m.call(cls, args, newobj=True))


def _op_obj(m):
    items = m.pop_mark()
    if not items:
        raise MapcError("corrupt pickle: OBJ without a class")
    args = tuple(items[1:])
    m.new(args, args)
    m.stack.append(m.call(items[0], args, newobj=True))


def _op_empty(factory):
    def op(m):
        m.stack.append(m.new(factory()))
    return op


def _op_tuple(m):
    items = tuple(_resolved(m, m.pop_mark()))
    m.stack.append(m.new(items, items) if items else ())


def _op_tuple_n(n):
    def op(m):
        if len(m.stack) < n:
            raise MapcError("corrupt pickle: stack underflow")
        items = tuple(_resolved(m, m.stack[-n:]))
        del m.stack[-n:]
        m.stack.append(m.new(items, items))
    return op


def _op_list(m):
    items = _resolved(m, m.pop_mark())
    m.stack.append(m.new(items, items))


def _op_dict(m):
    items = _resolved(m, m.pop_mark())
    if len(items) % 2:
        raise MapcError("corrupt pickle: DICT with an odd number of items")
    d: dict = m.new({})
    _set_items(m, d, items)
    m.stack.append(d)


def _set_items(m, d, items):
    m.open(d, (dict, _ODICT), "SETITEMS")
    m.adopt(d, items)
    m.charge(len(items))
    try:
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]
    except TypeError as e:
        raise MapcError(f"corrupt pickle: bad dictionary key ({e})") from None


def _op_setitem(m):
    value = _resolve_pending(m.pop())
    key = _resolve_pending(m.pop())
    if not m.stack:
        raise MapcError("corrupt pickle: stack underflow")
    _set_items(m, m.stack[-1], [key, value])


def _op_setitems(m):
    items = _resolved(m, m.pop_mark())
    if len(items) % 2:
        raise MapcError("corrupt pickle: SETITEMS with an odd number of items")
    if not m.stack:
        raise MapcError("corrupt pickle: stack underflow")
    _set_items(m, m.stack[-1], items)


def _op_append(m):
    value = _resolve_pending(m.pop())
    if not m.stack:
        raise MapcError("corrupt pickle: stack underflow")
    _append(m, m.stack[-1], [value])


def _op_appends(m):
    items = _resolved(m, m.pop_mark())
    if not m.stack:
        raise MapcError("corrupt pickle: stack underflow")
    _append(m, m.stack[-1], items)


def _append(m, target, items):
    m.open(target, (list,), "APPEND")
    m.adopt(target, items)
    m.charge(len(items))
    target.extend(items)


def _op_additems(m):
    items = _resolved(m, m.pop_mark())
    if not m.stack:
        raise MapcError("corrupt pickle: stack underflow")
    target = m.stack[-1]
    m.open(target, (set,), "ADDITEMS")
    m.adopt(target, items)
    m.charge(len(items))
    try:
        target.update(items)
    except TypeError as e:
        raise MapcError(f"corrupt pickle: bad set item ({e})") from None


def _op_frozenset(m):
    items = _resolved(m, m.pop_mark())
    try:
        value = frozenset(items)
    except TypeError as e:
        raise MapcError(f"corrupt pickle: bad set item ({e})") from None
    m.stack.append(m.new(value, items))


def _get(m, key):
    try:
        m.stack.append(m.memo[key])
    except KeyError:
        raise MapcError(f"corrupt pickle: memo key {_short(key)} was never stored") from None


def _put(m, key):
    if not m.stack:
        raise MapcError("corrupt pickle: PUT with an empty stack")
    value = m.stack[-1]
    m.memo[key] = value
    if isinstance(value, (_PendingDType, _PendingArray)):
        m.pending.setdefault(id(value), []).append(key)
        m.keep.append(value)


def _op_memoize(m):
    _put(m, len(m.memo))


def _op_frame(m):
    n = m.uint("<Q")
    if n > m.end - m.pos:
        raise MapcError(f"corrupt or truncated pickle: a frame of {n} bytes at offset "
                        f"{m.pos}, {m.end - m.pos} remain")


def _op_proto(m):
    version = m.read(1)[0]
    if version > 5:
        raise MapcError(f"corrupt pickle: protocol {version}")


def _refused(what):
    def op(m):
        raise MapcError(f"corrupt pickle: {what} is not supported in a checkpoint")
    return op


_ODICT = collections.OrderedDict


def _int_arg(fmt):
    def op(m):
        m.stack.append(m.uint(fmt))
    return op


_OPS_BY_BYTES: dict[bytes, Callable[[_Machine], None]] = {
    b"(": _op_mark, b".": _stop, b"0": _op_pop, b"1": _op_pop_mark, b"2": _op_dup,
    b"F": _op_float, b"I": _op_int, b"J": _int_arg("<i"), b"K": _int_arg("<B"),
    b"L": _op_long, b"M": _int_arg("<H"), b"N": lambda m: m.stack.append(None),
    b"P": _op_persid, b"Q": _op_binpersid, b"R": _op_reduce, b"S": _op_string,
    b"T": _sized("<I", "py2str"), b"U": _sized("<B", "py2str"), b"V": _op_unicode,
    b"X": _sized("<I", "str"), b"a": _op_append, b"b": _op_build, b"c": _op_global,
    b"d": _op_dict, b"}": _op_empty(dict), b"e": _op_appends,
    b"g": lambda m: _get(m, _parse_int(m.line())), b"h": lambda m: _get(m, m.uint("<B")),
    b"i": _op_inst, b"j": lambda m: _get(m, m.uint("<I")), b"l": _op_list,
    b"]": _op_empty(list), b"o": _op_obj, b"p": lambda m: _put(m, _parse_int(m.line())),
    b"q": lambda m: _put(m, m.uint("<B")), b"r": lambda m: _put(m, m.uint("<I")),
    b"s": _op_setitem, b"t": _op_tuple, b")": lambda m: m.stack.append(()),
    b"u": _op_setitems, b"G": lambda m: m.stack.append(m.uint(">d")),
    b"\x80": _op_proto, b"\x81": _op_newobj, b"\x82": _refused("the extension registry"),
    b"\x83": _refused("the extension registry"), b"\x84": _refused("the extension registry"),
    b"\x85": _op_tuple_n(1), b"\x86": _op_tuple_n(2), b"\x87": _op_tuple_n(3),
    b"\x88": lambda m: m.stack.append(True), b"\x89": lambda m: m.stack.append(False),
    b"\x8a": _op_long_n("<B"), b"\x8b": _op_long_n("<i"),
    b"B": _sized("<I", "bytes"), b"C": _sized("<B", "bytes"),
    b"\x8c": _sized("<B", "str"), b"\x8d": _sized("<Q", "str"), b"\x8e": _sized("<Q", "bytes"),
    b"\x8f": _op_empty(set), b"\x90": _op_additems, b"\x91": _op_frozenset,
    b"\x92": _op_newobj_ex, b"\x93": _op_stack_global, b"\x94": _op_memoize,
    b"\x95": _op_frame, b"\x96": _sized("<Q", "bytearray"),
    b"\x97": _refused("an out-of-band buffer"), b"\x98": _refused("an out-of-band buffer"),
}


_OPS = {code[0]: op for code, op in _OPS_BY_BYTES.items()}


def unpickle(buf: Any, allow: Mapping[str, Any], *, pos: int = 0, end: int | None = None,
             persistent_load: Callable[[Any], Any] | None = None,
             refuse: Callable[[str], MapcError] | None = None) -> tuple[Any, int]:
    """Unpickle the pickle starting at ``buf[pos]`` (``buf``: bytes, memoryview or mmap) with
    globals from ``allow`` only; returns the object and the offset just after its STOP.

    ``refuse(full_name)`` builds the error for a global not on the list. Raises MapcError
    for everything else that is refused or malformed (the caller adds the file's name).
    """
    end = len(buf) if end is None else end
    if refuse is None:
        def refuse(full):
            return MapcError(f"the pickle references {full}, which is not on mapc's "
                             f"allow-list of inert objects")
    m = _Machine(buf, pos, end, allow, persistent_load, refuse)
    try:
        value = m.run()
    except RecursionError:   # e.g. hashing a nested key; the depth bound should prevent it
        raise MapcError(f"corrupt pickle: objects nested more than {MAX_DEPTH} deep") from None
    except MemoryError:
        raise MapcError("corrupt pickle: it asks for more memory than there is") from None
    return value, m.pos
