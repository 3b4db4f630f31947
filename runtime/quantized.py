"""Quantized tensors that a spec rule reads dequantized, and writes with ``--quantize KIND``:
``quantized fp8_block`` and ``quantized mxfp4`` (docs/language.md, "Quantized storage").

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

Writing (``--quantize KIND``, the end of this module): plan_quantized replaces each tensor of
such a rule by its stored tensors, store() quantizes it by the model authors' formula
(quant_fp8_block, quant_mxfp4), refusing what rounds unless ``--allow-lossy``.
"""
from __future__ import annotations

from dataclasses import dataclass
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


FP8_MAX = 448.0                     # the largest float8_e4m3fn value
# the config entry of an fp8_block checkpoint (DeepSeek-V3's config.json, transformers'
# FineGrainedFP8Config)
FP8_BLOCK_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [BLOCK, BLOCK]}


@dataclass
class Rounding:
    """What quantizing one tensor changed: ``rounded`` of ``size`` elements do not dequantize
    back to their value; ``example`` is the first such (value, dequantized)."""
    size: int = 0
    rounded: int = 0
    example: tuple | None = None
    max_abs: float = 0.0


def quant_fp8_block(x: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray, Rounding]:
    """float8_e4m3fn values and float32 ``_scale_inv`` per 128 x 128 block of the last two
    axes of ``x``, as the model authors quantize (and DeepSeek-V3's README_WEIGHTS states):
    computed in float32, each block's scale is ``amax / 448`` of its elements (a partial edge
    block is zero-padded to 128, so its amax is that of the elements it has) and its values
    ``x / scale`` rounded to nearest even in e4m3 (never beyond 448 in magnitude, so nothing
    saturates). Two cases of their formula are settled here: an all-zero block has scale 1.0
    (transformers' convention; any scale gives its zeros back), and a block that is already an
    FP8 dequantization (``q * c`` for e4m3 ``q`` and a float32 ``c`` one ulp from ``amax /
    448``, which is where ``amax / 448`` of ``448 * c`` may land) keeps ``c``: so quantizing a
    tensor read from fp8_block storage gives back its bytes, scales included.

    Streams one 128-row band at a time (temporaries of a band only); returns the Rounding:
    which elements do not come back as their value when dequantized."""
    ml = _ml()
    f8 = np.dtype(ml.float8_e4m3fn)
    x = np.asarray(x)
    if x.ndim < 2:
        raise MapcError(f"an fp8_block tensor has at least 2 axes, not shape {list(x.shape)}",
                        where=where or None)
    *lead, rows, cols = x.shape
    nc = ceil(cols / BLOCK)
    flat = x.reshape(-1, rows, cols)
    q_out = np.empty(flat.shape, dtype=f8)
    s_out = np.empty((flat.shape[0], ceil(rows / BLOCK), nc), dtype=np.float32)
    info = Rounding(size=x.size)
    band = np.zeros((BLOCK, nc * BLOCK), dtype=np.float32)     # reused; the pad stays zero
    for l in range(flat.shape[0]):
        for r in range(s_out.shape[1]):
            rs = slice(r * BLOCK, min(rows, (r + 1) * BLOCK))
            h = rs.stop - rs.start
            w = band[:h]
            w[:, :cols] = flat[l, rs]
            if not np.isfinite(w).all():
                raise MapcError(f"cannot quantize a tensor holding inf or NaN to fp8_block",
                                where=where or None,
                                hint="convert without --quantize (the values are not finite)")
            w3 = w.reshape(h, nc, BLOCK)
            q, s, back = _quant_band(w3, f8)
            s_out[l, r] = s
            q_out[l, rs] = q.reshape(h, nc * BLOCK)[:, :cols]
            if flat.dtype.itemsize > 4:          # float64: rounded already by float32
                _count(info, flat[l, rs], back.reshape(h, nc * BLOCK)[:, :cols])
            else:
                _count(info, w3, back)
    return (q_out.reshape(x.shape), s_out.reshape((*lead, *s_out.shape[1:])), info)


