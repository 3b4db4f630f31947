"""The Qwen2 and GPT-2 specs against real libraries: transformers models survive a Megatron round
trip with identical logits, Megatron names and shapes equal megatron-core's, random models
round-trip bit-exact through every layout, and checkpoints are recognised without help."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mapc
from mapc.cli.main import main
from mapc.runtime import torchfile
from tests.conftest import build_transformers_model, hf_names_shapes, llama_config, logits_of

TOKENS = [1, 5, 9, 3, 7, 2, 8, 4]
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- configs and HF names, written out independently of the specs ----------------------------
def qwen2_config(hidden=64, layers=4, heads=8, groups=2, head_dim=None, ffn=96, vocab=100,
                 tied=False):
    cfg = llama_config(hidden=hidden, layers=layers, heads=heads, groups=groups,
                       head_dim=head_dim, ffn=ffn, vocab=vocab, tied=tied)
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
               max_window_layers=layers, rope_parameters={"rope_type": "default",
                                                          "rope_theta": 1000000.0})
    return cfg


def gpt2_config(hidden=64, layers=4, heads=4, ffn=None, vocab=100, positions=64, tied=True):
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": hidden,
            "n_layer": layers, "n_head": heads, "n_inner": ffn, "vocab_size": vocab,
            "n_positions": positions, "tie_word_embeddings": tied,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "bos_token_id": 0, "eos_token_id": 0}


def qwen2_names_shapes(cfg):
    out = hf_names_shapes(cfg)
    nh, ng = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        out.update({p + "q_proj.bias": (nh * hd,), p + "k_proj.bias": (ng * hd,),
                    p + "v_proj.bias": (ng * hd,)})
    return out


def gpt2_names_shapes(cfg):
    h, v, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    f = cfg["n_inner"] or 4 * h
    out = {"transformer.wte.weight": (v, h), "transformer.wpe.weight": (n, h),
           "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        out.update({p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
                    p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
                    p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
                    p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                    p + "mlp.c_fc.weight": (h, f), p + "mlp.c_fc.bias": (f,),
                    p + "mlp.c_proj.weight": (f, h), p + "mlp.c_proj.bias": (h,)})
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


NAMES_SHAPES = {"qwen2": qwen2_names_shapes, "gpt2": gpt2_names_shapes}


def write_random(path: Path, cfg: dict, seed=0) -> Path:
    from safetensors.numpy import save_file
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {n: rng.standard_normal(s).astype(np.float32)
               for n, s in NAMES_SHAPES[cfg["model_type"]](cfg).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def build_model(cfg, path):
    """A transformers model with every bias and norm non-trivial (they start at 0 and 1), so a
    misplaced bias or norm changes the logits."""
    torch = pytest.importorskip("torch")
    model = build_transformers_model(cfg, path)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + (name.endswith("weight")))
    model.save_pretrained(str(path))
    return model


def megatron_models(mg: Path, tp: int, pp: int) -> dict:
    out = {}
    for t in range(tp):
        for p in range(pp):
            d = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            out[(t, p)] = torchfile.load(mg / "release" / d / "model_optim_rng.pt")["model"]
    return out


# ---- transformers: logits survive hf -> megatron -> hf ----------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("cfg,topo,params", [
    (qwen2_config(), {"tp": 2, "pp": 2}, {}),
    (qwen2_config(layers=2, heads=4, groups=1, head_dim=24, tied=True), {"tp": 1, "pp": 2},
     {"naming": "te"}),
    (qwen2_config(heads=4, groups=4, vocab=77, tied=True), {"tp": 4, "pp": 1},
     {"naming": "legacy"}),
    (gpt2_config(), {"tp": 2, "pp": 2}, {}),
    (gpt2_config(hidden=48, layers=3, heads=3, ffn=72, vocab=130, tied=False),
     {"tp": 3, "pp": 3}, {"naming": "legacy"}),
    (gpt2_config(layers=2, heads=2), {"tp": 1, "pp": 1}, {"naming": "te"}),
], ids=["qwen2-gqa-tp2-pp2", "qwen2-mqa-tied-headdim-pp2-te", "qwen2-mha-tied-tp4-legacy",
        "gpt2-tp2-pp2", "gpt2-untied-tp3-pp3-legacy", "gpt2-tp1-pp1-te"])
def test_transformers_model_survives_megatron_round_trip(tmp_path, cfg, topo, params):
    torch = pytest.importorskip("torch")
    model = build_model(cfg, tmp_path / "hf")
    expected = logits_of(model, TOKENS)
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", set=params, **topo)
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert torch.equal(expected, logits_of(tmp_path / "back", TOKENS))
    assert type(model).__name__ in (tmp_path / "back" / "config.json").read_text()


# ---- megatron-core: names and shapes per rank -------------------------------------------------
def _harness():
    path = Path(__file__).parent / "groundtruth" / "mcore_names.py"
    spec = importlib.util.spec_from_file_location("_groundtruth_mcore_names", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _padded(vocab, tp):
    return -(-vocab // (128 * tp)) * 128 * tp


@pytest.mark.slow
@pytest.mark.parametrize("family,tp,pp", [("qwen2", 2, 1), ("gpt2", 2, 2)])
def test_megatron_names_and_shapes_equal_megatron_core(tmp_path, family, tp, pp):
    """One megatron-core process per rank; pp stays 1 for Qwen2, whose stages are Llama's."""
    pytest.importorskip("megatron.core")
    if family == "qwen2":   # GQA, untied, q/k/v biases
        cfg = qwen2_config(hidden=64, layers=2, heads=8, groups=2, ffn=96, vocab=200)
        truth_cfg = {"hidden": 64, "layers": 2, "heads": 8, "groups": 2, "head_dim": 8,
                     "ffn": 96, "vocab": _padded(200, tp), "tied": False, "qkv_bias": True}
    else:                   # LayerNorm, biases everywhere, learned positions, plain MLP, tied
        cfg = gpt2_config(hidden=64, layers=2, heads=4, vocab=200, positions=48)
        truth_cfg = {"hidden": 64, "layers": 2, "heads": 4, "groups": 4, "head_dim": 16,
                     "ffn": 256, "vocab": _padded(200, tp), "tied": True, "norm": "LayerNorm",
                     "gated": False, "linear_bias": True,
                     "position_embedding": "learned_absolute", "max_seq": 48}
    write_random(tmp_path / "hf", cfg)
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", tp=tp, pp=pp)
    truth = _harness().mcore_state_dict_shapes(truth_cfg, tp, pp)
    ours = megatron_models(tmp_path / "mg", tp, pp)
    assert sorted(truth) == sorted(ours)
    for coord, names in truth.items():
        assert {k: list(v.shape) for k, v in ours[coord].items()} == names, coord


