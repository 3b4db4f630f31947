"""megatron-core's distributed optimizer with several DDP buffers per rank -- one per model
chunk of a virtual pipeline and, in each chunk, one per parameter dtype (bf16 weights, fp32
norms) -- against megatron-core 0.16.1 itself.

Ground truth (tests/groundtruth/mcore_dist.py, ``cfg["vpp"]`` and ``cfg["fp32_norms"]``):
megatron-core's GPTModel built as Megatron-LM builds a virtual pipeline (2 chunks per rank at
TP1 PP2 DP2, so each chunk holds one of the 4 layers), bf16 through Float16Module with its
norms put back in fp32, each chunk in its own DDP (fp32 grads): per rank four buffers,
``gbuf_idx`` 0..3, in one DistributedOptimizer, which takes one step and saves dp_reshardable
(``model0``, ``model1``) and, as Megatron-LM's torch format, ``distrib_optim.pt``
(``save_parameter_state``: the four buffers gathered) beside each rank's ``model_optim_rng.pt``,
then takes one more step on value gradients. mapc reads both and writes the state resharded to
TP2 PP1 DP2 (no virtual pipeline), which megatron-core loads (strict) into the same model there
(two buffers per rank) and steps on; and from that output back to the virtual pipeline TP1 PP2
VPP2 DP2, as torch_dist and as the torch format with ``distrib_optim.pt``, which a megatron-core
run built there loads (strict dist_checkpointing.load; load_parameter_state) and steps on.
Three megatron-core runs for the module.
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
# the same state also saved as: Megatron-LM's torch format, dp_zero_gather_scatter, and NeMo 2
# (MegatronStrategy's save of a virtual pipeline) with NeMo 2.7.3's default sharding type
# (dp_reshardable) and dp_zero_gather_scatter
NEMO2_KINDS = ("dp_reshardable", "dp_zero_gather_scatter")
ALSO = ("legacy", "dp_zero_gather_scatter") + tuple(f"{mcore_dist.NEMO2}{k}" for k in NEMO2_KINDS)


@pytest.fixture(scope="module")
def saved_vpp(tmp_path_factory):
    base = tmp_path_factory.mktemp("distopt_vpp")
    root = mcore_dist.save_checkpoint(base / "ckpt", VPP, 1, PP, "bf16", base / "truth", dp=2,
                                      optimizer=True, also=ALSO)
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
            key = keys["param"]     # a bucket's key; dp_zero_gather_scatter: (chain, g, b, k,
                                    # slot)
            gbuf = key[2] if isinstance(key, tuple) else \
                int(key.split(".gbuf_idx_")[1].split(".")[0])
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


# ---- the torch format's distrib_optim.pt with several buffers; writing a virtual pipeline ------
VPP_AT = (1, PP, 2)                 # the saved run's topology: TP1 PP2 (2 chunks per rank) DP2


def _legacy(saved_vpp):
    return saved_vpp[0].parent / f"{saved_vpp[0].name}_legacy"


@pytest.fixture(scope="module")
def written_vpp(loaded, tmp_path_factory):
    """mapc's TP2 PP1 DP2 output (no virtual pipeline, two buffers per rank) written back at
    TP1 PP2 VPP2 DP2 as torch_dist, as the torch format and as NeMo 2, all three loaded by one
    megatron-core run built there (``mcore_dist.load_vpp``; NeMo 2 the way NeMo's
    MegatronStrategy loads a virtual pipeline). (dist, torch, loaded, nemo2)"""
    tp, pp, dp = VPP_AT
    base = tmp_path_factory.mktemp("distopt_vpp_write")
    mapc.convert(loaded[0], base / "dist", to="torch_dist", tp=tp, pp=pp, vpp=2, dp=dp)
    mapc.convert(loaded[0], base / "torch", to="megatron", tp=tp, pp=pp, vpp=2, dp=dp)
    mapc.convert(loaded[0], base / "nemo2", to="nemo2", tp=tp, pp=pp, vpp=2, dp=dp,
                 set={"vocab_multiple": "128"})     # the harness pads as Megatron-LM does
    return base / "dist", base / "torch", mcore_dist.load_vpp(
        base / "dist", base / "torch", VPP, tp, pp, dp, "bf16", base / "loaded",
        nemo2=base / "nemo2"), base / "nemo2"


def _vocab_padding(truth, p):
    """{gbuf index: boolean mask of the flat buffer} marking the vocabulary padding rows of the
    embedding and output layer (rows CFG["vocab"].. of the padded table), which HF -- and so
    mapc -- does not keep: from megatron-core's live param_index_map of rank p."""
    out = {}
    for b, buf in enumerate(torch.load(truth / f"optim_0_{p}_0.pt")["buffers"]):
        ((offset, _, unpadded),) = buf["buckets"]
        mask = torch.zeros(unpadded, dtype=torch.bool)
        for name, (s, e, _) in buf["index"].items():
            if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                mask[s - offset + CFG["vocab"] * CFG["hidden"]:e - offset] = True
        out[b] = mask
    return out


