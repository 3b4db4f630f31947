"""Static semantic checks of a Spec IR, before any config is known.

Checked here: unknown symbols, unknown tensors and members, malformed fusions, splits and pads
of factors that do not exist, tensors a layout never covers or covers twice unconditionally,
and shapes that cannot agree (by symbolic algebra over products of symbols, e.g.
``groups * (heads / groups) * head_dim == heads * head_dim``). Everything that needs numbers
(divisibility, conditional coverage) is checked again when a program is compiled.
"""
from __future__ import annotations

from collections import Counter
from fractions import Fraction

import re

from dataclasses import dataclass, field

from mapc.compiler import sources
from mapc.compiler.expr import ARITY, FUNCTIONS, symbols
from mapc.compiler.metakeys import keys_of
from mapc.errors import SpecError


RULE_DTYPES = ("float32", "bfloat16", "float16", "float64")   # a rule's `dtype NAME`


def error_at(at: str, message: str, hint: str | None = None) -> SpecError:
    """A SpecError at ``file:line:col`` with the spec line and a caret."""
    from mapc.grammar.parser import caret    # the parser (lark) only when there is an error
    file, _, rest = at.rpartition(":")
    file, _, line = file.rpartition(":")
    try:
        text = caret(sources.text_of(file), int(line), int(rest))
    except ValueError:
        text = ""
    return SpecError(message, where=at, hint=hint, context=text)


# ---- monomials: products of symbols with rational exponents -----------------------------------
def monomial(e, lets: dict | None = None):
    """``e`` as (coefficient, {symbol: exponent}) if it is a product/quotient, else None.
    A symbol defined by one of ``lets`` (name -> expression) stands for its expression."""
    lets = lets or {}
    tag = e[0]
    if tag == "num" and not isinstance(e[1], bool):
        return Fraction(e[1]), {}
    if tag == "sym":
        if e[1] in lets:
            return monomial(lets[e[1]], lets)
        return Fraction(1), {e[1]: 1}
    if tag == "op" and e[1] in ("*", "/"):
        a, b = monomial(e[2], lets), monomial(e[3], lets)
        if a is None or b is None:
            return None
        sign = 1 if e[1] == "*" else -1
        exps = dict(a[1])
        for s, k in b[1].items():
            exps[s] = exps.get(s, 0) + sign * k
            if exps[s] == 0:
                del exps[s]
        return (a[0] * b[0] if sign == 1 else a[0] / b[0]), exps
    return None


def mono_mul(ms):
    coef, exps = Fraction(1), {}
    for m in ms:
        if m is None:
            return None
        coef *= m[0]
        for s, k in m[1].items():
            exps[s] = exps.get(s, 0) + k
            if exps[s] == 0:
                del exps[s]
    return coef, exps


def mono_str(m) -> str:
    coef, exps = m
    parts = [] if coef == 1 else [str(coef)]
    parts += [s if k == 1 else f"{s}^{k}" for s, k in sorted(exps.items())]
    return " * ".join(parts) or "1"


