"""NeMo 1: .nemo tars and directories, Megatron names prefixed ``model.``, model_config.yaml
generated from the Megatron layout's meta, and foreign NeMo checkpoints without mapc's record."""
from __future__ import annotations

import json
import os
import tarfile
import tempfile

import numpy as np
import pytest
import yaml

import mapc
from mapc.runtime import torchfile
from tests.conftest import build_transformers_model, llama_config, logits_of, write_random_hf

TOKENS = [1, 5, 9, 42, 3, 77, 8]
WEIGHTS = "model_weights.ckpt"


def _load_st(path):
    from safetensors.numpy import load_file
    return load_file(str(path / "model.safetensors"))


def _assert_same_hf(a, b):
    ta, tb = _load_st(a), _load_st(b)
    assert ta.keys() == tb.keys()
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and np.array_equal(ta[n], tb[n]), n


def _strip_record(nemo_dir):
    path = nemo_dir / "model_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    del cfg["mapc"]
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def _rank_files(nemo_dir):
    return sorted(p.relative_to(nemo_dir).as_posix() for p in nemo_dir.rglob(WEIGHTS))


@pytest.mark.parametrize("tp,pp,files", [
    (1, 1, [WEIGHTS]),
    (2, 1, [f"mp_rank_00/{WEIGHTS}", f"mp_rank_01/{WEIGHTS}"]),
    (2, 2, [f"tp_rank_{t:02d}_pp_rank_{p:03d}/{WEIGHTS}" for t in (0, 1) for p in (0, 1)]),
    (1, 2, [f"tp_rank_00_pp_rank_{p:03d}/{WEIGHTS}" for p in (0, 1)]),
])
def test_hf_to_nemo_dir_to_hf_is_bit_exact(tmp_path, tp, pp, files):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "nemo", to="nemo", tp=tp, pp=pp)
    assert _rank_files(tmp_path / "nemo") == files
    assert (tmp_path / "nemo" / "model_config.yaml").is_file()
    info = mapc.inspect(tmp_path / "nemo")
    assert info["format"] == "nemo" and info["topology"] == {"tp": tp, "pp": pp}
    mapc.convert(tmp_path / "nemo", tmp_path / "back", to="hf")
    _assert_same_hf(src, tmp_path / "back")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_hf_to_nemo_tar_to_hf_is_bit_exact(tmp_path, tp, pp):
    src = write_random_hf(tmp_path / "hf", llama_config(tied=True))
    mapc.convert(src, tmp_path / "m.nemo", to="nemo", tp=tp, pp=pp)
    assert (tmp_path / "m.nemo").is_file()
    with tarfile.open(tmp_path / "m.nemo", "r:") as tar:   # uncompressed, NeMo's member names
        names = tar.getnames()
    assert names[0] == "." and "./model_config.yaml" in names
    assert sorted(n[2:] for n in names if n.endswith(WEIGHTS)) == \
        _rank_files_for(tp, pp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.nemo"]   # no leftovers
    mapc.convert(tmp_path / "m.nemo", tmp_path / "back", to="hf")
    _assert_same_hf(src, tmp_path / "back")


def _rank_files_for(tp, pp):
    if tp == pp == 1:
        return [WEIGHTS]
    if pp == 1:
        return [f"mp_rank_{t:02d}/{WEIGHTS}" for t in range(tp)]
    return [f"tp_rank_{t:02d}_pp_rank_{p:03d}/{WEIGHTS}" for t in range(tp) for p in range(pp)]


@pytest.mark.parametrize("naming", ["local", "te", "legacy"])
def test_names_are_megatron_names_prefixed_model(tmp_path, naming):
    torch = pytest.importorskip("torch")
    src = write_random_hf(tmp_path / "hf", llama_config(tied=True))
    sets = {"naming": naming, "vocab_multiple": 64}
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, pp=2, set=sets)
    mapc.convert(src, tmp_path / "nemo", to="nemo", tp=2, pp=2, set=sets)
    from mapc.runtime.containers.megatron import flatten
    for t in (0, 1):
        for p in (0, 1):
            mg = torch.load(tmp_path / "mg" / "release" / f"mp_rank_{t:02d}_{p:03d}" /
                            "model_optim_rng.pt", weights_only=False)["model"]
            mg = {k: v for k, v in flatten(mg).items() if isinstance(v, torch.Tensor)}
            nemo = torch.load(tmp_path / "nemo" / f"tp_rank_{t:02d}_pp_rank_{p:03d}" / WEIGHTS,
                              weights_only=True)
            assert list(nemo) == ["model." + k for k in mg]
            assert all(nemo["model." + k].equal(v) for k, v in mg.items())
    cfg = yaml.safe_load((tmp_path / "nemo" / "model_config.yaml").read_text())
    assert cfg["mcore_gpt"] is (naming != "legacy")
    assert cfg.get("transformer_engine", False) is (naming == "te")


