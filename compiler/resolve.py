"""Resolve an opened checkpoint: which spec (family) describes it, with which model config and
which layout parameters.

``resolve(source)`` tries the candidate specs (the one given, the one mapc recorded, or the
shipped specs whose ``match`` lines admit the config), binds the config (or rebuilds it from the
format's metadata), tries the layout parameters the checkpoint does not state, and returns the
plan whose names and shapes match the checkpoint exactly. Nothing here reads a tensor: only
names, shapes and metadata. ``source`` is any opened container (mapc.runtime.containers.base
.Source): ``path``, ``format``, ``layout``, ``record``, ``config``, ``format_meta``,
``topology``, ``warnings``, ``coords()``, ``names(coord)``, ``shape(name, coord)``,
``describe_coord(coord)``, ``aliases()`` (tied names it records; generic mode) and
optionally ``bind_plan(plan)``.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapc.compiler.plan import (LayoutPlan, bind_config, config_from_env, meta_values, param_default,
                                plan_layout, stored_inventory, stored_tensor)
from mapc.compiler.spec import (LayoutParam, Spec, builtin_specs, load_spec, match_rules,
                                recorded_sha256, spec_from_record)
from mapc.errors import MapcError
from mapc.runtime.containers.base import coord_key


@dataclass
class Resolved:
    source: object
    spec: Spec
    env: dict                      # config symbols
    config: dict                   # canonical model config (HF keys)
    plan: LayoutPlan
    warnings: list[str] = field(default_factory=list)
    generic: str | None = None     # why generic mode was used (no family known), if it was


# The shipped spec of generic mode: any model, each stored tensor its own logical tensor.
GENERIC = "generic"


def read_config(config) -> dict | None:
    """A model config given as a dict, or as the path of a JSON file."""
    if config is None or isinstance(config, dict):
        return config
    try:
        return json.loads(Path(config).read_text())
    except (OSError, ValueError) as e:
        raise MapcError(f"cannot read config: {e}", where=str(config)) from None


def resolve(source, *, spec=None, config=None, params=None,
            allow_spec_change: bool = False) -> Resolved:
    """Find the family, config and layout parameters of an opened checkpoint, and check that
    every tensor the spec expects is there with the right shape.

    A checkpoint mapc wrote is read with the spec its record carries. A spec given that differs
    from the recorded one is refused unless ``allow_spec_change`` (the layouts may differ, and
    a conversion with the wrong one misplaces tensors silently).

    When no family is known (no spec given or recorded, and no model config, or one whose
    model_type no shipped spec describes), a checkpoint that no family spec describes is read
    in generic mode: the shipped ``generic`` spec, each stored tensor its own logical
    tensor, said in one warning."""
    config = read_config(config) or source.config
    try:
        if spec is None and not source.record.get("family") and not config and \
                not source.format_meta and not getattr(source, "needs_family", None):
            # no config and no format metadata to rebuild one from: no family spec can bind
            # its sizes, so none is compiled (a DeepSpeed checkpoint as saved: ~0.5 s)
            raise MapcError(f"{source.path} has no model config and its format records no "
                            f"model sizes", hint="pass --config CONFIG.json or --spec FILE.map")
        return _resolve(source, spec, config, params, allow_spec_change)
    except MapcError as e:
        if spec is not None or source.record.get("family") or family_known(config):
            raise
        failure = e
    needs = getattr(source, "needs_family", None)
    if needs:        # e.g. a tensor-parallel checkpoint: its shards are cut by the family
        why = (f"no shipped spec describes model_type {config.get('model_type')!r}"
               if config and config.get("model_type") is not None else
               "it has no model config")
        raise MapcError(f"{source.path} is {needs}, which only the model family's spec can "
                        f"merge, and {why}",
                        hint="pass --config CONFIG.json (the model's HF config of a shipped "
                             "family) or --spec FILE.map; generic mode (no family) reads "
                             "unsharded checkpoints only") from None
    try:
        res = _resolve(source, GENERIC, config, params, allow_spec_change)
    except MapcError as generic_failure:
        if config and config.get("model_type") is not None:
            # no spec describes the model type at all: generic mode was the only way, so its
            # reason is the one to show
            raise generic_failure from None
        raise failure from None
    why = (f"no shipped spec describes model_type {config.get('model_type')!r}"
           if config and config.get("model_type") is not None else
           "the checkpoint has no model config")
    res.generic = why
    res.warnings.insert(0, f"generic mode: {why}, so every tensor keeps its stored name and "
                           f"shape (spec generic); formats that need the family (megatron, "
                           f"neox, nemo, nxdt, gguf, tp/pp) need --config CONFIG.json")
    return res


def family_known(config) -> bool:
    """Whether a model config names a family some shipped spec describes."""
    if not config or config.get("model_type") is None:
        return False
    for name, path in builtin_specs().items():
        if name != GENERIC and may_match(path.read_text(), config):
            sp = load_spec(path)
            if sp.matches() and all(m.admits(config) for m in sp.matches()):
                return True
    return False


def _stored_env(sp, source):
    """The config env of a stored-tensor spec (generic mode): the checkpoint's own tensors
    and shapes, which must be unsharded (one mesh coordinate)."""
    coords = source.coords()
    if len(coords) != 1:
        raise MapcError(f"spec {sp.family} keeps every stored tensor as it is, but "
                        f"{source.path} is sharded over {len(coords)} files "
                        f"({source.describe_coord(coords[1])}, ...)",
                        hint="the family's spec is needed to merge shards: pass --config "
                             "CONFIG.json or --spec FILE.map")
    c = coords[0]
    return stored_inventory(sp, source.layout, [(n, source.shape(n, c)) for n in source.names(c)],
                            source.aliases())


def _resolve(source, spec, config, params, allow_spec_change) -> Resolved:
    search = _Search()
    plain = source
    for sp in candidate_specs(plain, spec, config, allow_spec_change):
        source = _quantized_view(plain, sp)
        inv_env, inv_params = invert_meta(sp, source.layout, source.format_meta)
        given = dict(source.record.get("params", {})) if source.record.get("layout") == \
            source.layout else {}
        given.update(inv_params)
        given.update(params or {})
        envs = []
        try:
            if stored_tensor(sp) is not None:
                envs.append((_stored_env(sp, source), dict(config or {})))
            elif config is not None:
                envs += [(env, dict(config)) for env in _absent_variants(sp, config, search)]
            else:
                for guess in boolean_guesses(sp, inv_env):
                    # a guess a `require` refuses (a flag the spec does not support) drops
                    # that guess only, not the spec
                    try:
                        variants = _absent_variants(sp, config_from_env(sp, inv_env | guess),
                                                    search)
                    except MapcError as e:
                        search.errors.append(f"{sp.family}: {e}")
                        continue
                    for env in variants:
                        envs.append((env, _constructed_config(sp, env)))
        except MapcError as e:
            search.errors.append(f"{sp.family}: {e}")
            continue
        for env, canonical in envs:
            found = _resolve_params(sp, source, env, canonical, given, search)
            if found is not None:
                if source is not plain:
                    _dequantized(found, source)
                bind = getattr(source, "bind_plan", None)   # a source whose optimizer state
                if bind is not None:                         # is numbered by the model's order
                    bind(found.plan)
                return found
    search.fail(plain)


def _quantized_view(source, sp):
    """The source as the spec's ``quantized`` rules read it (mapc.runtime.quantized)."""
    from mapc.runtime.quantized import quantized_view
    return quantized_view(source, sp, source.layout)


