"""Pipeline- and tensor-parallel DeepSpeed universal checkpoints (Megatron-DeepSpeed's
GPTModelPipe names) against DeepSpeed itself (0.19.8):

* DeepSpeed's PipelineEngine trains (lr 0, Adam moments set by DeepSpeed's API) a
  GPTModelPipe-shaped Llama at TP=2 x PP=2 whose parameters are TP shards of an HF model
  (tests/groundtruth/mds_pipe.py), and DeepSpeed's own ``ds_to_universal`` converts it;
* mapc reads that universal checkpoint: every (tp, pp) rank's weights and moments equal what the
  rank's engine held (DeepSpeed's safe_get_full_* API), and its HF export is the HF model the
  run started from, bit for bit;
* mapc's ``--to universal --tp 2 --pp 2`` from it is DeepSpeed's output file for file (zero/ and
  every rank's param_shapes), and from the HF model its fp32 weights are DeepSpeed's;
* a real PipelineEngine loads mapc's output with ``"checkpoint": {"load_universal": true}``:
  every rank's fp32 master, live weights and Adam moments equal the original run's;
* broken ones are refused in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mapc import api
from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers import open_source
from mapc.runtime.containers.zero import DEEPSPEED_PICKLES
from tests.conftest import llama_config, write_random_hf
from tests.test_universal_tp import _tree

pytest.importorskip("torch")
pytest.importorskip("deepspeed")
from tests.groundtruth import deepspeed_ckpt as dc  # noqa: E402  (its subprocess env)

SCRIPT = Path(__file__).parent / "groundtruth" / "mds_pipe.py"
CFG = llama_config(hidden=64, layers=4, heads=8, groups=2, ffn=96, vocab=100)
TP, PP = 2, 2
UDIR = "global_step1_universal"


def _torchrun_cmd(args: list, nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={dc._free_port()}",
            str(SCRIPT)] + args


def _ds_to_universal(ck: Path) -> None:
    dc._run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(ck / "global_step1"), "--output_folder", str(ck / UDIR),
             "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
            ck.parent / "universal.log", dc.TIMEOUT_S)


@pytest.fixture(scope="module")
def gt(ds_root, tmp_path_factory):
    """DeepSpeed's run and ds_to_universal's conversion of it (kept under MAPC_DS_CACHE when
    set), mapc's --to universal --tp 2 --pp 2 of it (``ours``) and of the HF model
    (``ours_hf``), and DeepSpeed's engine loading ``ours``: in the training processes
    (``--then-load``: one torch and DeepSpeed start-up), or on their own for a cached run."""
    root = tmp_path_factory.mktemp("universal_pp")
    run = Path(ds_root) / f"mds_pipe_tp{TP}pp{PP}"
    load = {"load": str(root / "ours"), "out": str(root / "load")}
    if (run / "ck" / UDIR / "zero").is_dir():
        api.convert(run / "ck" / UDIR, root / "ours", "universal", tp=TP, pp=PP,
                    config=str(run / "hf" / "config.json"))
        dc._run(_torchrun_cmd(["--hf", str(run / "hf"), "--out", load["out"], "--tp", str(TP),
                               "--pp", str(PP), "--load", load["load"]], TP * PP),
                root / "load.log", dc.TIMEOUT_S)
    else:
        tmp = Path(ds_root) / f".mds_pipe.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        hf = write_random_hf(tmp / "hf", CFG, seed=3)
        flag = root / "load.json"
        log = tmp / "train.log"
        for attempt in range(3):          # a free port taken by another job: try another
            with open(log, "w") as fh:
                proc = subprocess.Popen(
                    _torchrun_cmd(["--hf", str(hf), "--out", str(tmp / "ck"), "--tp", str(TP),
                                   "--pp", str(PP), "--then-load", str(flag)], TP * PP),
                    stdout=fh, stderr=subprocess.STDOUT, env=dc._env(),
                    cwd=str(Path(__file__).parent.parent), start_new_session=True)
            deadline = time.time() + dc.TIMEOUT_S
            while not (tmp / "ck" / "expected.json").is_file() and proc.poll() is None \
                    and time.time() < deadline:
                time.sleep(0.2)
            if proc.poll() is None or attempt == 2 or \
                    "address already in use" not in log.read_text().lower():
                break
            shutil.rmtree(tmp / "ck", ignore_errors=True)
        try:
            assert (tmp / "ck" / "expected.json").is_file(), log.read_text()[-3000:]
            _ds_to_universal(tmp / "ck")
            api.convert(tmp / "ck" / UDIR, root / "ours", "universal", tp=TP, pp=PP,
                        config=str(hf / "config.json"))
            (root / "load.tmp").write_text(json.dumps(load))
            (root / "load.tmp").rename(flag)
            assert proc.wait(timeout=dc.TIMEOUT_S) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:           # torchrun and its workers: their own group
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.move(str(tmp), str(run))
    hf, ds = run / "hf", run / "ck" / UDIR
    api.convert(hf, root / "ours_hf", "universal", tp=TP, pp=PP)
    expected = json.loads((run / "ck" / "expected.json").read_text())
    return {"run": run, "hf": hf, "ds": ds, "cfg": str(hf / "config.json"),
            "ours": root / "ours" / UDIR,
            "ours_hf": root / "ours_hf" / "global_step0_universal", "load": root / "load",
            "expected": expected,
            "state": [dict(np.load(run / "ck" / f"state.rank{r['rank']}.npz"))
                      for r in expected["ranks"]]}



def _load(path: Path):
    return torchfile.load(path, DEEPSPEED_PICKLES)


def test_reads_every_pipeline_and_tensor_rank(gt):
    """Each (tp, pp) rank's names, weights and moments are what that rank's engine held."""
    src = open_source(gt["ds"])
    assert src.topology == {"tp": TP, "pp": PP} and src.layout == "megatron_pipe"
    checked = 0
    for r, state in zip(gt["expected"]["ranks"], gt["state"]):
        coord = (("tp", r["tp"]), ("pp", r["pp"]))
        assert src.names(coord) == r["names"]
        for name in r["names"]:
            for slot, key in (("param", "fp32"), ("master", "fp32"), ("exp_avg", "exp_avg"),
                              ("exp_avg_sq", "exp_avg_sq")):
                got = src.read(name, coord, slot=slot)
                assert got.dtype == np.float32 and np.array_equal(got, state[f"{name}|{key}"]), \
                    (r, name, slot)
                checked += 1
    assert checked == 4 * TP * (2 + 6 * CFG["num_hidden_layers"] + 1)


def test_deepspeeds_pipeline_universal_to_hf_is_the_start_model(gt, tmp_path):
    from safetensors.numpy import load_file
    api.convert(gt["ds"], tmp_path / "hf", "hf", config=gt["cfg"])
    a = load_file(str(gt["hf"] / "model.safetensors"))
    b = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_writes_what_ds_to_universal_writes(gt):
    """zero/ file for file, key for key, tensor for tensor; every rank's model states list the
    same parameters in the same groups and order, with DeepSpeed's parallel dimensions."""
    want = {str(p.relative_to(gt["ds"])): p for p in (gt["ds"] / "zero").rglob("*.pt")}
    got = {str(p.relative_to(gt["ours"])): p for p in (gt["ours"] / "zero").rglob("*.pt")}
    assert sorted(got) == sorted(want)
    for rel, f in want.items():
        a, b = _load(f), _load(got[rel])
        if rel == "zero/optimizer_state.pt":
            a, b = a["param_groups"], b["param_groups"]
        assert _tree(a) == _tree(b), rel
    for m in range(TP * PP):
        a = _load(gt["ds"] / f"mp_rank_{m:02d}_model_states.pt")
        b = _load(gt["ours"] / f"mp_rank_{m:02d}_model_states.pt")
        assert _tree(b["param_shapes"]) == _tree(a["param_shapes"]), m
        for key in ("module", "mp_world_size", "checkpoint_parallel_dimensions"):
            assert b[key] == a[key], (m, key)


