"""specs/deepseek_v3.map (MLA, dense-then-MoE, shared experts, sigmoid router with a score
correction bias) against the real libraries. A transformers DeepseekV3ForCausalLM (q_lora_rank
set, and null as in V2-Lite) goes hf -> megatron (tp, pp, ep) -> hf with identical logits;
mapc's Megatron file loaded into a real megatron-core GPTModel (MLATransformerConfig, local
spec, MoE via moe_layer_freq with expert bias, group-limited routing and shared experts, on CPU)
computes transformers' logits; one tp=2 world of GPTModels has exactly the per-rank state-dict
names and shapes of mapc's files; the router's expert_bias stays float32 under --dtype bf16.
In the same megatron-core process, mapc's torch_dist outputs (MTP layer included) and nemo2
output load by megatron-core's strict dist_checkpointing.load with transformers' logits, and
megatron-core's own torch_dist save reads back as every HF tensor.

megatron-core's only core attention without Transformer Engine does not take MLA's k/v head
sizes: the harness wraps its constructor (tests/groundtruth/mcore_forward.py says exactly how);
the attention math, MLA's projections, norms, rotary and the MoE are megatron-core's own."""
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
# 3 layers: 0 dense (first_k_dense_replace), 1 and 2 MoE with 4 routed experts in 2 groups
# (top-1 group), top-2, one shared expert; MLA with q_lora 16, kv_lora 8, nope 8, rope 4, v 8
CFG = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=32,
           intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, vocab_size=50, n_routed_experts=4,
           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
           kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_group=2,
           topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
           max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
           rope_interleave=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# megatron-core's forward in fp32 on CPU against transformers' (observed: 3e-8; the MTP
# layer's logits against transformers' MtpModel: 7e-8)
MCORE_TOLERANCE = 1e-5


def _groundtruth(name):
    path = Path(__file__).parent / "groundtruth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_groundtruth_{name}_deepseek_v3", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(cfg, path):
    model = build_transformers_model(cfg, path)
    with torch.no_grad():     # the score correction bias starts at 0: make it count
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek_v3") / "hf"
    model = _build(CFG, path)
    return path, logits_of(model, TOKENS), CFG["q_lora_rank"]


@pytest.fixture(scope="module")
def hf_no_q_lora(tmp_path_factory):
    """V2-Lite style: q_lora_rank null, one q_proj."""
    path = tmp_path_factory.mktemp("deepseek_v3_noq") / "hf"
    model = _build(dict(CFG, q_lora_rank=None), path)
    return path, logits_of(model, TOKENS), None


def mcore_cfg(q_lora, tp=1):
    return {"hidden": 32, "layers": 3, "heads": 4, "groups": 4, "head_dim": 12, "ffn": 48,
            "vocab": 128 * tp, "tied": False, "qk_layernorm": True, "norm_eps": 1e-6,
            "rotary_base": 10000, "experts": 4, "moe_ffn": 16, "topk": 2,
            "moe_layer_freq": [0, 1, 1], "pre_softmax": False, "score": "sigmoid",
            "expert_bias": True, "shared_ffn": 16, "topk_scale": 2.5, "groups_n": 2,
            "group_topk": 1, "mla": True, "q_lora": q_lora, "kv_lora": 8, "nope": 8, "rope": 4,
            "v_dim": 8}


def _rank_file(root, name):
    return root / "release" / name / "model_optim_rng.pt"


@pytest.mark.parametrize("which, topo", [("q_lora", dict(tp=2, ep=2)), ("q_lora", dict(pp=3, ep=4)),
                                         ("no_q_lora", dict(tp=2, pp=3, ep=2)),
                                         ("q_lora", dict(tp=2, ep=4, set={"etp": "1"}))],
                         ids=["tp2-ep2", "pp3-ep4", "no-q-lora-tp2-pp3-ep2", "tp2-ep4-etp1"])