def _e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bytes (a table: faster than a cast)."""
    global _E4M3
    if _E4M3 is None:
        _E4M3 = np.arange(256, dtype=np.uint8).view(_ml().float8_e4m3fn).astype(np.float32)
    return _E4M3


_E4M3 = None


def _quant_band(w3: np.ndarray, f8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(e4m3 values, scales, dequantized values) of a band of blocks ``w3`` [h, blocks, 128]
    (float32)."""
    table = _e4m3_values()
    amax = np.abs(w3).max(axis=(0, 2))
    s = amax / np.float32(FP8_MAX)
    s[amax == 0] = 1.0
    tiny = np.finfo(np.float32).smallest_subnormal
    s[(s == 0) & (amax > 0)] = tiny           # amax / 448 below float32's range
    # a subnormal amax / 448 rounds to a multiple of ``tiny``: rounded down, amax / s can pass
    # 448 by far (then e4m3 has no value for it: NaN); one ``tiny`` up keeps it within 448
    over = (s < np.finfo(np.float32).tiny) & (amax > s * np.float32(FP8_MAX))
    s[over] = np.nextafter(s[over], np.float32(np.inf))
    y = w3 / s[None, :, None]
    q = y.astype(f8)
    qf = table[q.view(np.uint8)]
    back = qf * s[None, :, None]
    exact = (back == w3).all(axis=(0, 2))
    if exact.all():
        return q, s, back
    # blocks within float32 rounding of e4m3 values: an FP8 dequantization whose scale c may
    # be one ulp from amax / 448; try both neighbours, keep one that gives the block back
    # (screened on each block's first row: other data is nowhere near the e4m3 grid there)
    near = ~exact & (np.abs(y[0] - qf[0]) <= np.abs(qf[0]) * np.float32(2.0 ** -20)).all(axis=1)
    for toward in (0.0, np.inf):
        idx = np.flatnonzero(near)
        if idx.size == 0:
            break
        c = np.nextafter(s[idx], np.float32(toward))
        blk = w3[:, idx, :]
        qc = (blk / c[None, :, None]).astype(f8)
        bc = table[qc.view(np.uint8)] * c[None, :, None]
        ok = (bc == blk).all(axis=(0, 2))
        if ok.any():
            s[idx[ok]] = c[ok]
            q[:, idx[ok], :] = qc[:, ok, :]
            back[:, idx[ok], :] = bc[:, ok, :]
            near[idx[ok]] = False
    return q, s, back


def _count(info: Rounding, w3, back) -> None:
    ne = back != w3
    n = int(ne.sum())
    if not n:
        return
    info.rounded += n
    diff = np.abs(back - w3)
    info.max_abs = max(info.max_abs, float(diff.max()))
    if info.example is None:
        k = int(np.argmax(ne.reshape(-1)))
        info.example = (float(w3.reshape(-1)[k]), float(back.reshape(-1)[k]))


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


# ---- mxfp4: quantizing (--quantize mxfp4) -------------------------------------------------------
E2M1_MAX = 6.0                       # the largest e2m1 magnitude
# magnitudes at which an e2m1 code steps up: the midpoints of E2M1[:8], a midpoint itself
# going up (half away from zero, as the authors' bit-level rounding does)
_E2M1_STEPS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
# code of the value half of each code's (0 -> 0, 1.0 -> 0.5, 2.0 -> 1.0, 3.0 -> 1.5, 4.0 -> 2.0,
# 6.0 -> 3.0); -1 where the half is no e2m1 value (0.5 -> 0.25, 1.5 -> 0.75)
_HALF_CODE = np.array([0, -1, 1, -1, 2, 3, 4, 5], dtype=np.int8)
# the config entry of an mxfp4 checkpoint (GPT-OSS's config.json, transformers' Mxfp4Config);
# a layout adds the modules transformers' loader leaves alone with this `let`
MXFP4_CONFIG = {"quant_method": "mxfp4"}
MXFP4_NOT_CONVERTED = "mxfp4_modules_to_not_convert"