def test_writes_deepspeeds_fp32_weights_from_hf(gt):
    """From the HF model (lr 0 kept the run's weights the HF ones): every fp32.pt is
    DeepSpeed's; the moments are fresh zeros."""
    for f in (gt["ds"] / "zero").rglob("fp32.pt"):
        rel = f.relative_to(gt["ds"])
        assert _tree(_load(gt["ours_hf"] / rel)) == _tree(_load(f)), rel
        m = _load(gt["ours_hf"] / rel.parent / "exp_avg.pt")["param"].read()
        assert not np.asarray(m).any()
    for m in range(TP * PP):
        a = _load(gt["ds"] / f"mp_rank_{m:02d}_model_states.pt")
        b = _load(gt["ours_hf"] / f"mp_rank_{m:02d}_model_states.pt")
        assert _tree(b["param_shapes"]) == _tree(a["param_shapes"]), m


def test_deepspeed_engine_loads_ours_on_every_rank(gt):
    """DeepSpeed's PipelineEngine with load_universal on mapc's TP=2 x PP=2 output: every
    rank's fp32 master, live weights and Adam moments equal the original run's."""
    checked = 0
    for r, state in zip(gt["expected"]["ranks"], gt["state"]):
        got = dict(np.load(gt["load"] / f"load.rank{r['rank']}.npz"))
        for name in r["names"]:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                assert np.array_equal(got[f"{name}|{key}"], state[f"{name}|{key}"]), (r, name)
            assert np.array_equal(got[f"{name}|weight"], got[f"{name}|ref"]), (r, name)
            checked += 1
    assert checked == TP * (2 + 6 * CFG["num_hidden_layers"] + 1)


