"""Mixtral (MoE) in torch_dist, against megatron-core 0.16.1's own distributed checkpoints.

One megatron-core run (tests/groundtruth/mcore_moe_dist.py, 2 gloo ranks) loads what mapc wrote
from HF weights at tp=2, ep=2 (expert tensor parallel 1) with ``dist_checkpointing.load``
(strict) and then saves its own seeded MoE model at tp=2, ep=1 (experts tp-split); every test
here shares it. The same run loads and saves with the Transformer Engine spec's key names too
(naming ``te``: the MoE layer's norm under ``pre_mlp_layernorm.weight``), and the NeMo 2 way
(those names, every key prefixed ``module.``, in ``weights/``). Expected tensors are computed
from the HF weights (or megatron-core's live shards) with numpy slicing, independently of
mapc's spec.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import mapc  # noqa: E402
from mapc.runtime.containers import open_source  # noqa: E402
from tests.conftest import build_transformers_model  # noqa: E402
from tests.groundtruth import mcore_moe_dist  # noqa: E402
from tests.test_moe import mixtral_config  # noqa: E402

HF = mixtral_config()          # hidden 32, ffn 48, 2 layers, 4 heads, 2 KV heads, 4 experts
CFG = dict(hidden=32, layers=2, heads=4, groups=2, head_dim=8, ffn=48, vocab=50, tied=False,
           experts=4, topk=2)
F, E = CFG["ffn"], CFG["experts"]
LOAD, SAVE = (2, 2, 1), (2, 1, 2)      # (tp, ep, expert tp) of the two phases


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_dist")
    build_transformers_model(HF, d / "hf")
    mapc.convert(d / "hf", d / "mapc", to="torch_dist", tp=LOAD[0], ep=LOAD[1])
    mapc.convert(d / "hf", d / "mapc_te", to="torch_dist", tp=LOAD[0], ep=LOAD[1],
                 set=["naming=te"])
    mapc.convert(d / "hf", d / "mapc_nemo2", to="nemo2", tp=LOAD[0], ep=LOAD[1])
    extra = [{"load": d / "mapc_te" / "release", "prefix": "", "te": True, "tag": "te"},
             {"save": d / "mcore_te" / "release", "prefix": "", "te": True, "args": True},
             {"load": d / "mapc_nemo2" / "weights", "prefix": "module.", "te": True,
              "tag": "nemo2"},
             {"save": d / "mcore_nemo2" / "weights", "prefix": "module.", "te": True}]
    out = mcore_moe_dist.run(CFG, d / "mapc" / "release", LOAD, d / "mcore", SAVE, d / "out",
                             extra)
    (d / "mcore_te" / "latest_checkpointed_iteration.txt").write_text("release")
    from safetensors.numpy import load_file
    return d, load_file(str(d / "hf" / "model.safetensors")), out


def _ranks(out, kind):
    return [torch.load(out / f"{kind}_{r}.pt", weights_only=False)
            for r in range(mcore_moe_dist.WORLD)]


def _hf(hf, layer, e, w):
    return hf[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]


def test_megatron_core_loads_mapc_moe_at_other_ep(run):
    """mapc's torch_dist (global experts) loads strictly into megatron-core at tp=2, ep=2:
    local expert k of ep rank r is HF expert r * 2 + k (fc1 = [w1; w3], fc2 = w2), the router
    is HF's gate, the embedding rank t's padded rows."""
    _, hf, out = run
    per = E // LOAD[1]
    for got in _ranks(out, "loaded"):
        sd, t, r = got["sd"], got["tp"], got["ep"]
        for layer in range(CFG["layers"]):
            pre = f"decoder.layers.{layer}.mlp."
            np.testing.assert_array_equal(sd[pre + "router.weight"].numpy(),
                                          hf[f"model.layers.{layer}.block_sparse_moe.gate.weight"])
            locs = sorted({k.split(".")[6] for k in sd if k.startswith(pre + "experts.")})
            assert locs == [str(k) for k in range(per)]
            for k in range(per):
                g = r * per + k
                x = f"{pre}experts.local_experts.{k}."
                np.testing.assert_array_equal(
                    sd[x + "linear_fc1.weight"].numpy(),
                    np.concatenate([_hf(hf, layer, g, "w1"), _hf(hf, layer, g, "w3")]))
                np.testing.assert_array_equal(sd[x + "linear_fc2.weight"].numpy(),
                                              _hf(hf, layer, g, "w2"))
            np.testing.assert_array_equal(sd[f"decoder.layers.{layer}.pre_mlp_layernorm.weight"]
                                          .numpy(), hf[f"model.layers.{layer}."
                                                       "post_attention_layernorm.weight"])
        emb = sd["embedding.word_embeddings.weight"].numpy()
        padded = np.zeros((emb.shape[0] * LOAD[0], CFG["hidden"]), np.float32)
        padded[:CFG["vocab"]] = hf["model.embed_tokens.weight"]
        np.testing.assert_array_equal(emb, padded[t * emb.shape[0]:(t + 1) * emb.shape[0]])


def test_mapc_reads_megatron_core_moe(run, tmp_path):
    """megatron-core's own MoE torch_dist checkpoint (tp=2, experts tp-split, no mapc.json) is
    detected as mixtral and converts to HF experts equal to its live tp shards: w1/w3 are the
    two halves of every rank's fc1 rows, w2 the columns of its fc2."""
    d, _, out = run
    with open_source(d / "mcore") as src:
        assert src.format == "torch_dist"
    mapc.convert(d / "mcore", tmp_path / "hf", to="hf")
    from safetensors.numpy import load_file
    import glob
    hf = {}
    for f in glob.glob(str(tmp_path / "hf" / "*.safetensors")):
        hf.update(load_file(f))
    live = sorted(_ranks(out, "live"), key=lambda x: x["tp"])
    half = F // SAVE[0]
    for layer in range(CFG["layers"]):
        for g in range(E):
            x = f"decoder.layers.{layer}.mlp.experts.local_experts.{g}."
            fc1 = [s["sd"][x + "linear_fc1.weight"].numpy() for s in live]
            fc2 = [s["sd"][x + "linear_fc2.weight"].numpy() for s in live]
            np.testing.assert_array_equal(_hf(hf, layer, g, "w1"),
                                          np.concatenate([f[:half] for f in fc1]))
            np.testing.assert_array_equal(_hf(hf, layer, g, "w3"),
                                          np.concatenate([f[half:] for f in fc1]))
            np.testing.assert_array_equal(_hf(hf, layer, g, "w2"), np.concatenate(fc2, axis=1))
        np.testing.assert_array_equal(hf[f"model.layers.{layer}.block_sparse_moe.gate.weight"],
                                      live[0]["sd"][f"decoder.layers.{layer}.mlp.router.weight"]
                                      .numpy())


