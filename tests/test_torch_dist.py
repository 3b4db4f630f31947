"""megatron-core distributed checkpoints (torch_dist), against megatron-core 0.16.1 itself.

Ground truth: tests/groundtruth/mcore_dist.py builds megatron-core's GPTModel (local spec,
bf16 through Float16Module as Megatron-LM does, GQA, SwiGLU, padded vocabulary) at TP2 PP2 on
CPU with gloo, saves ``dist_checkpointing.save`` of its sharded state dict the way Megatron-LM
lays out the root, and keeps every rank's live local state dict. megatron-core then loads the
checkpoint at TP1 PP1 with its own ``dist_checkpointing.load`` and runs its forward.
One save and one load are shared by the whole module.
"""
from __future__ import annotations

import json
import math
import pickle
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import mapc  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from mapc.runtime.containers import detect_format, open_source  # noqa: E402
from tests.conftest import logits_of  # noqa: E402
from tests.groundtruth import mcore_dist  # noqa: E402

CFG = dict(hidden=64, layers=4, heads=8, groups=2, head_dim=8, ffn=96, vocab=250, tied=False)
TIED = dict(CFG, tied=True)
TP, PP = 2, 2
PADDED = 256                       # round_up(250, 128 * tp)
TOKENS = [1, 5, 9, 200, 3, 7, 249, 0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint root, directory of the live per-rank state dicts) saved by megatron-core."""
    base = tmp_path_factory.mktemp("torch_dist")
    root = mcore_dist.save_checkpoint(base / "ckpt", CFG, TP, PP, "bf16", base / "truth")
    return root, base / "truth"


@pytest.fixture(scope="module")
def saved_tied(tmp_path_factory):
    """Tied embeddings at TP1 PP2, saved by megatron-core."""
    base = tmp_path_factory.mktemp("torch_dist_tied")
    root = mcore_dist.save_checkpoint(base / "ckpt", TIED, 1, 2, "bf16", base / "truth")
    return root, base / "truth"


@pytest.fixture(scope="module")
def loaded_tp1(saved, tmp_path_factory):
    """megatron-core's own TP1 PP1 fp32 load of the checkpoint, with its forward's logits."""
    out = tmp_path_factory.mktemp("torch_dist_tp1")
    return mcore_dist.load_checkpoint(saved[0], CFG, 1, 1, "fp32", out, tokens=TOKENS)


@pytest.fixture(scope="module")
def hf_out(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_dist_hf") / "hf"
    mapc.convert(saved[0], out, to="hf")
    return out


def _hf_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _expected_local(hf, tp, pp, t, p, cfg=CFG):
    """megatron-core's local state dict of rank (t, p) (local spec names, local layer numbers)
    from HF tensors, written out independently of mapc's specs: Q/K/V rows grouped per KV
    group, fc1 = [gate_t; up_t], column/row slices, vocabulary rows of this rank (the padding
    rows, which HF does not keep, are left out)."""
    nh, ng, hd, f = cfg["heads"], cfg["groups"], cfg["head_dim"], cfg["ffn"]
    hpg, per = nh // ng, cfg["layers"] // pp
    out = {}
    vp = PADDED // tp
    rows = slice(t * vp, min((t + 1) * vp, cfg["vocab"]))
    if p == 0:
        out["embedding.word_embeddings.weight"] = hf["model.embed_tokens.weight"][rows]
    for j in range(per):
        i = p * per + j
        h = f"model.layers.{i}."
        q, k, v = (hf[h + f"self_attn.{n}_proj.weight"] for n in "qkv")
        groups = [torch.cat([q[g * hpg * hd:(g + 1) * hpg * hd], k[g * hd:(g + 1) * hd],
                             v[g * hd:(g + 1) * hd]]) for g in range(ng)]
        mine = groups[t * ng // tp:(t + 1) * ng // tp]
        fs = slice(t * f // tp, (t + 1) * f // tp)
        cs = slice(t * nh * hd // tp, (t + 1) * nh * hd // tp)
        m = f"decoder.layers.{j}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = torch.cat(mine)
        out[m + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"][:, cs]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"][fs],
                                                      hf[h + "mlp.up_proj.weight"][fs]])
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"][:, fs]
    if p == pp - 1:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not cfg["tied"]:
            out["output_layer.weight"] = hf["lm_head.weight"][rows]
        elif pp > 1:     # the last stage's copy of the embedding
            out["output_layer.weight"] = hf["model.embed_tokens.weight"][rows]
    return out


def _assert_hf_holds_the_live_state(hf, truth):
    """Every slot of the HF export (``_moments_as_hf``) cut at TP2 equals what each rank of the
    original TP2 DP2 run's live optimizer held."""
    for slot, tensors in hf.items():
        for t in range(2):
            _assert_rank_equal(_truth_local(truth, t, slot), _expected_local(tensors, 2, 1, t, 0),
                               (slot, t))


def _assert_rank_equal(live, expected, where):
    assert sorted(live) == sorted(expected), where
    for name, want in expected.items():
        got = live[name][:want.shape[0]] if name.endswith(("word_embeddings.weight",
                                                           "output_layer.weight")) else live[name]
        assert got.dtype == want.dtype, (where, name, got.dtype, want.dtype)
        assert torch.equal(got, want), (where, name)


