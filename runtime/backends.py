"""Array backends behind one small protocol.

A compiled recipe only ever reshapes, permutes, slices, pads with zeros, concatenates and
stacks, so a backend is a handful of functions. Data enters as numpy (read from files) and
leaves as numpy (written to files); in between it lives in the backend's own arrays. Because
every op is exact data movement, all backends produce identical bytes. A framework is imported
only when its backend is asked for.
"""
from __future__ import annotations

import functools

import numpy as np

from mapc.errors import MapcError

try:  # numpy has no bfloat16; ml_dtypes provides it (a mapc dependency)
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
    "float64": np.dtype(np.float64), "bfloat16": BF16,
    "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}
if BF16 is not None:     # stored fp8 weights (read dequantized: mapc.runtime.quantized)
    DTYPES["float8_e4m3fn"] = np.dtype(ml_dtypes.float8_e4m3fn)


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    for name, d in DTYPES.items():
        if d == dt:
            return name
    raise MapcError(f"unsupported dtype {dt}")


def bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bytes (NaNs compare by their bits, as a checkpoint stores them)."""
    return a.shape == b.shape and a.dtype == b.dtype and \
        np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                       np.ascontiguousarray(b).view(np.uint8))


class NumpyBackend:
    name = "numpy"

    def from_numpy(self, a: np.ndarray):
        return a

    def to_numpy(self, x) -> np.ndarray:
        return np.require(x, requirements="C")    # keeps 0-d (ascontiguousarray makes them 1-d)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def transpose(self, x, perm):
        return x.transpose(perm)

    def index(self, x, axis: int, i: int):
        return x[(slice(None),) * axis + (i,)]

    def slice(self, x, axis: int, start: int, stop: int):
        return x[(slice(None),) * axis + (slice(start, stop),)]

    def concat(self, xs, axis: int):
        return xs[0] if len(xs) == 1 else np.concatenate(xs, axis=axis)

    def stack(self, xs, axis: int):
        return np.stack(xs, axis=axis)

    def pad(self, x, axis: int, n: int):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n)
        return np.pad(x, widths)

    def cast(self, x, dtype: str):
        return x.astype(DTYPES[dtype], copy=False)

    def broadcast(self, x, shape):
        return np.broadcast_to(x, tuple(shape))

    def all_zero(self, x) -> bool:
        return not np.any(x.view(np.uint8) if x.dtype.itemsize else x)

    def equal(self, a, b) -> bool:
        return bytes_equal(a, b)


class TorchBackend(NumpyBackend):
    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch

    def from_numpy(self, a):
        t = self.torch
        a = np.require(a, requirements="C")
        if a.dtype == BF16:
            return t.from_numpy(a.view(np.uint16)).view(t.bfloat16)
        return t.from_numpy(a)

    def to_numpy(self, x):
        t = self.torch
        x = x.contiguous()
        if x.dtype == t.bfloat16:
            return x.view(t.uint16).numpy().view(BF16)
        return x.numpy()

    def reshape(self, x, shape):
        return x.reshape(tuple(shape))

    def transpose(self, x, perm):
        return x.permute(*perm)

    def concat(self, xs, axis):
        return xs[0] if len(xs) == 1 else self.torch.cat(list(xs), dim=axis)

    def stack(self, xs, axis):
        return self.torch.stack(list(xs), dim=axis)

    def pad(self, x, axis, n):
        shape = list(x.shape)
        shape[axis] = n
        return self.torch.cat([x, x.new_zeros(shape)], dim=axis)

    def cast(self, x, dtype):
        return x.to(getattr(self.torch, dtype))

    def broadcast(self, x, shape):
        return x.expand(*shape)

    def all_zero(self, x):
        return not bool(x.ne(0).any()) and not bool(x.isnan().any()) \
            if x.is_floating_point() else not bool(x.ne(0).any())

    def equal(self, a, b):
        return bytes_equal(self.to_numpy(a), self.to_numpy(b))


class JaxBackend(NumpyBackend):
    name = "jax"

    def __init__(self):
        import jax
        jax.config.update("jax_enable_x64", True)  # keep int64/float64 tensors intact
        import jax.numpy as jnp
        self.jnp = jnp

    def from_numpy(self, a):
        return self.jnp.asarray(np.require(a, requirements="C"))

    def to_numpy(self, x):
        return np.require(np.asarray(x), requirements="C")

    def concat(self, xs, axis):
        return xs[0] if len(xs) == 1 else self.jnp.concatenate(list(xs), axis=axis)

    def stack(self, xs, axis):
        return self.jnp.stack(list(xs), axis=axis)

    def pad(self, x, axis, n):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n)
        return self.jnp.pad(x, widths)

    def cast(self, x, dtype):
        return x.astype(DTYPES[dtype])

    def broadcast(self, x, shape):
        return self.jnp.broadcast_to(x, tuple(shape))

    def all_zero(self, x):
        return NumpyBackend.all_zero(self, self.to_numpy(x))

    def equal(self, a, b):
        return bytes_equal(self.to_numpy(a), self.to_numpy(b))


BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


@functools.lru_cache(maxsize=None)
def get_backend(name: str = "numpy"):
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise MapcError(f"unknown backend '{name}'",
                        hint="choose one of: " + ", ".join(BACKENDS)) from None
    try:
        return cls()
    except ImportError as e:
        install = "pip install 'mapc[jax]'" if name == "jax" else \
            "pip install torch (pinned, e.g. torch==2.13.0)"
        raise MapcError(f"backend '{name}' needs {e.name}, which is not installed",
                        hint=f"{install}, or use --backend numpy") from None
