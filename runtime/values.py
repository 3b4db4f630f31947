"""Value maps at run time: the file stores ``scale * x + offset`` of the logical value ``x``.

A map is applied to one physical shard at a time (it is elementwise, so it commutes with every
layout op): writing, ``store`` maps the built shard in the executing backend (numpy, torch or
jax); reading, ``load`` maps each shard as it is read (numpy, as readers return it), before
it enters the backend for the recipe's gather. Both compute in
float64 and round once to the dtype the result is kept in, and both check that the map is
exact for this tensor: the result, mapped back the other way and rounded to the input's dtype,
must give the input bit for bit (a zero may come back as the zero of the other sign). ``1 + w`` of a bfloat16 ``w`` is exact in float32 (the planner
stores value-mapped 16-bit tensors as float32 for that reason, mapc.runtime.plan_write) but
not in bfloat16, where the low bits of ``w`` are lost; such a tensor is refused, naming it,
how many elements round, and the option that accepts the rounding (``--allow-lossy``). With
that option the rounded tensor is written and a warning says how many elements changed.

Optimizer moments (``exp_avg``, ``exp_avg_sq``) are those of the trained parameter, which is
the same for every map of scale 1 (``x + b``): they are carried as they are. A map with another
scale would rescale them (by the scale and its square), which mapc does not guess: refused.
"""
from __future__ import annotations

import numpy as np

from mapc.errors import MapcError

VALUE_SLOTS = ("param", "master")      # slots holding the value itself; moments do not
FLOATS = ("float16", "bfloat16", "float32", "float64")


def _dtype_of(be, x) -> str:
    from mapc.runtime.backends import dtype_name
    if be.name == "torch":
        return str(x.dtype).removeprefix("torch.")
    return dtype_name(x.dtype)


def _affine(be, x, scale, offset):
    y = be.cast(x, "float64")
    if scale != 1.0:
        y = y * scale
    return y + offset if offset != 0.0 else y


def _unaffine(be, y, scale, offset):
    x = be.cast(y, "float64")
    if offset != 0.0:
        x = x - offset
    return x / scale if scale != 1.0 else x


def _check(be, vmap, tensor, direction, x, back, out_dtype, report, allow_lossy):
    """``back`` (the result mapped back) must equal the input ``x`` bit for bit, except that
    a zero may come back with the other sign (``1 + -0.0`` is ``1.0``, which maps back to
    ``+0.0``; both are the same weight)."""
    a = np.ascontiguousarray(be.to_numpy(x))
    b = np.ascontiguousarray(be.to_numpy(back))
    ne = (a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1)).any(1)
    if not ne.any():
        return
    ne &= ~((a == 0) & (b == 0)).reshape(-1)
    if not ne.any():
        return
    differ, first = int(ne.sum()), int(np.argmax(ne))
    example = f"e.g. {a.reshape(-1)[first].item():.8g} comes back as " \
        f"{b.reshape(-1)[first].item():.8g}"
    text = (f"value map '{vmap.text}' ({vmap.at}) {direction} {tensor} in {out_dtype} is "
            f"not exact: {differ} of {a.size} elements round ({example})")
    if not allow_lossy:
        hint = "pass --allow-lossy to accept the rounding"
        if out_dtype in ("bfloat16", "float16"):
            hint = ("store it wider (--dtype fp32), or " + hint)
        raise MapcError(text, hint=hint)
    report.warnings.append(text + "; written rounded (--allow-lossy)")


def store(be, vmap, x, out_dtype: str, tensor: str, report, allow_lossy=False):
    """The physical shard ``vmap(x)`` in ``out_dtype`` from the logical shard ``x``."""
    have = _dtype_of(be, x)
    if have not in FLOATS or out_dtype not in FLOATS:
        raise MapcError(f"value map '{vmap.text}' ({vmap.at}) needs floating values, and "
                        f"{tensor} is {have if have not in FLOATS else out_dtype}",
                        hint="a value map applies to floating tensors only; fix the spec")
    y = be.cast(_affine(be, x, vmap.scale, vmap.offset), out_dtype)
    back = be.cast(_unaffine(be, y, vmap.scale, vmap.offset), have)
    _check(be, vmap, tensor, "storing", x, back, out_dtype, report, allow_lossy)
    return y


def load(vmap, arr: np.ndarray, tensor: str, report, allow_lossy=False) -> np.ndarray:
    """The logical shard from the stored shard ``arr`` (numpy, as read), in ``arr``'s dtype."""
    from mapc.runtime.backends import dtype_name, get_backend
    be = get_backend("numpy")
    have = dtype_name(arr.dtype)
    if have not in FLOATS:
        raise MapcError(f"value map '{vmap.text}' ({vmap.at}) needs floating values, and "
                        f"{tensor} is stored as {have}",
                        hint="a value map applies to floating tensors only; fix the spec")
    x = be.cast(_unaffine(be, np.asarray(arr), vmap.scale, vmap.offset), have)
    again = be.cast(_affine(be, x, vmap.scale, vmap.offset), have)
    _check(be, vmap, tensor, "reading", np.asarray(arr), again, have, report, allow_lossy)
    return np.require(x, requirements="C")


def moments_pass(vmap, tensor: str, slot: str) -> None:
    """Optimizer moments of a value-mapped tensor go through unchanged when its scale is 1."""
    if vmap.scale != 1.0:
        raise MapcError(f"value map '{vmap.text}' ({vmap.at}) scales {tensor}, so its "
                        f"optimizer state '{slot}' would have to be rescaled, which mapc "
                        f"does not do", hint="convert the weights only (without the "
                        "optimizer state), or use a map of scale 1")