# ---- the Transformer Engine spec's names (naming "te") ---------------------------------------
# megatron-core's strictness words: "unexpected" keys are asked for but absent from the
# checkpoint, "missing" keys are in the checkpoint but not asked for.
# mapc writes the pre-MLP norm's _extra_state (Transformer Engine's ops-based RMSNorm has one and
# asks for it); megatron-core's torch norm has none, so it leaves exactly that key unread.
TE_NORM_EXTRA = ["decoder.layers.pre_mlp_layernorm._extra_state"]


def test_megatron_core_loads_mapc_moe_with_te_names(run):
    """mapc's torch_dist with naming te loads into the model under the Transformer Engine
    spec's keys (pre_mlp_layernorm.weight): every key it asks for is there, the norm's extra
    state is the only key left unread, and the tensors equal those of the local-names load
    (checked against the HF weights above)."""
    _, _, out = run
    for r in range(mcore_moe_dist.WORLD):
        a = torch.load(out / f"loaded_{r}.pt", weights_only=False)["sd"]
        b = torch.load(out / f"loaded_te_{r}.pt", weights_only=False)
        assert b["unexpected"] == [] and b["missing"] == TE_NORM_EXTRA, b
        assert list(a) == list(b["sd"])
        for k in a:
            assert torch.equal(a[k], b["sd"][k]), k


