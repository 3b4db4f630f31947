"""Format details: foreign checkpoints without mapc's record, sharded HF, pytorch_model.bin."""
from __future__ import annotations

import json

import pytest

import mapc
from tests.conftest import build_transformers_model, llama_config, write_random_hf


@pytest.mark.parametrize("naming", ["local", "te", "legacy"])
def test_megatron_without_mapc_record_is_understood_from_its_args_and_names(tmp_path, naming):
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=100, tied=True))
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, pp=2,
                 set={"naming": naming, "vocab_multiple": 64})
    (tmp_path / "mg" / "mapc.json").unlink()   # as if Megatron itself had written it
    info = mapc.inspect(tmp_path / "mg")
    assert info["family"] == "llama"
    assert info["params"] == {"vocab_multiple": 64, "naming": naming, "first_stage_layers": 0,
                              "last_stage_layers": 0}
    assert info["config"]["vocab"] == 100 and info["config"]["tied"] is True
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert mapc.verify(src, tmp_path / "back").identical
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2


def test_sharded_hf_from_transformers_and_sharded_output(tmp_path):
    cfg = llama_config(hidden=64, layers=4, vocab=100)
    model = build_transformers_model(cfg, tmp_path / "ref")
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    mapc.convert(tmp_path / "sharded", tmp_path / "out", to="hf", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    transformers = pytest.importorskip("transformers")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert a.equal(b), n


def test_pytorch_model_bin_is_read_without_running_pickles(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = llama_config(vocab=100)
    model = build_transformers_model(cfg, tmp_path / "ref")
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
    mapc.convert(tmp_path / "bin", tmp_path / "mg", to="megatron", tp=2)
    assert mapc.verify(tmp_path / "ref", tmp_path / "mg").identical


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    import ml_dtypes
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=100), dtype=ml_dtypes.bfloat16)
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, pp=2)
    info = mapc.inspect(tmp_path / "mg")
    assert set(info["dtypes"]) == {"bfloat16"}
    mapc.convert(tmp_path / "mg", tmp_path / "fp32", to="hf", dtype="fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