def test_megatron_round_trip_keeps_logits(tmp_path, request, which, topo):
    src, ref, _ = request.getfixturevalue("hf" if which == "q_lora" else "hf_no_q_lora")
    mapc.convert(src, tmp_path / "mg", to="megatron", **topo)
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)
    from safetensors.numpy import load_file
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_megatron_core_computes_transformers_logits(hf, hf_no_q_lora, hf_mtp, mcore_world):
    """One megatron-core process: the q_lora model, a negative control, the q_proj model, and
    the model with its MTP layer (GPTModel with mtp_num_layers=1): its main logits and its MTP
    layer's equal transformers' (main model, and transformers' MtpModel), and exchanging enorm
    and hnorm changes the MTP logits."""
    _, (ours, swapped, noq, mtp, mtp_swapped, *_) = mcore_world
    main_ref, mtp_ref = _transformers_mtp_logits(hf_mtp[0])
    (m_main, m_mtp), (_, s_mtp) = ([np.array(x)[..., :50] for x in r] for r in (mtp, mtp_swapped))
    assert np.abs(m_main - main_ref.numpy()).max() <= MCORE_TOLERANCE
    assert np.abs(m_mtp - mtp_ref.numpy()).max() <= MCORE_TOLERANCE
    assert np.abs(s_mtp - mtp_ref.numpy()).max() > 1e-4
    ours, swapped, noq = (np.array(x)[..., :50] for x in (ours, swapped, noq))
    assert np.abs(ours - hf[1].numpy()).max() <= MCORE_TOLERANCE
    assert np.abs(noq - hf_no_q_lora[1].numpy()).max() <= MCORE_TOLERANCE
    # negative control: two layers' kv layernorms exchanged change the logits
    assert np.abs(swapped - hf[1].numpy()).max() > 1e-4


@pytest.mark.slow
def test_megatron_names_and_shapes_per_rank_are_megatron_cores(tmp_path, hf, hf_mtp):
    """One world of 2 megatron-core processes builds three grids: tp=2 (experts cut over tp, as
    etp defaults to tp), tp=2 ep=2 etp=1 (whole experts, as GPT-OSS's biased experts
    need), where only the ranks of expert data-parallel rank 0 save: 2 files of the 4
    tp x ep pairs, each of which megatron-core loads strictly, and tp=2 with the MTP layer."""
    pytest.importorskip("megatron.core")
    src, _, q_lora = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2)
    mapc.convert(src, tmp_path / "etp", to="megatron", tp=2, ep=2, set={"etp": "1"})
    mapc.convert(hf_mtp[0], tmp_path / "mtp", to="megatron", tp=2)
    mapc.convert(hf_mtp[0], tmp_path / "mtp_pp", to="megatron", pp=2,
                 set={"first_stage_layers": "1"})
    release = tmp_path / "etp" / "release"
    truth, etp, mtp, mtp_pp = _groundtruth("mcore_names").mcore_rank_variants(
        mcore_cfg(q_lora, tp=2), 2, 1, [
            {"ep": 2, "etp": 1, "load": str(release)},
            {"mtp": 1, "load": str(tmp_path / "mtp" / "release")},
            dict(mcore_cfg(q_lora), mtp=1, grid_tp=1, grid_pp=2, layers_first_stage=1,
                 load=str(tmp_path / "mtp_pp" / "release"))])
    # with the MTP layer (mtp_num_layers=1, get_gpt_mtp_block_spec): every rank loads mapc's
    # file strictly; at tp=2 eh_proj's rows are cut over tp; at pp=2 (1 + 2 layers) the MTP
    # layer and a copy of the embedding are on the last stage only
    for (t, _), rank in mtp.items():
        assert rank["loaded"] == f"mp_rank_{t:02d}"
        model = torchfile.load(_rank_file(tmp_path / "mtp", rank["loaded"]))["model"]
        assert {n: list(v.shape) for n, v in model.items()} == rank["shapes"], t
        assert rank["shapes"]["mtp.layers.0.eh_proj.weight"] == [16, 64]
    assert sorted(mtp_pp) == [(0, 0), (0, 1)]
    for (_, stage), rank in mtp_pp.items():
        assert rank["loaded"] == f"mp_rank_00_{stage:03d}"
        model = torchfile.load(_rank_file(tmp_path / "mtp_pp", rank["loaded"]))["model"]
        assert {n: list(v.shape) for n, v in model.items()} == rank["shapes"], stage
    last = mtp_pp[(0, 1)]["shapes"]
    assert "embedding.word_embeddings.weight" in last and "mtp.layers.0.eh_proj.weight" in last
    assert not any(n.startswith("mtp.") for n in mtp_pp[(0, 0)]["shapes"])
    assert sorted(truth) == [(0, 0), (1, 0)]
    for (t, _), rank in truth.items():
        model = torchfile.load(_rank_file(tmp_path / "mg", f"mp_rank_{t:02d}"))["model"]
        assert {n: list(v.shape) for n, v in model.items()} == rank["shapes"], t
    # etp=1: megatron-core's saving ranks are (tp 0, ep 0) and (tp 1, ep 1); mapc wrote those
    assert sorted(etp) == [(0, 0, 0), (1, 0, 1)]
    assert sorted(p.name for p in release.iterdir()) == ["mp_rank_00_000", "mp_rank_01_001"]
    w = load_hf(src)
    for (t, _, e), rank in etp.items():
        assert rank["etp_rank"] == 0 and rank["loaded"] == f"mp_rank_{t:02d}_{e:03d}"
        model = torchfile.load(release / rank["loaded"] / "model_optim_rng.pt")["model"]
        assert {n: list(v.shape) for n, v in model.items()} == rank["shapes"], (t, e)
        # the values, by the layout written out here: local expert k of ep rank e is expert
        # 2e + k, whole ([gate; up] rows); attention still cut over tp
        for k in range(2):
            fc1 = np.asarray(model[f"decoder.layers.1.mlp.experts.local_experts.{k}"
                                   f".linear_fc1.weight"])
            hf_e = f"model.layers.1.mlp.experts.{2 * e + k}"
            np.testing.assert_array_equal(fc1, np.concatenate(
                [w[f"{hf_e}.gate_proj.weight"], w[f"{hf_e}.up_proj.weight"]]))
        kv_b = w["model.layers.1.self_attn.kv_b_proj.weight"]
        np.testing.assert_array_equal(
            np.asarray(model["decoder.layers.1.self_attention.linear_kv_up_proj.weight"]),
            kv_b[t * 32:(t + 1) * 32])


