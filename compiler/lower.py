"""AST -> Spec IR: plain JSON data (dicts, lists, strings, numbers), validated by
``schema/spec-ir.schema.json``. Positions travel as ``"at": "file:line:col"`` so that every
later error can point back into the spec.
"""
from __future__ import annotations

import re

from mapc.errors import SpecError
from mapc.grammar import ast as A
from mapc.grammar.parser import caret, parse_expr

IR_VERSION = 1


def expr_ir(e: A.Expr | None):
    if e is None:
        return None
    if isinstance(e, A.Num):
        return ["num", e.value]
    if isinstance(e, A.Str):
        return ["str", e.value]
    if isinstance(e, A.Bool):
        return ["bool", e.value]
    if isinstance(e, A.Sym):
        return ["sym", e.name]
    if isinstance(e, A.Op):
        return ["op", e.op, *(expr_ir(a) for a in e.args)]
    if isinstance(e, A.Call):
        return ["call", e.func, *(expr_ir(a) for a in e.args)]
    if isinstance(e, A.ListExpr):
        return ["list", *(expr_ir(a) for a in e.items)]
    if isinstance(e, A.Null):
        return ["null"]
    if isinstance(e, A.Cond):
        return ["cond", expr_ir(e.test), expr_ir(e.then), expr_ir(e.other)]
    if isinstance(e, A.ListFor):
        return ["for", e.var, expr_ir(e.count), expr_ir(e.body)]
    raise TypeError(e)


def value_ir(e: A.Expr):
    """A literal value (param choices, match values)."""
    return e.value


def _param_ir(p: A.Param) -> dict:
    """A layout parameter: its choices, the first the default unless ``default EXPR`` computes
    it from the config (``default_expr``, evaluated when the layout is planned)."""
    out = {"name": p.name, "choices": [value_ir(c) for c in p.choices],
           "default": value_ir(p.choices[0]), "at": str(p.pos)}
    if p.default is not None:
        out["default_expr"] = expr_ir(p.default)
    return out


def pattern_ir(p: A.Pattern | None):
    if p is None:
        return None
    axes = []
    for axis in p.axes:
        factors = []
        for f in axis.factors:
            if isinstance(f, A.Factor):
                factors.append({"factor": f.name, "at": str(f.pos)})
            else:
                factors.append({"concat": [{"member": m.name, "size": expr_ir(m.size),
                                            "at": str(m.pos)} for m in f.members],
                                "at": str(f.pos)})
        axes.append(factors)
    return axes


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def name_ir(rule: A.Rule, source: str):
    """Split a physical name pattern into literal text and placeholder expressions."""
    parts, last = [], 0
    for m in _PLACEHOLDER.finditer(rule.name):
        if m.start() > last:
            parts.append(rule.name[last:m.start()])
        try:
            e = parse_expr(m.group(1), str(rule.pos))
        except SpecError as err:
            raise SpecError(f"bad placeholder {{{m.group(1)}}} in tensor name: {err.message}"
                            + caret(source, rule.pos.line, rule.pos.column),
                            where=str(rule.pos)) from None
        parts.append({"expr": expr_ir(e)})
        last = m.end()
    if last < len(rule.name):
        parts.append(rule.name[last:])
    if "{" in "".join(p for p in parts if isinstance(p, str)) or \
            "}" in "".join(p for p in parts if isinstance(p, str)):
        raise SpecError(f"unbalanced braces in tensor name {rule.name!r}"
                        + caret(source, rule.pos.line, rule.pos.column), where=str(rule.pos))
    return parts


def rule_ir(r: A.Rule, source: str) -> dict:
    out = {
        "name": r.name,
        "name_parts": name_ir(r, source),
        "copy": r.copy,
        "refs": [{"tensor": ref.full_name, "index": ref.index, "member": ref.name,
                  "at": str(ref.pos)} for ref in r.refs],
        "as": pattern_ir(r.as_pattern),
        "from": ({m: pattern_ir(p) for m, p in r.from_pattern.items()}
                 if isinstance(r.from_pattern, dict) else pattern_ir(r.from_pattern)),
        "splits": [{"factors": list(s.factors), "mesh": s.mesh, "at": str(s.pos),
                    **({"uneven": True} if s.uneven else {})} for s in r.splits],
        "each": [{"factor": e.factor, "var": e.var, "at": str(e.pos)} for e in r.eaches],
        "repeat": list(r.repeats),
        "sum": list(r.sums),
        "pads": [{"factor": p.factor, "multiple": expr_ir(p.multiple), "at": str(p.pos)}
                 for p in r.pads],
        "stage": r.stage,
        "when": expr_ir(r.when),
        "at": str(r.pos),
        **({"dtype": r.dtype} if r.dtype is not None else {}),
    }
    if r.value is not None:      # only rules with a value map carry the key
        out["value"] = value_map_ir(r, source)
    if r.quantized is not None:  # likewise for quantized storage
        out["quantized"] = quantized_ir(r, source)
    return out