def _legacy_file(root, p):
    return root / f"iter_{mcore_dist.ITERATION:07d}" / f"mp_rank_00_{p:03d}" / "distrib_optim.pt"


def test_megatron_cores_distrib_optim_holds_one_entry_per_buffer(saved_vpp):
    """What megatron-core's save_parameter_state wrote with four buffers per rank (the facts
    mapc reads and writes): {"buckets_coalesced": True, gbuf_idx: {(param dtype, grad dtype):
    {param, exp_avg, exp_avg_sq, numel_unpadded}}}, gbuf_idx 0..3 in the live optimizer's
    buffer order, each flat fp32 tensor the buffer's unpadded size."""
    for p in range(PP):
        live = torch.load(saved_vpp[1] / f"optim_0_{p}_0.pt")["buffers"]
        state = torch.load(_legacy_file(_legacy(saved_vpp), p))
        assert state.pop("buckets_coalesced") is True
        assert sorted(state) == list(range(len(live))) == [0, 1, 2, 3]
        for g, buf in enumerate(live):
            ((pair, st),) = state[g].items()
            assert tuple(str(x) for x in pair) == buf["dtype"]
            ((_, _, unpadded),) = buf["buckets"]
            assert st["numel_unpadded"] == unpadded
            assert {k: (v.dtype, tuple(v.shape)) for k, v in st.items() if k != "numel_unpadded"} \
                == {k: (torch.float32, (unpadded,)) for k in ("param", "exp_avg", "exp_avg_sq")}


def test_the_legacy_distrib_optim_with_several_buffers_is_read_exactly(saved_vpp, tmp_path):
    """Megatron-LM's torch format (model0, model1 per rank file; distrib_optim.pt with four
    buffers) -> HF with the optimizer: masters and both moments of every parameter are what
    megatron-core's live optimizer held, bit for bit."""
    mapc.convert(_legacy(saved_vpp), tmp_path / "hf", to="hf", with_optimizer=True)
    hf = _moments_as_hf(tmp_path / "hf")
    for slot in ("param", "exp_avg", "exp_avg_sq"):
        want = _hf_of_vpp_truth(saved_vpp[1], "optim", slot)
        assert sorted(hf[slot]) == sorted(want)
        for name, w in want.items():
            assert torch.equal(hf[slot][name], w), (slot, name)


def _dist_buckets(root):
    """{key: tensor} of every distributed-optimizer bucket of a torch_dist checkpoint, read with
    torch.distributed.checkpoint itself."""
    import torch.distributed.checkpoint as dcp
    d = str(mcore_dist.iter_dir(root))
    md = dcp.FileSystemReader(d).read_metadata()
    sd = {k: torch.empty(m.size, dtype=torch.float32) for k, m in md.state_dict_metadata.items()
          if k.startswith("optimizer.distributed.") and ".bucket_idx_" in k}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(d), no_dist=True)
    return sd


