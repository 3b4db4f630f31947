"""specs/deepseek_v3.map's gguf layout (llama.cpp's deepseek2) against the gguf package.

A reference GGUF is written here with the gguf package (GGUFWriter's add_* methods, the
package's tensor names for MODEL_ARCH.DEEPSEEK2) the way llama.cpp's converter writes
DeepSeek-V2/V3: experts stacked per layer, dense first layers under the dense names, the score
correction bias as exp_probs_b.bias, and kv_b_proj split for MLA's absorbed form (per head
view [heads, nope + v_dim, kv_lora], k rows transposed to attn_k_b [heads, kv_lora, nope],
v rows attn_v_b [heads, v_dim, kv_lora]). The model's nope (6), v_dim (10) and kv_lora (8)
differ, so a wrong split or transpose shows. mapc's GGUF must have that file's metadata (keys,
types, values) and tensors (names, dims, bytes); the reference file, which has no mapc record,
reads back to the HF weights; and hf -> gguf -> hf keeps the tensors and logits.
transformers has no GGUF loader for deepseek2, and llama.cpp is not installed: the file is
checked against the package that defines the format."""
from __future__ import annotations

import json

import numpy as np
import pytest

import mapc
from mapc.errors import MapcError
from tests.conftest import build_transformers_model, logits_of
from tests.groundtruth.gguf_files import fields, tensors_of, write_tensors_and_close
from tests.test_deepseek_v3 import CFG as BASE_CFG

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

TOKENS = [1, 5, 9, 3, 7, 2, 8, 4, 11, 0]
# tests/test_deepseek_v3.py's model with nope, v and kv_lora all different, so a wrong
# split or transpose of kv_b shows
CFG = dict(BASE_CFG, qk_nope_head_dim=6, v_head_dim=10)
ARCH = gguf.MODEL_ARCH.DEEPSEEK2
T = gguf.MODEL_TENSOR
# HF module names -> the package's tensor kinds, for the names the converter maps one to one
DIRECT = {"input_layernorm": T.ATTN_NORM, "self_attn.q_a_proj": T.ATTN_Q_A,
          "self_attn.q_a_layernorm": T.ATTN_Q_A_NORM, "self_attn.q_b_proj": T.ATTN_Q_B,
          "self_attn.q_proj": T.ATTN_Q, "self_attn.kv_a_proj_with_mqa": T.ATTN_KV_A_MQA,
          "self_attn.kv_a_layernorm": T.ATTN_KV_A_NORM, "self_attn.o_proj": T.ATTN_OUT,
          "post_attention_layernorm": T.FFN_NORM, "mlp.gate_proj": T.FFN_GATE,
          "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN, "mlp.gate": T.FFN_GATE_INP,
          "mlp.shared_experts.gate_proj": T.FFN_GATE_SHEXP,
          "mlp.shared_experts.up_proj": T.FFN_UP_SHEXP,
          "mlp.shared_experts.down_proj": T.FFN_DOWN_SHEXP}
EXPERTS = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP, "down_proj": T.FFN_DOWN_EXP}


def name(kind, bid=None, suffix="weight"):
    assert kind in gguf.MODEL_TENSORS[ARCH], kind       # deepseek2 has this tensor
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=bid) if bid is not None else base) + "." + suffix


def converter_tensors(sd: dict, cfg: dict) -> dict:
    """The GGUF tensors (numpy, in the package's order) of HF tensors ``sd``, as llama.cpp's
    converter makes them."""
    out = {name(T.TOKEN_EMBD): sd["model.embed_tokens.weight"],
           name(T.OUTPUT_NORM): sd["model.norm.weight"], name(T.OUTPUT): sd["lm_head.weight"]}
    heads, nope, v = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"])
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for module, kind in DIRECT.items():
            if pre + module + ".weight" in sd:
                out[name(kind, i)] = sd[pre + module + ".weight"]
        if pre + "mlp.gate.e_score_correction_bias" in sd:
            out[name(T.FFN_EXP_PROBS_B, i, "bias")] = sd[pre + "mlp.gate.e_score_correction_bias"]
        for w, kind in EXPERTS.items():
            per = [sd[f"{pre}mlp.experts.{e}.{w}.weight"] for e in range(cfg["n_routed_experts"])
                   if f"{pre}mlp.experts.{e}.{w}.weight" in sd]
            if per:
                out[name(kind, i)] = np.stack(per)
        kv_b = sd[pre + "self_attn.kv_b_proj.weight"].reshape(heads, nope + v, -1)
        out[name(T.ATTN_K_B, i)] = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
        out[name(T.ATTN_V_B, i)] = np.ascontiguousarray(kv_b[:, nope:])
    return out


