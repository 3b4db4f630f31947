"""Tensor-parallel DeepSpeed universal checkpoints (Megatron-DeepSpeed's layout) against
DeepSpeed's own universal code (0.19.8), run in one subprocess
(tests/groundtruth/ds_universal_tp.py):

* DeepSpeed's ``merge_tp_slices`` builds a TP=2 universal checkpoint from shards cut by
  LAYOUTS.md's megatron-core formulas (not by mapc) with random Adam moments; mapc reads every
  rank's weights and moments back bit for bit, and converts it to HF exactly;
* mapc's ``--to universal --tp 2`` output from that checkpoint is DeepSpeed's merge, file for
  file, key for key (cat_dim, param_n_sub_params, vocab_tensor), tensor for tensor;
* DeepSpeed's loader (``load_hp_checkpoint_state``) cuts mapc's output of an HF model into
  exactly the megatron shards at TP=2 and at TP=4;
* broken or inconsistent ones are refused in one line.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mapc import api
from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers import open_source
from mapc.runtime.containers.zero import DEEPSPEED_PICKLES
from tests.conftest import llama_config, write_random_hf

pytest.importorskip("torch")
pytest.importorskip("deepspeed")
from tests.groundtruth import deepspeed_ckpt as ds  # noqa: E402  (its subprocess env)

SCRIPT = Path(__file__).parent / "groundtruth" / "ds_universal_tp.py"
UDIR = "global_step7_universal"
CFG = llama_config(hidden=64, layers=2, heads=8, groups=2, ffn=96, vocab=100)


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    """One DeepSpeed subprocess for the module: its TP=2 universal checkpoint (``ds``) and its
    loader's cut of mapc's hf -> universal --tp 2 output (``ours``) at TP=2 and TP=4."""
    root = tmp_path_factory.mktemp("universal_tp")
    hf = write_random_hf(root / "hf", CFG, seed=3)
    ours = root / "ours"
    api.convert(hf, ours, "universal", tp=2)
    jobs = [{"build": str(root / "ds"), "hf": str(hf), "tp": 2, "seed": 1}] + \
        [{"load": str(ours), "hf": str(hf), "tp": t, "out": str(root / f"load{t}.npz")}
         for t in (2, 4)]
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root / "jobs.json")],
                          capture_output=True, text=True, env=ds._env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result[0]["unmatched"] == []          # every declared pattern matched a tensor
    return {"root": root, "hf": hf, "ours": ours, "ds": root / "ds",
            "shards": dict(np.load(root / "ds" / "shards.npz")),
            "load": {t: dict(np.load(root / f"load{t}.npz")) for t in (2, 4)}}


def _tree(obj):
    """A torchfile-loaded pickle as comparable plain values (tensors: dtype, grad, bytes)."""
    if isinstance(obj, torchfile.TensorRef):
        return ("tensor", obj.dtype, tuple(obj.shape), bool(obj.requires_grad),
                np.asarray(obj.read()).tobytes())
    if isinstance(obj, dict):
        return ("dict", [(k, _tree(v)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_tree(v) for v in obj])
    return obj


def _zero_files(udir: Path) -> dict:
    return {str(p.relative_to(udir)): p for p in (udir / "zero").rglob("*.pt")}


@pytest.mark.parametrize("slot", ["param", "master", "exp_avg", "exp_avg_sq"])
def test_reads_deepspeeds_merge_per_rank(slot, gt):
    """mapc's reader gives each rank's shards, weights and moments, of DeepSpeed's merge."""
    src = open_source(gt["ds"])
    assert src.topology == {"tp": 2, "pp": 1}
    key = {"param": "fp32", "master": "fp32"}.get(slot, slot)
    checked = 0
    for k, want in gt["shards"].items():
        name, rank, what = k.split("|")
        if what != key:
            continue
        got = src.read(name, (("tp", int(rank)), ("pp", 0)), slot=slot)
        assert got.dtype == np.float32 and np.array_equal(got, want), (name, rank, slot)
        checked += 1
    assert checked == 2 * len(src.names((("tp", 0), ("pp", 0))))


