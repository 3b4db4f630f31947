"""Value maps: a rule's ``value EXPR`` clause, an elementwise map of the logical value ``x``.

A value map is affine, ``a * x + b``, with ``a`` and ``b`` expressions of config symbols,
mesh sizes and layout parameters (never of ``x``): ``value 1 + x`` says the file stores one
plus the logical tensor, ``value x * 2 - 1`` ... The compiler splits the expression into
``scale`` and ``offset`` (``affine``) when the spec is lowered, so that a map that is not
affine, or not invertible, is refused with the spec's line and a caret before anything is
read. ``plan_value`` evaluates the two for a concrete config. How the runtime applies a map
and checks it exact is in mapc.runtime.values.
"""
from __future__ import annotations

from dataclasses import dataclass

from mapc.compiler.expr import evaluate, show, symbols
from mapc.errors import SpecError

VAR = "x"    # the logical tensor's value inside a `value` clause

ZERO, ONE = ["num", 0], ["num", 1]


class NotAffine(Exception):
    pass


def _split(e):
    """(scale, offset) IR expressions with e == scale * x + offset; NotAffine otherwise."""
    if VAR not in symbols(e):
        return ZERO, e
    tag = e[0]
    if tag == "sym":
        return ONE, ZERO
    if tag == "op" and e[1] in ("+", "-"):
        (a1, b1), (a2, b2) = _split(e[2]), _split(e[3])
        return ["op", e[1], a1, a2], ["op", e[1], b1, b2]
    if tag == "op" and e[1] == "neg":
        a, b = _split(e[2])
        return ["op", "neg", a], ["op", "neg", b]
    if tag == "op" and e[1] == "*":
        if VAR in symbols(e[2]) and VAR in symbols(e[3]):
            raise NotAffine("x times x")
        c, v = (e[2], e[3]) if VAR not in symbols(e[2]) else (e[3], e[2])
        a, b = _split(v)
        return ["op", "*", c, a], ["op", "*", c, b]
    if tag == "op" and e[1] == "/" and VAR not in symbols(e[3]):
        a, b = _split(e[2])
        c = ["call", "float", e[3]]        # a value map divides real numbers, never sizes
        return ["op", "/", a, c], ["op", "/", b, c]
    raise NotAffine(show(e))


def affine(expr_ir: list, at: str, context: str = "") -> dict:
    """The IR of a ``value`` clause: ``{"expr", "scale", "offset", "at"}``."""
    try:
        scale, offset = _split(expr_ir)
    except NotAffine:
        raise SpecError(f"value map '{show(expr_ir)}' is not affine in {VAR}: mapc applies "
                        f"and inverts maps of the form a * {VAR} + b, with a and b made of "
                        f"config symbols and numbers", where=at, context=context,
                        hint=f"write the map as a * {VAR} + b (e.g. value 1 + {VAR})") from None
    if VAR not in symbols(expr_ir):
        raise SpecError(f"value map '{show(expr_ir)}' does not use {VAR}, the logical "
                        f"tensor's value: it would store a constant", where=at,
                        context=context, hint=f"write the map in terms of {VAR}, "
                        f"e.g. value 1 + {VAR}")
    return {"expr": expr_ir, "scale": scale, "offset": offset, "at": at}


@dataclass(frozen=True)
class ValueMap:
    """A rule's value map for one config: the file stores ``scale * x + offset``."""
    scale: float
    offset: float
    text: str          # the clause as written, for messages and the program printout
    at: str

    def describe(self) -> str:
        return f"value {self.text}"


def plan_value(rule: dict, env: dict) -> ValueMap | None:
    """The rule's value map evaluated in ``env`` (None without a ``value`` clause)."""
    v = rule.get("value")
    if v is None:
        return None
    from mapc.compiler.check import error_at
    scale = float(evaluate(v["scale"], env, v["at"]))
    offset = float(evaluate(v["offset"], env, v["at"]))
    if scale == 0 or scale != scale or offset != offset or \
            abs(scale) == float("inf") or abs(offset) == float("inf"):
        raise error_at(v["at"], f"value map '{show(v['expr'])}' is {scale!r} * {VAR} + "
                       f"{offset!r} for this config: not invertible",
                       hint=f"the scale of {VAR} must be a finite non-zero number")
    return ValueMap(scale, offset, show(v["expr"]), v["at"])
