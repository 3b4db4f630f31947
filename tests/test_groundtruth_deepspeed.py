"""Smoke tests for the DeepSpeed ground-truth harness (tests/groundtruth/deepspeed_ckpt.py).

Three real ZeRO checkpoints are trained once per session (DS_ACCELERATOR=cpu, gloo, DP=2):

* ``z1``: stage 1, fp32, two param groups, ODD_MODEL (every flat group needs padding);
* ``z2bf16``: stage 2, bf16, one group, the default model (no padding);
* ``z3``: stage 3, fp32, ODD_MODEL (per-parameter padding).

Then DeepSpeed's own tools run on them: zero_to_fp32, ds_to_universal, and a universal
resume at world size 1 and 3.  Set MAPC_DS_CACHE=DIR to keep the runs between sessions.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

# like pytest.importorskip("deepspeed"), without importing it into the test process (all
# DeepSpeed work runs in subprocesses; its import detects accelerators and logs)
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)
torch = pytest.importorskip("torch")

from tests.conftest import hf_names_shapes  # noqa: E402

pytestmark = pytest.mark.slow


def _load_harness():
    from tests.groundtruth import deepspeed_ckpt
    return deepspeed_ckpt


ds = _load_harness()

from tests.conftest import DS_CASES as CASES  # noqa: E402


def _hf_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def _torch_load(path: Path):
    # DeepSpeed pickles its own classes (fragment_address, LossScaler, ZeroStageEnum): full unpickle
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_files(make, case):
    ckpt = make(case)
    kw = CASES[case]
    meta = ds.read_expected(ckpt)
    assert (ckpt / "latest").read_text().strip() == "global_step3" == meta["tag"]
    assert len(meta["loss"]) == 3 and all(math.isfinite(x) for x in meta["loss"])
    assert meta["world_size"] == 2 and meta["stage"] == kw["stage"]
    tag = ckpt / "global_step3"
    prefix = "bf16_" if kw["dtype"] == "bf16" else ""
    optim = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    model = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
             if kw["stage"] == 3 else ["mp_rank_00_model_states.pt"])
    assert sorted(p.name for p in tag.iterdir()) == sorted(optim + model)

    sd = _torch_load(tag / optim[1])
    assert set(sd) == {"optimizer_state_dict", "ds_config", "ds_version"}
    osd = sd["optimizer_state_dict"]
    assert int(osd["zero_stage"]) == kw["stage"]
    if kw["stage"] == 3:
        assert osd["partition_count"] == 2 and len(osd["fp32_flat_groups"]) == kw["groups"]
    else:
        assert osd["partition_count"] == [2] * kw["groups"]
        assert len(osd["single_partition_of_fp32_groups"]) == kw["groups"]
        assert len(osd["param_slice_mappings"]) == kw["groups"]
    ms = _torch_load(tag / model[0])
    assert ms["dp_world_size"] == 2 and ms["mp_world_size"] == 1
    names = [n for group in ms["param_shapes"] for n in group]
    assert sorted(names) == sorted(hf_names_shapes(_hf_config(ckpt)))


@pytest.mark.parametrize("case", list(CASES))
def test_zero_to_fp32(make, case):
    ckpt = make(case)
    sd = ds.zero_to_fp32(ckpt)
    want = hf_names_shapes(_hf_config(ckpt))
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert all(v.dtype == np.float32 for v in sd.values())
    # DeepSpeed's offline consolidation == its live gather (safe_get_full_fp32_param), bit for bit
    live = ds.load_state(ckpt, "fp32")
    for name, arr in sd.items():
        np.testing.assert_array_equal(arr, live[name], err_msg=name)


@pytest.mark.parametrize("case", ["z1", "z3"])
def test_ds_to_universal(make, case):
    ckpt = make(case)
    uni = ds.ds_to_universal(ckpt)
    assert uni == ckpt / "global_step3_universal"
    assert (ckpt / "latest_universal").read_text().strip() == uni.name
    stage3 = CASES[case]["stage"] == 3
    model_files = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
                   if stage3 else ["mp_rank_00_model_states.pt"])
    assert sorted(p.name for p in uni.iterdir()) == sorted(["zero", *model_files])
    assert (uni / "zero" / "optimizer_state.pt").is_file()
    want = hf_names_shapes(_hf_config(ckpt))
    assert sorted(p.name for p in (uni / "zero").iterdir() if p.is_dir()) == sorted(want)
    live = {k: ds.load_state(ckpt, k) for k in ds.STATE_KEYS}
    for name, shape in want.items():
        files = sorted(p.name for p in (uni / "zero" / name).iterdir())
        assert files == (["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt"] if stage3
                         else ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]), name
        for key in ds.STATE_KEYS:
            obj = _torch_load(uni / "zero" / name / f"{key}.pt")
            if stage3:  # stage 3 writes the bare flat tensor
                assert isinstance(obj, torch.Tensor) and tuple(obj.shape) == (math.prod(shape),)
                t = obj.reshape(shape)
            else:
                assert set(obj) == {"param", "cat_dim"} and obj["cat_dim"] == 0
                t = obj["param"]
                assert tuple(t.shape) == shape
            # the universal state is exactly the live full state
            np.testing.assert_array_equal(t.detach().numpy(), live[key][name],
                                          err_msg=f"{name}/{key}")
        if not stage3:
            assert float(_torch_load(uni / "zero" / name / "step.pt")) == 3.0


def test_resume_universal_world_size_1_and_3(make):
    ckpt = make("z1")
    ds.ds_to_universal(ckpt)
    runs = {ws: ds.resume_and_step(ckpt, ws, universal=True, steps=1) for ws in (1, 3)}
    for ws, r in runs.items():
        assert r["start_step"] == 3 and len(r["loss"]) == 1 and math.isfinite(r["loss"][0])
        meta = ds.read_expected(r["dir"])
        assert meta["world_size"] == ws and meta["global_step"] == 4 and meta["universal"]
        assert (r["dir"] / "global_step4").is_dir()
    # same global batch and math at any DP size: equal up to the reduction order
    assert runs[1]["loss"][0] == pytest.approx(runs[3]["loss"][0], rel=1e-5)
    for key, path_key in (("fp32", "weights"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
        a = ds.load_state(runs[1]["dir"], key)
        b = ds.load_state(runs[3]["dir"], key)
        assert runs[1][path_key] == runs[1]["dir"] / f"{key}.safetensors"
        assert sorted(a) == sorted(hf_names_shapes(_hf_config(ckpt)))
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # one more step really moved the weights
    before = ds.load_state(ckpt, "fp32")
    after = ds.load_state(runs[3]["dir"], "fp32")
    assert any(not np.array_equal(before[n], after[n]) for n in before)


# --- the layout documented in docs/formats/deepspeed.md, re-implemented from scratch ----------

@pytest.mark.parametrize("case", list(CASES))
def test_documented_layout(make, case):
    ckpt = make(case)
    from tests.groundtruth.zero_layout import read_documented_layout
    got, _ = read_documented_layout(ckpt / "global_step3", dp=2, strict_padding=False)
    for slot, key in zip(("master", "exp_avg", "exp_avg_sq"), ds.STATE_KEYS):
        live = ds.load_state(ckpt, key)
        assert sorted(got[slot]) == sorted(live)
        for name in live:
            np.testing.assert_array_equal(got[slot][name], live[name], err_msg=f"{name}/{key}")


# ---- mapc against DeepSpeed ----------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_mapc_hf_export_equals_zero_to_fp32(make, case, tmp_path):
    """`mapc convert CKPT OUT --to hf` exports the fp32 master weights, bit for bit what
    DeepSpeed's own zero_to_fp32 consolidates."""
    import mapc
    from safetensors.numpy import load_file
    ckpt = make(case)
    mapc.convert(ckpt, tmp_path / "hf", to="hf")
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    theirs = ds.zero_to_fp32(ckpt)
    assert set(ours) == set(theirs)
    for name, want in theirs.items():
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], want, err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("slot,key", [("master", "fp32"), ("exp_avg", "exp_avg"),
                                      ("exp_avg_sq", "exp_avg_sq")])
