"""Uneven pipeline stages (issue #12): `pipeline layer[i] as j  first N  last M` in a layout,
set for a megatron target by --pp-first-stage / --pp-last-stage (WriteRequest options the
HONOURS table gives to megatron only) and read back from a checkpoint's args. Checked against
megatron-core itself: its get_transformer_layer_offset for many splits (in process, cheap); a
world of real GPTModels with an uneven split (state-dict names and shapes per rank, and which
global layer each local layer is, against the values mapc wrote) runs once, shared with the
MoE check, in tests/test_qwen3_moe.py."""
from __future__ import annotations

import json
import types

import pytest

import mapc
from mapc.errors import MapcError
from mapc.runtime import torchfile
from tests.conftest import build_transformers_model, llama_config, logits_of

TOKENS = [1, 5, 9, 3, 7, 2, 8, 4]
CFG = llama_config(hidden=32, layers=5, heads=4, groups=2, ffn=48, vocab=50)
FIRST, LAST, PP = 2, None, 2       # 2 | 3 layers: the first stage uneven, the last the rest


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("uneven") / "hf"
    model = build_transformers_model(CFG, path)
    return path, logits_of(model, TOKENS)


@pytest.fixture(scope="module")
def uneven(hf, tmp_path_factory):
    dst = tmp_path_factory.mktemp("uneven") / "mg"
    mapc.convert(hf[0], dst, to="megatron", pp=PP, pp_first_stage=FIRST)
    return dst


def _stage_file(root, p):
    return root / "release" / f"mp_rank_00_{p:03d}" / "model_optim_rng.pt"


def mapc_stages(layers, pp, first, last):
    """Global layer numbers per stage of mapc's megatron layout for this split."""
    sets = [f"first_stage_layers={first or 0}", f"last_stage_layers={last or 0}"]
    prog = mapc.compile_spec("llama", layout="megatron", pp=pp, set=sets,
                             config=llama_config(hidden=32, layers=layers, heads=4, groups=2,
                                                 ffn=48, vocab=50))
    out = [[] for _ in range(pp)]
    for inst, coord, name in prog.target.placements():
        if name.endswith("self_attention.linear_proj.weight"):
            out[dict(coord)["pp"]].append((int(name.split(".")[2]), inst.index))
    return [[g for _, g in sorted(s)] for s in out]


@pytest.mark.parametrize("layers, pp, first, last", [
    (5, 3, 1, 2), (7, 3, 3, None), (7, 3, None, 1), (6, 2, 4, None), (6, 2, 1, 5),
    (10, 4, 1, 3), (8, 4, None, None),
])
def test_layer_offsets_are_megatron_cores(layers, pp, first, last):
    """megatron-core's own get_transformer_layer_offset, called per pp rank, gives each stage's
    first global layer; mapc places the same layers there, in order."""
    tl = pytest.importorskip("megatron.core.transformer.transformer_layer")
    config = types.SimpleNamespace(
        num_layers=layers, pipeline_model_parallel_size=pp, pipeline_model_parallel_layout=None,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        virtual_pipeline_model_parallel_size=None, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False)
    offsets = [tl.get_transformer_layer_offset(config, None, r) for r in range(pp)]
    ours = mapc_stages(layers, pp, first, last)
    assert [s[0] for s in ours] == offsets
    assert [g for s in ours for g in s] == list(range(layers))


def test_args_state_the_stages_and_the_checkpoint_reads_back(hf, uneven, tmp_path):
    import torch
    args = torchfile.load(_stage_file(uneven, 0))["args"]
    assert (args.decoder_first_pipeline_num_layers, args.num_layers_in_first_pipeline_stage) \
        == (FIRST, FIRST)
    assert not hasattr(args, "decoder_last_pipeline_num_layers")      # unstated: even
    # without mapc's record: the stage sizes come from the args alone
    plain = tmp_path / "plain"
    import shutil
    shutil.copytree(uneven, plain)
    (plain / "mapc.json").unlink()
    assert mapc.inspect(plain)["params"]["first_stage_layers"] == FIRST
    mapc.convert(plain, tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), hf[1])
    # uneven -> even keeps every tensor
    mapc.convert(uneven, tmp_path / "even", to="megatron", pp=1)
    assert mapc.verify(hf[0], tmp_path / "even").identical


@pytest.mark.parametrize("kwargs, message", [
    (dict(to="hf", pp_first_stage=2), r"--to hf does not take --pp-first-stage 2"),
    (dict(to="megatron", pp=3, pp_first_stage=2),
     r"specs/llama\.map:\d+:5: uneven pipeline \(first stage 2\) cannot place the 5 entries "
     r"of layer on pp=3 stages"),
    (dict(to="megatron", pp=1, pp_last_stage=5), r"uneven pipeline \(last stage 5\)"),
    (dict(to="megatron", pp=2, pp_first_stage=0), r"--pp-first-stage 0 must be a positive"),
    (dict(to="megatron", pp=2, vpp=2, pp_first_stage=1),     # megatron-core's rule too
     r"uneven pipeline \(first stage 1\) with vpp=2 virtual stages per rank: first stage "
     r"\(1 layers\) not divisible by vpp=2"),
], ids=["not-honoured", "middle-not-even", "pp1", "zero", "with-vpp"])
def test_bad_stage_requests_are_refused_before_writing(hf, tmp_path, kwargs, message):
    with pytest.raises(MapcError) as e:
        mapc.convert(hf[0], tmp_path / "out", **kwargs)
    import re
    assert re.search(message, str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_takes_the_stage_options(hf, tmp_path):
    from mapc.cli.main import main
    assert main(["convert", str(hf[0]), str(tmp_path / "mg"), "--to", "megatron", "--pp", "2",
                 "--pp-last-stage", "1", "--quiet"]) == 0
    record = json.loads((tmp_path / "mg" / "mapc.json").read_text())
    assert record["params"]["last_stage_layers"] == 1
    assert sorted(torchfile.load(_stage_file(tmp_path / "mg", 1))["model"])[0].startswith(
        "decoder.final_layernorm")