# ---- the checker --------------------------------------------------------------------------------
def check(ir: dict) -> None:
    lets: dict[str, list] = {}     # their expressions stand in for them in shape algebra
    _no_duplicates(ir["config"], "config symbol")
    known = set()
    for c in ir["config"]:
        # a default may use symbols declared above it (they are bound in order)
        _known(c["default"], known, c["at"], "default of " + c["name"])
        _known(c.get("absent"), known, c["at"], "absent value of " + c["name"])
        known.add(c["name"])
    for x in ir["lets"]:
        _known(x["expr"], known, x["at"], "let " + x["name"])
        known.add(x["name"])
        lets[x["name"]] = x["expr"]
    spec_syms = set(known)
    for r in ir.get("requires", ()):
        _known(r["expr"], spec_syms, r["at"], "require")

    tensors = {}
    groups = {}
    for t in ir["tensors"]:
        if t["name"] in tensors:
            raise error_at(t["at"], f"tensor {t['name']} is declared twice")
        tensors[t["name"]] = t
        if t["group"]:
            groups.setdefault(t["group"], (t["index"], t["count"]))
            _known(t["count"], spec_syms, t["at"], "group size")
        # in a group, a condition may name the group's index: a tensor of some layers only
        here = spec_syms | ({t["index"]} if t["group"] else set())
        _known(t["when"], here, t["at"], "condition")
        if t.get("kind"):
            _known(t["kind"]["when"], here, t["kind"]["at"], "layer-kind condition")
        if t.get("stored") and t["group"]:
            raise error_at(t["at"], f"stored tensor {t['name']} ('{t['name'].split('.')[-1]}: "
                           f"*') cannot be in a group: it already stands for every stored "
                           f"tensor", hint="declare it outside 'for ...'")
        for axis in t["axes"] or ():
            for f in axis:
                if "concat" in f:
                    raise error_at(f["at"], "a logical tensor cannot be a concatenation; "
                                   "fusions belong in layouts")
                if f["factor"] not in spec_syms:
                    raise error_at(f["at"], f"unknown size symbol '{f['factor']}' in tensor "
                                   f"{t['name']}", hint=_known_hint(spec_syms))

    _no_duplicates(ir["layouts"], "layout")
    for lay in ir["layouts"]:
        _check_layout(lay, spec_syms, tensors, groups, dict(lets))


def _no_duplicates(items, what):
    seen = set()
    for it in items:
        if it["name"] in seen:
            raise error_at(it["at"], f"{what} {it['name']} is declared twice")
        seen.add(it["name"])


def _known_hint(syms) -> str:
    return "known: " + (", ".join(sorted(syms)) or "none yet")


def _known(e, syms, at, what):
    unknown = symbols(e) - set(syms)
    if unknown:
        raise error_at(at, f"unknown symbol {', '.join(sorted(unknown))} in {what}",
                       hint=_known_hint(syms))
    for name, nargs in _calls(e):
        if name not in FUNCTIONS:
            raise error_at(at, f"unknown function '{name}' in {what}",
                           hint="known: " + ", ".join(sorted(FUNCTIONS)))
        want = ARITY[name]
        if nargs not in want:
            raise error_at(at, f"{name}() takes {' or '.join(map(str, want))} arguments, "
                           f"got {nargs} in {what}")


def _calls(e):
    if e is None or e[0] in ("num", "str", "bool", "sym", "null"):
        return
    if e[0] == "call":
        yield e[1], len(e) - 2
    for a in e[2:] if e[0] in ("op", "call", "for") else e[1:]:
        yield from _calls(a)


