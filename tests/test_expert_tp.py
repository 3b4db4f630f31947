"""The ranks of an ``etp`` layout (mapc.compiler.plan.expert_ranks) against megatron-core's own
rank generators (parallel_state.RankGenerator, the objects initialize_model_parallel builds its
groups from, in its default "tp-cp-ep-dp-pp" order): for many tp / ep / etp / world sizes, the
ranks of expert data-parallel rank 0 (the ranks Megatron's torch format saves from) have exactly
the (tp, ep, etp) ranks mapc places files on, one file each. Pure Python: no processes."""
from __future__ import annotations

from math import lcm

import pytest

from mapc.compiler.plan import expert_ranks

ORDER = "tp-cp-ep-dp-pp"


def rank_of(groups) -> dict[int, int]:
    """global rank -> its position in its group (its rank along that parallel axis)."""
    return {r: i for g in groups for i, r in enumerate(g)}


def megatron_saving_ranks(tp, ep, etp, pp, world):
    ps = pytest.importorskip("megatron.core.parallel_state")
    dense = ps.RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order=ORDER)
    expert = ps.RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1,
                              order=ORDER)
    t, p = rank_of(dense.get_ranks("tp")), rank_of(dense.get_ranks("pp"))
    e, x = rank_of(expert.get_ranks("ep")), rank_of(expert.get_ranks("tp"))
    edp = rank_of(expert.get_ranks("dp"))
    return sorted((t[r], p[r], e[r], x[r]) for r in range(world) if edp[r] == 0)


@pytest.mark.parametrize("tp, ep, etp", [(2, 2, 1), (2, 4, 1), (4, 2, 2), (4, 4, 1), (2, 2, 2),
                                         (4, 1, 4), (8, 4, 2), (4, 8, 2), (2, 3, 1)])
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("dp_factor", [1, 2])
def test_mapcs_expert_grid_is_the_ranks_megatron_saves_from(tp, ep, etp, pp, dp_factor):
    world = pp * lcm(tp, etp * ep) * dp_factor
    theirs = megatron_saving_ranks(tp, ep, etp, pp, world)
    ours = sorted((t, p, e, x) for p in range(pp) for t, e, x in expert_ranks(tp, ep, etp))
    assert ours == theirs
    # one file per (tp, pp, ep): the etp rank follows from the others
    assert len({(t, p, e) for t, p, e, _ in ours}) == len(ours)


@pytest.mark.parametrize("tp, ep, etp", [(4, 2, 1), (2, 1, 1), (8, 2, 2)])
def test_grids_mapc_refuses_lose_tp_ranks_in_megatron(tp, ep, etp):
    """etp * ep < tp: megatron-core's saving ranks miss some tensor-parallel ranks (their
    attention shards would be in no file), which is why mapc refuses such a grid."""
    from mapc.compiler.plan import expert_rank_filter
    from mapc.errors import MapcError
    theirs = megatron_saving_ranks(tp, ep, etp, 1, lcm(tp, etp * ep))
    assert {t for t, *_ in theirs} == set(range(etp * ep)) != set(range(tp))
    with pytest.raises(MapcError, match=f"only the tp ranks below etp \\* ep = {etp * ep}"):
        expert_rank_filter({"tp": tp, "ep": ep, "etp": etp}, "megatron")
