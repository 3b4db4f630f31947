"""Gemma 2 and Gemma 3 in Megatron: the megatron layouts of specs/gemma2.map and gemma3.map
(Megatron-Bridge's names: pre-norms fused into linear_qkv / linear_fc1, post-norms inside
linear_proj / linear_fc2, zero-centered norms storing HF's w unchanged).

Checked against the real libraries, not only the round trip:
* transformers: hf -> megatron (tp=2, pp=2) -> hf gives identical logits and tensors;
* megatron-core: a GPTModel built on CPU with Megatron-Bridge's Gemma layer spec (Transformer
  Engine's modules stood in for by megatron-core linears with TE's parameter names,
  tests/groundtruth/mcore_gemma.py) loads every tp2 pp2 rank file with no key missing or
  unexpected, and its state_dict names and shapes per rank are the file's;
* every shard equals an independent numpy implementation of the layout (below) applied to
  the HF weights;
* that model at tp=1 computes transformers' logits (with its zero-centered norms: the stored
  w, not 1 + w; a file with 1 + w stored, NeMo 1's convention, does not).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import mapc
from mapc.errors import MapcError
from mapc.runtime import torchfile
from tests.test_gemma import CONFIGS, TOKENS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS, TP, PP = 4, 2, 2
FAMILIES = sorted(CONFIGS)
# what megatron-core computes without Megatron-Bridge's own attention: no soft-capping, the
# default softmax scale, one rotary base, a window longer than the tokens
FORWARD = {
    "gemma2": dict(CONFIGS["gemma2"], attn_logit_softcapping=None, final_logit_softcapping=None,
                   sliding_window=64),
    "gemma3": dict(CONFIGS["gemma3"], sliding_window=64, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}
# megatron-core fp32 on CPU against transformers fp32 (observed ~1e-6)
MCORE_TOLERANCE = 1e-5


def _hf(cfg, path):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**dict(cfg, num_hidden_layers=LAYERS)))
    with torch.no_grad():       # norms away from 0 (the module adds 1)
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 0.5)
    m.save_pretrained(str(path))
    return path


def _logits(path):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(TOKENS)).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (hf dir, its tp2 pp2 megatron conversion)}."""
    out = {}
    for fam in FAMILIES:
        root = tmp_path_factory.mktemp(fam)
        hf = _hf(CONFIGS[fam], root / "hf")
        mapc.convert(hf, root / "mg", to="megatron", tp=TP, pp=PP)
        out[fam] = hf, root / "mg"
    return out


def _rank_file(mg, t, p):
    return mg / "release" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt"


def _mcore_cfg(fam, vocab):
    cfg = CONFIGS[fam]
    return dict(hidden=cfg["hidden_size"], layers=LAYERS, heads=cfg["num_attention_heads"],
                groups=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                ffn=cfg["intermediate_size"], vocab=vocab, tied=True, norm_eps=1e-6,
                rotary_base=10000, qk_layernorm=fam == "gemma3")


@pytest.mark.parametrize("fam", FAMILIES)
def test_round_trip_at_tp2_pp2_keeps_logits(converted, fam, tmp_path):
    from safetensors.torch import load_file
    hf, mg = converted[fam]
    mapc.convert(mg, tmp_path / "back", to="hf")
    assert torch.equal(_logits(tmp_path / "back"), _logits(hf))
    a, b = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "back" /
                                                                   "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text())[
        "attn_logit_softcapping"] == CONFIGS[fam].get("attn_logit_softcapping")