def _dequantized(found: Resolved, view) -> None:
    """A source read dequantized: its rules said so, and the output is not quantized."""
    from mapc.runtime.quantized import check_declared
    check_declared(found.plan, view)
    kinds = view.quantized()
    if kinds:
        found.config = {k: v for k, v in found.config.items() if k != "quantization_config"}
        counts = {k: sum(1 for x in kinds.values() if x == k) for k in sorted(set(kinds.values()))}
        found.warnings.append("read dequantized: " + ", ".join(
            f"{n} {k} tensors" for k, n in counts.items()) + " (the output stores them plain "
            "unless --quantize)")


@dataclass
class _Search:
    """What the tried candidates taught, for the error when none fits."""
    errors: list[str] = field(default_factory=list)
    partial: list = field(default_factory=list)        # (spec, unplanned tensor names)
    shape_misses: list = field(default_factory=list)   # plans whose names match, shapes not

    def fail(self, source):
        if self.shape_misses:
            _check_shapes(self.shape_misses[0], source)   # raises, naming the first mismatch
        if self.partial:
            sp, extra = self.partial[0]
            raise MapcError(f"{source.path} holds {len(extra)} tensors that spec {sp.family} "
                            f"({sp.ir['file']}) does not place, e.g. {', '.join(extra[:3])}; "
                            f"converting would drop them",
                            hint="use a spec that covers them (--spec FILE.map), or fix the "
                                 "spec")
        detail = "; ".join(self.errors[-3:]) if self.errors else \
            "no spec has a layout for this format"
        raise MapcError(f"cannot match {source.path} ({source.format}) to a spec: {detail}; "
                        f"pass --spec FILE.map, or --config CONFIG.json if the checkpoint lacks "
                        f"its model config")