def test_mapc_reads_megatron_core_moe_with_te_names(run, tmp_path):
    """megatron-core's save under the Transformer Engine spec's keys reads (naming te, told
    apart by the names) into the same HF weights as its save under the local spec's."""
    d, _, _ = run
    from mapc.runtime.containers import dcp
    keys = dcp.read_metadata(d / "mcore_te" / "release").get("state_dict_metadata")
    assert "decoder.layers.pre_mlp_layernorm.weight" in keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in keys
    with open_source(d / "mcore_te") as src:
        assert src.format == "torch_dist"
    mapc.convert(d / "mcore_te", tmp_path / "a", to="hf")
    mapc.convert(d / "mcore", tmp_path / "b", to="hf")
    from safetensors.numpy import load_file
    a, b = (load_file(str(tmp_path / x / "model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- NeMo 2 (weights/ with the "module." prefix, context/model.yaml) -------------------------
# context/model.yaml as NeMo 2 writes it (TrainerContext.io_dump: the fiddle config in Hydra
# syntax with every default, so the real file has many more fields; callables and dtypes as
# {_target_, _call_: false}; _target_ after the arguments)
MODEL_YAML = """\
_target_: nemo.collections.llm.gpt.model.mixtral.MixtralModel
config:
  num_layers: 2
  hidden_size: 32
  ffn_hidden_size: 48
  num_attention_heads: 4
  num_query_groups: 2
  kv_channels: 8
  num_moe_experts: 4
  moe_router_topk: 2
  moe_ffn_hidden_size: 48
  layernorm_epsilon: 1.0e-05
  normalization: RMSNorm
  gated_linear_unit: true
  activation_func:
    _call_: false
    _target_: torch.nn.functional.silu
  params_dtype:
    _call_: false
    _target_: torch.float32
  position_embedding_type: rope
  rotary_base: 1000000.0
  seq_length: 64
  share_embeddings_and_output_weights: false
  add_bias_linear: false
  make_vocab_size_divisible_by: 128
  vocab_size: 50
  tensor_model_parallel_size: 2
  expert_model_parallel_size: 1
  _target_: nemo.collections.llm.gpt.model.mixtral.MixtralConfig
tokenizer:
  _target_: nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer
  pretrained_model_name: mixtral-tiny
"""


# mapc's nemo2 output also has the _extra_state of Transformer Engine's attention core and final
# norm (modules with no tensor of their own there), which megatron-core's local modules do not
# have
NEMO2_TE_EXTRA = sorted("module." + k for k in TE_NORM_EXTRA + [
    "decoder.layers.self_attention.core_attention._extra_state",
    "decoder.final_layernorm._extra_state"])


def test_megatron_core_loads_mapc_nemo2_with_the_module_prefix(run):
    """mapc's nemo2 output (weights/ keys prefixed module., the Transformer Engine spec's names,
    NeMo 2's default) loads into megatron-core's model.sharded_state_dict(prefix="module.") at
    tp=2 ep=2, as NeMo's MegatronParallel and Megatron-LM's loader of NeMo weights/ ask for it:
    no key absent, only Transformer Engine's extra states unread, and exactly the tensors of
    the torch_dist load (checked against the HF weights above)."""
    import yaml
    d, _, out = run
    assert sorted(p.name for p in (d / "mapc_nemo2").iterdir()) == ["context", "mapc.json",
                                                                    "weights"]
    cfg = yaml.safe_load((d / "mapc_nemo2" / "context" / "model.yaml").read_text())
    assert cfg["_target_"] == "nemo.collections.llm.gpt.model.base.GPTModel"
    assert {k: cfg["config"][k] for k in ("num_layers", "num_moe_experts", "num_query_groups",
                                          "gated_linear_unit", "expert_model_parallel_size")} \
        == {"num_layers": 2, "num_moe_experts": 4, "num_query_groups": 2,
            "gated_linear_unit": True, "expert_model_parallel_size": LOAD[1]}
    for r in range(mcore_moe_dist.WORLD):
        a = torch.load(out / f"loaded_{r}.pt", weights_only=False)["sd"]
        b = torch.load(out / f"loaded_nemo2_{r}.pt", weights_only=False)
        assert b["unexpected"] == [] and b["missing"] == NEMO2_TE_EXTRA, b
        assert list(a) == list(b["sd"])
        for k in a:
            assert torch.equal(a[k], b["sd"][k]), k


def test_mapc_reads_megatron_core_nemo2(run, tmp_path):
    """megatron-core's save of the same live model with the module. prefix into weights/, with
    a NeMo 2 context/model.yaml (no mapc.json): detected as nemo2, config from model.yaml, and
    its HF conversion equals that of the plain torch_dist save."""
    d, _, _ = run
    (d / "mcore_nemo2" / "context").mkdir(exist_ok=True)
    (d / "mcore_nemo2" / "context" / "model.yaml").write_text(MODEL_YAML)
    with open_source(d / "mcore_nemo2") as src:
        assert src.format == "nemo2"
        assert src.format_meta["num_experts"] == 4 and src.format_meta["norm_epsilon"] == 1e-5
    mapc.convert(d / "mcore_nemo2", tmp_path / "a", to="hf")
    mapc.convert(d / "mcore", tmp_path / "b", to="hf")
    from safetensors.numpy import load_file
    a, b = (load_file(str(tmp_path / x / "model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
