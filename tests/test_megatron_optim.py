"""Megatron (ckpt_format=torch) optimizer state, against the real megatron-core optimizer.

Ground truth: tests/groundtruth/mcore_optim.py builds GPTModel + get_megatron_optimizer (Adam,
non-distributed; FP32Optimizer or Float16OptimizerWithFloat16Params) + OptimizerParamScheduler
on CPU per (tp, pp) rank, steps it on synthetic gradients and torch.saves model_optim_rng.pt;
it also loads files into a fresh megatron-core model and optimizer with their own
load_state_dict. DeepSpeed ground truth comes from the conftest `make` fixture.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mapc  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from mapc.runtime.containers import open_source  # noqa: E402
from tests.groundtruth import mcore_optim  # noqa: E402

CFG = dict(hidden=64, layers=4, heads=8, groups=2, head_dim=8, ffn=96, vocab=256, tied=False)
# (dtype, tp, pp) of the megatron-core runs; each costs one set of tp*pp worker processes
RUNS = {"fp32": ("fp32", 2, 2), "bf16": ("bf16", 2, 1), "fp16": ("fp16", 1, 2)}
_made: dict = {}


@pytest.fixture(scope="session")
def mcore(tmp_path_factory):
    """mcore(run) -> a Megatron checkpoint with optimizer state saved by megatron-core."""
    def make(run):
        if run not in _made:
            dtype, tp, pp = RUNS[run]
            _made[run] = mcore_optim.save_checkpoint(tmp_path_factory.mktemp(f"mcore_{run}"),
                                                     CFG, tp, pp, dtype)
        return _made[run]
    return make


def _file(root, t, p, pp):
    return root / f"iter_{mcore_optim.ITERATION:07d}" / mcore_optim.rank_dir(t, p, pp) / \
        "model_optim_rng.pt"


def _np(t):
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


@pytest.mark.parametrize("run", sorted(RUNS))
def test_mapc_reads_what_megatron_saved(mcore, run):
    """Every parameter's moments and fp32 master, as mapc reads them by name, equal the entries
    megatron-core's optimizer.state_dict() holds at that parameter's index (the index -> name
    map comes from the live optimizer); the scalars are megatron-core's."""
    dtype, tp, pp = RUNS[run]
    root = mcore(run)
    with open_source(root) as src:
        assert src.format == "megatron" and src.topology == {"tp": tp, "pp": pp}
        assert src.slots() == ["param", "master", "exp_avg", "exp_avg_sq"]
        for t in range(tp):
            for p in range(pp):
                coord = (("tp", t), ("pp", p))
                sd = torch.load(_file(root, t, p, pp), weights_only=False)
                opt = sd["optimizer"]
                inner = opt["optimizer"] if dtype != "fp32" else opt
                names = json.loads((root / f"names_{t}_{p}.json").read_text())
                for g, group in enumerate(names):
                    fp16 = [n for n in group if sd["model"][n].dtype != torch.float32]
                    for j, name in enumerate(group):
                        state = inner["state"][inner["param_groups"][g]["params"][j]]
                        for slot in ("exp_avg", "exp_avg_sq"):
                            np.testing.assert_array_equal(src.read(name, coord, slot=slot),
                                                          _np(state[slot]), err_msg=name)
                        master = opt["fp32_from_fp16_params"][g][fp16.index(name)] \
                            if name in fp16 else sd["model"][name]
                        got = src.read(name, coord, slot="master")
                        assert got.dtype == np.float32
                        np.testing.assert_array_equal(got, _np(master), err_msg=name)
        ts = src.training_state()
    assert ts["iteration"] == mcore_optim.ITERATION and ts["step"] == float(mcore_optim.STEPS)
    assert ts["lr_scheduler"] == sd["opt_param_scheduler"]
    assert [g["wd_mult"] for g in ts["param_groups"]] == [1.0, 0.0]
    assert {k: v for k, v in ts["param_groups"][0].items() if k != "params"} == \
        {k: v for k, v in inner["param_groups"][0].items() if k != "params"}
    if dtype == "fp16":
        assert ts["loss_scale"] == float(opt["grad_scaler"]["scale"])
    else:
        assert ts["loss_scale"] is None


