"""Hostile and unlucky input: each crafted file or option gets a one-line MapcError naming what
and where, in bounded time and memory, with nothing written (no DST, no temp leftovers)."""
from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import time

import numpy as np
import pytest

import mapc
from mapc.cli.main import main
from mapc.errors import MapcError
from mapc.runtime.containers import nemo
from mapc.runtime.safetensors_io import SafetensorsFile
from tests.conftest import llama_config, write_random_hf

CFG = llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF checkpoint and its .nemo (tar) conversion, shared (copied before changing)."""
    root = tmp_path_factory.mktemp("tiny")
    hf = write_random_hf(root / "hf", CFG)
    mapc.convert(hf, root / "m.nemo", to="nemo")
    return root


def refused(capsys, *argv, match=None):
    """Run the CLI; assert it fails with one line (matching ``match``; a spec error adds the
    spec line and a caret below it) and return it."""
    t = time.monotonic()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    first, *context = err.splitlines()
    assert code == 1 and first.startswith("mapc: error: "), err
    assert len(context) in (0, 2) and all(line.startswith(" ") for line in context), err
    assert time.monotonic() - t < 30
    if match:
        assert match in err, err
    return err


def no_output(tmp_path):
    return [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))] == []


# ---- safetensors headers and shard indexes --------------------------------------------------------
def st_bytes(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def f32(shape, begin):
    n = int(np.prod(shape)) * 4
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


BAD_HEADERS = {
    "a list": ([1, 2], b""),
    "a string": ("x", b""),
    "entry not an object": ({"w": [1]}, b""),
    "no data_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "float dims": ({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8),
    "negative dims": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, -8]}}, b""),
    "shape not a list": ({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8),
    "offsets of three": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}},
                         b"\0" * 8),
    "unknown dtype": ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "metadata not strings": ({"__metadata__": {"a": 1}, "w": f32([2], 0)}, b"\0" * 8),
    "overlapping tensors": ({"a": f32([2], 0), "b": f32([2], 4)}, b"\0" * 12),
    "shared bytes": ({"a": f32([2], 0), "b": f32([2], 0)}, b"\0" * 8),
    "gap": ({"a": f32([2], 0), "b": f32([2], 12)}, b"\0" * 20),
    "bytes after the tensors": ({"a": f32([2], 0)}, b"\0" * 12),
    "truncated data": ({"a": f32([4], 0)}, b"\0" * 8),
    "huge shape": ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
                   b"\0" * 8),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_safetensors_header_is_a_mapc_error(tmp_path, case):
    header, data = BAD_HEADERS[case]
    f = tmp_path / "x.safetensors"
    f.write_bytes(st_bytes(header, data))
    with pytest.raises(MapcError) as e:
        SafetensorsFile(f)
    assert str(f) in str(e.value)


def test_safetensors_library_agrees_on_overlap(tmp_path):
    """The reference: the safetensors library refuses what mapc refuses, reads what it reads."""
    from safetensors import SafetensorError
    from safetensors.numpy import load
    with pytest.raises(SafetensorError):
        load(st_bytes(*BAD_HEADERS["overlapping tensors"]))
    good = st_bytes({"a": f32([2], 0), "b": f32([2], 8)}, np.arange(4, dtype="<f4").tobytes())
    f = tmp_path / "ok.safetensors"
    f.write_bytes(good)
    sf, ref = SafetensorsFile(f), load(good)
    assert all(np.array_equal(sf.read(k), ref[k]) for k in ("a", "b"))


def _sharded(tmp_path, tiny):
    """The tiny checkpoint with its weights under a shard index."""
    import shutil
    d = tmp_path / "sharded"
    shutil.copytree(tiny / "hf", d)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    sf = SafetensorsFile(d / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                            for k in sf.keys()}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d, index


@pytest.mark.parametrize("where", ["absolute", "parent", "nested parent"])
def test_shard_index_naming_files_outside_is_refused(tmp_path, tiny, capsys, where):
    d, index = _sharded(tmp_path, tiny)
    other = tmp_path / "other"        # another model's weights, which must not be read
    other.mkdir()
    (other / "model.safetensors").write_bytes((tiny / "hf" / "model.safetensors").read_bytes())
    name = {"absolute": str(other / "model.safetensors"),
            "parent": "../other/model.safetensors",
            "nested parent": "sub/../../other/model.safetensors"}[where]
    index["weight_map"] = {k: name for k in index["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(capsys, "convert", d, tmp_path / "out", "--to", "megatron",
            match="not a file of this checkpoint")
    assert no_output(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"metadata": {}}',
                                  '{"weight_map": [1, 2]}', '{"weight_map": {"a": 3}}'])
def test_broken_shard_index_is_one_line(tmp_path, tiny, capsys, text):
    d, _ = _sharded(tmp_path, tiny)
    (d / "model.safetensors.index.json").write_text(text)
    refused(capsys, "inspect", d, match="model.safetensors.index.json")


def test_sharded_checkpoint_still_reads(tmp_path, tiny):
    d, _ = _sharded(tmp_path, tiny)
    assert mapc.verify(d, tiny / "hf").identical


# ---- model configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("hidden_size", "32", "cannot compute"),
    # config lists are values now (``i in mlp_only_layers``): one used as a number is refused
    # where the spec computes with it
    ("hidden_size", [32], "hidden = [32] is a list, not a number"),
    ("vocab_size", {"a": 1}, "is a dict"),
    ("num_hidden_layers", 10**9, "not a count of at most"),
    ("num_hidden_layers", 1e9, "not a count of at most"),
    ("num_hidden_layers", True, "not a count of at most"),
    ("hidden_size", 2**40, "parameters"),
    ("tie_word_embeddings", "yes", "lm_head.weight"),
])
def test_config_of_wrong_type_or_size_is_one_line(tmp_path, tiny, capsys, key, value, match):
    import shutil
    d = tmp_path / "hf"
    shutil.copytree(tiny / "hf", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    err = refused(capsys, "convert", d, tmp_path / "out", "--to", "megatron")
    assert match in err
    assert no_output(tmp_path)


@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "{"])
def test_config_json_that_is_not_an_object_is_one_line(tmp_path, tiny, capsys, text):
    import shutil
    d = tmp_path / "hf"
    shutil.copytree(tiny / "hf", d)
    (d / "config.json").write_text(text)
    refused(capsys, "inspect", d, match="config.json")


# ---- option bounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    (["--to", "megatron", "--tp", str(2**70)], "at most"),
    (["--to", "megatron", "--pp", str(2**17)], "at most"),
    (["--to", "deepspeed", "--dp", "100000"], "at most"),
    (["--to", "deepspeed", "--dp", "5000"], "fewer than 256"),
    (["--to", "megatron", "--set", "vocab_multiple=1000000000"], "padding"),
    (["--to", "megatron", "--set", "vocab_multiple=1e9"], "vocab_multiple"),
])
def test_hostile_sizes_are_refused_at_once(tmp_path, tiny, capsys, argv, match):
    refused(capsys, "convert", tiny / "hf", tmp_path / "out", *argv, match=match)
    assert no_output(tmp_path)


def test_dp_within_the_bound_converts(tmp_path, tiny):
    mapc.convert(tiny / "hf", tmp_path / "out", to="deepspeed", dp=4)
    assert mapc.verify(tiny / "hf", tmp_path / "out").identical


# ---- .nemo archives ---------------------------------------------------------------------------------
def tar_bytes(members) -> bytes:
    """A tar of (name, data, declared size) members: the header may lie about the size."""
    out = io.BytesIO()
    for name, data, declared in members:
        info = tarfile.TarInfo(name)
        info.size = declared
        out.write(info.tobuf(format=tarfile.GNU_FORMAT))
        out.write(data + b"\0" * (-len(data) % 512))
    out.write(b"\0" * 1024)
    return out.getvalue()


YAML = b"num_layers: 2\nhidden_size: 32\n"


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """The system temp dir (where a compressed .nemo is extracted), watched."""
    import tempfile
    t = tmp_path / "systemp"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


def test_gzip_bomb_nemo_is_refused_before_extracting(tmp_path, capsys, monkeypatch, temp_dir):
    monkeypatch.setattr(nemo, "MIN_BUDGET", 1 << 20)      # keeps the test small: 8 MiB of zeros
    bomb = tmp_path / "bomb.nemo"
    zeros = b"\0" * (8 << 20)
    bomb.write_bytes(gzip.compress(tar_bytes([("./model_config.yaml", YAML, len(YAML)),
                                              ("./model_weights.ckpt", zeros, len(zeros))])))
    assert bomb.stat().st_size < 64 << 10
    refused(capsys, "convert", bomb, tmp_path / "out", "--to", "hf", match="declares")
    assert list(temp_dir.iterdir()) == [] and no_output(tmp_path)


@pytest.mark.parametrize("compress", [False, True])
def test_member_declaring_a_terabyte_is_one_line(tmp_path, capsys, temp_dir, compress):
    raw = tar_bytes([("./model_config.yaml", YAML, len(YAML)),
                     ("./model_weights.ckpt", b"PK\3\4", 10**12)])
    f = tmp_path / "liar.nemo"
    f.write_bytes(gzip.compress(raw) if compress else raw)
    refused(capsys, "convert", f, tmp_path / "out", "--to", "hf")
    assert list(temp_dir.iterdir()) == [] and no_output(tmp_path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_nemo_is_one_line(tmp_path, tiny, capsys, temp_dir, compress):
    raw = (tiny / "m.nemo").read_bytes()
    data = gzip.compress(raw) if compress else raw
    f = tmp_path / "cut.nemo"
    f.write_bytes(data[: len(data) // 2])
    refused(capsys, "convert", f, tmp_path / "out", "--to", "hf")
    assert list(temp_dir.iterdir()) == [] and no_output(tmp_path)


def test_huge_config_member_is_refused(tmp_path, capsys, temp_dir):
    f = tmp_path / "big.nemo"
    f.write_bytes(tar_bytes([("./model_config.yaml", b"", 1 << 30)]))
    refused(capsys, "inspect", f)