def quantized_ir(r: A.Rule, source: str) -> str:
    """A rule's ``quantized KIND`` clause: a known kind, on a tensor no mesh axis cuts."""
    from mapc.runtime.quantized import KINDS
    pos = r.quantized.pos
    if r.quantized.kind not in KINDS:
        raise SpecError(f"unknown quantized storage '{r.quantized.kind}' (known: "
                        f"{', '.join(KINDS)})", where=str(pos),
                        context=caret(source, pos.line, pos.column),
                        hint="write quantized fp8_block or quantized mxfp4")
    if r.splits or r.sums:
        raise SpecError(f"a quantized tensor is read whole: rule {r.name} cannot also split "
                        f"or sum over a mesh axis", where=str(pos),
                        context=caret(source, pos.line, pos.column),
                        hint="quantized storage is for unsharded (hf) layouts")
    return r.quantized.kind


def value_map_ir(r: A.Rule, source: str):
    """A rule's ``value`` clause split into scale and offset (compiler/values.py)."""
    if r.value is None:
        return None
    from mapc.compiler.values import affine
    pos = r.value.pos
    return affine(expr_ir(r.value.expr), str(pos), caret(source, pos.line, pos.column))


def layout_ir(lay: A.Layout, source: str) -> dict:
    return {
        "name": lay.name,
        "mesh": list(lay.mesh),
        "single": list(lay.single),
        "params": [_param_ir(p) for p in lay.params],
        "pipeline": None if lay.pipeline is None else {
            "group": lay.pipeline.group, "index": lay.pipeline.index,
            "local": lay.pipeline.local, "at": str(lay.pipeline.pos),
            **pipeline_sizes_ir(lay.pipeline, source)},
        "meta": [{"key": m.key, "expr": expr_ir(m.expr), "when": expr_ir(m.when),
                  "at": str(m.pos)} for m in lay.meta],
        "requires": requires_ir(lay.requires),
        "lets": [{"name": x.name, "expr": expr_ir(x.expr), "at": str(x.pos)} for x in lay.lets],
        "rules": [rule_ir(r, source) for r in lay.rules],
        "aliases": [{"name": a.name, "tensor": a.ref.full_name, "index": a.ref.index,
                     "when": expr_ir(a.when), "at": str(a.pos)} for a in lay.aliases],
        "at": str(lay.pos),
        **({"without": [{"group": w.group, "message": w.message, "at": str(w.pos)}
                        for w in lay.withouts]} if lay.withouts else {}),
    }


def pipeline_sizes_ir(pipe, source: str = "") -> dict:
    """``pipeline ... first N last M`` (uneven stages): ``{"first": N, "last": M}`` as stated."""
    out = {}
    for stage, e, pos in pipe.sizes:
        if stage in out:
            raise SpecError(f"pipeline states '{stage}' twice" + caret(source, pos.line,
                                                                       pos.column),
                            where=str(pos))
        out[stage] = expr_ir(e)
    return out


def kind_ir(kind) -> dict:
    """A tensor of a layer kind (``where COND(i) { ... }``): ``{"kind": {"when", "at"}}`` with the
    condition as it holds for the tensor (an ``else`` block's negated), else nothing."""
    if kind is None:
        return {}
    when = expr_ir(kind.when)
    return {"kind": {"when": ["op", "not", when] if kind.negated else when,
                     "at": str(kind.pos)}}


def requires_ir(requires) -> list:
    return [{"expr": expr_ir(r.expr), "message": r.message, "at": str(r.pos)} for r in requires]


def lower(spec: A.Spec, sha256: str) -> dict:
    return {
        "ir_version": IR_VERSION,
        "family": spec.family,
        "file": spec.file,
        "sha256": sha256,
        "match": [{"key": m.key, "values": [value_ir(v) for v in m.values], "at": str(m.pos)}
                  for m in spec.matches],
        "lets": [{"name": x.name, "expr": expr_ir(x.expr), "at": str(x.pos)} for x in spec.lets],
        "config": [{"name": c.name, "keys": list(c.keys), "default": expr_ir(c.default),
                    "nullable": c.nullable, "at": str(c.pos),
                    **({"absent": expr_ir(c.absent)} if c.absent is not None else {})}
                   for c in spec.config],
        "requires": requires_ir(spec.requires),
        "tensors": [{"name": t.full_name, "group": t.group, "index": t.index,
                     "count": expr_ir(t.count), "axes": pattern_ir(t.pattern),
                     "when": expr_ir(t.when), "stored": t.stored, "at": str(t.pos),
                     **kind_ir(t.kind)}
                    for t in spec.tensors],
        "layouts": [layout_ir(lay, source=spec.source) for lay in spec.layouts],
    }
