"""A MoE model's distributed optimizer in torch_dist (megatron-core's ChainedOptimizer of a dense
and an expert DistributedOptimizer), against megatron-core 0.16.1 itself.

Ground truth (tests/groundtruth/mcore_moe_optim.py, 2 gloo ranks per run): megatron-core's
Mixtral-style GPTModel (2 layers, 4 experts, bf16) at TP1 EP2 DP2 (expert data-parallel size 1)
with DDP and ``get_megatron_optimizer``'s ChainedOptimizer takes a step on seeded gradients and
saves dp_reshardable (and fully_reshardable); each rank's live optimizers are kept, then one more
step on value gradients. mapc reads it and reshards it to TP1 EP1 DP2 (one optimizer: at ep 1
megatron-core marks no parameter as expert), TP2 EP1 DP1, TP2 EP2 ETP1 DP1 and (fully_reshardable)
TP1 EP1 DP2; one megatron-core run loads each strictly, and steps on. Two megatron-core runs.

The HF tensors expected are put together here from megatron-core's live local tensors, without
mapc's specs: local expert k of expert rank r is global expert r * experts / ep + k, its fc1
[w1; w3] rows cut over the expert tensor-parallel ranks, fc2 columns.
"""
from __future__ import annotations

import dataclasses
import math
import pickle
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import mapc  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from tests.groundtruth import mcore_dist, mcore_moe_optim  # noqa: E402
from tests.test_torch_dist import _bound, _moments_as_hf  # noqa: E402

CFG = dict(hidden=32, layers=2, heads=4, groups=2, head_dim=8, ffn=48, vocab=50, tied=False,
           experts=4, topk=2)
SAVED = (1, 2, 1)                   # (tp, ep, etp) of the saved run: dp 2, expert dp 1
SLOTS = ("param", "exp_avg", "exp_avg_sq")
# (tag, (tp, ep, etp), mapc.convert options, sharding type) of the loads
LOADS = [("ep1", (1, 1, 1), dict(tp=1, ep=1, dp=2), "dp_reshardable"),
         ("tp2", (2, 1, 2), dict(tp=2, ep=1, dp=1), "dp_reshardable"),
         ("etp1", (2, 2, 1), dict(tp=2, ep=2, dp=1, set=["etp=1"]), "dp_reshardable"),
         ("fully", (1, 1, 1), dict(tp=1, ep=1, dp=2, optim_sharding="fully_reshardable"),
          "fully_reshardable")]
# the negative control: mapc's TP1 EP2 DP2 output with the two expert ranks' optimizer state
# swapped (same sizes: megatron-core loads it without a word)
SWAPPED = ("swapped", SAVED, dict(tp=1, ep=2, dp=2), "dp_reshardable")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_optim")
    root = mcore_moe_optim.save(base / "ckpt", CFG, SAVED, base / "truth")
    return root, base / "truth"


def _swap_expert_ranks(d):
    """Rename chained_1's dp_group_idx_0 and dp_group_idx_1 into each other in ``d``'s
    .metadata (torch's own classes)."""
    f = mcore_dist.iter_dir(d) / ".metadata"
    md = pickle.loads(f.read_bytes())
    swap = {"chained_1.optimizer.distributed.dp_group_idx_0.":
            "chained_1.optimizer.distributed.dp_group_idx_1.",
            "chained_1.optimizer.distributed.dp_group_idx_1.":
            "chained_1.optimizer.distributed.dp_group_idx_0."}

    def rename(k):
        for a, b in swap.items():
            if k.startswith(a):
                return b + k[len(a):]
        return k
    md.state_dict_metadata = {rename(k): v for k, v in md.state_dict_metadata.items()}
    md.storage_data = {dataclasses.replace(i, fqn=rename(i.fqn)): v
                       for i, v in md.storage_data.items()}
    f.write_bytes(pickle.dumps(md))


