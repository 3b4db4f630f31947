"""NxD Training containers: hf -> nxdt -> hf with identical logits, xser, naming styles,
and foreign checkpoints (no mapc record) whose parameters are recovered from names and shapes."""
from __future__ import annotations

import json

import pytest

import mapc
from mapc.runtime import torchfile
from mapc.runtime.containers import nxdt
from tests.conftest import build_transformers_model, llama_config, logits_of

TOKENS = [1, 5, 9, 3, 7, 2, 8, 4]
CFG = llama_config(hidden=64, layers=4, heads=8, groups=2, vocab=128)


@pytest.mark.slow
@pytest.mark.parametrize("sets,topo", [
    ({}, {"tp": 2, "pp": 2}),
    ({"kv_size_multiplier": 2}, {"tp": 4}),
    ({"kv_size_multiplier": 4, "fuse_qkv": True}, {"tp": 8, "pp": 2}),
    ({"kv_size_multiplier": 2, "hw_backend": "trn2"}, {"tp": 4}),
    ({"style": "megatron", "fuse_qkv": True}, {"tp": 2}),
    ({"xser": True, "kv_size_multiplier": 2}, {"tp": 4, "pp": 2}),
], ids=["plain", "kvm2", "kvm4-fused", "trn2", "megatron-style", "xser"])
def test_hf_nxdt_hf_keeps_logits(tmp_path, sets, topo):
    torch = pytest.importorskip("torch")
    model = build_transformers_model(CFG, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="nxdt", set=sets, **topo)
    assert mapc.verify(tmp_path / "hf", tmp_path / "nx").identical
    mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf")
    assert torch.equal(logits_of(model, TOKENS), logits_of(tmp_path / "back", TOKENS))


def test_rank_files_names_and_xser_layout(tmp_path):
    pytest.importorskip("torch")
    build_transformers_model(CFG, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="nxdt", tp=4, pp=2,
                 set={"kv_size_multiplier": 2, "xser": True})
    files = sorted(p.name for p in (tmp_path / "nx" / "model").glob("*.pt"))
    assert files == [f"dp_rank_00_tp_rank_{t:02d}_pp_rank_{p:02d}.pt"
                     for t in range(4) for p in range(2)]
    f = tmp_path / "nx" / "model" / "dp_rank_00_tp_rank_03_pp_rank_01.pt"
    state = torchfile.load(f, nxdt.PICKLES)
    assert "model.layers.3.self_attn.qkv_proj.weight_k" in state     # global layer index
    ref = state["model.layers.3.self_attn.qkv_proj.weight_k"]
    assert type(ref).__name__ == "TensorReference"
    tensor = torchfile.load(f.with_name(f.name + ".tensors") / f"tensor_{ref['tid']}.pt", nxdt.PICKLES)
    assert tensor.shape == (8, 64)   # kvm*groups*hd/tp = 2*2*8/4 heads of 8 rows


def test_foreign_nxdt_checkpoint_parameters_are_recovered(tmp_path):
    pytest.importorskip("torch")
    build_transformers_model(CFG, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="nxdt", tp=4,
                 set={"kv_size_multiplier": 2, "fuse_qkv": True})
    (tmp_path / "nx" / "mapc.json").unlink()     # as NxD itself would have written it
    (tmp_path / "cfg.json").write_text(json.dumps(CFG))
    info = mapc.inspect(tmp_path / "nx", config=tmp_path / "cfg.json")
    assert info["params"]["kv_size_multiplier"] == 2 and info["params"]["fuse_qkv"] is True
    mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf", config=tmp_path / "cfg.json")
    assert mapc.verify(tmp_path / "hf", tmp_path / "back").identical


def test_foreign_trn2_checkpoint_warns_and_source_set_reads_it_right(tmp_path):
    """trn1 and trn2 replication have the same names and shapes: without mapc's record the
    reading is ambiguous, mapc says so, and --source-set picks the right one."""
    pytest.importorskip("torch")
    build_transformers_model(CFG, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="nxdt", tp=4,
                 set={"kv_size_multiplier": 2, "hw_backend": "trn2"})
    (tmp_path / "nx" / "mapc.json").unlink()
    (tmp_path / "cfg.json").write_text(json.dumps(CFG))
    report = mapc.convert(tmp_path / "nx", tmp_path / "guess", to="hf",
                          config=tmp_path / "cfg.json")
    assert any("hw_backend='trn2'" in w and "--source-set" in w for w in report.warnings)
    mapc.convert(tmp_path / "nx", tmp_path / "right", to="hf", config=tmp_path / "cfg.json",
                 source_set=["hw_backend=trn2"])
    assert mapc.verify(tmp_path / "hf", tmp_path / "right").identical


def test_pointing_at_the_model_folder_finds_the_record(tmp_path):
    pytest.importorskip("torch")
    build_transformers_model(CFG, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="nxdt", tp=2)
    assert mapc.inspect(tmp_path / "nx" / "model")["family"] == "llama"


def test_plain_checkpoint_has_no_ambiguity_warning(tmp_path):
    pytest.importorskip("torch")
    build_transformers_model(CFG, tmp_path / "hf")
    mapc.convert(tmp_path / "hf", tmp_path / "nx", to="nxdt", tp=2)
    (tmp_path / "nx" / "mapc.json").unlink()
    (tmp_path / "cfg.json").write_text(json.dumps(CFG))
    report = mapc.convert(tmp_path / "nx", tmp_path / "back", to="hf",
                          config=tmp_path / "cfg.json")
    assert not [w for w in report.warnings if "--source-set" in w]