def mxfp4_shapes(shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(``_blocks``, ``_scales``) shapes of an mxfp4 tensor whose module parameter has
    ``shape`` [..., K, N] (the inverse of dequant_mxfp4's swap): [..., N, K / 32, 16] and
    [..., N, K / 32]."""
    *lead, k, n = shape
    return (*lead, n, k // MX_BLOCK, MX_BLOCK // 2), (*lead, n, k // MX_BLOCK)


def quant_mxfp4(x: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray, Rounding]:
    """MXFP4 ``_blocks`` and ``_scales`` (uint8) of a module parameter ``x`` [..., K, N], the
    inverse of dequant_mxfp4: blocks of 32 along K (the axis the release packs), so K must be a
    multiple of 32. The formula is the model authors' (triton_kernels' ``downcast_to_mxfp``,
    the rounding its pure-torch reference spells out), computed in float32: a block's scale is
    ``amax / 6`` rounded *up* to a power of two (its e8m0 byte that power's biased exponent; an
    all-zero block, or one whose amax / 6 underflows float32, gets byte 0 and zeros), its
    values ``x / scale`` rounded to the nearest e2m1 value with ties away from zero (never
    beyond 6: the scale covers amax), the sign kept (``-0`` and a negative value that rounds
    to zero are nibble 8), two nibbles per byte, the first value in the low nibble.

    One case of the formula is settled here: a block that is already an MXFP4 dequantization
    whose largest code is 3 (the formula gives that, at scale ``2 ** (b + 1)``, to a block whose
    amax is between 3 and 3.5 times it) dequantizes to values the formula quantizes at ``2 **
    b`` with every code doubled (largest 6). Both give the same values; when every value of
    such a block is exact at both scales, the larger scale is kept, so an MXFP4 release made by
    the formula comes back byte for byte (except a block that held largest code 6 and no 0.5
    or 1.5: those values cannot tell it from its twin, about 1 block in 10**5 of normally
    distributed weights; its values come back, its bytes are the twin's).

    Streams one leading index (an expert) at a time, in bands of rows (temporaries of a
    band only); returns the Rounding: which elements do not come back as their value when
    dequantized."""
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[-2] % MX_BLOCK:
        raise MapcError(f"an mxfp4 tensor is [..., K, N] with K a multiple of {MX_BLOCK}, not "
                        f"shape {list(x.shape)}", where=where or None)
    *lead, k, n = x.shape
    bshape, sshape = mxfp4_shapes(x.shape)
    flat = x.reshape(-1, k, n)
    b_out = np.empty((flat.shape[0], n, k // MX_BLOCK, MX_BLOCK // 2), dtype=np.uint8)
    s_out = np.empty((flat.shape[0], n, k // MX_BLOCK), dtype=np.uint8)
    info = Rounding(size=x.size)
    band = max(1, MX_BAND // k)
    for l in range(flat.shape[0]):
        for r in range(0, n, band):
            w = _float32_rows(flat[l, :, r:r + band])              # [rows, K]: blocks along K
            if not np.isfinite(w).all():
                raise MapcError("cannot quantize a tensor holding inf or NaN to mxfp4",
                                where=where or None,
                                hint="convert without --quantize (the values are not finite)")
            g = w.reshape(w.shape[0], k // MX_BLOCK, MX_BLOCK)
            code, s_out[l, r:r + band], back = _quant_mx_blocks(g)
            b_out[l, r:r + band] = code[..., 0::2] | (code[..., 1::2] << 4)
            if flat.dtype.itemsize > 4:          # float64: rounded already by float32
                _count(info, flat[l, :, r:r + band].T.reshape(g.shape), back)
            else:
                _count(info, g, back)
    return b_out.reshape(bshape), s_out.reshape(sshape), info


MX_BAND = 1 << 20                    # elements of a band of rows quantized at once


def _float32_rows(x: np.ndarray) -> np.ndarray:
    """``x.T`` as a contiguous float32 array (a bfloat16 ``x`` by its bits: twice as fast)."""
    if x.dtype == _ml().bfloat16:
        out = np.empty(x.shape[::-1], dtype=np.uint32)
        np.left_shift(x.view(np.uint16).T, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    return np.ascontiguousarray(x.T, dtype=np.float32)


def _quant_mx_blocks(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nibbles, e8m0 bytes, dequantized values) of float32 blocks ``g`` [..., 32]."""
    a = np.abs(g)
    amax = a.max(axis=-1)
    bits = (amax / np.float32(E2M1_MAX)).view(np.int32)
    # amax / 6 rounded up to a power of two: all-ones added to the mantissa, the exponent kept
    e = ((bits + np.int32(0x007FFFFF)) & np.int32(0x7F800000)) >> 23
    scale = np.ldexp(np.float32(1.0), e - 127).astype(np.float32)
    inv = np.where(e == 0, np.float32(0.0), np.float32(1.0) / scale).astype(np.float32)
    q = a * inv[..., None]
    code = np.greater_equal(q, _E2M1_STEPS[0]).view(np.uint8)
    for step in _E2M1_STEPS[1:]:                 # the steps q reaches (faster than a search)
        code += np.greater_equal(q, step).view(np.uint8)
    back = E2M1[code] * scale[..., None]
    # an exact block whose largest code is 6 (7) and that has no 0.5 or 1.5: its twin at
    # twice the scale (every code halved) is what the formula made
    cand = np.flatnonzero(((code == 7).any(axis=-1) & (back == a).all(axis=-1)).reshape(-1))
    if cand.size:
        flat_code = code.reshape(-1, MX_BLOCK)
        half = _HALF_CODE[flat_code[cand]]
        ok = (half >= 0).all(axis=-1)
        flat_code[cand[ok]] = half[ok]
        e.reshape(-1)[cand[ok]] += 1
    code |= np.signbit(g).view(np.uint8) << 3
    return code, e.astype(np.uint8), np.copysign(back, g)


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


# ---- writing: --quantize KIND ------------------------------------------------------------------
SCALE_SUFFIX = "_scale_inv"
# the stored tensors of a quantized NAME, by suffix: the first holds the values, the others
# are its companions (kept in its shard file)
SUFFIXES = {"fp8_block": ("", SCALE_SUFFIX), "mxfp4": ("_blocks", "_scales")}


def stored_shapes(kind: str, shape) -> list[tuple[str, tuple, str]]:
    """(suffix, shape, dtype) of each stored tensor of a quantized tensor of ``shape``."""
    if kind == "fp8_block":
        return [("", tuple(shape), "float8_e4m3fn"), (SCALE_SUFFIX, scale_shape(shape), "float32")]
    blocks, scales = mxfp4_shapes(shape)
    return [("_blocks", blocks, "uint8"), ("_scales", scales, "uint8")]


def _describe(kind: str) -> tuple[str, str]:
    """(how ``kind`` stores a tensor, what its rounding keeps), for decisions and notes."""
    if kind == "fp8_block":
        return (f"float8_e4m3fn + float32 NAME{SCALE_SUFFIX} per {BLOCK}x{BLOCK} block",
                f"e4m3 keeps 3 mantissa bits, with one float32 scale per {BLOCK} x {BLOCK} "
                f"block")
    return (f"uint8 NAME_blocks (two e2m1 values a byte) + uint8 e8m0 NAME_scales per "
            f"{MX_BLOCK} values", f"e2m1 keeps 1 mantissa bit, with one power-of-two scale "
                              f"per {MX_BLOCK} values")


def check_request(request) -> None:
    """Refuse a ``--quantize`` mapc does not write (before anything else is planned)."""
    kind = request.quantize
    if kind is None:
        return
    if kind not in KINDS:
        raise MapcError(f"--quantize {kind} is not a quantized storage mapc knows",
                        hint="known: " + ", ".join(KINDS))
    if request.with_optimizer:
        raise MapcError(f"--quantize {kind} with --with-optimizer: a quantized tensor has no "
                        "optimizer state to export", hint="drop one of the two")


@dataclass(frozen=True)
class QuantizedPlan:
    """What ``--quantize KIND`` writes (plan_quantized)."""
    tensors: tuple                   # the format's planned (coord, name, shape, dtype), stored
    quantized: dict                  # (coord, NAME) -> kind of each tensor stored quantized
    notes: list
    decisions: dict
    config: dict | None              # config.json's quantization_config
    stored: frozenset = frozenset()  # names of the stored tensors of those
    companions: frozenset = frozenset()   # of those, the ones kept in their values' file


def plan_quantized(program, facts, request, tensors) -> QuantizedPlan:
    """What ``--quantize KIND`` (``request.quantize``) writes, planned: ``tensors`` (the
    format's planned (coord, name, shape, dtype)) with each tensor of a rule that says
    ``quantized KIND`` replaced by its stored tensors (fp8_block: ``NAME`` as float8_e4m3fn
    followed by ``NAME_scale_inv``; mxfp4: ``NAME_blocks`` then ``NAME_scales``), and what
    config.json says of them. Refused (MapcError): a kind mapc does not write, a layout without
    such rules, a tensor the kind cannot store, and a lossy quantization without
    ``--allow-lossy`` (a tensor whose value was not read from the same storage: it rounds)."""
    kind = request.quantize
    if kind is None:
        return QuantizedPlan(tuple(tensors), {}, [], {}, None)
    check_request(request)
    target = program.target
    placed = {(coord, name): inst for inst, coord, name in target.placements()
              if inst.rule.get("quantized") == kind}
    if not placed:
        raise MapcError(f"--quantize {kind}: layout {target.name} of spec {target.spec.family} "
                        f"has no rule that says 'quantized {kind}', so nothing would be stored "
                        f"quantized", hint=f"drop --quantize, or say 'quantized {kind}' on the "
                                           f"rules of the tensors to quantize (docs/language.md)")
    names = {name for _, name, _, _ in tensors}
    out, lossy, exact, stored, companions = [], [], 0, set(), set()
    for coord, name, shape, dt in tensors:
        inst = placed.get((coord, name))
        if inst is None:
            out.append((coord, name, shape, dt))
            continue
        where = f"{inst.rule['at']}: {name}"
        _check_storable(kind, name, shape, dt, where)
        if getattr(inst, "value", None) is not None:
            raise MapcError(f"--quantize {kind}: {name} also has a value map; mapc does not "
                            f"quantize a mapped value", where=where)
        parts = stored_shapes(kind, shape)
        for suffix, _, _ in parts:
            if suffix and name + suffix in names:
                raise MapcError(f"--quantize {kind}: {name}{suffix} is a tensor of the "
                                f"layout already", where=where)
        keys = list(inst.members.values())
        if keys and all(facts.quantized.get(k) == kind for k in keys):
            exact += 1
        else:
            lossy.append((name, dt))
        out += [(coord, name + suffix, sh, sdt) for suffix, sh, sdt in parts]
        stored |= {name + suffix for suffix, _, _ in parts}
        companions |= {name + suffix for suffix, _, _ in parts[1:]}
    n = len(placed)
    how, keeps = _describe(kind)
    notes = []
    if exact:
        notes.append(f"--quantize {kind}: {exact} tensor(s) read from {kind} storage are "
                     f"quantized back exactly (" + ("each block keeps its scale" if
                                                    kind == "fp8_block" else
                                                    "the same values") +
                     "; checked as written)")
    if lossy:
        dts = sorted({dt for _, dt in lossy})
        text = (f"--quantize {kind} rounds {len(lossy)} of {n} tensors ({' and '.join(dts)} "
                f"values not read from {kind} storage, e.g. {lossy[0][0]}): {keeps}")
        if not request.allow_lossy:
            raise MapcError(text, hint="pass --allow-lossy to accept the rounding")
        notes.append("lossy: " + text + " (--allow-lossy)")
    decisions = {"quantize": f"{kind}: {n} tensors as {how} ({exact} exact, {len(lossy)} "
                             f"rounded)"}
    return QuantizedPlan(tuple(out), {key: kind for key in placed}, notes, decisions,
                         _quantization_config(kind, target), frozenset(stored),
                         frozenset(companions))


def _check_storable(kind, name, shape, dt, where) -> None:
    if dt not in ("float32", "bfloat16", "float16", "float64") or len(shape) < 2 or (
            kind == "mxfp4" and shape[-2] % MX_BLOCK):
        need = ("floating tensors of at least 2 axes" if kind == "fp8_block" else
                f"floating tensors [..., K, N] with K a multiple of {MX_BLOCK} (blocks of "
                f"{MX_BLOCK} along K)")
        raise MapcError(f"--quantize {kind}: {name} is {dt} {list(shape)}; {kind} quantizes "
                        f"{need}", where=where, hint=f"drop 'quantized {kind}' from that rule")


def _quantization_config(kind: str, target) -> dict:
    """config.json's ``quantization_config`` of ``kind``: transformers' keys, as the release of
    the model the format is named after has them; for mxfp4 with the modules the layout's
    ``let mxfp4_modules_to_not_convert`` names (a list of strings), if it has one."""
    if kind == "fp8_block":
        return dict(FP8_BLOCK_CONFIG)
    config = dict(MXFP4_CONFIG)
    modules = target.env.get(MXFP4_NOT_CONVERTED)
    if modules is not None:
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            at = next((x["at"] for x in target.layout["lets"]
                       if x["name"] == MXFP4_NOT_CONVERTED), None)
            raise MapcError(f"let {MXFP4_NOT_CONVERTED} of layout {target.name} is "
                            f"{modules!r}, not a list of module names", where=at,
                            hint='write e.g. ["model.embed_tokens", "lm_head"]')
        config["modules_to_not_convert"] = list(modules)
    return config


def store(kind: str, value: np.ndarray, name: str, report, allow_lossy: bool):
    """The stored tensors of quantized target ``name``: [(suffix, values), ...] in the order
    of SUFFIXES[kind]. A tensor that does not dequantize back to ``value`` bit for bit is
    refused unless ``allow_lossy``; the report sums what rounded (``report.quantized``)."""
    if kind == "fp8_block":
        q, scale, info = quant_fp8_block(value, where=name)
        parts = [("", q), (SCALE_SUFFIX, scale)]
    else:
        blocks, scales, info = quant_mxfp4(value, where=name)
        parts = [("_blocks", blocks), ("_scales", scales)]
    tally = report.quantized.setdefault(kind, [0, 0, 0, 0.0])   # tensors, elements, rounded, max
    tally[0] += 1
    tally[1] += info.size
    tally[2] += info.rounded
    tally[3] = max(tally[3], info.max_abs)
    if info.rounded and not allow_lossy:
        a, b = info.example
        raise MapcError(f"quantizing {name} to {kind} is not exact: {info.rounded} of "
                        f"{info.size} elements round (e.g. {a:.8g} comes back as {b:.8g})",
                        hint="pass --allow-lossy to accept the rounding")
    return parts


def summary(report) -> list[str]:
    """The warning a run that quantized gives: what rounded, over all tensors."""
    return [f"quantized {tensors} tensors to {kind}: {rounded} of {size} elements rounded "
            f"(largest change {max_abs:.3g}; --allow-lossy)"
            for kind, (tensors, size, rounded, max_abs) in sorted(report.quantized.items())
            if rounded]
