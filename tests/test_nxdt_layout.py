"""NxD Training GQA layouts (kv_size_multiplier, fused QKV) against the formulas of LAYOUTS.md,
implemented independently here."""
from __future__ import annotations

import numpy as np
import pytest

from mapc.compiler.plan import bind_config, plan_layout
from mapc.compiler.spec import load_spec
from mapc.runtime.backends import get_backend
from tests.conftest import llama_config

NH, NG, HD, H = 8, 2, 4, 8


def q_reorder(q, m):
    """Rows (ng, m, nh/(ng*m), hd) -> (m, ng, nh/(ng*m), hd)."""
    return q.reshape(NG, m, NH // (NG * m), HD, -1).transpose(1, 0, 2, 3, 4).reshape(NH * HD, -1)


def expected_shards(w, m, tp, fuse):
    q, k, v, o = w["q"], w["k"], w["v"], w["o"]
    qs = np.split(q_reorder(q, m), tp)
    ks, vs = np.split(np.tile(k, (m, 1)), tp), np.split(np.tile(v, (m, 1)), tp)
    os_ = np.split(q_reorder(o.T, m).T, tp, axis=1)
    if fuse:
        return {"qkv": [np.concatenate([a, b, c]) for a, b, c in zip(qs, ks, vs)], "o": os_}
    return {"q": qs, "k": ks, "v": vs, "o": os_}


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return {"q": rng.standard_normal((NH * HD, H)).astype(np.float32),
            "k": rng.standard_normal((NG * HD, H)).astype(np.float32),
            "v": rng.standard_normal((NG * HD, H)).astype(np.float32),
            "o": rng.standard_normal((H, NH * HD)).astype(np.float32)}


NAMES = {"q": "qkv_proj.weight_q", "k": "qkv_proj.weight_k", "v": "qkv_proj.weight_v",
         "qkv": "qkv_proj.weight_qkv", "o": "o_proj.weight"}


@pytest.mark.parametrize("m,tp", [(1, 1), (1, 2), (2, 4), (4, 8)])
@pytest.mark.parametrize("fuse", [False, True])
def test_kv_replication_and_query_reorder_match_the_formulas(weights, m, tp, fuse):
    spec = load_spec("llama")
    if "nxdt" not in spec.layout_names():
        pytest.skip("no nxdt layout")
    cfg = llama_config(hidden=H, layers=1, heads=NH, groups=NG, head_dim=HD, ffn=8, vocab=16)
    plan = plan_layout(spec, "nxdt", bind_config(spec, cfg), {"tp": tp},
                       {"kv_size_multiplier": m, "fuse_qkv": fuse})
    be = get_backend("numpy")
    want = expected_shards(weights, m, tp, fuse)
    logical = {"layer.q[0]": weights["q"], "layer.k[0]": weights["k"],
               "layer.v[0]": weights["v"], "layer.o[0]": weights["o"]}
    checked = set()
    for inst in plan.instances:
        kind = next((k for k, n in NAMES.items() if inst.first_name().endswith(n)), None)
        if kind is None:
            continue
        members = {mem: logical[key] for mem, key in inst.members.items()}
        shards = {}
        for rc, copies in inst.by_recipe_coord().items():
            shard = inst.recipe.shard(be, members, dict(rc))
            for coord, _ in copies:
                np.testing.assert_array_equal(shard, want[kind][dict(coord)["tp"]])
            shards[rc] = shard
        checked.add(kind)
        complaints = []
        back = inst.recipe.gather(be, shards, None, lambda mem, ok: complaints.append(ok))
        for mem, key in inst.members.items():
            np.testing.assert_array_equal(back[mem], logical[key])
        assert all(complaints)
    assert checked == ({"qkv", "o"} if fuse else {"q", "k", "v", "o"})


def test_differing_kv_replicas_are_reported(weights):
    spec = load_spec("llama")
    if "nxdt" not in spec.layout_names():
        pytest.skip("no nxdt layout")
    cfg = llama_config(hidden=H, layers=1, heads=NH, groups=NG, head_dim=HD, ffn=8, vocab=16)
    plan = plan_layout(spec, "nxdt", bind_config(spec, cfg), {"tp": 4},
                       {"kv_size_multiplier": 2})
    inst = next(i for i in plan.instances if i.first_name().endswith("weight_k"))
    be = get_backend("numpy")
    shards = {rc: inst.recipe.shard(be, {"k": weights["k"]}, dict(rc)).copy()
              for rc in inst.recipe.coords()}
    shards[next(iter(sorted(shards)))[:]] *= 1  # unchanged
    last = sorted(shards)[-1]
    shards[last] = shards[last] + 1.0           # corrupt one replica
    verdicts = []
    inst.recipe.gather(be, shards, None, lambda mem, ok: verdicts.append(ok))
    assert verdicts == [False]


@pytest.mark.parametrize("m,tp", [(2, 4), (4, 8)])
def test_trn2_blocked_replication(weights, m, tp):
    """trn2: K/V tiled in blocks (K0 K0 .. K1 K1 ..), queries and o_proj in natural order."""
    spec = load_spec("llama")
    cfg = llama_config(hidden=H, layers=1, heads=NH, groups=NG, head_dim=HD, ffn=8, vocab=16)
    plan = plan_layout(spec, "nxdt", bind_config(spec, cfg), {"tp": tp},
                       {"kv_size_multiplier": m, "hw_backend": "trn2"})
    be = get_backend("numpy")
    want = {"q": np.split(weights["q"], tp), "o": np.split(weights["o"], tp, axis=1),
            "k": np.split(np.repeat(weights["k"].reshape(NG, HD, H), m, axis=0)
                          .reshape(-1, H), tp)}
    for inst in plan.instances:
        kind = next((k for k, n in NAMES.items() if inst.first_name().endswith(n)), None)
        if kind not in want:
            continue
        x = {"q": weights["q"], "k": weights["k"], "o": weights["o"]}[kind]
        mem = next(iter(inst.members))
        for rc, copies in inst.by_recipe_coord().items():
            shard = inst.recipe.shard(be, {mem: x}, dict(rc))
            for coord, _ in copies:
                np.testing.assert_array_equal(shard, want[kind][dict(coord)["tp"]])
