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