# ---- what megatron-core writes (the facts the container relies on) ------------------------------
def test_megatron_core_writes_the_documented_layout(saved):
    root, _ = saved
    d = mcore_dist.iter_dir(root)
    assert (root / "latest_checkpointed_iteration.txt").read_text() == str(mcore_dist.ITERATION)
    assert json.loads((d / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert sorted(p.name for p in d.glob("*.distcp")) == \
        [f"__{r}_{k}.distcp" for r in range(TP * PP) for k in range(2)]
    common = torch.load(d / "common.pt", weights_only=False)
    assert {"args", "checkpoint_version", "iteration", "opt_param_scheduler",
            "content_metadata"} <= set(common)
    assert common["content_metadata"]["singleton_local_shards"] is False
    md = pickle.loads((d / ".metadata").read_bytes())    # torch's own classes, test side only
    sd = md.state_dict_metadata
    L, H, F = CFG["layers"], CFG["hidden"], CFG["ffn"]
    qkv = (CFG["heads"] + 2 * CFG["groups"]) * CFG["head_dim"]
    assert tuple(sd["decoder.layers.self_attention.linear_qkv.weight"].size) == (L, qkv, H)
    assert tuple(sd["decoder.layers.self_attention.linear_qkv.layer_norm_weight"].size) == (L, H)
    assert tuple(sd["decoder.layers.mlp.linear_fc1.layer_norm_weight"].size) == (L, H)
    assert tuple(sd["embedding.word_embeddings.weight"].size) == (PADDED, H)
    # one chunk per layer and tp rank; fc1 rank t writes rows t*F/tp and F + t*F/tp
    fc1 = sd["decoder.layers.mlp.linear_fc1.weight"]
    assert sorted(tuple(c.offsets) for c in fc1.chunks) == sorted(
        (i, r, 0) for i in range(L) for t in range(TP) for r in (t * F // TP, F + t * F // TP))
    assert all(tuple(c.sizes) == (1, F // TP, H) for c in fc1.chunks)
    extra = [k for k in sd if "_extra_state" in k]
    assert extra and all(type(sd[k]).__name__ == "BytesStorageMetadata" for k in extra)
    assert "decoder.layers.mlp.linear_fc1._extra_state/shard_0_4" in sd


def test_detected_at_the_root_and_the_iteration_directory(saved):
    root, _ = saved
    assert detect_format(root) == "torch_dist"
    assert detect_format(mcore_dist.iter_dir(root)) == "torch_dist"


def test_inspect_reports_the_saved_topology_and_the_stacked_slabs(saved):
    root, _ = saved
    info = mapc.inspect(root)
    assert info["format"] == "torch_dist" and info["family"] == "llama"
    assert info["saved_topology"] == {"tp": TP, "pp": PP}
    assert info["params"] == {"vocab_multiple": 128, "tp_size": TP, "pp_size": PP}
    assert info["config"]["vocab"] == CFG["vocab"] and info["config"]["groups"] == 2
    names = {t["name"]: t for s in info["shards"] for t in s["tensors"]}
    slab = names["decoder.layers.self_attention.linear_qkv.weight[3]"]
    assert slab["shape"] == [96, 64] and slab["dtype"] == "bfloat16"
    assert info["training"]["iteration"] == mcore_dist.ITERATION


# ---- reading -----------------------------------------------------------------------------------
@pytest.mark.parametrize("t,p", [(t, p) for t in range(TP) for p in range(PP)])
def test_hf_output_equals_the_live_shards_megatron_core_saved(saved, hf_out, t, p):
    """Every live parameter shard of every rank that saved the checkpoint equals the slice of
    mapc's HF output that megatron-core's layout puts there, bit for bit (bf16 kept)."""
    live = torch.load(saved[1] / f"live_{t}_{p}.pt")
    _assert_rank_equal(live, _expected_local(_hf_tensors(hf_out), TP, PP, t, p), (t, p))


def test_hf_output_equals_what_megatron_core_loads_at_tp1(loaded_tp1, hf_out):
    """megatron-core's own dist_checkpointing.load at TP1 PP1 (fp32 model) holds exactly the
    HF output's tensors in megatron-core's layout."""
    live = torch.load(loaded_tp1 / "loaded_0_0.pt")
    hf = {k: v.float() for k, v in _hf_tensors(hf_out).items()}
    _assert_rank_equal(live, _expected_local(hf, 1, 1, 0, 0), "tp1")


def test_logits_equal_megatron_core_forward(loaded_tp1, hf_out):
    """transformers' forward on mapc's HF output (fp32) against megatron-core's own forward on
    its TP1 load of the same checkpoint (fp32): two implementations of the same math, so equal
    to float rounding (1.8e-6 at most on logits up to 2.7 when measured; 2e-5 allowed)."""
    want = torch.load(loaded_tp1 / "logits.pt")[0, :, :CFG["vocab"]]
    got = logits_of(hf_out, TOKENS)
    got = torch.as_tensor(np.asarray(got, dtype=np.float32)).reshape(want.shape)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_args_with_megatron_enums_are_read_as_inert_values(saved):
    """Megatron-LM's args hold megatron enums and torch dtypes; mapc reads them without
    importing megatron (each an inert Call of its class on its value)."""
    from mapc.runtime import torchfile
    with open_source(saved[0]) as src:
        assert src.args["attention_backend"] == torchfile.Call(
            "megatron.core.transformer.enums", "AttnBackend", (5,))
        assert src.args["model_type"] == torchfile.Call("megatron.core.enums", "ModelType", (1,))
        assert src.args["cuda_graph_scope"] == [torchfile.Call(
            "megatron.core.transformer.enums", "CudaGraphScope", (2,))]


def test_tied_embeddings_at_pp2_have_no_output_layer_key(saved_tied, tmp_path):
    """megatron-core stores the tied last-stage copy under the embedding's key (a replica), so
    the checkpoint has no output_layer.weight; mapc reads it as tied, and every rank's live
    shards (the last stage's copy of the embedding too) equal the HF output."""
    root, truth = saved_tied
    md = pickle.loads((mcore_dist.iter_dir(root) / ".metadata").read_bytes())
    assert "output_layer.weight" not in md.state_dict_metadata
    assert "embedding.word_embeddings.weight" in md.state_dict_metadata
    mapc.convert(root, tmp_path / "hf", to="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"]
    hf = _hf_tensors(tmp_path / "hf")
    assert "lm_head.weight" not in hf
    for p in range(2):
        live = torch.load(truth / f"live_0_{p}.pt")
        _assert_rank_equal(live, _expected_local(hf, 1, 2, 0, p, TIED), p)


def test_reading_never_materializes_a_stacked_tensor(saved):
    """Each slab is read from only the chunks that hold it: [L, ...] is never assembled."""
    root, _ = saved
    with open_source(root) as src:
        assert "decoder.layers.mlp.linear_fc1.weight" not in src.names()
        a = src.read("decoder.layers.mlp.linear_fc1.weight[2]")
        assert a.shape == (2 * CFG["ffn"], CFG["hidden"])
        key, index, (shape, _, chunks) = src._get("decoder.layers.mlp.linear_fc1.weight[2]")
        assert index == 2 and shape[0] == CFG["layers"]


# ---- writing -------------------------------------------------------------------------------------
# (tied, the (tp, pp) mapc writes for, the (tp, pp) megatron-core loads it at): every written
# topology is loaded at another one, tied embeddings with PP>1 on both sides
WRITES = [(False, (2, 2), (2, 1)), (False, (2, 1), (1, 2)), (True, (1, 2), (2, 2))]


@pytest.fixture(scope="module")
def hf_tied(saved_tied, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_dist_hf_tied") / "hf"
    mapc.convert(saved_tied[0], out, to="hf")
    return out


@pytest.mark.parametrize("tied,written,load_at", WRITES)
def test_megatron_core_loads_what_mapc_wrote(request, tied, written, load_at, tmp_path):
    """mapc writes torch_dist from HF for (tp, pp) = written; megatron-core's
    dist_checkpointing.load (strict: every key its model asks for, _extra_state included)
    loads it into a model at load_at, and every rank's loaded tensors equal independent slices
    of the HF weights, bit for bit."""
    hf = request.getfixturevalue("hf_tied" if tied else "hf_out")
    cfg = TIED if tied else CFG
    out = tmp_path / "dist"
    mapc.convert(hf, out, to="torch_dist", tp=written[0], pp=written[1])
    common = torch.load(out / "release" / "common.pt", weights_only=False)
    assert common["args"].tensor_model_parallel_size == written[0]
    assert common["args"].pipeline_model_parallel_size == written[1]
    assert common["args"].padded_vocab_size == PADDED and common["iteration"] == 0
    assert common["checkpoint_version"] == 3.0
    md = pickle.loads((out / "release" / ".metadata").read_bytes())
    assert ("output_layer.weight" in md.state_dict_metadata) == (not tied)
    tp, pp = load_at
    loaded = mcore_dist.load_checkpoint(out, cfg, tp, pp, "bf16", tmp_path / "loaded")
    tensors = _hf_tensors(hf)
    for t in range(tp):
        for p in range(pp):
            live = torch.load(loaded / f"loaded_{t}_{p}.pt")
            _assert_rank_equal(live, _expected_local(tensors, tp, pp, t, p, cfg), (t, p))


def test_written_checkpoint_reads_back_bit_for_bit(hf_out, tmp_path):
    """HF -> torch_dist -> HF is the identity, and the output is laid out as megatron-core's:
    stacked [L, ...] tensors stored one chunk per layer."""
    mapc.convert(hf_out, tmp_path / "dist", to="torch_dist", tp=2, pp=2)
    mapc.convert(tmp_path / "dist", tmp_path / "back", to="hf")
    assert mapc.verify(hf_out, tmp_path / "back").identical
    md = pickle.loads((tmp_path / "dist" / "release" / ".metadata").read_bytes())
    fc1 = md.state_dict_metadata["decoder.layers.mlp.linear_fc1.weight"]
    assert tuple(fc1.size) == (CFG["layers"], 2 * CFG["ffn"], CFG["hidden"])
    assert sorted(tuple(c.offsets) for c in fc1.chunks) == [(i, 0, 0) for i in range(4)]
    assert "decoder.layers.mlp.linear_fc1._extra_state/shard_3_4" in md.state_dict_metadata


# ---- the distributed optimizer (dp_reshardable): what megatron-core writes, read --------------
# saved_optim (tests/conftest.py, one megatron-core run shared with tests/test_nemo2_optim.py):
# TP2 DP2, megatron-core's DDP + DistributedOptimizer (Adam, bf16 params, fp32 grads and
# masters, one bucket) after one step, saved with its dp_reshardable state and as
# fully_reshardable, dp_zero_gather_scatter, Megatron-LM's legacy torch format and NeMo 2.


BUCKET = "optimizer.distributed.dp_group_idx_{t}.gbuf_idx_0.dtype_(torch.bfloat16, " \
    "torch.float32).bucket_idx_0.{slot}"


@pytest.mark.parametrize("t", [0, 1])
def test_dp_reshardable_buckets_are_ddp_layout(saved_optim, t):
    """Per tensor-parallel rank one flat fp32 tensor per (param dtype, grad dtype) bucket and
    slot; its parameters in reverse named_parameters order, each starting on a 64-element
    boundary (one chunk each), the bucket-end padding dropped (per_bucket_numel_unpadded), and
    the fp32 master at each parameter's range rounds to the live bf16 parameter."""
    root, truth = saved_optim
    d = mcore_dist.iter_dir(root)
    md = pickle.loads((d / ".metadata").read_bytes())
    live = torch.load(truth / f"live_{t}_0.pt")
    starts, pos = [], 0
    for name, v in reversed(list(live.items())):
        pos = -(-pos // 64) * 64
        starts.append((name, pos, v.numel()))
        pos += v.numel()
    entry = md.state_dict_metadata[BUCKET.format(t=t, slot="param")]
    assert tuple(entry.size) == (pos,) and entry.properties.dtype == torch.float32
    assert sorted((c.offsets[0], c.sizes[0]) for c in entry.chunks) == \
        [(s, n) for _, s, n in starts]
    for slot in ("exp_avg", "exp_avg_sq"):
        assert tuple(md.state_dict_metadata[BUCKET.format(t=t, slot=slot)].size) == (pos,)
    assert f"optimizer.distributed.dp_group_idx_{t}.per_bucket_numel_unpadded/shard_0_1" in \
        md.state_dict_metadata
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    key = BUCKET.format(t=t, slot="param")
    loaded = {key: torch.empty(pos)}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(d)),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    flat = loaded[key]
    for name, start, n in starts:
        master = flat[start:start + n].view(live[name].shape)
        assert torch.equal(master.to(torch.bfloat16), live[name]), name
    common = torch.load(d / "common.pt", weights_only=False)
    assert common["optimizer"] == {"param_state_sharding_type": "dp_reshardable"}


def _truth_local(truth, t, slot, p=0, dp=2, prefix="optim", shapes=None):
    """Rank (t, p)'s local tensors of ``slot`` ("param": fp32 master, "exp_avg", "exp_avg_sq")
    as megatron-core's live DistributedOptimizer held them (``PREFIX_T_P_D.pt`` of the
    harness): every DP rank's piece put at the range of the parameter it covers (all elements
    covered). ``shapes``: the local shapes (default: the live state dict saved there)."""
    if shapes is None:
        shapes = {n: v.shape for n, v in torch.load(truth / f"live_{t}_{p}.pt").items()}
    flat = {}
    for d in range(dp):
        for name, piece in torch.load(truth / f"{prefix}_{t}_{p}_{d}.pt")["pieces"].items():
            a, b = piece["range"]
            flat.setdefault(name, torch.full((math.prod(shapes[name]),), float("nan")))[a:b] = \
                piece[slot]
    assert sorted(flat) == sorted(shapes)
    assert not any(v.isnan().any() for v in flat.values())
    return {n: v.view(shapes[n]) for n, v in flat.items()}


def _to_hf(local, tp, pp, cfg=CFG):
    """HF tensors from megatron-core local tensors ``local[(t, p)]`` (the inverse of
    _expected_local, written out on its own; vocabulary padding rows dropped)."""
    nh, ng, hd = cfg["heads"], cfg["groups"], cfg["head_dim"]
    hpg, per = nh // ng, cfg["layers"] // pp
    V = cfg["vocab"]
    cat = lambda name, p, dim=0: torch.cat([local[(t, p)][name] for t in range(tp)], dim)  # noqa
    out = {"model.embed_tokens.weight": cat("embedding.word_embeddings.weight", 0)[:V],
           "model.norm.weight": local[(0, pp - 1)]["decoder.final_layernorm.weight"],
           "lm_head.weight": cat("output_layer.weight", pp - 1)[:V]}
    for i in range(cfg["layers"]):
        p, j = divmod(i, per)
        m, h = f"decoder.layers.{j}.", f"model.layers.{i}."
        qkv = cat(m + "self_attention.linear_qkv.weight", p).view(ng, hpg + 2, hd, -1)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :hpg].reshape(nh * hd, -1)
        out[h + "self_attn.k_proj.weight"] = qkv[:, hpg].reshape(ng * hd, -1)
        out[h + "self_attn.v_proj.weight"] = qkv[:, hpg + 1].reshape(ng * hd, -1)
        out[h + "self_attn.o_proj.weight"] = cat(m + "self_attention.linear_proj.weight", p, 1)
        fc1 = [local[(t, p)][m + "mlp.linear_fc1.weight"].chunk(2) for t in range(tp)]
        out[h + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in fc1])
        out[h + "mlp.up_proj.weight"] = torch.cat([u for _, u in fc1])
        out[h + "mlp.down_proj.weight"] = cat(m + "mlp.linear_fc2.weight", p, 1)
        out[h + "input_layernorm.weight"] = local[(0, p)][m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = local[(0, p)][m + "pre_mlp_layernorm.weight"]
    return out


def _bound(path):
    """mapc's opened source of ``path``, resolved (its optimizer layout derived)."""
    from mapc.compiler.resolve import resolve
    src = open_source(path)
    resolve(src)
    return src


@pytest.mark.parametrize("t", [0, 1])
def test_derived_bucket_layout_is_megatron_cores(saved_optim, t):
    """Where mapc derives each parameter inside the bucket (from the spec's megatron layout at
    the saved TP) is megatron-core's live DDP param_index_map, for every parameter of the rank,
    and the model-parallel rank is its data_parallel_group_idx."""
    root, truth = saved_optim
    live = torch.load(truth / f"optim_{t}_0_0.pt")
    assert live["dp_group_idx"] == t
    (buffer,) = live["buffers"]
    assert buffer["dtype"] == ("torch.bfloat16", "torch.float32")
    ((offset, numel, unpadded),) = buffer["buckets"]
    assert numel > unpadded          # the end padding, which the checkpoint drops
    want = {name: (s - offset, e - s) for name, (s, e, _) in buffer["index"].items()}
    with _bound(root) as src:
        got = {name: (start, n) for (coord, name), (_, start, n, _) in
               src.optimizer.where.items() if dict(coord)["tp"] == t}
    assert got == want


def _moments_as_hf(path):
    """{slot: {HF name: tensor}} of an HF Trainer export (weights: the fp32 masters)."""
    with _bound(path) as src:
        names = src.names()
        out = {slot: {n: torch.from_numpy(np.array(src.read(n, slot=slot))) for n in names}
               for slot in ("exp_avg", "exp_avg_sq")}
    out["param"] = _hf_tensors(path)
    return out


# (format, options): the distributed optimizer's state goes there, and (unless hf) on to HF
CARRIED = [("hf", {"with_optimizer": True}), ("megatron", {"tp": 2}), ("megatron", {"tp": 1}),
           ("deepspeed", {"dp": 2}), ("neox", {}), ("megatron", {"tp": 1, "pp": 2, "dp": 3})]


@pytest.mark.parametrize("to,options", CARRIED)
def test_every_slot_is_carried_exactly(saved_optim, to, options, tmp_path):
    """torch_dist (TP2 DP2, dp_reshardable) -> FORMAT [-> HF with optimizer]: the fp32 masters
    (HF's weights) and both Adam moments are, at every rank's slice of megatron-core's layout,
    what megatron-core's live DistributedOptimizer held, bit for bit (vocabulary padding rows
    aside, which HF does not keep)."""
    root, truth = saved_optim
    out = tmp_path / to
    mapc.convert(root, out, to=to, **options)
    if to != "hf":
        mapc.convert(out, tmp_path / "hf", to="hf", with_optimizer=True)
        out = tmp_path / "hf"
    hf = _moments_as_hf(out)
    assert hf["param"]["model.norm.weight"].dtype == torch.float32
    _assert_hf_holds_the_live_state(hf, truth)


def test_fully_reshardable_is_read_exactly(saved_optim, tmp_path):
    """megatron-core's fully_reshardable save of the same optimizer (one bucket: 0.16.1's
    values are right then): optimizer.state.<slot>.<model key> at global shapes; through HF
    every slot equals what each rank's live optimizer held, and the step and groups are read."""
    root, truth = saved_optim
    fully = root.parent / "ckpt_fully_reshardable"
    md = pickle.loads((mcore_dist.iter_dir(fully) / ".metadata").read_bytes())
    L, F, H = CFG["layers"], CFG["ffn"], CFG["hidden"]
    assert tuple(md.state_dict_metadata[
        "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight"].size) == (L, 2 * F, H)
    mapc.convert(fully, tmp_path / "hf", to="hf", with_optimizer=True)
    hf = _moments_as_hf(tmp_path / "hf")
    _assert_hf_holds_the_live_state(hf, truth)
    with _bound(fully) as src:
        state = src.training_state()
    assert state["step"] == 1.0 and len(state["param_groups"]) == 2


def test_dp_zero_gather_scatter_is_read_exactly(saved_optim, tmp_path):
    """megatron-core's (deprecated) dp_zero_gather_scatter save of the same optimizer: one
    object per model-parallel rank holding its buckets gathered from the DP ranks (Megatron-LM's
    legacy distrib_optim.pt layout), no optimizer tensors; through HF every slot equals what
    each rank's live optimizer held."""
    root, truth = saved_optim
    zero = root.parent / "ckpt_dp_zero_gather_scatter"
    md = pickle.loads((mcore_dist.iter_dir(zero) / ".metadata").read_bytes())
    assert "optimizer.distributed.dp_group_idx_1.param_state/shard_0_1" in md.state_dict_metadata
    assert not any(k.startswith("optimizer.") and not k.endswith("/shard_0_1")
                   for k in md.state_dict_metadata)
    mapc.convert(zero, tmp_path / "hf", to="hf", with_optimizer=True)
    hf = _moments_as_hf(tmp_path / "hf")
    _assert_hf_holds_the_live_state(hf, truth)
    with _bound(zero) as src:
        state = src.training_state()
    assert state["step"] == 1.0 and len(state["param_groups"]) == 2


def test_legacy_distrib_optim_pt_is_read_exactly(saved_optim, tmp_path):
    """Megatron-LM's torch format with the distributed optimizer (model_optim_rng.pt per rank,
    beside it distrib_optim.pt from megatron-core's save_parameter_state): through HF every
    slot equals what each rank's live optimizer held; step and groups are read."""
    root, truth = saved_optim
    legacy = root.parent / "ckpt_legacy"
    assert detect_format(legacy) == "megatron"
    assert (legacy / f"iter_{mcore_dist.ITERATION:07d}" / "mp_rank_01" / "distrib_optim.pt"
            ).is_file()
    report = mapc.convert(legacy, tmp_path / "hf", to="hf", with_optimizer=True)
    assert not any("weights only" in w for w in report.warnings)
    hf = _moments_as_hf(tmp_path / "hf")
    _assert_hf_holds_the_live_state(hf, truth)
    with _bound(legacy) as src:
        state = src.training_state()
    assert state["step"] == 1.0 and len(state["param_groups"]) == 2
    assert state["dp_world_size"] == 2


# ---- Megatron-LM's torch format with the distributed optimizer, written -------------------------
def _legacy_rank(root, t, p=None):
    sub = root / f"iter_{mcore_dist.ITERATION:07d}" / (f"mp_rank_{t:02d}" +
                                                        (f"_{p:03d}" if p is not None else ""))
    return (torch.load(sub / "model_optim_rng.pt", weights_only=False),
            torch.load(sub / "distrib_optim.pt"))


@pytest.mark.parametrize("source", ["ckpt_legacy", "ckpt"])
def test_legacy_distrib_optim_pt_is_megatron_cores_own(saved_optim, source, tmp_path):
    """--to megatron at the saved TP2 DP2 from megatron-core's own legacy save (the distributed
    optimizer is kept: the source has one) or from its torch_dist save (--dp 2): every rank's
    distrib_optim.pt is what megatron-core's save_parameter_state wrote, key for key and bit for
    bit, and model_optim_rng.pt's optimizer entry is its DistributedOptimizer.state_dict()."""
    root, truth = saved_optim
    legacy = root.parent / "ckpt_legacy"
    mapc.convert(root.parent / source, tmp_path / "m", to="megatron", tp=2,
                 **({"dp": 2} if source == "ckpt" else {}))
    for t in range(2):
        obj, state = _legacy_rank(tmp_path / "m", t)
        want_obj, want = _legacy_rank(legacy, t)
        assert list(state) == list(want) == ["buckets_coalesced", 0]
        pair = (torch.bfloat16, torch.float32)
        assert list(state[0]) == list(want[0]) == [pair]
        got, exp = state[0][pair], want[0][pair]
        assert list(got) == list(exp) == ["param", "exp_avg", "exp_avg_sq", "numel_unpadded"]
        assert got["numel_unpadded"] == exp["numel_unpadded"]
        # the vocabulary padding rows (megatron-core's random init; mapc writes zeros, HF does
        # not keep them): where megatron-core's live DDP buffer put them (param_index_map)
        (buffer,) = torch.load(truth / f"optim_{t}_0_0.pt")["buffers"]
        keep = torch.ones(exp["numel_unpadded"], dtype=torch.bool)
        real = CFG["vocab"] - t * (PADDED // 2)
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            start, end, _ = buffer["index"][name]
            keep[start + min(real, PADDED // 2) * CFG["hidden"]:end] = False
        assert (~keep).sum() == (6 * 2 * CFG["hidden"] if t else 0)
        for k in ("param", "exp_avg", "exp_avg_sq"):
            assert got[k].dtype == torch.float32 and got[k].shape == exp[k].shape
            assert torch.equal(got[k][keep], exp[k][keep]), (t, k)
            assert not got[k][~keep].any()
        assert obj["optimizer"] == want_obj["optimizer"]
        assert obj["args"].use_distributed_optimizer and obj["args"].data_parallel_size == 2
        assert obj["opt_param_scheduler"] == want_obj["opt_param_scheduler"]
        assert obj["iteration"] == mcore_dist.ITERATION


@pytest.fixture(scope="module")
def loaded_legacy(saved_optim, tmp_path_factory):
    """mapc writes the TP2 DP2 torch_dist checkpoint as Megatron-LM's torch format with the
    distributed optimizer at TP1 PP2 DP3; megatron-core loads every rank's model_optim_rng.pt
    and, with DistributedOptimizer.load_parameter_state, its distrib_optim.pt (one process
    group), then takes the next step on value gradients."""
    base = tmp_path_factory.mktemp("legacy_optim_load")
    mapc.convert(saved_optim[0], base / "m", to="megatron", tp=1, pp=2, dp=3)
    return base / "m", mcore_dist.load_optimizer(base / "m", CFG, 1, 2, 3, "bf16",
                                                 base / "loaded", legacy=True)


@pytest.mark.parametrize("prefix", ["loaded", "stepped"])
@pytest.mark.parametrize("slot", ["param", "exp_avg", "exp_avg_sq"])
def test_megatron_core_loads_the_legacy_distributed_optimizer_mapc_wrote(
        saved_optim, loaded_legacy, prefix, slot):
    """What megatron-core's DistributedOptimizer holds at TP1 PP2 DP3 after loading mapc's
    distrib_optim.pt equals the original TP2 DP2 run's state at every rank's slice, bit for
    bit; after one more step, the original run's own next step (to STEP_RTOL/STEP_ATOL: the DP
    mean over 3 ranks rounds differently); the step and param groups are loaded."""
    truth = saved_optim[1]
    want = _hf_of_truth(truth, "stepped" if prefix == "stepped" else "optim", slot)
    for p in range(2):
        expected = _expected_local(want, 1, 2, 0, p)
        shapes = {n: v.shape for n, v in expected.items()}
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in shapes:
                shapes[name] = (PADDED, CFG["hidden"])
        got = _truth_local(loaded_legacy[1], 0, slot, p=p, dp=3, prefix=prefix, shapes=shapes)
        if prefix == "stepped":
            for name, e in expected.items():
                torch.testing.assert_close(got[name][:e.shape[0]], e, rtol=STEP_RTOL,
                                           atol=STEP_ATOL, msg=lambda m: f"{name}: {m}")
        else:
            _assert_rank_equal(got, expected, (slot, p))
    live = torch.load(truth / "optim_0_0_0.pt")
    for p in range(2):
        for d in range(3):
            loaded = torch.load(loaded_legacy[1] / f"loaded_0_{p}_{d}.pt")
            assert loaded["steps"] == live["steps"] == [1.0]
            assert [g.pop("step") for g in loaded["param_groups"]] == [1.0, 1.0]
            assert loaded["param_groups"] == live["param_groups"]


def test_legacy_distributed_optimizer_round_trips(saved_optim, tmp_path):
    """megatron-core's legacy save (TP2 DP2) -> megatron at TP1 PP2 DP3 -> neox -> megatron at
    TP2 DP1 -> HF with optimizer: every slot is what the live optimizer held, bit for bit."""
    root, truth = saved_optim
    mapc.convert(root.parent / "ckpt_legacy", tmp_path / "a", to="megatron", tp=1, pp=2, dp=3)
    mapc.convert(tmp_path / "a", tmp_path / "n", to="neox")
    mapc.convert(tmp_path / "n", tmp_path / "b", to="megatron", tp=2, dp=1)
    assert (tmp_path / "b" / f"iter_{mcore_dist.ITERATION:07d}" / "mp_rank_01" /
            "distrib_optim.pt").is_file()
    mapc.convert(tmp_path / "b", tmp_path / "hf", to="hf", with_optimizer=True)
    _assert_hf_holds_the_live_state(_moments_as_hf(tmp_path / "hf"), truth)
    with _bound(tmp_path / "b") as src:
        assert src.training_state()["dp_world_size"] == 1


# ---- --like a checkpoint with the distributed optimizer ------------------------------------------
def _optimizer_entries(root):
    md = pickle.loads((mcore_dist.iter_dir(root) / ".metadata").read_bytes())
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items()
            if k.startswith("optimizer.") and hasattr(v, "size")}


def test_like_a_torch_dist_template_takes_its_optimizer_sharding(saved_optim, tmp_path):
    """--like megatron-core's fully_reshardable save: the output (from the legacy torch-format
    save of the same run) is fully_reshardable too, with exactly the template's optimizer keys
    and shapes, at the template's DP; every slot is the live optimizer's, bit for bit."""
    root, truth = saved_optim
    fully = root.parent / "ckpt_fully_reshardable"
    mapc.convert(root.parent / "ckpt_legacy", tmp_path / "td", like=fully)
    common = torch.load(mcore_dist.iter_dir(tmp_path / "td") / "common.pt", weights_only=False)
    assert common["optimizer"]["param_state_sharding_type"] == "fully_reshardable"
    assert common["args"].data_parallel_size == 2
    assert _optimizer_entries(tmp_path / "td") == _optimizer_entries(fully)
    mapc.convert(tmp_path / "td", tmp_path / "hf", to="hf", with_optimizer=True)
    _assert_hf_holds_the_live_state(_moments_as_hf(tmp_path / "hf"), truth)
    with pytest.raises(MapcError, match=r"contradicts --optim-sharding dp_reshardable \(the "
                                        r"template has fully_reshardable\)"):
        mapc.convert(root, tmp_path / "x", like=fully, optim_sharding="dp_reshardable")


def test_like_a_megatron_template_takes_its_distributed_optimizer(saved_optim, tmp_path):
    """--like megatron-core's legacy save (distributed optimizer, DP2): the torch_dist
    checkpoint's state is written as distrib_optim.pt, megatron-core's own bytes (padding rows
    aside: test_legacy_distrib_optim_pt_is_megatron_cores_own); --like a non-distributed
    Megatron checkpoint writes the non-distributed optimizer (its DP is not a layout)."""
    root, truth = saved_optim
    mapc.convert(root, tmp_path / "m", like=root.parent / "ckpt_legacy")
    obj, state = _legacy_rank(tmp_path / "m", 0)
    _, want = _legacy_rank(root.parent / "ckpt_legacy", 0)
    pair = (torch.bfloat16, torch.float32)
    for k in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(state[0][pair][k], want[0][pair][k]), k
    assert obj["args"].data_parallel_size == 2
    mapc.convert(root, tmp_path / "plain", to="megatron", tp=2)
    mapc.convert(root, tmp_path / "m2", like=tmp_path / "plain")
    sub = tmp_path / "m2" / f"iter_{mcore_dist.ITERATION:07d}" / "mp_rank_00"
    assert not (sub / "distrib_optim.pt").exists()
    assert torch.load(sub / "model_optim_rng.pt", weights_only=False)["optimizer"][
        "optimizer"]["state"]


def test_dp_for_megatron_needs_optimizer_state(hf_out, tmp_path):
    with pytest.raises(MapcError, match="--dp 2 sets the data-parallel size of megatron-core's "
                                        "distributed optimizer, but the source has no "
                                        "optimizer state"):
        mapc.convert(hf_out, tmp_path / "out", to="megatron", dp=2)
    assert not (tmp_path / "out").exists()


def test_step_param_groups_and_scheduler_are_carried(saved_optim, tmp_path):
    """Megatron (torch format) output of the torch_dist checkpoint: megatron-core's param
    groups (hyper-parameters), the Adam step, the scheduler and the iteration."""
    root, truth = saved_optim
    live = torch.load(truth / "optim_0_0_0.pt")
    mapc.convert(root, tmp_path / "m", to="megatron", tp=2)
    for t in range(2):
        obj = torch.load(tmp_path / "m" / f"iter_{mcore_dist.ITERATION:07d}" / f"mp_rank_0{t}" /
                         "model_optim_rng.pt", weights_only=False)
        inner = obj["optimizer"]["optimizer"]
        assert [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]] \
            == live["param_groups"]
        assert {float(st["step"]) for st in inner["state"].values()} == set(live["steps"])
        assert obj["opt_param_scheduler"] == {"max_lr": 1e-3, "num_steps": mcore_dist.ITERATION}
        assert obj["iteration"] == mcore_dist.ITERATION
    info = mapc.inspect(root)
    assert info["training"]["optimizer_slots"] == ["master", "exp_avg", "exp_avg_sq"]
    assert info["training"]["step"] == 1.0 and info["training"]["dp_world_size"] == 2


def test_weights_of_a_distributed_optimizer_checkpoint_are_its_masters(saved_optim, tmp_path):
    """HF weights of a training checkpoint are its fp32 masters (as from every other training
    format); rounded to bf16 they are the live weights megatron-core saved."""
    root, truth = saved_optim
    report = mapc.convert(root, tmp_path / "hf", to="hf")
    assert not any("not read" in w for w in report.warnings)
    tensors = {k: v.to(torch.bfloat16) for k, v in _hf_tensors(tmp_path / "hf").items()}
    for t in range(2):
        live = torch.load(truth / f"live_{t}_0.pt")
        _assert_rank_equal(live, _expected_local(tensors, 2, 1, t, 0), t)


# ---- the distributed optimizer written: megatron-core loads it and continues the run -----------
# (tp, pp, dp) mapc writes the TP2 PP1 DP2 state for: the same DP (the continuation is then
# bit-exact), and another DP (3: other bucket padding and DP partition boundaries)
LOAD_AT = [(1, 2, 2), (1, 1, 3)]
# At another DP the DP mean of the (equal) gradients rounds differently (g/3 summed 3 times is
# not always g): the continuation step then agrees to these tolerances (measured: 3e-8 at most
# on masters and moments; the step itself moves masters by up to 1e-3, moments by up to 0.13)
STEP_RTOL, STEP_ATOL = 1e-6, 1e-7


@pytest.fixture(scope="module", params=LOAD_AT, ids=lambda t: "tp%d-pp%d-dp%d" % t)
def loaded_optim(request, saved_optim, tmp_path_factory):
    """mapc reshards the TP2 DP2 checkpoint to torch_dist at (tp, pp, dp), dp_reshardable and
    fully_reshardable; megatron-core builds that model with DDP + DistributedOptimizer, loads
    mapc's outputs (strict), and takes the next step on value gradients (the step the original
    run took after saving). One megatron-core process group per topology."""
    tp, pp, dp = request.param
    base = tmp_path_factory.mktemp(f"torch_dist_optim_load_{tp}{pp}{dp}")
    mapc.convert(saved_optim[0], base / "ckpt", to="torch_dist", tp=tp, pp=pp, dp=dp)
    mapc.convert(saved_optim[0], base / "fully", to="torch_dist", tp=tp, pp=pp, dp=dp,
                 optim_sharding="fully_reshardable")
    return base / "ckpt", mcore_dist.load_optimizer(base / "ckpt", CFG, tp, pp, dp, "bf16",
                                                    base / "loaded", fully=base / "fully"), \
        request.param


def _hf_of_truth(truth, prefix, slot):
    """The original run's (TP2 PP1 DP2) slot as HF tensors."""
    return _to_hf({(t, 0): _truth_local(truth, t, slot, prefix=prefix) for t in range(2)}, 2, 1)


@pytest.mark.parametrize("prefix", ["loaded", "loadedF", "stepped"])
@pytest.mark.parametrize("slot", ["param", "exp_avg", "exp_avg_sq"])
def test_megatron_core_loads_the_optimizer_mapc_wrote_and_continues_the_run(
        saved_optim, loaded_optim, prefix, slot):
    """What megatron-core's DistributedOptimizer holds at (tp, pp, dp) after loading mapc's
    output ("loaded") equals the original TP2 DP2 run's state at every rank's slice, bit for
    bit, and so after loading mapc's fully_reshardable output of it ("loadedF"); after one more
    step on the same (value) gradients ("stepped") it equals the original run's own next step:
    bit for bit at the same DP (Adam is elementwise), to STEP_RTOL/STEP_ATOL at another DP."""
    truth = saved_optim[1]
    tp, pp, dp = loaded_optim[2]
    want = _hf_of_truth(truth, "stepped" if prefix == "stepped" else "optim", slot)
    for t in range(tp):
        for p in range(pp):
            expected = _expected_local(want, tp, pp, t, p)
            shapes = {n: v.shape for n, v in expected.items()}
            for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if name in shapes:
                    shapes[name] = (PADDED // tp, CFG["hidden"])
            got = _truth_local(loaded_optim[1], t, slot, p=p, dp=dp, prefix=prefix,
                               shapes=shapes)
            if prefix == "stepped" and dp != 2:
                assert sorted(got) == sorted(expected)
                for name, e in expected.items():
                    g = got[name][:e.shape[0]]
                    torch.testing.assert_close(g, e, rtol=STEP_RTOL, atol=STEP_ATOL,
                                               msg=lambda m: f"{name}: {m}")
            else:
                _assert_rank_equal(got, expected, (prefix, slot, t, p))


def test_megatron_core_loads_the_step_and_param_groups(saved_optim, loaded_optim):
    live = torch.load(saved_optim[1] / "optim_0_0_0.pt")
    tp, pp, dp = loaded_optim[2]
    for p in range(pp):
        for d in range(dp):
            loaded = torch.load(loaded_optim[1] / f"loaded_0_{p}_{d}.pt")
            assert loaded["steps"] == live["steps"] == [1.0]
            assert [g.pop("step") for g in loaded["param_groups"]] == [1.0, 1.0]
            assert loaded["param_groups"] == live["param_groups"]
            assert torch.load(loaded_optim[1] / f"stepped_0_{p}_{d}.pt")["steps"] == [2.0]
    common = torch.load(mcore_dist.iter_dir(loaded_optim[0]) / "common.pt", weights_only=False)
    assert common["optimizer"] == {"param_state_sharding_type": "dp_reshardable"}
    assert common["opt_param_scheduler"] == {"max_lr": 1e-3, "num_steps": mcore_dist.ITERATION}
    assert common["args"].data_parallel_size == dp and common["args"].use_distributed_optimizer


@pytest.mark.parametrize("via,options", [("hf", {"with_optimizer": True}),
                                         ("deepspeed", {"dp": 2}), ("neox", {"dp": 3})])
@pytest.mark.parametrize("sharding", ["dp_reshardable", "fully_reshardable"])
def test_the_state_comes_back_to_torch_dist_exactly(saved_optim, via, options, sharding,
                                                   tmp_path):
    """torch_dist (TP2 DP2) -> FORMAT -> torch_dist (TP1 PP2 DP3) -> HF with optimizer: every
    slot equals what megatron-core's live optimizer held, bit for bit, and the step and param
    groups survive (the torch_dist output's layout is megatron-core's: loaded_optim)."""
    root, truth = saved_optim
    mapc.convert(root, tmp_path / via, to=via, **options)
    mapc.convert(tmp_path / via, tmp_path / "td", to="torch_dist", tp=1, pp=2, dp=3,
                 optim_sharding=sharding)
    mapc.convert(tmp_path / "td", tmp_path / "back", to="hf", with_optimizer=True)
    hf = _moments_as_hf(tmp_path / "back")
    _assert_hf_holds_the_live_state(hf, truth)
    with _bound(tmp_path / "td") as src:
        state = src.training_state()
    assert state["step"] == 1.0 and state["dp_world_size"] == 3
    live = torch.load(truth / "optim_0_0_0.pt")["param_groups"]
    assert sorted((g["wd_mult"], g["lr"], g["weight_decay"]) for g in state["param_groups"]) == \
        sorted((g["wd_mult"], g["lr"], g["weight_decay"]) for g in live)


@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_resharding_chains_keep_every_slot(saved_optim, tmp_path_factory, data):
    """Property: torch_dist (TP2 DP2, megatron-core's) -> torch_dist at a drawn (tp, pp, dp,
    sharding) -> torch_dist at another -> HF with optimizer: every slot is still what
    megatron-core's live optimizer held, bit for bit (pp up to 4: stages after the first,
    layouts of mapc's own writing read back)."""
    root, truth = saved_optim
    draw = lambda: (data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 2, 4])),  # noqa: E731
                    data.draw(st.integers(1, 8)),
                    data.draw(st.sampled_from(["dp_reshardable", "fully_reshardable"])))
    base = tmp_path_factory.mktemp("chain")
    src = root
    for i, (tp, pp, dp, kind) in enumerate([draw(), draw()]):
        mapc.convert(src, base / f"td{i}", to="torch_dist", tp=tp, pp=pp, dp=dp,
                     optim_sharding=kind)
        src = base / f"td{i}"
    mapc.convert(src, base / "hf", to="hf", with_optimizer=True)
    hf = _moments_as_hf(base / "hf")
    _assert_hf_holds_the_live_state(hf, truth)


def test_the_write_plan_shows_the_optimizer_layout(saved_optim, tmp_path):
    cp = mapc.plan_convert(saved_optim[0], tmp_path / "out", to="torch_dist", tp=1, pp=2, dp=3)
    try:
        text = cp.write.pretty()
    finally:
        cp.close()
    assert "dp: 3" in text and "transformer_impl: local" in text
    assert "dp_group_idx_0: [" in text and "dp_group_idx_1: [" in text
    assert not (tmp_path / "out").exists()


def test_the_megatron_write_plan_shows_the_distributed_optimizer(saved_optim, tmp_path):
    cp = mapc.plan_convert(saved_optim[0], tmp_path / "out", to="megatron", tp=1, pp=2, dp=3)
    try:
        text = cp.write.pretty()
        assert "iter_0000007/mp_rank_00_001/distrib_optim.pt" in cp.write.files
        assert any("laid out for dp=3" in n for n in cp.write.notes)
    finally:
        cp.close()
    assert "dp: 3" in text and "dp_group_idx_1: [" in text
    assert not (tmp_path / "out").exists()


def test_optim_sharding_is_a_torch_dist_option(saved_optim, tmp_path):
    with pytest.raises(MapcError, match="--to megatron does not take --optim-sharding "
                                        "fully_reshardable.*taken by: torch_dist"):
        mapc.convert(saved_optim[0], tmp_path / "out", to="megatron",
                     optim_sharding="fully_reshardable")
    assert not (tmp_path / "out").exists()


def test_dp_without_optimizer_state_is_refused(hf_out, tmp_path):
    with pytest.raises(MapcError, match="--dp 2 sets the distributed optimizer's data-parallel "
                                        "size, but the source has no optimizer state"):
        mapc.convert(hf_out, tmp_path / "out", to="torch_dist", dp=2)
    assert not (tmp_path / "out").exists()


def _edit_common(saved, tmp_path, edit):
    root, d = _copy(saved, tmp_path)
    common = torch.load(d / "common.pt", weights_only=False)
    edit(common)
    torch.save(common, d / "common.pt")
    return root


def test_layer_order_is_found_by_the_masters_without_transformer_impl(saved_optim, tmp_path):
    """Without args.transformer_impl, the local spec's and Transformer Engine's parameter
    orders are both tried; the one whose fp32 masters round to the weights is taken."""
    root = _edit_common(saved_optim, tmp_path, lambda c: delattr(c["args"], "transformer_impl"))
    want = _truth_local(saved_optim[1], 1, "exp_avg")["decoder.layers.2.mlp.linear_fc2.weight"]
    with _bound(root) as src:
        got = src.read("decoder.layers.mlp.linear_fc2.weight[2]", slot="exp_avg")
    assert torch.equal(torch.from_numpy(got)[:, CFG["ffn"] // 2:], want)


def _set_args(**kw):
    def edit(common):
        for k, v in kw.items():
            setattr(common["args"], k, v)
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set_args(transformer_impl="transformer_engine"),
     r"fp32 masters do not round to the stored weights \(decoder\.layers\..* differs with "
     r"the te layout\)"),
    (_set_args(overlap_grad_reduce=True, ddp_bucket_size=20000),
     r"buckets of dp_group_idx_0 \(tp=0, pp=0\) hold \[74304\] elements, but megatron-core's "
     r"bucket layout of the model's parameters gives \[2"),
    (lambda c: c["optimizer"].update(param_state_sharding_type="fully_sharded_model_space"),
     "saved as 'fully_sharded_model_space', which mapc does not read"),
])
def test_an_optimizer_layout_mapc_cannot_derive_is_refused(saved_optim, tmp_path, edit,
                                                           message):
    root = _edit_common(saved_optim, tmp_path, edit)
    with pytest.raises(MapcError, match=message) as e:
        mapc.convert(root, tmp_path / "out", to="megatron")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# ---- refusals ------------------------------------------------------------------------------------
def _copy(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved[0], dst)
    return dst, mcore_dist.iter_dir(dst)


def test_another_sharded_backend_is_refused(saved, tmp_path):
    root, d = _copy(saved, tmp_path)
    (d / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(MapcError, match="'zarr' backend; mapc reads torch_dist only"):
        mapc.convert(root, tmp_path / "out", to="hf")
    assert not (tmp_path / "out").exists()


def test_singleton_local_shards_is_refused_with_the_reason(saved, tmp_path):
    root, d = _copy(saved, tmp_path)
    common = torch.load(d / "common.pt", weights_only=False)
    common["content_metadata"]["singleton_local_shards"] = True
    torch.save(common, d / "common.pt")
    with pytest.raises(MapcError, match="singleton_local_shards"):
        mapc.inspect(root)


def test_missing_common_pt_is_named(saved, tmp_path):
    root, d = _copy(saved, tmp_path)
    (d / "common.pt").unlink()
    with pytest.raises(MapcError, match="no common.pt"):
        mapc.convert(root, tmp_path / "out", to="hf")
    assert not (tmp_path / "out").exists()