def load_hf(path):
    from safetensors.numpy import load_file
    return load_file(str(path / "model.safetensors"))


def test_expert_bias_keeps_float32_under_bf16(tmp_path, hf):
    src, _, _ = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", dtype="bf16")
    model = torchfile.load(_rank_file(tmp_path / "mg", "mp_rank_00"))["model"]
    def dtype(name):
        return str(model[name].dtype).replace("torch.", "")
    assert dtype("decoder.layers.1.mlp.router.expert_bias") == "float32"
    assert dtype("decoder.layers.1.mlp.router.weight") == "bfloat16"
    from safetensors.numpy import load_file
    w = load_file(src / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(model["decoder.layers.1.mlp.router.expert_bias"]),
                                  w["model.layers.1.mlp.gate.e_score_correction_bias"])


def test_args_describe_the_moe_and_mla(tmp_path, hf):
    src, _, q_lora = hf
    mapc.convert(src, tmp_path / "mg", to="megatron")
    args = torchfile.load(_rank_file(tmp_path / "mg", "mp_rank_00"))["args"]
    assert (args.multi_latent_attention, args.q_lora_rank, args.kv_lora_rank, args.qk_head_dim,
            args.qk_pos_emb_head_dim, args.v_head_dim) == (True, q_lora, 8, 8, 4, 8)
    # plain rope (MLATransformerConfig's default is yarn; the negative control that it matters
    # is tests/test_nemo1_families.py's)
    assert args.rope_type == "rope"
    assert (args.moe_layer_freq, args.moe_router_score_function,
            args.moe_router_enable_expert_bias, args.moe_shared_expert_intermediate_size,
            args.moe_router_topk_scaling_factor) == ([0, 1, 1], "sigmoid", True, 16, 2.5)