def test_model_config_yaml_has_nemo_keys(tmp_path):
    import ml_dtypes
    src = write_random_hf(tmp_path / "hf", llama_config(hidden=64, heads=8, groups=2, ffn=96,
                                                        vocab=100, layers=4),
                          dtype=ml_dtypes.bfloat16)
    mapc.convert(src, tmp_path / "nemo", to="nemo", tp=2, pp=2)
    cfg = yaml.safe_load((tmp_path / "nemo" / "model_config.yaml").read_text())
    expect = {
        "mcore_gpt": True, "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 96,
        "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 8,
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
        "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False,
        "share_embeddings_and_output_weights": False, "make_vocab_size_divisible_by": 128,
        "override_vocab_size": 256, "max_position_embeddings": 128,
        "encoder_seq_length": 128, "layernorm_epsilon": 1e-6, "rotary_base": 10000.0,
        "position_embedding_type": "rope", "precision": "bf16",
    }
    assert {k: cfg.get(k) for k in expect} == expect
    assert cfg["mapc"]["config"]["vocab_size"] == 100
    assert cfg["mapc"]["topology"] == {"tp": 2, "pp": 2}
    assert not (tmp_path / "nemo" / "mapc.json").exists()   # the record lives in the yaml


def test_nemo_without_mapc_record_converts_from_its_yaml(tmp_path):
    # vocab 128 is a multiple of vocab_multiple * tp: NeMo's padded size is the true size
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=128, tied=True))
    mapc.convert(src, tmp_path / "nemo", to="nemo", tp=2, pp=2,
                 set={"vocab_multiple": 64, "naming": "te"})
    _strip_record(tmp_path / "nemo")
    info = mapc.inspect(tmp_path / "nemo")
    assert info["family"] == "llama"
    assert info["params"] == {"vocab_multiple": 64, "naming": "te", "first_stage_layers": 0,
                              "last_stage_layers": 0}
    assert info["config"]["tied"] is True and info["config"]["groups"] == 2
    mapc.convert(tmp_path / "nemo", tmp_path / "back", to="hf")
    _assert_same_hf(src, tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is True


def test_nemo_without_record_or_vocab_size_uses_the_padded_vocab(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=100))
    mapc.convert(src, tmp_path / "nemo", to="nemo", tp=2)
    cfg = _strip_record(tmp_path / "nemo")
    del cfg["override_vocab_size"]     # as NeMo writes it: the vocabulary is the tokenizer's
    (tmp_path / "nemo" / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    assert mapc.inspect(tmp_path / "nemo")["config"]["vocab"] == 256
    mapc.convert(tmp_path / "nemo", tmp_path / "back", to="hf")
    a, b = _load_st(src), _load_st(tmp_path / "back")
    for n in a:
        rows = a[n].shape[0] if n in ("model.embed_tokens.weight", "lm_head.weight") else None
        assert np.array_equal(a[n], b[n][:rows]), n
        if rows:
            assert not b[n][rows:].any()


def test_reading_a_nemo_tar_extracts_nothing(tmp_path, monkeypatch):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "m.nemo", to="nemo", tp=2, pp=2)

    def no_temp(*a, **k):
        raise AssertionError("a temporary directory was created")
    monkeypatch.setattr(tempfile, "mkdtemp", no_temp)
    assert mapc.verify(src, tmp_path / "m.nemo").identical


def test_gzipped_nemo_is_read_through_a_temporary_copy_that_is_removed(tmp_path,
                                                                       monkeypatch):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "nemo", to="nemo", tp=2, pp=2)
    with tarfile.open(tmp_path / "old.nemo", "w:gz") as tar:   # older NeMo compressed it
        tar.add(tmp_path / "nemo", arcname=".")
    made = []
    real = tempfile.mkdtemp

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]
    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    mapc.convert(tmp_path / "old.nemo", tmp_path / "back", to="hf")
    _assert_same_hf(src, tmp_path / "back")
    extraction = [m for m in made if "mapc-nemo-" in m]
    assert extraction and not any(os.path.exists(m) for m in extraction)


