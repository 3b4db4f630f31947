"""Two language features for layers a config counts but a checkpoint or format may lack
(DeepSeek-V3's multi-token-prediction layer): a config entry's `absent V` (reading, the value is
V when the checkpoint lacks what the config's value implies) and a layout's `without GROUP "why"`
(the format has no place for a group: statically exempt from coverage, refused when the group
has entries). Each with its errors (file:line:col). Also quoted meta keys (GGUF gpt-oss)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import mapc
from mapc.compiler.plan import bind_config, plan_layout
from mapc.compiler.spec import compile_text
from mapc.errors import MapcError, SpecError

SPEC = """
family extra
match model_type: "extra_test"
config {
    hidden: hidden_size
    layers: num_hidden_layers
    extra:  num_extra_layers   default 0  absent 0
}
tensors {
    embed: hidden
    for layer[i < layers] {
        w: hidden
    }
    for more[m < extra] {
        w: hidden
    }
}
layout hf {
    meta {
        model_type = "extra_test"
    }
    "embed.weight" = embed
    "layers.{i}.w" = layer[i].w
    "layers.{layers + m}.w" = more[m].w
}
layout small {
    without more "layout small has no place for the extra layers"
    "embed.weight" = embed
    "layers.{i}.w" = layer[i].w
}
"""
CONFIG = {"model_type": "extra_test", "hidden_size": 4, "num_hidden_layers": 2,
          "num_extra_layers": 1}


def _checkpoint(path, with_extra):
    from safetensors.numpy import save_file
    path.mkdir(parents=True)
    w = {"embed.weight": np.arange(4, dtype=np.float32),
         "layers.0.w": np.ones(4, np.float32), "layers.1.w": np.full(4, 2, np.float32)}
    if with_extra:
        w["layers.2.w"] = np.full(4, 3, np.float32)
    save_file(w, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "spec.map").write_text(SPEC)
    return w


def test_bind_config_takes_the_absent_value_only_when_asked():
    s = compile_text(SPEC, "f.map")
    assert bind_config(s, CONFIG)["extra"] == 1
    assert bind_config(s, CONFIG, frozenset({"extra"}))["extra"] == 0


@pytest.mark.parametrize("with_extra", [True, False])
def test_a_checkpoint_without_what_the_config_counts_reads_with_the_absent_value(tmp_path,
                                                                                with_extra):
    from safetensors.numpy import load_file
    w = _checkpoint(tmp_path / "src", with_extra)
    mapc.convert(tmp_path / "src", tmp_path / "out", to="hf", spec=tmp_path / "src" / "spec.map")
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert back.keys() == w.keys() and all(np.array_equal(back[k], w[k]) for k in w)


def test_a_tensor_beyond_both_values_is_still_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    _checkpoint(tmp_path / "src", True)
    w = load_file(str(tmp_path / "src" / "model.safetensors"))
    w["layers.3.w"] = np.zeros(4, np.float32)
    save_file(w, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(MapcError, match=r"layers\.3\.w"):
        mapc.convert(tmp_path / "src", tmp_path / "out", to="hf",
                     spec=tmp_path / "src" / "spec.map")


def test_without_refuses_a_config_with_entries_and_plans_one_without():
    s = compile_text(SPEC, "f.map")
    with pytest.raises(MapcError) as e:
        plan_layout(s, "small", bind_config(s, CONFIG))
    assert re.match(r"f\.map:27:5: layout small has no place for the extra layers", str(e.value))
    plan = plan_layout(s, "small", bind_config(s, dict(CONFIG, num_extra_layers=0)))
    assert sorted(n for _, _, n in plan.placements()) == ["embed.weight", "layers.0.w",
                                                          "layers.1.w"]


@pytest.mark.parametrize("where, replacement, expected", [
    ("absent 0", "absent extraa", r"unknown symbol extraa in absent value of extra"),
    ('without more "', 'without mor "', r"'without mor': the spec declares no tensor group mor"),
    ('    "embed.weight" = embed\n    "layers.{i}.w" = layer[i].w\n}\n',
     '    "embed.weight" = embed\n    "layers.{i}.w" = layer[i].w\n    "x.{m}" = more[m].w\n}\n',
     r"layout small is 'without more' but this rule places a tensor of it"),
    ('    without more "layout small has no place for the extra layers"\n', '',
     r"layout small never places tensor more\.w"),
], ids=["absent-unknown-symbol", "without-unknown-group", "without-but-placed",
        "no-without-coverage"])
def test_static_errors(where, replacement, expected):
    assert SPEC.count(where) == 1
    text = SPEC.replace(where, replacement)
    with pytest.raises(SpecError) as e:
        compile_text(text, "f.map")
    assert re.match(r"f\.map:\d+:\d+: " + f"({expected})", str(e.value)), str(e.value)


def test_a_quoted_meta_key_is_written_as_it_is_and_checked_for_gguf():
    """llama.cpp's architecture names may hold a hyphen (gpt-oss): such a key is quoted."""
    text = SPEC.replace('''        model_type = "extra_test"
''', '''        model_type = "extra_test"
        "odd-name.size" = hidden
''')
    s = compile_text(text, "f.map")
    plan = plan_layout(s, "hf", bind_config(s, dict(CONFIG, num_extra_layers=0)))
    assert plan.meta()["odd-name.size"] == 4
    bad = SPEC.replace("layout small {", '''layout gguf {
    meta {
        general.architecture = "gpt-oss"
        "gpt-oss.block_countt" = layers
    }
    without more "no place"
    "token_embd.weight" = embed
    "blk.{i}.w" = layer[i].w
}
layout small {''')
    with pytest.raises(SpecError, match=r"gpt-oss\.block_countt"):
        compile_text(bad, "f.map")
    compile_text(bad.replace("block_countt", "block_count"), "f.map")
