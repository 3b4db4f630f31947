"""Expressions of the Spec IR: s-expressions as JSON lists, and their evaluator.

``["num", 3]``, ``["str", "te"]``, ``["bool", true]``, ``["sym", "heads"]``,
``["op", "/", a, b]``, ``["call", "round_up", a, b]``, ``["list", a, ...]``, ``["null"]``,
``["cond", test, then, else]``, ``["for", var, count, body]`` (``[body for var < count]``),
``["op", "in", x, list]``.

Integer ``/`` is exact: ``hidden / heads`` with 10 and 4 is an error, not 2.5, because every
size in a spec must divide evenly. ``//`` floors.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from mapc.errors import SpecError


class EvalError(SpecError):
    pass


def _fail(message: str, where: str) -> EvalError:
    """An EvalError at ``where`` (file:line:col), with the spec line and a caret if known."""
    if where:
        from mapc.compiler.check import error_at
        err = error_at(where, message)
        return EvalError(err.message, where=err.where, context=err.context)
    return EvalError(message)


def _round_up(x, m):
    return -(-x // m) * m


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "round_up": _round_up,
    "min": min,
    "max": max,
    "ceil_div": lambda a, b: -(-a // b),
    "float": float,
    "int": int,
}
ARITY: dict[str, tuple[int, ...]] = {"round_up": (2,), "min": (2, 3, 4), "max": (2, 3, 4),
                                     "ceil_div": (2,), "float": (1,), "int": (1,)}


def symbols(e) -> set[str]:
    """Free symbols of an expression."""
    if e is None:
        return set()
    tag = e[0]
    if tag == "sym":
        return {e[1]}
    if tag in ("op", "call"):
        return set().union(*(symbols(a) for a in e[2:]))
    if tag in ("list", "cond"):
        return set().union(*(symbols(a) for a in e[1:]))
    if tag == "for":
        return symbols(e[2]) | (symbols(e[3]) - {e[1]})
    return set()


def show(e) -> str:
    """An expression in spec syntax, for messages and the program printer."""
    tag = e[0]
    if tag == "num":
        return repr(e[1])
    if tag == "str":
        return f'"{e[1]}"'
    if tag == "bool":
        return "true" if e[1] else "false"
    if tag == "sym":
        return e[1]
    if tag == "list":
        return "[" + ", ".join(show(a) for a in e[1:]) + "]"
    if tag == "null":
        return "null"
    if tag == "cond":
        return f"{_paren(e[2], 1)} if {_paren(e[1], 1)} else {show(e[3])}"
    if tag == "call":
        return f"{e[1]}(" + ", ".join(show(a) for a in e[2:]) + ")"
    if tag == "for":
        return f"[{show(e[3])} for {e[1]} < {show(e[2])}]"
    op = e[1]
    if op == "neg":
        return f"-{_paren(e[2], _PREC['neg'])}"
    if op == "not":
        return f"not {_paren(e[2], _PREC['not'])}"
    p = _PREC[op]
    return f"{_paren(e[2], p)} {op} {_paren(e[3], p + 1)}"


# binding strength of operators, for printing with only the parentheses that are needed
_PREC = {"or": 1, "and": 2, "not": 3, "in": 4, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4,
         "+": 5, "-": 5, "*": 6, "/": 6, "//": 6, "%": 6, "neg": 7}


def _paren(e, prec: int = 8) -> str:
    s = show(e)
    inner = 0 if e[0] == "cond" else _PREC[e[1]] if e[0] == "op" else 9
    return f"({s})" if inner < prec else s


def evaluate(e, env: Mapping[str, Any], where: str = "") -> Any:
    """Evaluate ``e`` in ``env``. Unknown symbols and inexact divisions raise EvalError."""
    tag = e[0]
    if tag in ("num", "str", "bool"):
        return e[1]
    if tag == "sym":
        try:
            return env[e[1]]
        except KeyError:
            raise _fail(f"unknown symbol '{e[1]}'", where) from None
    if tag == "list":
        return [evaluate(a, env, where) for a in e[1:]]
    if tag == "null":
        return None
    if tag == "cond":
        return evaluate(e[2] if evaluate(e[1], env, where) else e[3], env, where)
    if tag == "for":
        n = evaluate(e[2], env, where)
        if not is_int(n) or not 0 <= n <= MAX_LIST:
            raise _fail(f"{show(e)}: {show(e[2])} = {n!r} is not a count of at most "
                        f"{MAX_LIST}", where)
        inner = dict(env)
        out = []
        for k in range(n):
            inner[e[1]] = k
            out.append(evaluate(e[3], inner, where))
        return out
    if tag == "call":
        fn = FUNCTIONS.get(e[1])
        if fn is None:
            raise _fail(f"unknown function '{e[1]}' (known: {', '.join(sorted(FUNCTIONS))})", where)
        args = [evaluate(a, env, where) for a in e[2:]]
        _no_null(e, e[2:], args, where)
        if not all(_number(a) for a in args):
            raise _fail(f"{show(e)}: {e[1]}() of {', '.join(map(repr, args))} (a config value "
                        "of the wrong type?)", where)
        try:
            return fn(*args)
        except (ZeroDivisionError, OverflowError, ValueError, TypeError) as err:
            raise _fail(f"{show(e)}: {err}", where) from None
    op = e[1]
    if op == "and":
        return bool(evaluate(e[2], env, where)) and bool(evaluate(e[3], env, where))
    if op == "or":
        return bool(evaluate(e[2], env, where)) or bool(evaluate(e[3], env, where))
    if op == "not":
        return not evaluate(e[2], env, where)
    if op == "neg":
        x = evaluate(e[2], env, where)
        _no_null(e, e[2:], [x], where)
        if not _number(x):
            raise _fail(f"{show(e)}: cannot negate {x!r}", where)
        return -x
    a, b = evaluate(e[2], env, where), evaluate(e[3], env, where)
    if op == "in":
        if not isinstance(b, list):
            raise _fail(f"{show(e)}: {show(e[3])} = {b!r} is not a list (a config value of "
                        "the wrong type?)", where)
        return a in b
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    _no_null(e, e[2:], [a, b], where)
    if op in ARITHMETIC and not (_number(a) and _number(b)) and not _sequence_op(op, a, b):
        bad = [f"{show(x)} = {v!r} is a {_kind(v)}" for x, v in ((e[2], a), (e[3], b))
               if not _number(v)]
        raise _fail(f"{show(e)}: cannot compute {a!r} {op} {b!r}: {', '.join(bad)}, not a "
                    f"number (a config value of the wrong type?)", where)
    try:
        return _binary(e, op, a, b, where)
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as err:
        raise _fail(f"{show(e)} = {a!r} {op} {b!r}: {err}", where) from None


def _kind(v) -> str:
    return {list: "list", str: "string", bool: "boolean", dict: "mapping"}.get(
        type(v), type(v).__name__)


MAX_LIST = 2**20             # entries of a `[... for i < n]` list (one per layer, expert)

ARITHMETIC = ("+", "-", "*", "/", "//", "%")


def _number(x) -> bool:
    return isinstance(x, (int, float))


def _sequence_op(op, a, b) -> bool:
    """Strings and lists concatenate with ``+``; a list repeats with ``*`` by an integer."""
    if op == "+":
        return isinstance(a, str) and isinstance(b, str) or \
            isinstance(a, list) and isinstance(b, list)
    if op == "*":
        return isinstance(a, list) and is_int(b) and 0 <= b <= 2**16 or \
            isinstance(b, list) and is_int(a) and 0 <= a <= 2**16
    return False


def _binary(e, op, a, b, where):
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
            if b == 0 or a % b:
                raise _fail(f"{show(e)} = {a} / {b} does not divide evenly", where)
            return a // b
        return a / b
    if op == "//":
        return a // b
    if op == "%":
        return a % b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    if op == ">=":
        return a >= b
    raise _fail(f"unknown operator {op!r}", where)


def _no_null(e, operands, values, where):
    """Only == and != may see a null: anything else on it is the spec's mistake, named."""
    for x, v in zip(operands, values):
        if v is None:
            raise _fail(f"{show(x)} is null in {show(e)}", where)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def prod(xs) -> int:
    return math.prod(xs)
