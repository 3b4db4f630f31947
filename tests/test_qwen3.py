"""specs/qwen3.map (llama plus per-head q/k RMSNorms, written with `extends "llama"`) against
the real libraries: a transformers Qwen3ForCausalLM survives hf -> megatron -> hf and
hf -> gguf -> hf with identical logits; mapc's Megatron file loaded into a real megatron-core
GPTModel (qk_layernorm=True, local spec, on CPU) computes transformers' logits; the Megatron
names and shapes per rank are megatron-core's at tp=2 (the pp stages are llama's); the GGUF reads back with the gguf
package under llama.cpp's qwen3 tensor names. mapc's torch_dist and nemo2 outputs load into
megatron-core by its own strict dist_checkpointing.load (logits, tensors against HF slices),
round-trip bit for bit, and megatron-core's own torch_dist save reads back as the HF weights."""
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
# head_dim 16 is not hidden / heads (8): Qwen3 states its own
CFG = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=32,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
           intermediate_size=48, vocab_size=50, max_position_embeddings=64, rms_norm_eps=1e-6,
           tie_word_embeddings=False,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# megatron-core's forward in fp32 on CPU against transformers' (observed: ~1e-7)
MCORE_TOLERANCE = 1e-5


def _groundtruth(name):
    path = Path(__file__).parent / "groundtruth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_groundtruth_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3") / "hf"
    model = build_transformers_model(CFG, path)
    return path, logits_of(model, TOKENS)


def mcore_cfg(tp=1):
    return {"hidden": 32, "layers": 2, "heads": 4, "groups": 2, "head_dim": 16, "ffn": 48,
            "vocab": -(-50 // (128 * tp)) * 128 * tp, "tied": False, "qk_layernorm": True,
            "norm_eps": 1e-6, "rotary_base": 10000}


@pytest.mark.parametrize("topo, sets", [({"tp": 2, "pp": 2}, []), ({"tp": 2}, ["naming=te"])],
                         ids=["tp2-pp2", "tp2-te"])
def test_megatron_round_trip_keeps_logits(tmp_path, hf, topo, sets):
    src, ref = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", set=sets, **topo)
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


def test_megatron_core_computes_transformers_logits(hf, mcore_world):
    src, ref = hf
    _, (ours, swapped, _, _, _) = mcore_world
    assert np.abs(ours - ref.numpy()).max() <= MCORE_TOLERANCE
    # negative control: q and k norms exchanged in one layer change the logits
    assert np.abs(swapped - ref.numpy()).max() > 1e-3


@pytest.mark.slow
def test_megatron_names_and_shapes_per_rank_are_megatron_cores(tmp_path, hf):
    pytest.importorskip("megatron.core")
    src, _ = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2)
    truth = _groundtruth("mcore_names").mcore_state_dict_shapes(mcore_cfg(tp=2), 2, 1)
    assert sorted(truth) == [(0, 0), (1, 0)]
    for (t, p), names in truth.items():
        model = torchfile.load(tmp_path / "mg" / "release" / f"mp_rank_{t:02d}" /
                               "model_optim_rng.pt")["model"]
        assert {n: list(v.shape) for n, v in model.items()} == names, (t, p)


def test_q_and_k_layernorms_are_hf_norms_on_every_rank(tmp_path, hf):
    """Replicated over tp, local layer numbers over pp (global = pp_rank * 1 + local)."""
    from safetensors.numpy import load_file
    src, _ = hf
    w = load_file(str(src / "model.safetensors"))
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, pp=2)
    for t in range(2):
        for p in range(2):
            model = torchfile.load(tmp_path / "mg" / "release" / f"mp_rank_{t:02d}_{p:03d}" /
                                   "model_optim_rng.pt")["model"]
            for ours, theirs in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
                np.testing.assert_array_equal(
                    np.asarray(model[f"decoder.layers.0.self_attention.{ours}.weight"]),
                    w[f"model.layers.{p}.self_attn.{theirs}.weight"])


def test_megatron_checkpoint_without_record_is_recognised(tmp_path, hf):
    """No mapc.json: the spec whose layout places every tensor (q_layernorm included) wins."""
    src, ref = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2)
    (tmp_path / "mg" / "mapc.json").unlink()
    assert mapc.inspect(tmp_path / "mg")["family"] == "qwen3"
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["head_dim"] == 16
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