def test_mapc_writes_the_buffers_megatron_core_saved(saved_vpp, written_vpp):
    """Through TP2 PP1 and back, mapc's TP1 PP2 VPP2 DP2 outputs hold what megatron-core itself
    saved there, bit for bit: torch_dist, the same bucket keys (gbuf_idx 0..3 of each
    dp_group_idx, dtype pairs, sizes) and values; the torch format, each rank's
    distrib_optim.pt with megatron-core's four entries (dtype pairs, numel_unpadded) and
    values. Only the vocabulary padding rows differ (zeros in mapc's: HF keeps none)."""
    dist, legacy = written_vpp[:2]
    want, got = _dist_buckets(saved_vpp[0]), _dist_buckets(dist)
    assert sorted(got) == sorted(want) and len(want) == 2 * 4 * 3
    pads = {p: _vocab_padding(saved_vpp[1], p) for p in range(PP)}
    for key, w in want.items():
        p = int(key.split("dp_group_idx_")[1].split(".")[0])
        b = int(key.split("gbuf_idx_")[1].split(".")[0])
        keep = ~pads[p][b]
        assert torch.equal(got[key][keep], w[keep]), key
        assert not got[key][~keep].any()
    for p in range(PP):
        want = torch.load(_legacy_file(_legacy(saved_vpp), p))
        got = torch.load(_legacy_file(legacy, p))
        assert [(k, list(v) if k != "buckets_coalesced" else v) for k, v in got.items()] == \
            [(k, list(v) if k != "buckets_coalesced" else v) for k, v in want.items()]
        for g in range(4):
            ((pair, w),) = want[g].items()
            keep = ~pads[p][g]
            assert got[g][pair]["numel_unpadded"] == w["numel_unpadded"]
            for slot in ("param", "exp_avg", "exp_avg_sq"):
                assert torch.equal(got[g][pair][slot][keep], w[slot][keep]), (p, g, slot)


@pytest.mark.parametrize("p", [0, 1])
def test_a_virtual_pipeline_run_has_the_buffers_mapc_derived(written_vpp, p):
    """The megatron-core run at TP1 PP2 VPP2 DP2 that loaded mapc's torch_dist output has, per
    rank, the buffers and places mapc derived for it (four: two chunks x two dtypes)."""
    live = torch.load(written_vpp[2] / f"loaded_0_{p}_0.pt")
    assert [b["chunk"] for b in live["buffers"]] == [0, 0, 1, 1]
    with _bound(written_vpp[0]) as src:
        assert _where(src, 0, p) == _live_where(live)


@pytest.mark.parametrize("prefix,truth", [("loaded", "optim"), ("stepped", "stepped"),
                                          ("loadedL", "optim"), ("steppedL", "stepped"),
                                          ("loadedN", "optim"), ("steppedN", "stepped")])
@pytest.mark.parametrize("slot", ["param", "exp_avg", "exp_avg_sq"])
def test_a_virtual_pipeline_run_loads_mapc_output_and_continues(saved_vpp, written_vpp, prefix,
                                                                 truth, slot):
    """What megatron-core's DistributedOptimizer at TP1 PP2 VPP2 DP2 holds after loading
    mapc's torch_dist output (``loaded``; strict dist_checkpointing.load) and, after every
    state was zeroed, mapc's distrib_optim.pt (``loadedL``; load_parameter_state) and mapc's
    NeMo 2 output as NeMo loads it (``loadedN``), equals the
    original run's state bit for bit (fp32 masters of bf16 weights and fp32 norms, both
    moments, the step); one more step on the same gradients equals the original run's own next
    step bit for bit (same DP)."""
    loaded_dir = written_vpp[2]
    want = _hf_of_vpp_truth(saved_vpp[1], truth, slot)
    got = _hf_of_vpp_truth(loaded_dir, prefix, slot)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), (prefix, slot, name)
    for p in range(PP):
        for d in range(2):
            steps = torch.load(loaded_dir / f"{prefix}_0_{p}_{d}.pt")["steps"]
            assert steps == torch.load(saved_vpp[1] / f"{truth}_0_{p}_{d}.pt")["steps"]


def test_the_vpp_write_plan_shows_every_chunks_buffers(loaded, tmp_path):
    cp = mapc.plan_convert(loaded[0], tmp_path / "out", to="torch_dist", tp=1, pp=2, vpp=2,
                           dp=2)
    try:
        text = cp.write.pretty()
    finally:
        cp.close()
    assert "vpp: 2" in text and "one DDP per model chunk" in text, text
    # per dp_group_idx: chunk 0's two buffers, then chunk 1's (fp32 norms first there)
    assert text.count(" (float32)") == 4 and text.count(" (bfloat16)") == 4, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw,words", [
    (dict(to="torch_dist", tp=1, pp=3, vpp=2, dp=2), r"--pp 3 --vpp 2 is 6 virtual pipeline "
                                                     r"stages"),
    (dict(to="nemo2", tp=1, pp=3, vpp=2, dp=2), r"--pp 3 --vpp 2 is 6 virtual pipeline "
                                                r"stages"),
    (dict(to="nemo2", vpp=2, dp=2), "--vpp 2 needs --pp of at least 2"),
    (dict(to="torch_dist", vpp=2, dp=2), "--vpp 2 needs --pp of at least 2"),
])
def test_a_vpp_target_mapc_cannot_write_is_refused_in_one_line(loaded, tmp_path, kw, words):
    """(The layer-count error points into the spec, as every --pp/--vpp mismatch does: its
    message is one line, the spec context follows.)"""
    with pytest.raises(MapcError, match=words) as e:
        mapc.convert(loaded[0], tmp_path / "out", **kw)
    assert "\n" not in e.value.message
    assert not (tmp_path / "out").exists()