def _check_layout(lay, spec_syms, tensors, groups, lets):
    name = lay["name"]
    syms = set(spec_syms) | set(lay["mesh"]) | {p["name"] for p in lay["params"]}
    _no_duplicates(lay["params"], f"layout {name} parameter")
    for p in lay["params"]:     # a computed default sees the config (and the spec's lets) only
        if "default_expr" in p:
            _known(p["default_expr"], spec_syms, p["at"], f"the default of parameter {p['name']}")
    for x in lay["lets"]:
        _known(x["expr"], syms, x["at"], "let " + x["name"])
        syms.add(x["name"])
        lets[x["name"]] = x["expr"]
    for axis in lay["single"]:
        if axis not in lay["mesh"]:
            raise error_at(lay["at"], f"'single {axis}': {axis} is not a mesh axis of layout "
                           f"{name}", hint="mesh: " + (" ".join(lay["mesh"]) or "none"))
    pipe = lay["pipeline"]
    if pipe:
        if pipe["group"] not in groups:
            raise error_at(pipe["at"], f"pipeline names tensor group '{pipe['group']}', "
                           f"which the spec does not declare",
                           hint="declared groups: " + ", ".join(sorted(groups)) if groups else None)
        if "pp" not in lay["mesh"]:
            raise error_at(pipe["at"], f"layout {name} has a pipeline but no 'pp' mesh axis",
                           hint="add 'mesh ... pp'")
        for stage in ("first", "last"):
            if pipe.get(stage) is not None:
                _known(pipe[stage], syms, pipe["at"], f"the pipeline's {stage} stage size")
    for r in lay.get("requires", ()):
        _known(r["expr"], syms, r["at"], "require")
    without = set()
    for w in lay.get("without", ()):
        if w["group"] not in groups:
            raise error_at(w["at"], f"'without {w['group']}': the spec declares no tensor group "
                           f"{w['group']}", hint="declared groups: " + (", ".join(sorted(groups))
                                                                        or "none"))
        if pipe and pipe["group"] == w["group"]:
            raise error_at(w["at"], f"'without {w['group']}': layout {name} pipelines that group")
        without.add(w["group"])
    _check_meta_keys(lay)
    for m in lay["meta"]:
        _known(m["expr"], syms, m["at"], f"meta {m['key']}")
        if m.get("when") is not None:
            _known(m["when"], syms, m["at"], f"condition of meta {m['key']}")
    for a in lay["aliases"]:
        if a["tensor"] not in tensors:
            raise error_at(a["at"], f"alias {a['name']!r} names tensor {a['tensor']}, which the "
                           f"spec does not declare")
        if a["index"] is not None or tensors[a["tensor"]]["group"] is not None:
            raise error_at(a["at"], f"alias {a['name']!r} must name one tensor, not a member "
                           f"of group {tensors[a['tensor']]['group']}")
        if "{" in a["name"]:
            raise error_at(a["at"], f"alias {a['name']!r}: an alias name has no placeholders")
        if a["when"] is not None:
            _known(a["when"], syms, a["at"], f"alias {a['name']}")

    primary: dict[str, list] = {}
    for rule in lay["rules"]:
        _check_rule(_RuleCheck(lay, rule, syms, tensors, groups, lets))
        placed = {tensors[r["tensor"]]["group"] for r in rule["refs"]} & without
        if placed:
            raise error_at(rule["at"], f"layout {name} is 'without {placed.pop()}' but this rule "
                           f"places a tensor of it")
        if not rule["copy"]:
            for ref in rule["refs"]:
                primary.setdefault(ref["tensor"], []).append(rule)
    for t in tensors.values():
        rules = primary.get(t["name"], [])
        if not rules and t["group"] in without:
            continue
        if not rules:
            raise error_at(lay["at"], f"layout {name} never places tensor {t['name']} "
                           f"(declared at {t['at']})", hint="add a rule for it")
        unconditional = [r for r in rules if r["when"] is None]
        if len(unconditional) > 1:
            raise error_at(unconditional[1]["at"],
                           f"tensor {t['name']} is placed twice in layout {name} (also at "
                           f"{unconditional[0]['at']})",
                           hint="give the rules exclusive 'if' conditions, or mark a deliberate "
                                "replica with 'copy'")


def _check_meta_keys(lay):
    """A format's consumer ignores a key it does not know: refuse such a key in the spec."""
    known = keys_of(lay["name"])
    if known is None:
        return
    for m in lay["meta"]:
        key = m["key"]
        if key in known:
            continue
        general = re.sub(r"^[^.]+\.", "{arch}.", key)
        close = known.close(key) or known.close(general)
        raise error_at(m["at"], f"meta key '{key}' is not a {lay['name']} metadata key (not in "
                       f"{known.source}): its consumer would ignore it",
                       hint=("did you mean " + ", ".join(close)) if close else
                       f"known keys are listed in {known.source}")


# ---- rule checks: one flat table, run in order ---------------------------------------------------
@dataclass
class _RuleCheck:
    """One rule under check, and what the checks before have learnt about it."""
    lay: dict
    rule: dict
    syms: set
    tensors: dict
    groups: dict
    lets: dict
    group: str | None = None          # the group and index variable of the fused tensors
    index: str | None = None
    phys: list = field(default_factory=list)          # the physical pattern
    concats: list = field(default_factory=list)
    factor_names: list = field(default_factory=list)
    members: set = field(default_factory=set)
    views: dict = field(default_factory=dict)         # member -> its 'from' view

    @property
    def at(self) -> str:
        return self.rule["at"]

    @property
    def refs(self) -> list:
        return self.rule["refs"]


