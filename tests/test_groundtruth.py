"""Ground truth from real libraries: transformers models, megatron-core names, torch.load,
and the layout formulas of LAYOUTS.md implemented independently here."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import mapc
from mapc.runtime import torchfile
from tests.conftest import build_transformers_model, llama_config, logits_of, write_random_hf

TOKENS = [1, 5, 9, 3, 7, 2, 8, 4]


@pytest.mark.slow
@pytest.mark.parametrize("cfg,topo", [
    (llama_config(hidden=64, layers=4, heads=8, groups=2, vocab=100), {"tp": 2, "pp": 2}),
    (llama_config(hidden=48, layers=2, heads=4, groups=4, head_dim=16, vocab=77, tied=True),
     {"tp": 4, "pp": 2}),
    (llama_config(hidden=64, layers=3, heads=8, groups=1, vocab=130, model_type="mistral"),
     {"tp": 1, "pp": 3}),
], ids=["llama-gqa-tp2-pp2", "llama-mha-tied-headdim-tp4-pp2", "mistral-mqa-pp3"])
def test_transformers_model_survives_megatron_round_trip_with_identical_logits(tmp_path, cfg,
                                                                                  topo):
    torch = pytest.importorskip("torch")
    model = build_transformers_model(cfg, tmp_path / "hf")
    expected = logits_of(model, TOKENS)
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", **topo)
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    got = logits_of(tmp_path / "back", TOKENS)
    assert torch.equal(expected, got)
    assert type(model).__name__ in (tmp_path / "back" / "config.json").read_text()


def _load_harness():
    from tests.groundtruth import mcore_names
    return mcore_names


@pytest.mark.slow
@pytest.mark.parametrize("tied,tp,pp,head_dim", [(False, 2, 2, None), (True, 2, 2, 24),
                                                 (True, 1, 1, None)])
def test_megatron_names_and_shapes_equal_megatron_core(tmp_path, tied, tp, pp, head_dim):
    pytest.importorskip("megatron.core")
    cfg = llama_config(hidden=64, layers=4, heads=4, groups=2, head_dim=head_dim, ffn=128,
                       vocab=200, tied=tied)
    write_random_hf(tmp_path / "hf", cfg)
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", tp=tp, pp=pp)
    padded = -(-200 // (128 * tp)) * 128 * tp
    truth = _load_harness().mcore_state_dict_shapes(
        {"hidden": 64, "layers": 4, "heads": 4, "groups": 2, "head_dim": head_dim or 16,
         "ffn": 128, "vocab": padded, "tied": tied}, tp, pp)
    for (t, p), names in truth.items():
        d = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
        model = torchfile.load(tmp_path / "mg" / "release" / d / "model_optim_rng.pt")["model"]
        ours = {k: list(v.shape) for k, v in model.items()}
        assert ours == {k: list(v) for k, v in names.items()}, (t, p)


def test_megatron_files_load_with_torch_and_carry_args(tmp_path):
    torch = pytest.importorskip("torch")
    write_random_hf(tmp_path / "hf", llama_config(vocab=100))
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", tp=2, pp=2)
    f = tmp_path / "mg" / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(f, weights_only=True, mmap=True)
    assert sd["checkpoint_version"] == 3.0
    args = sd["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.num_layers, args.hidden_size, args.num_query_groups) == (4, 64, 2)
    assert (args.padded_vocab_size, args.vocab_size) == (256, 100)
    assert args.swiglu is True and args.normalization == "RMSNorm"
    assert sd["model"]["output_layer.weight"].shape == (128, 64)
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "release"


# ---- the formulas of LAYOUTS.md, implemented here independently -------------------------------
def qkv_formula(q, k, v, nh, ng, hd, tp):
    """Megatron GQA QKV: Q head h (g=h//hpg, j=h%hpg), dim d at row (g*(hpg+2)+j)*hd+d;
    K of group g at (g*(hpg+2)+hpg)*hd+d, V at (g*(hpg+2)+hpg+1)*hd+d; rank r: r-th block."""
    hpg = nh // ng
    H = q.shape[1]
    full = np.zeros(((nh + 2 * ng) * hd, H), q.dtype)
    for h in range(nh):
        g, j = divmod(h, hpg)
        for d in range(hd):
            full[(g * (hpg + 2) + j) * hd + d] = q[h * hd + d]
    for g in range(ng):
        for d in range(hd):
            full[(g * (hpg + 2) + hpg) * hd + d] = k[g * hd + d]
            full[(g * (hpg + 2) + hpg + 1) * hd + d] = v[g * hd + d]
    return np.split(full, tp)


def fc1_formula(gate, up, tp):
    """SwiGLU fc1: rank r holds [gate_r; up_r], each a contiguous F/tp block."""
    return [np.concatenate([g, u]) for g, u in zip(np.split(gate, tp), np.split(up, tp))]


@pytest.mark.parametrize("nh,ng,tp", [(8, 2, 2), (8, 8, 4), (6, 2, 1), (4, 4, 2), (8, 4, 4)])
def test_qkv_and_fc1_shards_match_the_layout_formulas(tmp_path, nh, ng, tp):
    hd, H, F = 4, 16, 8
    cfg = llama_config(hidden=H, layers=1, heads=nh, groups=ng, head_dim=hd, ffn=F, vocab=10)
    write_random_hf(tmp_path / "hf", cfg, seed=nh * 10 + ng)
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", tp=tp)
    from safetensors.numpy import load_file
    w = load_file(tmp_path / "hf" / "model.safetensors")
    p = "model.layers.0."
    want_qkv = qkv_formula(w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"],
                           w[p + "self_attn.v_proj.weight"], nh, ng, hd, tp)
    want_fc1 = fc1_formula(w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], tp)
    for r in range(tp):
        m = torchfile.load(tmp_path / "mg" / "release" / f"mp_rank_{r:02d}" /
                           "model_optim_rng.pt")["model"]
        np.testing.assert_array_equal(
            m["decoder.layers.0.self_attention.linear_qkv.weight"].numpy(), want_qkv[r])
        np.testing.assert_array_equal(m["decoder.layers.0.mlp.linear_fc1.weight"].numpy(),
                                      want_fc1[r])
        np.testing.assert_array_equal(
            m["decoder.layers.0.self_attention.linear_proj.weight"].numpy(),
            np.split(w[p + "self_attn.o_proj.weight"], tp, axis=1)[r])
