"""Concrete plans: a spec + a model config + a layout + a topology -> every physical shard.

``plan_layout`` evaluates a layout's rules for one config and topology: which rules apply, the
name and mesh coordinate (pp stage, tp rank, ...) of every physical tensor, and the recipe that
builds it. Everything is checked here, before a byte is read: shapes, divisibility, coverage
(each logical tensor placed exactly once, replicas marked ``copy``), unique names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import prod

from mapc.compiler.check import error_at
from mapc.compiler.expr import EvalError, evaluate, is_int, show, symbols
from mapc.compiler.metakeys import split_readers
from mapc.compiler.recipe import CONCAT, Factor, MemberPlan, Recipe, index_product
from mapc.compiler.spec import Spec
from mapc.compiler.values import plan_value
from mapc.errors import MapcError

MISSING = object()


# ---- config ------------------------------------------------------------------------------------
def lookup(config: dict, key: str, keep_null: bool = False):
    """The value at a dotted key; MISSING if absent (or null, unless ``keep_null``)."""
    cur = config
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return MISSING
        if cur[part] is None:
            return None if keep_null and part == key.split(".")[-1] else MISSING
        cur = cur[part]
    return cur


# Bounds on untrusted sizes (a model config, --tp/--pp/--ep, --set), far beyond any real model
# (a 1T-parameter MoE has ~2**40 parameters, ~50 000 tensors), so that a hostile or mistyped
# value is refused at once instead of looping or allocating for minutes.
EXPERT_TP = "etp"             # megatron-core's expert tensor parallel axis (expert_ranks)
MAX_MESH = 2**16              # ranks along one mesh axis
MAX_TENSORS = 2**20           # logical tensors of a model (layers x experts x tensors)
MAX_SHARDS = 2**21            # physical tensors of one layout plan, over every rank
MAX_ELEMENTS = 2**46          # elements of the whole model (70 trillion parameters)
MAX_PAD = 2**16               # padding beyond the padded size itself (e.g. vocab_multiple)


def check_requires(requires, env) -> None:
    """``require COND "message"``: refuse with the spec's own message where COND is false."""
    for r in requires:
        if not evaluate(r["expr"], env, r["at"]):
            raise error_at(r["at"], r["message"], hint=f"require {show(r['expr'])}")


def meta_values(layout: dict, env: dict) -> dict:
    """A layout's metadata entries evaluated in ``env`` (entries whose 'if' fails are left out)."""
    return {m["key"]: evaluate(m["expr"], env, m["at"]) for m in layout["meta"]
            if m.get("when") is None or evaluate(m["when"], env, m["at"])}


def bind_config(spec: Spec, config: dict, absent: frozenset = frozenset()) -> dict:
    """Evaluate the spec's config symbols and lets against a model config; the symbols named
    in ``absent`` take their ``absent V`` value instead (a checkpoint that lacks what the
    config's value implies, e.g. a multi-token-prediction layer a config counts but a saver
    dropped)."""
    if not isinstance(config, dict):
        raise MapcError(f"the model config is a {type(config).__name__}, not a JSON object",
                        hint="pass --config CONFIG.json with the model's config")
    env: dict = {}
    for c in spec.ir["config"]:
        value = MISSING
        for key in c["keys"]:
            value = lookup(config, key, keep_null=c.get("nullable", False))
            if value is not MISSING:
                break
        if value is not MISSING and value is not None and \
                not isinstance(value, (bool, int, float, str)) and not _scalar_list(value):
            raise MapcError(f"the model config's '{key}' is {_short(value)}, not a number, "
                            f"string, boolean or list of at most {MAX_CONFIG_LIST} of them "
                            f"(needed for {c['name']}, {c['at']})",
                            hint="fix the config, or pass --config CONFIG.json")
        if value is MISSING:
            if c["default"] is None:
                raise MapcError(f"the model config has no '{' or '.join(c['keys'])}' "
                                f"(needed for {c['name']}, {c['at']})",
                                hint="pass --config CONFIG.json with the model's config")
            value = evaluate(c["default"], env, c["at"])
        if c["name"] in absent:
            value = evaluate(c["absent"], env, c["at"])
        env[c["name"]] = value
    for x in spec.ir["lets"]:
        env[x["name"]] = evaluate(x["expr"], env, x["at"])
    check_requires(spec.ir.get("requires", ()), env)
    return env


MAX_CONFIG_LIST = 2**16      # entries of a list in a model config (e.g. layer indices)


def _scalar_list(value) -> bool:
    """A config list a spec can use (``i in mlp_only_layers``): bounded, of plain values."""
    return isinstance(value, list) and len(value) <= MAX_CONFIG_LIST and \
        all(isinstance(x, (bool, int, float, str)) for x in value)


def _short(value) -> str:
    text = repr(value)
    return f"a {type(value).__name__} " + (text if len(text) <= 40 else text[:37] + "...")


def config_from_env(spec: Spec, env: dict) -> dict:
    """The canonical config dict (first key of each symbol) for the given symbol values."""
    out: dict = {}
    for c in spec.ir["config"]:
        if c["name"] in env:
            cur = out
            *head, last = c["keys"][0].split(".")
            for part in head:
                cur = cur.setdefault(part, {})
            cur[last] = env[c["name"]]
    return out


# ---- logical tensors ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Logical:
    key: str                   # "embed", "layer.q[3]"
    tensor: str                # "layer.q"
    index: int | None
    shape: tuple[int, ...]


def logical_key(tensor: str, index: int | None) -> str:
    return tensor if index is None else f"{tensor}[{index}]"


def _size(name, env, at):
    v = env.get(name, MISSING)
    if v is MISSING:
        raise error_at(at, f"unknown size symbol '{name}'")
    if not is_int(v) or v <= 0:
        raise error_at(at, f"size {name} = {v!r} is not a positive integer",
                       hint="check the model config")
    return v


