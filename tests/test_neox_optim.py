"""Optimizer state in NeoX / DeepSpeed pipeline checkpoints, written at any tp, pp and dp, against
the real DeepSpeed: its PipelineModule trained and saved (tests/groundtruth/neox_pipe.py), its
PipelineEngine loading mapc's output natively and training on (neox_pipe_resume.py), its
partition_balanced (which layers each pipeline stage holds)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mapc
from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers.zero import DEEPSPEED_PICKLES
from tests.test_neox import (_fresh, _pipe_hf_config, _pipe_run, build_neox_model, neox_config,
                             tag_dir)

torch = pytest.importorskip("torch")

HERE = Path(__file__).parent
SLOTS = ("fp32", "exp_avg", "exp_avg_sq")


@pytest.fixture(scope="session")
def pipe(ds_root):
    """DeepSpeed's own checkpoint: tp=1, pp=2, dp=1, ZeRO 1, one AdamW step (cached)."""
    return _pipe_run(ds_root, 1)


@pytest.fixture(scope="session")
def pipe_cfg(pipe):
    return _pipe_hf_config(json.loads((pipe / "expected.json").read_text()))


def _gathered(d: Path) -> dict:
    """{slot: {name: tensor}} from the per-rank dumps of safe_get_full_* in ``d``."""
    from safetensors.torch import load_file
    out = {k: {} for k in SLOTS}
    for k in SLOTS:
        for f in sorted(d.glob(f"{k}.rank*.safetensors")):
            out[k].update(load_file(f))
    return out


def _resume(ckpt: Path, out: Path, pp: int, dp: int, groups: str = "one") -> dict:
    """DeepSpeed's PipelineEngine at (pp, dp) loads ``ckpt`` and takes one step."""
    from tests.groundtruth import deepspeed_ckpt as dc
    for attempt in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={pp * dp}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={dc._free_port()}",
               str(HERE / "groundtruth" / "neox_pipe_resume.py"), "--load", str(ckpt),
               "--out", str(out), "--pp", str(pp), "--dp", str(dp), "--groups", groups]
        try:
            dc._run(cmd, out.parent / f"{out.name}.log", dc.TIMEOUT_S)
            break
        except RuntimeError as e:
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    return {"result": json.loads((out / "result.json").read_text()),
            "loaded": _gathered(out / "loaded"), "stepped": _gathered(out / "stepped")}


@pytest.fixture(scope="session")
def reference(pipe, ds_root):
    """DeepSpeed continuing from its own checkpoint (pp=2, dp=1): cached next to it."""
    out = Path(ds_root) / (pipe.name + ".resume_pp2_dp1")
    if not (out / "result.json").is_file():
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _resume(pipe, tmp, 2, 1)
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(str(tmp), str(out))
    return {"result": json.loads((out / "result.json").read_text()),
            "stepped": _gathered(out / "stepped")}


def _tree_equal(a, b, where):
    """Two pickle trees read by torchfile: the same keys, values and tensor bytes."""
    if isinstance(a, torchfile.TensorRef):
        x, y = np.asarray(a.map()), np.asarray(b.map())
        assert (x.dtype, x.shape) == (y.dtype, y.shape) and x.tobytes() == y.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            _tree_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tree_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torchfile.Record):
        assert type(a) is type(b) and dict(a.items()) == dict(b.items()), where
    else:
        assert a == b, (where, a, b)


