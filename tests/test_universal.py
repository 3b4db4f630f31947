"""DeepSpeed universal checkpoints against the real DeepSpeed (0.19.8).

* ``mapc convert --to universal`` writes what ``ds_to_universal --inject_missing_state``
  writes, file for file, key for key, tensor for tensor (compared with torch in a subprocess);
* a real DeepSpeed engine loads mapc's output (``load_universal``) and its next training step
  gives exactly the loss, weights and Adam moments that loading DeepSpeed's own universal
  output gives;
* mapc reads universal checkpoints (its own and DeepSpeed's) back bit for bit;
* broken universal checkpoints are refused naming the file.

The ZeRO checkpoints are the shared DS_CASES (tests/conftest.py); DeepSpeed runs in
subprocesses (tests/groundtruth/deepspeed_ckpt.py), so this process never imports it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mapc import api
from mapc.errors import MapcError
from mapc.runtime.containers import detect_format, open_source
from mapc.runtime.containers.zero import DEEPSPEED_PICKLES
from tests.conftest import write_random_hf, llama_config

pytest.importorskip("torch")
pytest.importorskip("deepspeed")
from tests.groundtruth import deepspeed_ckpt as ds  # noqa: E402

CASES = ["z1", "z2bf16", "z3"]
RESUME_DP = 3          # a new DP size: the universal path's reason to exist
COMPARE = Path(__file__).parent / "groundtruth" / "ds_universal_compare.py"


@pytest.fixture(scope="module")
def ours(make, tmp_path_factory):
    """case -> mapc's universal output (the load directory) for that DeepSpeed checkpoint."""
    root = tmp_path_factory.mktemp("universal")
    made = {}

    def get(case):
        if case not in made:
            dst = root / case
            api.convert(make(case), dst, "universal")
            made[case] = dst
        return made[case]
    return get


@pytest.fixture(scope="module")
def compared(make, ours, tmp_path_factory):
    """torch's comparison (ds_universal_compare.py, one subprocess) of mapc's output with
    ds_to_universal's, for every case and for the output built from a DCP export of z1."""
    pairs = {}
    for case in CASES:
        theirs = ds.ds_to_universal(make(case))
        pairs[case] = (ours(case) / theirs.name, theirs)
    dcp = tmp_path_factory.mktemp("via_dcp")
    reports = {}
    for case in ("z1", "z3"):
        api.convert(make(case), dcp / f"{case}-dcp", "dcp")
        reports[case] = api.convert(dcp / f"{case}-dcp", dcp / f"{case}-u", "universal")
        pairs[f"{case}-via-dcp"] = (dcp / f"{case}-u" / pairs[case][1].name, pairs[case][1])
    out = subprocess.run([sys.executable, str(COMPARE)] + [str(p) for ab in pairs.values()
                                                          for p in ab],
                         capture_output=True, text=True, env=ds._env(), check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: (r, pairs[k]) for k, r in zip(pairs, results)} | {"dcp": (dcp, reports)}


def _bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("case", CASES)
def test_equals_ds_to_universal(case, make, ours, compared):
    ckpt = make(case)
    res, (_, theirs) = compared[case]
    assert (ours(case) / "latest_universal").read_text() == theirs.name
    assert res["only_a"] == [] and res["only_b"] == []
    assert res["diffs"] == []
    names = open_source(ckpt).names()
    per_param = 3 if case == "z3" else 4          # stage 3 has no step.pt
    models = 2 if case == "z3" else 1
    assert res["compared"] == len(names) * per_param + 1 + models


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_deepspeed_resumes_from_ours(case, make, ours, tmp_path):
    """The oracle resume (DeepSpeed's own universal output at DP=3) is shared with
    test_groundtruth_deepspeed / the ZeRO writer's tests (same default output folder)."""
    ckpt = make(case)
    ds.ds_to_universal(ckpt)
    theirs = ds.resume_and_step(ckpt, RESUME_DP, universal=True)
    mine = ds.resume_and_step(ours(case), RESUME_DP, universal=True, like=ckpt,
                              out=tmp_path / "resumed")
    assert mine["loss"] == theirs["loss"]
    assert mine["start_step"] == theirs["start_step"] == 3
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        a = ds.load_state(mine["dir"], "fp32" if key == "weights" else key)
        b = ds.load_state(theirs["dir"], "fp32" if key == "weights" else key)
        assert a.keys() == b.keys()
        bad = [n for n in a if not _bits(a[n], b[n])]
        assert not bad, f"{key} differs after the resumed step: {bad[:3]}"