@pytest.fixture(scope="module")
def mcore(converted, tmp_path_factory):
    """One megatron-core world (tp2 pp2) for both families: per-rank names and shapes of the
    tp2 pp2 files, then the tp1 logits of FORWARD models (and of their 1 + w negative
    controls). Returns (ranks per family, logits per forward job, transformers' logits)."""
    pytest.importorskip("megatron.core")
    from tests.groundtruth.mcore_gemma import gemma_ranks
    tmp = tmp_path_factory.mktemp("gemma_forward")
    vocab = -(-CONFIGS["gemma2"]["vocab_size"] // (128 * TP)) * 128 * TP
    forward, refs = [], []
    for fam in FAMILIES:
        hf = _hf(FORWARD[fam], tmp / fam)
        mapc.convert(hf, tmp / f"{fam}-mg", to="megatron")
        f = tmp / f"{fam}-mg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
        forward.append((_mcore_cfg(fam, 128), f))
        refs.append(_logits(hf).numpy())
        # negative control: the norms stored as 1 + w (what a converter for a plain, not
        # zero-centered, RMSNorm would store)
        state = torch.load(str(f), weights_only=False)
        for name, x in state["model"].items():
            if "norm" in name:
                state["model"][name] = x + 1
        torch.save(state, str(tmp / f"{fam}-plus1.pt"))
        forward.append((_mcore_cfg(fam, 128), tmp / f"{fam}-plus1.pt"))
    ranks, logits = gemma_ranks([(_mcore_cfg(f, vocab), converted[f][1]) for f in FAMILIES],
                                TP, PP, forward, TOKENS[0])
    return ranks, logits, refs


@pytest.mark.slow
def test_megatron_core_loads_every_rank_with_its_names_and_shapes(converted, mcore):
    truths = mcore[0]
    for fam, truth in zip(FAMILIES, truths, strict=True):
        assert sorted(truth) == [(t, p) for t in range(TP) for p in range(PP)]
        for (t, p), names in truth.items():
            model = torchfile.load(_rank_file(converted[fam][1], t, p))["model"]
            assert {n: list(v.shape) for n, v in model.items()} == names, (fam, t, p)


def _expected_rank(w: dict, cfg: dict, t: int, p: int) -> dict:
    """The Megatron-Bridge layout of rank (t, p), written out in numpy from the HF weights."""
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    hidden, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    padded = -(-vocab // (128 * TP)) * 128 * TP
    per = LAYERS // PP

    def rows(a, n):                                    # tp rank t's n-th part of the rows
        return np.split(a, TP, axis=0)[t] if n else a

    out = {}
    embed = np.concatenate([w["model.embed_tokens.weight"],
                            np.zeros((padded - vocab, hidden), np.float32)])
    if p == 0:
        out["embedding.word_embeddings.weight"] = rows(embed, 1)
    for j in range(per):
        i, pre = p * per + j, f"decoder.layers.{j}."
        hfp = f"model.layers.{i}."
        q = w[hfp + "self_attn.q_proj.weight"].reshape(groups, heads // groups, hd, hidden)
        k = w[hfp + "self_attn.k_proj.weight"].reshape(groups, 1, hd, hidden)
        v = w[hfp + "self_attn.v_proj.weight"].reshape(groups, 1, hd, hidden)
        qkv = np.concatenate([q, k, v], axis=1)        # per query group: its q heads, k, v
        out[pre + "self_attention.linear_qkv.weight"] = \
            np.split(qkv, TP, axis=0)[t].reshape(-1, hidden)
        out[pre + "self_attention.linear_qkv.layer_norm_weight"] = \
            w[hfp + "input_layernorm.weight"]
        out[pre + "self_attention.linear_proj.weight"] = \
            np.split(w[hfp + "self_attn.o_proj.weight"], TP, axis=1)[t]
        out[pre + "self_attention.linear_proj.post_layernorm.weight"] = \
            w[hfp + "post_attention_layernorm.weight"]
        if hfp + "self_attn.q_norm.weight" in w:
            out[pre + "self_attention.q_layernorm.weight"] = w[hfp + "self_attn.q_norm.weight"]
            out[pre + "self_attention.k_layernorm.weight"] = w[hfp + "self_attn.k_norm.weight"]
        out[pre + "mlp.linear_fc1.weight"] = np.concatenate(
            [rows(w[hfp + "mlp.gate_proj.weight"], 1), rows(w[hfp + "mlp.up_proj.weight"], 1)])
        out[pre + "mlp.linear_fc1.layer_norm_weight"] = w[hfp + "pre_feedforward_layernorm.weight"]
        out[pre + "mlp.linear_fc2.weight"] = \
            np.split(w[hfp + "mlp.down_proj.weight"], TP, axis=1)[t]
        out[pre + "mlp.linear_fc2.post_layernorm.weight"] = \
            w[hfp + "post_feedforward_layernorm.weight"]
    assert ffn % TP == 0
    if p == PP - 1:
        out["decoder.final_layernorm.weight"] = w["model.norm.weight"]
        out["output_layer.weight"] = rows(embed, 1)     # tied: the last stage's own copy
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_shard_is_the_independent_layout(converted, fam):
    from safetensors.numpy import load_file
    hf, mg = converted[fam]
    w = load_file(str(hf / "model.safetensors"))
    for t in range(TP):
        for p in range(PP):
            model = torchfile.load(_rank_file(mg, t, p))["model"]
            want = _expected_rank(w, CONFIGS[fam], t, p)
            assert sorted(model) == sorted(want), (t, p)
            for name, arr in want.items():
                np.testing.assert_array_equal(np.asarray(model[name]), arr,
                                              err_msg=f"{fam} rank {t},{p} {name}")


@pytest.mark.slow
def test_megatron_core_computes_transformers_logits(mcore):
    _, got, refs = mcore
    for n, fam in enumerate(FAMILIES):
        ref = refs[n]
        ours, plus1 = (np.array(x)[..., :ref.shape[-1]] for x in got[2 * n: 2 * n + 2])
        assert np.abs(ours - ref).max() <= MCORE_TOLERANCE, fam
        assert np.abs(plus1 - ref).max() > 1e-2, fam


@pytest.mark.parametrize("fam, freq", [("gemma2", 2), ("gemma3", 6)])
def test_megatron_args_state_the_zero_centered_norms_and_windows(converted, fam, freq):
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        args = vars(torch.load(str(_rank_file(converted[fam][1], 0, 0)), weights_only=True)["args"])
    assert args["layernorm_zero_centered_gamma"] is True
    assert args["gated_linear_unit"] is True and args["swiglu"] is False
    assert args["window_size"] == [CONFIGS[fam]["sliding_window"] - 1, 0]
    assert args["window_attn_skip_freq"] == freq
    assert args.get("qk_layernorm", False) == (fam == "gemma3")


def test_layer_kinds_megatron_cannot_state_are_refused(tmp_path):
    cfg = dict(CONFIGS["gemma2"], layer_types=["full_attention"] * LAYERS)
    hf = _hf(cfg, tmp_path / "hf")
    with pytest.raises(MapcError, match="window_attn_skip_freq 2.*layer_types differ"):
        mapc.convert(hf, tmp_path / "mg", to="megatron")
    assert not (tmp_path / "mg").exists()


@pytest.mark.parametrize("fam", FAMILIES)
def test_megatron_checkpoint_without_record_reads_back(converted, fam, tmp_path):
    """No mapc.json: the names tell the family; args give the sizes and the sliding window
    (window_size = [window - 1, 0] read back); soft-capping has no Megatron-LM argument, so
    the spec's default stands (pass --config to keep the model's own)."""
    import shutil

    from safetensors.torch import load_file
    hf, mg = converted[fam]
    bare = tmp_path / "mg"
    shutil.copytree(mg, bare)
    (bare / "mapc.json").unlink()
    mapc.convert(bare, tmp_path / "back", to="hf")
    a, b = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "back" /
                                                                   "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["model_type"] == CONFIGS[fam]["model_type"]
    assert back["sliding_window"] == CONFIGS[fam]["sliding_window"]
    assert back["head_dim"] == CONFIGS[fam]["head_dim"]
    mapc.convert(bare, tmp_path / "kept", to="hf", config=hf / "config.json")
    assert torch.equal(_logits(tmp_path / "kept"), _logits(hf))
