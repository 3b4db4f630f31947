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
  w, not 1 + w; a file with 1 + w stored, NeMo 1's Gemma 1 convention, does not).

The torch_dist layouts (and so nemo2: the layers stacked, the TE-style fused norm names,
``_extra_state`` entries) against the same stand-in model: megatron-core's own
``dist_checkpointing.load`` (strict: every key the model asks for, nothing else but the
Transformer Engine modules' ``_extra_state`` NeMo 2 lists) of mapc's torch_dist and nemo2
outputs at tp2 pp2 gives every rank the independent layout's shards above; at tp=1 the loaded
model computes transformers' logits; megatron-core's own torch_dist save of that model (no
mapc.json) reads back as the HF weights; hf -> torch_dist / nemo2 -> hf is bit-exact.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import mapc
from mapc.errors import MapcError
from mapc.runtime import torchfile
from tests.conftest import assert_same_safetensors
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
# megatron-core fp32 on CPU against transformers fp32 (observed: 1.3e-7 Gemma 2, 1.6e-7 Gemma 3,
# from the Megatron file, torch_dist and nemo2 alike; the 1 + w control: 0.45, 0.76)
MCORE_TOLERANCE = 1e-5
DIST_KINDS = ("torch_dist", "nemo2")


def _nemo2_te_extra(fam):
    """The keys of mapc's nemo2 output the stand-in model does not ask for: the _extra_state
    of NeMo 2's Transformer Engine modules that are plain torch modules here (attention core,
    post-norms, q/k norms, final norm)."""
    mods = ["self_attention.core_attention", "self_attention.linear_proj.post_layernorm",
            "mlp.linear_fc2.post_layernorm"]
    if fam == "gemma3":
        mods += ["self_attention.q_layernorm", "self_attention.k_layernorm"]
    return ["module.decoder.final_layernorm._extra_state"] + [
        f"module.decoder.layers.{m}._extra_state" for m in mods]


def _dist_dir(root, kind):
    return root / ("release" if kind == "torch_dist" else "weights")


def _save_args(fam):
    """Megatron-LM's args of megatron-core's own save (mcore_dist's, for this model)."""
    cfg = FORWARD[fam]
    return {"normalization": "RMSNorm", "swiglu": False, "gated_linear_unit": True,
            "layernorm_zero_centered_gamma": True, "norm_epsilon": 1e-6,
            "qk_layernorm": fam == "gemma3", "window_size": [cfg["sliding_window"] - 1, 0],
            "window_attn_skip_freq": 2 if fam == "gemma2" else 6,
            "max_position_embeddings": cfg["max_position_embeddings"],
            "seq_length": cfg["max_position_embeddings"]}


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
    """{family: (hf dir, its tp2 pp2 megatron conversion)}; its torch_dist and nemo2
    conversions (for a tp2 pp2 run) beside the megatron one."""
    out = {}
    for fam in FAMILIES:
        root = tmp_path_factory.mktemp(fam)
        hf = _hf(CONFIGS[fam], root / "hf")
        mapc.convert(hf, root / "mg", to="megatron", tp=TP, pp=PP)
        for kind in DIST_KINDS:
            mapc.convert(hf, root / kind, to=kind, tp=TP, pp=PP)
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
    controls); the torch_dist and nemo2 conversions loaded by megatron-core at tp2 pp2 (each
    rank's loaded state into DIR/loaded/KIND_FAM_T_P.pt) and, at tp1, those of FORWARD models
    with their logits, megatron-core's own torch_dist save of the model loaded from torch_dist
    into DIR/saved_FAM. Returns (ranks per family, logits per forward job, transformers'
    logits, DIR)."""
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
    dist = []
    (tmp / "loaded").mkdir()
    for fam in FAMILIES:
        mapc.convert(tmp / fam, tmp / f"{fam}-td", to="torch_dist")
        mapc.convert(tmp / fam, tmp / f"{fam}-n2", to="nemo2")
        forward.append((_mcore_cfg(fam, 128), {
            "dist": str(_dist_dir(tmp / f"{fam}-td", "torch_dist")),
            "dist_save": str(tmp / f"saved_{fam}"), "args": _save_args(fam)}))
        forward.append((_mcore_cfg(fam, 128), {
            "dist": str(_dist_dir(tmp / f"{fam}-n2", "nemo2")), "prefix": "module.",
            "unread": _nemo2_te_extra(fam)}))
        root = converted[fam][1].parent
        for kind in DIST_KINDS:
            nemo = {"prefix": "module.", "unread": _nemo2_te_extra(fam)} \
                if kind == "nemo2" else {}
            dist.append((_mcore_cfg(fam, vocab), {
                "dist": str(_dist_dir(root / kind, kind)),
                "out": str(tmp / "loaded" / f"{kind}_{fam}_{{t}}_{{p}}.pt")} | nemo))
    ranks, logits = gemma_ranks([(_mcore_cfg(f, vocab), converted[f][1]) for f in FAMILIES],
                                TP, PP, forward, TOKENS[0], dist)
    return ranks, logits, refs, tmp


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
    _, got, refs, _ = mcore
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
    # the megatron layout's nemo.* entries are NeMo 1's model_config.yaml keys, not arguments
    assert not [k for k in args if k.startswith("nemo") or k == "apply_embedding_scaling"]
    assert args.get("openai_gelu", False) == (fam == "gemma2")


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


# ---- torch_dist and nemo2 ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_megatron_core_loads_torch_dist_and_nemo2_at_tp2_pp2_as_the_independent_layout(
        converted, mcore, fam):
    """What megatron-core's strict dist_checkpointing.load put into each tp2 pp2 rank of the
    stand-in model: the shards of the independent numpy layout, key for key."""
    from safetensors.numpy import load_file
    hf, _ = converted[fam]
    w = load_file(str(hf / "model.safetensors"))
    for kind in DIST_KINDS:
        for t in range(TP):
            for p in range(PP):
                got = torch.load(mcore[3] / "loaded" / f"{kind}_{fam}_{t}_{p}.pt")
                want = _expected_rank(w, CONFIGS[fam], t, p)
                assert sorted(got) == sorted(want), (kind, t, p)
                for name, arr in want.items():
                    np.testing.assert_array_equal(got[name].numpy(), arr,
                                                  err_msg=f"{kind} {fam} rank {t},{p} {name}")


@pytest.mark.slow
def test_megatron_core_computes_transformers_logits_from_torch_dist_and_nemo2(mcore):
    _, got, refs, _ = mcore
    for n, fam in enumerate(FAMILIES):
        ref = refs[n]
        for x in got[2 * len(FAMILIES) + 2 * n: 2 * len(FAMILIES) + 2 * n + 2]:
            assert np.abs(np.array(x)[..., :ref.shape[-1]] - ref).max() <= MCORE_TOLERANCE, fam


@pytest.mark.parametrize("fam", FAMILIES)
def test_torch_dist_and_nemo2_round_trips_are_bit_exact(converted, fam, tmp_path):
    hf, mg = converted[fam]
    for kind in DIST_KINDS:
        mapc.convert(mg.parent / kind, tmp_path / kind, to="hf")
        assert_same_safetensors(hf, tmp_path / kind, kind)
    assert json.loads((tmp_path / "nemo2" / "config.json").read_text())[
        "attn_logit_softcapping"] == CONFIGS[fam].get("attn_logit_softcapping")


@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_megatron_cores_own_torch_dist_save_reads_as_the_hf_weights(mcore, fam, tmp_path):
    """No mapc.json: the spec whose torch_dist layout places every tensor (the post-norms; q/k
    norms for Gemma 3 only) is found, and the config comes from the args."""
    saved = mcore[3] / f"saved_{fam}"
    assert not (saved / "mapc.json").exists()
    assert mapc.inspect(saved)["family"] == fam
    mapc.convert(saved, tmp_path / "back", to="hf")
    assert_same_safetensors(mcore[3] / fam, tmp_path / "back")
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["sliding_window"] == FORWARD[fam]["sliding_window"]