def write_reference(path, cfg: dict, tensors: dict):
    """The converter's metadata for ``cfg`` (DeepseekV2Model.set_gguf_parameters: MLA written
    as MQA with the _mla sizes), through GGUFWriter's own typed add_* methods."""
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(1)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg["q_lora_rank"] is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(cfg["kv_lora_rank"])
    w.add_key_length(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
    w.add_value_length(cfg["kv_lora_rank"])
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    w.add_expert_weights_norm(cfg["norm_topk_prob"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(cfg["n_group"])
    w.add_expert_group_used_count(cfg["topk_group"])
    w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
    w.add_tokenizer_model("no_vocab")
    write_tensors_and_close(w, tensors)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_v3_gguf")
    model = build_transformers_model(CFG, root / "hf")
    with torch.no_grad():     # the score correction bias starts at 0: make it count
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    model.save_pretrained(str(root / "hf"))
    from safetensors.numpy import load_file
    sd = load_file(str(root / "hf" / "model.safetensors"))
    (root / "ref").mkdir()
    write_reference(root / "ref" / "model.gguf", CFG, converter_tensors(sd, CFG))
    mapc.convert(root / "hf", root / "gguf", to="gguf")
    return root, sd, logits_of(model, TOKENS)


def test_metadata_is_the_converters(case):
    root, _, _ = case
    ours, ref = fields(root / "gguf" / "model.gguf"), fields(root / "ref" / "model.gguf")
    assert ours == ref


def test_tensors_are_the_converters_names_dims_and_bytes(case):
    root, _, _ = case
    ours, ref = tensors_of(root / "gguf" / "model.gguf"), tensors_of(root / "ref" / "model.gguf")
    assert sorted(ours) == sorted(ref)
    for n, t in ref.items():
        assert list(ours[n].shape) == list(t.shape), n        # GGUF dims, innermost first
        assert ours[n].tensor_type == t.tensor_type, n
        assert ours[n].data.tobytes() == t.data.tobytes(), n
    # the split is what it should be: attn_k_b's dims are (nope, kv_lora, heads)
    assert list(ref["blk.0.attn_k_b.weight"].shape) == [6, 8, 4]
    assert list(ref["blk.0.attn_v_b.weight"].shape) == [8, 10, 4]


def test_back_to_hf_is_bit_exact_with_identical_logits(case, tmp_path):
    root, sd, ref = case
    mapc.convert(root / "gguf", tmp_path / "back", to="hf")
    from safetensors.numpy import load_file
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == sd.keys() and all(back[k].tobytes() == sd[k].tobytes() for k in sd)
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


def test_the_converters_file_reads_back_to_the_hf_weights(case, tmp_path):
    """No mapc record: the family from general.architecture, the config given (the GGUF
    metadata does not state every HF field, e.g. qk_nope_head_dim only as key_length_mla)."""
    root, sd, _ = case
    mapc.convert(root / "ref", tmp_path / "back", to="hf", config=root / "hf" / "config.json")
    from safetensors.numpy import load_file
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == sd.keys() and all(back[k].tobytes() == sd[k].tobytes() for k in sd)


def test_rotate_half_rope_is_refused_for_gguf(tmp_path):
    cfg = dict(CFG, rope_interleave=False, num_hidden_layers=2)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    build_transformers_model(cfg, tmp_path / "hf")
    with pytest.raises(MapcError, match="rope_interleave = false has no gguf layout"):
        mapc.convert(tmp_path / "hf", tmp_path / "g", to="gguf")
    assert not (tmp_path / "g").exists()