def _rule_refs(c: _RuleCheck):
    """Each ref names a declared tensor with its group's index; a fusion shares one group."""
    for ref in c.refs:
        t = c.tensors.get(ref["tensor"])
        if t is None:
            raise error_at(ref["at"], f"unknown tensor {ref['tensor']}",
                           hint="declared: " + ", ".join(sorted(c.tensors)))
        if (t["group"] is None) != (ref["index"] is None):
            raise error_at(ref["at"], f"tensor {t['name']} "
                           + ("is in group " + t["group"] + "; refer to it as "
                              f"{t['group']}[{t['index']}].{ref['member']}" if t["group"]
                              else "is not in a group; refer to it without an index"))
        if t["group"] and ref["index"] != t["index"]:
            raise error_at(ref["at"], f"{t['group']} is declared with index '{t['index']}'; "
                           f"refer to it as {t['group']}[{t['index']}].{ref['member']}")
        if ref is c.refs[0]:
            c.group, c.index = t["group"], ref["index"]
        elif (t["group"], ref["index"]) != (c.group, c.index):
            raise error_at(ref["at"], "all tensors fused in one rule must come from the same "
                           "group and index")
    if len({r["member"] for r in c.refs}) != len(c.refs):
        raise error_at(c.at, "a rule fuses two tensors with the same name")


def _rule_name(c: _RuleCheck):
    """The name's placeholders use known symbols, each `each` variable, and the group index."""
    rule, pipe = c.rule, c.lay["pipeline"]
    name_syms = set(c.syms)
    if c.group:
        name_syms.add(c.index)
        if pipe and pipe["group"] == c.group and pipe["local"]:
            name_syms.add(pipe["local"])
    name_syms |= {e["var"] for e in rule["each"]}
    for part in rule["name_parts"]:
        if isinstance(part, dict):
            _known(part["expr"], name_syms, c.at, f"tensor name {rule['name']!r}")
    for e in rule["each"]:
        if not any(isinstance(p, dict) and e["var"] in symbols(p["expr"])
                   for p in rule["name_parts"]):
            raise error_at(e["at"], f"'each {e['factor']} as {e['var']}' makes one tensor per "
                           f"index, but the name does not use {{{e['var']}}}")
    index_vars = {c.index} | ({pipe["local"]} if pipe and pipe["group"] == c.group
                               and pipe["local"] else set())
    if c.group and not any(isinstance(p, dict) and index_vars & symbols(p["expr"])
                           for p in rule["name_parts"]):
        raise error_at(c.at, f"name {rule['name']!r} places every {c.group}[{c.index}] under "
                       f"one name", hint=f"put {{{c.index}}} in the name")


def _rule_condition_and_stage(c: _RuleCheck):
    """The `if` uses known symbols; a pipelined layout's non-group rule names its stage."""
    _known(c.rule["when"], c.syms, c.at, "condition")
    pipe = c.lay["pipeline"]
    if "pp" in c.lay["mesh"] and not (pipe and c.group == pipe["group"]) \
            and c.rule["stage"] is None:
        raise error_at(c.at, f"layout {c.lay['name']} is pipelined: say which stage holds "
                       f"{c.rule['name']!r}", hint="add 'on first' or 'on last'")