def test_gguf_round_trip_and_llama_cpp_names(tmp_path, hf):
    gguf = pytest.importorskip("gguf")
    src, ref = hf
    mapc.convert(src, tmp_path / "g", to="gguf")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen3"
    kl = reader.fields["qwen3.attention.key_length"]
    assert int(kl.parts[kl.data[0]][0]) == 16
    # llama.cpp's qwen3 tensor names, from the gguf package
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3]}
    patterns = {n.replace("{bid}", "0") for n in allowed} | {n.replace("{bid}", "1")
                                                            for n in allowed}
    names = {t.name for t in reader.tensors}
    assert {n[:-len(".weight")] for n in names} <= patterns
    assert "blk.1.attn_q_norm.weight" in names and "blk.0.attn_k_norm.weight" in names
    mapc.convert(tmp_path / "g", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


@pytest.mark.parametrize("change, message", [
    (dict(set=["naming=legacy"]), "Megatron-LM's legacy model has no q/k layernorm"),
    (dict(config=dict(CFG, attention_bias=True)), "qwen3 with attention_bias = true"),
], ids=["legacy-naming", "attention-bias"])
def test_unsupported_configs_are_refused_with_the_specs_message(tmp_path, hf, change, message):
    src, _ = hf
    with pytest.raises(MapcError) as e:
        mapc.convert(src, tmp_path / "mg", to="megatron", **change)
    assert message in str(e.value) and "specs/qwen3.map:" in str(e.value)
    assert not (tmp_path / "mg").exists()


# ---- torch_dist (and NeMo 2, whose weights/ is torch_dist's layout) --------------------------
# NeMo 2 saves with the Transformer Engine spec: mapc's nemo2 output has the _extra_state of
# its attention core, q/k norms and final norm, which megatron-core's local modules do not have
NEMO2_TE_EXTRA = ["module.decoder.final_layernorm._extra_state"] + [
    f"module.decoder.layers.self_attention.{m}._extra_state"
    for m in ("core_attention", "q_layernorm", "k_layernorm")]


@pytest.fixture(scope="module")
def mcore_world(tmp_path_factory, hf):
    """One megatron-core process (mcore_forward's world): mapc's Megatron file loaded strictly,
    with the logits, also with q and k norms exchanged in one layer (negative control); mapc's
    torch_dist and NeMo 2 outputs loaded by megatron-core's own dist_checkpointing.load
    (strict) with the logits of each; then the model loaded from mapc's Megatron file saved by
    megatron-core as torch_dist."""
    pytest.importorskip("megatron.core")
    src, _ = hf
    d = tmp_path_factory.mktemp("qwen3_mcore")
    mapc.convert(src, d / "td", to="torch_dist")
    mapc.convert(src, d / "n2", to="nemo2")
    mapc.convert(src, d / "mg", to="megatron")
    f = d / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    cfg = dict(mcore_cfg(), true_vocab=50)
    q, k = ("decoder.layers.0.self_attention.q_layernorm.weight",
            "decoder.layers.0.self_attention.k_layernorm.weight")
    logits = _groundtruth("mcore_forward").mcore_logits(cfg, f, TOKENS, [
        {}, {"swap": [q, k]},
        {"dist": str(d / "td" / "release"), "out": str(d / "loaded_td.pt")},
        {"dist": str(d / "n2" / "weights"), "prefix": "module.", "unread": NEMO2_TE_EXTRA},
        {"dist_save": str(d / "saved"), "args": {"qk_layernorm": True, "norm_epsilon": 1e-6,
                                                  "kv_channels": 16, "ffn_hidden_size": 48}},
    ])
    return d, [np.array(x)[..., :50] for x in logits]


def test_torch_dist_loads_strictly_into_megatron_core_with_transformers_logits(hf, mcore_world):
    src, ref = hf
    d, (_, _, td, n2, _) = mcore_world
    assert np.abs(td - ref.numpy()).max() <= MCORE_TOLERANCE
    assert np.abs(n2 - ref.numpy()).max() <= MCORE_TOLERANCE
    from safetensors.numpy import load_file
    w = load_file(str(src / "model.safetensors"))
    loaded = torch.load(d / "loaded_td.pt")
    # what megatron-core loaded, against slices of the HF weights taken here
    for i in range(2):
        hfl = f"model.layers.{i}.self_attn."
        for ours, theirs in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            np.testing.assert_array_equal(
                loaded[f"decoder.layers.{i}.self_attention.{ours}.weight"].numpy(),
                w[hfl + f"{theirs}.weight"])
        q, k, v = (w[hfl + f"{n}_proj.weight"].reshape(2, -1, 16, 32) for n in "qkv")
        np.testing.assert_array_equal(
            loaded[f"decoder.layers.{i}.self_attention.linear_qkv.weight"].numpy(),
            np.concatenate([q, k, v], axis=1).reshape(-1, 32))
    emb = loaded["embedding.word_embeddings.weight"].numpy()
    np.testing.assert_array_equal(emb[:50], w["model.embed_tokens.weight"])
    assert emb.shape == (128, 32) and not emb[50:].any()


def test_torch_dist_and_nemo2_round_trips_are_bit_exact(tmp_path, hf, mcore_world):
    src, ref = hf
    d, _ = mcore_world
    for kind in ("td", "n2"):
        mapc.convert(d / kind, tmp_path / kind, to="hf")
        assert_same_safetensors(src, tmp_path / kind, kind)
        assert torch.equal(logits_of(tmp_path / kind, TOKENS), ref)
    import yaml
    nemo = yaml.safe_load((d / "n2" / "context" / "model.yaml").read_text())["config"]
    assert nemo["qk_layernorm"] is True and nemo["kv_channels"] == 16


def test_megatron_cores_own_torch_dist_save_reads_as_the_hf_weights(tmp_path, hf, mcore_world):
    """No mapc.json: the spec whose torch_dist layout places the q/k layernorms is found."""
    src, ref = hf
    d, _ = mcore_world
    assert not (d / "saved" / "mapc.json").exists()
    assert mapc.inspect(d / "saved")["family"] == "qwen3"
    mapc.convert(d / "saved", tmp_path / "back", to="hf")
    assert_same_safetensors(src, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["head_dim"] == 16
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)