def group_count(decl: dict, env: dict) -> int:
    """How many entries a tensor group has (layers, experts), bounded."""
    n = evaluate(decl["count"], env, decl["at"])
    if not is_int(n) or n < 0 or n > MAX_TENSORS:
        raise error_at(decl["at"], f"{decl['group']} = {n!r}: not a count of at most "
                       f"{MAX_TENSORS} entries", hint="check the model config")
    return n


# A spec with a stored tensor (``NAME: *``) is planned for one checkpoint's tensors: the
# config env carries them under this key, {stored name: shape} (see ``stored_inventory``).
STORED = "$stored"


def stored_tensor(spec: Spec) -> dict | None:
    """The spec's stored tensor declaration (``NAME: *``), if it has one."""
    return next((t for t in spec.ir["tensors"] if t.get("stored")), None)


def stored_rules(layout: dict) -> list[tuple[str, str, dict]]:
    """(prefix, suffix, rule) of a layout's ``"prefix*suffix" = NAME`` rules."""
    out = []
    for rule in layout["rules"]:
        if "*" in rule["name"] and all(isinstance(p, str) for p in rule["name_parts"]):
            prefix, _, suffix = rule["name"].partition("*")
            out.append((prefix, suffix, rule))
    return out


def stored_name(layout: dict, physical: str) -> str | None:
    """The stored tensor's name (what ``*`` matched) for a physical name, or None."""
    for prefix, suffix, _ in stored_rules(layout):
        if len(physical) > len(prefix) + len(suffix) and physical.startswith(prefix) \
                and physical.endswith(suffix):
            return physical[len(prefix):len(physical) - len(suffix)]
    return None


STORED_ALIASES = "$stored_aliases"


def stored_inventory(spec: Spec, layout_name: str, tensors, aliases=None) -> dict:
    """The config env of a stored-tensor spec for a checkpoint whose layout ``layout_name``
    holds ``tensors`` [(physical name, shape)] and records tied ``aliases`` {alias: physical
    name}: names the layout's ``*`` rules do not match are left out (the coverage check then
    names them)."""
    layout = spec.layout(layout_name)
    inv = {}
    for name, shape in tensors:
        key = stored_name(layout, name)
        if key is not None:
            inv[key] = tuple(int(d) for d in shape)
    tied = {}
    for alias, target in (aliases or {}).items():
        a, t = stored_name(layout, alias), stored_name(layout, target)
        if a is not None and t in inv and a not in inv:
            tied[a] = t
    return {STORED: inv, STORED_ALIASES: tied}


def _per_index(t: dict) -> bool:
    """Whether a group tensor's conditions name the group's index (a layer kind)."""
    return bool(t["group"]) and (t.get("kind") is not None or t["index"] in symbols(t["when"]))


def group_indices(t: dict, env: dict, n: int) -> list[int]:
    """The indices < n of group tensor ``t`` at which it exists: every one, or those where its
    layer kind (``where COND(i) { ... }``) and its own ``if`` hold."""
    if not _per_index(t):
        return list(range(n))
    conds = [(t["kind"]["when"], t["kind"]["at"])] if t.get("kind") else []
    if t["when"] is not None:
        conds.append((t["when"], t["at"]))
    out, inner = [], dict(env)
    for i in range(n):
        inner[t["index"]] = i
        held = True
        for c, at in conds:
            v = evaluate(c, inner, at)
            if not isinstance(v, bool):
                raise error_at(at, f"the condition {show(c)} is {v!r} at {t['index']}={i}, "
                               f"not true or false", hint="compare it with something")
            held = held and v
        if held:
            out.append(i)
    return out


def logical_tensors(spec: Spec, env: dict) -> dict[str, Logical]:
    out = {}
    elements = 0
    for t in spec.ir["tensors"]:
        if not _per_index(t) and t["when"] is not None and \
                not evaluate(t["when"], env, t["at"]):
            continue
        if t.get("stored"):
            for name, shape in env.get(STORED, {}).items():
                key = logical_key(t["name"], name)
                out[key] = Logical(key, t["name"], name, tuple(shape))
                elements += prod(shape)
            if len(out) > MAX_TENSORS or elements > MAX_ELEMENTS:
                raise error_at(t["at"], f"the checkpoint stores more than "
                               + (f"{MAX_TENSORS} tensors" if len(out) > MAX_TENSORS else
                                  f"{MAX_ELEMENTS:.2e} parameters")
                               + f" (stored tensor {t['name']})",
                               hint="check the checkpoint")
            continue
        n = group_count(t, env) if t["group"] else 1
        where = group_indices(t, env, n) if t["group"] else None
        if where == []:
            continue        # a layer kind no layer of this config has
        shape = tuple(prod(_size(f["factor"], env, f["at"]) for f in axis) for axis in t["axes"])
        elements += n * prod(shape)
        if len(out) + n > MAX_TENSORS or elements > MAX_ELEMENTS:
            raise error_at(t["at"], f"the config describes more than "
                           + (f"{MAX_TENSORS} tensors" if len(out) + n > MAX_TENSORS else
                              f"{MAX_ELEMENTS:.2e} parameters")
                           + f" (at {t['name']}, shape {list(shape)} x {n})",
                           hint="check the model config's sizes")
        if t["group"]:
            for i in where:
                out[logical_key(t["name"], i)] = Logical(logical_key(t["name"], i), t["name"],
                                                         i, shape)
        else:
            out[t["name"]] = Logical(t["name"], t["name"], None, shape)
    return out