@pytest.mark.parametrize("fmt", ["dcp", "deepspeed"])
def test_weights_formats_round_trip(tmp_path, hf, fmt):
    src, ref, _ = hf
    mapc.convert(src, tmp_path / "x", to=fmt)
    mapc.convert(tmp_path / "x", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["first_k_dense_replace"] == 1 and back["n_routed_experts"] == 4


def test_rotate_half_rope_is_refused_for_megatron(tmp_path):
    _build(dict(CFG, rope_interleave=False, num_hidden_layers=2), tmp_path / "hf")
    with pytest.raises(MapcError) as e:
        mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron")
    assert "rope_interleave = false has no megatron layout" in str(e.value)
    assert "specs/deepseek_v3.map:" in str(e.value)
    assert not (tmp_path / "mg").exists()


# NeMo 2 saves with the Transformer Engine spec: mapc's nemo2 output has the _extra_state of
# its attention core, q/kv norms and final norm, which megatron-core's local modules do not have
NEMO2_TE_EXTRA = ["module.decoder.final_layernorm._extra_state"] + [
    f"module.decoder.layers.{i}.self_attention.{m}._extra_state"
    for i in range(3) for m in ("core_attention", "q_layernorm", "kv_layernorm")]


@pytest.fixture(scope="module")
def mcore_world(tmp_path_factory, hf, hf_no_q_lora, hf_mtp):
    """One megatron-core process (mcore_forward's world), in order: the q_lora model's Megatron
    file, a negative control, the q_proj model's, the model with its MTP layer (GPTModel with
    mtp_num_layers=1: main and MTP logits), with enorm and hnorm exchanged; then the torch_dist
    outputs of the three models and the q_lora model's nemo2 loaded by megatron-core's own
    strict dist_checkpointing.load (the MTP model also saved by megatron-core as torch_dist).
    Returns the directory and the logits of each (MTP ones as [main, mtp])."""
    pytest.importorskip("megatron.core")
    d = tmp_path_factory.mktemp("deepseek_v3_mcore")
    for name, src in (("a", hf[0]), ("b", hf_no_q_lora[0]), ("m", hf_mtp[0])):
        mapc.convert(src, d / name, to="megatron")
        mapc.convert(src, d / f"{name}_td", to="torch_dist")
    mapc.convert(hf[0], d / "a_n2", to="nemo2")
    a, b = ("decoder.layers.0.self_attention.kv_layernorm.weight",
            "decoder.layers.1.self_attention.kv_layernorm.weight")
    mtp_file = str(_rank_file(d / "m", "mp_rank_00"))
    mtp_cfg = dict(mcore_cfg(16), mtp=1, true_vocab=50)
    noq = {"cfg": mcore_cfg(None), "file": str(_rank_file(d / "b", "mp_rank_00"))}
    out = _groundtruth("mcore_forward").mcore_logits(
        mcore_cfg(16), _rank_file(d / "a", "mp_rank_00"), TOKENS,
        [{}, {"swap": [a, b]}, noq,
         {"cfg": mtp_cfg, "file": mtp_file, "mtp": True},
         {"cfg": mtp_cfg, "file": mtp_file, "mtp": True,
          "swap": ["mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight"]},
         {"dist": str(d / "a_td" / "release"), "out": str(d / "loaded_a.pt")},
         dict(noq, dist=str(d / "b_td" / "release")),
         {"cfg": mtp_cfg, "file": mtp_file, "mtp": True, "dist": str(d / "m_td" / "release"),
          "out": str(d / "loaded_m.pt")},
         {"dist": str(d / "a_n2" / "weights"), "prefix": "module.", "unread": NEMO2_TE_EXTRA},
         {"cfg": mtp_cfg, "file": mtp_file, "mtp": True, "dist_save": str(d / "saved"),
          "args": {"qk_layernorm": True, "norm_epsilon": 1e-6}}])
    return d, out


def _with_mtp(src, dst):
    """A copy of the checkpoint ``src`` carrying the MTP layer as the hub releases do:
    model.layers.{L}.* (L = num_hidden_layers) holds a decoder layer of layer L-1's kind (values
    of its own), enorm, hnorm, eh_proj [hidden, 2 hidden], shared_head.norm, and embed_tokens /
    shared_head.head equal to the model's embedding and lm_head."""
    import shutil
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    rng = np.random.default_rng(61)
    last, mtp = "model.layers.2.", "model.layers.3."
    for name in [n for n in w if n.startswith(last)]:
        w[mtp + name[len(last):]] = (w[name] + rng.normal(0, 0.02, w[name].shape)).astype(w[name].dtype)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        w[f"{mtp}{norm}.weight"] = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    w[mtp + "eh_proj.weight"] = rng.normal(0, 0.1, (32, 64)).astype(np.float32)
    w[mtp + "embed_tokens.weight"] = w["model.embed_tokens.weight"].copy()
    w[mtp + "shared_head.head.weight"] = w["lm_head.weight"].copy()
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return w


@pytest.fixture(scope="module")
def hf_mtp(tmp_path_factory, hf):
    path = tmp_path_factory.mktemp("deepseek_v3_mtp") / "hf"
    return path, _with_mtp(hf[0], path)


def test_the_mtp_layer_survives_megatron_bit_for_bit(tmp_path, hf, hf_mtp):
    """hf (with the MTP layer) -> megatron tp2 pp3 ep2 -> hf: every tensor, MTP included, bit
    for bit; transformers (which ignores the MTP layer) computes the same logits. The last
    stage holds megatron-core's MTP names, eh_proj's rows cut over tp, and its own copy of the
    embedding; the args say mtp_num_layers 1."""
    from safetensors.numpy import load_file
    src, w = hf_mtp
    ref = hf[1]
    assert torch.equal(logits_of(src, TOKENS), ref)
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, pp=3, ep=2)
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == w.keys() and all(back[k].tobytes() == w[k].tobytes() for k in w)
    layer = len([k for k in w if k.startswith("model.layers.2.")])
    assert len([k for k in back if k.startswith("model.layers.3.")]) == layer + 6
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)
    embedding = []
    for t in range(2):
        last = torchfile.load(_rank_file(tmp_path / "mg", f"mp_rank_{t:02d}_002_{t:03d}"))
        m = last["model"]
        assert last["args"].mtp_num_layers == 1
        np.testing.assert_array_equal(np.asarray(m["mtp.layers.0.eh_proj.weight"]),
                                      w["model.layers.3.eh_proj.weight"][t * 16:(t + 1) * 16])
        embedding.append(np.asarray(m["embedding.word_embeddings.weight"]))
        np.testing.assert_array_equal(
            np.asarray(m["mtp.layers.0.transformer_layer.mlp.router.expert_bias"]),
            w["model.layers.3.mlp.gate.e_score_correction_bias"])
        k = 1      # local expert 1 of ep rank t is expert 2t + 1, its ffn rows cut over etp=tp
        fc1 = np.asarray(m[f"mtp.layers.0.transformer_layer.mlp.experts.local_experts.{k}"
                           f".linear_fc1.weight"])
        e = f"model.layers.3.mlp.experts.{2 * t + k}"
        # etp = tp = 2, and this file is tp rank t: rows [gate_t; up_t] of 8 each
        np.testing.assert_array_equal(fc1, np.concatenate(
            [w[f"{e}.gate_proj.weight"][t * 8:(t + 1) * 8],
             w[f"{e}.up_proj.weight"][t * 8:(t + 1) * 8]]))
        for stage in (0, 1):
            names = torchfile.load(_rank_file(tmp_path / "mg",
                                              f"mp_rank_{t:02d}_{stage:03d}_{t:03d}"))["model"]
            assert not any(n.startswith("mtp.") for n in names)
    # the last stage's copy of the embedding: the vocab padded to 256 and cut over tp
    embedding = np.concatenate(embedding)
    np.testing.assert_array_equal(embedding[:50], w["model.embed_tokens.weight"])
    assert embedding.shape == (256, 32) and not embedding[50:].any()


