"""Mixture of experts (Mixtral): experts unstacked per index, expert parallelism as a mesh axis."""
from __future__ import annotations

import pytest

import mapc
from mapc.runtime import torchfile
from tests.conftest import build_transformers_model, logits_of

TOKENS = [1, 5, 9, 3, 7, 2, 8, 4]


def mixtral_config(experts=4, tied=False, layers=2):
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 50, "num_local_experts": experts,
            "num_experts_per_tok": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": tied}


@pytest.mark.slow
@pytest.mark.parametrize("topo", [{"tp": 1, "pp": 1}, {"tp": 2, "pp": 2}, {"tp": 2, "ep": 2},
                                  {"tp": 1, "pp": 2, "ep": 4}],
                         ids=["tp1", "tp2-pp2", "tp2-ep2", "pp2-ep4"])
def test_mixtral_megatron_round_trip_keeps_logits(tmp_path, topo):
    torch = pytest.importorskip("torch")
    model = build_transformers_model(mixtral_config(), tmp_path / "hf")
    expected = logits_of(model, TOKENS)
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", **topo)
    assert mapc.verify(tmp_path / "hf", tmp_path / "mg").identical
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert torch.equal(expected, logits_of(tmp_path / "back", TOKENS))


def test_expert_parallel_files_and_local_expert_names(tmp_path):
    pytest.importorskip("torch")
    build_transformers_model(mixtral_config(experts=4), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", tp=2, ep=2)
    ranks = sorted(p.name for p in (tmp_path / "mg" / "release").iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    from safetensors.numpy import load_file
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    for ep in range(2):
        m = torchfile.load(tmp_path / "mg" / "release" / f"mp_rank_01_{ep:03d}" /
                           "model_optim_rng.pt")["model"]
        experts = sorted(k for k in m if "local_experts" in k and k.startswith("decoder.layers.0."))
        assert experts == [f"decoder.layers.0.mlp.experts.local_experts.{k}.linear_fc{n}.weight"
                           for k in range(2) for n in (1, 2)]
        import numpy as np
        for k in range(2):  # local expert k on ep rank r is global expert r*2 + k
            e = ep * 2 + k
            fc1 = m[f"decoder.layers.0.mlp.experts.local_experts.{k}.linear_fc1.weight"].numpy()
            w1 = hf[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"]
            w3 = hf[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"]
            np.testing.assert_array_equal(fc1, np.concatenate([w1[24:], w3[24:]]))  # tp rank 1
        assert "decoder.layers.0.mlp.router.weight" in m   # replicated on every ep rank


def test_ep_that_does_not_divide_the_experts_is_rejected(tmp_path):
    pytest.importorskip("torch")
    build_transformers_model(mixtral_config(experts=4), tmp_path / "hf")
    with pytest.raises(mapc.MapcError, match=r"ep=3 does not divide experts=4"):
        mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", ep=3)
    assert not (tmp_path / "mg").exists()


def test_mixtral_gguf_round_trip_keeps_logits(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from mapc.runtime.containers import available
    if not available("gguf"):
        pytest.skip("gguf container not available")
    model = build_transformers_model(mixtral_config(), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "gg", to="gguf")
    mapc.convert(tmp_path / "gg", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(model, TOKENS), logits_of(tmp_path / "back", TOKENS))


def test_nxdt_expert_mlps_are_stacked_in_out_with_gate_up_per_rank(tmp_path):
    """NxD: gate_up_proj (E, H, 2F/tp) holds [gate_r^T | up_r^T] per tp rank; down_proj
    (E, F/tp, H) is down^T split on F; the router is [E, H]."""
    pytest.importorskip("torch")
    import numpy as np
    from safetensors.numpy import load_file
    build_transformers_model(mixtral_config(), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="nxdt", tp=2)
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    E, F = 4, 48
    w1 = np.stack([hf[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"] for e in range(E)])
    w3 = np.stack([hf[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"] for e in range(E)])
    w2 = np.stack([hf[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] for e in range(E)])
    for r in range(2):
        m = torchfile.load(tmp_path / "nx" / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt")
        p = "model.layers.1.block_sparse_moe."
        half = slice(r * F // 2, (r + 1) * F // 2)
        want = np.concatenate([w1[:, half].transpose(0, 2, 1), w3[:, half].transpose(0, 2, 1)], 2)
        np.testing.assert_array_equal(m[p + "expert_mlps.mlp_op.gate_up_proj.weight"].numpy(), want)
        np.testing.assert_array_equal(m[p + "expert_mlps.mlp_op.down_proj.weight"].numpy(),
                                      w2[:, :, half].transpose(0, 2, 1))
        np.testing.assert_array_equal(m[p + "router.linear_router.weight"].numpy(),
                                      hf["model.layers.1.block_sparse_moe.gate.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("topo", [{"tp": 2, "ep": 2}, {"pp": 2, "ep": 4}], ids=["tp2-ep2", "pp2-ep4"])
def test_nxdt_expert_parallel_round_trip_and_rank0_placement(tmp_path, topo):
    """NxD with expert parallelism: experts split over ep (files _ep_rank_EE), every other tensor
    stored once, on expert rank 0; logits survive the round trip."""
    torch = pytest.importorskip("torch")
    model = build_transformers_model(mixtral_config(), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="nxdt", **topo)
    ep = topo["ep"]
    files = sorted(p.name for p in (tmp_path / "nx" / "model").glob("*.pt"))
    assert any(f"_ep_rank_{ep - 1:02d}.pt" in f for f in files)
    rank1 = torchfile.load(next((tmp_path / "nx" / "model").glob("*tp_rank_00_pp_rank_00_ep_rank_01.pt")))
    assert all("expert_mlps" in k for k in rank1), sorted(rank1)[:3]
    assert rank1["model.layers.0.block_sparse_moe.expert_mlps.mlp_op.down_proj.weight"].shape[0] == 4 // ep
    mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(model, TOKENS), logits_of(tmp_path / "back", TOKENS))