def test_deepspeeds_tp_universal_to_hf_is_exact(gt, tmp_path):
    from safetensors.numpy import load_file
    api.convert(gt["ds"], tmp_path / "hf", "hf", config=str(gt["hf"] / "config.json"))
    a = load_file(str(gt["hf"] / "model.safetensors"))
    b = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_writes_what_deepspeeds_merge_writes(gt, tmp_path):
    """From DeepSpeed's TP=2 universal checkpoint, and again after a trip through the
    unsharded (hf-layout) universal format: zero/ is DeepSpeed's, file for file."""
    cfg = str(gt["hf"] / "config.json")
    api.convert(gt["ds"], tmp_path / "tp2", "universal", tp=2, config=cfg)
    api.convert(gt["ds"], tmp_path / "flat", "universal", config=cfg)
    api.convert(tmp_path / "flat", tmp_path / "again", "universal", tp=2)
    want = _zero_files(gt["ds"] / UDIR)
    for out in ("tp2", "again"):
        got = _zero_files(tmp_path / out / UDIR)
        assert sorted(got) == sorted(want)
        for rel, f in want.items():
            a = torchfile.load(f, DEEPSPEED_PICKLES)
            b = torchfile.load(got[rel], DEEPSPEED_PICKLES)
            if rel == "zero/optimizer_state.pt":
                a, b = a["param_groups"], b["param_groups"]
            assert _tree(a) == _tree(b), (out, rel)


def test_model_states_per_rank(gt):
    """Each mp_rank file holds that rank's shards (the megatron formulas') and the info."""
    for rank in range(2):
        ms = torchfile.load(gt["ours"] / "global_step0_universal" /
                            f"mp_rank_{rank:02d}_model_states.pt", DEEPSPEED_PICKLES)
        assert ms["mp_world_size"] == 2
        names = [n for g in ms["param_shapes"] for n in g]
        assert names == list(ms["module"])
        for name in names:
            ref = gt["load"][2][f"{name}|{rank}|ref"]
            assert np.array_equal(ms["module"][name].read(), ref), (rank, name)
        info = ms["universal_checkpoint_info"]
        assert info["original_vocab_size"] == CFG["vocab_size"]
        assert len(info["parameter_with_2_sub_params_cat_dim_0"]) == CFG["num_hidden_layers"]


@pytest.mark.parametrize("tp", [2, 4])
def test_deepspeed_loader_cuts_ours_into_megatron_shards(tp, gt):
    """DeepSpeed's load_hp_checkpoint_state on mapc's TP=2 output, at TP=2 and at TP=4:
    every rank's fp32 slice is the megatron shard; the fresh moments are zeros."""
    got = gt["load"][tp]
    refs = [k for k in got if k.endswith("|ref")]
    assert len(refs) == tp * (3 + 6 * CFG["num_hidden_layers"])
    for k in refs:
        base = k[:-len("|ref")]
        assert np.array_equal(got[base + "|fp32"], got[k]), base
        assert not got[base + "|exp_avg"].any() and not got[base + "|exp_avg_sq"].any()


def test_round_trip_to_hf(gt, tmp_path):
    from safetensors.numpy import load_file
    api.convert(gt["ours"], tmp_path / "hf", "hf")
    a = load_file(str(gt["hf"] / "model.safetensors"))
    b = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---- refusals ------------------------------------------------------------------------------------
