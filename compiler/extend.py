"""``extends "BASE"``: a spec written as its differences from another.

The derived spec's AST is merged into its base's (itself possibly derived), before lowering, so
every later pass sees one ordinary spec and every position still points into the file that
wrote it (an error in an inherited rule names the base file). What the derived spec says wins:

- ``family`` is the derived one's; ``match`` lines are the derived ones if it has any, else the
  base's;
- top-level ``let``s, ``config`` entries, tensors (by full name), and inside a layout its
  parameters, ``let``s and ``meta`` entries (by key) replace the base's of the same name in
  place, new ones are added after them (a new group member after the group's last one);
- ``require``s, rules and aliases are added to the base's;
- ``drop layout NAME`` removes a base layout (then a ``layout NAME`` of the derived spec starts
  afresh), ``drop "RULE NAME"`` inside a layout removes the base rules of that physical name;
- a layout's ``mesh``, ``single`` and ``pipeline`` are the derived one's when it states them.
"""
from __future__ import annotations

import dataclasses

from mapc.errors import SpecError
from mapc.grammar import ast as A
from mapc.grammar.parser import caret


def _at(spec: A.Spec, pos: A.Pos, message: str) -> SpecError:
    return SpecError(message, where=str(pos), context=caret(spec.source, pos.line, pos.column))


def _by_name(base, derived, key):
    """``base`` with items of ``derived`` replacing those of the same key in place; new ones
    after them."""
    out = list(base)
    index = {key(x): k for k, x in enumerate(out)}
    for x in derived:
        k = index.get(key(x))
        if k is None:
            index[key(x)] = len(out)
            out.append(x)
        else:
            out[k] = x
    return tuple(out)


def _tensors(base, derived):
    out = list(base)
    for t in derived:
        same = [k for k, x in enumerate(out) if x.full_name == t.full_name]
        if same:
            out[same[0]] = t
            continue
        group = [k for k, x in enumerate(out) if t.group is not None and x.group == t.group]
        out.insert(group[-1] + 1 if group else len(out), t)
    return tuple(out)


def _layout(derived_spec: A.Spec, base: A.Layout, lay: A.Layout) -> A.Layout:
    dropped = {d.name for d in lay.drops}
    for d in lay.drops:
        if not any(r.name == d.name for r in base.rules):
            raise _at(derived_spec, d.pos, f"drop {d.name!r}: the base layout {base.name} has "
                      f"no rule of that name")
    return dataclasses.replace(
        base,
        mesh=lay.mesh or base.mesh,
        single=lay.single or base.single,
        params=_by_name(base.params, lay.params, lambda p: p.name),
        pipeline=lay.pipeline or base.pipeline,
        meta=_by_name(base.meta, lay.meta, lambda m: m.key),
        lets=_by_name(base.lets, lay.lets, lambda x: x.name),
        rules=tuple(r for r in base.rules if r.name not in dropped) + lay.rules,
        aliases=base.aliases + lay.aliases,
        requires=base.requires + lay.requires,
        withouts=base.withouts + lay.withouts,
        drops=())


def merge(base: A.Spec, derived: A.Spec) -> A.Spec:
    """The spec ``derived`` (which ``extends`` ``base``) as one spec."""
    layouts: list = list(base.layouts)
    for d in derived.drop_layouts:
        if not any(x is not None and x.name == d.name for x in layouts):
            raise _at(derived, d.pos, f"drop layout {d.name}: the base spec {base.family} has "
                      f"no layout {d.name}")
        layouts = [None if x is not None and x.name == d.name else x for x in layouts]
    slots = {b.name: k for k, b in enumerate(base.layouts) if layouts[k] is None}
    for lay in derived.layouts:
        k = next((k for k, x in enumerate(layouts) if x is not None and x.name == lay.name),
                 None)
        if k is None:
            if lay.drops:
                raise _at(derived, lay.drops[0].pos, f"drop {lay.drops[0].name!r}: layout "
                          f"{lay.name} is new here, there is nothing to drop")
            if lay.name in slots:           # a dropped layout written afresh keeps its place
                layouts[slots.pop(lay.name)] = lay
            else:
                layouts.append(lay)
        else:
            layouts[k] = _layout(derived, layouts[k], lay)
    layouts = [x for x in layouts if x is not None]
    return dataclasses.replace(
        derived,
        matches=derived.matches or base.matches,
        lets=_by_name(base.lets, derived.lets, lambda x: x.name),
        config=_by_name(base.config, derived.config, lambda c: c.name),
        tensors=_tensors(base.tensors, derived.tensors),
        layouts=tuple(layouts),
        requires=base.requires + derived.requires,
        extends=None, drop_layouts=())