# ---- layout plans ------------------------------------------------------------------------------
@dataclass
class Instance:
    """One rule applied at one group index: its shards share one recipe."""
    rule: dict
    index: int | None
    stage: int
    recipe: Recipe
    members: dict[str, str]            # member name -> logical key
    shards: list[tuple[tuple, tuple, str]]   # (recipe coord, mesh coord, physical name)
    replicated: tuple[tuple[str, int], ...]  # mesh axes the tensor is copied over
    summed: tuple[str, ...] = ()       # of those, the axes whose ranks hold shares of a sum
    value: object = None               # compiler.values.ValueMap: the file stores f(x)

    def is_share_holder(self, coord) -> bool:
        """Whether this copy holds the value (the others of a summed axis hold zeros)."""
        c = dict(coord)
        return all(c.get(a, 0) == 0 for a in self.summed)

    @property
    def copy(self) -> bool:
        return self.rule["copy"]

    def first_name(self) -> str:
        return self.shards[0][2]

    def by_recipe_coord(self) -> dict[tuple, list[tuple[tuple, str]]]:
        """recipe coord -> the (mesh coord, name) copies of that shard (replicas share one)."""
        out: dict[tuple, list] = {}
        for rc, coord, name in self.shards:
            out.setdefault(rc, []).append((coord, name))
        return out


@dataclass
class LayoutPlan:
    spec: Spec
    layout: dict
    env: dict                          # config symbols + mesh sizes + params + lets
    params: dict
    mesh: dict                         # mesh axis -> size (every axis of the layout)
    logical: dict[str, Logical]
    instances: list[Instance] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)   # module alias -> stored name

    @property
    def name(self) -> str:
        return self.layout["name"]

    def placements(self):
        """(instance, coord, name) of every physical tensor."""
        for inst in self.instances:
            for _, coord, name in inst.shards:
                yield inst, coord, name

    def coords(self) -> list[tuple]:
        seen = {}
        for _, coord, _ in self.placements():
            seen.setdefault(coord, None)
        return sorted(seen, key=lambda c: tuple(i for _, i in c))

    def meta(self, reader: str | None = None) -> dict:
        """The layout's metadata entries evaluated for this plan: its own format's, or with
        ``reader`` those a format that reads this layout too has of its own (written
        ``READER.KEY`` in the spec, the prefix dropped; compiler/metakeys.py)."""
        own, theirs = split_readers(self.name, meta_values(self.layout, self.env))
        return own if reader is None else theirs.get(reader, {})

    def describe(self) -> str:
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({', '.join(x for x in (mesh, params) if x)})"


MIN_DP_SHARE = 256            # elements each data-parallel rank must get, at the least
FREE_DP = 64                  # a data-parallel size never refused for the model's size


def check_dp(plan: "LayoutPlan", dp: int, what: str = "--dp") -> None:
    """Refuse a data-parallel size above FREE_DP that would partition each model-parallel
    rank's parameters into shares of fewer than MIN_DP_SHARE elements: such ranks hold
    padding, not model, and their files cost time and disk for nothing (a hostile --dp 100000
    on a tiny model). Up to FREE_DP ranks are always taken: DeepSpeed trains a small model
    (a few hundred parameters, generic mode's conv net) at any such size, and FREE_DP files
    cost nothing."""
    if not is_int(dp) or dp < 1 or dp > MAX_MESH:
        raise MapcError(f"{what} {dp!r} must be a positive integer of at most {MAX_MESH}")
    per_rank: dict[tuple, int] = {}
    for inst, coord, _ in plan.placements():
        per_rank[coord] = per_rank.get(coord, 0) + prod(inst.recipe.shape_at(coord))
    smallest = min(per_rank.values(), default=0)
    if dp > FREE_DP and dp * MIN_DP_SHARE > smallest:
        raise MapcError(f"{what} {dp} would give each data-parallel rank fewer than "
                        f"{MIN_DP_SHARE} of the {smallest} parameters of a model-parallel rank "
                        f"of {plan.describe()}",
                        hint=f"choose {what} at most "
                             f"{max(FREE_DP, smallest // MIN_DP_SHARE)}")


def param_default(p: dict, config_env: dict):
    """A layout parameter's default: its first choice, or its ``default EXPR`` evaluated on the
    config, which must give one of the choices (or, with one choice, a value of its type)."""
    if "default_expr" not in p:
        return p["default"]
    value = evaluate(p["default_expr"], config_env, p["at"])
    first = p["default"]
    if (len(p["choices"]) > 1 and value not in p["choices"]) or (
            type(value) is not type(first) and not (isinstance(first, float) and is_int(value))):
        raise error_at(p["at"], f"the default of parameter {p['name']} is {value!r} for this "
                       f"config, not one of {', '.join(repr(c) for c in p['choices'])}",
                       hint=f"set it with --set {p['name']}=VALUE, or fix the spec's default")
    return value


def resolve_params(layout: dict, given: dict | None, config_env: dict | None = None) -> dict:
    given = dict(given or {})
    out = {}
    for p in layout["params"]:
        if p["name"] in given:
            raw = given.pop(p["name"])
            out[p["name"]] = coerce_param(p, raw)
        else:
            out[p["name"]] = param_default(p, config_env or {})
    if given:
        known = ", ".join(p["name"] for p in layout["params"]) or "none"
        raise MapcError(f"layout {layout['name']} has no parameter "
                        f"{', '.join(sorted(given))}", hint=f"its parameters: {known}")
    return out