def _transformers_mtp_logits(path):
    """transformers' own MTP model (modeling_layers.MtpModel, what generate(use_mtp=True)
    drafts with) loaded from the checkpoint at ``path``: the main model's logits and the MTP
    layer's for TOKENS (its input ids shifted by one, token 0 last, positions 0..n-1 as
    megatron-core's MTP uses the main sequence's rotary positions). transformers finds the MTP
    weights by the main model's `_keys_to_ignore_on_load_unexpected` (layer 61, the hub
    size): pointed at this tiny model's layer 3."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel
    main = AutoModelForCausalLM.from_pretrained(str(path))
    main._keys_to_ignore_on_load_unexpected = [r"model\.layers\.3\..*"]
    mtp = MtpModel.from_pretrained(main)
    with torch.no_grad():
        out = main(input_ids=torch.tensor([TOKENS]), output_hidden_states=True)
        hidden = mtp.forward_layer(0, out.hidden_states[-1], torch.arange(len(TOKENS))[None],
                                   None, input_ids=torch.tensor([TOKENS[1:] + [0]]))
        return out.logits, mtp._project_to_logits(hidden)


def test_transformers_mtp_model_reads_the_round_trip_as_the_source(tmp_path, hf_mtp):
    """transformers' MtpModel on the source and on hf -> megatron (tp2 pp2 uneven) -> hf: the same
    MTP logits, bit for bit (and they differ from the main model's: the MTP layer counts)."""
    src, _ = hf_mtp
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, pp=2,
                 set={"first_stage_layers": "1"})
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    main, mtp = _transformers_mtp_logits(src)
    main_back, mtp_back = _transformers_mtp_logits(tmp_path / "back")
    assert torch.equal(mtp, mtp_back) and torch.equal(main, main_back)
    assert (mtp - main).abs().max() > 1e-3