def _rule_pattern(c: _RuleCheck):
    """The physical pattern: known factors, each named once."""
    rule = c.rule
    if len(c.refs) > 1 and rule["as"] is None:
        raise error_at(c.at, "fusing several tensors needs an 'as' pattern with a "
                       "[member ...] concatenation")
    c.phys = rule["as"] if rule["as"] is not None else c.tensors[c.refs[0]["tensor"]]["axes"]
    c.concats = [f for axis in c.phys for f in axis if "concat" in f]
    c.factor_names = [f["factor"] for axis in c.phys for f in axis if "factor" in f]
    for f in (f for axis in c.phys for f in axis):
        if "factor" in f and f["factor"] not in c.syms and f["factor"] not in c.lay["mesh"]:
            raise error_at(f["at"], f"unknown size symbol '{f['factor']}'",
                           hint=_known_hint(c.syms))
    dup = [n for n, k in Counter(c.factor_names).items() if k > 1]
    if dup:
        raise error_at(c.at, f"factor {dup[0]} appears twice in one pattern",
                       hint="name each factor once; use 'let' for a second factor of the same size")


def _rule_fusion(c: _RuleCheck):
    """A fusion has exactly one concatenation, listing exactly the fused tensors."""
    c.members = {r["member"] for r in c.refs}
    if len(c.refs) > 1 or c.concats:
        if len(c.concats) != 1:
            raise error_at(c.at, f"a fusion needs exactly one [member ...] concatenation, "
                           f"found {len(c.concats)}")
        names = [m["member"] for m in c.concats[0]["concat"]]
        if len(names) < 2:
            raise error_at(c.concats[0]["at"], "a concatenation needs at least two members")
        if sorted(names) != sorted(c.members):
            raise error_at(c.concats[0]["at"], f"the concatenation lists {', '.join(names)} but "
                           f"the rule fuses {', '.join(r['member'] for r in c.refs)}")
        for m in c.concats[0]["concat"]:
            _known(m["size"], c.syms, m["at"], f"size of member {m['member']}")


def _rule_repeats(c: _RuleCheck):
    for r in c.rule["repeat"]:
        if r not in c.factor_names:
            raise error_at(c.at, f"repeat of '{r}', which is not a factor of {c.rule['name']!r}",
                           hint="factors: " + " ".join(c.factor_names))


def _rule_views(c: _RuleCheck):
    """`from` views: one per fused member, each the `as` factors in another order."""
    rule, refs = c.rule, c.refs
    logical_names = [n for n in c.factor_names if n not in rule["repeat"]]
    c.views = member_views(rule)
    if isinstance(rule["from"], dict):
        if sorted(rule["from"]) != sorted(c.members):
            raise error_at(c.at, f"'from' gives views of {', '.join(sorted(rule['from']))} but "
                           f"the rule fuses {', '.join(r['member'] for r in refs)}")
    elif rule["from"] is not None and len(refs) != 1:
        raise error_at(c.at, "a fusion rearranges its members with 'from m1: ..., m2: ...'")
    if rule["from"] is None:
        return
    for member, view in c.views.items():
        from_names = [f.get("factor") for axis in view for f in axis]
        if None in from_names:
            raise error_at(c.at, "a 'from' pattern cannot contain a concatenation")
        dup = [n for n, k in Counter(from_names).items() if k > 1]
        if dup:
            raise error_at(c.at, f"factor {dup[0]} appears twice in the view of {member}")
        wanted = set(c.factor_names) - set(rule["repeat"])
        extra = set(from_names) - set(c.factor_names)
        lacking = wanted - set(from_names)
        if len(refs) > 1:   # in a fused view the member's own name is its concat slot
            lacking = set()
            extra = set(from_names) - set(c.factor_names) - {member}
        if extra or lacking:
            raise error_at(c.at, f"'from' factors of {member} ({' '.join(from_names)}) must be "
                           f"the 'as' factors ({' '.join(logical_names)}) in another order"
                           + (", without the repeated ones" if rule["repeat"] else ""))
        missing = set(c.factor_names) - set(from_names) - set(rule["repeat"])
        if len(refs) > 1 and missing:
            raise error_at(c.at, f"the view of {member} lacks {', '.join(sorted(missing))}; a "
                           f"factor a member does not have must be declared 'repeat'")


