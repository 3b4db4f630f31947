"""The spec language: syntax errors, semantic checks, and the IR schema."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mapc.compiler.spec import compile_text, load_spec, schema
from mapc.errors import SpecError

LLAMA = (Path(__file__).parent.parent / "specs" / "llama.map").read_text()

MINIMAL = """
family tiny
config {
    hidden: hidden_size
    vocab:  vocab_size
}
tensors {
    embed: vocab hidden
    norm:  hidden
}
layout plain {
    "emb" = embed
    "norm" = norm
}
"""


def compile_error(text) -> str:
    with pytest.raises(SpecError) as e:
        compile_text(text, "t.map")
    return str(e.value)


def test_shipped_spec_validates_against_the_ir_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(load_spec("llama").ir, schema())


def test_ir_is_plain_json_and_deterministic():
    a = compile_text(LLAMA, "specs/llama.map").ir
    assert json.loads(json.dumps(a)) == a
    assert compile_text(LLAMA + "\n# comment\n", "specs/llama.map").ir["layouts"] == a["layouts"]


def test_minimal_spec_compiles():
    spec = compile_text(MINIMAL, "t.map")
    assert spec.family == "tiny"
    assert [r["name"] for r in spec.layout("plain")["rules"]] == ["emb", "norm"]


def test_syntax_error_shows_file_line_column_caret_and_expected():
    msg = compile_error(MINIMAL.replace('"norm" = norm', '"norm" = = norm'))
    assert msg.startswith("t.map:13:14: unexpected '='")
    assert "expected" in msg and "a name" in msg
    line, caret = msg.splitlines()[-2:]
    assert line.strip() == '"norm" = = norm'
    assert caret.index("^") == line.index("= norm")


def test_unexpected_character_is_located():
    msg = compile_error(MINIMAL.replace("hidden: hidden_size", "hidden: hidden_size $"))
    assert msg.startswith("t.map:4:25: unexpected character '$'")


def test_unknown_symbol_in_tensor_shape():
    msg = compile_error(MINIMAL.replace("norm:  hidden", "norm:  hiden"))
    assert re.match(r"t\.map:9:12: unknown size symbol 'hiden' in tensor norm", msg)
    assert "known: hidden, vocab" in msg


def test_shape_mismatch_in_a_fusion_is_reported_with_algebra():
    bad = LLAMA.replace("as (groups [q: heads / groups, k: 1, v: 1] head_dim) hidden\n"
                        "        split groups over tp\n        if naming != \"legacy\"",
                        "as (groups [q: heads, k: 1, v: 1] head_dim) hidden\n"
                        "        split groups over tp\n        if naming != \"legacy\"")
    msg = compile_error(bad)
    assert "axis 0 of layer.q is head_dim * heads but the pattern makes it " \
           "groups * head_dim * heads" in msg
    line = next(n for n, text in enumerate(bad.splitlines(), 1)
                if "linear_qkv.weight\" = layer[i].q" in text)   # the offending rule
    assert msg.startswith(f"t.map:{line}:")


def test_tensor_placed_twice_unconditionally():
    msg = compile_error(MINIMAL.replace('"norm" = norm', '"norm" = norm\n    "again" = norm'))
    assert "tensor norm is placed twice in layout plain" in msg
    assert "copy" in msg


def test_tensor_never_placed():
    msg = compile_error(MINIMAL.replace('    "norm" = norm\n', ""))
    assert "layout plain never places tensor norm" in msg


def test_split_of_unknown_factor_and_unknown_mesh_axis():
    msg = compile_error(MINIMAL.replace('"emb" = embed', '"emb" = embed split vocab over tp'))
    assert "split over 'tp', which is not a mesh axis of layout plain" in msg
    msg = compile_error(MINIMAL.replace('layout plain {', 'layout plain {\n    mesh tp')
                        .replace('"emb" = embed', '"emb" = embed split vocabulary over tp'))
    assert "split of 'vocabulary', which is not a factor of 'emb'" in msg


def test_fusion_members_must_match_refs():
    text = MINIMAL.replace("norm:  hidden", "norm:  hidden\n    other: hidden").replace(
        '"norm" = norm', '"norm" = norm, other as [norm a] hidden')
    assert "the concatenation lists norm, a but the rule fuses norm, other" in compile_error(text)


def test_unknown_tensor_reference():
    msg = compile_error(MINIMAL.replace('"norm" = norm', '"norm" = normal'))
    assert "unknown tensor normal" in msg


def test_pipelined_layout_needs_a_stage_for_non_layer_tensors():
    text = MINIMAL.replace("layout plain {", "layout plain {\n    mesh pp")
    assert "say which stage holds 'emb'" in compile_error(text)


def test_from_pattern_must_permute_the_same_factors():
    text = MINIMAL.replace('"emb" = embed', '"emb" = embed from vocab hidden as hidden vocab')
    compile_text(text, "t.map")  # a transpose is fine
    bad = MINIMAL.replace('"emb" = embed', '"emb" = embed from vocab hidden as hidden hidden')
    assert "factor hidden appears twice" in compile_error(bad)


ROTARY = """
family rot
config {
    heads: heads
    head_dim: head_dim
    hidden: hidden
}
let two = 2
let half = head_dim / 2
tensors {
    q: (heads head_dim) hidden
}
layout hf {
    "q" = q
}
layout meta {
    "q" = q from (heads two half) hidden as (heads half two) hidden
}
"""


def test_rotary_permutation_with_lets_matches_the_layout_formula():
    import numpy as np
    from mapc.compiler.plan import bind_config, plan_layout
    from mapc.runtime.backends import get_backend
    spec = compile_text(ROTARY, "rot.map")
    nh, hd, H = 3, 8, 5
    plan = plan_layout(spec, "meta", bind_config(spec, {"heads": nh, "head_dim": hd,
                                                        "hidden": H}))
    hf = np.random.default_rng(0).standard_normal((nh * hd, H)).astype(np.float32)
    (inst,) = plan.instances
    meta = inst.recipe.shard(get_backend("numpy"), {"q": hf}, {})
    for h in range(nh):  # HF[h*hd + s*hd/2 + p] = Meta[h*hd + 2p + s]
        for s in range(2):
            for p in range(hd // 2):
                np.testing.assert_array_equal(hf[h * hd + s * hd // 2 + p],
                                              meta[h * hd + 2 * p + s])
    back = inst.recipe.gather(get_backend("numpy"), {(): meta})
    np.testing.assert_array_equal(back["q"], hf)


def test_errors_raised_while_building_the_tree_are_spec_errors():
    msg = compile_error(MINIMAL + "\nfamily other\n")
    assert "exactly one 'family NAME'" in msg and msg.startswith("t.map:")


def test_reference_index_must_be_the_declared_one():
    text = MINIMAL.replace("norm:  hidden", "for layer[i < vocab] {\n        w: hidden\n    }") \
        .replace('"norm" = norm', '"w.{k}" = layer[k].w')
    assert "declared with index 'i'; refer to it as layer[i].w" in compile_error(text)


def test_config_default_may_only_use_symbols_declared_above():
    text = MINIMAL.replace("hidden: hidden_size", "hidden: hidden_size default vocab")
    assert "unknown symbol vocab in default of hidden" in compile_error(text)


def test_unknown_function_and_wrong_arity_are_static_errors():
    text = MINIMAL.replace('layout plain {', 'layout plain {\n    meta {\n        x = roundup(vocab, 2)\n    }')
    assert "unknown function 'roundup'" in compile_error(text)
    text = MINIMAL.replace('layout plain {', 'layout plain {\n    meta {\n        x = round_up(vocab)\n    }')
    assert "round_up() takes 2 arguments, got 1" in compile_error(text)


def test_one_member_concatenation_is_rejected():
    text = MINIMAL.replace('"norm" = norm', '"norm" = norm as [norm: hidden]')
    assert "a concatenation needs at least two members" in compile_error(text)


def test_a_mesh_axis_cutting_twice_is_a_static_error():
    text = MINIMAL.replace('layout plain {', 'layout plain {\n    mesh tp').replace(
        '"emb" = embed', '"emb" = embed as (tp vocab) hidden split hidden over tp')
    assert "a mesh axis cuts this tensor twice" in compile_error(text)