# ---- the files, without running DeepSpeed --------------------------------------------------------
def test_unchanged_topology_writes_deepspeeds_own_files(tmp_path, pipe, pipe_cfg):
    """neox(tp=1, pp=2, dp=1) -> the same: every file DeepSpeed wrote, and every ZeRO optimizer
    file identical to DeepSpeed's in every entry and tensor byte; the mp_rank files equal
    DeepSpeed's apart from NeoX's client state (iteration, args) that mapc adds."""
    mapc.convert(pipe, tmp_path / "nx", to="neox", tp=1, pp=2, dp=1, config=pipe_cfg)
    ds, mp = tag_dir(pipe), tag_dir(tmp_path / "nx")
    assert sorted(p.name for p in mp.iterdir()) == sorted(p.name for p in ds.iterdir())
    for f in sorted(ds.iterdir()):
        a, b = torchfile.load(f, DEEPSPEED_PICKLES), torchfile.load(mp / f.name, DEEPSPEED_PICKLES)
        if f.name.startswith("mp_rank"):
            assert set(b) - set(a) == {"iteration", "args"}
            b = {k: b[k] for k in a}
        _tree_equal(a, b, f.name)


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 2), (2, 2, 3), (4, 1, 1)])
def test_resharded_optimizer_state_reads_back_exactly(tmp_path, pipe, pipe_cfg, tp, pp, dp):
    """Every parameter's fp32 master and Adam moments, read back from mapc's files at
    (tp, pp, dp) and merged over tp, equal what DeepSpeed gathered live before saving."""
    expected = _gathered(pipe)
    mapc.convert(pipe, tmp_path / "nx", to="neox", tp=tp, pp=pp, dp=dp, config=pipe_cfg)
    d = tag_dir(tmp_path / "nx")
    assert len(list(d.glob("zero_pp_rank_*_mp_rank_*_optim_states.pt"))) == tp * pp * dp
    mapc.convert(tmp_path / "nx", tmp_path / "one", to="neox", tp=1, pp=1, dp=1,
                 config=pipe_cfg)
    from mapc.runtime.containers import open_source
    with open_source(tmp_path / "one") as src:
        coord = src.coords()[0]
        assert sorted(src.names(coord)) == sorted(expected["fp32"])
        for name in src.names(coord):
            for slot, key in (("master", "fp32"), ("exp_avg", "exp_avg"),
                              ("exp_avg_sq", "exp_avg_sq")):
                got = torch.from_numpy(np.array(src.read(name, coord, slot=slot)))
                assert torch.equal(got, expected[key][name]), (name, slot)
        assert src.training_state()["step"] == 1.0


# ---- DeepSpeed's PipelineEngine loads mapc's output and trains on -------------------------------
def test_unchanged_topology_continues_bit_identically(tmp_path, pipe, pipe_cfg, reference):
    mapc.convert(pipe, tmp_path / "nx", to="neox", tp=1, pp=2, dp=1, config=pipe_cfg)
    got = _resume(tmp_path / "nx", tmp_path / "run", 2, 1)
    assert got["result"] == reference["result"]
    for k in SLOTS:
        assert got["loaded"][k].keys() == _gathered(pipe)[k].keys()
        for name, ref in reference["stepped"][k].items():
            assert torch.equal(got["stepped"][k][name], ref), (k, name)


def test_resharded_to_pp1_dp2_loads_exactly_and_continues(tmp_path, pipe, pipe_cfg, reference):
    """pp=2, dp=1 -> pp=1, dp=2: DeepSpeed's engine loads mapc's files natively; the state it
    gathers right after loading equals the source's bit for bit; the next step matches
    DeepSpeed continuing from its own checkpoint to rtol 1e-5 / atol 1e-6. Why not exactly:
    at dp=2 the gradient is the all-reduced sum of the two micro batches' gradients halved,
    at dp=1 the sum of the halved ones (both exact scalings by 1/2), but the gradient norm for
    clipping is summed in another order (per stage, then across stages), which may move the
    clip coefficient by an ulp, i.e. each update by ~1e-7 relative; Adam's normalised update
    (lr 1e-2) keeps that far inside the tolerance. Measured: bit-identical on this machine."""
    mapc.convert(pipe, tmp_path / "nx", to="neox", tp=1, pp=1, dp=2, config=pipe_cfg)
    cfg = json.loads((tmp_path / "nx" / "configs" / "mapc_neox.yml").read_text())
    assert (cfg["pipe_parallel_size"], cfg["model_parallel_size"]) == (1, 1)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
            cfg["gradient_accumulation_steps"]) == (2, 1, 1)
    got = _resume(tmp_path / "nx", tmp_path / "run", 1, 2)
    source = _gathered(pipe)
    for k in SLOTS:
        assert got["loaded"][k].keys() == source[k].keys()
        for name, want in source[k].items():
            assert torch.equal(got["loaded"][k][name], want), (k, name)
    assert got["result"]["global_steps"] == reference["result"]["global_steps"] == 2
    assert got["result"]["loss"] == pytest.approx(reference["result"]["loss"], rel=1e-6)
    for k in SLOTS:
        for name, ref in reference["stepped"][k].items():
            torch.testing.assert_close(got["stepped"][k][name], ref, rtol=1e-5, atol=1e-6)


