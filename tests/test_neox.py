"""GPT-NeoX / DeepSpeed pipeline checkpoints (the `neox` format), against the real libraries:
transformers' GPTNeoXForCausalLM and LlamaForCausalLM (logits), NeoX's own merge rules as its
convert_neox_to_hf.py applies them (shards), and DeepSpeed's PipelineModule (file names, keys,
shapes)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mapc
from mapc.errors import MapcError
from tests.conftest import build_transformers_model, llama_config, logits_of, tree_hash

torch = pytest.importorskip("torch")

TOKENS = [3, 17, 42, 5, 99, 0, 64, 8, 31, 77]


def neox_config(hidden=32, layers=4, heads=4, ffn=48, vocab=100, rotary_pct=0.5,
                parallel_residual=True, tied=False, bias=True):
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": ffn, "vocab_size": vocab, "rotary_pct": rotary_pct,
            "use_parallel_residual": parallel_residual, "tie_word_embeddings": tied,
            "attention_bias": bias, "max_position_embeddings": 64, "hidden_act": "gelu"}


def build_neox_model(cfg, path, seed=0):
    """A tiny GPTNeoXForCausalLM with every parameter random (biases and norms included, so a
    misplaced or mis-summed bias shows in the logits)."""
    model = build_transformers_model(cfg, path, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return model


def load_layer(tag_dir: Path, position: int, tp_rank: int) -> dict:
    return torch.load(tag_dir / f"layer_{position:02d}-model_{tp_rank:02d}-model_states.pt",
                      weights_only=True)


def tag_dir(ckpt: Path) -> Path:
    return ckpt / (ckpt / "latest").read_text().strip()


# ---- GPT-NeoX / Pythia ------------------------------------------------------------------------
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_gpt_neox_to_neox_and_back_keeps_logits(tmp_path, parallel_residual):
    cfg = neox_config(parallel_residual=parallel_residual)
    model = build_neox_model(cfg, tmp_path / "hf")
    before = tree_hash(tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=2)
    mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf")
    assert tree_hash(tmp_path / "hf") == before
    assert torch.equal(logits_of(model, TOKENS), logits_of(tmp_path / "back", TOKENS))


@pytest.mark.parametrize("parallel_residual", [True, False])
def test_neox_shards_merge_the_way_neox_merges_them(tmp_path, parallel_residual):
    """The tp=2 shards, merged with the rules of NeoX's tools/ckpts/convert_neox_to_hf.py
    (column-parallel: concatenate dim 0; row-parallel weights: dim 1; norms: replicated;
    row-parallel biases: the sum of the ranks' copies, which is what the model computes with
    parallel residuals; with sequential residuals NeoX adds the bias once after the
    all-reduce, so each rank holds it whole), give the HF tensors back."""
    cfg = neox_config(parallel_residual=parallel_residual, layers=2)
    build_neox_model(cfg, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=1)
    from safetensors.torch import load_file   # the names on disk (transformers 5 renames
    hf = load_file(tmp_path / "hf" / "model.safetensors")   # embed_out to lm_head in memory)
    d = tag_dir(tmp_path / "nx")
    emb = [load_layer(d, 0, t)["word_embeddings.weight"] for t in (0, 1)]
    assert torch.equal(torch.cat(emb)[:100], hf["gpt_neox.embed_in.weight"])
    for i in range(2):
        r = [load_layer(d, i + 2, t) for t in (0, 1)]
        p = f"gpt_neox.layers.{i}."
        for key, hf_key, dim in [("attention.query_key_value.weight",
                                  "attention.query_key_value.weight", 0),
                                 ("attention.query_key_value.bias",
                                  "attention.query_key_value.bias", 0),
                                 ("mlp.linear1.weight", "mlp.dense_h_to_4h.weight", 0),
                                 ("mlp.linear1.bias", "mlp.dense_h_to_4h.bias", 0),
                                 ("attention.dense.weight", "attention.dense.weight", 1),
                                 ("mlp.linear2.weight", "mlp.dense_4h_to_h.weight", 1)]:
            assert torch.equal(torch.cat([x[key] for x in r], dim), hf[p + hf_key]), key
        for key in ("input_layernorm.weight", "post_attention_layernorm.bias"):
            assert torch.equal(r[0][key], hf[p + key]) and torch.equal(r[1][key], hf[p + key])
        for key, hf_key in [("attention.dense.bias", "attention.dense.bias"),
                            ("mlp.linear2.bias", "mlp.dense_4h_to_h.bias")]:
            if parallel_residual:
                assert torch.equal(r[0][key] + r[1][key], hf[p + hf_key]), key
                assert not torch.equal(r[1][key], hf[p + hf_key])
            else:
                assert torch.equal(r[0][key], hf[p + hf_key])
                assert torch.equal(r[1][key], hf[p + hf_key])
    final = load_layer(d, 5, 0)
    assert torch.equal(final["norm.bias"], hf["gpt_neox.final_layer_norm.bias"])
    head = [load_layer(d, 6, t)["final_linear.weight"] for t in (0, 1)]
    assert torch.equal(torch.cat(head)[:100], hf["embed_out.weight"])


def test_neox_bias_shares_written_by_neox_are_summed(tmp_path):
    """A NeoX run with parallel residuals holds equal shares (each rank's bias trains the same);
    reading sums them, so halving every rank's bias in place reads back half the bias."""
    cfg = neox_config(layers=2)
    build_neox_model(cfg, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=1)
    d = tag_dir(tmp_path / "nx")
    full = load_layer(d, 2, 0)["attention.dense.bias"].clone()
    for t in (0, 1):
        sd = load_layer(d, 2, t)
        sd["attention.dense.bias"] = full / 2
        torch.save(sd, d / f"layer_02-model_{t:02d}-model_states.pt")
    mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf")
    from safetensors.torch import load_file
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert torch.equal(back["gpt_neox.layers.0.attention.dense.bias"], full)


# ---- Llama-style NeoX ------------------------------------------------------------------------
@pytest.mark.parametrize("groups,tied", [(2, False), (4, True)])
def test_llama_to_neox_and_back_keeps_logits(tmp_path, groups, tied):
    cfg = llama_config(hidden=64, layers=4, heads=4, groups=groups, ffn=96, vocab=100,
                       tied=tied)
    model = build_transformers_model(cfg, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=2)
    mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(model, TOKENS), logits_of(tmp_path / "back", TOKENS))


