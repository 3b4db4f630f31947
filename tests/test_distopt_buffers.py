"""megatron-core's distributed optimizer with several DDP buffers (a dtype split: bf16 weights,
fp32 norms), against megatron-core 0.16.1 itself.

Ground truth (tests/groundtruth/mcore_dist.py, ``cfg["fp32_norms"]``): megatron-core's GPTModel
in bf16 through Float16Module with its norms put back in fp32, wrapped in DDP (fp32 grads),
so DDP makes two buffers, ``gbuf_idx_0`` (bf16, fp32) and ``gbuf_idx_1`` (fp32, fp32); its
DistributedOptimizer takes one step at TP2 DP2 and saves dp_reshardable. mapc reads it and
writes it resharded to TP1 PP2 DP2, which megatron-core loads (strict) into the same model
there and steps on. Two megatron-core runs for the module.
"""
from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import mapc  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from tests.groundtruth import mcore_dist  # noqa: E402
from tests.test_torch_dist import (  # noqa: E402
    CFG, _assert_hf_holds_the_live_state, _assert_rank_equal, _bound, _edit_common,
    _expected_local, _hf_of_truth, _moments_as_hf, _set_args, _truth_local)

SPLIT = dict(CFG, fp32_norms=True)
LOAD_AT = (1, 2, 2)
PAIRS = [("torch.bfloat16", "torch.float32"), ("torch.float32", "torch.float32")]


@pytest.fixture(scope="module")
def saved_split(tmp_path_factory):
    base = tmp_path_factory.mktemp("distopt_split")
    root = mcore_dist.save_checkpoint(base / "ckpt", SPLIT, 2, 1, "bf16", base / "truth", dp=2,
                                      optimizer=True)
    return root, base / "truth"


@pytest.fixture(scope="module")
def loaded_split(saved_split, tmp_path_factory):
    tp, pp, dp = LOAD_AT
    base = tmp_path_factory.mktemp("distopt_split_load")
    mapc.convert(saved_split[0], base / "ckpt", to="torch_dist", tp=tp, pp=pp, dp=dp)
    return base / "ckpt", mcore_dist.load_optimizer(base / "ckpt", SPLIT, tp, pp, dp, "bf16",
                                                    base / "loaded")


def _where(src, t, p=0):
    """{name: (gbuf index, start inside its bucket, numel)} of rank (t, p), as mapc derived."""
    out = {}
    for (coord, name), (keys, start, n, _) in src.optimizer.where.items():
        if dict(coord).get("tp", 0) == t and dict(coord).get("pp", 0) == p:
            gbuf = int(keys["param"].split(".gbuf_idx_")[1].split(".")[0])
            out[name] = (gbuf, start, n)
    return out


def _live_where(live):
    """The same from megatron-core's live DDP buffers (param_index_map, bucket offsets)."""
    out = {}
    for b, buf in enumerate(live["buffers"]):
        for name, (s, e, k) in buf["index"].items():
            out[name] = (b, s - buf["buckets"][k][0], e - s)
    return out


@pytest.mark.parametrize("t", [0, 1])
def test_two_buffers_are_derived_as_megatron_core_lays_them_out(saved_split, t):
    """megatron-core made two buffers, bf16 weights then fp32 norms (the order their dtypes
    first appear in named_parameters); mapc's derivation puts every parameter in the buffer,
    bucket and place megatron-core's live param_index_map has."""
    root, truth = saved_split
    live = torch.load(truth / f"optim_{t}_0_0.pt")
    assert [tuple(b["dtype"]) for b in live["buffers"]] == PAIRS
    assert live["buffers"][1]["buckets"][0][1] > live["buffers"][1]["buckets"][0][2]  # padding
    with _bound(root) as src:
        assert _where(src, t) == _live_where(live)
        assert src.dtype("decoder.final_layernorm.weight") == "float32"


def test_every_slot_of_both_buffers_is_read_exactly(saved_split, tmp_path):
    """torch_dist (two buffers) -> HF with the optimizer: masters and both moments of every
    parameter are what megatron-core's live optimizer held, bit for bit."""
    root, truth = saved_split
    mapc.convert(root, tmp_path / "hf", to="hf", with_optimizer=True)
    _assert_hf_holds_the_live_state(_moments_as_hf(tmp_path / "hf"), truth)