def test_nemo_reshards_between_tar_and_directory(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "a.nemo", to="nemo", tp=2, pp=2)
    mapc.convert(tmp_path / "a.nemo", tmp_path / "b", to="nemo", tp=1, pp=4)
    mapc.convert(tmp_path / "b", tmp_path / "c.nemo", to="nemo", tp=2)
    assert mapc.inspect(tmp_path / "c.nemo")["topology"] == {"tp": 2, "pp": 1}
    assert mapc.verify(src, tmp_path / "c.nemo").identical
    assert mapc.verify(tmp_path / "a.nemo", tmp_path / "b").identical


def test_nemo_as_nemo_writes_it_matches_transformers_logits(tmp_path):
    """A NeMo checkpoint as NeMo itself lays it out: torch.save'd state dicts with
    ``_extra_state`` entries, a hand-written yaml, ``tar.add(dir, arcname='.')``."""
    torch = pytest.importorskip("torch")
    cfg = llama_config(vocab=128)
    model = build_transformers_model(cfg, tmp_path / "ref")
    mapc.convert(tmp_path / "ref", tmp_path / "mine", to="nemo", tp=2, set={"vocab_multiple": 64})
    (tmp_path / "foreign").mkdir()
    for t in (0, 1):
        sd = torch.load(tmp_path / "mine" / f"mp_rank_{t:02d}" / WEIGHTS, weights_only=True)
        sd = {k: v.clone() for k, v in sd.items()}
        sd["model.decoder.layers.0.self_attention.core_attention._extra_state"] = None
        (tmp_path / "foreign" / f"mp_rank_{t:02d}").mkdir()
        torch.save(sd, tmp_path / "foreign" / f"mp_rank_{t:02d}" / WEIGHTS)
    nemo_cfg = {"mcore_gpt": True, "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 96,
                "num_attention_heads": 8, "num_query_groups": 2,
                "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                "make_vocab_size_divisible_by": 64, "normalization": "rmsnorm",
                "activation": "fast-swiglu", "layernorm_epsilon": 1e-6,
                "share_embeddings_and_output_weights": False, "max_position_embeddings": 128,
                "position_embedding_type": "rope", "bias": False,
                "tokenizer": {"library": "huggingface", "type": "some/tokenizer"}}
    (tmp_path / "foreign" / "model_config.yaml").write_text(yaml.safe_dump(nemo_cfg))
    with tarfile.open(tmp_path / "foreign.nemo", "w:") as tar:
        tar.add(tmp_path / "foreign", arcname=".")
    mapc.convert(tmp_path / "foreign.nemo", tmp_path / "hf", to="hf")
    assert logits_of(tmp_path / "hf", TOKENS).equal(logits_of(model, TOKENS))


def test_failed_packing_leaves_nothing_behind(tmp_path, monkeypatch):
    from mapc.runtime.containers import nemo
    src = write_random_hf(tmp_path / "hf", llama_config())

    def boom(self, *a):
        raise OSError("disk full")
    monkeypatch.setattr(nemo.NemoWriter, "_info", boom)
    with pytest.raises(OSError):
        mapc.convert(src, tmp_path / "m.nemo", to="nemo", tp=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_distributed_nemo_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "dist" / "model_weights").mkdir(parents=True)
    (tmp_path / "dist" / "model_config.yaml").write_text("num_layers: 2\n")
    with pytest.raises(mapc.MapcError, match="distributed"):
        mapc.inspect(tmp_path / "dist")


def test_nemo_weights_are_read_without_running_pickles(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "nemo", to="nemo")
    state = torchfile.load(tmp_path / "nemo" / WEIGHTS)
    assert all(k.startswith("model.") for k in state)
    assert all(isinstance(v, torchfile.TensorRef) for v in state.values())


def test_force_replaces_an_existing_nemo_file_without_leftovers(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "m.nemo", to="nemo", tp=2)
    mapc.convert(src, tmp_path / "m.nemo", to="nemo", force=True)
    assert mapc.inspect(tmp_path / "m.nemo")["topology"] == {"tp": 1, "pp": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.nemo"]


def test_expert_parallel_nemo_is_refused_not_half_written(tmp_path):
    import pytest as _pytest
    _pytest.importorskip("torch")
    from tests.conftest import build_transformers_model
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 64, "num_local_experts": 4,
           "num_experts_per_tok": 2, "max_position_embeddings": 64}
    build_transformers_model(cfg, tmp_path / "hf")
    with _pytest.raises(mapc.MapcError, match="expert-parallel"):
        mapc.convert(tmp_path / "hf", tmp_path / "x", to="nemo", ep=2)
    assert not (tmp_path / "x").exists()