# ---- which specs to try -------------------------------------------------------------------------
def candidate_specs(source, spec, config, allow_spec_change: bool = False) -> list[Spec]:
    """The spec given, else the one mapc recorded, else the shipped specs that have the
    source's layout and whose match lines admit the config."""
    if spec is not None:
        sp = load_spec(spec)
        _same_as_recorded(sp, source, allow_spec_change, given=True)
        return [sp]
    if source.record.get("family"):
        sp = spec_from_record(source.record, str(source.path))
        if sp is None:          # a record from before mapc kept the spec: find it by family
            family = source.record["family"]
            if family not in builtin_specs():
                raise MapcError(f"{source.path} was written with spec {family!r}, which is not "
                                f"shipped, and its record holds no copy of it",
                                hint="pass --spec FILE.map with the spec that wrote it")
            sp = load_spec(family)
            _same_as_recorded(sp, source, allow_spec_change, given=False)
        return [sp]
    paths = sorted(p for name, p in builtin_specs().items() if name != GENERIC)
    if config and config.get("model_type") is not None:
        # compiling a spec costs ~0.1 s: skip those whose match lines rule the config out
        paths = [p for p in paths if may_match(p.read_text(), config)] or paths
    elif not config:
        # no config to match (e.g. a DeepSpeed checkpoint, which saves none): skip the specs
        # none of whose fixed tensor names the checkpoint holds
        names = {n for c in source.coords() for n in source.names(c)}
        paths = [p for p in paths if may_describe(p.read_text(), names)] or paths
    specs = [load_spec(p) for p in paths]
    specs = [s for s in specs if source.layout in s.layout_names()]
    if config and config.get("model_type") is not None:
        matching = [s for s in specs if s.matches() and all(m.admits(config)
                                                            for m in s.matches())]
        if not matching:
            known = sorted({v for s in specs for m in s.matches() for v in m.values})
            raise MapcError(f"no shipped spec describes model_type "
                            f"{config.get('model_type')!r} (in {source.path})",
                            hint="shipped model types: " + ", ".join(map(str, known))
                                 + "; write a spec for it and pass --spec FILE.map")
        return matching
    return specs


def _same_as_recorded(sp: Spec, source, allow: bool, given: bool) -> None:
    """Refuse a spec other than the one that wrote ``source`` (by sha256), unless allowed."""
    recorded = recorded_sha256(source.record)
    if recorded is None or recorded == sp.sha256:
        return
    what = (f"spec {sp.family} ({sp.ir['file']}, sha256 {sp.sha256[:12]}) is not the spec that "
            f"wrote {source.path} (sha256 {recorded[:12]}, in its record)")
    if allow:
        source.warnings.append(what + "; used anyway (--allow-spec-change)")
        return
    fix = ("leave out --spec to read it with the spec its record carries, or " if given and
           spec_from_record(source.record, str(source.path)) is not None else "")
    raise MapcError(what + "; reading it with another spec can misplace tensors silently",
                    hint=fix + "pass --allow-spec-change if the change is intended")


_FIXED_NAME = re.compile(r'"([A-Za-z_][\w.]*\.[\w.]+)"')


def may_describe(text: str, names: set) -> bool:
    """A cheap look at a spec's text before compiling it: False only when the spec names
    tensors without placeholders (``"model.norm.weight"``) and the checkpoint holds none of
    them (then no layout of the spec can place its tensors). A spec that extends another also
    has its base's names, which its own text does not show: it is always kept."""
    if "extends" in text:
        return True
    fixed = set(_FIXED_NAME.findall(text))
    return not fixed or bool(fixed & names)


def may_match(text: str, config: dict) -> bool:
    """A cheap look at a spec's ``match`` lines (its header, parsed without compiling the
    spec): False only when one plainly excludes the config; the compiled spec decides the
    rest (and reports a header that does not parse)."""
    rules = match_rules(text)
    return rules is None or not any(m.excludes(config) for m in rules)