def test_like_a_virtual_pipeline_template_writes_its_buffers(saved_vpp, loaded, written_vpp,
                                                             tmp_path):
    """--like megatron-core's vpp checkpoint takes its TP/PP, DP and vpp: the output is the
    explicit --tp 1 --pp 2 --vpp 2 --dp 2 one (which megatron-core loaded above), byte for
    byte (the data file; .metadata's entries, apart from DCP's random save_id)."""
    mapc.convert(loaded[0], tmp_path / "like", like=saved_vpp[0])
    got, want = mcore_dist.iter_dir(tmp_path / "like"), mcore_dist.iter_dir(written_vpp[0])
    assert (got / "__0_0.distcp").read_bytes() == (want / "__0_0.distcp").read_bytes()
    got, want = (pickle.loads((d / ".metadata").read_bytes()) for d in (got, want))
    assert got.state_dict_metadata == want.state_dict_metadata
    assert got.storage_data == want.storage_data


@pytest.fixture(scope="module")
def direct_hf(saved_vpp, tmp_path_factory):
    out = tmp_path_factory.mktemp("distopt_vpp_hf") / "hf"
    mapc.convert(saved_vpp[0], out, to="hf", with_optimizer=True)
    return _moments_as_hf(out)


def test_any_tp_pp_vpp_dp_round_trips_every_slot(saved_vpp, direct_hf, tmp_path):
    """Hypothesis over the layouts written: the vpp run (four buffers per rank) -> torch_dist
    and -> megatron (distrib_optim.pt) at a drawn (tp, pp, vpp, dp) -> HF with the optimizer
    holds every master and moment of the direct export bit for bit (the masters check on
    reading also confirms each written buffer's layout)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=8, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(tp=st.sampled_from([1, 2]), stages=st.sampled_from([(1, 1), (2, 1), (4, 1), (2, 2)]),
           dp=st.sampled_from([1, 2, 3]), to=st.sampled_from(["torch_dist", "megatron"]))
    def check(tp, stages, dp, to):
        pp, vpp = stages
        d = tmp_path / f"{to}_{tp}_{pp}_{vpp}_{dp}"
        if d.exists():
            return
        mapc.convert(saved_vpp[0], d / "out", to=to, tp=tp, pp=pp, dp=dp,
                     vpp=vpp if vpp > 1 else None)
        mapc.convert(d / "out", d / "hf", to="hf", with_optimizer=True)
        got = _moments_as_hf(d / "hf")
        for slot, want in direct_hf.items():
            assert sorted(got[slot]) == sorted(want)
            for name, w in want.items():
                assert torch.equal(got[slot][name], w), (to, tp, pp, vpp, dp, slot, name)
    check()


# ---- dp_zero_gather_scatter with several buffers; NeMo 2 with a virtual pipeline ----------------
def _other(saved_vpp, kind):
    return saved_vpp[0].parent / f"{saved_vpp[0].name}_{kind}"


# context/model.yaml as NeMo 2 dumps the GPTConfig of the saved run (VPP: TP1 PP2, 2 chunks per
# rank): MegatronStrategy copies its parallel sizes into the model's config
# (_strategy_lib.set_model_parallel_attributes), the virtual pipeline's among them
NEMO2_YAML = f"""\
_target_: nemo.collections.llm.gpt.model.base.GPTModel
config:
  _target_: nemo.collections.llm.gpt.model.base.GPTConfig
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: {PP}
  virtual_pipeline_model_parallel_size: 2
  num_layers: {CFG["layers"]}
  hidden_size: {CFG["hidden"]}
  num_attention_heads: {CFG["heads"]}
  num_query_groups: {CFG["groups"]}
  kv_channels: {CFG["head_dim"]}
  ffn_hidden_size: {CFG["ffn"]}
  vocab_size: {CFG["vocab"]}
  make_vocab_size_divisible_by: 128
  layernorm_epsilon: 1.0e-05
  normalization: RMSNorm
  gated_linear_unit: true
  activation_func: {{_call_: false, _target_: torch.nn.functional.silu}}
  add_bias_linear: false
  position_embedding_type: rope
  rotary_base: 10000
  seq_length: 128
  share_embeddings_and_output_weights: false
