"""Golden files of printed programs: a change in what a spec compiles to shows up in review.
Regenerate with MAPC_UPDATE_GOLDEN=1 after checking the difference is intended."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import mapc
from tests.conftest import llama_config

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "llama_megatron_tp2_pp2": dict(layout="megatron", tp=2, pp=2,
                                   config=llama_config(hidden=64, layers=4, heads=8, groups=2,
                                                       vocab=100)),
    "llama_megatron_te_tied_tp1_pp2": dict(layout="megatron", tp=1, pp=2, set=["naming=te"],
                                           config=llama_config(hidden=32, layers=2, heads=4,
                                                               groups=4, vocab=50, tied=True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_printed_program_matches_golden(name):
    text = mapc.compile_spec("llama", **CASES[name]).pretty() + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("MAPC_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