# ---- config symbols and layout parameters a format's metadata states -----------------------------
def _absent_variants(sp: Spec, config: dict, search) -> list[dict]:
    """The config envs to try on a checkpoint: the config's own values first, then with the
    symbols declared ``absent V`` at V (the checkpoint may lack what the config counts: a
    saver that keeps a layer count in the config but drops those layers' weights).
    A `require` refusing one variant only drops that one."""
    names = [c["name"] for c in sp.ir["config"] if c.get("absent") is not None]
    out = []
    for n in range(len(names) + 1):
        for chosen in itertools.combinations(names, n):
            try:
                env = bind_config(sp, config, frozenset(chosen))
            except MapcError as e:
                if not out and n == len(names):
                    raise
                search.errors.append(f"{sp.family}: {e}")
                continue
            if all(env != o for o in out):
                out.append(env)
    return out


def invert_meta(spec: Spec, layout: str, meta: dict) -> tuple[dict, dict]:
    """Config symbols and layout params that a format's metadata states directly."""
    syms = {c.name for c in spec.config_symbols()}
    params = {p.name for p in spec.layout_params(layout)}
    env, found_params = {}, {}
    for m in spec.layout_meta(layout):
        if m.key not in meta or meta[m.key] is None:
            continue
        for name, value in _inverted(m.expr, meta[m.key]):
            if name in syms:
                env[name] = value
            elif name in params:
                found_params[name] = value
    return env, found_params


def _inverted(e, value) -> list[tuple[str, object]]:
    """(symbol, value) pairs a metadata value states directly: the expression is a symbol,
    or one under ``not``, a type conversion, ``+``/``-`` of a number, or a list of such
    (Megatron's ``window_size = [window - 1, 0]``); anything else states nothing."""
    if e[0] == "sym":
        return [(e[1], value)]
    if e[0] == "op" and e[1] == "not" and len(e) == 3 and isinstance(value, bool):
        return _inverted(e[2], not value)
    if e[0] == "call" and e[1] in ("float", "int") and len(e) == 3:
        return _inverted(e[2], value)     # a type conversion on write reads back as the value
    if e[0] == "op" and e[1] in ("+", "-") and len(e) == 4 and e[3][0] == "num" and \
            isinstance(value, (int, float)) and not isinstance(value, bool):
        c = e[3][1]
        return _inverted(e[2], value - c if e[1] == "+" else value + c)
    if e[0] == "list" and isinstance(value, (list, tuple)) and len(value) == len(e) - 1:
        return [pair for item, v in zip(e[1:], value) for pair in _inverted(item, v)]
    return []


def boolean_guesses(sp: Spec, stated: dict) -> list[dict]:
    """Boolean config symbols a format's metadata does not state (e.g. tied embeddings in
    GGUF, which only shows as a missing output tensor): their default first, then the rest."""
    flags = [(c.name, c.boolean_default) for c in sp.config_symbols()
             if c.name not in stated and c.boolean_default is not None]
    guesses = [{}]
    for name, default in flags[:3]:
        guesses += [g | {name: not default} for g in guesses]
    return guesses


def param_candidates(param: LayoutParam, env: dict) -> list:
    """Values to try for a layout parameter the checkpoint does not state: its choices, both
    booleans, or small powers of two for a number (e.g. a KV replication factor, which only
    shows in shapes). The default (computed on the config ``env`` if the spec says how) comes
    first."""
    default = param_default(param.as_ir(), env)
    if len(param.choices) > 1:
        return [default] + [c for c in param.choices if c != default]
    if isinstance(default, bool):
        return [default, not default]
    if isinstance(default, int):
        return [default] + [2 ** k for k in range(7) if 2 ** k != default]
    return [default]


def _constructed_config(spec: Spec, env: dict) -> dict:
    out = {}
    if "hf" in spec.layout_names():
        out.update(meta_values(spec.layout("hf"), env))
    out.update(config_from_env(spec, env))
    return out


def _resolve_params(sp: Spec, source, env, canonical, given, search: _Search):
    """Try the layout parameters the checkpoint does not state; the plan whose names and
    shapes match the checkpoint exactly wins."""
    free = [p for p in sp.layout_params(source.layout) if p.name not in given]
    tried = []
    for combo in itertools.product(*(param_candidates(p, env) for p in free)):
        trial = dict(given)
        trial.update({p.name: v for p, v in zip(free, combo)})
        try:
            plan = plan_layout(sp, source.layout, env, source.topology, trial,
                               vpp=getattr(source, "vpp", 1))
        except MapcError as e:
            search.errors.append(f"{sp.family} {trial}: {e}")
            continue
        tried.append(trial)
        if _plan_matches(plan, source):
            extra = _unplanned(plan, source)
            if not extra:
                if not _shapes_match(plan, source):
                    search.shape_misses.append(plan)
                    continue
                notes = _ambiguity(sp, source, env, trial, free, plan)
                return Resolved(source, sp, env, canonical, plan,
                                notes + list(getattr(source, "warnings", [])))
            search.partial.append((sp, extra))
    if tried and not any(p is sp for p, _ in search.partial):
        plan = plan_layout(sp, source.layout, env, source.topology, tried[0],
                           vpp=getattr(source, "vpp", 1))
        missing = _missing(plan, source)
        if missing:
            search.errors.append(f"{sp.family}: the checkpoint lacks {len(missing)} expected "
                                 f"tensors, e.g. {missing[0]}")
    return None


