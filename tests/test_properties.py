"""Round trips are bit-exact for random valid configs and topologies, on every backend."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mapc
from mapc.errors import MapcError
from tests.conftest import llama_config, tree_hash, write_random_hf

SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def configs(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    hidden = draw(st.sampled_from([8, 12, 16, heads * head_dim]))
    layers = draw(st.integers(1, 4))
    ffn = draw(st.sampled_from([4, 8, 12, 24]))
    vocab = draw(st.integers(3, 300))
    tied = draw(st.booleans())
    cfg = llama_config(hidden=hidden, layers=layers, heads=heads, groups=groups,
                       head_dim=head_dim, ffn=ffn, vocab=vocab, tied=tied)
    return cfg


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def topology(draw, cfg):
    nh, ng = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tps = [t for t in divisors(ng) if cfg["intermediate_size"] % t == 0 and nh % t == 0]
    return {"tp": draw(st.sampled_from(tps)),
            "pp": draw(st.sampled_from(divisors(cfg["num_hidden_layers"])))}


def fresh(tmp_path, name):
    n = 0
    while (tmp_path / f"{name}{n}").exists():
        n += 1
    return tmp_path / f"{name}{n}"


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@SETTINGS
@given(data=st.data(), cfg=configs())
def test_hf_megatron_hf_is_bit_exact(tmp_path, backend, data, cfg):
    pytest.importorskip(backend)
    _hf_megatron_hf_is_bit_exact(tmp_path, backend, data, cfg)


# jax compiles every new shape: 3 random models cost what 12 cost on the other backends.
@settings(SETTINGS, max_examples=3)
@given(data=st.data(), cfg=configs())
def test_hf_megatron_hf_is_bit_exact_on_jax(tmp_path, data, cfg):
    pytest.importorskip("jax")
    _hf_megatron_hf_is_bit_exact(tmp_path, "jax", data, cfg)


def _hf_megatron_hf_is_bit_exact(tmp_path, backend, data, cfg):
    topo = data.draw(topology(cfg))
    naming = data.draw(st.sampled_from(["local", "te", "legacy"]))
    src = write_random_hf(fresh(tmp_path, "hf"), cfg)
    before = tree_hash(src)
    mg, back = fresh(tmp_path, "mg"), fresh(tmp_path, "back")
    mapc.convert(src, mg, to="megatron", set={"naming": naming}, backend=backend, **topo)
    mapc.convert(mg, back, to="hf", backend=backend)
    assert tree_hash(src) == before, "the source was modified"
    from safetensors.numpy import load_file
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert mapc.verify(src, mg).identical


@SETTINGS
@given(data=st.data(), cfg=configs())
def test_megatron_reshard_equals_direct_conversion(tmp_path, data, cfg):
    a, c = data.draw(topology(cfg)), data.draw(topology(cfg))
    src = write_random_hf(fresh(tmp_path, "hf"), cfg)
    via_a, resharded, direct = fresh(tmp_path, "a"), fresh(tmp_path, "r"), fresh(tmp_path, "d")
    mapc.convert(src, via_a, to="megatron", **a)
    mapc.convert(via_a, resharded, to="megatron", **c)
    mapc.convert(src, direct, to="megatron", **c)
    files_r = sorted(p.relative_to(resharded) for p in resharded.rglob("*.pt"))
    files_d = sorted(p.relative_to(direct) for p in direct.rglob("*.pt"))
    assert files_r == files_d
    from mapc.runtime import torchfile
    for rel in files_r:
        x, y = torchfile.load(resharded / rel)["model"], torchfile.load(direct / rel)["model"]
        fx, fy = _flat(x), _flat(y)
        assert fx.keys() == fy.keys()
        for k in fx:
            assert fx[k].numpy().tobytes() == fy[k].numpy().tobytes(), (rel, k)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@SETTINGS
@given(data=st.data(), cfg=configs())
def test_invalid_topologies_are_rejected_and_nothing_is_written(tmp_path, data, cfg):
    ng, L = cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    bad_tp = next(t for t in range(2, 64) if ng % t)
    bad_pp = next(p for p in range(2, 64) if L % p)
    topo = data.draw(st.sampled_from([{"tp": bad_tp}, {"pp": bad_pp}]))
    src = write_random_hf(fresh(tmp_path, "hf"), cfg)
    out = fresh(tmp_path, "out")
    before = set(os.listdir(tmp_path))
    with pytest.raises(MapcError) as e:
        mapc.convert(src, out, to="megatron", **topo)
    msg = str(e.value)
    if "tp" in topo:
        assert f"tp={bad_tp} does not divide" in msg
    else:
        assert f"pp={bad_pp} does not divide the {L} entries of layer" in msg
    assert "specs/llama.map:" in msg
    assert set(os.listdir(tmp_path)) == before, "something was written"


@settings(SETTINGS, max_examples=6)
@given(data=st.data(), cfg=configs())
def test_torch_dist_round_trip_and_reshard_equal_direct_conversion(tmp_path, data, cfg):
    """HF -> torch_dist (any tp/pp: global tensors) -> HF is bit-exact, and torch_dist ->
    megatron at another topology equals HF -> megatron directly."""
    written, other = data.draw(topology(cfg)), data.draw(topology(cfg))
    src = write_random_hf(fresh(tmp_path, "hf"), cfg)
    dist, back = fresh(tmp_path, "dist"), fresh(tmp_path, "back")
    via, direct = fresh(tmp_path, "via"), fresh(tmp_path, "direct")
    mapc.convert(src, dist, to="torch_dist", **written)
    mapc.convert(dist, back, to="hf")
    from safetensors.numpy import load_file
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    mapc.convert(dist, via, to="megatron", **other)
    mapc.convert(src, direct, to="megatron", **other)
    files = sorted(p.relative_to(direct) for p in direct.rglob("*.pt"))
    assert sorted(p.relative_to(via) for p in via.rglob("*.pt")) == files
    from mapc.runtime import torchfile
    for rel in files:
        fx, fy = (_flat(torchfile.load(d / rel)["model"]) for d in (via, direct))
        assert fx.keys() == fy.keys()
        for k in fx:
            assert fx[k].numpy().tobytes() == fy[k].numpy().tobytes(), (rel, k)
