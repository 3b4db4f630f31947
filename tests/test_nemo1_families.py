"""NeMo 1 (`--to nemo`) for the families beyond Llama's layer: Qwen3 (q/k layernorms),
Qwen3-MoE (dense and MoE layers), DeepSeek-V3 (MLA, shared experts, expert-bias router) and
Mixtral (MoE keys), and GPT-2 (LayerNorm, biases, learned positions, OpenAI's tanh GELU) and
Llama, Qwen2 (q/k/v biases) and Phi-3 for the layer NeMo 1 always built. Ground truth: the model NeMo 1's MegatronGPTModel builds from the
model_config.yaml mapc wrote (NeMo's translation of its config re-stated in
tests/groundtruth/nemo1_forward.py), in the real megatron-core, loads the model_weights.ckpt
strictly and computes transformers' logits; hf -> nemo -> hf is bit for bit, also without
mapc's record. Families NeMo 1 cannot build (post-output norms, quick-GELU GLU, MTP) are refused
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
# megatron-core's forward in fp32 on CPU against transformers' (observed: 6e-8 for DeepSeek-V3
# to 2.4e-7 for GPT-2)
TOLERANCE = 1e-5


def _groundtruth():
    path = Path(__file__).parent / "groundtruth" / "nemo1_forward.py"
    spec = importlib.util.spec_from_file_location("_groundtruth_nemo1_forward", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
                      ("phi3", family_config("phi3"))):
        build = build_deepseek if name == "deepseek_v3" else build_transformers_model
        model = build(cfg, d / name)
        out[name] = (d / name, logits_of(model, TOKENS).numpy())
    return out


@pytest.fixture(scope="module")
def nemo1_world(tmp_path_factory, models):
    """One megatron-core process: each family's tp=1 NeMo directory built as NeMo 1 builds
    it, with negative controls: Qwen3 without the config's layer spec name (the default spec
    has no q/k layernorms: the load fails), Qwen3 with q and k layernorms exchanged in one
    layer, DeepSeek-V3 without rope_type (MLA's default, yarn)."""
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
    return d, _groundtruth().nemo1_logits(jobs, TOKENS)


def _close(got, ref):
    return float(np.abs(np.array(got)[..., :ref.shape[-1]] - ref).max())


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "deepseek_v3", "mixtral", "gpt2",
                                    "llama", "qwen2", "phi3"])
def test_the_model_nemo1_builds_from_the_config_computes_transformers_logits(
        models, nemo1_world, family):
    _, results = nemo1_world
    got = results[list(models).index(family)]
    assert not isinstance(got, dict), got
    assert _close(got, models[family][1]) <= TOLERANCE


def test_negative_controls_fail(models, nemo1_world):
    _, (*_, no_name, swapped, no_rope_type) = nemo1_world
    assert isinstance(no_name, dict) and "unexpected" in no_name["error"] and \
        "q_layernorm" in no_name["error"]
    assert _close(swapped, models["qwen3"][1]) > 1e-3
    assert _close(no_rope_type, models["deepseek_v3"][1]) > 1e-4     # observed 8e-4


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
    ("deepseek_v3", dict(tp=2, pp=3), "d.nemo")])
def test_hf_to_nemo_to_hf_is_bit_exact(tmp_path, models, family, topo, dst):
    src, _ = models[family]
    mapc.convert(src, tmp_path / dst, to="nemo", **topo)
    mapc.convert(tmp_path / dst, tmp_path / "back", to="hf")
    assert_same_safetensors(src, tmp_path / "back", family)


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])
def test_nemo_without_mapc_record_converts_from_its_yaml(tmp_path, models, family):
    """vocab 50 padded to a multiple of 25 * tp is 50: NeMo's padded size is the true one.
    Qwen3's config is all in the yaml; DeepSeek-V3's dense-then-MoE split (first_k_dense_replace)
    is a list (moe_layer_freq) the spec cannot invert: as for Megatron, --config gives it."""
    src, _ = models[family]
    mapc.convert(src, tmp_path / "n", to="nemo", tp=2, set={"vocab_multiple": 25})
    cfg = _cfg(tmp_path / "n")
    del cfg["mapc"]
    (tmp_path / "n" / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    if family == "qwen3":
        info = mapc.inspect(tmp_path / "n")
        assert info["family"] == "qwen3" and info["config"]["head_dim"] == 16
        mapc.convert(tmp_path / "n", tmp_path / "back", to="hf")
    else:
        mapc.convert(tmp_path / "n", tmp_path / "back", to="hf", config=src / "config.json")
    assert_same_safetensors(src, tmp_path / "back")


@pytest.mark.parametrize("family, message", [
    ("gemma2", "post_layernorm.weight has no module in the layer specs NeMo 1 selects"),
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