def _ambiguity(sp, source, env, chosen: dict, free: list[LayoutParam], plan) -> list[str]:
    """Other values of the guessed parameters that fit the checkpoint just as well but would
    read it differently (e.g. NxD trn1 vs trn2 replication): say which one was taken."""
    notes = []
    for p in free:
        for value in param_candidates(p, env):
            if value == chosen[p.name]:
                continue
            trial = dict(chosen, **{p.name: value})
            try:
                other = plan_layout(sp, source.layout, env, source.topology, trial,
                                    vpp=getattr(source, "vpp", 1))
            except MapcError:
                continue
            if not (_plan_matches(other, source) and not _unplanned(other, source)
                    and _shapes_match(other, source)):
                continue
            if _reads_the_same(plan, other):
                continue
            notes.append(f"this checkpoint also fits {p.name}={value!r}, which would read it "
                         f"differently; took {p.name}={chosen[p.name]!r} (pass "
                         f"--source-set {p.name}=VALUE to choose)")
    return notes


def _reads_the_same(a, b, limit: int = 1 << 21) -> bool:
    """Do two plans map the same physical tensors to the same logical elements? Checked with
    index probes through both recipes (only for tensors up to ``limit`` elements)."""
    from mapc.runtime.backends import get_backend
    be = get_backend("numpy")

    def key(plan):
        return {(c, n): (inst, rc) for inst in plan.instances for rc, c, n in inst.shards}
    ka, kb = key(a), key(b)
    if ka.keys() != kb.keys():
        return False
    for k, (ia, rca) in ka.items():
        ib, rcb = kb[k]
        if ia.recipe == ib.recipe and rca == rcb:
            continue
        shapes = {m: a.logical[key_].shape for m, key_ in ia.members.items()}
        if sum(int(np.prod(s)) for s in shapes.values()) > limit:
            return False
        probe, start = {}, 0
        for m, shape in shapes.items():
            n = int(np.prod(shape))
            probe[m] = np.arange(start, start + n, dtype=np.int64).reshape(shape)
            start += n
        pb = {m: probe[m] for m in ib.members}
        if set(ia.members.values()) != set(ib.members.values()):
            return False
        if not np.array_equal(ia.recipe.shard(be, probe, dict(rca)),
                              ib.recipe.shard(be, pb, dict(rcb))):
            return False
    return True


# ---- plan against checkpoint (names and shapes only) --------------------------------------------
def _plan_matches(plan: LayoutPlan, source) -> bool:
    planned: dict[tuple, set] = {}
    for _, c, name in plan.placements():
        planned.setdefault(coord_key(c), set()).add(name)
    have = {coord_key(c): c for c in source.coords()}
    if set(planned) != set(have):
        return False
    return all(names <= set(source.names(have[k])) for k, names in planned.items())


def _shapes_match(plan, source) -> bool:
    return all(tuple(source.shape(name, coord)) == inst.recipe.shape_at(coord)
               for inst, coord, name in plan.placements())


def _missing(plan, source):
    out = []
    for inst, coord, name in plan.placements():
        if name not in set(source.names(coord)):
            out.append(f"{name} in {source.describe_coord(coord)}")
    return out


def _unplanned(plan, source):
    planned = {(coord_key(c), n) for _, c, n in plan.placements()}
    return [n for c in source.coords() for n in source.names(c)
            if (coord_key(c), n) not in planned]


def _check_shapes(plan, source):
    for inst, coord, name in plan.placements():
        got = tuple(source.shape(name, coord))
        if got != inst.recipe.shape_at(coord):
            raise MapcError(f"{name} has shape {list(got)} but the config and spec give "
                            f"{list(inst.recipe.shape_at(coord))} ({inst.rule['at']})",
                            where=f"{source.path} {source.describe_coord(coord)}",
                            hint="the config does not describe this checkpoint; pass the right "
                                 "--config")
