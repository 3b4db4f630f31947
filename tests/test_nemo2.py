"""NeMo 2 checkpoints (weights/ + context/) without megatron-core; megatron-core's own loads and
saves of them are in tests/test_torch_dist_moe.py (one shared run)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import mapc
from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers import dcp, detect_format, open_source
from tests.conftest import llama_config, write_random_hf


@pytest.fixture(scope="module")
def nemo2(tmp_path_factory):
    d = tmp_path_factory.mktemp("nemo2")
    src = write_random_hf(d / "hf", llama_config())
    mapc.convert(src, d / "n2", to="nemo2", tp=2)
    return src, d / "n2"


def test_files_keys_and_round_trip(nemo2, tmp_path):
    """weights/ holds every model key under module. (and the _extra_state objects); reading
    it back, with or without mapc.json (config from context/model.yaml), is bit-exact."""
    from safetensors.numpy import load_file
    src, n2 = nemo2
    assert detect_format(n2) == "nemo2"
    keys = list(dcp.read_metadata(n2 / "weights").get("state_dict_metadata"))
    assert keys and all(k.startswith("module.") for k in keys)
    assert "module.decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4" in keys
    # Transformer Engine's attention core and final norm, as NeMo 2 checkpoints list them
    assert "module.decoder.layers.self_attention.core_attention._extra_state/shard_3_4" in keys
    assert "module.decoder.final_layernorm._extra_state/shard_0_1" in keys
    assert set(torchfile.load(n2 / "weights" / "common.pt")) == {"content_metadata"}
    # NeMo builds the embedding with the config's vocab_size rows (unpadded): the two agree
    # (NeMo's own load of this output is in tests/test_nemo_real.py)
    import json
    import yaml
    rows = int(dcp.read_metadata(n2 / "weights").get("state_dict_metadata")[
        "module.embedding.word_embeddings.weight"].get("size")[0])
    assert yaml.safe_load((n2 / "context" / "model.yaml").read_text())["config"][
        "vocab_size"] == rows == llama_config()["vocab_size"]
    assert json.loads((n2 / "context" / "io.json").read_text())["version"] == "0.0.1"
    shutil.copytree(n2, tmp_path / "bare")
    (tmp_path / "bare" / "mapc.json").unlink()
    a = load_file(str(src / "model.safetensors"))
    for d in (n2, tmp_path / "bare"):
        mapc.convert(d, tmp_path / f"back_{d.name}", to="hf")
        b = load_file(str(tmp_path / f"back_{d.name}" / "model.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_dry_run_lists_the_nemo2_files(nemo2, tmp_path, capsys):
    from mapc.cli.main import main
    assert main(["convert", str(nemo2[0]), str(tmp_path / "x"), "--to", "nemo2",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "context/model.yaml" in out and "weights/.metadata" in out
    assert "context/io.json" in out and not (tmp_path / "x").exists()


def _bad_yaml(d):
    (d / "context" / "model.yaml").write_text("_target_: x\nconfig: [1, 2\n")


def _no_config(d):
    (d / "context" / "model.yaml").write_text("_target_: x\ntokenizer: {}\n")


def _no_prefix(d):     # a plain torch_dist checkpoint in weights/: no module. keys
    shutil.rmtree(d / "weights")
    mapc.convert(d.parent / "src_hf", d / "td", to="torch_dist")
    shutil.move(str(d / "td" / "release"), str(d / "weights"))
    shutil.rmtree(d / "td")


@pytest.fixture
def bare(nemo2, tmp_path):
    """A copy of the nemo2 output without mapc.json, and the HF source beside it."""
    shutil.copytree(nemo2[0], tmp_path / "src_hf")
    shutil.copytree(nemo2[1], tmp_path / "n2")
    (tmp_path / "n2" / "mapc.json").unlink()
    return tmp_path / "n2"


def _bad_tp(d):
    f = d / "context" / "model.yaml"
    f.write_text(f.read_text().replace("tensor_model_parallel_size: 2",
                                       "tensor_model_parallel_size: 1.0e+30"))


@pytest.mark.parametrize("edit,words", [(_bad_yaml, "cannot parse model.yaml"),
                                        (_bad_tp, "tensor_model_parallel_size is 1e"),
                                        (_no_config, "has no 'config' mapping"),
                                        (_no_prefix, "no model tensors under the prefix")])
def test_broken_nemo2_is_a_clean_error(bare, edit, words):
    edit(bare)
    with pytest.raises(MapcError, match=words):
        open_source(bare, "nemo2")


def test_without_model_yaml_the_config_comes_from_config(bare, tmp_path):
    """No context/model.yaml: a warning on reading, a refusal naming --config on converting,
    and with --config (the HF config) the weights are read bit for bit."""
    from safetensors.numpy import load_file
    (bare / "context" / "model.yaml").unlink()
    with open_source(bare) as src:
        assert any("no context/model.yaml" in w and "--config" in w for w in src.warnings)
    with pytest.raises(MapcError, match="--config"):
        mapc.convert(bare, tmp_path / "x", to="hf")
    mapc.convert(bare, tmp_path / "y", to="hf", config=bare.parent / "src_hf" / "config.json")
    a = load_file(str(bare.parent / "src_hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "y" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# a Llama model.yaml in the shape NeMo 2 dumps it (every default, nulls for the unset,
# callables as {_target_, _call_: false}, _target_ last), for the fixture's tiny model
LLAMA_YAML = """\
_target_: nemo.collections.llm.gpt.model.llama.LlamaModel
config:
  tensor_model_parallel_size: 2
  pipeline_model_parallel_size: 1
  virtual_pipeline_model_parallel_size: null
  sequence_parallel: false
  params_dtype:
    _call_: false
    _target_: torch.bfloat16
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 8
  num_query_groups: 2
  ffn_hidden_size: 96
  kv_channels: null
  hidden_dropout: 0.0
  attention_dropout: 0.0
  layernorm_epsilon: 1.0e-06
  add_bias_linear: false
  gated_linear_unit: true
  activation_func:
    _call_: false
    _target_: torch.nn.functional.silu
  num_moe_experts: null
  normalization: RMSNorm
  init_method: null
  fp16_lm_cross_entropy: false
  parallel_output: true
  share_embeddings_and_output_weights: false
  make_vocab_size_divisible_by: 128
  position_embedding_type: rope
  rotary_base: 10000
  rotary_percent: 1.0
  seq_length: 128
  vocab_size: 100
  transformer_layer_spec:
    _call_: false
    _target_: nemo.collections.llm.gpt.model.base.default_layer_spec
  _target_: nemo.collections.llm.gpt.model.llama.LlamaConfig