"""


@pytest.fixture(scope="module")
def nemo2_vpp(saved_vpp, tmp_path_factory):
    """{sharding type: NeMo 2 checkpoint of the virtual-pipeline run} with context/model.yaml."""
    import shutil
    base = tmp_path_factory.mktemp("nemo2_vpp")
    out = {}
    for kind in NEMO2_KINDS:
        shutil.copytree(_other(saved_vpp, f"{mcore_dist.NEMO2}{kind}"), base / kind)
        (base / kind / "context").mkdir()
        (base / kind / "context" / "model.yaml").write_text(NEMO2_YAML)
        out[kind] = base / kind
    return out


def test_megatron_core_saves_dp_zero_gather_scatter_with_one_entry_per_buffer(saved_vpp):
    """What megatron-core's dp_zero_gather_scatter save holds with four buffers per rank (the
    facts mapc reads): one object per dp_group_idx, no bucket tensors, the object
    {"buckets_coalesced": True, gbuf_idx: {(param dtype, grad dtype): {param, exp_avg,
    exp_avg_sq, numel_unpadded}}} with gbuf_idx 0..3 in the live buffers' order."""
    import torch.distributed.checkpoint as dcp
    d = str(mcore_dist.iter_dir(_other(saved_vpp, "dp_zero_gather_scatter")))
    md = dcp.FileSystemReader(d).read_metadata().state_dict_metadata
    assert sorted(k for k in md if k.startswith("optimizer.distributed.") and "param_state" in k) \
        == [f"optimizer.distributed.dp_group_idx_{p}.param_state/shard_0_1" for p in range(PP)]
    assert not any(".bucket_idx_" in k for k in md)
    for p in range(PP):
        key = f"optimizer.distributed.dp_group_idx_{p}.param_state/shard_0_1"
        sd = {key: None}
        dcp.load(sd, storage_reader=dcp.FileSystemReader(d), no_dist=True)
        (state,) = sd[key] if isinstance(sd[key], list) else [sd[key]]
        live = torch.load(saved_vpp[1] / f"optim_0_{p}_0.pt")["buffers"]
        assert state.pop("buckets_coalesced") is True
        assert sorted(state) == list(range(len(live))) == [0, 1, 2, 3]
        for g, buf in enumerate(live):
            ((pair, st),) = state[g].items()
            assert tuple(str(x) for x in pair) == buf["dtype"]
            assert st["numel_unpadded"] == buf["buckets"][0][2]


def _assert_hf_is_the_vpp_truth(saved_vpp, path):
    hf = _moments_as_hf(path)
    for slot in ("param", "exp_avg", "exp_avg_sq"):
        want = _hf_of_vpp_truth(saved_vpp[1], "optim", slot)
        assert sorted(hf[slot]) == sorted(want)
        for name, w in want.items():
            assert torch.equal(hf[slot][name], w), (slot, name)


def test_dp_zero_gather_scatter_with_several_buffers_is_read_exactly(saved_vpp, tmp_path):
    """megatron-core's dp_zero_gather_scatter save of the vpp run with fp32 norms (four buffers
    per rank) -> HF with the optimizer: every master and both moments are what megatron-core's
    live optimizer held, bit for bit; step and param groups are read."""
    root = _other(saved_vpp, "dp_zero_gather_scatter")
    mapc.convert(root, tmp_path / "hf", to="hf", with_optimizer=True)
    _assert_hf_is_the_vpp_truth(saved_vpp, tmp_path / "hf")
    with _bound(root) as src:
        state = src.training_state()
        assert _where(src, 0, 1) == _live_where(torch.load(saved_vpp[1] / "optim_0_1_0.pt"))
    assert state["step"] == 1.0 and len(state["param_groups"]) == 2


