"""Quantized tensors that a spec rule reads dequantized: ``quantized fp8_block`` and
``quantized mxfp4`` (docs/language.md, "Quantized storage").

Both are transformers' conventions for a checkpoint's stored tensors, so they are named by the
physical tensor ``NAME`` a rule places:

- ``fp8_block`` (fine-grained FP8, as DeepSeek-V3 ships): ``NAME`` holds float8_e4m3fn values
  and ``NAME_scale_inv`` float32 scales, one per 128 x 128 block of the last two axes
  (``[..., ceil(rows / 128), ceil(cols / 128)]``). The value is ``float32(w) * scale`` of its
  block, computed in float32: transformers' ``_dequantize_fp8_weight(..., dtype=float32)``.
- ``mxfp4`` (OCP microscaling FP4, as GPT-OSS ships): ``NAME_blocks`` holds uint8 bytes
  ``[..., G, 16]``, two e2m1 values each (low nibble first), ``NAME_scales`` uint8 e8m0
  exponents ``[..., G]``, one per 32 values. The value is ``e2m1 * 2 ** (scale - 127)`` in
  bfloat16 (exact: an e2m1 value has two significant bits), with the last two axes swapped
  (``[..., rows, G, 16]`` gives ``[..., G * 32, rows]``), all as transformers'
  ``convert_moe_packed_tensors`` computes it: the shape of the module's parameter, the same
  as a plain (bf16) release stores under ``NAME``.

``QuantizedView`` wraps an opened source: each such pair (or the plain ``NAME``) appears as one
tensor ``NAME``, dequantized when read, so the rest of mapc sees an ordinary checkpoint. A rule
that says ``quantized KIND`` reads either form (a bf16 and an MXFP4 release of one model use
one spec); a quantized tensor placed by a rule that does not say so is refused.
"""
from __future__ import annotations

from math import ceil

import numpy as np

from mapc.errors import MapcError

KINDS = ("fp8_block", "mxfp4")
BLOCK = 128                         # fp8_block: rows and columns per scale
MX_BLOCK = 32                       # mxfp4: values per exponent
# e2m1 values of the 16 nibbles (sign bit 3), as the OCP MX spec and transformers' FP4_VALUES
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def _ml():
    import ml_dtypes
    return ml_dtypes


def scale_shape(shape) -> tuple[int, ...]:
    """The ``_scale_inv`` shape of an fp8_block tensor of ``shape``."""
    *lead, rows, cols = shape
    return (*lead, ceil(rows / BLOCK), ceil(cols / BLOCK))


