"""Recipes directly: shard/gather are exact inverses, also with two mesh axes and padding."""
from __future__ import annotations

import numpy as np
import pytest

from mapc.compiler.plan import bind_config, plan_layout
from mapc.compiler.spec import compile_text
from mapc.runtime.backends import get_backend

TWO_AXES = """
family grid
config {
    rows: rows
    cols: cols
    vocab: vocab
}
tensors {
    w: rows cols
    e: vocab cols
}
layout sharded {
    mesh tp ep
    "w" = w split cols over tp split rows over ep
    "e" = e pad vocab to multiple of 8 * tp split vocab over tp
}
"""


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 3), (3, 2), (6, 1)])
def test_shard_gather_round_trip_with_two_mesh_axes(backend, tp, ep):
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "jax": "jax"}[backend])
    be = get_backend(backend)
    spec = compile_text(TWO_AXES, "grid.map")
    env = bind_config(spec, {"rows": 6, "cols": 12, "vocab": 13})
    plan = plan_layout(spec, "sharded", env, {"tp": tp, "ep": ep})
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 12)).astype(np.float32)
    e = rng.standard_normal((13, 12)).astype(np.float32)
    for inst in plan.instances:
        x = {"w": w, "e": e}[inst.rule["refs"][0]["member"]]
        name = inst.rule["refs"][0]["member"]
        shards = {c: inst.recipe.shard(be, {name: be.from_numpy(x)}, dict(c))
                  for c in inst.recipe.coords()}
        if name == "w":  # rank (tp=t, ep=p) holds rows block p, cols block t
            for c, s in shards.items():
                d = dict(c)
                want = np.split(np.split(w, ep, axis=0)[d["ep"]], tp, axis=1)[d["tp"]]
                np.testing.assert_array_equal(be.to_numpy(s), want)
        pads = []
        back = inst.recipe.gather(be, shards, lambda m, p: pads.append(be.to_numpy(p)))
        np.testing.assert_array_equal(be.to_numpy(back[name]), x)
        assert all(not p.any() for p in pads)


UNEVEN = """
family grid
config {
    groups: groups
    per: per
    cols: cols
}
tensors {
    q: (groups per) cols
    o: cols (groups per)
}
layout sharded {
    mesh tp ep
    "q" = q  as (groups per) cols  split groups over tp unevenly  split cols over ep
    "o" = o  as cols (groups per)  split groups over tp unevenly
}
"""


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("tp,groups", [(2, 3), (3, 7), (4, 6), (3, 3), (2, 4)])
def test_uneven_split_gives_the_first_ranks_one_more(backend, tp, groups):
    # DeepSpeed AutoTP's near-even split (tp_shard.get_shard_size): rank r holds
    # groups // tp + (r < groups % tp) whole groups, in order; with an even cut on another axis
    pytest.importorskip(backend)
    be = get_backend(backend)
    spec = compile_text(UNEVEN, "grid.map")
    per, cols = 2, 4
    env = bind_config(spec, {"groups": groups, "per": per, "cols": cols})
    plan = plan_layout(spec, "sharded", env, {"tp": tp, "ep": 2})
    rng = np.random.default_rng(0)
    x = {"q": rng.standard_normal((groups * per, cols)).astype(np.float32),
         "o": rng.standard_normal((cols, groups * per)).astype(np.float32)}
    sizes = [groups // tp + (1 if r < groups % tp else 0) for r in range(tp)]
    starts = [sum(sizes[:r]) * per for r in range(tp)]
    for inst in plan.instances:
        name = inst.rule["refs"][0]["member"]
        shards = {c: inst.recipe.shard(be, {name: be.from_numpy(x[name])}, dict(c))
                  for c in inst.recipe.coords()}
        for c, s in shards.items():
            d = dict(c)
            r, rows = d["tp"], slice(starts[d["tp"]], starts[d["tp"]] + sizes[d["tp"]] * per)
            want = x["q"][rows] if name == "q" else x["o"][:, rows]
            if name == "q":
                want = np.split(want, 2, axis=1)[d["ep"]]
            np.testing.assert_array_equal(be.to_numpy(s), want)
            assert tuple(s.shape) == inst.recipe.shape_at(((a, i) for a, i in d.items()))
        back = inst.recipe.gather(be, shards)
        np.testing.assert_array_equal(be.to_numpy(back[name]), x[name])


@pytest.mark.parametrize("rule,why", [
    ('"q" = q  as (groups per) cols  split (groups per) over tp unevenly',
     "an uneven split cuts one factor"),
    ('"q" = q  as (groups per) cols  pad groups to multiple of 4  split groups over tp unevenly',
     "both padded and split unevenly"),
    ('"q" = q  as (per groups) cols  from (groups per) cols  split groups over tp unevenly',
     "needs groups outermost on its axis")])
def test_uneven_split_misuse_is_refused(rule, why):
    from mapc.errors import MapcError
    text = UNEVEN.replace('"q" = q  as (groups per) cols  split groups over tp unevenly  '
                          'split cols over ep', rule)
    with pytest.raises(MapcError, match=why):
        spec = compile_text(text, "grid.map")
        plan_layout(spec, "sharded", bind_config(spec, {"groups": 3, "per": 2, "cols": 4}),
                    {"tp": 2, "ep": 1})


def test_more_ranks_than_entries_is_refused():
    from mapc.errors import MapcError
    spec = compile_text(UNEVEN, "grid.map")
    with pytest.raises(MapcError, match="tp=4 is more than groups=3 .* none of it"):
        plan_layout(spec, "sharded", bind_config(spec, {"groups": 3, "per": 2, "cols": 4}),
                    {"tp": 4, "ep": 1})
