"""specs/phi3.map (llama's computation with HF's fused qkv_proj and gate_up_proj, written with
`extends "llama"`) against the real libraries: a transformers Phi3ForCausalLM survives
hf -> megatron -> hf with identical logits, and mapc's Megatron file loaded into a real
megatron-core GPTModel (local spec, on CPU) computes transformers' logits. The fused HF rows
are also checked against an independent numpy split of Megatron's per-group QKV."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import mapc
from mapc.runtime import torchfile
from tests.conftest import build_transformers_model, logits_of

torch = pytest.importorskip("torch")
TOKENS = [1, 5, 9, 3, 7, 2, 8, 4, 11, 0]
NH, NG, HD, H, F = 4, 2, 8, 32, 48
CFG = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=H,
           num_hidden_layers=2, num_attention_heads=NH, num_key_value_heads=NG,
           intermediate_size=F, vocab_size=50, max_position_embeddings=64,
           original_max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
           pad_token_id=0, bos_token_id=1, eos_token_id=2,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MCORE_TOLERANCE = 1e-5     # fp32 on CPU (observed ~1e-7)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3") / "hf"
    model = build_transformers_model(CFG, path)
    return path, logits_of(model, TOKENS)


def test_megatron_round_trip_keeps_logits(tmp_path, hf):
    src, ref = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, pp=2)
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


def test_megatron_qkv_and_fc1_are_the_hf_fused_rows_regrouped(tmp_path, hf):
    """Megatron rank r: per KV group g of its groups, q heads g*hpg.., then k_g, then v_g;
    fc1 rank r: [gate_r; up_r]. Built here from HF's [q | k | v] and [gate | up] rows."""
    from safetensors.numpy import load_file
    src, _ = hf
    w = load_file(str(src / "model.safetensors"))
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2)
    qkv = w["model.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = np.split(qkv, [NH * HD, (NH + NG) * HD])
    hpg = NH // NG
    rows = [np.concatenate([q[g * hpg * HD:(g + 1) * hpg * HD], k[g * HD:(g + 1) * HD],
                            v[g * HD:(g + 1) * HD]]) for g in range(NG)]
    gate, up = np.split(w["model.layers.1.mlp.gate_up_proj.weight"], 2)
    for r in range(2):
        model = torchfile.load(tmp_path / "mg" / "release" / f"mp_rank_{r:02d}" /
                               "model_optim_rng.pt")["model"]
        np.testing.assert_array_equal(
            np.asarray(model["decoder.layers.1.self_attention.linear_qkv.weight"]), rows[r])
        half = F // 2
        np.testing.assert_array_equal(
            np.asarray(model["decoder.layers.1.mlp.linear_fc1.weight"]),
            np.concatenate([gate[r * half:(r + 1) * half], up[r * half:(r + 1) * half]]))


def test_megatron_core_computes_transformers_logits(tmp_path, hf):
    pytest.importorskip("megatron.core")
    src, ref = hf
    mapc.convert(src, tmp_path / "mg", to="megatron")
    path = Path(__file__).parent / "groundtruth" / "mcore_forward.py"
    spec = importlib.util.spec_from_file_location("_groundtruth_mcore_forward", path)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    cfg = {"hidden": H, "layers": 2, "heads": NH, "groups": NG, "head_dim": HD, "ffn": F,
           "vocab": 128, "tied": False, "norm_eps": 1e-5, "rotary_base": 10000}
    (logits,) = harness.mcore_logits(
        cfg, tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt", TOKENS)
    assert np.abs(np.array(logits)[..., :50] - ref.numpy()).max() <= MCORE_TOLERANCE


def test_trainer_parameter_order_is_phi3s(hf):
    """The hf layout lists tensors in Phi3's named_parameters() order (Trainer optimizer state
    is numbered by it)."""
    import transformers
    from mapc.runtime.containers.hf_trainer import module_order
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf[0]))
    names = [n for n, _ in model.named_parameters()]
    spec = mapc.compile_spec("phi3", layout="hf", config=CFG, source_layout="hf")
    ours = [name for _, _, name in spec.target.placements()]
    assert module_order(ours) == names
