"""Language features of issue #12: conditional expressions, `if` on meta entries, `null` config
values kept apart from missing keys, `require`, list arithmetic in meta, and names whose index
leaves its range. Each with its errors (file:line:col and caret)."""
from __future__ import annotations

import re

import pytest

from mapc.compiler.plan import bind_config, plan_layout
from mapc.compiler.spec import compile_text
from mapc.errors import MapcError, SpecError

SPEC = """
family feat
config {
    hidden: hidden_size
    layers: num_hidden_layers
    q_lora: q_lora_rank        nullable  default 1536
    window: sliding_window     default 0
}
let has_lora = q_lora != null
tensors {
    embed: hidden
    for layer[i < layers] {
        w: hidden
    }
}
layout plain {
    meta {
        q_lora_rank = q_lora
        lora_kind = "low-rank" if has_lora else "full"
        sliding_window = window if window > 0
        windows = [window, 0] * layers
        shape = [hidden] + [layers]
    }
    "emb" = embed
    "l.{i}.w" = layer[i].w
}
layout piped {
    mesh pp
    pipeline layer[i] as j
    let stages = pp
    require layers % stages == 0 or stages == 1 "layers must divide evenly over pp"
    "emb" = embed  on first
    "l.{j}.w" = layer[i].w
}
"""


def spec(text=SPEC):
    return compile_text(text, "f.map")


def meta(config, text=SPEC, layout="plain"):
    s = spec(text)
    return plan_layout(s, layout, bind_config(s, config)).meta()


def error(fn) -> str:
    with pytest.raises(MapcError) as e:
        fn()
    return str(e.value)


BASE = {"hidden_size": 4, "num_hidden_layers": 2}


@pytest.mark.parametrize("config, lora, kind", [
    (dict(BASE), 1536, "low-rank"),                        # missing: the default
    (dict(BASE, q_lora_rank=None), None, "full"),          # present null: null, not the default
    (dict(BASE, q_lora_rank=64), 64, "low-rank"),
], ids=["missing", "null", "set"])
def test_nullable_config_value_keeps_null_apart_from_missing(config, lora, kind):
    m = meta(config)
    assert m["q_lora_rank"] == lora and m["lora_kind"] == kind


def test_without_nullable_a_null_value_still_takes_the_default():
    text = SPEC.replace("q_lora_rank        nullable  default", "q_lora_rank  default")
    assert meta(dict(BASE, q_lora_rank=None), text)["q_lora_rank"] == 1536


@pytest.mark.parametrize("window, present", [(0, False), (4096, True)])
def test_meta_entry_with_if_is_written_only_when_it_holds(window, present):
    m = meta(dict(BASE, sliding_window=window))
    assert ("sliding_window" in m) == present
    if present:
        assert m["sliding_window"] == window


def test_list_arithmetic_in_meta():
    m = meta(dict(BASE, sliding_window=8))
    assert m["windows"] == [8, 0, 8, 0]
    assert m["shape"] == [4, 2]


def test_conditional_expression_in_a_let_and_a_name():
    text = SPEC.replace('"l.{i}.w" = layer[i].w\n}\nlayout piped',
                        '"l.{i if i < 1 else i + 10}.w" = layer[i].w\n}\nlayout piped')
    s = spec(text)
    plan = plan_layout(s, "plain", bind_config(s, BASE))
    assert sorted(n for _, _, n in plan.placements()) == ["emb", "l.0.w", "l.11.w"]


def test_arithmetic_on_null_names_the_null_operand_and_the_line():
    text = SPEC.replace("q_lora_rank = q_lora\n", "q_lora_rank = q_lora * 2\n")
    msg = error(lambda: meta(dict(BASE, q_lora_rank=None), text))
    assert re.match(r"f\.map:\d+:9: q_lora is null in q_lora \* 2", msg)
    assert msg.splitlines()[-2].strip() == "q_lora_rank = q_lora * 2"


def test_layout_require_refuses_with_the_specs_message_and_position():
    s = spec()
    msg = error(lambda: plan_layout(s, "piped", bind_config(s, dict(BASE, num_hidden_layers=3)),
                                    {"pp": 2}))
    assert msg.startswith("f.map:31:5: layers must divide evenly over pp")
    line, caret = msg.splitlines()[-3:-1] if "hint" in msg.splitlines()[-1] else \
        msg.splitlines()[-2:]
    assert line.strip().startswith("require layers % stages")
    assert caret.index("^") == line.index("require")
    assert plan_layout(s, "piped", bind_config(s, BASE), {"pp": 2})


