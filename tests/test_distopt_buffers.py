"""megatron-core's distributed optimizer with several DDP buffers per rank -- one per model
chunk of a virtual pipeline and, in each chunk, one per parameter dtype (bf16 weights, fp32
norms) -- against megatron-core 0.16.1 itself.

Ground truth (tests/groundtruth/mcore_dist.py, ``cfg["vpp"]`` and ``cfg["fp32_norms"]``):
megatron-core's GPTModel built as Megatron-LM builds a virtual pipeline (2 chunks per rank at
TP1 PP2 DP2, so each chunk holds one of the 4 layers), bf16 through Float16Module with its
norms put back in fp32, each chunk in its own DDP (fp32 grads): per rank four buffers,
``gbuf_idx`` 0..3, in one DistributedOptimizer, which takes one step and saves dp_reshardable
(``model0``, ``model1``), then takes one more step on value gradients. mapc reads it and writes
it resharded to TP2 PP1 DP2 (no virtual pipeline), which megatron-core loads (strict) into the
same model there (two buffers per rank) and steps on. Two megatron-core runs for the module.
"""
from __future__ import annotations

import math
import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import mapc  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from tests.groundtruth import mcore_dist  # noqa: E402
from tests.test_torch_dist import (  # noqa: E402
    CFG, PADDED, _assert_rank_equal, _bound, _edit_common, _expected_local, _moments_as_hf,
    _set_args, _to_hf, _truth_local)

SPLIT = dict(CFG, fp32_norms=True)
VPP = dict(SPLIT, vpp=2)
PP, VSTAGES = 2, 4                  # the saved run: PP2 x 2 chunks = 4 virtual stages
LOAD_AT = (2, 1, 2)
PAIRS = [("torch.bfloat16", "torch.float32"), ("torch.float32", "torch.float32")]


@pytest.fixture(scope="module")
def saved_vpp(tmp_path_factory):
    base = tmp_path_factory.mktemp("distopt_vpp")
    root = mcore_dist.save_checkpoint(base / "ckpt", VPP, 1, PP, "bf16", base / "truth", dp=2,
                                      optimizer=True)
    return root, base / "truth"


@pytest.fixture(scope="module")
def loaded(saved_vpp, tmp_path_factory):
    tp, pp, dp = LOAD_AT
    base = tmp_path_factory.mktemp("distopt_vpp_load")
    mapc.convert(saved_vpp[0], base / "ckpt", to="torch_dist", tp=tp, pp=pp, dp=dp)
    return base / "ckpt", mcore_dist.load_optimizer(base / "ckpt", SPLIT, tp, pp, dp, "bf16",
                                                    base / "loaded")


def _stage(coord):
    """The live name prefix (``model{v}.``) and pipeline rank of a virtual stage's coord."""
    s = dict(coord).get("pp", 0)
    return f"model{s // PP}.", s % PP


def _where(src, t, p, vpp=True):
    """{live name: (gbuf index, start inside its bucket, numel)} of rank (t, p), as mapc
    derived it."""
    out = {}
    for (coord, name), (keys, start, n, _) in src.optimizer.where.items():
        pre, rank = _stage(coord) if vpp else ("", dict(coord).get("pp", 0))
        if dict(coord).get("tp", 0) == t and rank == p:
            gbuf = int(keys["param"].split(".gbuf_idx_")[1].split(".")[0])
            out[pre + name] = (gbuf, start, n)
    return out


def _live_where(live):
    """The same from megatron-core's live DDP buffers (param_index_map, bucket offsets)."""
    out = {}
    for b, buf in enumerate(live["buffers"]):
        for name, (s, e, k) in buf["index"].items():
            out[name] = (b, s - buf["buckets"][k][0], e - s)
    return out


def _hf_of_vpp_truth(truth, prefix, slot):
    """The saved run's slot as HF tensors: every DP rank's piece put together per parameter,
    chunk v of rank p being virtual stage v * PP + p (one layer each)."""
    local: dict = {}
    flat: dict = {}
    for p in range(PP):
        for d in range(2):
            for name, piece in torch.load(truth / f"{prefix}_0_{p}_{d}.pt")["pieces"].items():
                v, rest = name.split(".", 1)
                key = (0, int(v[5:]) * PP + p)
                a, b = piece["range"]
                if (key, rest) not in flat:
                    flat[(key, rest)] = (torch.full((math.prod(piece["shape"]),), float("nan")),
                                         piece["shape"])
                flat[(key, rest)][0][a:b] = piece[slot]
    for (key, rest), (t, shape) in flat.items():
        assert not t.isnan().any(), (key, rest)
        local.setdefault(key, {})[rest] = t.view(shape)
    assert sorted(local) == [(0, s) for s in range(VSTAGES)]
    return _to_hf(local, 1, VSTAGES)


