"""`alias NAME = TENSOR if COND`: tied weights that a framework's module lists under two names.

transformers' tied models (``tie_word_embeddings``) keep ``lm_head.weight`` in their
``state_dict`` as the embedding itself, and DeepSpeed stores that state dict as its ``module``
with ``shared_params = {alias: name}``; a DeepSpeed engine refuses to load a module that lacks
the alias. The files of a layout never store an alias: only containers that record module
aliases (deepspeed, universal) use them.
"""
from __future__ import annotations

import pytest

import mapc
from mapc.compiler.spec import compile_text
from mapc.errors import MapcError, SpecError
from mapc.compiler.plan import bind_config, plan_layout
from tests.conftest import llama_config

TINY = """
family tiny
config {
    hidden: hidden_size
    vocab:  vocab_size
    tied:   tie_word_embeddings default false
}
tensors {
    embed: vocab hidden
    head:  vocab hidden  if not tied
    norm:  hidden
}
layout plain {
    "emb" = embed
    "norm" = norm
    "head" = head
    ALIAS
}
"""


def _spec(alias: str):
    return compile_text(TINY.replace("ALIAS", alias), "t.map")


def _error(alias: str) -> str:
    with pytest.raises(SpecError) as e:
        _spec(alias)
    return str(e.value)


@pytest.mark.parametrize("tied,expected", [(True, {"head": "emb"}), (False, {})])
def test_alias_is_planned_only_when_its_condition_holds(tied, expected):
    sp = _spec('alias "head" = embed if tied')
    env = bind_config(sp, {"hidden_size": 4, "vocab_size": 8, "tie_word_embeddings": tied})
    assert plan_layout(sp, "plain", env).aliases == expected


def test_alias_of_an_undeclared_tensor_is_an_error_with_its_location():
    msg = _error('alias "head" = embedding if tied')
    assert msg.startswith("t.map:17:5:") and "embedding" in msg and "does not declare" in msg


def test_alias_with_placeholders_is_an_error():
    assert "no placeholders" in _error('alias "head.{tied}" = embed if tied')


def test_alias_that_is_also_stored_is_an_error():
    sp = _spec('alias "head" = embed')            # no condition: clashes when untied
    env = bind_config(sp, {"hidden_size": 4, "vocab_size": 8})
    with pytest.raises(MapcError, match="also a stored tensor"):
        plan_layout(sp, "plain", env)


@pytest.mark.parametrize("family,cfg,alias", [
    ("llama", llama_config(tied=True), {"lm_head.weight": "model.embed_tokens.weight"}),
    ("llama", llama_config(tied=False), {}),
])
def test_shipped_specs_declare_tied_lm_head(family, cfg, alias):
    program = mapc.compile_spec(family, layout="hf", config=cfg)
    assert program.target.aliases == alias