def test_top_level_require_refuses_a_config():
    text = SPEC.replace("let has_lora", 'require hidden % 4 == 0 "hidden must be a multiple of '
                                        '4 for this family"\nlet has_lora')
    s = spec(text)
    msg = error(lambda: bind_config(s, dict(BASE, hidden_size=6)))
    assert msg.startswith("f.map:9:1: hidden must be a multiple of 4 for this family")
    assert bind_config(s, BASE)["hidden"] == 4


@pytest.mark.parametrize("where, replacement, expected", [
    ("require layers % stages", "require layerz % stages", r"unknown symbol layerz in require"),
    ('lora_kind = "low-rank" if has_lora else "full"',
     'lora_kind = "low-rank" if has_lora else',
     r"unexpected end of file|unexpected"),
    ("sliding_window = window if window > 0", "sliding_window = window if windw > 0",
     r"unknown symbol windw in condition of meta sliding_window"),
], ids=["require-unknown-symbol", "cond-without-else", "meta-if-unknown-symbol"])
def test_static_errors_of_the_new_statements(where, replacement, expected):
    with pytest.raises(SpecError) as e:
        compile_text(SPEC.replace(where, replacement), "f.map")
    assert re.match(r"f\.map:\d+:\d+: " + f"({expected})", str(e.value)), str(e.value)


@pytest.mark.parametrize("placeholder", ["{j - 1}", "{i - 2}", "{i / 4 * 2 - 1}"])
def test_a_name_index_below_zero_is_refused_at_compile_time(placeholder):
    text = SPEC.replace('"l.{j}.w" = layer[i].w', f'"l.{placeholder}.w" = layer[i].w')
    s = spec(text)
    msg = error(lambda: plan_layout(s, "piped", bind_config(s, BASE), {"pp": 2}))
    assert re.match(r"f\.map:33:5: tensor name 'l\.\{.*\}\.w': \{.*\} = -\d+ at .*; an index "
                    r"in a name must be a non-negative integer", msg), msg


GOLDEN = __import__("pathlib").Path(__file__).parent / "golden" / "features.txt"


def test_features_program_and_meta_match_golden():
    """The printed program and evaluated meta of the feature spec, for review of any change."""
    import json
    import os

    from mapc.compiler.program import compile_program
    s = spec(SPEC.replace('"l.{i}.w" = layer[i].w\n}\nlayout piped',
                          '"l.{i if i < 1 else i + 10}.w" = layer[i].w\n}\nlayout piped'))
    env = bind_config(s, dict(BASE, q_lora_rank=None, sliding_window=16))
    src = plan_layout(s, "plain", env)
    text = compile_program(src, plan_layout(s, "piped", env, {"pp": 2})).pretty() + "\n" + \
        compile_program(plan_layout(s, "piped", env, {"pp": 2}), src).pretty() + "\n" + \
        json.dumps(src.meta(), indent=1, sort_keys=True) + "\n"
    if os.environ.get("MAPC_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


# ---- a layout parameter's default computed from the config ('param NAME = A | B default EXPR')
PARAM_SPEC = SPEC.replace('''layout plain {
    meta {''', '''layout plain {
    param style = "short" | "long"  default "long" if layers > 2 else "short"
    param width = 8  default hidden * 3
    meta {
        style = style
        width = width''')


@pytest.mark.parametrize("layers, style, width", [(2, "short", 12), (3, "long", 12)])
def test_a_computed_parameter_default_follows_the_config(layers, style, width):
    s = spec(PARAM_SPEC)
    env = bind_config(s, dict(BASE, num_hidden_layers=layers))
    plan = plan_layout(s, "plain", env)
    assert plan.params == {"style": style, "width": width}
    assert plan.meta()["style"] == style and plan.meta()["width"] == width
    # given, the parameter is what was asked, whatever the default
    assert plan_layout(s, "plain", env, params={"style": "short"}).params["style"] == "short"


def test_a_computed_default_outside_the_choices_is_refused_with_its_position():
    s = spec(PARAM_SPEC.replace('default "long" if', 'default "wide" if'))
    msg = error(lambda: plan_layout(s, "plain", bind_config(s, dict(BASE, num_hidden_layers=3))))
    assert re.match(r"f\.map:\d+:5: the default of parameter style is 'wide' for this config, "
                    r"not one of 'short', 'long'", msg), msg
    msg = error(lambda: plan_layout(s := spec(PARAM_SPEC.replace("default hidden * 3",
                                                                 'default "x"')),
                                    "plain", bind_config(s, BASE)))
    assert "the default of parameter width is 'x'" in msg, msg


def test_a_computed_default_sees_only_the_config():
    with pytest.raises(SpecError) as e:      # a mesh axis or parameter is not known yet
        compile_text(PARAM_SPEC.replace("default hidden * 3", "default style"), "f.map")
    assert re.match(r"f\.map:\d+:5: unknown symbol style in the default of parameter width",
                    str(e.value)), str(e.value)
