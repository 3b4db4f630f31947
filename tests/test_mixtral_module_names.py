"""Mixtral's two HF namings: what save_pretrained writes (per-expert block_sparse_moe.experts.{e}
tensors) and transformers 5's in-memory module (mlp.gate, and per layer merged
mlp.experts.gate_up_proj / down_proj), which DCP, DeepSpeed and FSDP checkpoints of the module
hold. The hf layout's ``expert_names`` parameter is told by the names on read and set with
--set on write. Checked against transformers: the module's own state_dict, saved by
torch.distributed.checkpoint, converts to a checkpoint from_pretrained loads to the same
logits, and --set expert_names=module writes exactly the module's state_dict."""
from __future__ import annotations

import json

import pytest

import mapc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOKENS = [[1, 5, 9, 3, 7, 2, 8, 4]]
CONFIG = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "num_local_experts": 4,
          "num_experts_per_tok": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**CONFIG))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(str(root / "hf"))
    return root, m.eval()


def logits(m):
    with torch.no_grad():
        return m(torch.tensor(TOKENS)).logits


def test_the_module_state_dict_names_merged_experts(model):
    _, m = model
    names = set(m.state_dict())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any("block_sparse_moe" in n for n in names)


def test_a_dcp_checkpoint_of_the_module_converts_to_hf(model, tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    root, m = model
    dcp.save(m.state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    (tmp_path / "dcp" / "config.json").write_text(json.dumps(CONFIG))
    info = mapc.inspect(tmp_path / "dcp")
    assert info["params"] == {"expert_names": "module"}
    mapc.convert(tmp_path / "dcp", tmp_path / "hf", to="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                             dtype=torch.float32)
    assert torch.equal(logits(m), logits(back))
    a = safetensors_torch.load_file(str(root / "hf" / "model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_module_names_are_written_with_set(model, tmp_path):
    root, m = model
    mapc.convert(root / "hf", tmp_path / "module", to="hf", set=["expert_names=module"])
    got = safetensors_torch.load_file(str(tmp_path / "module" / "model.safetensors"))
    want = m.state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    mapc.convert(tmp_path / "module", tmp_path / "saved", to="hf")     # and back by name
    a = safetensors_torch.load_file(str(root / "hf" / "model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
