"""Optimizer param groups follow tensors through a program (Program.target_groups)."""
from __future__ import annotations

import pytest

import mapc
from conftest import hf_names_shapes, llama_config


@pytest.mark.parametrize("layout,tp,pp", [("megatron", 2, 2), ("hf", None, None)])
def test_norms_group_reaches_every_target_norm(layout, tp, pp):
    cfg = llama_config(layers=4)
    hf_names = list(hf_names_shapes(cfg))
    norms = [n for n in hf_names if n.endswith("norm.weight")]
    rest = [n for n in hf_names if n not in norms]
    program = mapc.compile_spec("llama", layout=layout, config=cfg, tp=tp, pp=pp)
    groups = program.target_groups([rest, norms])
    targets = {(coord, name) for _, coord, name in program.target.placements()}
    assert set(groups) == targets
    in_norm_group = {key for key, g in groups.items() if g == 1}
    # every target tensor built only from norm weights, and nothing else, is in group 1
    expected = {(coord, name) for inst, coord, name in program.target.placements()
                if all("norm" in k for k in inst.members.values())}
    assert in_norm_group == expected
    assert len(expected) >= (2 if layout == "megatron" else 9)
    if layout == "hf":
        assert {name for _, name in in_norm_group} == set(norms)