@pytest.fixture(scope="module")
def loaded(saved, tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_optim_load")
    entries = []
    for tag, topo, options, kind in LOADS + [SWAPPED]:
        mapc.convert(saved[0], base / tag, to="torch_dist", **options)
        entries.append((base / tag, topo, tag, kind))
    _swap_expert_ranks(base / "swapped")
    return base, mcore_moe_optim.load(entries, CFG, base / "out")


def _truths(d, prefix):
    return [torch.load(d / f"{prefix}_{r}.pt") for r in range(mcore_moe_optim.WORLD)]


def _local(truths, slot):
    """{(kind, rank key): {live name: tensor}} of ``slot``: every data-parallel rank's piece
    of each optimizer put together, dense per tp rank, experts per (ep, etp) rank (or, at ep 1,
    where megatron-core has one optimizer, every parameter per tp rank)."""
    flat, shapes = {}, {}
    for t in truths:
        for k, opt in enumerate(t["optimizers"]):
            key = ("dense", t["tp"]) if k == 0 else ("expert", t["ep"], t["etp"])
            for name, piece in opt["pieces"].items():
                n = math.prod(t["shapes"][name])
                buf = flat.setdefault(key, {}).setdefault(name, torch.full((n,), float("nan")))
                a, b = piece["range"]
                buf[a:b] = piece[slot]
                shapes[name] = t["shapes"][name]
    for per in flat.values():
        for name, v in per.items():
            assert not v.isnan().any(), name
    return {key: {n: v.view(shapes[n]) for n, v in per.items()} for key, per in flat.items()}


def _hf(local, topo):
    """HF Mixtral tensors from ``_local``'s tensors of a run at ``topo`` = (tp, ep, etp)."""
    tp, ep, etp = topo
    nh, ng, hd, V = CFG["heads"], CFG["groups"], CFG["head_dim"], CFG["vocab"]
    hpg, per = nh // ng, CFG["experts"] // ep
    merged: dict = {}      # live name -> {rank: tensor}, experts keyed by (ep, etp)
    for key, tensors in local.items():
        for name, v in tensors.items():
            merged.setdefault(name, {})[key[1:]] = v

    def cat(name, dim=0):
        return torch.cat([merged[name][(t,)] for t in range(tp)], dim)

    def one(name):
        return next(iter(merged[name].values()))
    out = {"model.embed_tokens.weight": cat("embedding.word_embeddings.weight")[:V],
           "lm_head.weight": cat("output_layer.weight")[:V],
           "model.norm.weight": one("decoder.final_layernorm.weight")}
    for i in range(CFG["layers"]):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = cat(m + "self_attention.linear_qkv.weight").view(ng, hpg + 2, hd, -1)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :hpg].reshape(nh * hd, -1)
        out[h + "self_attn.k_proj.weight"] = qkv[:, hpg].reshape(ng * hd, -1)
        out[h + "self_attn.v_proj.weight"] = qkv[:, hpg + 1].reshape(ng * hd, -1)
        out[h + "self_attn.o_proj.weight"] = cat(m + "self_attention.linear_proj.weight", 1)
        out[h + "input_layernorm.weight"] = one(m + "input_layernorm.weight")
        out[h + "post_attention_layernorm.weight"] = one(m + "pre_mlp_layernorm.weight")
        out[h + "block_sparse_moe.gate.weight"] = one(m + "mlp.router.weight")
        for e in range(CFG["experts"]):
            r, k = divmod(e, per)
            x = f"{m}mlp.experts.local_experts.{k}."

            def shard(name, s):       # expert-TP rank s of expert rank r
                got = merged[x + name]
                return got[(r, s)] if (r, s) in got else got[(s,)]     # ep 1: by tp rank
            fc1 = [shard("linear_fc1.weight", s).chunk(2) for s in range(etp)]
            g = f"{h}block_sparse_moe.experts.{e}."
            out[g + "w1.weight"] = torch.cat([a for a, _ in fc1])
            out[g + "w3.weight"] = torch.cat([b for _, b in fc1])
            out[g + "w2.weight"] = torch.cat([shard("linear_fc2.weight", s)
                                              for s in range(etp)], 1)
    return out


def _assert_equal(got, want, where):
    assert sorted(got) == sorted(want), where
    for name, w in want.items():
        assert got[name].dtype == w.dtype == torch.float32, (where, name)
        assert torch.equal(got[name], w), (where, name)