def _copy(gt, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(gt["ds"], dst, ignore=shutil.ignore_patterns("shards.npz"))
    return dst


def test_no_family_is_refused(gt, tmp_path):
    with pytest.raises(MapcError, match=r"tensor-parallel universal checkpoint \(mp_world_size "
                                        r"2\).*only the model family's spec.*--config"):
        api.convert(gt["ds"], tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


def test_generic_to_tp_universal_is_refused(tmp_path):
    src = write_random_hf(tmp_path / "hf", CFG)
    with pytest.raises(MapcError, match="generic mode.*needs the model's family"):
        api.convert(src, tmp_path / "out", "universal", tp=2,
                    spec=str(Path(api.__file__).parents[1] / "specs" / "generic.map"))


def test_inconsistent_info_is_refused(gt, tmp_path):
    """A row-parallel tensor (by universal_checkpoint_info) whose file says cat_dim 0."""
    d = _copy(gt, tmp_path)
    f = d / UDIR / "zero" / "decoder.layers.0.self_attention.linear_proj.weight" / "exp_avg.pt"
    arr = np.array(torchfile.load(f, DEEPSPEED_PICKLES)["param"].read())
    f.unlink()
    with torchfile.TorchWriter(f) as w:
        w.finish({"cat_dim": 0, "param": w.add_tensor(arr)})
    with pytest.raises(MapcError, match=r"lists decoder\.layers\.0\.self_attention\.linear_proj"
                                        r"\.weight in parameter_with_row_parallelism_patterns, "
                                        r"but the file has cat_dim=0"):
        api.convert(d, tmp_path / "out", "universal", config=str(gt["hf"] / "config.json"))
    assert not (tmp_path / "out").exists()


def test_missing_rank_file_is_refused(gt, tmp_path):
    d = _copy(gt, tmp_path)
    (d / UDIR / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(MapcError, match=r"mp_rank_01_model_states\.pt is missing "
                                        r"\(mp_world_size is 2\)"):
        open_source(d)




# ---- the rules, read off recipes -------------------------------------------------------------------
TOY = """
family toy
config {
    hidden: hidden_size
    ffn:    intermediate_size
    vocab:  vocab_size
}
tensors {
    embed: vocab hidden
    norm:  hidden
    a:     ffn hidden
    b:     ffn hidden
    c:     ffn hidden
    down:  hidden ffn
}
layout hf {
    "embed" = embed
    "norm" = norm
    "a" = a
    "b" = b
    "c" = c
    "down" = down
}
layout megatron {
    mesh tp
    "embed" = embed  pad vocab to multiple of 8 * tp  split vocab over tp
    "norm" = norm
    "ab" = a, b  as ([a b] ffn) hidden  split ffn over tp
    "c" = c  split ffn over tp
    "down" = down  split ffn over tp
}
"""


@pytest.mark.parametrize("name,kind,dim", [("embed", "vocab", 0), ("norm", "replicated", 0),
                                           ("ab", "sub2", 0), ("c", "cat", 0),
                                           ("down", "cat", 1)])
def test_rule_of_recipe(name, kind, dim):
    from mapc.compiler.plan import bind_config, plan_layout
    from mapc.compiler.spec import compile_text
    from mapc.runtime.containers.universal_tp import rule_of
    sp = compile_text(TOY, "toy.map")
    env = bind_config(sp, {"hidden_size": 4, "intermediate_size": 6, "vocab_size": 10})
    plan = plan_layout(sp, "megatron", env, {"tp": 2})
    inst = next(i for i, _, n in plan.placements() if n == name)
    rule = rule_of(inst, name)
    assert (rule.kind, rule.dim) == (kind, dim)
    if kind == "vocab":
        assert rule.rows == 10


def test_rule_of_three_blocks_is_refused():
    from mapc.compiler.plan import bind_config, plan_layout
    from mapc.compiler.spec import compile_text
    from mapc.runtime.containers.universal_tp import rule_of
    text = TOY.replace('"ab" = a, b  as ([a b] ffn) hidden  split ffn over tp\n'
                       '    "c" = c  split ffn over tp',
                       '"abc" = a, b, c  as ([a b c] ffn) hidden  split ffn over tp')
    sp = compile_text(text, "toy.map")
    env = bind_config(sp, {"hidden_size": 4, "intermediate_size": 6, "vocab_size": 10})
    plan = plan_layout(sp, "megatron", env, {"tp": 2})
    inst = next(i for i, _, n in plan.placements() if n == "abc")
    with pytest.raises(MapcError, match=r"abc \(layout megatron\) cannot be described in a "
                                        r"universal checkpoint: its tp split sits inside 3 "
                                        r"blocks of axis 0"):
        rule_of(inst, "abc")
