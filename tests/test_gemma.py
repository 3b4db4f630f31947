"""Gemma 2 and Gemma 3 (text): hf <-> gguf, with the ``1 + w`` norms llama.cpp stores.

One tiny transformers model per family (module fixture, bfloat16 weights as released models
are) is converted once to GGUF and back. Checked against the real consumers, not only the round
trip: the GGUF read with the ``gguf`` package holds float32 ``1 + w`` for every norm (as
llama.cpp's converter writes them) and the other tensors unchanged; transformers' own GGUF
loader (which subtracts 1 from Gemma norms) builds a model with the original tensors; a GGUF
written here as llama.cpp writes Gemma reads back to the HF weights; the way
back to hf gives the original safetensors bit for bit and identical logits."""
from __future__ import annotations

import numpy as np
import pytest

import mapc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TOKENS = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10]]
BASE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=48, vocab_size=128, max_position_embeddings=64,
            sliding_window=4)
CONFIGS = {
    "gemma2": dict(BASE, model_type="gemma2", attn_logit_softcapping=20.0,
                   final_logit_softcapping=15.0, query_pre_attn_scalar=16),
    "gemma3": dict(BASE, model_type="gemma3_text", query_pre_attn_scalar=16),
}
ARCH = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# HF module name -> GGUF name: the norms (stored as 1 + w) and the linear layers
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
         "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
          "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> tuple[str, bool]:
    """The GGUF name of an HF tensor and whether it is a norm (stored as 1 + w)."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight", False
    if hf == "model.norm.weight":
        return "output_norm.weight", True
    _, _, i, rest = hf.split(".", 3)
    module = rest.removesuffix(".weight")
    if module in NORMS:
        return f"blk.{i}.{NORMS[module]}.weight", True
    return f"blk.{i}.{LINEAR[module]}.weight", False


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**CONFIGS[family]))
    with torch.no_grad():       # norms around 0 (the module adds 1), every weight non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(root / "hf"))
    mapc.convert(root / "hf", root / "gguf", to="gguf")
    mapc.convert(root / "gguf", root / "back", to="hf", dtype="bf16")
    return family, root, model


def test_the_family_spec_is_chosen_by_model_type(converted):
    family, root, _ = converted
    import json
    record = json.loads((root / "gguf" / "mapc.json").read_text())
    assert record["family"] == family


def test_gguf_holds_float32_one_plus_w_norms_and_the_other_tensors_as_they_are(converted):
    family, root, model = converted
    reader = gguf.GGUFReader(str(root / "gguf" / "model.gguf"))
    stored = {t.name: t for t in reader.tensors}
    sd = model.state_dict()
    names = {gguf_name(k): k for k in sd if k != "lm_head.weight"}   # tied: no output.weight
    assert {n for n, _ in names} == set(stored)
    for (name, norm), hf in names.items():
        t = stored[name]
        want = sd[hf].float() + 1 if norm else sd[hf]
        assert t.tensor_type.name == ("F32" if norm else "BF16"), name
        got = np.array(t.data)       # BF16 tensors come as their raw bytes
        if norm:
            assert got.dtype == np.float32 and np.array_equal(got, want.numpy()), name
        else:
            assert got.tobytes() == want.view(torch.uint16).numpy().tobytes(), name


def test_gguf_metadata_says_arch_sizes_softcapping_and_window(converted):
    family, root, _ = converted
    r = gguf.GGUFReader(str(root / "gguf" / "model.gguf"))
    f = {k: v.contents() for k, v in r.fields.items()}
    cfg = CONFIGS[family]
    assert f["general.architecture"] == family
    assert f[f"{family}.attention.key_length"] == 16 == f[f"{family}.attention.value_length"]
    assert f[f"{family}.attention.sliding_window"] == 4
    assert f[f"{family}.attention.head_count_kv"] == 2
    if family == "gemma2":
        assert f["gemma2.attn_logit_softcapping"] == cfg["attn_logit_softcapping"]
        assert f["gemma2.final_logit_softcapping"] == cfg["final_logit_softcapping"]
    else:   # Gemma 3 has no soft-capping: no keys; its sliding layers' rotary base has one
        assert "gemma3.attn_logit_softcapping" not in f
        assert f["gemma3.rope.freq_base"] == 1000000.0 and f["gemma3.rope.freq_base_swa"] == 10000.0


def test_transformers_gguf_loader_builds_the_original_model(converted):
    family, root, model = converted
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(root / "gguf"), gguf_file="model.gguf", dtype=torch.float32)
    assert type(loaded).__name__ == ARCH[family]
    want = {k: v.float() for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_back_to_hf_is_bit_exact_with_identical_logits(converted):
    family, root, model = converted
    from safetensors.torch import load_file
    a = load_file(str(root / "hf" / "model.safetensors"))
    b = load_file(str(root / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
                                        for k in a)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(root / "back"),
                                                             dtype=torch.float32)
    cfg = back.config
    assert type(back).__name__ == ARCH[family] and cfg.sliding_window == 4 and cfg.head_dim == 16
    assert cfg.query_pre_attn_scalar == 16
    if family == "gemma2":
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (20.0, 15.0)
    # the reference is the source checkpoint loaded the same way (a bf16 module cast to float
    # would keep its bf16-rounded embedding scale buffer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ref(torch.tensor(TOKENS)).logits, back(torch.tensor(TOKENS)).logits)


def test_a_gguf_written_as_llama_cpp_does_reads_back_to_the_hf_weights(converted, tmp_path):
    """A GGUF written here with the gguf package the way llama.cpp's converter writes Gemma
    (norms + 1 in float32, other tensors float16, no mapc record): mapc finds the family and
    config from its metadata and gives back HF's w, bit for bit."""
    family, root, model = converted
    cfg = CONFIGS[family]
    (tmp_path / "x").mkdir()
    w = gguf.GGUFWriter(str(tmp_path / "x" / "model.gguf"), family)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_sliding_window(cfg["sliding_window"])
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    sd = model.state_dict()
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        name, norm = gguf_name(k)
        w.add_tensor(name, (v.float() + 1).numpy() if norm else v.to(torch.float16).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mapc.convert(tmp_path / "x", tmp_path / "hf", to="hf", dtype="bf16")
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    want = {k: v if gguf_name(k)[1] else v.to(torch.float16).to(torch.bfloat16)
            for k, v in sd.items() if k != "lm_head.weight"}
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.mark.parametrize("fmt", ["deepspeed", "universal"])
def test_deepspeed_and_universal_keep_the_hf_tensors(converted, tmp_path, fmt):
    family, root, _ = converted
    mapc.convert(root / "hf", tmp_path / fmt, to=fmt)
    mapc.convert(tmp_path / fmt, tmp_path / "back", to="hf", dtype="bf16")
    from safetensors.torch import load_file
    a = load_file(str(root / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
