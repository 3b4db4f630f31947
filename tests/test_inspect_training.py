"""`mapc inspect` tells what a resumed run would get: optimizer slots, step, param groups."""
from __future__ import annotations

import importlib.util
import json

import pytest

from mapc.cli.main import main
from tests.conftest import llama_config, write_random_hf

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")


@needs_deepspeed
def test_inspect_shows_deepspeed_training_state(make, capsys):
    ckpt = make("z1")                      # ZeRO 1, fp32, two param groups, trained 3 steps
    expected = json.loads((ckpt / "expected.json").read_text())
    assert main(["inspect", str(ckpt), "--json"]) == 0
    tr = json.loads(capsys.readouterr().out)["training"]
    assert tr["optimizer_slots"] == ["master", "exp_avg", "exp_avg_sq"]
    assert (tr["iteration"], tr["step"]) == (expected["global_step"], float(expected["steps"]))
    assert (tr["zero_stage"], tr["dp_world_size"]) == (1, expected["world_size"])
    # the harness puts 2-D weights (weight decay) in group 0 and the 2L+1 norms in group 1
    layers = expected["model"]["num_hidden_layers"]
    assert [g["params"] for g in tr["param_groups"]] == [7 * layers + 2, 2 * layers + 1]
    assert [g["weight_decay"] for g in tr["param_groups"]] == [expected["weight_decay"], 0.0]
    assert all(g["lr"] == expected["lr"] for g in tr["param_groups"])
    assert main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "optimizer slots: master, exp_avg, exp_avg_sq" in text and "param group 1: " in text


def test_inspect_weights_only_checkpoint_has_no_training_state(tmp_path, capsys):
    hf = write_random_hf(tmp_path / "hf", llama_config())
    assert main(["inspect", str(hf), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"] is None