def coerce_param(p: dict, raw):
    default = p["default"]
    value = raw
    if isinstance(raw, str) and not isinstance(default, str):
        try:
            value = json.loads(raw.lower() if isinstance(default, bool) else raw)
        except ValueError:
            raise MapcError(f"parameter {p['name']} takes a {type(default).__name__}, got "
                            f"{raw!r}") from None
    if type(value) is not type(default) and not (isinstance(default, float) and is_int(value)):
        raise MapcError(f"parameter {p['name']} takes a {type(default).__name__}, got {raw!r}")
    if len(p["choices"]) > 1 and value not in p["choices"]:
        raise MapcError(f"parameter {p['name']} must be one of "
                        f"{', '.join(repr(c) for c in p['choices'])}, got {value!r}",
                        hint=f"declared at {p['at']}")
    return value


def plan_layout(spec: Spec, layout_name: str, config_env: dict, topology: dict | None = None,
                params: dict | None = None, vpp: int = 1) -> LayoutPlan:
    """The plan of ``layout_name`` at ``topology`` with ``params``. ``vpp`` > 1: the pp axis
    counts the virtual stages of Megatron's interleaved schedule (``pp`` ranks x ``vpp``
    chunks, virtual stage ``chunk * pp/vpp + rank``), which matters to uneven pipeline stages
    (:func:`pipeline_stages`)."""
    layout = spec.layout(layout_name)
    topology = {k: v for k, v in (topology or {}).items() if v is not None}
    params = dict(params or {})
    etp_default = None      # the etp axis: --set etp=N, else a layout's 'param etp = N', else tp
    if EXPERT_TP in layout["mesh"]:
        if EXPERT_TP not in topology and EXPERT_TP in params:
            topology[EXPERT_TP] = _mesh_size(EXPERT_TP, params.pop(EXPERT_TP))
        params.pop(EXPERT_TP, None)
        etp_default = next((p["default"] for p in layout["params"] if p["name"] == EXPERT_TP),
                           None)
    mesh = {}
    for axis in layout["mesh"]:
        n = topology.pop(axis, (etp_default or mesh.get("tp", 1)) if axis == EXPERT_TP else 1)
        if not is_int(n) or n < 1 or n > MAX_MESH:
            raise MapcError(f"{axis}={n!r} must be a positive integer of at most {MAX_MESH}")
        mesh[axis] = n
    on_rank = expert_rank_filter(mesh, layout_name)
    extra = {k: v for k, v in topology.items() if v != 1}
    if extra:
        raise MapcError(f"layout {layout_name} has no {', '.join(extra)} axis "
                        f"(it is not sharded that way)",
                        hint=f"its mesh: {' '.join(layout['mesh']) or 'none'}")
    params = resolve_params(layout, params, config_env)
    if EXPERT_TP in mesh:       # a 'param etp' gives the axis its default; the axis is the value
        params.pop(EXPERT_TP, None)
    env = dict(config_env)
    env.update(mesh)
    env.update(params)
    for x in layout["lets"]:
        env[x["name"]] = evaluate(x["expr"], env, x["at"])
    check_requires(layout.get("requires", ()), env)
    logical = logical_tensors(spec, config_env)
    for w in layout.get("without", ()):
        decl = next(t for t in spec.ir["tensors"] if t["group"] == w["group"])
        if group_count(decl, config_env):
            raise error_at(w["at"], w["message"], hint=f"without {w['group']}")
    plan = LayoutPlan(spec, layout, env, params, mesh, logical)

    tensors = {t["name"]: t for t in spec.ir["tensors"]}
    pipe = layout["pipeline"]
    pp = mesh.get("pp", 1)
    stages = None          # (stage, local index) per entry of the pipelined group
    shard_count = 0
    for rule in layout["rules"]:
        if rule["when"] is not None and not evaluate(rule["when"], env, rule["at"]):
            continue
        decl = tensors[rule["refs"][0]["tensor"]]
        if decl.get("stored"):
            shard_count += _place_stored(plan, rule, decl, mesh, layout, on_rank)
            continue
        indices = [None] if decl["group"] is None else range(group_count(decl, config_env))
        for index in indices:
            keys = {r["member"]: logical_key(r["tensor"], index) for r in rule["refs"]}
            present = [k for k in keys.values() if k in logical]
            if not present:
                continue  # optional tensors absent from this config
            if len(present) != len(keys):
                missing = [k for k in keys.values() if k not in logical]
                raise error_at(rule["at"], f"rule fuses {', '.join(missing)}, which this config "
                               f"does not have")
            if stages is None and pipe and decl["group"] == pipe["group"]:
                stages = pipeline_stages(pipe, group_count(decl, config_env), pp, env, vpp)
            stage, local = _stage(rule, decl, index, pipe, pp, config_env, stages)
            names_env = dict(env)
            if index is not None:
                names_env[rule["refs"][0]["index"]] = index
                if pipe and pipe["local"] and pipe["group"] == decl["group"]:
                    names_env[pipe["local"]] = local
            shapes = tuple((m, logical[k].shape) for m, k in keys.items())
            recipe = build_recipe(spec, rule, env, shapes, tuple(mesh.items()))
            cut_axes = {f.axis for f in recipe.factors if f.mesh and f.axis}
            uncut = [a for a in mesh if a != "pp" and a not in cut_axes]
            rep = tuple((a, mesh[a]) for a in uncut if a not in layout["single"])
            once = {a: 0 for a in uncut if a in layout["single"]}   # stored on rank 0 only
            shard_count += prod(n for _, n in recipe.mesh) * prod(n for _, n in rep)
            if shard_count > MAX_SHARDS:
                raise error_at(rule["at"], f"layout {layout_name} at "
                               f"{', '.join(f'{a}={n}' for a, n in mesh.items())} would have "
                               f"more than {MAX_SHARDS} tensor shards", hint="choose a smaller "
                               "topology (or check the model config's sizes)")
            shards = []
            for rc in recipe.coords():
                axes, name_vars = recipe.place(rc)
                name = _format_name(rule, names_env | name_vars)
                for rcoord in index_product(rep):
                    full = axes | dict(rcoord) | once
                    if "pp" in mesh:
                        full["pp"] = stage
                    if on_rank is None or on_rank(full):
                        shards.append((rc, tuple((a, full[a]) for a in layout["mesh"]), name))
            plan.instances.append(Instance(rule, index, stage, recipe, keys, shards, rep,
                                           tuple(rule.get("sum", ())),
                                           plan_value(rule, env)))
    if on_rank is not None:
        _check_every_shard_on_a_rank(plan)
    _check_coverage(plan)
    plan.meta()  # evaluate the metadata now, so its errors surface before anything is read
    plan.aliases = _aliases(plan)
    return plan