def _same(a, b, where=""):
    """Structural equality of two state dicts (tensors bit-exact, dtypes and shapes equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_megatron_loads_what_mapc_wrote(mcore, run, tmp_path):
    """megatron -> megatron through mapc, then megatron-core's own model.load_state_dict,
    optimizer.load_state_dict and scheduler.load_state_dict: the loaded optimizer's
    state_dict() equals the one megatron-core saved, key for key, index for index, bit for bit
    (so param order, groups and hyper-parameters are exactly megatron-core's)."""
    dtype, tp, pp = RUNS[run]
    root = mcore(run)
    mapc.convert(root, tmp_path / "out", to="megatron", tp=tp, pp=pp)
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == \
        str(mcore_optim.ITERATION)
    written = torch.load(_file(tmp_path / "out", 0, 0, pp), weights_only=False)
    saved0 = torch.load(_file(root, 0, 0, pp), weights_only=False)
    _same(saved0["optimizer"], written["optimizer"], "written")   # the file itself
    loaded = mcore_optim.load_checkpoint(tmp_path / "out", CFG, tp, pp, dtype, tmp_path / "ld")
    for t in range(tp):
        for p in range(pp):
            saved = torch.load(_file(root, t, p, pp), weights_only=False)
            got = torch.load(loaded / f"rank{t}_{p}.pt", weights_only=False)
            _same(saved["optimizer"], got["optimizer"], f"rank {t},{p}")
            _same(saved["opt_param_scheduler"], got["opt_param_scheduler"])
            for k, v in got["model"].items():
                if not k.endswith("_extra_state"):
                    assert torch.equal(v, saved["model"][k]), k


def test_resharded_optimizer_loads_into_megatron(mcore, tmp_path):
    """fp32 tp=2 pp=2 -> tp=1 pp=1: megatron-core loads the result into a tp=1 pp=1 optimizer
    (group sizes must match its own), and every moment has its parameter's shape."""
    root = mcore("fp32")
    mapc.convert(root, tmp_path / "one", to="megatron", tp=1, pp=1)
    loaded = mcore_optim.load_checkpoint(tmp_path / "one", CFG, 1, 1, "fp32", tmp_path / "ld")
    got = torch.load(loaded / "rank0_0.pt", weights_only=False)
    params = [v for k, v in got["model"].items() if not k.endswith("_extra_state")]
    groups = got["optimizer"]["param_groups"]
    assert [g["wd_mult"] for g in groups] == [1.0, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(params)
    with open_source(tmp_path / "one") as one, open_source(root) as src:
        assert one.training_state()["step"] == src.training_state()["step"]
        name = "decoder.layers.3.mlp.linear_fc2.weight"   # pp rank 1's layer 1, tp-split
        both = np.concatenate([src.read("decoder.layers.1.mlp.linear_fc2.weight",
                                        (("tp", t), ("pp", 1)), slot="exp_avg_sq")
                               for t in range(2)], axis=1)
        np.testing.assert_array_equal(one.read(name, (("tp", 0), ("pp", 0)),
                                               slot="exp_avg_sq"), both)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=st.sampled_from(["fp32", "bf16"]), tp=st.sampled_from([1, 2]),
       pp=st.sampled_from([1, 2, 4]))
def test_megatron_reshard_round_trip_keeps_optimizer_slots(mcore, tmp_path_factory, run, tp,
                                                           pp):
    """megatron(tp, pp) -> megatron(tp', pp') -> megatron(tp, pp): every optimizer slot of every
    shard is bit-exact, and the scalars survive."""
    _, tp0, pp0 = RUNS[run]
    root = mcore(run)
    d = tmp_path_factory.mktemp("rt")
    mapc.convert(root, d / "mid", to="megatron", tp=tp, pp=pp)
    mapc.convert(d / "mid", d / "back", to="megatron", tp=tp0, pp=pp0)
    with open_source(root) as a, open_source(d / "back") as b:
        assert b.topology == a.topology
        for coord in a.coords():
            assert b.names(coord) == a.names(coord)
            for name in a.names(coord):
                for slot in ("param", "master", "exp_avg", "exp_avg_sq"):
                    x, y = a.read(name, coord, slot=slot), b.read(name, coord, slot=slot)
                    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, slot)
        ta, tb = a.training_state(), b.training_state()
        for k in ("iteration", "step", "lr_scheduler", "loss_scale"):
            assert ta[k] == tb[k], k
        assert [{k: v for k, v in g.items() if k != "params"} for g in ta["param_groups"]] == \
            [{k: v for k, v in g.items() if k != "params"} for g in tb["param_groups"]]
    shutil.rmtree(d)


