"""Recipes: the fused chain of layout ops that builds one physical tensor shard from logical
tensors (``shard``) and its exact inverse (``gather``).

A rule's pattern factors every physical axis into named factors, one of which may be a
concatenation of several logical tensors. Splitting a factor over a mesh axis replaces it by
``(mesh, size / mesh)``; rank ``r`` holds the slice where ``mesh == r``. For each member the
whole chain (reshape into factors, pad, split, rearrange, select the rank) is a fixed list of
view ops, compiled once per shape and reused for every layer with that shape. Executed, it is
one copy per output shard.

An uneven split (``split F over tp unevenly``, tp not dividing F) gives rank ``r``
``F // tp + (1 if r < F % tp)`` entries of F: the chain works on F padded to ``tp * m``
(``m`` the largest share) with each short rank's block padded at its end (``scatter``), and the
shard is then cut to the rank's share (``ragged``); gather pads each shard back and drops the
blocks' padding again.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from math import prod

CONCAT = "[]"


def index_product(axes):
    """Every combination of indices of ``axes`` ((name, size), ...), as ((name, i), ...)."""
    names = [a for a, _ in axes]
    for idx in itertools.product(*(range(n) for _, n in axes)):
        yield tuple(zip(names, idx))


@dataclass(frozen=True)
class Factor:
    name: str                  # factor name; CONCAT for the concatenation; mesh factors are
                               # named after their axis ("tp", "tp#1") or "@var" for `each`
    size: int                  # size in one shard (after padding and splitting)
    true: int                  # whole size before padding
    full: int                  # whole size after padding (== true when not padded)
    mesh: bool = False         # selected per shard: a mesh (sub-)axis or an `each` index
    axis: str | None = None    # the mesh axis this factor cuts (None for `each`)
    stride: int = 1            # mesh rank = sum(index * stride) over the axis's factors
    var: str | None = None     # for `each`: the name variable bound to the index
    repeat: bool = False       # a replication factor: absent from the logical tensor
    gone: bool = False         # unstacked by `each`: an axis made only of these disappears
    uneven: bool = False       # split unevenly: `full` is tp blocks of the largest share


@dataclass(frozen=True)
class MemberPlan:
    name: str
    logical_shape: tuple[int, ...]
    pre: tuple[int, ...]               # logical view with padded factors at their true size
    pads: tuple[tuple[int, int], ...]  # (axis in pre, amount)
    split: tuple[int, ...]             # shape after splitting factors into (mesh, rest)
    perm: tuple[int, ...]              # split view (+ repeats) -> physical factor order
    offset: int                        # start along the concatenation factor
    width: int                         # this member's size along the concatenation factor
    expand: tuple[int, ...] = ()       # sizes of repeat factors broadcast after the split view
    scatter: tuple = ()                # ((axis in pre, per-rank sizes, block), ...): uneven
                                       # splits, each rank's block padded at its end


def _scatter(be, x, axis, sizes, block):
    """Spread ``sizes[r]`` entries of ``axis`` into block ``r`` of ``len(sizes) * block``."""
    pieces, start = [], 0
    for s in sizes:
        p = be.slice(x, axis, start, start + s)
        pieces.append(be.pad(p, axis, block - s) if s < block else p)
        start += s
    return be.concat(pieces, axis)


def _unscatter(be, x, axis, sizes, block):
    return be.concat([be.slice(x, axis, r * block, r * block + s)
                      for r, s in enumerate(sizes)], axis)


@dataclass(frozen=True)
class Recipe:
    """How one rule builds its shards, for concrete sizes."""
    label: str
    factors: tuple[Factor, ...]        # physical factor order, mesh factors included
    axes: tuple[tuple[int, ...], ...]  # physical axis -> indices into factors
    members: tuple[MemberPlan, ...]
    mesh: tuple[tuple[str, int], ...]  # (mesh axis, size) of the mesh factors, in factor order
    # uneven splits: ((mesh axis, shard axis, entries per unit of the factor, per-rank
    # sizes), ...); shard_shape is then the largest rank's shape
    ragged: tuple = ()

    # -- shapes --
    @property
    def local_factors(self) -> tuple[Factor, ...]:
        return tuple(f for f in self.factors if not f.mesh)

    @cached_property
    def shard_shape(self) -> tuple[int, ...]:
        # cached (the recipe is frozen): planning a 671B MoE asks it ~300 000 times
        return tuple(prod(self.factors[k].size for k in ax if not self.factors[k].mesh)
                     for ax in self.axes
                     if not all(self.factors[k].mesh or self.factors[k].gone for k in ax))

    def shape_at(self, coord) -> tuple[int, ...]:
        """The shard shape at ``coord`` ({mesh axis: index}, or its items): shard_shape but
        for an uneven split's short ranks."""
        if not self.ragged:
            return self.shard_shape
        where = dict(coord)
        shape = list(self.shard_shape)
        for axis, k, inner, sizes in self.ragged:
            shape[k] = sizes[where.get(axis, 0)] * inner
        return tuple(shape)

    def coords(self):
        """Every combination of mesh/each indices, as tuples of (factor name, index)."""
        return index_product(self.mesh)

    def place(self, rc) -> tuple[dict, dict]:
        """Where a recipe coordinate lands: ({mesh axis: rank}, {each var: index})."""
        axes: dict = {}
        names: dict = {}
        byname = self._mesh_factors
        for name, i in rc:
            f = byname[name]
            if f.var is not None:
                names[f.var] = i
            else:
                axes[f.axis] = axes.get(f.axis, 0) + i * f.stride
        return axes, names

    @cached_property
    def _mesh_factors(self) -> dict:
        return {f.name: f for f in self.factors if f.mesh}

    def _concat_axis(self) -> int | None:
        local = [f.name for f in self.local_factors]
        return local.index(CONCAT) if CONCAT in local else None

    # -- logical -> shard --
    def shard(self, be, members: dict, coord: dict):
        """Build the shard at ``coord`` ({mesh axis: index}) from logical tensors."""
        pieces = []
        for m in self.members:
            x = be.reshape(members[m.name], m.pre)
            for axis, sizes, block in m.scatter:
                x = _scatter(be, x, axis, sizes, block)
            for axis, n in m.pads:
                x = be.pad(x, axis, n)
            x = be.reshape(x, m.split)
            if m.expand:
                x = be.broadcast(be.reshape(x, m.split + (1,) * len(m.expand)),
                                 m.split + m.expand)
            if m.perm != tuple(range(len(m.perm))):
                x = be.transpose(x, m.perm)
            # select mesh factors, innermost first so earlier axis numbers stay valid
            mesh_pos = [k for k, f in enumerate(self.factors) if f.mesh]
            for k in reversed(mesh_pos):
                x = be.index(x, k, coord[self.factors[k].name])
            pieces.append(x)
        cat = self._concat_axis()
        x = be.concat(pieces, cat) if cat is not None else pieces[0]
        x = be.reshape(x, self.shard_shape)
        for axis, k, inner, sizes in self.ragged:
            n = sizes[coord.get(axis, 0)] * inner
            if n < self.shard_shape[k]:
                x = be.slice(x, k, 0, n)
        return x

    # -- shards -> logical --
    def gather(self, be, shards: dict, check_padding=None, check_replicas=None):
        """Rebuild every member from ``shards`` ({coord tuple: array}).

        Dropped padding is passed to ``check_padding(member, array)``; for repeat factors,
        ``check_replicas(member, equal: bool)`` is told whether every copy equals the first."""
        local = self.local_factors
        local_shape = tuple(f.size for f in local)
        cat = self._concat_axis()
        out = {}
        for axis, k, inner, sizes in self.ragged:     # pad the short ranks' shards back
            shards = {c: (be.pad(s, k, self.shard_shape[k] - s.shape[k])
                          if s.shape[k] < self.shard_shape[k] else s)
                      for c, s in shards.items()}
        views = {c: be.reshape(s, local_shape) for c, s in shards.items()}
        for m in self.members:
            def piece(coord):
                v = views[coord]
                return be.slice(v, cat, m.offset, m.offset + m.width) if cat is not None else v
            x = self._assemble(be, piece)
            inv = tuple(sorted(range(len(m.perm)), key=lambda k: m.perm[k]))
            if m.perm != tuple(range(len(m.perm))):
                x = be.transpose(x, inv)
            # repeat axes come last: keep copy 0 of each, innermost first, checking the rest
            for k in reversed(range(len(m.expand))):
                axis = len(m.split) + k
                first = be.index(x, axis, 0)
                if check_replicas is not None and m.expand[k] > 1:
                    check_replicas(m.name, all(be.equal(be.index(x, axis, i), first)
                                               for i in range(1, m.expand[k])))
                x = first
            blocks = {a: len(sizes) * block for a, sizes, block in m.scatter}
            padded = tuple(blocks.get(k, s) + dict(m.pads).get(k, 0)
                           for k, s in enumerate(m.pre))
            x = be.reshape(x, padded)
            for axis, sizes, block in m.scatter:
                x = _unscatter(be, x, axis, sizes, block)
            padded = tuple(s + dict(m.pads).get(k, 0) for k, s in enumerate(m.pre))
            for axis, n in m.pads:
                if check_padding is not None:
                    check_padding(m.name, be.slice(x, axis, padded[axis] - n, padded[axis]))
                x = be.slice(x, axis, 0, padded[axis] - n)
            out[m.name] = be.reshape(x, m.logical_shape)
        return out

    def _assemble(self, be, piece):
        """Stack per-rank pieces back along their mesh factors (physical factor order).

        Iterative on purpose: a self-referencing closure would keep every source buffer of
        the unit alive until the cycle collector ran."""
        mesh_pos = [k for k, f in enumerate(self.factors) if f.mesh]
        names = [self.factors[k].name for k in mesh_pos]
        sizes = [self.factors[k].size for k in mesh_pos]
        parts = {idx: piece(tuple(zip(names, idx)))
                 for idx in itertools.product(*(range(n) for n in sizes))}
        for level in reversed(range(len(mesh_pos))):
            # arrays at this level still lack the `level` mesh axes before this one
            parts = {prefix: be.stack([parts[prefix + (i,)] for i in range(sizes[level])],
                                      mesh_pos[level] - level)
                     for prefix in itertools.product(*(range(n) for n in sizes[:level]))}
        return parts[()]

    # -- printing --
    def describe(self) -> list[str]:
        def fac(f):
            if f.mesh:
                return f"{f.name}={f.size}" if f.var is None else f"each {f.var}<{f.size}"
            if f.name == CONCAT:
                return "[" + " ".join(f"{m.name}:{m.width}" for m in self.members) + "]"
            text = f"{f.name}={f.size}"
            if f.full != f.size:
                text += f"/{f.full}"
            text += f"(uneven split of {f.true})" if f.uneven else \
                f"(padded from {f.true})" if f.full != f.true else ""
            return text + (" (repeat)" if f.repeat else "")
        axes = " ".join("(" + " ".join(fac(self.factors[k]) for k in ax) + ")"
                        if len(ax) > 1 else fac(self.factors[ax[0]]) for ax in self.axes)
        lines = [f"recipe {self.label}: {axes} -> shard {list(self.shard_shape)}"
                 + "".join(f", axis {k} unevenly over {a}: {[s * inner for s in sizes]}"
                           for a, k, inner, sizes in self.ragged)]
        for m in self.members:
            ops = [f"reshape{list(m.pre)}"]
            ops += [f"scatter(axis {a}, {list(sizes)} in blocks of {b})"
                    for a, sizes, b in m.scatter]
            ops += [f"pad(axis {a}, +{n})" for a, n in m.pads]
            blocks = {a: len(sizes) * b for a, sizes, b in m.scatter}
            if m.split != tuple(blocks.get(k, s) + dict(m.pads).get(k, 0)
                                for k, s in enumerate(m.pre)):
                ops.append(f"reshape{list(m.split)}")
            if m.expand:
                ops.append(f"broadcast{list(m.split + m.expand)}")
            if m.perm != tuple(range(len(m.perm))):
                ops.append(f"permute{list(m.perm)}")
            if self.mesh:
                ops.append("select " + ",".join(n for n, _ in self.mesh))
            lines.append(f"  {m.name}{list(m.logical_shape)}: " + " . ".join(ops)
                         + (f" -> [{m.offset}:{m.offset + m.width}]" if len(self.members) > 1
                            else ""))
        return lines
