"""Generic mode: any model, no spec, no config (specs/generic.map, ``NAME: *`` tensors).

A checkpoint no family spec describes is read with the shipped ``generic`` spec, whose one
rule places every stored tensor under its own name with the shape the file states. These
tests need no DeepSpeed; the ground truth against DeepSpeed's own tools is in
tests/test_generic_deepspeed.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import mapc
from mapc.compiler.plan import plan_layout, stored_inventory
from mapc.compiler.spec import compile_text, load_spec, schema
from mapc.errors import MapcError
from tests.conftest import llama_config, write_random_hf

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def module_weights(seed=0) -> dict:
    """The state dict of a small vision-style module (no LLM): odd shapes, a 4-d conv kernel,
    BatchNorm statistics and its 0-d int64 step counter."""
    rng = np.random.default_rng(seed)
    f = np.float32
    return {
        "stem.conv.weight": rng.standard_normal((5, 3, 3, 3)).astype(f),
        "stem.conv.bias": rng.standard_normal(5).astype(f),
        "stem.bn.weight": rng.standard_normal(5).astype(f),
        "stem.bn.bias": rng.standard_normal(5).astype(f),
        "stem.bn.running_mean": rng.standard_normal(5).astype(f),
        "stem.bn.running_var": rng.random(5).astype(f),
        "stem.bn.num_batches_tracked": np.array(17, dtype=np.int64),
        "pos_embed": rng.standard_normal((1, 11, 5)).astype(f),
        "classifier.weight": rng.standard_normal((3, 45)).astype(f),
        "classifier.bias": rng.standard_normal(3).astype(f),
    }


@pytest.fixture
def module_dir(tmp_path):
    d = tmp_path / "module"
    d.mkdir()
    safetensors_numpy.save_file(module_weights(), str(d / "model.safetensors"))
    return d


def read_hf(path) -> dict:
    return safetensors_numpy.load_file(str(path / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a)


# ---- the language ---------------------------------------------------------------------------------
def test_generic_spec_is_a_spec_like_the_others():
    import jsonschema
    sp = load_spec("generic")
    jsonschema.validate(sp.ir, schema())
    assert sp.layout_names() == ["hf"] and sp.ir["match"] == []
    assert [t["stored"] for t in sp.ir["tensors"]] == [True]


def test_stored_tensors_are_planned_from_the_checkpoint():
    sp = load_spec("generic")
    env = stored_inventory(sp, "hf", [("a.weight", (3, 4)), ("step", ()), ("b", (5,))])
    plan = plan_layout(sp, "hf", env)
    assert [(n, inst.recipe.shard_shape) for inst, _, n in plan.placements()] == \
        [("a.weight", (3, 4)), ("step", ()), ("b", (5,))]
    assert {k: v.shape for k, v in plan.logical.items()} == \
        {"tensor[a.weight]": (3, 4), "tensor[step]": (), "tensor[b]": (5,)}


def test_a_prefix_rule_keeps_the_rest_of_the_name():
    sp = compile_text('family wrapped\ntensors {\n  t: *\n}\nlayout hf {\n  "module.*" = t\n}\n'
                      'layout plain {\n  "*" = t\n}\n', "<wrapped>")
    env = stored_inventory(sp, "hf", [("module.x.weight", (2, 2)), ("other", (1,))])
    assert env["$stored"] == {"x.weight": (2, 2)}      # "other" fits no rule: left out
    plain = plan_layout(sp, "plain", env)
    assert [n for _, _, n in plain.placements()] == ["x.weight"]


@pytest.mark.parametrize("rule, message", [
    ('"*" = t  split x over tp', "keeps the shape the file states"),
    ('"weights" = t', "one '*'"),
    ('"{i}.*" = t', "one '*'"),
    ('"*.*" = t', "one '*'"),
])
def test_a_stored_rule_takes_no_layout_clauses(rule, message):
    text = ('family bad\nlet x = 2\ntensors {\n  t: *\n}\nlayout hf {\n  mesh tp\n  '
            + rule + '\n}\n')
    with pytest.raises(MapcError, match=message):
        compile_text(text, "<bad>")


def test_a_stored_tensor_cannot_be_in_a_group():
    text = 'family bad\nlet n = 2\ntensors {\n  for layer[i < n] {\n    t: *\n  }\n}\n'
    with pytest.raises(MapcError, match="cannot be in a group"):
        compile_text(text, "<bad>")


# ---- conversions of an arbitrary module ------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["dcp", "hf", "universal", "deepspeed"])
def test_any_module_round_trips_without_config(module_dir, tmp_path, fmt):
    out = tmp_path / fmt
    report = mapc.convert(module_dir, out, to=fmt)
    generic = [w for w in report.warnings if w.startswith("generic mode")]
    assert len(generic) == 1 and "no model config" in generic[0]
    record = json.loads((out / "mapc.json").read_text())
    assert record["family"] == "generic" and record["config"] == {}
    assert not (out / "config.json").exists()
    back = mapc.convert(out, tmp_path / "back", to="hf")     # no flags: the record says
    assert not any(w.startswith("generic mode") for w in back.warnings)
    assert same(read_hf(tmp_path / "back"), module_weights())
    assert mapc.verify(module_dir, tmp_path / "back").identical


def test_deepspeed_from_plain_weights_keeps_integer_buffers_out_of_the_optimizer(module_dir,
                                                                                    tmp_path):
    from mapc.runtime import torchfile
    out = tmp_path / "ds"
    mapc.convert(module_dir, out, to="deepspeed", dp=2)
    ms = torchfile.load(out / "global_step0" / "mp_rank_00_model_states.pt")
    flat = [n for g in ms["param_shapes"] for n in g]
    assert "stem.bn.num_batches_tracked" not in flat and len(flat) == 9
    assert ms["buffer_names"] == ["stem.bn.num_batches_tracked"]
    assert sorted(ms["module"]) == sorted(module_weights())    # safetensors keeps no order
    assert ms["module"]["stem.bn.num_batches_tracked"].shape == ()


def test_inspect_names_generic_mode(module_dir):
    info = mapc.inspect(module_dir)
    assert info["family"] == "generic" and info["tensor_count"] == 10
    assert info["warnings"][0].startswith("generic mode")


def test_an_unknown_model_type_is_kept_and_read_generically(module_dir, tmp_path):
    cfg = {"model_type": "vit", "hidden_size": 5, "image_size": 11}
    (module_dir / "config.json").write_text(json.dumps(cfg))
    report = mapc.convert(module_dir, tmp_path / "d", to="dcp")
    assert "no shipped spec describes model_type 'vit'" in report.warnings[0]
    mapc.convert(tmp_path / "d", tmp_path / "h", to="hf")
    assert json.loads((tmp_path / "h" / "config.json").read_text()) | {"dtype": None} == \
        cfg | {"dtype": None}
    assert same(read_hf(tmp_path / "h"), module_weights())


def test_a_known_family_is_not_read_generically(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config())
    report = mapc.convert(src, tmp_path / "d", to="dcp")
    assert not any(w.startswith("generic mode") for w in report.warnings)
    assert json.loads((tmp_path / "d" / "mapc.json").read_text())["family"] == "llama"


def test_a_known_family_that_does_not_fit_is_refused_not_read_generically(tmp_path):
    cfg = llama_config()
    src = write_random_hf(tmp_path / "hf", cfg)
    (src / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32)))
    with pytest.raises(MapcError, match="has shape"):
        mapc.convert(src, tmp_path / "d", to="dcp")


@pytest.mark.parametrize("to, opts, what", [
    ("megatron", {}, "megatron"), ("neox", {}, "neox"), ("nemo", {}, "megatron"),
    ("nxdt", {}, "nxdt"), ("gguf", {}, "gguf"), ("dcp", {"tp": 2}, "tp=2"),
    ("universal", {"pp": 2}, "pp=2"),
])
def test_targets_that_need_the_family_are_refused_before_writing(module_dir, tmp_path, to, opts,
                                                                  what):
    out = tmp_path / "sub" / "out"
    with pytest.raises(MapcError, match="generic mode") as e:
        mapc.convert(module_dir, out, to=to, **opts)
    assert what in str(e.value) and "--config CONFIG.json" in e.value.hint
    assert "\n" not in str(e.value)
    assert not (tmp_path / "sub").exists()


def test_a_sharded_source_is_not_read_generically(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config())
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2)
    (tmp_path / "mg" / "mapc.json").unlink()
    with pytest.raises(MapcError):
        mapc.convert(tmp_path / "mg", tmp_path / "x", to="hf", spec="generic")


# ---- destinations with missing parents --------------------------------------------------------------
def test_missing_parent_directories_are_created(module_dir, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    mapc.convert(module_dir, out, to="dcp")
    assert (out / "mapc.json").is_file()
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["out"]


def test_a_failed_conversion_removes_the_parents_it_created(module_dir, tmp_path):
    (tmp_path / "a").mkdir()
    out = tmp_path / "a" / "b" / "c" / "out"
    with pytest.raises(MapcError, match="one dtype"):
        mapc.convert(module_dir, out, to="deepspeed", dtype="fp16")
    assert list((tmp_path / "a").iterdir()) == []      # a existed before: kept


def test_a_file_in_the_way_is_refused(module_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(MapcError, match="not a directory"):
        mapc.convert(module_dir, tmp_path / "f" / "out", to="dcp")