@pytest.mark.parametrize("p", [0, 1])
def test_every_chunks_buffers_are_derived_as_megatron_core_lays_them_out(saved_vpp, p):
    """megatron-core made four buffers per rank, each chunk's after the previous chunk's and
    within a chunk in the order its dtypes first appear in named_parameters (a chunk starting
    with a norm has the fp32 buffer first); mapc's derivation puts every parameter in the
    buffer, bucket and place megatron-core's live param_index_map has."""
    root, truth = saved_vpp
    live = torch.load(truth / f"optim_0_{p}_0.pt")
    assert live["dp_group_idx"] == p
    assert [b["chunk"] for b in live["buffers"]] == [0, 0, 1, 1]
    orders = [tuple(tuple(b["dtype"]) for b in live["buffers"][i:i + 2]) for i in (0, 2)]
    assert set(orders) <= {tuple(PAIRS), tuple(PAIRS[::-1])}
    assert tuple(PAIRS[::-1]) in orders
    with _bound(root) as src:
        assert _where(src, 0, p) == _live_where(live)
        assert src.dtype("decoder.final_layernorm.weight") == "float32"


def test_every_slot_of_every_buffer_is_read_exactly(saved_vpp, tmp_path):
    """torch_dist (vpp 2, two dtypes) -> HF with the optimizer: masters and both moments of
    every parameter are what megatron-core's live optimizer held, bit for bit."""
    root, truth = saved_vpp
    mapc.convert(root, tmp_path / "hf", to="hf", with_optimizer=True)
    hf = _moments_as_hf(tmp_path / "hf")
    for slot in ("param", "exp_avg", "exp_avg_sq"):
        want = _hf_of_vpp_truth(truth, "optim", slot)
        assert sorted(hf[slot]) == sorted(want)
        for name, w in want.items():
            assert hf[slot][name].dtype == torch.float32
            assert torch.equal(hf[slot][name], w), (slot, name)


@pytest.mark.parametrize("t", [0, 1])
def test_mapc_writes_megatron_cores_buffers_at_another_topology(loaded, t):
    """mapc's output at TP2 PP1 DP2 has, per rank, the buffers (dtypes in gbuf_idx order) and
    bucket sizes megatron-core's live DDP has there, each parameter at megatron-core's place."""
    out, loaded_dir = loaded
    md = pickle.loads((mcore_dist.iter_dir(out) / ".metadata").read_bytes())
    live = torch.load(loaded_dir / f"loaded_{t}_0_0.pt")
    assert [tuple(b["dtype"]) for b in live["buffers"]] == PAIRS
    with _bound(out) as src:
        assert _where(src, t, 0, vpp=False) == _live_where(live)
    for b, (buf, pair) in enumerate(zip(live["buffers"], PAIRS)):
        ((_, _, unpadded),) = buf["buckets"]
        key = (f"optimizer.distributed.dp_group_idx_{t}.gbuf_idx_{b}.dtype_("
               f"{pair[0]}, {pair[1]}).bucket_idx_0.param")
        assert tuple(md.state_dict_metadata[key].size) == (unpadded,)


@pytest.mark.parametrize("prefix", ["loaded", "stepped"])
@pytest.mark.parametrize("slot", ["param", "exp_avg", "exp_avg_sq"])
def test_megatron_core_loads_every_buffer_and_continues_the_run(saved_vpp, loaded, prefix,
                                                                 slot):
    """What megatron-core's DistributedOptimizer holds at TP2 PP1 DP2 after loading mapc's
    output equals the original vpp run's state, bit for bit (fp32 norms and bf16 weights'
    masters, both moments); after one more step on the same gradients it equals the original
    run's own next step bit for bit (same DP)."""
    tp, pp, dp = LOAD_AT
    want = _hf_of_vpp_truth(saved_vpp[1], "stepped" if prefix == "stepped" else "optim", slot)
    for t in range(tp):
        expected = _expected_local(want, tp, pp, t, 0)
        shapes = {n: v.shape for n, v in expected.items()}
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            shapes[name] = (PADDED // tp, CFG["hidden"])
        got = _truth_local(loaded[1], t, slot, p=0, dp=dp, prefix=prefix, shapes=shapes)
        _assert_rank_equal(got, expected, (prefix, slot, t))


def test_the_legacy_writer_refuses_several_buffers(saved_vpp, tmp_path):
    """Megatron-LM's distrib_optim.pt with two buffers (dtypes) is not written: one line."""
    with pytest.raises(MapcError, match="DDP buffers") as e:
        mapc.convert(saved_vpp[0], tmp_path / "m", to="megatron", tp=1, dp=2)
    assert "\n" not in str(e.value)


def test_buffers_the_args_do_not_give_are_refused_in_one_line(saved_vpp, tmp_path):
    """The same state with the args' virtual pipeline size dropped: two buffers per rank
    derived, four stored; one line says so."""
    root = _edit_common(saved_vpp, tmp_path,
                        _set_args(virtual_pipeline_model_parallel_size=None))
    with pytest.raises(MapcError, match=r"dp_group_idx_0 has the DDP buffers .* give") as e:
        mapc.convert(root, tmp_path / "out", to="hf", with_optimizer=True)
    assert "\n" not in str(e.value)


def test_the_write_plan_shows_each_buffer(saved_vpp, tmp_path):
    cp = mapc.plan_convert(saved_vpp[0], tmp_path / "out", to="torch_dist", tp=2, dp=2)
    try:
        text = cp.write.pretty()
    finally:
        cp.close()
    assert "dp_group_idx_1: [" in text and " (float32)" in text, text
    assert not (tmp_path / "out").exists()