def test_hf_weights_give_a_fresh_optimizer_deepspeed_loads_with_neoxs_groups(tmp_path, pipe):
    """HF weights (no optimizer) -> neox pp=2 --with-optimizer: the fresh optimizer's two NeoX
    param groups,
    per stage, in the order DeepSpeed flattens them. DeepSpeed's PipelineEngine, given NeoX's
    weight-decay / no-weight-decay groups, loads it natively: the master weights it gathers
    are the HF weights bit for bit, the moments zero, and it trains on."""
    from mapc.runtime.containers import open_source
    expected = json.loads((pipe / "expected.json").read_text())
    build_neox_model(_pipe_hf_config(expected), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=1, pp=2, dp=1,
                 with_optimizer=True)
    with open_source(tmp_path / "nx") as src:   # the weights by pipeline name
        coord = src.coords()[0]
        weights = {n: torch.from_numpy(np.array(src.read(n, coord))) for n in src.names(coord)}
    got = _resume(tmp_path / "nx", tmp_path / "run", 2, 1, groups="neox")
    assert got["loaded"]["fp32"].keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(got["loaded"]["fp32"][name], w), name
        assert not got["loaded"]["exp_avg"][name].any() and \
            not got["loaded"]["exp_avg_sq"][name].any()
    assert np.isfinite(got["result"]["loss"]) and got["result"]["global_steps"] == 1
    assert all(got["stepped"]["exp_avg"][n].any() for n in weights)


def test_plain_deepspeed_optimizer_state_crosses_into_neox_and_back(tmp_path, make):
    """A plain DeepSpeed ZeRO-1 run (HF names, two param groups, dp=2, 3 steps) -> neox
    (pp=2, dp=3) -> deepspeed (dp=2): every parameter's fp32 master and Adam moments equal what
    DeepSpeed gathered live (safe_get_full_*) before saving, and the param groups survive the
    rename to pipeline names and back."""
    from safetensors.numpy import load_file
    from mapc.runtime.containers import open_source
    src = make("z1")
    mapc.convert(src, tmp_path / "nx", to="neox", tp=1, pp=2, dp=3)
    assert len(list(tag_dir(tmp_path / "nx").glob("zero_pp_rank_*_optim_states.pt"))) == 6
    mapc.convert(tmp_path / "nx", tmp_path / "ds", to="deepspeed", dp=2)
    expected = {k: load_file(src / f"{k}.safetensors") for k in SLOTS}
    with open_source(src) as a:
        groups = [pg["params"] for pg in a.training_state()["param_groups"]]
    with open_source(tmp_path / "ds") as b:
        assert [pg["params"] for pg in b.training_state()["param_groups"]] == groups
        assert sorted(b.names(())) == sorted(expected["fp32"])
        for name in b.names(()):
            for slot, key in (("master", "fp32"), ("exp_avg", "exp_avg"),
                              ("exp_avg_sq", "exp_avg_sq")):
                assert np.array_equal(np.asarray(b.read(name, (), slot=slot)),
                                      expected[key][name]), (name, slot)