def _rule_splits(c: _RuleCheck):
    """Splits cut existing factors over mesh axes of the layout, adjacent ones in order."""
    lay, rule = c.lay, c.rule
    split_factors = []
    for s in rule["splits"]:
        if s["mesh"] not in lay["mesh"]:
            raise error_at(s["at"], f"split over '{s['mesh']}', which is not a mesh axis of "
                           f"layout {lay['name']}", hint="mesh: " + (" ".join(lay["mesh"]) or "none; declare one with 'mesh tp'"))
        for f in s["factors"]:
            if f not in c.factor_names:
                raise error_at(s["at"], f"split of '{f}', which is not a factor of "
                               f"{rule['name']!r}", hint="factors: " + " ".join(c.factor_names))
        if s.get("uneven") and len(s["factors"]) > 1:
            raise error_at(s["at"], "an uneven split cuts one factor",
                           hint=f"split {s['factors'][0]} over {s['mesh']} unevenly")
        if s.get("uneven") and any(p["factor"] == s["factors"][0] for p in rule["pads"]):
            raise error_at(s["at"], f"{s['factors'][0]} is both padded and split unevenly",
                           hint="pad it, or split it unevenly, not both")
        if len(s["factors"]) > 1:
            k = c.factor_names.index(s["factors"][0])
            if c.factor_names[k:k + len(s["factors"])] != s["factors"]:
                raise error_at(s["at"], f"split ({' '.join(s['factors'])}) needs those factors "
                               f"next to each other, in that order, in the pattern")
        split_factors += s["factors"]
    if len(set(split_factors)) != len(split_factors):
        raise error_at(c.at, "a factor is split twice")


def _rule_eaches(c: _RuleCheck):
    for e in c.rule["each"]:
        if e["factor"] not in c.factor_names:
            raise error_at(e["at"], f"each of '{e['factor']}', which is not a factor of "
                           f"{c.rule['name']!r}", hint="factors: " + " ".join(c.factor_names))


def _rule_mesh_cuts_and_sums(c: _RuleCheck):
    """A mesh axis cuts a tensor at most once; `sum over` an axis that does not cut it."""
    lay, rule = c.lay, c.rule
    cuts = [s["mesh"] for s in rule["splits"]] + [n for n in c.factor_names if n in lay["mesh"]]
    if len(set(cuts)) != len(cuts):
        raise error_at(c.at, "a mesh axis cuts this tensor twice",
                       hint="split each tensor at most once per mesh axis")
    for axis in rule.get("sum", []):
        if axis not in lay["mesh"] or axis == "pp":
            raise error_at(c.at, f"'sum over {axis}': {axis} is not a data mesh axis of layout "
                           f"{lay['name']}", hint="mesh: " + (" ".join(lay["mesh"]) or "none"))
        if axis in cuts:
            raise error_at(c.at, f"'sum over {axis}': {axis} also cuts this tensor",
                           hint="a tensor is either split over an axis or summed over it")
        if axis in lay["single"]:
            raise error_at(c.at, f"'sum over {axis}' in a layout that stores such tensors "
                           f"'single {axis}'")
        if rule["copy"]:
            raise error_at(c.at, "a copy cannot be stored as a sum of shares")


def _rule_pads(c: _RuleCheck):
    for p in c.rule["pads"]:
        if p["factor"] not in c.factor_names:
            raise error_at(p["at"], f"pad of '{p['factor']}', which is not a factor of "
                           f"{c.rule['name']!r}", hint="factors: " + " ".join(c.factor_names))
        _known(p["multiple"], c.syms, p["at"], "pad multiple")


