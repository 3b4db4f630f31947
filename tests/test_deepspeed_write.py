"""mapc writes DeepSpeed ZeRO checkpoints at a new data-parallel size (``--to deepspeed --dp N``).

Against the real DeepSpeed 0.19.8 (run in subprocesses by tests/groundtruth/deepspeed_ckpt.py):

* a DeepSpeed engine loads mapc's resharded checkpoint *natively* (no universal step) at the new
  DP size and its next training step is bit-identical (loss, fp32 weights, exp_avg, exp_avg_sq)
  to DeepSpeed's own universal path (``ds_to_universal`` + ``load_universal``) at that size;
* DeepSpeed's ``zero_to_fp32`` consolidates mapc's output to the source's fp32 master weights;
* a mapc round trip dp 2 -> 3 -> 2 gives back DeepSpeed's own optimizer files, tensor for
  tensor (``torch.load``), and the same state through mapc's reader.

Without DeepSpeed: hypothesis drives the writer over random shapes, groups, stages and DP sizes
and reads the files back with mapc and with an independent re-implementation of the layout in
docs/formats/deepspeed.md.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)
torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mapc  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from mapc.runtime.backends import DTYPES  # noqa: E402
from mapc.runtime.containers import open_source  # noqa: E402
from mapc.runtime.containers.deepspeed import DeepSpeedWriter  # noqa: E402
from mapc.runtime.containers.deepspeed import plan_write as ds_plan_write  # noqa: E402
from mapc.runtime.plan_write import SourceFacts, WriteRequest  # noqa: E402
from mapc.runtime.resume import rebatch  # noqa: E402
from tests.conftest import llama_config, write_random_hf  # noqa: E402
from tests.groundtruth import deepspeed_ckpt as ds  # noqa: E402
from tests.groundtruth import zero_layout  # noqa: E402

SLOTS = ("master", "exp_avg", "exp_avg_sq")
KEY_OF = {"weights": "fp32", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}

# (case, new dp): stage 1 grows 2 -> 3 and shrinks 2 -> 1, stage 2 bf16 grows, stage 3 grows.
RESHARD = [("z1", 3), ("z1", 1), ("z2bf16", 3), ("z3", 3)]


@pytest.fixture(scope="module")
def resharded(make, tmp_path_factory):
    """resharded(case, dp) -> mapc's ``--to deepspeed --dp dp`` output of a real checkpoint."""
    root = tmp_path_factory.mktemp("dswrite")
    made = {}

    def _get(case, dp):
        if (case, dp) not in made:
            out = root / f"{case}_dp{dp}"
            mapc.convert(make(case), out, to="deepspeed", dp=dp)
            made[(case, dp)] = out
        return made[(case, dp)]
    return _get


# ---- DeepSpeed loads mapc's output natively -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case,dp", RESHARD)
def test_native_resume_equals_deepspeed_universal_resume(make, resharded, case, dp):
    """The oracle: DeepSpeed's own reshard path (ds_to_universal, then a universal load at dp).
    mapc's checkpoint is loaded natively (DeepSpeed refuses that unless the files really are
    partitioned for dp) and one more step must give exactly the same numbers."""
    ckpt = make(case)
    ds.ds_to_universal(ckpt)
    oracle = ds.resume_and_step(ckpt, dp, universal=True)
    ours = ds.resume_and_step(resharded(case, dp), dp, universal=False, like=ckpt)
    assert ours["start_step"] == oracle["start_step"] == 3
    assert ours["loss"] == oracle["loss"]
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        want = ds.load_state(oracle["dir"], KEY_OF[key])
        got = ds.load_state(ours["dir"], KEY_OF[key])
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(torch.from_numpy(got[name]), torch.from_numpy(want[name])), \
                f"{key} {name}"
    # the step really moved the weights (a no-op resume would also "agree")
    before, after = ds.load_state(ckpt, "fp32"), ds.load_state(ours["dir"], "fp32")
    assert any(not np.array_equal(before[n], after[n]) for n in before)


