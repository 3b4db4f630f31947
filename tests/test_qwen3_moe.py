"""specs/qwen3_moe.map (Qwen3 attention, MoE in some layers, `extends "qwen3"`) against the real
libraries. A transformers Qwen3MoeForCausalLM with dense and MoE layers (mlp_only_layers) goes
hf -> megatron (tp, pp, ep, uneven stages) -> hf with identical logits; mapc's Megatron file
loaded into a real megatron-core GPTModel (MoE via moe_layer_freq, qk_layernorm, local spec, on
CPU) computes transformers' logits; one world of real GPTModels at pp=2 with an uneven first
stage has exactly the per-rank state-dict names and shapes of mapc's files, and megatron-core's
global layer numbering matches the values mapc put there; expert parallel files hold the HF
experts e = ep_rank * E/ep + k; deepspeed/universal round trips; GGUF (llama.cpp's qwen3moe)
for an all-MoE model and a refusal, with the spec's message, for one with dense layers;
torch_dist and nemo2 (megatron-core's per-layer keys) loaded by megatron-core's strict
dist_checkpointing.load in the same world as the Megatron file, and its own save read back;
for a model with MoE in every layer, the stacked torch_dist keys megatron-core saves with an
integer moe_layer_freq (--set keys=stacked) the same way."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import mapc
from mapc.errors import MapcError
from mapc.runtime import torchfile
from tests.conftest import assert_same_safetensors, build_transformers_model, logits_of

torch = pytest.importorskip("torch")
TOKENS = [1, 5, 9, 3, 7, 2, 8, 4, 11, 0]
# 3 layers: 0 dense (mlp_only_layers), 1 and 2 MoE; head_dim 8 is not hidden / heads (8 too,
# but Qwen3 states its own); top-2 of 4 experts, renormalized (norm_topk_prob)
CFG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=32,
           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
           mlp_only_layers=[0], decoder_sparse_step=1, norm_topk_prob=True, vocab_size=50,
           max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# megatron-core's MoE forward in fp32 on CPU against transformers' (observed: 7e-8)
MCORE_TOLERANCE = 1e-5


def _groundtruth(name):
    path = Path(__file__).parent / "groundtruth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_groundtruth_{name}_qwen3_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe") / "hf"
    model = build_transformers_model(CFG, path)
    return path, logits_of(model, TOKENS)


def mcore_cfg(**extra):
    return {"hidden": 32, "layers": 3, "heads": 4, "groups": 2, "head_dim": 8, "ffn": 48,
            "vocab": 128, "tied": False, "qk_layernorm": True, "norm_eps": 1e-6,
            "rotary_base": 10000, "experts": 4, "moe_ffn": 16, "topk": 2,
            "moe_layer_freq": [0, 1, 1], "pre_softmax": False, **extra}


def _rank_file(root, name):
    return root / "release" / name / "model_optim_rng.pt"


@pytest.mark.parametrize("topo", [dict(tp=2, ep=2), dict(pp=3, ep=4), dict(tp=2, pp=2, ep=2,
                                                                         pp_first_stage=1),
                                  dict(tp=2, ep=2, set={"etp": "1"})],
                         ids=["tp2-ep2", "pp3-ep4", "tp2-uneven-pp2-ep2", "tp2-ep2-etp1"])
def test_megatron_round_trip_keeps_logits(tmp_path, hf, topo):
    src, ref = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", **topo)
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["mlp_only_layers"] == [0] and back["moe_intermediate_size"] == 16
    if topo.get("set"):     # etp=1: megatron-core's expert grid, whole experts per file
        files = sorted(p.name for p in (tmp_path / "mg" / "release").iterdir())
        assert files == ["mp_rank_00_000", "mp_rank_01_001"]


# NeMo 2 saves with the Transformer Engine spec: mapc's nemo2 output has the _extra_state of
# its attention core, q/k norms and final norm, which megatron-core's local modules do not have
NEMO2_TE_EXTRA = ["module.decoder.final_layernorm._extra_state"] + [
    f"module.decoder.layers.{i}.self_attention.{m}._extra_state"
    for i in range(3) for m in ("core_attention", "q_layernorm", "k_layernorm")]
# the args of megatron-core's own save (mcore_dist's, for this model)
SAVE_ARGS = {"qk_layernorm": True, "norm_epsilon": 1e-6, "kv_channels": 8, "ffn_hidden_size": 48,
             "num_experts": 4, "moe_ffn_hidden_size": 16, "moe_router_topk": 2,
             "moe_layer_freq": [0, 1, 1], "moe_router_pre_softmax": False,
             "moe_router_score_function": "softmax", "moe_grouped_gemm": False}


@pytest.fixture(scope="module")
def mcore_world(tmp_path_factory, hf):
    """One megatron-core process (mcore_forward's world): mapc's Megatron file loaded strictly,
    with the logits, also with two experts exchanged (negative control); mapc's torch_dist and
    NeMo 2 outputs loaded by megatron-core's own dist_checkpointing.load (strict), with the
    logits of each; then the model loaded from mapc's Megatron file saved by megatron-core as
    torch_dist (dense and MoE layers: megatron-core's per-layer keys)."""
    pytest.importorskip("megatron.core")
    src, _ = hf
    d = tmp_path_factory.mktemp("qwen3_moe_mcore")
    mapc.convert(src, d / "td", to="torch_dist")
    mapc.convert(src, d / "n2", to="nemo2")
    mapc.convert(src, d / "mg", to="megatron")
    a, b = ("decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
            "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight")
    logits = _groundtruth("mcore_forward").mcore_logits(
        dict(mcore_cfg(), true_vocab=50), _rank_file(d / "mg", "mp_rank_00"), TOKENS, [
            {}, {"swap": [a, b]},
            {"dist": str(d / "td" / "release"), "out": str(d / "loaded_td.pt")},
            {"dist": str(d / "n2" / "weights"), "prefix": "module.", "unread": NEMO2_TE_EXTRA},
            {"dist_save": str(d / "saved"), "args": SAVE_ARGS}])
    return d, [np.array(x)[..., :50] for x in logits]


def test_megatron_core_computes_transformers_logits(hf, mcore_world):
    src, ref = hf
    _, (ours, swapped, _, _, _) = mcore_world
    assert np.abs(ours - ref.numpy()).max() <= MCORE_TOLERANCE
    # negative control: two experts' fc1 exchanged in one layer change the logits
    assert np.abs(swapped - ref.numpy()).max() > 1e-4


def test_megatron_core_ranks_are_mapcs_files_with_uneven_stages(tmp_path, hf):
    """One pp=2 world of real GPTModels (num_layers_in_first_pipeline_stage=1): per rank the
    state-dict names and shapes are those of mapc's file (stage 0: the dense layer, stage 1: two
    MoE layers), and each local layer holds the HF layer megatron-core numbers it."""
    pytest.importorskip("megatron.core")
    from safetensors.numpy import load_file
    src, _ = hf
    w = load_file(str(src / "model.safetensors"))
    mapc.convert(src, tmp_path / "mg", to="megatron", pp=2, pp_first_stage=1)
    truth = _groundtruth("mcore_names").mcore_ranks(mcore_cfg(layers_first_stage=1), 1, 2)
    assert [truth[(0, p)]["layers"] for p in (0, 1)] == [[0], [1, 2]]
    for p in (0, 1):
        model = torchfile.load(_rank_file(tmp_path / "mg", f"mp_rank_00_{p:03d}"))["model"]
        assert {n: list(v.shape) for n, v in model.items()} == truth[(0, p)]["shapes"], p
        for j, g in enumerate(truth[(0, p)]["layers"]):
            np.testing.assert_array_equal(
                np.asarray(model[f"decoder.layers.{j}.self_attention.linear_proj.weight"]),
                w[f"model.layers.{g}.self_attn.o_proj.weight"])


def test_dense_and_moe_layers_and_args(tmp_path, hf):
    src, _ = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", set=["naming=te"])
    f = torchfile.load(_rank_file(tmp_path / "mg", "mp_rank_00"))
    model, args = f["model"], f["args"]
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in model      # dense, TE
    assert "decoder.layers.0.mlp.router.weight" not in model
    for i in (1, 2):        # MoE: its own pre-MLP norm even under TE names
        assert f"decoder.layers.{i}.pre_mlp_layernorm.weight" in model
        assert f"decoder.layers.{i}.mlp.linear_fc1.weight" not in model
        assert f"decoder.layers.{i}.mlp.experts.local_experts.3.linear_fc2.weight" in model
    assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk,
            args.moe_layer_freq, args.moe_router_pre_softmax, args.qk_layernorm) == \
        (4, 16, 2, [0, 1, 1], False, True)


def test_expert_parallel_ranks_hold_their_experts(tmp_path, hf):
    from safetensors.numpy import load_file
    src, _ = hf
    w = load_file(str(src / "model.safetensors"))
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, ep=2)
    for ep in range(2):
        m = torchfile.load(_rank_file(tmp_path / "mg", f"mp_rank_01_{ep:03d}"))["model"]
        for k in range(2):
            e = ep * 2 + k
            fc1 = np.asarray(m[f"decoder.layers.2.mlp.experts.local_experts.{k}.linear_fc1.weight"])
            g = w[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"]
            u = w[f"model.layers.2.mlp.experts.{e}.up_proj.weight"]
            np.testing.assert_array_equal(fc1, np.concatenate([g[8:], u[8:]]))   # tp rank 1
        np.testing.assert_array_equal(np.asarray(m["decoder.layers.2.mlp.router.weight"]),
                                      w["model.layers.2.mlp.gate.weight"])


@pytest.mark.parametrize("fmt", ["deepspeed", "universal"])
def test_training_formats_round_trip(tmp_path, hf, fmt):
    src, ref = hf
    mapc.convert(src, tmp_path / "x", to=fmt)
    mapc.convert(tmp_path / "x", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


def test_gguf_refuses_dense_layers_with_the_specs_message(tmp_path, hf):
    pytest.importorskip("gguf")
    with pytest.raises(MapcError) as e:
        mapc.convert(hf[0], tmp_path / "g", to="gguf")
    assert "llama.cpp's qwen3moe architecture has MoE in every layer" in str(e.value)
    assert "specs/qwen3_moe.map:" in str(e.value)
    assert not (tmp_path / "g").exists()


def test_all_moe_model_through_gguf_with_llama_cpp_names(tmp_path):
    gguf = pytest.importorskip("gguf")
    cfg = dict(CFG, num_hidden_layers=2, mlp_only_layers=[])
    model = build_transformers_model(cfg, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "g", to="gguf")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen3moe"
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE]}
    names = {t.name[:-len(".weight")] for t in reader.tensors}
    assert names == {n.replace("{bid}", str(b)) for n in allowed for b in (0, 1)
                     if "{bid}" in n} | {n for n in allowed if "{bid}" not in n}
    mapc.convert(tmp_path / "g", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), logits_of(model, TOKENS))