# ---- the fused QKV values against the formulas of LAYOUTS.md ----------------------------------
def test_qwen2_qkv_bias_shards_match_the_layout_formula(tmp_path):
    nh, ng, hd, tp = 6, 2, 4, 2
    hpg = nh // ng
    cfg = qwen2_config(hidden=16, layers=1, heads=nh, groups=ng, head_dim=hd, ffn=8, vocab=10)
    write_random(tmp_path / "hf", cfg)
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", tp=tp)
    from safetensors.numpy import load_file
    w = load_file(tmp_path / "hf" / "model.safetensors")
    q, k, v = (w[f"model.layers.0.self_attn.{x}_proj.bias"] for x in "qkv")
    full = np.zeros((nh + 2 * ng) * hd, np.float32)
    for h in range(nh):
        g, j = divmod(h, hpg)
        full[(g * (hpg + 2) + j) * hd:(g * (hpg + 2) + j + 1) * hd] = q[h * hd:(h + 1) * hd]
    for g in range(ng):
        full[(g * (hpg + 2) + hpg) * hd:(g * (hpg + 2) + hpg + 1) * hd] = k[g * hd:(g + 1) * hd]
        full[(g * (hpg + 2) + hpg + 1) * hd:(g * (hpg + 2) + hpg + 2) * hd] = \
            v[g * hd:(g + 1) * hd]
    for (r, _), m in megatron_models(tmp_path / "mg", tp, 1).items():
        np.testing.assert_array_equal(
            m["decoder.layers.0.self_attention.linear_qkv.bias"].numpy(), np.split(full, tp)[r])


def test_gpt2_qkv_shards_are_per_head_qkv_of_the_transposed_c_attn(tmp_path):
    """Legacy Megatron MHA rows (nh, [q k v], hd): head h, part s, dim d at (h*3+s)*hd+d, where
    c_attn's output column s*H + h*hd + d holds it."""
    nh, hd, tp = 4, 3, 2
    H = nh * hd
    write_random(tmp_path / "hf", gpt2_config(hidden=H, layers=1, heads=nh, vocab=10,
                                              positions=8))
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron", tp=tp)
    from safetensors.numpy import load_file
    w = load_file(tmp_path / "hf" / "model.safetensors")
    cw, cb = w["transformer.h.0.attn.c_attn.weight"], w["transformer.h.0.attn.c_attn.bias"]
    rows = np.zeros((3 * H, H), np.float32)
    bias = np.zeros(3 * H, np.float32)
    for h in range(nh):
        for s in range(3):
            for d in range(hd):
                rows[(h * 3 + s) * hd + d] = cw[:, s * H + h * hd + d]
                bias[(h * 3 + s) * hd + d] = cb[s * H + h * hd + d]
    for (r, _), m in megatron_models(tmp_path / "mg", tp, 1).items():
        p = "decoder.layers.0.self_attention."
        np.testing.assert_array_equal(m[p + "linear_qkv.weight"].numpy(), np.split(rows, tp)[r])
        np.testing.assert_array_equal(m[p + "linear_qkv.bias"].numpy(), np.split(bias, tp)[r])
        np.testing.assert_array_equal(m[p + "linear_proj.weight"].numpy(),
                                      np.split(w["transformer.h.0.attn.c_proj.weight"].T, tp,
                                               axis=1)[r])
        np.testing.assert_array_equal(m[p + "linear_proj.bias"].numpy(),
                                      w["transformer.h.0.attn.c_proj.bias"])