def test_mapc_reads_every_optimizer_slot_exactly(make, case, slot, key):
    """Every parameter's master weights and Adam moments, rebuilt from the flat partitions, equal
    the full state DeepSpeed gathered live during training."""
    from mapc.runtime.containers import open_source
    ckpt = make(case)
    want = ds.load_state(ckpt, key)
    with open_source(ckpt) as src:
        assert src.format == "deepspeed" and src.dp == 2
        assert set(src.names()) == set(want)
        for name, arr in want.items():
            np.testing.assert_array_equal(src.read(name, (), slot=slot), arr, err_msg=name)
        state = src.training_state()
    assert state["iteration"] == 3 and state["step"] == 3.0
    assert state["param_groups"][0]["lr"] > 0


@pytest.mark.parametrize("case", ["z1", "z3"])
def test_deepspeed_to_dcp_carries_optimizer_state(make, case, tmp_path):
    """DeepSpeed -> DCP writes fp32 master weights and Adam moments as torch's get_state_dict
    lays them out; torch's own dcp.load reads them back equal to DeepSpeed's live state; DCP ->
    DCP through mapc keeps them."""
    import mapc
    ckpt = make(case)
    mapc.convert(ckpt, tmp_path / "dcp", to="dcp")
    fp32, m1, m2 = (ds.load_state(ckpt, k) for k in ("fp32", "exp_avg", "exp_avg_sq"))
    state = ds.dcp_load_with_adam(tmp_path / "dcp", fp32)
    for n in fp32:
        np.testing.assert_array_equal(state[n].numpy(), fp32[n], err_msg=n)
        np.testing.assert_array_equal(state["optim"]["state"][n]["exp_avg"].numpy(), m1[n])
        np.testing.assert_array_equal(state["optim"]["state"][n]["exp_avg_sq"].numpy(), m2[n])
        assert float(state["optim"]["state"][n]["step"]) == 3.0
    mapc.convert(tmp_path / "dcp", tmp_path / "again", to="dcp")
    from mapc.runtime.containers import open_source
    with open_source(tmp_path / "again") as src:
        assert src.slots() == ["param", "exp_avg", "exp_avg_sq"]
        name = next(iter(fp32))
        np.testing.assert_array_equal(src.read(name, (), slot="exp_avg_sq"), m2[name])
        assert src.training_state()["step"] == 3.0