@pytest.mark.slow
@pytest.mark.parametrize("case,dp", [("z1", 3), ("z2bf16", 3), ("z3", 3)])
def test_zero_to_fp32_of_mapc_output_is_the_source_master(make, resharded, case, dp):
    ckpt = make(case)
    theirs = ds.zero_to_fp32(resharded(case, dp))
    want = ds.load_state(ckpt, "fp32")
    assert sorted(theirs) == sorted(want)
    for name, arr in want.items():
        np.testing.assert_array_equal(theirs[name], arr, err_msg=name)


# ---- round trip dp 2 -> 3 -> 2 gives DeepSpeed's own files back ---------------------------------
def _tload(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _stage3_fp32_padding(numels, dp):
    """Mask of the padding elements in every rank's stage-3 flat group (per-param padding)."""
    part = [math.ceil(n / dp) for n in numels]
    masks = []
    for r in range(dp):
        m = []
        for n, p in zip(numels, part):
            m.append(np.arange(r * p, (r + 1) * p) >= n)
        masks.append(np.concatenate(m))
    return masks


def _assert_same_tree(got, want, where, skip_mask=None):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, where
        assert got.shape == want.shape, (where, got.shape, want.shape)
        assert got.requires_grad == want.requires_grad, where
        g, w = got.detach(), want.detach()
        if skip_mask is not None:   # DeepSpeed's stage-3 fp32 padding is uninitialised memory
            g, w = g[~torch.from_numpy(skip_mask)], w[~torch.from_numpy(skip_mask)]
            assert not got.detach()[torch.from_numpy(skip_mask)].any(), f"{where}: mapc pads 0"
        assert torch.equal(g, w), where
    elif isinstance(want, dict):
        assert list(got) == list(want), (where, list(got), list(want))
        for k in want:
            _assert_same_tree(got[k], want[k], f"{where}.{k}", skip_mask)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_tree(a, b, f"{where}[{i}]", skip_mask)
    elif hasattr(want, "__dict__") and not isinstance(want, type):
        assert type(got).__name__ == type(want).__name__, where
        assert vars(got) == vars(want), where
    else:
        assert got == want and type(got) is type(want), (where, got, want)


@pytest.fixture(scope="module")
def source(make, ds_root):
    """source(case): a DS_CASES checkpoint, or "bf16opt": stage 1 bf16 with fp32 gradient
    accumulation (DeepSpeed's BF16_Optimizer, §5), two groups, ODD_MODEL (padding)."""
    def _get(case):
        if case == "bf16opt":
            return ds.make_zero_checkpoint(ds_root, 1, "bf16", 2, steps=3, model=ds.ODD_MODEL,
                                           grad_accum_fp32=True)
        return make(case)
    return _get


@pytest.mark.parametrize("case", ["z1", "z2bf16", "z3", "bf16opt"])
def test_round_trip_2_3_2_gives_deepspeeds_own_files(source, case, tmp_path):
    ckpt = source(case)
    mapc.convert(ckpt, tmp_path / "dp3", to="deepspeed", dp=3)
    mapc.convert(tmp_path / "dp3", tmp_path / "dp2", to="deepspeed", dp=2)
    real, ours = ckpt / "global_step3", tmp_path / "dp2" / "global_step3"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in real.iterdir()
                                                            if p.suffix == ".pt")
    stage = ds.read_expected(ckpt)["stage"]
    model_name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 \
        else "mp_rank_00_model_states.pt"
    m_real, m_ours = _tload(real / model_name), _tload(ours / model_name)
    for key in m_real:
        if key != "ds_config":      # the batch split is re-derived for each DP size
            _assert_same_tree(m_ours[key], m_real[key], key)
    numels = [math.prod(s) for g in m_real["param_shapes"] for s in g.values()]
    for f in sorted(real.glob("*optim_states.pt")):
        r = int(f.name.split("zero_pp_rank_")[1].split("_")[0])
        want = _tload(f)["optimizer_state_dict"]
        got = _tload(ours / f.name)["optimizer_state_dict"]
        for key in want:
            mask = _stage3_fp32_padding(numels, 2)[r] if key == "fp32_flat_groups" else None
            _assert_same_tree(got[key], want[key], f"{f.name}:{key}", mask)
    # and mapc reads the same state back from both
    with open_source(ckpt) as a, open_source(tmp_path / "dp2") as b:
        assert a.training_state()["param_groups"] == b.training_state()["param_groups"]
        for name in a.names():
            for slot in ("param",) + SLOTS:
                x, y = a.read(name, (), slot=slot), b.read(name, (), slot=slot)
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, slot)