def test_mapc_writes_megatron_cores_buffers_at_another_topology(loaded_split):
    """mapc's output at TP1 PP2 DP2 has, per rank, the buffers (dtypes, gbuf_idx order) and
    bucket sizes megatron-core's live DDP has there, each parameter at megatron-core's place
    (pipeline stage 1's first parameter is a norm: there the fp32 buffer is gbuf_idx_0)."""
    out, loaded = loaded_split
    md = pickle.loads((mcore_dist.iter_dir(out) / ".metadata").read_bytes())
    with _bound(out) as src:
        for p in range(2):
            live = torch.load(loaded / f"loaded_0_{p}_0.pt")
            # the buffers in the order their dtypes first appear: stage 1 starts with a norm
            pairs = PAIRS if p == 0 else PAIRS[::-1]
            assert [tuple(b["dtype"]) for b in live["buffers"]] == pairs
            assert _where(src, 0, p) == _live_where(live)
            for b, (buf, pair) in enumerate(zip(live["buffers"], pairs)):
                ((_, _, unpadded),) = buf["buckets"]
                key = (f"optimizer.distributed.dp_group_idx_{p}.gbuf_idx_{b}.dtype_("
                       f"{pair[0]}, {pair[1]}).bucket_idx_0.param")
                assert tuple(md.state_dict_metadata[key].size) == (unpadded,)


@pytest.mark.parametrize("prefix", ["loaded", "stepped"])
@pytest.mark.parametrize("slot", ["param", "exp_avg", "exp_avg_sq"])
def test_megatron_core_loads_both_buffers_and_continues_the_run(saved_split, loaded_split,
                                                                 prefix, slot):
    """What megatron-core's DistributedOptimizer holds at TP1 PP2 DP2 after loading mapc's
    output equals the original TP2 DP2 run's state, bit for bit (fp32 norms and bf16 weights'
    masters, both moments); after one more step on the same gradients it equals the original
    run's own next step bit for bit (same DP)."""
    truth = saved_split[1]
    tp, pp, dp = LOAD_AT
    want = _hf_of_truth(truth, "stepped" if prefix == "stepped" else "optim", slot)
    for p in range(pp):
        expected = _expected_local(want, tp, pp, 0, p)
        shapes = {n: v.shape for n, v in expected.items()}
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in shapes:
                shapes[name] = (256, CFG["hidden"])
        got = _truth_local(loaded_split[1], 0, slot, p=p, dp=dp, prefix=prefix, shapes=shapes)
        _assert_rank_equal(got, expected, (prefix, slot, p))


def test_the_legacy_writer_refuses_several_buffers(saved_split, tmp_path):
    """Megatron-LM's distrib_optim.pt with two buffers is not written: one line says so."""
    with pytest.raises(MapcError, match="DDP buffers"):
        mapc.convert(saved_split[0], tmp_path / "m", to="megatron", tp=1, dp=2)


def test_a_virtual_pipeline_runs_optimizer_is_refused_in_one_line(saved_split, tmp_path):
    """A dp_reshardable state of a vpp run (one buffer per model chunk) is not read yet: one
    line says so and names fully_reshardable."""
    root = _edit_common(saved_split, tmp_path,
                        _set_args(virtual_pipeline_model_parallel_size=2))
    with pytest.raises(MapcError, match=r"virtual-pipeline run \(vpp=2") as e:
        mapc.convert(root, tmp_path / "out", to="hf", with_optimizer=True)
    assert "\n" not in str(e.value) and "fully_reshardable" in str(e.value)


def test_the_write_plan_shows_each_buffer(saved_split, tmp_path):
    cp = mapc.plan_convert(saved_split[0], tmp_path / "out", to="torch_dist", tp=1, pp=2, dp=2)
    try:
        text = cp.write.pretty()
    finally:
        cp.close()
    assert "dp_group_idx_1: [" in text and " (float32), [" in text, text
    assert not (tmp_path / "out").exists()
