"""Optimizer state travels through every training format and comes back bit for bit.

A real DeepSpeed ZeRO-1 run (two param groups, odd shapes that need padding, trained 3 steps at
DP=2) goes through each format that stores optimizer state, at a different topology, and back
to DeepSpeed at DP=2. Every slot (fp32 master weights, exp_avg, exp_avg_sq) must equal what
DeepSpeed itself gathered from the live run (safe_get_full_fp32_param /
safe_get_full_optimizer_state), and the step and param groups must survive.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)

import mapc  # noqa: E402
from mapc.runtime.containers import open_source  # noqa: E402
from tests.groundtruth import deepspeed_ckpt as ds  # noqa: E402

SLOT_KEY = {"master": "fp32", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}

# (format, conversion options) of the intermediate checkpoint
VIA = {
    "universal": dict(to="universal"),
    "neox-pp2-dp3": dict(to="neox", pp=2, dp=3),
    "megatron-tp3-pp2": dict(to="megatron", tp=3, pp=2),
    "hf-trainer": dict(to="hf", with_optimizer=True),
    "dcp": dict(to="dcp"),
    "deepspeed-dp1": dict(to="deepspeed", dp=1),
}


@pytest.mark.parametrize("via", list(VIA))
def test_optimizer_state_survives_a_trip_through(via, make, tmp_path):
    src = make("z1")
    mid, back = tmp_path / via, tmp_path / "back"
    mapc.convert(src, mid, **VIA[via])
    mapc.convert(mid, back, to="deepspeed", dp=2)
    with open_source(back) as b, open_source(src) as s:
        assert b.names() == s.names()
        for slot, key in SLOT_KEY.items():
            live = ds.load_state(src, key)           # DeepSpeed's own gathered full state
            for name in s.names():
                np.testing.assert_array_equal(b.read(name, slot=slot), live[name],
                                              err_msg=f"{via}: {name}/{slot}")
        tb, ts = b.training_state(), s.training_state()
        assert tb["step"] == ts["step"] == 3.0
        assert [sorted(g["params"]) for g in tb["param_groups"]] == \
            [sorted(g["params"]) for g in ts["param_groups"]]
        assert [g["weight_decay"] for g in tb["param_groups"]] == [0.1, 0.0]