# ---- what megatron-core saves, and mapc's derivation of it ------------------------------------
def test_megatron_core_saves_two_chained_optimizers(saved):
    """The facts mapc reads: chained_0. (dense, dp_group_idx = tp rank) and chained_1.
    (experts, dp_group_idx = expert rank) prefixes on the dp_reshardable keys, one per
    optimizer entry in common.pt; the expert optimizer has its own param group
    (is_expert_parallel) and the same step."""
    root, truth = saved
    md = pickle.loads((mcore_dist.iter_dir(root) / ".metadata").read_bytes())
    keys = {k.split(".gbuf_idx_")[0] for k in md.state_dict_metadata if ".gbuf_idx_" in k}
    assert keys == {"chained_0.optimizer.distributed.dp_group_idx_0",
                    "chained_1.optimizer.distributed.dp_group_idx_0",
                    "chained_1.optimizer.distributed.dp_group_idx_1"}
    common = torch.load(mcore_dist.iter_dir(root) / "common.pt", weights_only=False)
    assert common["optimizer"] == {0: {"param_state_sharding_type": "dp_reshardable"},
                                   1: {"param_state_sharding_type": "dp_reshardable"}}
    for t in _truths(truth, "optim"):
        dense, expert = t["optimizers"]
        assert (dense["dp_group_idx"], expert["dp_group_idx"]) == (0, t["ep"])
        assert [g["is_expert_parallel"] for g in expert["param_groups"]] == [True]
        assert dense["steps"] == expert["steps"] == [1.0]


def _derived(src, ranks):
    """{(optimizer, live name): (dp_group_idx, gbuf, start in bucket, numel)} mapc derived
    for the rank with ``ranks`` (tp, ep, etp)."""
    out = {}
    for (coord, name), (keys, start, n, _) in src.optimizer.where.items():
        c = dict(coord)
        if (c.get("tp", 0), c.get("ep", 0), c.get("etp", 0)) != ranks:
            continue
        key = keys["param"]
        chain = int(key[len("chained_")]) if key.startswith("chained_") else 0
        group = int(key.split("dp_group_idx_")[1].split(".")[0])
        gbuf = int(key.split(".gbuf_idx_")[1].split(".")[0])
        out[(chain, name)] = (group, gbuf, start, n)
    return out


def _live(t):
    """The same from megatron-core's live optimizers (param_index_map, bucket offsets)."""
    out = {}
    for k, opt in enumerate(t["optimizers"]):
        for b, buf in enumerate(opt["buffers"]):
            for name, (s, e, bucket) in buf["index"].items():
                out[(k, name)] = (opt["dp_group_idx"], b, s - buf["buckets"][bucket][0], e - s)
    return out


@pytest.mark.parametrize("rank", range(mcore_moe_optim.WORLD))
def test_the_derived_layout_is_megatron_cores(saved, rank):
    """Every parameter of both optimizers is where megatron-core's live buffers put it: its
    optimizer, dp_group_idx, buffer, place in the bucket and size."""
    root, truth = saved
    t = _truths(truth, "optim")[rank]
    with _bound(root) as src:
        assert _derived(src, (t["tp"], t["ep"], t["etp"])) == _live(t)


def test_a_wrong_expert_order_fails_the_comparison(saved):
    """Negative control of the comparison above: the experts of each layer in the reverse
    order inside their bucket is not megatron-core's layout."""
    root, truth = saved
    t = _truths(truth, "optim")[0]
    with _bound(root) as src:
        derived = _derived(src, (0, 0, 0))
    experts = sorted(n for c, n in derived if c == 1)
    swapped = dict(derived)
    a, b = (f"decoder.layers.0.mlp.experts.local_experts.{k}.linear_fc1.weight" for k in (0, 1))
    swapped[(1, a)], swapped[(1, b)] = derived[(1, b)], derived[(1, a)]
    assert len(experts) == 8 and swapped != _live(t)


