"""NeMo 1 (`--to nemo`) for the families beyond Llama's layer: Qwen3 (q/k layernorms),
Qwen3-MoE (dense and MoE layers), DeepSeek-V3 (MLA, shared experts, expert-bias router) and
Mixtral (MoE keys), GPT-2 (LayerNorm, biases, learned positions, OpenAI's tanh GELU), Gemma 2
(NeMo 1's model-specific megatron_gemma2 layer spec: post-norms, zero-centered norms, embedding
scaling, soft-capping, query_pre_attn_scalar) and Llama, Qwen2 (q/k/v biases) and Phi-3 for the
layer NeMo 1 always built. Ground truth: the model NeMo 1's MegatronGPTModel builds from the
model_config.yaml mapc wrote (NeMo's translation of its config re-stated in
tests/groundtruth/nemo1_forward.py; Gemma 2's attention, output layer and embedding scaling are
NeMo's own classes), in the real megatron-core, loads the model_weights.ckpt
strictly and computes transformers' logits; hf -> nemo -> hf is bit for bit, also without
mapc's record. Families NeMo 1 cannot build (Gemma 3, quick-GELU GLU, MTP) are refused
in one line before anything is written."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml

import mapc
from mapc.errors import MapcError
from tests.conftest import assert_same_safetensors, build_transformers_model, logits_of
from tests.test_deepseek_v3 import CFG as DEEPSEEK_V3, _build as build_deepseek, _with_mtp
from tests.test_gemma import CONFIGS as GEMMA
from tests.test_matrix import family_config
from tests.test_qwen3 import CFG as QWEN3

torch = pytest.importorskip("torch")
TOKENS = [1, 5, 9, 3, 7, 2, 8, 4, 11, 0]
# layer 1 dense (mlp_only_layers), layers 0 and 2 MoE: NeMo needs the per-layer block spec
QWEN3_MOE = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                 num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True,
                 vocab_size=50, max_position_embeddings=64, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)
MIXTRAL = family_config("mixtral")
# Gemma 2 with soft-capping and query_pre_attn_scalar 16 (not head_dim), 3 layers; its sliding
# window longer than the tokens (NeMo 1 windows other layers than HF: test_gemma2_window_...)
GEMMA2 = dict(GEMMA["gemma2"], sliding_window=64)
GEMMA2_WINDOW = dict(GEMMA2, sliding_window=4)
# megatron-core's forward in fp32 on CPU against transformers' (observed: 6e-8 for DeepSeek-V3
# to 2.4e-7 for GPT-2)
TOLERANCE = 1e-5


def _groundtruth():
    path = Path(__file__).parent / "groundtruth" / "nemo1_forward.py"
    spec = importlib.util.spec_from_file_location("_groundtruth_nemo1_forward", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# NeMo's own Gemma 2 modules come from the installed NeMo 2 (tests/groundtruth/nemo1_forward.py)
HAVE_NEMO_GEMMA2 = _groundtruth().nemo_gemma2_source().is_file()
needs_nemo_gemma2 = pytest.mark.skipif(not HAVE_NEMO_GEMMA2, reason="NeMo 2 (its Gemma 2 "
                                       "modules) is not installed")


def _cfg(root):
    return yaml.safe_load((Path(root) / "model_config.yaml").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The HF models (path, transformers' logits) of each family."""
    d = tmp_path_factory.mktemp("nemo1_families")
    out = {}
    for name, cfg in (("qwen3", QWEN3), ("qwen3_moe", QWEN3_MOE), ("deepseek_v3", DEEPSEEK_V3),
                      ("mixtral", MIXTRAL), ("gpt2", family_config("gpt2")),
                      ("llama", family_config("llama")), ("qwen2", family_config("qwen2")),
                      ("phi3", family_config("phi3")),
                      *([("gemma2", GEMMA2), ("gemma2_window", GEMMA2_WINDOW)]
                        if HAVE_NEMO_GEMMA2 else [])):
        build = build_deepseek if name == "deepseek_v3" else build_transformers_model
        model = build(cfg, d / name)
        out[name] = (d / name, logits_of(model, TOKENS).numpy())
    return out


@pytest.fixture(scope="module")
def nemo1_world(tmp_path_factory, models):
    """One megatron-core process: each family's tp=1 NeMo directory built as NeMo 1 builds
    it, with negative controls: Qwen3 without the config's layer spec name (the default spec
    has no q/k layernorms: the load fails), Qwen3 with q and k layernorms exchanged in one
    layer, DeepSeek-V3 without rope_type (MLA's default, yarn); Gemma 2 without the embedding
    scaling, without zero-centered norms (what storing 1 + w would need), without the final
    soft-capping, and with layer 0's post-attention and pre-MLP norms exchanged."""
    pytest.importorskip("megatron.core")
    d = tmp_path_factory.mktemp("nemo1_world")
    jobs = []
    for name, (src, _) in models.items():
        mapc.convert(src, d / name, to="nemo")
        jobs.append({"dir": str(d / name)})
    q = "decoder.layers.0.self_attention.{}_layernorm.weight"
    jobs += [{"dir": str(d / "qwen3"), "drop": ["name"]},
             {"dir": str(d / "qwen3"), "swap": [q.format("q"), q.format("k")]},
             {"dir": str(d / "deepseek_v3"), "drop": ["rope_type"]}]
    if HAVE_NEMO_GEMMA2:
        g = "decoder.layers.0.{}"
        jobs += [{"dir": str(d / "gemma2"), "drop": [key]} for key in GEMMA2_CONTROLS]
        jobs.append({"dir": str(d / "gemma2"),
                     "swap": [g.format("self_attention.linear_proj.post_layernorm.weight"),
                              g.format("mlp.linear_fc1.layer_norm_weight")]})
    return d, _groundtruth().nemo1_logits(jobs, TOKENS)