def dequant_fp8_block(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values of float8_e4m3fn ``weight`` with per-128x128-block float32 ``scale``."""
    if weight.ndim < 2:
        raise MapcError(f"an fp8_block tensor has at least 2 axes, not shape {list(weight.shape)}")
    w = np.asarray(weight).view(_ml().float8_e4m3fn).astype(np.float32)
    s = np.asarray(scale, dtype=np.float32)
    *_, rows, cols = w.shape
    s = np.repeat(np.repeat(s, BLOCK, axis=-2)[..., :rows, :], BLOCK, axis=-1)[..., :cols]
    return np.multiply(w, s, out=w)


def dequant_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """bfloat16 values of MXFP4 ``blocks`` [..., rows, G, 16] with e8m0 ``scales``
    [..., rows, G], with the last two axes swapped: [..., G * 32, rows]."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    if blocks.ndim < 3:
        raise MapcError(f"MXFP4 blocks have at least 3 axes (rows, groups, 16 bytes), not "
                        f"shape {list(blocks.shape)}")
    out = np.empty(blocks.shape[:-1] + (2 * blocks.shape[-1],), dtype=np.float32)
    out[..., 0::2] = E2M1[blocks & 0x0F]
    out[..., 1::2] = E2M1[blocks >> 4]
    exp = np.asarray(scales, dtype=np.int32) - 127
    with np.errstate(over="ignore"):     # exponents past float32's range: inf, as torch.ldexp
        np.ldexp(out, exp[..., None], out=out)
    out = out.reshape(blocks.shape[:-2] + (-1,)).astype(_ml().bfloat16)
    return np.ascontiguousarray(np.swapaxes(out, -1, -2))


class QuantizedView:
    """A source whose quantized pairs each appear as one dequantized tensor (see the module).

    Everything else is the wrapped source's (attributes are passed through). The resolver
    (mapc.compiler.resolve) drops the config's ``quantization_config``: the output is not
    quantized."""

    def __init__(self, source):
        self._source = source
        self._kind: dict[tuple, dict[str, str]] = {}     # coord key -> {NAME: kind}
        self._names: dict[tuple, list[str]] = {}

    def __getattr__(self, name):
        return getattr(self._source, name)

    def _scan(self, coord):
        key = tuple(coord)
        if key in self._names:
            return
        names = list(self._source.names(coord))
        have = set(names)
        kinds, hidden = {}, set()
        for n in names:
            if n.endswith("_scale_inv") and n[:-len("_scale_inv")] in have:
                base = n[:-len("_scale_inv")]
                if self._source.dtype(base, coord) == "float8_e4m3fn":
                    kinds[base] = "fp8_block"
                    hidden.add(n)
            elif n.endswith("_blocks") and n[:-len("_blocks")] + "_scales" in have and \
                    n[:-len("_blocks")] not in have:
                base = n[:-len("_blocks")]
                kinds[base] = "mxfp4"
                hidden |= {n, base + "_scales"}
        out = []
        for n in names:
            if n in hidden:
                if n.endswith("_blocks"):
                    out.append(n[:-len("_blocks")])
                continue
            out.append(n)
        self._kind[key], self._names[key] = kinds, out

    def quantized(self) -> dict[str, str]:
        """Every dequantized tensor (over all coords): name -> kind."""
        out = {}
        for c in self._source.coords():
            self._scan(c)
            out.update(self._kind[tuple(c)])
        return out

    def kind(self, name, coord) -> str | None:
        self._scan(coord)
        return self._kind[tuple(coord)].get(name)

    def names(self, coord):
        self._scan(coord)
        return list(self._names[tuple(coord)])

    def shape(self, name, coord):
        kind = self.kind(name, coord)
        if kind == "mxfp4":
            *lead, rows, g, b = self._source.shape(name + "_blocks", coord)
            return (*lead, g * b * 2, rows)
        return tuple(self._source.shape(name, coord))

    def dtype(self, name, coord, slot="param"):
        kind = self.kind(name, coord)
        if kind is None:
            return self._source.dtype(name, coord, slot=slot) if slot != "param" else \
                self._source.dtype(name, coord)
        return "float32" if kind == "fp8_block" else "bfloat16"

    def read(self, name, coord, slot="param"):
        kind = self.kind(name, coord)
        if kind is None:
            return self._source.read(name, coord, slot=slot) if slot != "param" else \
                self._source.read(name, coord)
        if slot != "param":
            raise MapcError(f"{name} is stored quantized ({kind}): it has no optimizer "
                            f"state '{slot}'", where=str(self._source.path))
        where = f"{self._source.path}: {name}"
        if kind == "fp8_block":
            w = self._source.read(name, coord)
            s = self._source.read(name + "_scale_inv", coord)
            if tuple(s.shape) != scale_shape(w.shape) or s.dtype != np.float32:
                raise MapcError(f"{name}_scale_inv has shape {list(s.shape)} ({s.dtype}), but "
                                f"a {list(w.shape)} fp8 tensor in 128 x 128 blocks needs "
                                f"float32 {list(scale_shape(w.shape))}", where=where,
                                hint="the checkpoint's scales do not match its weights")
            return dequant_fp8_block(w, s)
        b = self._source.read(name + "_blocks", coord)
        s = self._source.read(name + "_scales", coord)
        if b.dtype != np.uint8 or s.dtype != np.uint8 or tuple(s.shape) != tuple(b.shape[:-1]):
            raise MapcError(f"{name}_blocks {list(b.shape)} ({b.dtype}) and {name}_scales "
                            f"{list(s.shape)} ({s.dtype}) are not MXFP4 (uint8 blocks "
                            f"[..., G, 16] and uint8 scales [..., G])", where=where)
        return dequant_mxfp4(b, s)


def quantized_view(source, spec, layout: str):
    """``source`` as a QuantizedView when ``layout`` of ``spec`` has quantized rules."""
    if isinstance(source, QuantizedView) or layout not in spec.layout_names():
        return source
    if not any(r.get("quantized") for r in spec.layout(layout)["rules"]):
        return source
    return QuantizedView(source)


def check_declared(plan, source) -> None:
    """Every tensor read dequantized is placed by a rule that says ``quantized`` its kind."""
    if not isinstance(source, QuantizedView):
        return
    for inst, coord, name in plan.placements():
        kind = source.kind(name, coord)
        if kind is not None and inst.rule.get("quantized") != kind:
            said = inst.rule.get("quantized")
            raise MapcError(f"{name} is stored quantized ({kind}) but its rule "
                            f"({inst.rule['at']}) " + (f"says quantized {said}" if said else
                                                       "does not say it may be"),
                            where=str(source.path),
                            hint=f"add 'quantized {kind}' to the rule, or convert a "
                                 f"dequantized checkpoint")