@pytest.mark.parametrize("kind", ["dp_reshardable", "fully_reshardable"])
def test_every_slot_is_read_exactly(saved, kind, tmp_path):
    """torch_dist (TP1 EP2 DP2, a ChainedOptimizer) -> HF with the optimizer: every master and
    moment, of the dense and of the expert parameters, is what megatron-core's live optimizers
    held, bit for bit (vocabulary padding rows aside)."""
    root, truth = saved
    src = root if kind == "dp_reshardable" else root.parent / f"{root.name}_{kind}"
    mapc.convert(src, tmp_path / "hf", to="hf", with_optimizer=True)
    got = _moments_as_hf(tmp_path / "hf")
    for slot in SLOTS:
        _assert_equal(got[slot], _hf(_local(_truths(truth, "optim"), slot), SAVED), slot)
    with _bound(tmp_path / "hf") as hf:
        assert hf.training_state()["step"] == 1.0


# ---- mapc's output, loaded by megatron-core ---------------------------------------------------
@pytest.mark.parametrize("tag,topo", [(tag, topo) for tag, topo, _, _ in LOADS])
@pytest.mark.parametrize("prefix,want", [("loaded", "optim"), ("stepped", "stepped")])
def test_megatron_core_loads_mapcs_output_and_continues(saved, loaded, tag, topo, prefix, want):
    """megatron-core at (tp, ep, etp) loads mapc's output strictly: what its optimizer(s) hold
    equals the original TP1 EP2 DP2 run's state, bit for bit; the next step on the same value
    gradients equals the original run's next step bit for bit (the data-parallel means of equal
    halves are exact at every dp and expert dp here). At ep 1 megatron-core has one optimizer
    (the experts are dense there)."""
    truths = _truths(loaded[1], f"{tag}_{prefix}")
    for t in truths:
        assert len(t["optimizers"]) == (2 if topo[1] > 1 else 1)
        for opt in t["optimizers"]:
            assert opt["steps"] == ([1.0] if prefix == "loaded" else [2.0])
    for slot in SLOTS:
        _assert_equal(_hf(_local(truths, slot), topo),
                      _hf(_local(_truths(saved[1], want), slot), SAVED), (tag, prefix, slot))


@pytest.mark.parametrize("tag", [tag for tag, _, _, _ in LOADS if tag != "fully"])
def test_megatron_core_has_the_layout_mapc_wrote(loaded, tag):
    """Every rank of each load has both optimizers' parameters where mapc derived them."""
    for t in _truths(loaded[1], f"{tag}_loaded"):
        with _bound(loaded[0] / tag) as src:
            derived = _derived(src, (t["tp"], t["ep"], t["etp"]))
        assert derived == _live(t), tag


def test_swapped_expert_ranks_fail_the_comparison(saved, loaded):
    """Negative control: the two expert ranks' state swapped in mapc's output (equal sizes:
    megatron-core loads it) leaves the dense state right and the experts' wrong."""
    truths = _truths(loaded[1], "swapped_loaded")
    want = _hf(_local(_truths(saved[1], "optim"), "exp_avg"), SAVED)
    got = _hf(_local(truths, "exp_avg"), SAVED)
    experts = [n for n in want if ".experts." in n]
    assert all(torch.equal(got[n], want[n]) for n in want if n not in experts)
    assert not any(torch.equal(got[n], want[n]) for n in experts)


def test_the_load_takes_the_param_groups(saved, loaded):
    """Both optimizers' param groups (the expert one's is_expert_parallel), with the step."""
    want = [opt["param_groups"] for opt in _truths(saved[1], "optim")[0]["optimizers"]]
    got = [opt["param_groups"] for opt in _truths(loaded[1], "etp1_loaded")[0]["optimizers"]]
    assert [[g.pop("step") for g in groups] for groups in got] == [[1.0, 1.0], [1.0]]
    assert got == want


# ---- through other formats, and refusals ------------------------------------------------------
def _buckets(root):
    """{key: tensor} of every distributed-optimizer bucket, read with torch's DCP."""
    import torch.distributed.checkpoint as dcp
    d = str(mcore_dist.iter_dir(root))
    md = dcp.FileSystemReader(d).read_metadata()
    sd = {k: torch.empty(m.size, dtype=torch.float32) for k, m in md.state_dict_metadata.items()
          if ".bucket_idx_" in k}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(d), no_dist=True)
    return sd