def test_a_saved_model_without_its_mtp_weights_reads_as_none(tmp_path, hf):
    """transformers saves num_nextn_predict_layers 1 but no MTP weights: such a checkpoint
    converts as one without the layer (the config's `absent 0`), and the record keeps the
    config as it was."""
    src, ref, _ = hf
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1
    mapc.convert(src, tmp_path / "mg", to="megatron")
    args = torchfile.load(_rank_file(tmp_path / "mg", "mp_rank_00"))["args"]
    assert getattr(args, "mtp_num_layers", None) is None
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert json.loads((tmp_path / "back" / "config.json").read_text())[
        "num_nextn_predict_layers"] == 1
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


def test_the_mtp_layer_is_refused_for_gguf_not_dropped(tmp_path, hf_mtp):
    with pytest.raises(MapcError, match=r"specs/deepseek_v3\.map:\d+:\d+: deepseek_v3's MTP "
                                        r"layer .* has no place in llama\.cpp's deepseek2 GGUF"):
        mapc.convert(hf_mtp[0], tmp_path / "g", to="gguf")
    assert not (tmp_path / "g").exists()


def test_an_mtp_layer_with_an_unknown_tensor_is_refused(tmp_path, hf_mtp):
    """A tensor of the MTP layer the spec does not declare is still refused, not dropped."""
    from safetensors.numpy import load_file, save_file
    import shutil
    shutil.copytree(hf_mtp[0], tmp_path / "hf")
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    w["model.layers.3.extra_proj.weight"] = np.ones((32, 64), np.float32)
    save_file(w, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MapcError, match=r"model\.layers\.3\.extra_proj\.weight"):
        mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron")
    assert not (tmp_path / "mg").exists()


def test_expert_tp_1_reads_back_from_megatron_cores_files_alone(tmp_path, hf):
    """A checkpoint megatron-core saved at tp=2 ep=2 etp=1 (2 rank files; no mapc record,
    the args say expert_tensor_parallel_size 1) reads back to the same tensors."""
    import shutil
    src, ref, _ = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, ep=2, set={"etp": "1"})
    args = torchfile.load(_rank_file(tmp_path / "mg", "mp_rank_01_001"))["args"]
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size,
            args.expert_tensor_parallel_size) == (2, 2, 1)
    (tmp_path / "mg" / "mapc.json").unlink()
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf", config=src / "config.json")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)
    # one of the two files missing is named
    shutil.rmtree(tmp_path / "mg" / "release" / "mp_rank_01_001")
    with pytest.raises(MapcError, match=r"missing shard files: mp_rank_01_001"):
        mapc.convert(tmp_path / "mg", tmp_path / "again", to="hf", config=src / "config.json")


@pytest.mark.parametrize("topo, message", [
    (dict(tp=4, ep=2, etp=1), "only the tp ranks below etp \\* ep = 2 would save a file"),
    (dict(tp=2, ep=2, etp=3), "etp must divide tp"),
])
def test_an_expert_grid_megatron_cannot_save_is_refused(tmp_path, hf, topo, message):
    src, _, _ = hf
    etp = topo.pop("etp")
    with pytest.raises(MapcError, match=message):
        mapc.convert(src, tmp_path / "mg", to="megatron", set={"etp": str(etp)}, **topo)
    assert not (tmp_path / "mg").exists()