# ---- properties, without DeepSpeed: the writer against the documented layout ---------------------
class _FakeInst:
    """A target instance as planned_tensors reads it: its one member, its shard shape, and a
    rule with no dtype or value map of its own."""

    def __init__(self, name, shape):
        self.members = {"x": name}
        self.rule = {}
        self.value = None
        shape = tuple(shape)
        self.recipe = type("R", (), {"shard_shape": shape, "ragged": (),
                                     "shape_at": lambda self, coord: shape})()


class _FakeTarget:
    aliases: dict = {}            # no tied weights

    def __init__(self, shapes):
        self.shapes = shapes

    def placements(self):
        return [(_FakeInst(n, s), (), n) for n, s in self.shapes.items()]


class _FakeProgram:
    """The identity program (names unchanged), as mapc compiles deepspeed -> deepspeed."""

    def __init__(self, shapes):
        self.target = _FakeTarget(shapes)

    def target_groups(self, lists):
        return {((), n): g for g, names in enumerate(lists) for n in names}

    def stateless_targets(self, reader):
        return {}           # every tensor is a trained parameter


def _drive(out: Path, tensors, ts, dp, dtype, slots=("param",) + SLOTS):
    """Plan with deepspeed.plan_write from SourceFacts, then run the writer protocol as
    runtime/execute.py does; tensors[name][slot] = array."""
    names = list(tensors)
    program = _FakeProgram({n: tensors[n]["param"].shape for n in names})
    facts = SourceFacts(path="/nonexistent-fake-source", format="fake", slots=tuple(slots),
                        training=ts, names=tuple(names), dtypes={"param": dict.fromkeys(names,
                                                                                         dtype)})
    plan = ds_plan_write(program, facts, WriteRequest("deepspeed", dp=dp))
    out.mkdir()
    w = DeepSpeedWriter(out, program, plan)
    w.begin(list(plan.tensors))
    extra = [s for s in SLOTS if s in slots]
    for s in extra:
        w.begin_slot(s, [((), n, tensors[n]["param"].shape, "float32") for n in names])
    for n in reversed(names):          # arrival order need not be the flat order
        w.write((), n, tensors[n]["param"])
        for s in extra:
            w.write_slot(s, (), n, tensors[n][s])
    w.finish({"config": None, "warnings": []})
    return plan


def _documented_layout(tag_dir: Path, dp: int) -> tuple[dict, list]:
    """{slot: {name: array}} and the param_shapes, by the documented formulas only (mapc writes
    stage 3's padding as zeros, so it is checked too)."""
    return zero_layout.read_documented_layout(tag_dir, dp, strict_padding=True)


shape_st = st.lists(st.integers(1, 13), min_size=1, max_size=2).map(tuple)


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 6))
    shapes = [draw(shape_st) for _ in range(n)]
    ngroups = draw(st.integers(1, min(3, n)))
    group = [i % ngroups for i in range(n)] if n else []
    group = draw(st.permutations(group))
    stage = draw(st.sampled_from([1, 2, 3]))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    accum_fp32 = draw(st.booleans())
    sub = draw(st.integers(1, 40))
    dp = draw(st.integers(1, 5))
    return shapes, group, stage, dtype, accum_fp32, sub, dp, draw(st.integers(0, 2**31))