def _not_state(truth):
    """{bucket key prefix: mask of the elements that are no optimizer state}: the alignment
    gaps between parameters (megatron-core saves them uninitialized) and the embedding's and
    output layer's vocabulary padding rows (which HF does not keep), from megatron-core's live
    param_index_map of each optimizer of each rank."""
    out = {}
    for t in _truths(truth, "optim"):
        for k, opt in enumerate(t["optimizers"]):
            (buf,) = opt["buffers"]
            ((offset, _, unpadded),) = buf["buckets"]
            mask = torch.ones(unpadded, dtype=torch.bool)
            for name, (s, e, _) in buf["index"].items():
                state = e - s
                if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                    state = CFG["vocab"] * CFG["hidden"]
                mask[s - offset:s - offset + state] = False
            out[f"chained_{k}.optimizer.distributed.dp_group_idx_{opt['dp_group_idx']}."] = mask
    return out


@pytest.mark.parametrize("via,options", [("hf", {"with_optimizer": True}),
                                         ("nemo2", {"tp": 2, "ep": 1})])
def test_the_state_comes_back_as_megatron_core_saved_it(saved, via, options, tmp_path):
    """torch_dist -> FORMAT -> torch_dist at the saved TP1 EP2 DP2: every bucket of both
    optimizers holds what megatron-core saved, bit for bit; what is no state there (alignment
    gaps, the vocabulary padding rows HF does not keep) is zeros in mapc's."""
    root, truth = saved
    mapc.convert(root, tmp_path / via, to=via, **options)
    mapc.convert(tmp_path / via, tmp_path / "back", to="torch_dist", tp=1, ep=2, dp=2,
                 dtype="bf16")
    want, got = _buckets(root), _buckets(tmp_path / "back")
    assert sorted(got) == sorted(want) and len(want) == 3 * 3
    masks = _not_state(truth)
    assert len(masks) == 3
    for key, w in want.items():
        keep = ~next(m for prefix, m in masks.items() if key.startswith(prefix))
        assert torch.equal(got[key][keep], w[keep]), key
        assert not got[key][~keep].any()


def test_swapped_optimizers_are_refused_in_one_line(saved, tmp_path):
    """Negative control of the reader: chained_0 and chained_1 renamed into each other: their
    buffers are not where the derivation puts the dense and expert parameters."""
    root = tmp_path / "ckpt"
    shutil.copytree(saved[0], root)
    f = mcore_dist.iter_dir(root) / ".metadata"
    md = pickle.loads(f.read_bytes())

    def rename(k):
        return {"0": "chained_1.", "1": "chained_0."}[k[8]] + k[10:] \
            if k.startswith("chained_") else k
    md.state_dict_metadata = {rename(k): v for k, v in md.state_dict_metadata.items()}
    md.storage_data = {dataclasses.replace(i, fqn=rename(i.fqn)): v
                       for i, v in md.storage_data.items()}
    f.write_bytes(pickle.dumps(md))
    with pytest.raises(MapcError, match=r"optimizer of chained_[01]\.dp_group_idx_\d") as e:
        mapc.convert(root, tmp_path / "out", to="hf", with_optimizer=True)
    assert "\n" not in e.value.message
    assert not (tmp_path / "out").exists()


def test_an_expert_dp_that_is_no_whole_number_is_refused(saved, tmp_path):
    with pytest.raises(MapcError, match=r"expert data-parallel size") as e:
        mapc.convert(saved[0], tmp_path / "out", to="torch_dist", tp=1, ep=2, dp=1)
    assert "\n" not in e.value.message
    assert not (tmp_path / "out").exists()


def test_the_write_plan_shows_both_optimizers(saved, tmp_path):
    cp = mapc.plan_convert(saved[0], tmp_path / "out", to="torch_dist", tp=2, ep=2, dp=1,
                           set=["etp=1"])
    try:
        text = cp.write.pretty()
    finally:
        cp.close()
    assert "chained_0.dp_group_idx_1: [" in text and "chained_1.dp_group_idx_1: [" in text, text