def _close(got, ref):
    return float(np.abs(np.array(got)[..., :ref.shape[-1]] - ref).max())


GEMMA2_CONTROLS = ("apply_embedding_scaling", "layernorm_zero_centered_gamma",
                   "mcore_customization_config.final_logit_softcapping")
CONTROLS = 3        # the jobs after the families' and before Gemma 2's controls


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "deepseek_v3", "mixtral", "gpt2",
                                    "llama", "qwen2", "phi3",
                                    pytest.param("gemma2", marks=needs_nemo_gemma2)])
def test_the_model_nemo1_builds_from_the_config_computes_transformers_logits(
        models, nemo1_world, family):
    _, results = nemo1_world
    got = results[list(models).index(family)]
    assert not isinstance(got, dict), got
    assert _close(got, models[family][1]) <= TOLERANCE


def test_negative_controls_fail(models, nemo1_world):
    _, results = nemo1_world
    no_name, swapped, no_rope_type = results[len(models):len(models) + CONTROLS]
    assert isinstance(no_name, dict) and "unexpected" in no_name["error"] and \
        "q_layernorm" in no_name["error"]
    assert _close(swapped, models["qwen3"][1]) > 1e-3
    assert _close(no_rope_type, models["deepseek_v3"][1]) > 1e-4     # observed 8e-4


@needs_nemo_gemma2
@pytest.mark.parametrize("control", [*GEMMA2_CONTROLS, "norms exchanged"])
def test_gemma2_negative_controls_move_the_logits(models, nemo1_world, control):
    """Each setting NeMo 1's Gemma 2 reads, and the norms' places, matter on these tokens
    (at least 10x the tolerance; observed: 0.097 unscaled embedding, 0.49 norms computing
    x * w, 8.5e-4 no final soft-capping, 0.29 norms exchanged)."""
    _, results = nemo1_world
    got = results[len(models) + CONTROLS + [*GEMMA2_CONTROLS, "norms exchanged"].index(control)]
    assert not isinstance(got, dict), got
    assert _close(got, models["gemma2"][1]) > 10 * TOLERANCE


@needs_nemo_gemma2
def test_gemma2_window_nemo1_windows_the_layers_hf_keeps_global(tmp_path, models, nemo1_world):
    """NeMo's Gemma2DotProductAttention gives the sliding window to the layers with an even
    layer_number (1-based: HF's global layers), whatever window_attn_skip_freq says. With a
    window (4) shorter than the tokens, NeMo 1's model of mapc's file is HF's model with
    layer_types exchanged and the same window (mapc's window_size [3, 0]: megatron-core's
    left-window convention, get_swa's too), not HF's own."""
    _, results = nemo1_world
    got = results[list(models).index("gemma2_window")]
    n = GEMMA2_WINDOW["num_hidden_layers"]
    swapped = dict(GEMMA2_WINDOW, layer_types=["full_attention" if i % 2 == 0 else
                                                "sliding_attention" for i in range(n)])
    ref = logits_of(build_transformers_model(swapped, tmp_path / "swapped"), TOKENS).numpy()
    assert _close(got, ref) <= TOLERANCE
    assert _close(got, models["gemma2_window"][1]) > 1e-2      # observed 0.35


@needs_nemo_gemma2
def test_gemma2_model_config_is_nemo1s_gemma2(nemo1_world):
    d, _ = nemo1_world
    cfg = _cfg(d / "gemma2")
    assert {k: cfg[k] for k in ("name", "apply_embedding_scaling", "mcore_customization_config",
                                "normalization", "layernorm_zero_centered_gamma", "activation",
                                "openai_gelu", "bias_activation_fusion", "bias",
                                "position_embedding_type", "share_embeddings_and_output_weights",
                                "kv_channels", "window_size", "transformer_engine")} == {
        "name": "megatron_gemma2", "apply_embedding_scaling": True,
        "mcore_customization_config": {"query_pre_attn_scalar": 16,
                                       "attn_logit_softcapping": 20.0,
                                       "final_logit_softcapping": 15.0},
        "normalization": "rmsnorm", "layernorm_zero_centered_gamma": True,
        "activation": "fast-geglu", "openai_gelu": True, "bias_activation_fusion": False,
        "bias": False, "position_embedding_type": "rope",
        "share_embeddings_and_output_weights": True, "kv_channels": 16, "window_size": [63, 0],
        "transformer_engine": True}