_counter = itertools.count()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_property_writer_matches_documented_layout(tmp_path, case):
    shapes, group, stage, dtype, accum_fp32, sub, dp, seed = case
    rng = np.random.default_rng(seed)
    names = [f"p{i}" for i in range(len(shapes))]
    tensors = {}
    for n, s in zip(names, shapes):
        master = rng.standard_normal(s).astype(np.float32)
        tensors[n] = {"param": master.astype(DTYPES[dtype]), "master": master,
                      "exp_avg": rng.standard_normal(s).astype(np.float32),
                      "exp_avg_sq": rng.random(s).astype(np.float32)}
    groups = [{"lr": 0.1 * (g + 1), "weight_decay": 0.0, "betas": (0.9, 0.95), "eps": 1e-8,
               "params": [n for n, gg in zip(names, group) if gg == g]}
              for g in range(max(group) + 1)]
    cfg = {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 6,
           "zero_optimization": {"stage": stage, "sub_group_size": sub}}
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    if accum_fp32:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    ts = {"iteration": 7, "step": 7.0, "param_groups": groups, "zero_stage": stage,
          "dp_world_size": 2, "ds_config": cfg, "clip_grad": 0.5, "loss_scale": 1.0}
    out = tmp_path / f"case{next(_counter)}"
    w = _drive(out, tensors, ts, dp, dtype)
    tag = out / "global_step7"
    for f in tag.glob("*.pt"):   # the CRC-32s combined from the pieces, checked by zipfile
        with zipfile.ZipFile(f) as zf:
            assert zf.testzip() is None, f.name
    got, shapes_on_disk = _documented_layout(tag, dp)
    # param_shapes: the groups in order (stage 3: split into sub-groups), each in source order
    flat_names = [n for g in shapes_on_disk for n in g]
    assert flat_names == [n for g in groups for n in g["params"]]
    if stage != 3:
        assert [list(g) for g in shapes_on_disk] == [g["params"] for g in groups]
    for slot in SLOTS:
        for n in names:
            np.testing.assert_array_equal(got[slot][n], tensors[n][slot], err_msg=f"{n}/{slot}")
    assert w.detail.resume.kind == ("stage3" if stage == 3 else
                      "bf16" if dtype == "bfloat16" and stage == 1 and accum_fp32 else "zero")
    # mapc reads back what it wrote
    with open_source(out) as src:
        assert src.dp == dp
        for n in names:
            for slot in ("param",) + SLOTS:
                a = src.read(n, (), slot=slot)
                assert a.tobytes() == tensors[n][slot].tobytes(), (n, slot)
        state = src.training_state()
    assert state["step"] == 7.0 and state["iteration"] == 7 and state["dp_world_size"] == dp
    assert [g["lr"] for g in state["param_groups"][:len(groups)]] == [g["lr"] for g in groups]


