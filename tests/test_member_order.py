"""A fusion's members sit in the order its concatenation lists them, whatever order the rule
names them after '=' (issue #12: `= gate, up as ([up gate] ffn) hidden` once put gate first,
silently). Checked against the Megatron fc1 layout built independently here with numpy:
rank r holds cat(first_r, second_r), each an F/tp block of rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mapc
from mapc.runtime import torchfile
from tests.conftest import llama_config, write_random_hf

LLAMA = (Path(__file__).parent.parent / "specs" / "llama.map").read_text()
SHIPPED_FC1 = ('"decoder.layers.{j}.mlp.linear_fc1.weight" = layer[i].gate, layer[i].up\n'
               '        as ([gate up] ffn) hidden')
# (refs after '=', concatenation) -> which HF tensor comes first in each rank's block
VARIANTS = {
    "listed-as-concat": ("layer[i].gate, layer[i].up", "[gate up]", ("gate", "up")),
    "listed-reversed": ("layer[i].up, layer[i].gate", "[gate up]", ("gate", "up")),
    "concat-up-first": ("layer[i].gate, layer[i].up", "[up gate]", ("up", "gate")),
}
TP = 2


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("order") / "hf"
    write_random_hf(path, llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=50))
    return path, load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fc1_rows_follow_the_concatenation_not_the_ref_list(tmp_path, hf, variant):
    refs, concat, (first, second) = VARIANTS[variant]
    text = LLAMA.replace(SHIPPED_FC1, f'"decoder.layers.{{j}}.mlp.linear_fc1.weight" = {refs}\n'
                                      f'        as ({concat} ffn) hidden')
    assert text != LLAMA or variant == "listed-as-concat"
    spec = tmp_path / "variant.map"
    spec.write_text(text)
    src, weights = hf
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=TP, spec=spec)
    f = 48 // TP
    for r in range(TP):
        got = torchfile.load(tmp_path / "mg" / "release" / f"mp_rank_{r:02d}" /
                             "model_optim_rng.pt")["model"]
        for i in range(2):
            a = weights[f"model.layers.{i}.mlp.{first}_proj.weight"][r * f:(r + 1) * f]
            b = weights[f"model.layers.{i}.mlp.{second}_proj.weight"][r * f:(r + 1) * f]
            np.testing.assert_array_equal(
                np.asarray(got[f"decoder.layers.{i}.mlp.linear_fc1.weight"]),
                np.concatenate([a, b]))


def test_printed_recipe_keeps_the_pattern_order(tmp_path):
    text = LLAMA.replace(SHIPPED_FC1, '"decoder.layers.{j}.mlp.linear_fc1.weight" = '
                                      'layer[i].gate, layer[i].up\n        as ([up gate] ffn) hidden')
    spec = tmp_path / "variant.map"
    spec.write_text(text)
    printed = mapc.compile_spec(spec, layout="megatron", tp=2,
                                config=llama_config(hidden=32, layers=2, heads=4, groups=2,
                                                    ffn=48, vocab=50)).pretty()
    line = next(x for x in printed.splitlines() if "linear_fc1.weight:" in x)
    assert "([up:1 gate:1] tp=2 ffn=24/48)" in line
