"""`extends "BASE"`: a spec written as its differences from another (compiler/extend.py).
Merge semantics, the errors (file:line:col and caret), and that the base travels in records."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mapc.compiler.plan import bind_config, plan_layout
from mapc.compiler.spec import compile_text, load_spec, spec_from_record, spec_record
from mapc.errors import SpecError

BASE = """family base
match model_type: "base"
config {
    hidden: hidden_size
    layers: num_hidden_layers
    eps:    norm_eps              default 0.001
}
tensors {
    embed: hidden
    for layer[i < layers] {
        w: hidden
    }
}
layout plain {
    param style = "a" | "b"
    meta {
        kind = "base"
        eps = eps
    }
    "emb" = embed
    "l.{i}.w" = layer[i].w  if style == "a"
    "layers.{i}.w" = layer[i].w  if style == "b"
}
layout other {
    "emb" = embed
    "l.{i}.w" = layer[i].w
}
"""

DERIVED = """family derived
extends "base.map"
match model_type: "derived"
config {
    eps:    norm_eps              default 0.5
}
tensors {
    for layer[i < layers] {
        v: hidden
    }
}
layout plain {
    meta {
        kind = "derived"
    }
    drop "layers.{i}.w"
    "l.{i}.v" = layer[i].v
    "layers.{i}.w" = layer[i].w  if style == "b"
    "layers.{i}.v" = layer[i].v  if false
}
drop layout other
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "base.map").write_text(BASE)
    (tmp_path / "derived.map").write_text(DERIVED)
    return tmp_path


def test_derived_spec_merges_into_its_base(files):
    s = load_spec(files / "derived.map")
    assert s.family == "derived" and s.layout_names() == ["plain"]
    assert [m["values"] for m in s.ir["match"]] == [["derived"]]
    assert [t["name"] for t in s.ir["tensors"]] == ["embed", "layer.w", "layer.v"]
    env = bind_config(s, {"hidden_size": 2, "num_hidden_layers": 2})
    assert env["eps"] == 0.5                      # the derived default replaces the base's
    plan = plan_layout(s, "plain", env)
    assert plan.meta() == {"kind": "derived", "eps": 0.5}   # by key, in the base's order
    assert sorted(n for _, _, n in plan.placements()) == ["emb", "l.0.v", "l.0.w", "l.1.v",
                                                          "l.1.w"]
    # inherited rules keep pointing into the base file
    rule = next(r for r in s.layout("plain")["rules"] if r["name"] == "emb")
    assert rule["at"].startswith(str(files / "base.map"))


def test_a_shipped_base_by_name(tmp_path):
    text = ('family mine\nextends "llama"\nmatch model_type: "mine"\n'
            'layout hf {\n    meta {\n        model_type = "mine"\n    }\n}\n')
    s = compile_text(text, str(tmp_path / "mine.map"))
    llama = load_spec("llama")
    assert s.layout_names() == llama.layout_names()
    assert [r["name"] for r in s.layout("megatron")["rules"]] == \
        [r["name"] for r in llama.layout("megatron")["rules"]]
    assert s.bases[0][:2] == ("llama", "specs/llama.map")


def test_the_identity_covers_the_base(files):
    a = load_spec(files / "derived.map").sha256
    (files / "base.map").write_text(BASE.replace('kind = "base"', 'kind = "base2"'))
    assert load_spec(files / "derived.map").sha256 != a


def test_the_record_carries_the_base_too(files):
    s = load_spec(files / "derived.map")
    rec = {"spec": spec_record(s)}
    (files / "base.map").unlink()
    again = spec_from_record(rec, "x")
    assert again.sha256 == s.sha256 and again.ir["layouts"] == s.ir["layouts"]


def error(files, text) -> str:
    (files / "d.map").write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(files / "d.map")
    return str(e.value)


@pytest.mark.parametrize("old, new, expected, line", [
    ('drop "layers.{i}.w"', 'drop "layers.{k}.w"',
     r"drop 'layers\.\{k\}\.w': the base layout plain has no rule of that name", 16),
    ("drop layout other", "drop layout another",
     r"drop layout another: the base spec base has no layout another", 21),
    ('extends "base.map"', 'extends "nowhere"',
     r"extends 'nowhere': no shipped spec or spec file of that name", 2),
    ('extends "base.map"', 'extends "d.map"', r"extends 'd\.map': a cycle", 2),
    ('extends "base.map"', 'extends "base.map"\nextends "base.map"',
     r"a spec extends at most one base", 3),
], ids=["drop-rule", "drop-layout", "unknown-base", "cycle", "twice"])
def test_errors(files, old, new, expected, line):
    assert old in DERIVED
    msg = error(files, DERIVED.replace(old, new))
    assert re.match(rf"{re.escape(str(files / 'd.map'))}:{line}:\d+: {expected}", msg), msg
    assert msg.splitlines()[-1].strip() == "^"


def test_an_error_in_an_inherited_rule_names_the_base_file(files):
    (files / "base.map").write_text(BASE.replace('"emb" = embed\n    "l.{i}.w" = layer[i].w  if',
                                                 '"emb" = embedd\n    "l.{i}.w" = layer[i].w  if'))
    msg = error(files, DERIVED)
    assert msg.startswith(f"{files / 'base.map'}:20:13: unknown tensor embedd")