@pytest.mark.parametrize("case", CASES)
def test_deepspeeds_universal_to_hf_equals_zero_to_fp32(case, make, tmp_path):
    ckpt = make(case)
    theirs = ds.ds_to_universal(ckpt)
    assert detect_format(theirs) == "universal"
    api.convert(theirs, tmp_path / "hf", "hf")
    from safetensors.numpy import load_file
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    want = ds.zero_to_fp32(ckpt)
    assert got.keys() == want.keys()
    assert all(_bits(got[n], want[n]) for n in want)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_every_slot(case, make, ours):
    """deepspeed -> universal -> mapc's reader: every slot bit for bit, against DeepSpeed's own
    gathered full state (safe_get_full_fp32_param / safe_get_full_optimizer_state)."""
    ckpt = make(case)
    src, back = open_source(ckpt), open_source(ours(case))
    assert back.format == "universal" and back.names() == src.names()
    gathered = {slot: ds.load_state(ckpt, key) for slot, key in
                (("master", "fp32"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"))}
    for name in src.names():
        assert _bits(back.read(name, slot="param"), src.read(name, slot="param")), name
        for slot, full in gathered.items():
            assert _bits(back.read(name, slot=slot), full[name]), (name, slot)
    assert back.training_state() == src.training_state()


def test_universal_to_universal_is_identical(make, ours, tmp_path):
    api.convert(ours("z1"), tmp_path / "again", "universal")
    a, b = ours("z1") / "global_step3_universal", tmp_path / "again" / "global_step3_universal"
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_weights_only_source(tmp_path):
    """An HF checkpoint (no optimizer state): fp32 = the weights, zero moments, step 0, a
    warning, and a model states file torch loads with weights_only=True."""
    torch = pytest.importorskip("torch")
    cfg = llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=64)
    src = write_random_hf(tmp_path / "hf", cfg)
    report = api.convert(src, tmp_path / "u", "universal")
    assert any("no optimizer state" in w for w in report.warnings)
    u = tmp_path / "u" / "global_step0_universal"
    ms = torch.load(u / "mp_rank_00_model_states.pt", weights_only=True)
    from safetensors.numpy import load_file
    weights = load_file(str(src / "model.safetensors"))
    assert sorted(ms["module"]) == sorted(weights)
    assert len(ms["param_shapes"]) == 1 and sorted(ms["param_shapes"][0]) == sorted(weights)
    assert all(isinstance(s, torch.Size) for s in ms["param_shapes"][0].values())
    for name, w in weights.items():
        assert np.array_equal(ms["module"][name].numpy(), w)
        fp32 = torch.load(u / "zero" / name / "fp32.pt", weights_only=True)
        assert fp32["cat_dim"] == 0 and fp32["param"].requires_grad
        assert np.array_equal(fp32["param"].detach().numpy(), w)
        for m in ("exp_avg", "exp_avg_sq"):
            t = torch.load(u / "zero" / name / f"{m}.pt", weights_only=True)["param"]
            assert t.shape == w.shape and not t.any()
        assert float(torch.load(u / "zero" / name / "step.pt", weights_only=True)) == 0.0
    back = open_source(tmp_path / "u")
    assert all(_bits(back.read(n, slot="master"), w) for n, w in weights.items())


# ---- broken input -------------------------------------------------------------------------------
def _break_truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _break_delete(f: Path):
    f.unlink()


@pytest.mark.parametrize("what,breaker", [
    ("exp_avg.pt", _break_truncate), ("fp32.pt", _break_delete),
    ("exp_avg_sq.pt", _break_delete), ("optimizer_state.pt", _break_truncate),
    ("step.pt", _break_truncate)])   # a later parameter's step.pt: every one is read
def test_broken_files_are_named(what, breaker, ours, tmp_path):
    u = tmp_path / "u"
    shutil.copytree(ours("z1"), u)
    zero = u / "global_step3_universal" / "zero"
    f = zero / what if what == "optimizer_state.pt" else zero / "model.norm.weight" / what
    breaker(f)
    with pytest.raises(MapcError) as e:
        api.convert(u, tmp_path / "out", "universal")
    assert what in str(e.value) and ("model.norm.weight" in str(e.value)
                                     or what == "optimizer_state.pt")
    assert not (tmp_path / "out").exists()


def test_disagreeing_step_is_refused(ours, tmp_path):
    torch = pytest.importorskip("torch")
    u = tmp_path / "u"
    shutil.copytree(ours("z1"), u)
    f = u / "global_step3_universal" / "zero" / "model.norm.weight" / "step.pt"
    torch.save(torch.tensor(7.0), f)
    with pytest.raises(MapcError, match="step 7 differs from 3") as e:
        api.convert(u, tmp_path / "out", "hf", with_optimizer=True)
    assert "model.norm.weight" in str(e.value)


def test_missing_param_folder_is_named(ours, tmp_path):
    u = tmp_path / "u"
    shutil.copytree(ours("z1"), u)
    shutil.rmtree(u / "global_step3_universal" / "zero" / "lm_head.weight")
    with pytest.raises(MapcError, match="zero/lm_head.weight"):
        open_source(u)


@pytest.mark.parametrize("case", ["z1", "z3"])
def test_built_from_another_format_equals_ds_to_universal(case, compared):
    """A source that is not DeepSpeed (DCP with Adam moments and training state, exported by
    mapc from the z1 / z3 run) gets model states and optimizer_state.pt built from scratch:
    they and every per-parameter file equal ds_to_universal's output of the original run.
    Allowed differences: the module's key order (DCP does not keep the model's order;
    DeepSpeed's loader matches by name) and, at stage 3, the rank-0 ``fp32_flat_groups`` and
    Adam tensors DeepSpeed copies into optimizer_state.pt (its universal loader reads only the
    step and param groups there; compared below)."""
    from mapc.runtime import torchfile
    dcp, reports = compared["dcp"]
    res, (mine, theirs) = compared[f"{case}-via-dcp"]
    assert "master" not in open_source(dcp / f"{case}-dcp").slots()
    assert not any("optimizer state" in w for w in reports[case].warnings)
    assert res["only_a"] == [] and res["only_b"] == []
    models = [p.name for p in theirs.glob("*model_states.pt")]
    allowed = {f"{m}['module']" for m in models}
    if case == "z3":
        allowed.add("zero/optimizer_state.pt")
    assert {d.split(":")[0] for d in res["diffs"]} <= allowed
    for m in models:
        a = torchfile.load(mine / m, DEEPSPEED_PICKLES)["module"]
        b = torchfile.load(theirs / m, DEEPSPEED_PICKLES)["module"]
        assert sorted(a) == sorted(b)
        assert all(_bits(a[n].read(), b[n].read()) and a[n].dtype == b[n].dtype for n in b)
    if case == "z3":
        a = torchfile.load(mine / "zero" / "optimizer_state.pt", DEEPSPEED_PICKLES)
        b = torchfile.load(theirs / "zero" / "optimizer_state.pt", DEEPSPEED_PICKLES)
        assert list(a) == [k for k in b if k != "fp32_flat_groups"]
        for k in ("zero_stage", "dynamic_loss_scale", "overflow", "partition_count",
                  "param_groups"):
            assert a[k] == b[k], k
        assert a["loss_scaler"].to_dict() == b["loss_scaler"].to_dict()
        ia, ib = a["optimizer_state_dict"], b["optimizer_state_dict"]
        assert ia["param_groups"] == ib["param_groups"]
        assert list(ia["state"]) == list(ib["state"])
        assert all(_bits(ia["state"][s]["step"].read(), ib["state"][s]["step"].read())
                   for s in ib["state"])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_weights_round_trip_property(dtype, tmp_path):
    """Any Llama shape, fp32 or fp16 weights: hf -> universal -> mapc's reader gives the
    weights (module, in their dtype), fp32 master = the weights, zero moments; back to hf
    gives the fp32 master. Files written with the real safetensors library."""
    from hypothesis import HealthCheck, given, settings
    from safetensors.numpy import load_file
    from tests.test_properties import configs, fresh

    @settings(max_examples=6, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(cfg=configs())
    def check(cfg):
        src = write_random_hf(fresh(tmp_path, "hf"), cfg, dtype=dtype)
        u = fresh(tmp_path, "u")
        api.convert(src, u, "universal")
        weights = load_file(str(src / "model.safetensors"))
        back = open_source(u)
        assert sorted(back.names()) == sorted(weights)
        for name, w in weights.items():
            assert _bits(back.read(name, slot="param"), w)
            assert _bits(back.read(name, slot="master"), w.astype(np.float32))
            for m in ("exp_avg", "exp_avg_sq"):
                z = back.read(name, slot=m)
                assert z.shape == w.shape and z.dtype == np.float32 and not z.any()
        assert back.training_state()["step"] == 0.0
        hf = fresh(tmp_path, "back")
        api.convert(u, hf, "hf")
        again = load_file(str(hf / "model.safetensors"))
        assert all(_bits(again[n], w.astype(np.float32)) for n, w in weights.items())
    check()
