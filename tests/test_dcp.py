"""torch.distributed.checkpoint: mapc's output loads with torch's own DCP, and checkpoints
torch wrote (whole or chunked) convert to HF exactly, read without unpickling code."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import mapc
from tests.conftest import build_transformers_model, llama_config, logits_of, write_random_hf

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")
transformers = pytest.importorskip("transformers")

TOKENS = [1, 5, 9, 42, 3, 77, 8]


def _load_st(path):
    from safetensors.numpy import load_file
    return load_file(str(path / "model.safetensors"))


def _quiet_dcp(fn, *args, **kw):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_dcp_to_hf_is_bit_exact(tmp_path, tied):
    src = write_random_hf(tmp_path / "hf", llama_config(tied=tied))
    mapc.convert(src, tmp_path / "dcp", to="dcp")
    assert {p.name for p in (tmp_path / "dcp").iterdir()} == {
        ".metadata", "__0_0.distcp", "config.json", "mapc.json"}
    assert mapc.inspect(tmp_path / "dcp")["family"] == "llama"
    mapc.convert(tmp_path / "dcp", tmp_path / "back", to="hf")
    a, b = _load_st(src), _load_st(tmp_path / "back")
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]), n


def test_dcp_output_loads_into_a_fresh_model_with_torch_dcp(tmp_path):
    cfg = llama_config()
    ref = build_transformers_model(cfg, tmp_path / "ref", seed=0)
    mapc.convert(tmp_path / "ref", tmp_path / "dcp", to="dcp")
    fresh = build_transformers_model(cfg, tmp_path / "fresh", seed=1)   # other weights
    state = fresh.state_dict()
    assert not state["model.embed_tokens.weight"].equal(ref.state_dict()
                                                        ["model.embed_tokens.weight"])
    _quiet_dcp(dcp.load, state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for name, t in ref.state_dict().items():
        assert state[name].equal(t), name
    fresh.load_state_dict(state)
    assert logits_of(fresh, TOKENS).equal(logits_of(ref, TOKENS))


def test_dcp_output_converts_with_dcp_to_torch_save(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "dcp", to="dcp")
    _quiet_dcp(dcp_to_torch_save, str(tmp_path / "dcp"), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    ref = _load_st(src)
    assert full.keys() == ref.keys()
    for n, t in full.items():
        assert np.array_equal(t.numpy(), ref[n]), n


def test_bf16_survives_a_dcp_round_trip(tmp_path):
    import ml_dtypes
    src = write_random_hf(tmp_path / "hf", llama_config(), dtype=ml_dtypes.bfloat16)
    mapc.convert(src, tmp_path / "dcp", to="dcp")
    assert set(mapc.inspect(tmp_path / "dcp")["dtypes"]) == {"bfloat16"}
    assert json.loads((tmp_path / "dcp" / "config.json").read_text())["dtype"] == "bfloat16"
    mapc.convert(tmp_path / "dcp", tmp_path / "back", to="hf")
    a, b = _load_st(src), _load_st(tmp_path / "back")
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].tobytes() == b[n].tobytes(), n


def test_dcp_saved_by_torch_from_an_hf_model_converts_with_identical_logits(tmp_path):
    cfg = llama_config()
    model = build_transformers_model(cfg, tmp_path / "ref")
    _quiet_dcp(dcp.save, model.state_dict(), checkpoint_id=str(tmp_path / "dcp"),
               no_dist=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    mapc.convert(tmp_path / "dcp", tmp_path / "hf", to="hf", config=tmp_path / "cfg.json")
    assert logits_of(tmp_path / "hf", TOKENS).equal(logits_of(model, TOKENS))
    assert mapc.verify(tmp_path / "ref", tmp_path / "dcp", config=tmp_path / "cfg.json") \
        .identical


def test_dcp_of_a_nested_state_dict_is_read_under_the_inner_names(tmp_path):
    cfg = llama_config()
    model = build_transformers_model(cfg, tmp_path / "ref")
    _quiet_dcp(dcp.save, {"model": model.state_dict()}, checkpoint_id=str(tmp_path / "dcp"),
               no_dist=True)
    (tmp_path / "dcp" / "config.json").write_text(json.dumps(cfg))
    names = [t["name"] for t in mapc.inspect(tmp_path / "dcp")["shards"][0]["tensors"]]
    assert "model.embed_tokens.weight" in names
    assert mapc.verify(tmp_path / "ref", tmp_path / "dcp").identical


def _save_chunked(state: dict, path):
    """A DCP checkpoint whose tensors are each stored as two row chunks, the way torch
    stores sharded (DTensor / FSDP) tensors, written by torch in one process."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                       TensorProperties)
    from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                      WriteItemType)

    def pieces(t):
        if t.ndim == 0 or t.shape[0] < 2:
            return [(0, t.shape[0] if t.ndim else None)]
        half = t.shape[0] // 2
        return [(0, half), (half, t.shape[0])]

    class Chunked(DefaultSavePlanner):
        def create_local_plan(self):
            items = []
            for fqn, t in state.items():
                for lo, hi in pieces(t):
                    offsets = torch.Size([lo] + [0] * (t.ndim - 1))
                    sizes = torch.Size([hi - lo] + list(t.shape[1:]))
                    items.append(WriteItem(
                        index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                            properties=TensorProperties.create_from_tensor(t),
                            size=t.size())))
            self.plan = SavePlan(items, planner_data=self.mappings)
            return self.plan

        def resolve_data(self, item):
            lo = item.index.offset[0]
            return state[item.index.fqn][lo:lo + item.tensor_data.chunk.sizes[0]].clone()

    _quiet_dcp(dcp.save, state, checkpoint_id=str(path), planner=Chunked(), no_dist=True)