def test_zero2_source_is_refused_for_a_pipeline(tmp_path, make):
    with pytest.raises(MapcError, match="ZeRO stage 2"):
        mapc.convert(make("z2bf16"), tmp_path / "nx", to="neox", pp=2)
    assert not (tmp_path / "nx").exists()


# ---- round trips of every optimizer slot --------------------------------------------------------
SETTINGS = settings(max_examples=6, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
TOPOLOGY = st.fixed_dictionaries({"tp": st.sampled_from([1, 2, 4]), "pp": st.sampled_from([1, 2]),
                                  "dp": st.integers(1, 4)})


@SETTINGS
@given(a=TOPOLOGY, b=TOPOLOGY)
def test_reshard_round_trip_of_every_optimizer_file_is_bit_exact(tmp_path, pipe, pipe_cfg, a, b):
    """neox(a) -> neox(b) -> neox(a): every ZeRO optimizer file (flat fp32 partitions, Adam
    moments, step, param groups, paddings, fragment maps, loss scale, clip) and the mp_rank
    files' param_shapes come back identical; the layer files too."""
    x, y, z = _fresh(tmp_path, "x"), _fresh(tmp_path, "y"), _fresh(tmp_path, "z")
    mapc.convert(pipe, x, to="neox", **a, config=pipe_cfg)
    mapc.convert(x, y, to="neox", **b, config=pipe_cfg)
    mapc.convert(y, z, to="neox", **a, config=pipe_cfg)
    dx, dz = tag_dir(x), tag_dir(z)
    assert sorted(p.name for p in dx.iterdir()) == sorted(p.name for p in dz.iterdir())
    for f in sorted(dx.iterdir()):
        p, q = torchfile.load(f, DEEPSPEED_PICKLES), torchfile.load(dz / f.name, DEEPSPEED_PICKLES)
        if "optim_states" in f.name:
            _tree_equal(p["optimizer_state_dict"], q["optimizer_state_dict"], f.name)
        elif f.name.startswith("mp_rank"):
            _tree_equal(p["param_shapes"], q["param_shapes"], f.name)
            assert p["dp_world_size"] == q["dp_world_size"] == a["dp"]
        else:
            _tree_equal(p, q, f.name)


# ---- which layers each stage holds: DeepSpeed's partition_balanced -------------------------------
PARTITION_CASES = [([int(w) for w in np.random.default_rng(s).integers(0, 4, n)], parts)
                   for s, (n, parts) in enumerate([(n, p) for n in range(1, 14)
                                                   for p in range(1, 6)])]


def test_stage_partition_matches_deepspeeds_partition_balanced():
    """mapc's own partition_balanced against DeepSpeed's on 65 weight lists (binary as NeoX's
    'type:' partitioning gives, and general), run once in a subprocess so the test process does
    not import deepspeed."""
    from mapc.runtime.containers.neox import partition_balanced
    code = ("import json, sys\nfrom deepspeed.runtime.utils import partition_balanced as pb\n"
            "cases = json.load(sys.stdin)\n"
            "print(json.dumps([[int(x) for x in pb(w, p)] for w, p in cases]))\n")
    binary = [([min(1, w) for w in ws], p) for ws, p in PARTITION_CASES]
    cases = PARTITION_CASES + binary
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(cases), text=True,
                         capture_output=True, env=env, check=True).stdout
    theirs = json.loads(out.strip().splitlines()[-1])
    assert [partition_balanced(w, p) for w, p in cases] == theirs


@pytest.mark.parametrize("layers,pp,stage0", [(2, 2, {0, 2}), (4, 2, {0, 2, 3}),
                                              (4, 4, {0, 2})])