@pytest.mark.parametrize("groups", [2, 4])
def test_llama_neox_shards_merge_the_way_neox_merges_them(tmp_path, groups):
    """NeoX's convert_neox_to_hf.py for Llama: linear1 per rank is chunk(2) = (up, gate); with
    GQA each rank's QKV is [Q_r | K_r | V_r] (gpt-neox PR #1315); without GQA (num_kv_heads ==
    heads) NeoX's attention views each rank's rows as (heads, [q k v], head_dim)."""
    nh, hd, h = 4, 16, 64
    cfg = llama_config(hidden=h, layers=2, heads=nh, groups=groups, ffn=96, vocab=100)
    model = build_transformers_model(cfg, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=1)
    hf = model.state_dict()
    d = tag_dir(tmp_path / "nx")
    r = [load_layer(d, 2, t) for t in (0, 1)]
    ups, gates = zip(*(torch.chunk(x["mlp.linear1.weight"], 2, dim=0) for x in r))
    assert torch.equal(torch.cat(ups), hf["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(torch.cat(gates), hf["model.layers.0.mlp.gate_proj.weight"])
    qkv = torch.stack([x["attention.query_key_value.weight"] for x in r])
    if groups != nh:
        q, k, v = torch.split(qkv, [h // 2, groups * hd // 2, groups * hd // 2], dim=1)
    else:
        q, k, v = qkv.view(2, nh // 2, 3, hd, h).unbind(2)
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(x.reshape(-1, h), hf[f"model.layers.0.self_attn.{name}_proj.weight"])
    assert torch.equal(r[0]["input_layernorm.scale"], hf["model.layers.0.input_layernorm.weight"])
    assert torch.equal(load_layer(d, 5, 1)["norm.scale"], hf["model.norm.weight"])


# ---- DeepSpeed's own PipelineModule -------------------------------------------------------------
def _pipe_run(ds_root, tp: int) -> Path:
    """A checkpoint DeepSpeed's PipelineModule wrote (tests/groundtruth/neox_pipe.py, pp=2,
    model-parallel size ``tp``, ZeRO 1), trained once (kept under MAPC_DS_CACHE when set)."""
    from tests.groundtruth import deepspeed_ckpt as dc
    name = "neox_pipe_pp2_z1" if tp == 1 else f"neox_pipe_tp{tp}pp2_z1"
    out = Path(ds_root) / name
    if (out / "expected.json").is_file():
        return out
    tmp = Path(ds_root) / f".{name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    script = Path(__file__).parent / "groundtruth" / "neox_pipe.py"
    for attempt in range(3):
        cmd = [os.sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={2 * tp}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={dc._free_port()}",
               str(script), "--out", str(tmp / "run"), "--tp", str(tp)]
        try:
            dc._run(cmd, tmp / "log.txt", dc.TIMEOUT_S)
            break
        except RuntimeError as e:
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    shutil.move(str(tmp / "run"), str(out))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def pipe_ckpt(ds_root):
    return _pipe_run(ds_root, 1)


@pytest.fixture(scope="session")
def pipe_ckpt_tp2(ds_root):
    """tp=2, pp=2 (4 processes). DeepSpeed's layers are not tensor-parallel here, so only the
    file names and keys are NeoX's, not the shapes."""
    return _pipe_run(ds_root, 2)


def _pipe_hf_config(expected: dict) -> dict:
    return neox_config(hidden=expected["hidden_size"], layers=expected["num_hidden_layers"],
                       heads=expected["num_attention_heads"], ffn=expected["intermediate_size"],
                       vocab=expected["vocab_size"])


def test_mapc_reads_deepspeed_pipeline_checkpoint(tmp_path, pipe_ckpt):
    expected = json.loads((pipe_ckpt / "expected.json").read_text())
    cfg = _pipe_hf_config(expected)
    mapc.convert(pipe_ckpt, tmp_path / "hf", to="hf", config=cfg)
    from safetensors.torch import load_file
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    d = pipe_ckpt / expected["tag"]
    L = expected["num_hidden_layers"]
    assert torch.equal(hf["gpt_neox.embed_in.weight"], load_layer(d, 0, 0)["word_embeddings.weight"])
    for i in range(L):
        ds = load_layer(d, i + 2, 0)
        assert torch.equal(hf[f"gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias"], ds["mlp.linear2.bias"])
        assert torch.equal(hf[f"gpt_neox.layers.{i}.attention.query_key_value.weight"],
                           ds["attention.query_key_value.weight"])
    assert torch.equal(hf["gpt_neox.final_layer_norm.weight"], load_layer(d, L + 3, 0)["norm.weight"])
    assert torch.equal(hf["embed_out.weight"], load_layer(d, L + 4, 0)["final_linear.weight"])


def _same_files_as_deepspeed(tmp_path, ckpt, tp: int, *, shapes: bool):
    """Convert an HF model of ``ckpt``'s config to neox (tp, pp=2, fresh optimizer) and check it
    holds DeepSpeed's file set, the same keys in every layer file (and shapes, where the
    harness's layers are not tensor-parallel: tp=1) and the same top-level entries in every
    mp_rank file. Returns (expected.json, DeepSpeed's tag dir)."""
    expected = json.loads((ckpt / "expected.json").read_text())
    build_neox_model(_pipe_hf_config(expected), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=tp, pp=2, with_optimizer=True)
    ds_dir, mp_dir = ckpt / expected["tag"], tag_dir(tmp_path / "nx")
    assert sorted(p.name for p in mp_dir.iterdir()) == sorted(p.name for p in ds_dir.iterdir())
    for name in sorted(p.name for p in ds_dir.iterdir() if "optim_states" not in p.name):
        a = torch.load(ds_dir / name, weights_only=False)
        b = torch.load(mp_dir / name, weights_only=False)
        if name.startswith("layer_"):
            assert list(a) == list(b), name
            if shapes:
                assert {k: tuple(v.shape) for k, v in a.items()} == \
                    {k: tuple(v.shape) for k, v in b.items()}, name
        else:
            assert a["module"] is None and b["module"] is None
            assert set(a) <= set(b), (name, set(a) - set(b))
            assert b["mp_world_size"] == a["mp_world_size"]
            assert b["checkpoint_parallel_dimensions"] == a["checkpoint_parallel_dimensions"]
    return expected, ds_dir


def test_mapc_writes_the_files_deepspeed_pipeline_writes(tmp_path, pipe_ckpt):
    """Same topology (tp=1, pp=2), with a (fresh) optimizer: the same layer, mp_rank and ZeRO
    optimizer files, the same keys and shapes in every layer file, the same top-level entries
    in every mp_rank file (module None). The optimizer files' contents:
    tests/test_neox_optim.py."""
    _same_files_as_deepspeed(tmp_path, pipe_ckpt, 1, shapes=True)


def test_optimizer_state_is_read_from_the_pipeline_zero_partitions(pipe_ckpt):
    """fp32 master weights and Adam moments of every parameter, read from DeepSpeed's
    zero_pp_rank_0_mp_rank_0S files, equal what DeepSpeed's safe_get_full_fp32_param /
    safe_get_full_optimizer_state gathered live on each stage."""
    from safetensors.torch import load_file
    from mapc.runtime.containers import open_source
    expected = {k: {} for k in ("fp32", "exp_avg", "exp_avg_sq")}
    for k in expected:
        for f in sorted(pipe_ckpt.glob(f"{k}.rank*.safetensors")):
            expected[k].update(load_file(f))
    with open_source(pipe_ckpt) as src:
        assert src.slots() == ["param", "master", "exp_avg", "exp_avg_sq"]
        coord = src.coords()[0]
        names = src.names(coord)
        assert sorted(names) == sorted(expected["fp32"])
        for name in names:
            for slot, key in (("master", "fp32"), ("exp_avg", "exp_avg"),
                              ("exp_avg_sq", "exp_avg_sq")):
                got = torch.from_numpy(np.array(src.read(name, coord, slot=slot)))
                assert torch.equal(got, expected[key][name]), (name, slot)
        state = src.training_state()
    assert state["step"] == 1.0 and state["zero_stage"] == 1 and state["pp_world_size"] == 2
    assert sorted(state["param_groups"][0]["params"]) == sorted(names)


def test_file_names_with_tp_and_pp_match_deepspeed(tmp_path, pipe_ckpt_tp2):
    """tp=2, pp=2: the same layer files (model_00 and model_01 for every position), mp_rank
    and optimizer files, and DeepSpeed's mp_rank_MM holds stage MM // tp: the numbering mapc's
    writer uses (stage * tp + tp rank)."""
    from mapc.runtime.containers.neox import mp_file
    expected, ds_dir = _same_files_as_deepspeed(tmp_path, pipe_ckpt_tp2, 2, shapes=False)
    L = expected["num_hidden_layers"]
    for stage, positions in ((0, {0, 2}), (1, {L + 1, L + 3, L + 4})):
        for t in (0, 1):
            ms = torch.load(ds_dir / mp_file(stage, t, 2), weights_only=False)
            held = {int(n.split(".")[0]) for g in ms["param_shapes"] for n in g}
            assert positions <= held, (stage, t, held)


# ---- round trips, growing and shrinking ---------------------------------------------------------
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _gpt_neox_hf_names(cfg):
    """The HF GPTNeoX state dict's names and shapes, written out from transformers' modeling
    code (not from the spec)."""
    h, L, f, v = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"],
                  cfg["vocab_size"])
    out = {"gpt_neox.embed_in.weight": (v, h), "gpt_neox.final_layer_norm.weight": (h,),
           "gpt_neox.final_layer_norm.bias": (h,), "embed_out.weight": (v, h)}
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "post_attention_layernorm.bias": (h,),
                    p + "attention.query_key_value.weight": (3 * h, h),
                    p + "attention.query_key_value.bias": (3 * h,),
                    p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
                    p + "mlp.dense_h_to_4h.weight": (f, h), p + "mlp.dense_h_to_4h.bias": (f,),
                    p + "mlp.dense_4h_to_h.weight": (h, f), p + "mlp.dense_4h_to_h.bias": (h,)})
    return out


@st.composite
def neox_case(draw):
    heads = draw(st.sampled_from([2, 4, 6]))
    cfg = neox_config(hidden=heads * draw(st.sampled_from([2, 4])), layers=draw(st.integers(1, 4)),
                      heads=heads, ffn=draw(st.sampled_from([4, 12, 24])),
                      vocab=draw(st.integers(3, 200)),
                      parallel_residual=draw(st.booleans()))
    tps = [t for t in _divisors(heads) if cfg["intermediate_size"] % t == 0]
    pps = _divisors(cfg["num_hidden_layers"])
    topo = [{"tp": draw(st.sampled_from(tps)), "pp": draw(st.sampled_from(pps))}
            for _ in range(2)]
    return cfg, topo


def _write_random(path, names, cfg, seed):
    from safetensors.numpy import save_file
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({n: rng.standard_normal(s).astype(np.float32) for n, s in names.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _same_safetensors(a: Path, b: Path):
    from safetensors.numpy import load_file
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


def _fresh(tmp_path, name):
    n = 0
    while (tmp_path / f"{name}{n}").exists():
        n += 1
    return tmp_path / f"{name}{n}"


@SETTINGS
@given(case=neox_case(), seed=st.integers(0, 2 ** 16))
def test_gpt_neox_reshard_round_trip_is_bit_exact(tmp_path, case, seed):
    cfg, (a, b) = case
    src = _write_random(_fresh(tmp_path, "hf"), _gpt_neox_hf_names(cfg), cfg, seed)
    x, y, back = _fresh(tmp_path, "x"), _fresh(tmp_path, "y"), _fresh(tmp_path, "back")
    mapc.convert(src, x, to="neox", **a)
    mapc.convert(x, y, to="neox", **b)
    mapc.convert(y, back, to="hf")
    _same_safetensors(src, back)


@st.composite
def llama_case(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2]))
    cfg = llama_config(hidden=heads * 4, layers=draw(st.integers(1, 4)), heads=heads,
                       groups=groups, ffn=draw(st.sampled_from([4, 8, 12])),
                       vocab=draw(st.integers(3, 200)), tied=draw(st.booleans()))
    tps = [t for t in _divisors(groups) if cfg["intermediate_size"] % t == 0]
    pps = _divisors(cfg["num_hidden_layers"])
    topo = [{"tp": draw(st.sampled_from(tps)), "pp": draw(st.sampled_from(pps))}
            for _ in range(2)]
    return cfg, topo


@SETTINGS
@given(case=llama_case(), seed=st.integers(0, 2 ** 16))
def test_llama_neox_reshard_round_trip_is_bit_exact(tmp_path, case, seed):
    from tests.conftest import write_random_hf
    cfg, (a, b) = case
    src = write_random_hf(_fresh(tmp_path, "hf"), cfg, seed=seed)
    x, y, back = _fresh(tmp_path, "x"), _fresh(tmp_path, "y"), _fresh(tmp_path, "back")
    mapc.convert(src, x, to="neox", **a)
    mapc.convert(x, y, to="neox", **b)
    mapc.convert(y, back, to="hf")
    _same_safetensors(src, back)


# ---- bad input ----------------------------------------------------------------------------------
def test_tp_not_dividing_heads_is_refused_and_nothing_is_written(tmp_path):
    build_neox_model(neox_config(heads=4), tmp_path / "hf")
    with pytest.raises(MapcError, match="tp=3 does not divide"):
        mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=3)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_llama_tp_not_dividing_kv_heads_is_refused(tmp_path):
    build_transformers_model(llama_config(hidden=64, layers=2, heads=4, groups=2),
                             tmp_path / "hf")
    with pytest.raises(MapcError, match="groups / tp"):
        mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=4)


