"""specs/gpt_oss.map's gguf layout (llama.cpp's "gpt-oss") against the gguf package.

A reference GGUF is written here with the gguf package (GGUFWriter's add_* methods, the
package's own HF-name -> GGUF-name map for MODEL_ARCH.GPT_OSS) the way llama.cpp's converter
(GptOssModel, non-MXFP4 path, outtype f32) writes GptOssForCausalLM: HF's fused experts
gate_up_proj [experts, hidden, 2 ffn] transposed to [experts, 2 ffn, hidden] and split into
ffn_gate_exps (rows 0::2) and ffn_up_exps (rows 1::2), gate_up_proj_bias split the same way,
down_proj transposed to ffn_down_exps [experts, hidden, ffn], the sinks as attn_sinks.weight,
YaRN as rope.scaling.* keys. mapc's GGUF must have that file's metadata (keys, types, values)
and tensors (names, dims, bytes); the reference file, which has no mapc record, reads back to
the HF weights; hf -> gguf -> hf keeps the tensors and logits.

transformers 5.23 has a gpt_oss GGUF loader, but it cannot load llama.cpp's layout: it reads
`rope.scaling.*` values from the wrong field part (a TypeError on any file with YaRN keys), does
not read `attention.key_length` (head_dim falls back to its default) and maps neither the sinks
nor the stacked experts; so no logits are compared through it. llama.cpp is not installed."""
from __future__ import annotations

import numpy as np
import pytest

import mapc
from tests.conftest import build_transformers_model, logits_of
from tests.groundtruth.gguf_files import fields, tensors_of, write_tensors_and_close
from tests.test_gpt_oss import CONFIG

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

TOKENS = [1, 5, 9, 3, 7, 2, 8, 4, 6, 10]
ARCH = gguf.MODEL_ARCH.GPT_OSS
CFG = dict(CONFIG, architectures=["GptOssForCausalLM"])


def converter_tensors(sd: dict, layers: int) -> dict:
    """The GGUF tensors of HF tensors ``sd`` as llama.cpp's converter makes them, named by
    the gguf package's tensor name map."""
    names = gguf.get_tensor_name_map(ARCH, layers)

    def name(hf: str) -> str:
        base, _, suffix = hf.rpartition(".")
        if suffix not in ("weight", "bias"):     # sinks: the converter appends ".weight"
            base, suffix = hf, "weight"
        got = names.get_name(base)
        assert got is not None, hf
        return f"{got}.{suffix}"

    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            t = np.swapaxes(v, -1, -2)                         # [experts, 2 ffn, hidden]
            pre = k[: -len("gate_up_proj")]
            out[name(pre + "gate_proj.weight")] = np.ascontiguousarray(t[:, 0::2, :])
            out[name(pre + "up_proj.weight")] = np.ascontiguousarray(t[:, 1::2, :])
        elif k.endswith("mlp.experts.gate_up_proj_bias"):
            pre = k[: -len("gate_up_proj_bias")]
            out[name(pre + "gate_proj.bias")] = np.ascontiguousarray(v[:, 0::2])
            out[name(pre + "up_proj.bias")] = np.ascontiguousarray(v[:, 1::2])
        elif k.endswith("mlp.experts.down_proj"):
            out[name(k + ".weight")] = np.ascontiguousarray(np.swapaxes(v, -1, -2))
        elif k.endswith("mlp.experts.down_proj_bias"):
            out[name(k[: -len("_bias")] + ".bias")] = v
        else:
            out[name(k)] = v
    return out


def write_reference(path, model_config, tensors: dict):
    """TextModel.set_gguf_parameters + GptOssModel's (sliding window, expert ffn length) for
    ``model_config`` (transformers' GptOssConfig: YaRN by default), through GGUFWriter's add_*."""
    c = model_config
    rope = c.rope_parameters
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    assert rope["rope_type"] == "yarn"
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_sliding_window(c.sliding_window)
    w.add_expert_feed_forward_length(c.intermediate_size)
    w.add_vocab_size(c.vocab_size)           # no tokenizer in this file (as mapc writes it)
    w.add_tokenizer_model("no_vocab")
    write_tensors_and_close(w, tensors)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_gguf")
    model = build_transformers_model(CFG, root / "hf")
    from safetensors.numpy import load_file
    sd = load_file(str(root / "hf" / "model.safetensors"))
    (root / "ref").mkdir()
    write_reference(root / "ref" / "model.gguf", model.config,
                    converter_tensors(sd, CFG["num_hidden_layers"]))
    mapc.convert(root / "hf", root / "gguf", to="gguf")
    return root, sd, logits_of(model, TOKENS)


def test_metadata_is_the_converters(case):
    root, _, _ = case
    ours, ref = fields(root / "gguf" / "model.gguf"), fields(root / "ref" / "model.gguf")
    assert ours == ref
    assert ours["general.architecture"][1] == "gpt-oss"


def test_tensors_are_the_converters_names_dims_and_bytes(case):
    root, _, _ = case
    ours, ref = tensors_of(root / "gguf" / "model.gguf"), tensors_of(root / "ref" / "model.gguf")
    assert sorted(ours) == sorted(ref)
    for n, t in ref.items():
        assert list(ours[n].shape) == list(t.shape), n        # GGUF dims, innermost first
        assert ours[n].tensor_type == t.tensor_type, n
        assert ours[n].data.tobytes() == t.data.tobytes(), n
    assert "blk.0.attn_sinks.weight" in ref and "blk.1.ffn_up_exps.bias" in ref
    # [experts, ffn, hidden] in numpy order: hidden innermost
    assert list(ref["blk.0.ffn_gate_exps.weight"].shape) == [64, 64, 4]


def test_back_to_hf_is_bit_exact_with_identical_logits(case, tmp_path):
    root, sd, ref = case
    mapc.convert(root / "gguf", tmp_path / "back", to="hf")
    from safetensors.numpy import load_file
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == sd.keys() and all(back[k].tobytes() == sd[k].tobytes() for k in sd)
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


def test_the_converters_file_reads_back_to_the_hf_weights(case, tmp_path):
    """No mapc record: the family from general.architecture, the config given."""
    root, sd, _ = case
    mapc.convert(root / "ref", tmp_path / "back", to="hf", config=root / "hf" / "config.json")
    from safetensors.numpy import load_file
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == sd.keys() and all(back[k].tobytes() == sd[k].tobytes() for k in sd)