# ---- torch_dist (and NeMo 2): megatron-core's per-layer keys for dense and MoE layers --------
def test_torch_dist_loads_strictly_into_megatron_core_with_transformers_logits(hf, mcore_world):
    from safetensors.numpy import load_file
    src, ref = hf
    d, (_, _, td, n2, _) = mcore_world
    assert np.abs(td - ref.numpy()).max() <= MCORE_TOLERANCE
    assert np.abs(n2 - ref.numpy()).max() <= MCORE_TOLERANCE
    w = load_file(str(src / "model.safetensors"))
    loaded = torch.load(d / "loaded_td.pt")
    # what megatron-core loaded, against slices of the HF weights taken here
    mlp = "decoder.layers.{}.mlp."
    np.testing.assert_array_equal(
        loaded[mlp.format(0) + "linear_fc1.weight"].numpy(),
        np.concatenate([w[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up")]))
    for i in (1, 2):
        np.testing.assert_array_equal(loaded[mlp.format(i) + "router.weight"].numpy(),
                                      w[f"model.layers.{i}.mlp.gate.weight"])
        # (the local module's name; the checkpoint key is linear_fc1.layer_norm_weight)
        np.testing.assert_array_equal(
            loaded[f"decoder.layers.{i}.pre_mlp_layernorm.weight"].numpy(),
            w[f"model.layers.{i}.post_attention_layernorm.weight"])
        for e in range(4):
            hfe = f"model.layers.{i}.mlp.experts.{e}."
            ours = mlp.format(i) + f"experts.local_experts.{e}."
            np.testing.assert_array_equal(
                loaded[ours + "linear_fc1.weight"].numpy(),
                np.concatenate([w[hfe + "gate_proj.weight"], w[hfe + "up_proj.weight"]]))
            np.testing.assert_array_equal(loaded[ours + "linear_fc2.weight"].numpy(),
                                          w[hfe + "down_proj.weight"])


def test_torch_dist_and_nemo2_round_trips_are_bit_exact(tmp_path, hf, mcore_world):
    src, ref = hf
    d, _ = mcore_world
    for kind in ("td", "n2"):
        mapc.convert(d / kind, tmp_path / kind, to="hf")
        assert_same_safetensors(src, tmp_path / kind, kind)
        assert torch.equal(logits_of(tmp_path / kind, TOKENS), ref)
        back_cfg = json.loads((tmp_path / kind / "config.json").read_text())
        assert back_cfg["mlp_only_layers"] == [0] and back_cfg["moe_intermediate_size"] == 16


def test_megatron_cores_own_torch_dist_save_reads_as_the_hf_weights(tmp_path, hf, mcore_world):
    """No mapc.json: the args cannot state mlp_only_layers (moe_layer_freq is a list), so the
    HF config is given, as the megatron layout needs it too."""
    src, ref = hf
    d, _ = mcore_world
    assert not (d / "saved" / "mapc.json").exists()
    mapc.convert(d / "saved", tmp_path / "back", to="hf", config=src / "config.json")
    assert_same_safetensors(src, tmp_path / "back")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


# ---- torch_dist with every layer MoE: megatron-core's stacked keys (moe_layer_freq = 1) -------
STACKED_CFG = dict(CFG, num_hidden_layers=2, mlp_only_layers=[])
STACKED_TE_EXTRA = ["module.decoder.final_layernorm._extra_state"] + [
    f"module.decoder.layers.self_attention.{m}._extra_state"
    for m in ("core_attention", "q_layernorm", "k_layernorm")]


@pytest.fixture(scope="module")
def stacked_world(tmp_path_factory):
    """An all-MoE Qwen3-MoE; one megatron-core process (mcore_forward's world) with
    moe_layer_freq the integer 1, so that megatron-core stacks the layers: mapc's Megatron
    file loaded strictly, mapc's torch_dist and nemo2 outputs (keys=stacked, the spec's default
    for a model whose layers are all MoE) loaded by megatron-core's own strict dist_checkpointing.load (logits of each), then the
    model saved by megatron-core as torch_dist (its own stacked keys)."""
    pytest.importorskip("megatron.core")
    d = tmp_path_factory.mktemp("qwen3_moe_stacked")
    model = build_transformers_model(STACKED_CFG, d / "hf")
    ref = logits_of(model, TOKENS)
    mapc.convert(d / "hf", d / "mg", to="megatron")
    for kind in ("torch_dist", "nemo2"):    # stacked is the default for an all-MoE model
        mapc.convert(d / "hf", d / kind, to=kind)
    logits = _groundtruth("mcore_forward").mcore_logits(
        dict(mcore_cfg(layers=2, moe_layer_freq=1), true_vocab=50),
        _rank_file(d / "mg", "mp_rank_00"), TOKENS, [
            {}, {"dist": str(d / "torch_dist" / "release"), "out": str(d / "loaded_td.pt")},
            {"dist": str(d / "nemo2" / "weights"), "prefix": "module.",
             "unread": STACKED_TE_EXTRA},
            {"dist_save": str(d / "saved"), "args": dict(SAVE_ARGS, moe_layer_freq=1)}])
    return d, ref, [np.array(x)[..., :50] for x in logits]


def test_stacked_torch_dist_loads_strictly_into_megatron_core_with_transformers_logits(
        stacked_world):
    from safetensors.numpy import load_file
    d, ref, logits = stacked_world
    for got in logits[:3]:          # Megatron file, torch_dist, nemo2
        assert np.abs(got - ref.numpy()).max() <= MCORE_TOLERANCE
    # what megatron-core loaded (its local, per-layer names), against the HF weights
    w = load_file(str(d / "hf" / "model.safetensors"))
    loaded = torch.load(d / "loaded_td.pt")
    for i in range(2):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        np.testing.assert_array_equal(loaded[m + "mlp.router.weight"].numpy(),
                                      w[h + "mlp.gate.weight"])
        np.testing.assert_array_equal(loaded[m + "pre_mlp_layernorm.weight"].numpy(),
                                      w[h + "post_attention_layernorm.weight"])
        np.testing.assert_array_equal(loaded[m + "self_attention.q_layernorm.weight"].numpy(),
                                      w[h + "self_attn.q_norm.weight"])
        for e in range(4):
            ours, hfe = m + f"mlp.experts.local_experts.{e}.", h + f"mlp.experts.{e}."
            np.testing.assert_array_equal(
                loaded[ours + "linear_fc1.weight"].numpy(),
                np.concatenate([w[hfe + "gate_proj.weight"], w[hfe + "up_proj.weight"]]))
            np.testing.assert_array_equal(loaded[ours + "linear_fc2.weight"].numpy(),
                                          w[hfe + "down_proj.weight"])


def test_megatron_cores_own_stacked_torch_dist_save_reads_as_the_hf_weights(
        tmp_path, stacked_world):
    """No mapc.json: the names say keys=stacked (megatron-core stacked every layer, experts on
    a second axis), the integer moe_layer_freq leaves every layer MoE."""
    d, ref, _ = stacked_world
    assert not (d / "saved" / "mapc.json").exists()
    info = mapc.inspect(d / "saved")
    assert info["family"] == "qwen3_moe" and info["params"]["keys"] == "stacked"
    mapc.convert(d / "saved", tmp_path / "back", to="hf")
    assert_same_safetensors(d / "hf", tmp_path / "back")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)
    for kind in ("torch_dist", "nemo2"):
        mapc.convert(d / kind, tmp_path / kind, to="hf")
        assert_same_safetensors(d / "hf", tmp_path / kind, kind)


def test_all_moe_default_is_stacked_and_numbered_on_request(tmp_path, stacked_world):
    """The spec's computed default (`param keys ... default "stacked" if ...`): an all-MoE
    model's torch_dist is stacked unless --set keys=numbered, which still round-trips."""
    d, _, _ = stacked_world
    assert json.loads((d / "torch_dist" / "mapc.json").read_text())["params"]["keys"] == \
        "stacked"
    mapc.convert(d / "hf", tmp_path / "num", to="torch_dist", set={"keys": "numbered"})
    info = mapc.inspect(tmp_path / "num")
    assert info["params"]["keys"] == "numbered"
    names = {t["name"] for s in info["shards"] for t in s["tensors"]}
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in names
    mapc.convert(tmp_path / "num", tmp_path / "back", to="hf")
    assert_same_safetensors(d / "hf", tmp_path / "back")


def test_stacked_keys_with_dense_layers_are_refused(tmp_path, hf):
    with pytest.raises(MapcError, match="stacked torch_dist keys.*need MoE in every layer"):
        mapc.convert(hf[0], tmp_path / "td", to="torch_dist", set={"keys": "stacked"})
    assert not (tmp_path / "td").exists()
