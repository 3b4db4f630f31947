"""The write protocol (runtime/plan_write.py): every format plans its output purely, then an
I/O-only writer executes the plan.

* golden WritePlans (text), planned from hand-made SourceFacts without any file: a change in
  what a format decides or writes shows up in review (regenerate with MAPC_UPDATE_GOLDEN=1
  after checking the difference is intended);
* every file a real conversion writes is listed in its WritePlan, and nothing else;
* an option the target format does not honour is refused with one line;
* ``--dry-run`` and the real run agree (they take the same path).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import mapc
from mapc.api import plan_convert, write_conversion
from mapc.cli.main import main
from mapc.errors import MapcError
from mapc.runtime.containers import make_writer, plan_write
from mapc.runtime.plan_write import SourceFacts, WriteRequest
from tests.conftest import llama_config, write_random_hf

GOLDEN = Path(__file__).parent / "golden"
CFG = llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=50)


def _facts(program, *, dtype="float32", slots=("param",), training=None, fmt="hf",
           zero=None):
    """SourceFacts as a source would report them, without a file."""
    keys = list(program.source.logical)
    dtypes = {s: {k: (dtype if s == "param" else "float32") for k in keys}
              for s in slots if s in ("param", "master")}
    names = tuple(n for _, _, n in program.source.placements())
    return SourceFacts(path="SRC", format=fmt, slots=tuple(slots), training=training or {},
                       names=names, dtypes=dtypes, zero=zero)


TRAINED = dict(slots=("param", "master", "exp_avg", "exp_avg_sq"), dtype="bfloat16")
DS_GROUPS = [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}]
DS_TRAINING = {"iteration": 12, "step": 12.0, "zero_stage": 1, "dp_world_size": 2,
               "ds_config": {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                             "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
                             "zero_optimization": {"stage": 1}},
               "clip_grad": 1.0, "loss_scale": 1.0}

# name -> (compile_spec arguments, facts arguments, request arguments)
CASES = {
    "hf_from_hf": (dict(layout="hf"), {}, dict(format="hf")),
    "hf_sharded_bf16": (dict(layout="hf"), {}, dict(format="hf", dtype="bfloat16",
                                                   max_shard_bytes=20000)),
    "dcp_from_weights": (dict(layout="hf"), {}, dict(format="dcp")),
    "dcp_from_training": (dict(layout="hf"), dict(TRAINED, training={"step": 3.0}),
                          dict(format="dcp")),
    "megatron_tp2_pp2": (dict(layout="megatron", tp=2, pp=2), {}, dict(format="megatron")),
    "megatron_fresh_optimizer_bf16": (dict(layout="megatron", tp=2), {},
                                      dict(format="megatron", dtype="bfloat16",
                                           with_optimizer=True)),
    "nemo_tar_tp2": (dict(layout="megatron", tp=2), {}, dict(format="nemo", dst="DST.nemo")),
    "nemo_dir_pp2": (dict(layout="megatron", pp=2), {}, dict(format="nemo")),
    "gguf": (dict(layout="gguf"), {}, dict(format="gguf", dtype="float16")),
    "nxdt_xser_tp2": (dict(layout="nxdt", tp=2, set=["xser=true"]), {}, dict(format="nxdt")),
    "deepspeed_fresh_dp2_stage3": (dict(layout="hf"), {},
                                   dict(format="deepspeed", dp=2, zero_stage=3)),
    "deepspeed_from_training_dp4": (dict(layout="hf"), "ds", dict(format="deepspeed", dp=4)),
    "universal_from_training": (dict(layout="hf"), "ds", dict(format="universal")),
    "neox_fresh_pp2_dp2": (dict(layout="neox", pp=2), {},
                           dict(format="neox", dp=2, with_optimizer=True)),
    "neox_weights_only": (dict(layout="neox", tp=2), {}, dict(format="neox")),
}


def _plan(name):
    return _program_and_plan(name)[1]


def _program_and_plan(name):
    compile_args, facts_args, request_args = CASES[name]
    program = mapc.compile_spec("llama", config=CFG, **compile_args)
    if facts_args == "ds":       # a DeepSpeed training run of the same model, in facts
        names = [n for _, _, n in program.source.placements()]
        facts_args = dict(TRAINED, fmt="deepspeed", training=dict(
            DS_TRAINING, param_groups=[dict(DS_GROUPS[0], params=names)]))
    request_args = dict(request_args)
    request_args.setdefault("dst", "DST")
    return program, plan_write(program, _facts(program, **facts_args),
                               WriteRequest(**request_args))


@pytest.mark.parametrize("name", sorted(CASES))
def test_write_plan_matches_golden(name):
    text = _plan(name).pretty() + "\n"
    path = GOLDEN / f"writeplan_{name}.txt"
    if os.environ.get("MAPC_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_planning_is_pure(tmp_path, monkeypatch):
    """Planning reads and writes no file: it runs in an empty directory with no source."""
    monkeypatch.chdir(tmp_path)
    for name in CASES:
        _plan(name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_writer_creates_nothing_before_begin(tmp_path, name):
    program, plan = _program_and_plan(name)
    writer = make_writer(plan.format, tmp_path, program, plan)
    assert writer.slots == plan.slots
    assert list(tmp_path.iterdir()) == []


# ---- real runs write exactly the planned files ---------------------------------------------------
@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    return write_random_hf(tmp_path_factory.mktemp("src") / "hf", CFG)


def _files(dst: Path) -> set[str]:
    if dst.is_file():
        return {"."}
    return {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()}


RUNS = {
    "hf": dict(to="hf"),
    "hf-sharded": dict(to="hf", max_shard_bytes=20000),
    "dcp": dict(to="dcp"),
    "megatron-tp2-pp2": dict(to="megatron", tp=2, pp=2),
    "megatron-fresh-optimizer": dict(to="megatron", dtype="bf16", with_optimizer=True),
    "nemo-dir": dict(to="nemo", tp=2),
    "nemo-tar": dict(to="nemo", pp=2),
    "gguf": dict(to="gguf"),
    "nxdt-xser": dict(to="nxdt", tp=2, set=["xser=true"]),
    "deepspeed-stage3-dp2": dict(to="deepspeed", dp=2, zero_stage=3),
    "universal": dict(to="universal"),
    "neox-optimizer": dict(to="neox", pp=2, dp=2, with_optimizer=True),
}
# conversions of a training checkpoint (the deepspeed-stage3-dp2 output of the same model)
TRAINED_RUNS = {
    "hf-trainer-export": dict(to="hf", with_optimizer=True),
    "universal-carried": dict(to="universal", zero_stage=3),
    "deepspeed-dp3": dict(to="deepspeed", dp=3),
    "dcp-with-optimizer": dict(to="dcp"),
}


@pytest.fixture(scope="module")
def ds_src(tmp_path_factory, hf_src):
    dst = tmp_path_factory.mktemp("ds") / "ds"
    mapc.convert(hf_src, dst, to="deepspeed", dp=2, zero_stage=3)
    return dst


def _out(tmp_path, kwargs):
    return tmp_path / ("out.nemo" if kwargs["to"] == "nemo" and kwargs.get("pp") else "out")


@pytest.mark.parametrize("run", sorted(RUNS))
def test_real_run_writes_exactly_the_planned_files(tmp_path, hf_src, run):
    dst = _out(tmp_path, RUNS[run])
    cp = plan_convert(hf_src, dst, **RUNS[run])
    write_conversion(cp, hf_src, dst)
    assert _files(dst) == set(cp.write.files)
    assert list(tmp_path.iterdir()) == [dst]            # no scratch or temp left beside it


@pytest.mark.parametrize("run", sorted(TRAINED_RUNS))
def test_training_run_writes_exactly_the_planned_files(tmp_path, ds_src, run):
    dst = tmp_path / "out"
    cp = plan_convert(ds_src, dst, **TRAINED_RUNS[run])
    report = write_conversion(cp, ds_src, dst)
    assert _files(dst) == set(cp.write.files)
    assert set(cp.write.notes) <= set(report.warnings)   # notes are reported, once each


# ---- options a format does not honour --------------------------------------------------------------
REFUSED = {
    # megatron takes --dp for its distributed optimizer, which needs the source's Adam state
    "megatron-dp": (dict(to="megatron", dp=4), "--dp 4 sets the data-parallel size of "
                    "megatron-core's distributed optimizer, but the source has no optimizer "
                    "state"),
    "megatron-zero": (dict(to="megatron", zero_stage=3),
                      "--to megatron does not take --zero-stage 3"),
    "hf-dp": (dict(to="hf", dp=2), "--to hf does not take --dp 2"),
    "dcp-with-optimizer": (dict(to="dcp", with_optimizer=True),
                           "--to dcp does not take --with-optimizer"),
    "gguf-shards": (dict(to="gguf", max_shard_bytes=100), "--to gguf does not take"),
    "nemo-zero": (dict(to="nemo", zero_stage=1), "--to nemo does not take --zero-stage 1"),
    "nxdt-dp": (dict(to="nxdt", dp=2), "--to nxdt does not take --dp 2"),
    "deepspeed-with-optimizer": (dict(to="deepspeed", with_optimizer=True),
                                 "--to deepspeed does not take --with-optimizer"),
    # a plain HF source trained with no ZeRO at all: the option is what is refused
    "neox-zero-2": (dict(to="neox", zero_stage=2), "--to neox does not take --zero-stage 2"),
    "deepspeed-fp16": (dict(to="deepspeed", dtype="fp16"),
                       "a DeepSpeed module is trained in one dtype, fp32 or bf16"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unhonoured_option_is_refused(tmp_path, hf_src, case):
    kwargs, message = REFUSED[case]
    with pytest.raises(MapcError) as e:
        mapc.convert(hf_src, tmp_path / "out", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# ---- --dry-run and the real run agree ----------------------------------------------------------------
DRY = {
    "dcp": ["--to", "dcp"],
    "deepspeed-stage2-dp2": ["--to", "deepspeed", "--dp", "2", "--zero-stage", "2"],
    "neox-optimizer": ["--to", "neox", "--pp", "2", "--with-optimizer"],
}


@pytest.mark.parametrize("case", sorted(DRY))
def test_dry_run_prints_the_plan_the_run_executes(tmp_path, hf_src, capsys, case):
    dst = tmp_path / "out"
    assert main(["convert", str(hf_src), str(dst), *DRY[case], "--dry-run", "-q"]) == 0
    printed = capsys.readouterr().out
    assert not dst.exists()
    assert main(["convert", str(hf_src), str(dst), *DRY[case], "-q"]) == 0
    capsys.readouterr()
    assert _files(dst) == _printed_files(printed)


def _printed_files(text: str) -> set[str]:
    """The files a printed WritePlan lists (the lines under ``  files (N):``)."""
    lines = text[text.index("write plan "):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  files ("))
    out = set()
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        out.add(line.strip())
    assert len(out) == int(lines[start].split("(")[1].split(")")[0])
    return out


@pytest.mark.parametrize("args", [["--to", "deepspeed", "--dtype", "fp16"],
                                  ["--to", "neox", "--zero-stage", "3"],
                                  ["--to", "megatron", "--dp", "4", "--zero-stage", "3"]])
def test_dry_run_fails_as_the_run_fails(tmp_path, hf_src, capsys, args):
    dst = tmp_path / "out"
    assert main(["convert", str(hf_src), str(dst), *args, "--dry-run"]) == 1
    dry = capsys.readouterr().err
    assert main(["convert", str(hf_src), str(dst), *args]) == 1
    real = capsys.readouterr().err
    assert dry == real and dry.startswith("mapc: error: ") and dry.count("\n") == 1
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_planned_tensors_follow_the_cast(hf_src, tmp_path):
    cp = plan_convert(hf_src, tmp_path / "out", to="hf", dtype="bf16")
    cp.close()
    assert {dt for *_, dt in cp.write.tensors} == {"bfloat16"}
    assert np.prod(cp.write.tensors[0][2]) > 0