def test_missing_layer_file_is_named(tmp_path):
    build_neox_model(neox_config(layers=2), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=1)
    (tag_dir(tmp_path / "nx") / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(MapcError, match="layer_03-model_01-model_states.pt"):
        mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf")
    assert not (tmp_path / "back").exists()


def test_a_whole_missing_layer_is_refused(tmp_path):
    build_neox_model(neox_config(layers=2), tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=2, pp=1)
    for t in (0, 1):
        (tag_dir(tmp_path / "nx") / f"layer_03-model_{t:02d}-model_states.pt").unlink()
    with pytest.raises(MapcError, match="lacks"):
        mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf")


# ---- the `sum over` clause --------------------------------------------------------------------
SUM_SPEC = """
family tiny
config {
    hidden: hidden_size
    ffn:    intermediate_size
}
tensors {
    w: hidden ffn
    b: hidden
}
layout par {
    mesh tp pp
    "w" = w  split ffn over tp  on first
    "b" = b  RULE  on first
}
"""


def test_gpt_neox_spec_validates_against_the_ir_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from mapc.compiler.spec import load_spec, schema
    ir = load_spec("gpt_neox").ir
    jsonschema.validate(ir, schema())
    sums = [r["sum"] for lay in ir["layouts"] for r in lay["rules"] if r["sum"]]
    assert sums and all(s == ["tp"] for s in sums)


@pytest.mark.parametrize("clause,message", [
    ("sum over pp", "not a data mesh axis"),
    ("sum over ep", "not a data mesh axis"),
    ("split hidden over tp  sum over tp", "also cuts this tensor"),
])
def test_bad_sum_clauses_are_refused(clause, message):
    from mapc.compiler.spec import compile_text
    from mapc.errors import SpecError
    with pytest.raises(SpecError, match=message):
        compile_text(SUM_SPEC.replace("RULE", clause), "t.map")


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_sum_shares_write_zeros_and_read_back_exactly(tmp_path, tp):
    """At any tp (3 included, where equal thirds would not add back up), rank 0 holds the bias,
    the other ranks zeros, and reading adds them back bit for bit."""
    cfg = neox_config(hidden=24, heads=6, ffn=24, layers=1)
    build_neox_model(cfg, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="neox", tp=tp)
    d = tag_dir(tmp_path / "nx")
    from safetensors.torch import load_file
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    bias = hf["gpt_neox.layers.0.attention.dense.bias"]
    shares = [load_layer(d, 2, t)["attention.dense.bias"] for t in range(tp)]
    assert torch.equal(shares[0], bias)
    assert all(not s.any() for s in shares[1:])
    mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
