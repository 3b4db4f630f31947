"""Programs: ``inverse(source layout) ∘ target layout`` for one config and two topologies.

A program is a list of *units*. A unit is the smallest set of logical tensors that physical
tensors tie together (the q, k, v of one layer when either side fuses them); executing it
reads the unit's source shards, rebuilds its logical tensors with the source recipes'
``gather``, and builds every target shard with the target recipes' ``shard``. Units are
executed one at a time, so memory is bounded by the largest unit, not by the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mapc.compiler.plan import Instance, LayoutPlan


@dataclass
class Unit:
    keys: list[str]                       # logical tensors, in declaration order
    sources: list[Instance]               # source instances that read them (primary first)
    targets: list[Instance]


@dataclass
class Program:
    source: LayoutPlan
    target: LayoutPlan
    units: list[Unit] = field(default_factory=list)

    def target_files(self) -> dict[tuple, list[tuple[str, Instance]]]:
        """Physical tensors per target mesh coordinate (one checkpoint file each)."""
        out: dict[tuple, list] = {}
        for inst, coord, name in self.target.placements():
            out.setdefault(coord, []).append((name, inst))
        return dict(sorted(out.items(), key=lambda kv: tuple(i for _, i in kv[0])))

    def target_groups(self, source_groups: list[list[str]]) -> dict[tuple, int]:
        """Optimizer param-group index of every target physical tensor, by (coord, name).

        ``source_groups[g]`` lists the source's physical tensor names in group ``g`` (e.g.
        DeepSpeed's ``param_shapes`` order). A target tensor joins the group of the first
        source tensor that shares one of its logical tensors; one that shares none (cannot
        happen in a checked program) falls back to group 0. Names only: no tensor is read."""
        group_of_source = {n: g for g, names in enumerate(source_groups) for n in names}
        group_of_logical: dict[str, int] = {}
        for inst in self.source.instances:
            for _, _, name in inst.shards:
                g = group_of_source.get(name)
                if g is None:
                    continue
                for key in inst.members.values():
                    group_of_logical.setdefault(key, g)
        out: dict[tuple, int] = {}
        for inst, coord, name in self.target.placements():
            groups = [group_of_logical[k] for k in inst.members.values() if k in group_of_logical]
            out[(coord, name)] = min(groups) if groups else 0
        return out

    def stateless_keys(self, reader) -> dict[str, str]:
        """Logical tensors without optimizer state (every source shard of them is stateless
        in ``reader``: a frozen parameter or a buffer), with their kind."""
        out = {}
        for inst in self.source.instances:
            kinds = [reader.stateless(c).get(n) for _, c, n in inst.shards]
            if kinds and all(kinds):
                for key in inst.members.values():
                    out[key] = kinds[0]
        return out

    def stateless_targets(self, reader) -> dict[tuple, str]:
        """Target tensors (coord, name) without optimizer state, with their kind."""
        keys = self.stateless_keys(reader)
        return {(c, n): keys[next(iter(inst.members.values()))]
                for inst, c, n in self.target.placements()
                if all(k in keys for k in inst.members.values())}

    @staticmethod
    def _shard_label(inst: Instance, rc) -> str:
        """Which slice of the recipe a physical tensor is: its mesh ranks and each-indices."""
        if rc is None:
            return ""
        axes, names = inst.recipe.place(rc)
        parts = [f"{a}={i}" for a, i in axes.items()] + [f"{v}={i}" for v, i in names.items()]
        return f"[{','.join(parts)}]" if parts else ""

    @staticmethod
    def _sum_note(inst: Instance, coord) -> str:
        """``sum over`` tensors: rank 0 of the summed axes holds the value, the others zeros."""
        if not inst.summed:
            return ""
        axes = " ".join(inst.summed)
        return f"  # sum over {axes}: " + ("value" if inst.is_share_holder(coord) else "zeros")

    def pretty(self, file_names=None) -> str:
        """The program as text: recipes once each, then every output shard's tensors."""
        lines = [f"program {self.source.spec.family}: {self.source.describe()} -> "
                 f"{self.target.describe()}",
                 f"  units: {len(self.units)}, logical tensors: {len(self.source.logical)}"]
        recipes: dict[int, tuple[str, object]] = {}
        for inst in self.target.instances:
            rid = id(inst.recipe)
            if rid not in recipes:
                recipes[rid] = (f"R{len(recipes)}", inst.recipe)
        lines.append("")
        for label, recipe in recipes.values():
            body = recipe.describe()
            lines.append(f"{label} = {body[0]}")
            lines += ["  " + x for x in body[1:]]
        where_of: dict[int, dict] = {}      # id(inst) -> {(coord, name): recipe coordinate}
        for coord, tensors in self.target_files().items():
            where = file_names(coord) if file_names else \
                " ".join(f"{a}={i}" for a, i in coord) or "single shard"
            lines.append("")
            lines.append(f"shard {where}:")
            for name, inst in tensors:
                label = recipes[id(inst.recipe)][0]
                if id(inst) not in where_of:
                    places = where_of[id(inst)] = {}
                    for rc, c, n in inst.shards:
                        places.setdefault((c, n), rc)
                args = ", ".join(inst.members.values())
                lines.append(f"  {name} {list(inst.recipe.shape_at(coord))} = {label}({args})"
                             + self._shard_label(inst, where_of[id(inst)].get((coord, name)))
                             + ("  # copy" if inst.copy else "")
                             + _value_note(inst)
                             + self._sum_note(inst, coord))
        return "\n".join(lines)


def _value_note(inst: Instance) -> str:
    """``value 1 + x`` tensors: the file stores the map of the logical value."""
    vmap = getattr(inst, "value", None)
    return f"  # {vmap.describe()}" if vmap is not None else ""


def compile_program(source: LayoutPlan, target: LayoutPlan) -> Program:
    if source.logical.keys() != target.logical.keys():
        raise ValueError("source and target plans were built for different configs")
    parent = {k: k for k in source.logical}

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for plan in (source, target):
        for inst in plan.instances:
            keys = list(inst.members.values())
            for k in keys[1:]:
                parent[find(k)] = find(keys[0])
    order = {k: n for n, k in enumerate(source.logical)}
    units: dict[str, Unit] = {}
    for k in source.logical:
        units.setdefault(find(k), Unit([], [], [])).keys.append(k)
    for plan, attr in ((source, "sources"), (target, "targets")):
        for inst in sorted(plan.instances, key=lambda i: i.copy):
            root = find(next(iter(inst.members.values())))
            getattr(units[root], attr).append(inst)
    ordered = sorted(units.values(), key=lambda u: order[u.keys[0]])
    return Program(source, target, ordered)