def test_round_trip_to_hf(gt, tmp_path):
    from safetensors.numpy import load_file
    api.convert(gt["ours_hf"].parent, tmp_path / "hf", "hf")
    a = load_file(str(gt["hf"] / "model.safetensors"))
    b = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---- refusals ------------------------------------------------------------------------------------
def _copy(gt, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(gt["ds"], dst)
    return dst


def test_no_family_is_refused(gt, tmp_path):
    with pytest.raises(MapcError, match=r"model-parallel universal checkpoint \(tp 2, pp 2\)"
                                        r".*only the model family's spec.*--config"):
        api.convert(gt["ds"], tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


def test_missing_stage_file_is_refused(gt, tmp_path):
    d = _copy(gt, tmp_path)
    (d / "mp_rank_03_model_states.pt").unlink()
    with pytest.raises(MapcError, match=r"mp_rank_03_model_states\.pt is missing "
                                        r"\(mp_world_size is 4\)"):
        open_source(d)


def test_parallel_dimensions_that_do_not_fit_are_refused(gt, tmp_path):
    d = _copy(gt, tmp_path)
    import torch
    f = d / "mp_rank_00_model_states.pt"
    raw = torch.load(f, weights_only=False)
    raw["checkpoint_parallel_dimensions"] = {"pp_degree": 3, "tp_degree": 2}
    torch.save(raw, f)
    with pytest.raises(MapcError, match=r"checkpoint_parallel_dimensions .* do not describe "
                                        r"mp_world_size 4"):
        open_source(d)


TOY = """
family toy
config {
    hidden: hidden_size
}
tensors {
    norm: hidden
}
layout hf {
    "norm" = norm
}
"""


def test_pipeline_target_of_a_family_without_pipeline_names_is_refused(tmp_path):
    """--pp needs the family's megatron_pipe layout (DeepSpeed pipeline names)."""
    from safetensors.numpy import save_file
    (tmp_path / "toy.map").write_text(TOY)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"hidden_size": 4}))
    save_file({"norm": np.ones(4, np.float32)}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(MapcError, match=r"spec toy .* has no layout 'megatron_pipe'"):
        api.convert(tmp_path / "hf", tmp_path / "out", "universal", tp=2, pp=2,
                    spec=str(tmp_path / "toy.map"))
    assert not (tmp_path / "out").exists()