# ---- hypothesis: random models round-trip bit-exact through every layout ----------------------
def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def qwen2_configs(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    return qwen2_config(hidden=draw(st.sampled_from([8, 12, heads * head_dim])),
                        layers=draw(st.integers(1, 4)), heads=heads, groups=groups,
                        head_dim=head_dim, ffn=draw(st.sampled_from([4, 8, 12])),
                        vocab=draw(st.integers(3, 300)), tied=draw(st.booleans()))


@st.composite
def gpt2_configs(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    hidden = heads * draw(st.sampled_from([2, 4, 6]))
    return gpt2_config(hidden=hidden, layers=draw(st.integers(1, 4)), heads=heads,
                       ffn=draw(st.sampled_from([None, 6, 12])),
                       vocab=draw(st.integers(3, 300)), positions=draw(st.integers(1, 40)),
                       tied=draw(st.booleans()))


@st.composite
def topologies(draw, cfg):
    if cfg["model_type"] == "qwen2":
        split, ffn, layers = cfg["num_key_value_heads"], cfg["intermediate_size"], \
            cfg["num_hidden_layers"]
    else:
        split, ffn, layers = cfg["n_head"], cfg["n_inner"] or 4 * cfg["n_embd"], cfg["n_layer"]
    tps = [t for t in _divisors(split) if ffn % t == 0]
    return {"tp": draw(st.sampled_from(tps)), "pp": draw(st.sampled_from(_divisors(layers)))}


def _fresh(tmp_path, name):
    n = 0
    while (tmp_path / f"{name}{n}").exists():
        n += 1
    return tmp_path / f"{name}{n}"


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@SETTINGS
@given(data=st.data())
def test_hf_megatron_reshard_hf_is_bit_exact(tmp_path, family, data):
    cfg = data.draw(qwen2_configs() if family == "qwen2" else gpt2_configs())
    a, b = data.draw(topologies(cfg)), data.draw(topologies(cfg))
    naming = data.draw(st.sampled_from(["local", "te", "legacy"]))
    src = write_random(_fresh(tmp_path, "hf"), cfg)
    mg, mg2, back = _fresh(tmp_path, "mg"), _fresh(tmp_path, "mg2"), _fresh(tmp_path, "back")
    mapc.convert(src, mg, to="megatron", set={"naming": naming}, **a)
    mapc.convert(mg, mg2, to="megatron", **b)
    mapc.convert(mg2, back, to="hf")
    from safetensors.numpy import load_file
    x, y = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].tobytes() == y[k].tobytes(), k


# ---- detection: from config.json, and from a Megatron checkpoint without mapc.json -----------
def _inspect(capsys, path):
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


FAMILY_CONFIGS = {"qwen2": qwen2_config(layers=2), "gpt2": gpt2_config(layers=2),
                  "llama": llama_config(layers=2)}


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_inspect_detects_the_family_from_config_model_type(tmp_path, capsys, family):
    src = write_random(tmp_path / "hf", FAMILY_CONFIGS[family])
    info = _inspect(capsys, src)
    assert (info["format"], info["family"]) == ("hf", family)
    assert "unresolved" not in info


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "llama"])
def test_inspect_detects_the_family_of_a_foreign_megatron_checkpoint(tmp_path, capsys, family):
    from tests.conftest import write_random_hf
    cfg = FAMILY_CONFIGS[family]
    src = (write_random_hf if family == "llama" else write_random)(tmp_path / "hf", cfg)
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, pp=2)
    (tmp_path / "mg" / "mapc.json").unlink()
    info = _inspect(capsys, tmp_path / "mg")
    assert (info["format"], info["family"], info["topology"]) == \
        ("megatron", family, {"tp": 2, "pp": 2})
    assert info["warnings"] == []


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_gguf_round_trip_keeps_logits_and_biases(tmp_path, tied):
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from mapc.runtime.containers import available
    if not available("gguf"):
        pytest.skip("gguf container not available")
    model = build_transformers_model(qwen2_config(tied=tied), tmp_path / "hf")
    with torch.no_grad():   # biases start at zero in transformers: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(str(tmp_path / "hf"))
    mapc.convert(tmp_path / "hf", tmp_path / "gg", to="gguf")
    import gguf
    reader = gguf.GGUFReader(str(tmp_path / "gg" / "model.gguf"))
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.bias" in names and "blk.3.attn_v.bias" in names
    mapc.convert(tmp_path / "gg", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(model, TOKENS), logits_of(tmp_path / "back", TOKENS))