def test_fresh_optimizer_from_plain_weights(tmp_path):
    """An HF source has no optimizer: master = weights in fp32, zero moments, step 0, stage 1
    in the weights' dtype, and warnings that say so."""
    src = write_random_hf(tmp_path / "hf", llama_config(hidden=24, layers=2, heads=4, groups=2,
                                                        ffn=40, vocab=37))
    report = mapc.convert(src, tmp_path / "ds", to="deepspeed", dp=3)
    text = " ".join(report.warnings)
    assert "fresh optimizer" in text and "stage 1" in text
    import json
    assert json.loads((tmp_path / "ds" / "ds_config.json").read_text())["zero_optimization"] \
        == {"stage": 1}
    from safetensors.numpy import load_file
    weights = load_file(src / "model.safetensors")
    got, _ = _documented_layout(tmp_path / "ds" / "global_step0", 3)
    for name, arr in weights.items():
        np.testing.assert_array_equal(got["master"][name], arr)
        assert not got["exp_avg"][name].any() and not got["exp_avg_sq"][name].any()
    osd = _tload(tmp_path / "ds" / "global_step0" /
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    assert float(osd["base_optimizer_state"]["state"][0]["step"]) == 0.0


# ---- resume config -------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,micro,accum,old,new,want,noted", [
    (6, 3, 1, 2, 1, (6, 3, 2), False),       # shrink: accumulate instead
    (8, 2, 2, 2, 4, (8, 2, 1), False),       # grow: fewer accumulation steps
    (6, 3, 1, 2, 3, (6, 2, 1), True),        # micro 3 impossible at dp 3: micro 2, global kept
    (6, 3, 1, 2, 4, (8, 2, 1), True),        # 6 is no multiple of 4: closest global batch
])
def test_rebatch(batch, micro, accum, old, new, want, noted):
    cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": accum, "zero_optimization": {"stage": 1}}
    out, notes = rebatch(cfg, old, new)
    got = (out["train_batch_size"], out["train_micro_batch_size_per_gpu"],
           out["gradient_accumulation_steps"])
    assert got == want and got[1] * got[2] * new == got[0]
    assert bool(notes) == noted
    if want[0] != batch:
        assert "cannot be kept" in notes[0]
    assert cfg["train_micro_batch_size_per_gpu"] == micro   # the caller's dict is untouched


@settings(max_examples=200, deadline=None)
@given(micro=st.integers(1, 16), accum=st.integers(1, 8), old=st.integers(1, 16),
       new=st.integers(1, 16))
def test_rebatch_properties(micro, accum, old, new):
    batch = micro * accum * old
    out, notes = rebatch({"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro,
                          "gradient_accumulation_steps": accum}, old, new)
    b, m, a = (out["train_batch_size"], out["train_micro_batch_size_per_gpu"],
               out["gradient_accumulation_steps"])
    assert m * a * new == b and 1 <= m <= micro   # valid for DeepSpeed, never a larger micro
    if batch % new == 0:
        assert b == batch                         # the global batch is kept whenever possible
    else:
        assert b != batch and any("cannot be kept" in n for n in notes)


# ---- bad input -----------------------------------------------------------------------------------
def test_dp_zero_is_refused(make, tmp_path):
    from mapc.cli.main import main
    assert main(["convert", str(make("z1")), str(tmp_path / "out"), "--to", "deepspeed",
                 "--dp", "0", "-q"]) == 1
    with pytest.raises(MapcError, match="--dp 0"):
        mapc.convert(make("z1"), tmp_path / "out", to="deepspeed", dp=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken", ["unknown", "uncovered"])
def test_unmappable_training_state_is_refused(tmp_path, broken):
    tensors = {n: {"param": np.zeros((4,), np.float32), **{s: np.zeros((4,), np.float32)
                                                           for s in SLOTS}} for n in "ab"}
    params = ["a", "zzz"] if broken == "unknown" else ["a"]
    ts = {"iteration": 1, "step": 1.0, "zero_stage": 1, "dp_world_size": 1,
          "param_groups": [{"lr": 0.1, "params": params}],
          "ds_config": {"train_batch_size": 2, "zero_optimization": {"stage": 1}}}
    with pytest.raises(MapcError, match="cannot be mapped"):
        _drive(tmp_path / "out", tensors, ts, 2, "float32")


def test_fp16_weights_are_refused_and_nothing_is_left(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config(hidden=16, layers=1, heads=2, groups=1,
                                                        ffn=24, vocab=11), dtype=np.float16)
    with pytest.raises(MapcError, match="--dtype"):
        mapc.convert(src, tmp_path / "ds", to="deepspeed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_missing_rank_file_is_named_and_nothing_is_written(make, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(make("z1"), src)
    (src / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(MapcError, match=r"rank\(s\) \[1\] are missing"):
        mapc.convert(src, tmp_path / "out", to="deepspeed", dp=3)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