def test_chunked_tensors_are_assembled(tmp_path):
    cfg = llama_config()
    model = build_transformers_model(cfg, tmp_path / "ref")
    state = model.state_dict()
    _save_chunked(state, tmp_path / "dcp")
    check = {n: torch.zeros_like(t) for n, t in state.items()}   # torch agrees it is valid
    _quiet_dcp(dcp.load, check, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert all(check[n].equal(t) for n, t in state.items())

    from mapc.runtime.containers.dcp import DCPSource
    with DCPSource(tmp_path / "dcp") as src:
        assert len(src.tensors["model.embed_tokens.weight"][2]) == 2
        for n, t in state.items():
            assert np.array_equal(src.read(n), t.numpy()), n
    (tmp_path / "dcp" / "config.json").write_text(json.dumps(cfg))
    mapc.convert(tmp_path / "dcp", tmp_path / "hf", to="hf")
    assert logits_of(tmp_path / "hf", TOKENS).equal(logits_of(model, TOKENS))


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_metadata_that_pickles_code_is_refused(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "dcp", to="dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(mapc.MapcError, match="posix.system|os.system"):
        mapc.inspect(tmp_path / "dcp")


def test_truncated_distcp_is_a_clean_error(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "dcp", to="dcp")
    data = tmp_path / "dcp" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(mapc.MapcError, match="truncated"):
        mapc.convert(tmp_path / "dcp", tmp_path / "back", to="hf")
    assert not (tmp_path / "back").exists()


def test_dcp_source_reads_without_torch_imported(tmp_path):
    import subprocess
    import sys
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "dcp", to="dcp")
    code = ("import sys, mapc; mapc.convert(sys.argv[1], sys.argv[2], to='hf'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "dcp"), str(tmp_path / "b")],
                   check=True)
    assert mapc.verify(src, tmp_path / "b").identical


@pytest.mark.slow
def test_dcp_loads_mapc_output_into_a_sharded_model(tmp_path):
    """torch.distributed.checkpoint reshards mapc's global tensors into DTensors sharded over
    two ranks: each rank's local shard is its slice of the original weights."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    from safetensors.numpy import load_file
    from tests.conftest import llama_config, write_random_hf
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=100))
    mapc.convert(src, tmp_path / "dcp", to="dcp")
    (tmp_path / "out").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).parent / "groundtruth" / "dcp_sharded_load.py"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(port), str(worker),
                        str(tmp_path / "dcp"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    full = load_file(src / "model.safetensors")
    for rank in range(2):
        local = load_file(tmp_path / "out" / f"rank{rank}.safetensors")
        assert local.keys() == full.keys()
        for name, w in full.items():
            want = np.split(w, 2)[rank] if w.ndim == 2 and w.shape[0] % 2 == 0 else w
            np.testing.assert_array_equal(local[name], want, err_msg=name)