@pytest.mark.parametrize("kind", NEMO2_KINDS)
def test_nemo2_with_a_virtual_pipeline_is_read_exactly(saved_vpp, nemo2_vpp, kind, tmp_path):
    """NeMo 2's save of the vpp run: the weights' keys are the same global stacked module.
    keys as without a virtual pipeline (model_0/model_1 only nest Lightning's dict), the
    optimizer's megatron-core's of all four buffers; mapc takes the chunks from model.yaml's
    virtual_pipeline_model_parallel_size and reads every master and moment exactly."""
    import torch.distributed.checkpoint as dcp
    md = dcp.FileSystemReader(str(nemo2_vpp[kind] / "weights")).read_metadata()
    keys = md.state_dict_metadata
    qkv = keys["module.decoder.layers.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size)[0] == CFG["layers"]
    assert not any("model_" in k or k.startswith("module.module.") for k in keys)
    if kind == "dp_reshardable":
        assert "optimizer.distributed.dp_group_idx_1.gbuf_idx_3.dtype_(torch.float32, " \
            "torch.float32).bucket_idx_0.exp_avg" in keys or \
            "optimizer.distributed.dp_group_idx_1.gbuf_idx_3.dtype_(torch.bfloat16, " \
            "torch.float32).bucket_idx_0.exp_avg" in keys
    mapc.convert(nemo2_vpp[kind], tmp_path / "hf", to="hf", with_optimizer=True)
    _assert_hf_is_the_vpp_truth(saved_vpp, tmp_path / "hf")


@pytest.mark.parametrize("kind", ("dp_zero_gather_scatter", "nemo2"))
def test_a_state_whose_chunks_are_not_stated_is_refused_in_one_line(saved_vpp, nemo2_vpp, kind,
                                                                    tmp_path):
    """Negative control: without the virtual pipeline size (args; NeMo 2's model.yaml) two
    buffers per rank are derived where four are stored: refused, one line."""
    import shutil
    if kind == "nemo2":
        root = tmp_path / "n2"
        shutil.copytree(nemo2_vpp["dp_zero_gather_scatter"], root)
        yaml = root / "context" / "model.yaml"
        yaml.write_text(yaml.read_text().replace(
            "virtual_pipeline_model_parallel_size: 2", "virtual_pipeline_model_parallel_size: null"))
    else:
        root = _edit_common((_other(saved_vpp, kind), None), tmp_path,
                            _set_args(virtual_pipeline_model_parallel_size=None))
    with pytest.raises(MapcError, match=r"dp_group_idx_0 has the DDP buffers .* give") as e:
        mapc.convert(root, tmp_path / "out", to="hf", with_optimizer=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_nemo_loads_mapc_s_virtual_pipeline_as_it_saves_one(written_vpp):
    """mapc's NeMo 2 output at TP1 PP2 VPP2 DP2: megatron-core, asked for NeMo's vpp dict,
    finds every key (only the Transformer Engine extra states of the attention core and final
    norm, which the local modules lack, are left unread) under NeMo's dp_reshardable; context/
    records the virtual pipeline in the model's config and the strategy, and mapc reads the
    buffers back where the megatron-core run has them."""
    loaded_dir, nemo2 = written_vpp[2], written_vpp[3]
    import json
    import yaml
    for p in range(PP):
        keys = json.loads((loaded_dir / f"keysN_0_{p}_0.json").read_text())
        assert keys["unexpected"] == []
        assert keys["kind"] == "dp_reshardable"
        assert sorted(keys["missing"]) == [
            "module.decoder.final_layernorm._extra_state",
            "module.decoder.layers.self_attention.core_attention._extra_state"]
    config = yaml.safe_load((nemo2 / "context" / "model.yaml").read_text())["config"]
    assert (config["pipeline_model_parallel_size"],
            config["virtual_pipeline_model_parallel_size"]) == (PP, 2)
    io = json.loads((nemo2 / "context" / "io.json").read_text())["objects"]
    (strategy,) = [o for k, o in io.items() if k.startswith("megatron_strategy")]
    assert ["Attr(name='virtual_pipeline_model_parallel_size')",
            {"type": "leaf", "value": 2,
             "paths": ["<root>.trainer.strategy.virtual_pipeline_model_parallel_size"]}] \
        in strategy["items"]
    with _bound(nemo2) as src:
        for p in range(PP):
            assert _where(src, 0, p) == _live_where(torch.load(loaded_dir /
                                                               f"loaded_0_{p}_0.pt"))