def test_model_config_states_the_layer_spec_and_moe_and_mla_keys(nemo1_world):
    d, _ = nemo1_world
    q3, moe, ds, mx = (_cfg(d / n) for n in ("qwen3", "qwen3_moe", "deepseek_v3", "mixtral"))
    assert q3["name"] == "decoder_block_gpt" and q3["qk_layernorm"] is True
    assert "num_moe_experts" not in q3
    assert {k: moe[k] for k in ("name", "num_moe_experts", "moe_router_topk",
                                "moe_ffn_hidden_size", "moe_layer_freq")} == {
        "name": "decoder_block_gpt", "num_moe_experts": 4, "moe_router_topk": 2,
        "moe_ffn_hidden_size": 16, "moe_layer_freq": [1, 0, 1]}
    assert {k: ds[k] for k in ("multi_latent_attention", "q_lora_rank", "kv_lora_rank",
                               "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
                               "moe_router_enable_expert_bias",
                               "moe_shared_expert_intermediate_size")} == {
        "multi_latent_attention": True, "q_lora_rank": 16, "kv_lora_rank": 8,
        "qk_head_dim": 8, "qk_pos_emb_head_dim": 4, "v_head_dim": 8, "rope_type": "rope",
        "moe_router_enable_expert_bias": True, "moe_shared_expert_intermediate_size": 16}
    # every layer MoE: NeMo's default layer spec builds it, no name needed
    assert "name" not in mx and mx["num_moe_experts"] == 4


@pytest.mark.parametrize("family, topo, dst", [
    ("qwen3", dict(tp=2, pp=2), "q.nemo"), ("qwen3_moe", dict(tp=2, pp=3), "m"),
    ("deepseek_v3", dict(tp=2, pp=3), "d.nemo"),
    pytest.param("gemma2", dict(tp=2, pp=3), "g.nemo", marks=needs_nemo_gemma2)])
def test_hf_to_nemo_to_hf_is_bit_exact(tmp_path, models, family, topo, dst):
    src, _ = models[family]
    mapc.convert(src, tmp_path / dst, to="nemo", **topo)
    mapc.convert(tmp_path / dst, tmp_path / "back", to="hf")
    assert_same_safetensors(src, tmp_path / "back", family)


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3",
                                    pytest.param("gemma2", marks=needs_nemo_gemma2)])
def test_nemo_without_mapc_record_converts_from_its_yaml(tmp_path, models, family):
    """vocab 50 (128) padded to a multiple of 25 * tp (64 * tp) is itself: NeMo's padded size
    is the true one. Qwen3's and Gemma 2's configs are all in the yaml (Gemma 2's soft-capping
    and query_pre_attn_scalar in mcore_customization_config, its window in window_size);
    DeepSeek-V3's dense-then-MoE split (first_k_dense_replace) is a list (moe_layer_freq) the
    spec cannot invert: as for Megatron, --config gives it."""
    src, _ = models[family]
    mapc.convert(src, tmp_path / "n", to="nemo", tp=2,
                 set={"vocab_multiple": 64 if family == "gemma2" else 25})
    cfg = _cfg(tmp_path / "n")
    del cfg["mapc"]
    (tmp_path / "n" / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    if family != "deepseek_v3":
        info = mapc.inspect(tmp_path / "n")
        assert info["family"] == family and info["config"]["head_dim"] == 16
        if family == "gemma2":
            assert {k: info["config"][k] for k in (
                "query_scalar", "attn_softcap", "final_softcap", "window", "tied")} == {
                "query_scalar": 16, "attn_softcap": 20.0, "final_softcap": 15.0, "window": 64,
                "tied": True}
        mapc.convert(tmp_path / "n", tmp_path / "back", to="hf")
    else:
        mapc.convert(tmp_path / "n", tmp_path / "back", to="hf", config=src / "config.json")
    assert_same_safetensors(src, tmp_path / "back")


@pytest.mark.parametrize("family, message", [
    ("gemma3", "post_layernorm.weight has no module in the layer specs NeMo 1 selects"),
    ("gpt_oss", "quick_geglu = True (NeMo 1's activations"),
    ("mtp", "mtp_num_layers = 1 (NeMo 1's MegatronGPTModel builds no multi-token-prediction"),
])
def test_what_nemo1_cannot_build_is_refused_before_writing(tmp_path, models, family, message):
    src = tmp_path / "hf"
    if family == "mtp":
        _with_mtp(models["deepseek_v3"][0], src)
    else:
        build_transformers_model(family_config(family), src)
    with pytest.raises(MapcError) as e:
        mapc.convert(src, tmp_path / "x.nemo", to="nemo")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.nemo").exists()


def test_a_megatron_argument_without_a_nemo1_key_is_refused():
    from mapc.runtime.containers.nemo import check_translatable
    check_translatable({"hidden_size": 8, "vocab_size": 50, "some_new_flag": False}, [])
    with pytest.raises(MapcError, match="some_new_flag = 3 has no NeMo 1 model config key"):
        check_translatable({"hidden_size": 8, "some_new_flag": 3}, [])
