"""Smoke test for the megatron-core ground-truth harness (tests/groundtruth/mcore_names.py).

Builds a tiny Llama-style GPTModel with the real megatron-core at tp=2, pp=2
(4 gloo worker processes on CPU) and checks the state-dict names and shapes.
"""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("megatron.core")


def _load_harness():
    from tests.groundtruth import mcore_names
    return mcore_names


CFG = {"hidden": 64, "layers": 4, "heads": 4, "groups": 2, "head_dim": 16,
       "ffn": 128, "vocab": 256, "tied": False}


def _layer(i):
    # tp=2: qkv rows (heads + 2*groups) * head_dim / tp = (4+4)*16/2 = 64,
    # proj cols heads*head_dim/tp = 32, fc1 rows 2*ffn/tp = 128, fc2 cols ffn/tp = 64
    p = f"decoder.layers.{i}."
    return {
        p + "input_layernorm.weight": [64],
        p + "self_attention.linear_qkv.weight": [64, 64],
        p + "self_attention.linear_proj.weight": [64, 32],
        p + "pre_mlp_layernorm.weight": [64],
        p + "mlp.linear_fc1.weight": [128, 64],
        p + "mlp.linear_fc2.weight": [64, 64],
    }


@pytest.mark.slow
def test_mcore_llama_names_tp2_pp2():
    res = _load_harness().mcore_state_dict_shapes(CFG, tp=2, pp=2)

    assert sorted(res) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # layer indices are local to the pipeline stage: both stages hold layers 0 and 1
    first = {"embedding.word_embeddings.weight": [128, 64], **_layer(0), **_layer(1)}
    last = {**_layer(0), **_layer(1),
            "decoder.final_layernorm.weight": [64],
            "output_layer.weight": [128, 64]}
    for tp_rank in (0, 1):
        assert res[(tp_rank, 0)] == first
        assert res[(tp_rank, 1)] == last
    assert not any(k.endswith("_extra_state") for shapes in res.values() for k in shapes)