def test_like_takes_the_templates_expert_tp(tmp_path, hf):
    src, _, _ = hf
    mapc.convert(src, tmp_path / "template", to="megatron", tp=2, ep=2, set={"etp": "1"})
    mapc.convert(src, tmp_path / "out", like=tmp_path / "template")
    assert sorted(p.name for p in (tmp_path / "out" / "release").iterdir()) == \
        ["mp_rank_00_000", "mp_rank_01_001"]


# ---- torch_dist (and NeMo 2): megatron-core's per-layer keys, MLA, MoE, the MTP layer --------
def test_torch_dist_loads_strictly_into_megatron_core_with_transformers_logits(
        hf, hf_no_q_lora, hf_mtp, mcore_world):
    from safetensors.numpy import load_file
    d, out = mcore_world
    ours, noq, mtp, n2 = (out[i] for i in (5, 6, 7, 8))
    for got, ref in ((ours, hf[1]), (noq, hf_no_q_lora[1]), (n2, hf[1])):
        assert np.abs(np.array(got)[..., :50] - ref.numpy()).max() <= MCORE_TOLERANCE
    main_ref, mtp_ref = _transformers_mtp_logits(hf_mtp[0])
    m_main, m_mtp = (np.array(x)[..., :50] for x in mtp)
    assert np.abs(m_main - main_ref.numpy()).max() <= MCORE_TOLERANCE
    assert np.abs(m_mtp - mtp_ref.numpy()).max() <= MCORE_TOLERANCE
    # what megatron-core loaded, against slices of the HF weights taken here
    w = load_file(str(hf_mtp[0] / "model.safetensors"))
    loaded = torch.load(d / "loaded_m.pt")
    for ours, layer in (("decoder.layers.2.", "model.layers.2."),
                        ("mtp.layers.0.transformer_layer.", "model.layers.3.")):
        bias = loaded[ours + "mlp.router.expert_bias"]
        assert bias.dtype == torch.float32
        np.testing.assert_array_equal(bias.numpy(), w[layer + "mlp.gate.e_score_correction_bias"])
        for e in range(4):
            hfe = f"{layer}mlp.experts.{e}."
            np.testing.assert_array_equal(
                loaded[ours + f"mlp.experts.local_experts.{e}.linear_fc1.weight"].numpy(),
                np.concatenate([w[hfe + "gate_proj.weight"], w[hfe + "up_proj.weight"]]))
        kv_b = w[layer + "self_attn.kv_b_proj.weight"]
        np.testing.assert_array_equal(
            loaded[ours + "self_attention.linear_kv_up_proj.weight"].numpy(), kv_b)
        np.testing.assert_array_equal(
            loaded[ours + "mlp.shared_experts.linear_fc2.weight"].numpy(),
            w[layer + "mlp.shared_experts.down_proj.weight"])
    np.testing.assert_array_equal(loaded["mtp.layers.0.eh_proj.weight"].numpy(),
                                  w["model.layers.3.eh_proj.weight"])


def test_torch_dist_and_nemo2_round_trips_are_bit_exact(tmp_path, hf, hf_mtp, mcore_world):
    d, _ = mcore_world
    for kind, (src, ref) in (("a_td", hf[:2]), ("a_n2", hf[:2]), ("m_td", (hf_mtp[0], None))):
        mapc.convert(d / kind, tmp_path / kind, to="hf")
        assert_same_safetensors(src, tmp_path / kind, kind)
        if ref is not None:
            assert torch.equal(logits_of(tmp_path / kind, TOKENS), ref)


def test_megatron_cores_own_torch_dist_save_reads_as_the_hf_weights(tmp_path, hf_mtp, mcore_world):
    """megatron-core's save of the model with its MTP layer (no mapc.json; the HF config given:
    the args of mcore_dist's harness do not describe MLA and MoE) reads back as every HF tensor,
    the MTP layer's included."""
    d, _ = mcore_world
    assert not (d / "saved" / "mapc.json").exists()
    mapc.convert(d / "saved", tmp_path / "back", to="hf", config=hf_mtp[0] / "config.json")
    assert_same_safetensors(hf_mtp[0], tmp_path / "back")