def _rule_shapes(c: _RuleCheck):
    """Symbolic shape agreement, member by member and axis by axis."""
    # concatenation widths: a fused view names its slot by the member's own name
    sizes = {m["member"]: monomial(m["size"], c.lets) for cat in c.concats for m in cat["concat"]}

    def factor_mono(f, member):
        if "factor" in f:
            if f["factor"] == member and f["factor"] not in c.lets:
                return sizes.get(member) or monomial(["sym", f["factor"]], c.lets)
            return monomial(["sym", f["factor"]], c.lets)
        for m in f["concat"]:
            if m["member"] == member:
                return monomial(m["size"], c.lets)
        return None

    for ref in c.refs:
        logical = c.tensors[ref["tensor"]]["axes"]
        view = c.views.get(ref["member"])
        if view is None:
            view = [[f for f in axis if f.get("factor") not in c.rule["repeat"]]
                    for axis in c.phys]
            view = [axis for axis in view if axis]
        if len(view) != len(logical):
            raise error_at(ref["at"], f"{ref['tensor']} has {len(logical)} axes but the "
                           f"pattern has {len(view)}")
        for k, (laxis, vaxis) in enumerate(zip(logical, view)):
            lm = mono_mul(monomial(["sym", f["factor"]], c.lets) for f in laxis)
            vm = mono_mul(factor_mono(f, ref["member"]) for f in vaxis)
            if lm is not None and vm is not None and lm != vm:
                raise error_at(ref["at"], f"axis {k} of {ref['tensor']} is {mono_str(lm)} "
                               f"but the pattern makes it {mono_str(vm)}")


# Run in this order: later checks use what earlier ones established (the group, the pattern).
RULE_CHECKS = (
    ("refs", _rule_refs),
    ("name", _rule_name),
    ("condition and stage", _rule_condition_and_stage),
    ("pattern", _rule_pattern),
    ("fusion", _rule_fusion),
    ("repeats", _rule_repeats),
    ("views", _rule_views),
    ("splits", _rule_splits),
    ("eaches", _rule_eaches),
    ("mesh cuts and sums", _rule_mesh_cuts_and_sums),
    ("pads", _rule_pads),
    ("shapes", _rule_shapes),
)


def _check_rule(c: _RuleCheck) -> None:
    if any(c.tensors.get(r["tensor"], {}).get("stored") for r in c.refs):
        _rule_refs(c)                   # a stored tensor's rule says nothing else
        _check_stored_rule(c.lay, c.rule, c.syms)
        return
    for _, step in RULE_CHECKS:
        step(c)


def _check_stored_rule(lay, rule, syms):
    """``"prefix*suffix" = NAME`` for a stored tensor ``NAME: *``: every stored tensor whose
    name fits the pattern is placed whole, under that name; nothing else may be said of it."""
    at = rule["at"]
    if len(rule["refs"]) != 1:
        raise error_at(at, "a stored tensor ('NAME: *') cannot be fused with others")
    if rule["name"].count("*") != 1 or any(isinstance(p, dict) for p in rule["name_parts"]):
        raise error_at(at, f"the rule of stored tensor {rule['refs'][0]['tensor']} names its "
                       f"tensors with one '*' and no placeholders, e.g. \"*\" or "
                       f"\"module.*\"; got {rule['name']!r}")
    said = [k for k in ("as", "from") if rule[k] is not None] + \
        [k for k in ("splits", "each", "repeat", "sum", "pads") if rule[k]] + \
        (["on"] if rule["stage"] is not None else [])
    if said:
        raise error_at(at, f"a stored tensor keeps the shape the file states: "
                       f"'{said[0]}' cannot apply to {rule['name']!r}")
    if "pp" in lay["mesh"]:
        raise error_at(at, f"layout {lay['name']} is pipelined; stored tensors have no "
                       f"pipeline stage")
    _known(rule["when"], syms, at, "condition")
    if rule.get("dtype") is not None and rule["dtype"] not in RULE_DTYPES:
        raise error_at(at, f"dtype {rule['dtype']}: not a floating dtype mapc stores",
                       hint="one of " + ", ".join(RULE_DTYPES))


def member_views(rule) -> dict:
    """member -> its 'from' pattern (a single-tensor rule's 'from' belongs to its one member)."""
    if rule["from"] is None:
        return {}
    if isinstance(rule["from"], dict):
        return rule["from"]
    return {rule["refs"][0]["member"]: rule["from"]}