def _mesh_size(axis, raw) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise MapcError(f"{axis}={raw!r} must be a positive integer") from None


def expert_ranks(tp: int, ep: int, etp: int) -> list[tuple[int, int, int]]:
    """The (tp, ep, etp) ranks of one pipeline stage that megatron-core's torch-format
    checkpoints hold: ranks r < etp * ep (expert data-parallel rank 0, the ranks that save),
    with tensor-parallel rank r % tp, expert-parallel rank r // etp and expert-tensor-parallel
    rank r % etp (parallel_state's rank generators, "tp-cp-ep-dp-pp" order)."""
    return [(r % tp, r // etp, r % etp) for r in range(etp * ep)]


def expert_rank_filter(mesh: dict, layout_name: str):
    """None, or which mesh coordinates are ranks when the layout has the ``etp`` axis (see
    expert_ranks): a tensor is stored on those of its copies only."""
    if EXPERT_TP not in mesh:
        return None
    tp, ep, etp = mesh.get("tp", 1), mesh.get("ep", 1), mesh[EXPERT_TP]
    where = f"layout {layout_name} at tp={tp} ep={ep} etp={etp}"
    if tp % etp:
        raise MapcError(f"{where}: etp must divide tp", hint="megatron-core's expert tensor "
                        "parallel group is a part of the tensor parallel one here; choose etp "
                        "among the divisors of tp")
    if etp * ep < tp:
        raise MapcError(f"{where}: only the tp ranks below etp * ep = {etp * ep} would save a "
                        f"file (Megatron's torch format saves from expert data-parallel rank 0)",
                        hint="choose ep or etp with etp * ep >= tp")
    ranks = set(expert_ranks(tp, ep, etp))

    def on_rank(coord: dict) -> bool:
        return (coord.get("tp", 0), coord.get("ep", 0), coord.get(EXPERT_TP, 0)) in ranks
    return on_rank


def _check_every_shard_on_a_rank(plan) -> None:
    """Every shard of every tensor is held by some rank (an ``etp`` layout's ranks are a part
    of the mesh: a tensor cut over both tp and ep, say, would lose shards)."""
    for inst in plan.instances:
        if len({rc for rc, _, _ in inst.shards}) < len(list(inst.recipe.coords())):
            mesh = ", ".join(f"{a}={n}" for a, n in plan.mesh.items())
            raise error_at(inst.rule["at"], f"{inst.rule['name']}: some of its shards are on "
                           f"no rank of megatron-core's grid at {mesh}",
                           hint="cut a tensor over tp, or over ep and etp (experts), not over "
                                "tp and ep")


def _place_stored(plan, rule, decl, mesh, layout, on_rank=None) -> int:
    """A ``"prefix*suffix" = NAME`` rule: every stored tensor whole, under its own name
    (copied over the layout's data mesh axes like any uncut tensor). Returns the number of
    shards placed."""
    prefix, _, suffix = rule["name"].partition("*")
    rep = tuple((a, n) for a, n in mesh.items() if a not in layout["single"])
    once = {a: 0 for a in mesh if a in layout["single"]}
    copies = prod(n for _, n in rep)
    placed = 0
    for key, lg in plan.logical.items():
        if lg.tensor != decl["name"]:
            continue
        recipe = identity_recipe(rule, lg.shape)
        name = prefix + lg.index + suffix
        shards = [((), tuple((a, (dict(rc) | once)[a]) for a in layout["mesh"]), name)
                  for rc in index_product(rep)
                  if on_rank is None or on_rank(dict(rc) | once)]
        plan.instances.append(Instance(rule, None, 0, recipe, {rule["refs"][0]["member"]: key},
                                       shards, rep))
        placed += copies
        if placed > MAX_SHARDS:
            raise error_at(rule["at"], f"layout {layout['name']} would have more than "
                           f"{MAX_SHARDS} tensor shards", hint="choose a smaller topology")
    return placed


def identity_recipe(rule, shape: tuple) -> Recipe:
    """The recipe of a tensor stored as it is: its own shape, unsharded (one per shape)."""
    key = ("stored", rule["at"], tuple(shape))
    recipe = _RECIPES.get(key)
    if recipe is None:
        axes = [[{"factor": f"d{k}", "at": rule["at"]}] for k in range(len(shape))]
        env = {f"d{k}": int(n) for k, n in enumerate(shape)}
        recipe = _RECIPES[key] = _build_recipe(rule, axes, env,
                                               {rule["refs"][0]["member"]: tuple(shape)}, {})
    return recipe


def _aliases(plan) -> dict[str, str]:
    """alias name -> the physical name of the tensor it names (an unsharded, unfused one)."""
    out = {}
    decl = stored_tensor(plan.spec)
    if decl is not None and plan.env.get(STORED_ALIASES):
        rules = [(p, x) for p, x, r in stored_rules(plan.layout)
                 if r["refs"][0]["tensor"] == decl["name"] and (
                     r["when"] is None or evaluate(r["when"], plan.env, r["at"]))]
        if rules:
            prefix, suffix = rules[0]
            out.update({prefix + a + suffix: prefix + t + suffix
                        for a, t in plan.env[STORED_ALIASES].items()})
    for a in plan.layout.get("aliases", ()):
        if a["when"] is not None and not evaluate(a["when"], plan.env, a["at"]):
            continue
        key = logical_key(a["tensor"], None)
        if key not in plan.logical:
            continue
        found = [(id(inst), n) for inst in plan.instances if not inst.copy
                 and list(inst.members.values()) == [key] for _, c, n in inst.shards]
        # one stored tensor, whole or cut over the mesh: the alias names each rank's shard
        # (a tied head cut with its embedding, DeepSpeed AutoTP's vocabulary-parallel pair)
        if len(set(found)) != 1:
            raise error_at(a["at"], f"alias {a['name']!r}: {a['tensor']} is stored as "
                           f"{len(found)} tensors in layout {plan.name}; an alias needs one "
                           "tensor (whole, or cut over the mesh)")
        if any(n == a["name"] for _, _, n in plan.placements()):
            raise error_at(a["at"], f"alias {a['name']!r} is also a stored tensor of layout "
                           f"{plan.name}", hint="give the alias an exclusive 'if' condition")
        out[a["name"]] = found[0][1]
    return out


def _sizes_env(env):
    return tuple(sorted((k, v) for k, v in env.items()
                        if is_int(v) or isinstance(v, (str, bool, float))))


def _stage(rule, decl, index, pipe, pp, env, stages):
    if pipe and decl["group"] == pipe["group"]:
        return stages[index]
    if rule["stage"] == "last":
        return pp - 1, None
    return 0, None


def _stage_size(pipe, which, env):
    """``first N`` / ``last M`` of a pipeline: N, or None when unstated, 0 or null (even)."""
    e = pipe.get(which)
    if e is None:
        return None
    n = evaluate(e, env, pipe["at"])
    if n is None or n == 0:
        return None
    if not is_int(n) or n < 0:
        raise error_at(pipe["at"], f"the pipeline's {which} stage size {show(e)} = {n!r} is not "
                       f"a count of layers")
    return n


def pipeline_stages(pipe, count: int, pp: int, env: dict,
                    vpp: int = 1) -> list[tuple[int, int]]:
    """(stage, local index) of each of a pipelined group's ``count`` entries, as megatron-core
    places layers (``get_transformer_layer_offset``): ``first N`` entries on stage 0 and
    ``last M`` on stage pp-1 when stated (uneven stages), the rest split evenly over the
    stages between; without them, ``count / pp`` on every stage. With ``vpp`` > 1, ``pp``
    counts virtual stages (``pp / vpp`` ranks, chunk ``v`` of rank ``r`` is stage
    ``v * pp / vpp + r``) and each chunk is such a pipeline of ``count / vpp`` entries over the
    ranks: ``N / vpp`` on rank 0, ``M / vpp`` on the last, the rest split evenly between
    (megatron-core's interleaved uneven split, which needs ``vpp`` to divide ``N``, ``M`` and
    the middle stages' layers)."""
    first, last = _stage_size(pipe, "first", env), _stage_size(pipe, "last", env)
    if first is None and last is None:
        if count % pp:
            raise error_at(pipe["at"], f"pp={pp} does not divide the {count} entries of "
                           f"{pipe['group']}", hint=f"choose pp dividing {count}, or uneven "
                           f"first/last stages")
        sizes = [count // pp] * pp
    else:
        ranks = pp // vpp if vpp > 1 and pp % vpp == 0 else pp
        stated = ", ".join(f"{w} stage {n}" for w, n in (("first", first), ("last", last))
                           if n is not None)
        middle = ranks - (first is not None) - (last is not None)
        rest = count - (first or 0) - (last or 0)
        if ranks < 2 or middle < 0 or rest < 0 or (middle == 0 and rest) or \
                (middle and (rest % middle or rest == 0)):
            raise error_at(pipe["at"], f"uneven pipeline ({stated}) cannot place the {count} "
                           f"entries of {pipe['group']} on pp={ranks} stages: the "
                           f"{max(rest, 0)} left must split evenly over the {max(middle, 0)} "
                           f"other stage(s)",
                           hint="choose first/last stage sizes that leave a multiple of the "
                                "middle stages (megatron-core's rule), or pp > 1")
        if vpp > 1:
            odd = [f"{w} ({n} layers)" for w, n in (("first stage", first), ("last stage", last),
                                           ("each middle stage", rest // middle if middle
                                            else None))
                   if n is not None and n % vpp]
            if odd:
                raise error_at(pipe["at"], f"uneven pipeline ({stated}) with vpp={vpp} "
                               f"virtual stages per rank: {', '.join(odd)} not divisible "
                               f"by vpp={vpp}",
                               hint="megatron-core splits every stage's layers evenly over "
                                    "its vpp chunks: choose sizes divisible by vpp")
            first_c = None if first is None else first // vpp
            last_c = None if last is None else last // vpp
            rest = rest // vpp
        else:
            first_c, last_c = first, last
        sizes = [first_c] if first_c is not None else []
        sizes += [rest // middle] * middle if middle else []
        sizes += [last_c] if last_c is not None else []
        sizes = sizes * (vpp if vpp > 1 else 1)
    out = []
    for stage, n in enumerate(sizes):
        out += [(stage, j) for j in range(n)]
    return out


def _format_name(rule, env) -> str:
    out = []
    for part in rule["name_parts"]:
        if isinstance(part, str):
            out.append(part)
        else:
            v = evaluate(part["expr"], env, rule["at"])
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) or \
                    (isinstance(v, (int, float)) and v < 0):
                where = ", ".join(f"{k}={env[k]}" for k in sorted(symbols(part["expr"]))
                                  if k in env)
                raise error_at(rule["at"], f"tensor name {rule['name']!r}: {{{show(part['expr'])}}}"
                               f" = {v!r} at {where}; an index in a name must be a "
                               f"non-negative integer",
                               hint="check the placeholder's arithmetic against the group's range")
            out.append(str(v))
    return "".join(out)


_RECIPES: dict[tuple, Recipe] = {}


def build_recipe(spec: Spec, rule: dict, env: dict, shapes: tuple, mesh: tuple) -> Recipe:
    """The recipe of ``rule`` for these sizes, computed once and shared by every layer (and
    every later plan) with the same shapes."""
    key = (spec.sha256, rule["at"], _sizes_env(env), shapes, mesh)
    recipe = _RECIPES.get(key)
    if recipe is None:
        phys = rule["as"]
        if phys is None:
            phys = next(t["axes"] for t in spec.ir["tensors"]
                        if t["name"] == rule["refs"][0]["tensor"])
        recipe = _RECIPES[key] = _build_recipe(rule, phys, env, dict(shapes), dict(mesh))
    return recipe


def _build_recipe(rule, phys, env, shapes, mesh) -> Recipe:
    at = rule["at"]
    members = [r["member"] for r in rule["refs"]]
    pads = {p["factor"]: p for p in rule["pads"]}
    eaches = {e["factor"]: e for e in rule["each"]}
    repeats = set(rule["repeat"])

    def value(e, where):
        try:
            v = evaluate(e, env, where)
        except EvalError as err:
            raise error_at(where, err.message) from None
        if not is_int(v) or v <= 0:
            raise error_at(where, f"{show(e)} = {v!r} is not a positive integer size")
        return v

    # Whole sizes of the named factors (padded where asked).
    whole: dict[str, tuple[int, int]] = {}       # name -> (true, full)
    for axis in phys:
        for f in axis:
            if "factor" in f and f["factor"] not in mesh:
                true = value(["sym", f["factor"]], f["at"])
                full = true
                if f["factor"] in pads:
                    mult = value(pads[f["factor"]]["multiple"], pads[f["factor"]]["at"])
                    full = -(-true // mult) * mult
                    if full - true > max(true, MAX_PAD):
                        raise error_at(pads[f["factor"]]["at"], f"padding {f['factor']} = "
                                       f"{true} to a multiple of {mult} would add {full - true}"
                                       f" (more than {max(true, MAX_PAD)})",
                                       hint="choose a smaller padding multiple")
                whole[f["factor"]] = (true, full)

    # How each split's mesh axis is spread over its factors (outermost first).
    cut: dict[str, list[tuple[str, int, int]]] = {}   # factor -> [(mesh factor, size, stride)]
    local: dict[str, int] = {n: full for n, (_, full) in whole.items()}
    uneven: dict[str, tuple] = {}     # factor -> (mesh axis, per-rank sizes, block)
    for s in rule["splits"]:
        m = s["mesh"]
        n = mesh[m]
        name = s["factors"][0]
        if s.get("uneven") and n > 1 and local[name] % n:
            size = local[name]
            if size < n:
                raise error_at(s["at"], f"{m}={n} is more than {name}={size} of "
                               f"{rule['name']!r}: a rank would hold none of it",
                               hint=f"choose {m} at most {size}")
            block = -(-size // n)
            uneven[name] = (m, tuple(size // n + (1 if r < size % n else 0)
                                     for r in range(n)), block)
            whole[name] = (whole[name][0], n * block)
            local[name] = block
            cut[name] = [(m, n, 1)]
            continue
        remaining = n
        parts = []
        for name in s["factors"]:
            size = local[name]
            if remaining == 1:
                if not parts:  # a mesh axis of size 1 still names its (only) rank
                    parts.append((name, 1))
                break
            take = size if remaining >= size else remaining
            if (remaining >= size and remaining % size) or (remaining < size and size % remaining):
                prod_desc = " * ".join(f"{x}={local[x]}" for x in s["factors"])
                raise error_at(s["at"], f"{m}={n} does not divide {prod_desc} of "
                               f"{rule['name']!r} into whole blocks",
                               hint=f"choose {m} dividing {prod(local[x] for x in s['factors'])}")
            parts.append((name, take))
            local[name] = size // take
            remaining //= take
        if remaining != 1:
            total = prod(whole[x][1] for x in s["factors"])
            raise error_at(s["at"], f"{m}={n} does not divide "
                           f"{' * '.join(s['factors'])}={total} of {rule['name']!r}",
                           hint=f"choose {m} dividing {total}")
        for k, (name, take) in enumerate(parts):
            stride = prod(t for _, t in parts[k + 1:])
            label = m if len(parts) == 1 else f"{m}#{k}"
            cut[name] = [(label, take, stride)]

    # Physical factors: [mesh cut] [each index] local part, per named factor.
    factors: list[Factor] = []
    axes = []
    widths: dict[str, int] = {}
    expanded: dict[str, list[str]] = {}      # factor -> names of the factors it became
    for axis in phys:
        idx = []
        for f in axis:
            if "concat" in f:
                widths = {m_["member"]: value(m_["size"], m_["at"]) for m_ in f["concat"]}
                total = sum(widths.values())
                idx.append(len(factors))
                factors.append(Factor(CONCAT, total, total, total))
                continue
            name = f["factor"]
            if name in mesh:
                idx.append(len(factors))
                factors.append(Factor(name, mesh[name], mesh[name], mesh[name], mesh=True,
                                      axis=name))
                expanded[name] = [name]
                continue
            true, full = whole[name]
            rep = name in repeats
            names = []
            for label, size, stride in cut.get(name, []):
                idx.append(len(factors))
                names.append(label)
                factors.append(Factor(label, size, size, size, mesh=True,
                                      axis=label.split("#")[0], stride=stride, repeat=rep))
            size = local[name]
            if name in eaches:
                var = eaches[name]["var"]
                idx.append(len(factors))
                names.append("@" + var)
                factors.append(Factor("@" + var, size, size, size, mesh=True, var=var,
                                      repeat=rep))
                size = 1
            idx.append(len(factors))
            names.append(name)
            factors.append(Factor(name, size, true, full, repeat=rep, gone=name in eaches,
                                  uneven=name in uneven))
            expanded[name] = names
        axes.append(tuple(idx))
    mesh_factors = tuple((f.name, f.size) for f in factors if f.mesh)
    ragged = []
    kept = [ax for ax in axes if not all(factors[k].mesh or factors[k].gone for k in ax)]
    for name, (m, sizes, block) in uneven.items():
        ax = next(ax for ax in kept if any(factors[k].name == name for k in ax))
        local_ax = [factors[k] for k in ax if not factors[k].mesh]
        if local_ax[0].name != name or any(f.name == CONCAT for f in local_ax) or \
                name in eaches:
            raise error_at(rule["at"], f"{rule['name']!r}: an uneven split of {name} needs "
                           f"{name} outermost on its axis, with no concatenation or 'each'",
                           hint=f"split {name} evenly, or reorder the pattern")
        ragged.append((m, kept.index(ax), prod(f.size for f in local_ax[1:]), sizes))

    phys_names = [f.name for f in factors]
    byname = {f.name: f for f in factors}
    plans = []
    offset = 0
    # Members are laid out in the order the concatenation lists them (`[up gate]` puts up
    # first), whatever order the rule names them after '='.
    for member in (list(widths) if widths else members):
        shape = shapes[member]
        view = rule["from"].get(member) if isinstance(rule["from"], dict) else rule["from"]
        if view is None:
            view_names = [[f["factor"] if "factor" in f else CONCAT for f in axis
                           if f.get("factor") not in repeats] for axis in phys]
            view_names = [a for a in view_names if a]
        else:   # in a fused view, the member's own name stands for its concat slot
            view_names = [[CONCAT if f["factor"] == member and len(members) > 1 else f["factor"]
                           for f in axis] for axis in view]
        if len(view_names) != len(shape):
            raise error_at(at, f"{member} has {len(shape)} axes, the pattern {len(view_names)}")
        pre, split_shape, order, pad_list, scatter = [], [], [], [], []
        width = widths.get(member, 1)
        for k, axis in enumerate(view_names):
            sizes = []
            for name in axis:
                if name == CONCAT:
                    sizes.append(width)
                    pre.append(width)
                    split_shape.append(width)
                    order.append(CONCAT)
                    continue
                true, full = whole[name] if name in whole else (mesh[name], mesh[name])
                sizes.append(true)
                if name in uneven:
                    scatter.append((len(pre), uneven[name][1], uneven[name][2]))
                elif full != true:
                    pad_list.append((len(pre), full - true))
                pre.append(true)
                for label in expanded[name]:
                    split_shape.append(byname[label].size)
                    order.append(label)
            if prod(sizes) != shape[k]:
                raise error_at(rule["refs"][members.index(member)]["at"],
                               f"axis {k} of {member} has size {shape[k]} but the pattern "
                               f"{' '.join(axis)} makes it {prod(sizes)}",
                               hint="check the model config against the spec")
        seen = {n for axis in view_names for n in axis}
        if CONCAT in phys_names and CONCAT not in seen:
            if width != 1:
                raise error_at(at, f"the view of {member} must name its slot of the "
                               f"concatenation ({member}: {width})")
            split_shape.append(1)
            order.append(CONCAT)
        expand = []   # factors this member lacks (declared `repeat`) are broadcast
        for name, labels in expanded.items():
            if name not in seen and name not in mesh:
                if name not in repeats:
                    raise error_at(at, f"{member} has no factor {name}; declare 'repeat {name}'")
                for label in labels:
                    expand.append(byname[label].size)
                    order.append(label)
        perm = tuple(order.index(n) for n in phys_names)
        plans.append(MemberPlan(member, tuple(shape), tuple(pre), tuple(pad_list),
                                tuple(split_shape), perm, offset, width, tuple(expand),
                                tuple(scatter)))
        offset += width
    return Recipe(rule["name"], tuple(factors), tuple(axes), tuple(plans), mesh_factors,
                  tuple(ragged))


def _check_coverage(plan: LayoutPlan) -> None:
    placed: dict[str, Instance] = {}
    for inst in plan.instances:
        if inst.copy:
            continue
        for key in inst.members.values():
            if key in placed:
                raise error_at(inst.rule["at"], f"{key} is placed twice in layout {plan.name} "
                               f"(also by {placed[key].rule['at']})",
                               hint="make the rules' 'if' conditions exclusive, or mark the "
                                    "replica with 'copy'")
            placed[key] = inst
    missing = [k for k in plan.logical if k not in placed]
    if missing:
        raise MapcError(f"layout {plan.name} ({plan.describe()}) places no tensor for "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                        where=plan.layout["at"],
                        hint="a rule's 'if' condition excludes it for this config or parameters")
    for inst in plan.instances:
        if inst.copy:
            for key in inst.members.values():
                if key not in placed:
                    raise error_at(inst.rule["at"], f"copy of {key}, which no rule places")
    seen = {}
    for inst, coord, name in plan.placements():
        if (coord, name) in seen:
            raise error_at(inst.rule["at"], f"two tensors named {name!r} on shard {coord} "
                           f"(also {seen[(coord, name)]})")
        seen[(coord, name)] = inst.rule["at"]
