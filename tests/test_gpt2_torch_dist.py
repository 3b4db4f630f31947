"""specs/gpt2.map's torch_dist layout (and so nemo2) against the real megatron-core: one
megatron-core process (mcore_forward's world) loads mapc's Megatron file (strict
load_state_dict), mapc's torch_dist output and its nemo2 output (megatron-core's own strict
dist_checkpointing.load) into a GPTModel with LayerNorm, learned absolute positions, biases on
every linear layer and the tanh GELU, and computes transformers' GPT-2 logits from each; a
negative control exchanges two layers' LayerNorm biases. What megatron-core loaded from
torch_dist is checked against slices of HF's Conv1D tensors taken here, and hf -> torch_dist ->
hf and hf -> nemo2 -> hf give back every HF tensor bit for bit; megatron-core's own torch_dist
save of the loaded model (no mapc.json) reads back as the HF weights."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import mapc
from tests.conftest import assert_same_safetensors, logits_of

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
TOKENS = [1, 5, 9, 3, 7, 2, 8, 4, 11, 0]
H, L, NH, HD, F, V = 32, 2, 4, 8, 128, 50
CFG = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=H, n_layer=L,
           n_head=NH, vocab_size=V, n_positions=32, activation_function="gelu_new",
           layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
# megatron-core's forward in fp32 on CPU against transformers' (observed: 6e-8; the negative
# control: 2.5e-3)
MCORE_TOLERANCE = 1e-5
# NeMo 2 saves with the Transformer Engine spec: the _extra_state of the attention core and
# the final norm, which megatron-core's local modules do not have
NEMO2_TE_EXTRA = ["module.decoder.final_layernorm._extra_state",
                  "module.decoder.layers.self_attention.core_attention._extra_state"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny GPT2LMHeadModel whose LayerNorms and biases are non-trivial (HF initializes
    them to ones and zeros, which would hide a misplaced one)."""
    path = tmp_path_factory.mktemp("gpt2_td") / "hf"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**CFG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            elif ".ln_" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    return path, logits_of(model, TOKENS).numpy()


def _forward():
    path = Path(__file__).parent / "groundtruth" / "mcore_forward.py"
    spec = importlib.util.spec_from_file_location("_groundtruth_mcore_forward_gpt2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mcore_world(tmp_path_factory, hf):
    pytest.importorskip("megatron.core")
    src, _ = hf
    d = tmp_path_factory.mktemp("gpt2_mcore")
    mapc.convert(src, d / "mg", to="megatron")
    mapc.convert(src, d / "td", to="torch_dist")
    mapc.convert(src, d / "n2", to="nemo2")
    mcfg = {"hidden": H, "layers": L, "heads": NH, "groups": NH, "head_dim": HD, "ffn": F,
            "vocab": 128, "true_vocab": V, "tied": True, "norm": "LayerNorm", "gated": False,
            "activation": "openai_gelu", "linear_bias": True,
            "position_embedding": "learned_absolute", "max_seq": 32, "norm_eps": 1e-5}
    ln = "decoder.layers.{}.input_layernorm.bias"
    out = _forward().mcore_logits(
        mcfg, d / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt", TOKENS,
        [{}, {"swap": [ln.format(0), ln.format(1)]},
         {"dist": str(d / "td" / "release"), "out": str(d / "loaded_td.pt")},
         {"dist": str(d / "n2" / "weights"), "prefix": "module.", "unread": NEMO2_TE_EXTRA},
         {"dist_save": str(d / "saved"), "args": {
             "normalization": "LayerNorm", "swiglu": False, "openai_gelu": True,
             "position_embedding_type": "learned_absolute", "add_position_embedding": True,
             "add_bias_linear": True}}])
    return d, [np.array(x)[..., :V] for x in out]


def test_megatron_core_computes_transformers_logits_from_megatron_torch_dist_and_nemo2(
        hf, mcore_world):
    _, ref = hf
    _, (mg, swapped, td, n2, _) = mcore_world
    for got in (mg, td, n2):
        assert np.abs(got - ref).max() <= MCORE_TOLERANCE
    assert np.abs(swapped - ref).max() > 1e-3       # the comparison can fail


def test_torch_dist_tensors_megatron_core_loaded_are_hf_slices(hf, mcore_world):
    """Per head [q k v] rows of the transposed c_attn; LayerNorm weights and biases; learned
    positions; the padded vocabulary rows zero."""
    from safetensors.numpy import load_file
    src, _ = hf
    d, _ = mcore_world
    w = load_file(str(src / "model.safetensors"))
    got = {k: v.numpy() for k, v in torch.load(d / "loaded_td.pt").items()}
    for i in range(L):
        h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
        qkv = w[h + "attn.c_attn.weight"].T.reshape(3, NH, HD, H).transpose(1, 0, 2, 3)
        np.testing.assert_array_equal(got[m + "self_attention.linear_qkv.weight"],
                                      qkv.reshape(-1, H))
        qkv_b = w[h + "attn.c_attn.bias"].reshape(3, NH, HD).transpose(1, 0, 2)
        np.testing.assert_array_equal(got[m + "self_attention.linear_qkv.bias"],
                                      qkv_b.reshape(-1))
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            for p in ("weight", "bias"):
                np.testing.assert_array_equal(got[m + f"{ours}.{p}"], w[h + f"{theirs}.{p}"])
        for ours, theirs in (("self_attention.linear_proj", "attn.c_proj"),
                             ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")):
            np.testing.assert_array_equal(got[m + ours + ".weight"], w[h + theirs + ".weight"].T)
            np.testing.assert_array_equal(got[m + ours + ".bias"], w[h + theirs + ".bias"])
    for p in ("weight", "bias"):
        np.testing.assert_array_equal(got[f"decoder.final_layernorm.{p}"],
                                      w[f"transformer.ln_f.{p}"])
    np.testing.assert_array_equal(got["embedding.position_embeddings.weight"],
                                  w["transformer.wpe.weight"])
    emb = got["embedding.word_embeddings.weight"]
    np.testing.assert_array_equal(emb[:V], w["transformer.wte.weight"])
    assert emb.shape == (128, H) and not emb[V:].any()


def test_torch_dist_and_nemo2_round_trips_are_bit_exact(tmp_path, hf, mcore_world):
    src, ref = hf
    d, _ = mcore_world
    for kind in ("td", "n2"):
        mapc.convert(d / kind, tmp_path / kind, to="hf")
        assert_same_safetensors(src, tmp_path / kind, kind)
        assert np.array_equal(logits_of(tmp_path / kind, TOKENS).numpy(), ref)
    import yaml
    nemo = yaml.safe_load((d / "n2" / "context" / "model.yaml").read_text())["config"]
    assert nemo["normalization"] == "LayerNorm" and nemo["openai_gelu"] is True
    assert nemo["position_embedding_type"] == "learned_absolute" and nemo["add_bias_linear"]


def test_megatron_cores_own_torch_dist_save_reads_as_the_hf_weights(tmp_path, hf, mcore_world):
    """No mapc.json: the spec whose torch_dist layout places every tensor (the LayerNorm
    biases, the position embeddings) is found, and the config comes from the args."""
    src, ref = hf
    d, _ = mcore_world
    assert not (d / "saved" / "mapc.json").exists()
    assert mapc.inspect(d / "saved")["family"] == "gpt2"
    mapc.convert(d / "saved", tmp_path / "back", to="hf")
    assert_same_safetensors(src, tmp_path / "back")
    assert np.array_equal(logits_of(tmp_path / "back", TOKENS).numpy(), ref)