tokenizer:
  _target_: nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer
  pretrained_model_name: tiny-llama
"""


def test_reads_a_nemo_style_model_yaml(bare, tmp_path):
    """A model.yaml as NeMo 2 dumps it (nulls, callables, nested targets, a tokenizer) gives
    the config: family llama, the HF weights bit for bit, head_dim from hidden / heads."""
    from safetensors.numpy import load_file
    (bare / "context" / "model.yaml").write_text(LLAMA_YAML)
    with open_source(bare) as src:
        assert src.format == "nemo2" and src.saved_topology == {"tp": 2, "pp": 1}
    mapc.convert(bare, tmp_path / "hf", to="hf")
    a = load_file(str(bare.parent / "src_hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    import json
    want = json.loads((bare.parent / "src_hf" / "config.json").read_text())
    got = json.loads((tmp_path / "hf" / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}


class LightningLike:
    """Stands for the Lightning objects NeMo 2 keeps in weights/common.pt (a global mapc's
    unpickler does not resolve)."""
    def __init__(self):
        self.state = {"best_model_path": "x"}


def test_a_common_pt_with_foreign_objects_is_skipped(bare, tmp_path):
    """NeMo's common.pt holds Lightning's state: objects mapc does not unpickle. The weights
    (and model.yaml) are still read, with a warning naming the file."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    torch.save({"content_metadata": {}, "epoch": 0, "callbacks": {"cb": LightningLike()}},
               str(bare / "weights" / "common.pt"))
    with open_source(bare) as src:
        assert any("common.pt is not read" in w for w in src.warnings), src.warnings
    mapc.convert(bare, tmp_path / "hf", to="hf")
    a = load_file(str(bare.parent / "src_hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
