"""Shared fixtures: tiny checkpoints built by real libraries, files only under tmp_path."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _spec_cache_under_tmp(tmp_path_factory):
    """The on-disk spec cache (mapc.compiler.spec) of the whole run lives under tmp_path,
    for in-process calls and subprocesses alike."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAPC_CACHE_DIR", str(tmp_path_factory.mktemp("mapc-cache")))
        yield


def llama_config(hidden=64, layers=4, heads=8, groups=2, head_dim=None, ffn=96, vocab=100,
                 tied=False, model_type="llama"):
    cfg = {"architectures": ["LlamaForCausalLM" if model_type == "llama"
                             else "MistralForCausalLM"],
           "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": groups,
           "intermediate_size": ffn, "vocab_size": vocab, "tie_word_embeddings": tied,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "hidden_act": "silu"}
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


def hf_names_shapes(cfg):
    """The HF Llama state dict's names and shapes, written out independently of the spec."""
    h, L, nh, ng = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    f, v = cfg["intermediate_size"], cfg["vocab_size"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (nh * hd, h),
                    p + "self_attn.k_proj.weight": (ng * hd, h),
                    p + "self_attn.v_proj.weight": (ng * hd, h),
                    p + "self_attn.o_proj.weight": (h, nh * hd),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def write_random_hf(path: Path, cfg: dict, seed=0, dtype=np.float32) -> Path:
    """A random HF checkpoint written with the real safetensors library."""
    from safetensors.numpy import save_file
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {n: rng.standard_normal(s).astype(dtype) for n, s in hf_names_shapes(cfg).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def random_hf(tmp_path):
    def make(name="hf", **kw):
        return write_random_hf(tmp_path / name, llama_config(**kw), seed=kw.get("layers", 0))
    return make


def build_transformers_model(cfg: dict, path: Path, seed=0):
    """A tiny transformers model from ``cfg``, saved with save_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # make norms non-trivial so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    return model


def assert_same_safetensors(ref_dir, got_dir, what: str = "") -> None:
    """``got_dir/model.safetensors`` holds ``ref_dir``'s tensors: the same names, bit for bit."""
    from safetensors.numpy import load_file
    w = load_file(str(Path(ref_dir) / "model.safetensors"))
    back = load_file(str(Path(got_dir) / "model.safetensors"))
    assert sorted(back) == sorted(w), what
    for n in w:
        np.testing.assert_array_equal(back[n], w[n], err_msg=f"{what}: {n}")


def logits_of(path_or_model, tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = path_or_model
    if isinstance(path_or_model, (str, Path)):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path_or_model),
                                                                  dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits


# ---- DeepSpeed ground truth, shared by every module that needs a real ZeRO checkpoint ----------
# Trained once per session (tests/groundtruth/deepspeed_ckpt.py; MAPC_DS_CACHE=DIR keeps them).
DS_ODD_MODEL = {"hidden_size": 63, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 16, "vocab_size": 101}
DS_CASES = {
    "z1": dict(stage=1, dtype="fp32", groups=2, model=DS_ODD_MODEL),
    "z2bf16": dict(stage=2, dtype="bf16", groups=1, model=None),
    "z3": dict(stage=3, dtype="fp32", groups=1, model=DS_ODD_MODEL),
}
# Made only by the tests that need them (not part of the DS_CASES every harness test covers).
DS_MORE_CASES = {
    # tied embeddings: the module lists lm_head.weight as the embedding (shared_params)
    "z1tied": dict(stage=1, dtype="fp32", groups=1, model={"tie_word_embeddings": True}),
    # no LLM, no config anywhere (ds_train.conv_net: tied embedding, frozen param, buffers)
    "cz1": dict(stage=1, dtype="fp32", groups=2, model=None, arch="convnet"),
    "cz2bf16": dict(stage=2, dtype="bf16", groups=2, model=None, arch="convnet"),
    "cz3": dict(stage=3, dtype="fp32", groups=2, model=None, arch="convnet"),
}
_ds_made: dict = {}


@pytest.fixture(scope="session")
def ds_root(tmp_path_factory):
    cache = os.environ.get("MAPC_DS_CACHE")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        return Path(cache)
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="session")
def make(ds_root):
    """make(case) -> the directory of a real DeepSpeed checkpoint (a DS_CASES key), trained at
    DP=2 for 3 steps on first use."""
    def _make(case: str) -> Path:
        if case not in _ds_made:
            from tests.groundtruth import deepspeed_ckpt
            kw = DS_CASES.get(case) or DS_MORE_CASES[case]
            _ds_made[case] = deepspeed_ckpt.make_zero_checkpoint(
                ds_root, kw["stage"], kw["dtype"], kw["groups"], steps=3, model=kw["model"],
                arch=kw.get("arch", "llama"))
        return _ds_made[case]
    return _make


# the megatron-core distributed-optimizer run tests/test_torch_dist.py and
# tests/test_nemo2_optim.py share (CFG of test_torch_dist)
MCORE_OPTIM_CFG = dict(hidden=64, layers=4, heads=8, groups=2, head_dim=8, ffn=96, vocab=250,
                       tied=False)
NEMO2_KINDS = ("dp_zero_gather_scatter", "fully_reshardable")


@pytest.fixture(scope="session")
def saved_optim(tmp_path_factory):
    """TP2 DP2: megatron-core's DDP + DistributedOptimizer (Adam, bf16 params, fp32 grads and
    masters, one bucket) after one step, saved with its dp_reshardable state; the same run
    also saves it as fully_reshardable (``ckpt_fully_reshardable``), as
    dp_zero_gather_scatter (``ckpt_dp_zero_gather_scatter``), in Megatron-LM's torch format
    with distrib_optim.pt (``ckpt_legacy``) and as NeMo 2's MegatronStrategy saves it with
    each sharding type it saves (``ckpt_nemo2_<type>/weights``; megatron-core 0.16.1 cannot
    save NeMo's default fully_sharded_model_space). (checkpoint root, truth directory)."""
    pytest.importorskip("megatron.core")
    from tests.groundtruth import mcore_dist
    base = tmp_path_factory.mktemp("torch_dist_optim")
    root = mcore_dist.save_checkpoint(
        base / "ckpt", MCORE_OPTIM_CFG, 2, 1, "bf16", base / "truth", dp=2, optimizer=True,
        also=("fully_reshardable", "dp_zero_gather_scatter", "legacy") +
        tuple(f"{mcore_dist.NEMO2}{k}" for k in NEMO2_KINDS))
    return root, base / "truth"