def test_deepspeed_to_megatron_and_back_to_dcp_carries_master_and_moments(make, tmp_path):
    """DeepSpeed ZeRO-1 (fp32, two param groups) -> megatron tp=3 pp=2 -> megatron tp=1 pp=1 ->
    dcp: the fp32 master weights and Adam moments arrive bit-exact, equal to what DeepSpeed
    gathered live during training and to what mapc reads from the ZeRO partitions."""
    from tests.groundtruth import deepspeed_ckpt as ds
    ckpt = make("z1")
    mapc.convert(ckpt, tmp_path / "m22", to="megatron", tp=3, pp=2)   # 3 KV heads
    with open_source(tmp_path / "m22") as m:
        assert m.slots() == ["param", "master", "exp_avg", "exp_avg_sq"]
        groups = m.training_state()["param_groups"]
        assert [g["wd_mult"] for g in groups] == [1.0, 0.0]   # decay group first, as Megatron
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        sd = torch.load(_file_iter(tmp_path / "m22", 0, 0, 2), weights_only=False)
        assert set(sd["optimizer"]) == {"state", "param_groups"}          # FP32Optimizer
    mapc.convert(tmp_path / "m22", tmp_path / "m11", to="megatron", tp=1, pp=1)
    mapc.convert(tmp_path / "m11", tmp_path / "dcp", to="dcp")
    fp32, m1, m2 = (ds.load_state(ckpt, k) for k in ("fp32", "exp_avg", "exp_avg_sq"))
    state = ds.dcp_load_with_adam(tmp_path / "dcp", fp32)
    with open_source(ckpt) as src:
        for n in fp32:
            got = state["optim"]["state"][n]
            np.testing.assert_array_equal(state[n].numpy(), fp32[n], err_msg=n)
            np.testing.assert_array_equal(got["exp_avg"].numpy(), m1[n], err_msg=n)
            np.testing.assert_array_equal(got["exp_avg_sq"].numpy(), m2[n], err_msg=n)
            np.testing.assert_array_equal(got["exp_avg_sq"].numpy(),
                                          src.read(n, (), slot="exp_avg_sq"), err_msg=n)
            assert float(got["step"]) == 3.0


def _file_iter(root, t, p, pp):
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    return root / f"iter_{int(it):07d}" / mcore_optim.rank_dir(t, p, pp) / "model_optim_rng.pt"


def _corrupt(root, dst, edit):
    shutil.copytree(root, dst)
    f = _file(dst, 0, 0, 2)
    sd = torch.load(f, weights_only=False)
    edit(sd)
    torch.save(sd, f)
    return dst


def _drop_param(sd):
    sd["optimizer"]["param_groups"][0]["params"].pop()


def _wrong_shape(sd):
    first = sd["optimizer"]["param_groups"][0]["params"][0]
    sd["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3, 3)


@pytest.mark.parametrize("edit,words", [(_drop_param, "parameters in 2 groups"),
                                        (_wrong_shape, "has shape")])
def test_mismatched_optimizer_state_is_a_clean_error(mcore, tmp_path, edit, words):
    bad = _corrupt(mcore("fp32"), tmp_path / "bad", edit)
    with pytest.raises(MapcError, match=words):
        mapc.convert(bad, tmp_path / "out", to="megatron", tp=1, pp=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["bf16"])
def test_with_optimizer_from_weights_only_loads_into_megatron(tmp_path, dtype):
    """hf (no optimizer) -> megatron --with-optimizer --dtype bf16: a fresh
    Float16OptimizerWithFloat16Params state that megatron-core loads (its two default groups,
    no Adam state yet, fp32 masters equal to the weights)."""
    from tests.conftest import llama_config, write_random_hf
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=CFG["vocab"]))
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=1, pp=2, dtype=dtype,
                 with_optimizer=True)
    loaded = mcore_optim.load_checkpoint(tmp_path / "mg", CFG, 1, 2, dtype, tmp_path / "ld")
    for p in range(2):
        got = torch.load(loaded / f"rank0_{p}.pt", weights_only=False)
        opt = got["optimizer"]
        assert opt["optimizer"]["state"] == {}
        assert [g["wd_mult"] for g in opt["optimizer"]["param_groups"]] == [1.0, 0.0]
        bf16 = [v for k, v in got["model"].items()
                if not k.endswith("_extra_state") and v.dtype == torch.bfloat16]
        masters = opt["fp32_from_fp16_params"][0]
        assert len(masters) == len(bf16) > 0
        assert all(torch.equal(m, w.float()) for m, w in zip(masters, bf16))
