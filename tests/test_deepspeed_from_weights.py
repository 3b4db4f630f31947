"""Plain weights (an HF export) into a DeepSpeed checkpoint that a real engine loads right.

DeepSpeed does not check the order of a ZeRO flat partition when it loads one: it cuts the flat
fp32 master by its own model's ``named_parameters()`` order. So the order mapc writes for a
source whose optimizer does not give one (weights only, or another layout) must be that one,
or the engine silently trains scrambled master weights. The oracle is the engine itself: it
loads mapc's checkpoint natively, takes no step, and gathers its fp32 master weights with its
own API; they must equal the weights converted, bit for bit.
"""
from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)

from safetensors.numpy import load_file  # noqa: E402

import mapc  # noqa: E402
from tests.groundtruth import deepspeed_ckpt as ds  # noqa: E402

pytestmark = pytest.mark.slow


def _loaded_master(ckpt, like, **kw):
    run = ds.resume_and_step(ckpt, 2, universal=False, steps=0, like=like, **kw)
    return ds.load_state(run["dir"], "fp32")


def test_fresh_optimizer_from_hf_weights_loads_in_named_parameters_order(make, tmp_path):
    src = make("z3")                       # ODD model, one param group
    hf = tmp_path / "hf"
    mapc.convert(src, hf, to="hf")         # fp32 master weights, no optimizer state
    out = tmp_path / "ds"
    report = mapc.convert(hf, out, to="deepspeed", dp=2)
    assert any("fresh optimizer" in w for w in report.warnings)
    master = _loaded_master(out, like=src, stage=1)      # the engine: stage 1, fp32, 1 group
    weights = load_file(str(hf / "model.safetensors"))
    assert master.keys() == weights.keys()
    for name, w in weights.items():
        assert (master[name] == w).all(), name


def test_like_template_gives_param_groups_and_order(make, tmp_path):
    src = make("z1")                       # two param groups: 2-D weights, then norms
    hf = tmp_path / "hf"
    mapc.convert(src, hf, to="hf")
    out = tmp_path / "ds"
    mapc.convert(hf, out, like=src)        # a template of the same run: its groups and dp
    info = mapc.inspect(out)
    assert [g["params"] for g in info["training"]["param_groups"]] == [16, 5]
    assert info["training"]["dp_world_size"] == 2
    master = _loaded_master(out, like=src)
    weights = load_file(str(hf / "model.safetensors"))
    for name, w in weights.items():
        assert (master[name] == w).all(), name


# ---- tied embeddings: the module lists lm_head.weight as the embedding ---------------------------
def test_tied_hf_weights_load_into_a_real_engine(make, tmp_path):
    """DeepSpeed loads a module strictly: without the tied alias lm_head.weight it refuses."""
    src = make("z1tied")
    hf = tmp_path / "hf"
    mapc.convert(src, hf, to="hf")
    weights = load_file(str(hf / "model.safetensors"))
    assert "lm_head.weight" not in weights            # transformers stores tied weights once
    out = tmp_path / "ds"
    mapc.convert(hf, out, to="deepspeed", dp=3)
    run = ds.resume_and_step(out, 3, universal=False, steps=0, like=src)
    master = ds.load_state(run["dir"], "fp32")
    assert master.keys() == weights.keys()
    assert all((master[n] == w).all() for n, w in weights.items())


# ---- --zero-stage: the ZeRO stage of a target built from weights -------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_option_writes_that_stage(stage, tmp_path):
    from tests.conftest import llama_config, write_random_hf
    hf = write_random_hf(tmp_path / "hf", llama_config(hidden=24, layers=2, heads=4, groups=2,
                                                       ffn=40, vocab=37))
    out = tmp_path / "ds"
    mapc.convert(hf, out, to="deepspeed", dp=2, zero_stage=stage)
    tag = out / "global_step0"
    model_file = "zero_pp_rank_1_mp_rank_00_model_states.pt" if stage == 3 \
        else "mp_rank_00_model_states.pt"
    assert (tag / model_file).is_file()
    assert mapc.inspect(out)["training"]["zero_stage"] == stage
    assert mapc.verify(hf, out).identical


def test_zero_stage_must_be_a_stage(tmp_path):
    from tests.conftest import llama_config, write_random_hf
    hf = write_random_hf(tmp_path / "hf", llama_config())
    with pytest.raises(mapc.MapcError, match="not a ZeRO stage"):
        mapc.convert(hf, tmp_path / "ds", to="deepspeed", zero_stage=4)
    assert not (tmp_path / "ds").exists()


def test_zero_stage_option_reaches_the_universal_writer(tmp_path):
    from tests.conftest import llama_config, write_random_hf
    hf = write_random_hf(tmp_path / "hf", llama_config(hidden=24, layers=2, heads=4, groups=2,
                                                       ffn=40, vocab=37))
    out = tmp_path / "univ"
    mapc.convert(hf, out, to="universal", dp=2, zero_stage=3)
    udir = out / (out / "latest_universal").read_text().strip()
    assert sorted(p.name for p in udir.glob("*model_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert mapc.inspect(out)["training"]["zero_stage"] == 3
    assert mapc.verify(hf, out).identical
