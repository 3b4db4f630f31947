"""Layers of different kinds (issue #12): `where COND(i) { ... } else { ... }` in a tensor group
declares tensors that exist only at some of the group's indices (DeepSeek-V3's dense first
layers, Qwen3-MoE's mlp_only_layers / decoder_sparse_step, any interleave); a tensor's own `if`
may name the index too; `x in LIST` and `[E for i < N]` let conditions and metadata use config
lists. Pipeline stages number every layer locally whatever its kind. Errors point at the spec
(file:line:col and a caret)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mapc.compiler.plan import bind_config, logical_tensors, plan_layout
from mapc.compiler.program import compile_program
from mapc.compiler.spec import compile_text
from mapc.errors import MapcError, SpecError

SPEC = """
family kinds
config {
    hidden:   hidden_size
    layers:   num_hidden_layers
    experts:  num_experts
    dense:    first_k_dense_replace     default 0
    step:     decoder_sparse_step       default 1
    only:     mlp_only_layers           default []
}
let moe_at_all = experts > 0
tensors {
    embed: hidden
    for layer[i < layers] {
        norm: hidden
        where moe_at_all and i >= dense and (i + 1) % step == 0 and i not in only {
            router: experts hidden
        } else {
            mlp: hidden
        }
        extra: hidden  if i % 2 == 1
    }
}
layout plain {
    meta {
        moe_layer_freq = [1 if i >= dense and (i + 1) % step == 0 and i not in only else 0
                          for i < layers]
    }
    "emb" = embed
    "l.{i}.norm" = layer[i].norm
    "l.{i}.router" = layer[i].router
    "l.{i}.mlp" = layer[i].mlp
    "l.{i}.extra" = layer[i].extra
}
layout piped {
    mesh pp
    pipeline layer[i] as j
    "emb" = embed  on first
    "l.{j}.norm" = layer[i].norm
    "l.{j}.router" = layer[i].router
    "l.{j}.mlp" = layer[i].mlp
    "l.{j}.extra" = layer[i].extra
}
"""

BASE = {"hidden_size": 4, "num_hidden_layers": 6, "num_experts": 2}


def spec(text=SPEC):
    return compile_text(text, "k.map")


def kinds(config, text=SPEC):
    s = spec(text)
    keys = logical_tensors(s, bind_config(s, config))
    return ([k for k in keys if k.startswith("layer.router")],
            [k for k in keys if k.startswith("layer.mlp")])


def idx(keys):
    return [int(re.search(r"\[(\d+)\]", k).group(1)) for k in keys]


@pytest.mark.parametrize("extra, moe", [
    ({}, [0, 1, 2, 3, 4, 5]),
    ({"first_k_dense_replace": 3}, [3, 4, 5]),                  # DeepSeek-V3: dense first
    ({"decoder_sparse_step": 2}, [1, 3, 5]),                    # Qwen3-MoE: every step-th
    ({"mlp_only_layers": [0, 4]}, [1, 2, 3, 5]),                # Qwen3-MoE: listed dense
    ({"decoder_sparse_step": 3, "mlp_only_layers": [5]}, [2]),
    ({"num_experts": 0}, []),                                   # no experts: every layer dense
], ids=["all-moe", "first-k-dense", "sparse-step", "mlp-only", "step-and-only", "no-experts"])
def test_each_layer_has_the_tensors_of_its_kind(extra, moe):
    routers, mlps = kinds(dict(BASE, **extra))
    assert idx(routers) == moe
    assert idx(mlps) == [i for i in range(6) if i not in moe]   # `else`: exactly the others


def test_a_tensors_own_condition_may_name_the_index():
    s = spec()
    keys = logical_tensors(s, bind_config(s, BASE))
    assert idx(k for k in keys if k.startswith("layer.extra")) == [1, 3, 5]


def test_metadata_lists_per_layer():
    s = spec()
    meta = plan_layout(s, "plain", bind_config(s, dict(BASE, first_k_dense_replace=1,
                                                         mlp_only_layers=[4]))).meta()
    assert meta["moe_layer_freq"] == [0, 1, 1, 1, 0, 1]


@pytest.mark.parametrize("pp", [1, 2, 3])
def test_pipeline_stages_number_layers_locally_whatever_their_kind(pp):
    s = spec()
    plan = plan_layout(s, "piped", bind_config(s, dict(BASE, first_k_dense_replace=2)),
                       {"pp": pp})
    per = 6 // pp
    got = {(dict(c)["pp"], n) for _, c, n in plan.placements()}
    want = {(0, "emb")}
    for i in range(6):
        stage, j = divmod(i, per)
        want |= {(stage, f"l.{j}.norm"), (stage, f"l.{j}.router" if i >= 2 else f"l.{j}.mlp")}
        if i % 2:
            want.add((stage, f"l.{j}.extra"))
    assert got == want


def _err(text, config=BASE, layout="plain"):
    with pytest.raises(MapcError) as e:
        s = spec(text)
        plan_layout(s, layout, bind_config(s, config))
    return str(e.value)


@pytest.mark.parametrize("old, new, expected, line", [
    ("where moe_at_all and", "where moe_at_al and",
     r"k\.map:16:9: unknown symbol moe_at_al in layer-kind condition", "where moe_at_al"),
    ("extra: hidden  if i % 2 == 1", "extra: hidden  if j % 2 == 1",
     r"k\.map:21:9: unknown symbol j in condition", "extra: hidden  if j"),
    ("    embed: hidden\n", "    embed: hidden  if i > 0\n",
     r"k\.map:13:5: unknown symbol i in condition", "embed: hidden"),
    ("and i not in only {", "and i not in only\n", r"k\.map:\d+:\d+: unexpected", None),
], ids=["kind-unknown-symbol", "decl-unknown-index", "index-outside-a-group", "no-brace"])
def test_static_errors_point_at_the_spec(old, new, expected, line):
    assert old in SPEC
    with pytest.raises(SpecError) as e:
        spec(SPEC.replace(old, new))
    msg = str(e.value)
    assert re.match(expected, msg), msg
    if line:
        text, caret = [x for x in msg.splitlines() if x.strip()][1:3]
        assert text.strip().startswith(line)
        assert caret.index("^") == text.index(line.split()[0])


@pytest.mark.parametrize("old, new, config, expected", [
    ("where moe_at_all and i >= dense and (i + 1) % step == 0 and i not in only {",
     "where i + 1 {", BASE,
     r"k\.map:16:9: the condition .* is 1 at i=0, not true or false"),
    ("and i not in only {", "and i not in only {", dict(BASE, mlp_only_layers=3),
     r"k\.map:16:9: i in only: only = 3 is not a list"),
    ("and i not in only {", "and i not in only {", dict(BASE, mlp_only_layers=[[1]]),
     r"the model config's 'mlp_only_layers' is a list"),
], ids=["not-a-boolean", "in-a-number", "nested-list"])
def test_errors_when_planned_name_the_condition_and_the_value(old, new, config, expected):
    msg = _err(SPEC.replace(old, new), config)
    assert re.match(expected, msg), msg


def test_a_meta_list_longer_than_the_bound_is_refused():
    text = SPEC.replace("for i < layers]", "for i < layers * 1000000]")
    msg = _err(text, dict(BASE, num_hidden_layers=2))
    assert re.match(r"k\.map:\d+:9: \[.* for i < layers \* 1000000\]: .* is not a count of "
                    r"at most", msg), msg


GOLDEN = Path(__file__).parent / "golden" / "layer_kinds.txt"


def test_layer_kinds_program_matches_golden():
    """The printed programs plain -> piped(pp=2) and back, and the meta, for review."""
    s = spec()
    env = bind_config(s, dict(BASE, num_hidden_layers=4, first_k_dense_replace=1,
                              mlp_only_layers=[2]))
    src, dst = plan_layout(s, "plain", env), plan_layout(s, "piped", env, {"pp": 2})
    text = compile_program(src, dst).pretty() + "\n" + compile_program(dst, src).pretty() + \
        "\n" + json.dumps(src.meta(), sort_keys=True) + "\n"
    if os.environ.get("MAPC_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