def test_stages_hold_the_layers_deepspeed_gives_them(tmp_path, layers, pp, stage0):
    """hf -> neox at pp: the optimizer of stage 0 (mp_rank_00) covers exactly the positions
    NeoX's 'type:transformer|mlp' partitioning gives stage 0 (the embedding, the first
    function and the first blocks); the DeepSpeed run of test_neox shows (2, 2)."""
    build_neox_model(neox_config(layers=layers), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=1, pp=pp, with_optimizer=True)
    ms = torch.load(tag_dir(tmp_path / "nx") / "mp_rank_00_model_states.pt", weights_only=False)
    held = {int(n.split(".")[0]) for g in ms["param_shapes"] for n in g}
    assert held == stage0


# ---- weights-only sources, configs, bad input ------------------------------------------------
def test_weights_only_source_writes_weights_only_by_default(tmp_path):
    """As for megatron: no optimizer files (NeoX builds its own with no_load_optim), no
    warnings about one."""
    build_neox_model(neox_config(layers=2), tmp_path / "hf")
    r = mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=2, dp=2)
    assert not any("optimizer" in w for w in r.warnings)
    assert not list(tag_dir(tmp_path / "nx").glob("*optim_states.pt"))
    cfg = json.loads((tmp_path / "nx" / "configs" / "mapc_neox.yml").read_text())
    assert cfg["no_load_optim"] is True
    ms = torch.load(tag_dir(tmp_path / "nx") / "mp_rank_00_model_states.pt", weights_only=False)
    assert ms["param_shapes"] is None and ms["dp_world_size"] == 2


def test_with_optimizer_gives_weights_only_source_a_fresh_one_with_neoxs_groups(tmp_path):
    build_neox_model(neox_config(layers=2), tmp_path / "hf")
    r = mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=2, dp=2,
                     with_optimizer=True)
    assert any("fresh optimizer" in w for w in r.warnings)
    d = tag_dir(tmp_path / "nx")
    ms = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)
    decay, no_decay = (list(g) for g in ms["param_shapes"])
    assert decay and no_decay
    assert all(len(ms["param_shapes"][0][n]) == 2 for n in decay)
    assert all(len(ms["param_shapes"][1][n]) == 1 for n in no_decay)
    osd = torchfile.load(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt", DEEPSPEED_PICKLES)["optimizer_state_dict"]
    groups = osd["base_optimizer_state"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert not np.asarray(osd["base_optimizer_state"]["state"][0]["exp_avg"].map()).any()


def test_global_batch_that_cannot_be_kept_is_said_plainly(tmp_path, pipe, pipe_cfg):
    """The source's global batch is 2 (micro 1 x accumulation 2 x dp 1): at dp=3 it cannot be
    kept, and the warning says so; the config and mp_rank files agree on what is used."""
    r = mapc.convert(pipe, tmp_path / "nx", to="neox", tp=1, pp=2, dp=3, config=pipe_cfg)
    assert any("cannot be kept" in w for w in r.warnings)
    cfg = json.loads((tmp_path / "nx" / "configs" / "mapc_neox.yml").read_text())
    ms = torch.load(tag_dir(tmp_path / "nx") / "mp_rank_00_model_states.pt", weights_only=False)
    got = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
           cfg["gradient_accumulation_steps"])
    assert got == (3, 1, 1)
    assert (ms["ds_config"]["train_batch_size"], ms["dp_world_size"]) == (3, 3)
    assert cfg["load"] == str((tmp_path / "nx").absolute()) and cfg["no_load_optim"] is False


@pytest.mark.parametrize("method", ["parameters", "type:nothing_matches_this"])
def test_unsupported_partition_method_is_refused(method):
    """'parameters' partitioning needs per-layer parameter counts on each rank that mapc does
    not model; a type regex matching no layer gives every stage the same (zero) weight, which
    is not how the source was trained either."""
    from mapc.runtime.containers.neox import stage_bounds
    with pytest.raises(MapcError, match="pipe_partition_method"):
        stage_bounds(9, 2, method)
