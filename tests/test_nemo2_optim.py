"""NeMo 2 checkpoints with the distributed optimizer's state, against megatron-core 0.16.1.

NeMo is not installable here, so the harness does what NeMo 2's ``MegatronStrategy``
(nemo/lightning/pytorch/strategies/megatron_strategy.py, io/pl.py ``MegatronCheckpointIO``,
_strategy_lib.py) does around megatron-core: the shared run of tests/conftest.py
(``saved_optim``: TP2 DP2, a real DDP + DistributedOptimizer after one step) also saves
``dist_checkpointing.save`` of Lightning's checkpoint dict with ``sharded_state_dict`` (the
model's, prefix ``module.``), ``optimizer: [DistributedOptimizer.sharded_state_dict(...)]``
and NeMo's content metadata, into ``ckpt_nemo2_<type>/weights/``, for the two sharding types
megatron-core 0.16.1 saves of those NeMo asks for or loads (``dp_zero_gather_scatter``:
``ckpt_parallel_save_optim=False``; ``fully_reshardable``). The loading side
(``loaded_nemo2``) is NeMo's ``load_checkpoint``: the saved content metadata picks the
sharding type, the model's sharded dict under the prefix, the optimizer's under
``optimizer[0]``, then ``load_state_dict``.
"""
from __future__ import annotations

import json
import pickle
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import mapc  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from mapc.runtime.containers import detect_format, open_source  # noqa: E402
from tests.conftest import MCORE_OPTIM_CFG as CFG  # noqa: E402
from tests.groundtruth import mcore_dist  # noqa: E402
from tests.test_torch_dist import (PADDED, STEP_ATOL, STEP_RTOL,  # noqa: E402
                                   _assert_hf_holds_the_live_state, _assert_rank_equal,
                                   _bound, _expected_local, _hf_of_truth, _moments_as_hf,
                                   _truth_local)

# context/model.yaml of the saved model as NeMo 2 dumps a GPTConfig (the fields
# mcore_dist._args gives the run)
MODEL_YAML = """\
_target_: nemo.collections.llm.gpt.model.base.GPTModel
config:
  _target_: nemo.collections.llm.gpt.model.base.GPTConfig
  tensor_model_parallel_size: 2
  pipeline_model_parallel_size: 1
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 8
  num_query_groups: 2
  kv_channels: 8
  ffn_hidden_size: 96
  vocab_size: 250
  make_vocab_size_divisible_by: 128
  layernorm_epsilon: 1.0e-05
  normalization: RMSNorm
  gated_linear_unit: true
  activation_func: {_call_: false, _target_: torch.nn.functional.silu}
  add_bias_linear: false
  position_embedding_type: rope
  rotary_base: 10000
  seq_length: 128
  share_embeddings_and_output_weights: false
"""
KINDS = ("dp_zero_gather_scatter", "fully_reshardable")


@pytest.fixture(scope="module")
def nemo2(saved_optim, tmp_path_factory):
    """{sharding type: the NeMo 2 checkpoint directory} of the shared run, each with a
    context/model.yaml."""
    base = tmp_path_factory.mktemp("nemo2_optim")
    out = {}
    for kind in KINDS:
        d = base / kind
        shutil.copytree(saved_optim[0].parent / f"ckpt_{mcore_dist.NEMO2}{kind}", d)
        (d / "context").mkdir()
        (d / "context" / "model.yaml").write_text(MODEL_YAML)
        out[kind] = d
    return out


def test_megatron_core_saves_nemo2_s_layout(nemo2):
    """The facts the container relies on, as megatron-core saved NeMo's dict: the model keys
    carry module., the optimizer's do not (dp_zero_gather_scatter: one object per
    model-parallel rank) or carry it after the slot (fully_reshardable:
    optimizer.state.<slot>.module.<model key>); common.pt holds the optimizer's common part
    in a one-element list beside Lightning's entries."""
    for kind, d in nemo2.items():
        md = pickle.loads((d / "weights" / ".metadata").read_bytes()).state_dict_metadata
        opt = [k for k in md if k.startswith("optimizer.")]
        assert opt and not any(k.startswith("module.optimizer") for k in md)
        assert "module.decoder.layers.self_attention.linear_qkv.weight" in md
        if kind == "fully_reshardable":
            assert "optimizer.state.exp_avg.module.decoder.layers.mlp.linear_fc1.weight" in md
            assert "optimizer.state.param.module.output_layer.weight" in md
        else:
            assert "optimizer.distributed.dp_group_idx_1.param_state/shard_0_1" in md
        common = torch.load(d / "weights" / "common.pt", weights_only=False)
        assert common["optimizer"][0]["param_state_sharding_type"] == kind
        assert common["content_metadata"] == {"distrib_optim_sharding_type": kind}
        assert common["global_step"] == mcore_dist.ITERATION
        assert common["loops"] == mcore_dist.NEMO2_LOOPS
        assert common["lr_schedulers"] == mcore_dist.NEMO2_SCHEDULERS
        assert common["optimizer_states"] == {} and common["state_dict"] == {}
        assert detect_format(d) == "nemo2"


@pytest.mark.parametrize("kind", KINDS)
def test_nemo2_optimizer_state_is_read_exactly(saved_optim, nemo2, kind, tmp_path):
    """NeMo 2 -> HF with the optimizer: every slot (fp32 masters as the weights, both Adam
    moments) equals what each rank of megatron-core's live optimizer held, bit for bit; the
    step, the param groups, the iteration (Lightning's global_step) and Lightning's loops and
    schedulers are read."""
    mapc.convert(nemo2[kind], tmp_path / "hf", to="hf", with_optimizer=True)
    _assert_hf_holds_the_live_state(_moments_as_hf(tmp_path / "hf"), saved_optim[1])
    with _bound(nemo2[kind]) as src:
        state = src.training_state()
    assert state["step"] == 1.0 and len(state["param_groups"]) == 2
    assert state["iteration"] == mcore_dist.ITERATION
    assert state["lightning"]["loops"] == mcore_dist.NEMO2_LOOPS
    assert state["lightning"]["lr_schedulers"] == mcore_dist.NEMO2_SCHEDULERS
    live = torch.load(saved_optim[1] / "optim_0_0_0.pt")["param_groups"]
    assert sorted((g["wd_mult"], g["lr"], g["weight_decay"]) for g in state["param_groups"]) == \
        sorted((g["wd_mult"], g["lr"], g["weight_decay"]) for g in live)


# NeMo 2 -> FORMAT -> NeMo 2 (resharded) -> HF; and torch_dist -> NeMo 2 -> HF
ROUTES = [("nemo2", "dp_zero_gather_scatter", "torch_dist", {"tp": 1, "pp": 2, "dp": 3}),
          ("nemo2", "fully_reshardable", "deepspeed", {"dp": 2}),
          ("nemo2", "dp_zero_gather_scatter", "hf", {"with_optimizer": True}),
          ("torch_dist", None, None, None)]


@pytest.mark.parametrize("start,kind,via,options", ROUTES)
@pytest.mark.parametrize("sharding", ["dp_reshardable", "fully_reshardable"])
def test_the_state_goes_through_other_formats_and_back_exactly(saved_optim, nemo2, start, kind,
                                                               via, options, sharding,
                                                               tmp_path):
    """Every slot survives the route bit for bit (through HF against the live optimizer),
    and the NeMo 2 output's step and param groups are read back."""
    src = nemo2[kind] if start == "nemo2" else saved_optim[0]
    if via is not None:
        mapc.convert(src, tmp_path / via, to=via, **options)
        src = tmp_path / via
    mapc.convert(src, tmp_path / "n2", to="nemo2", tp=1, pp=2, dp=3, optim_sharding=sharding)
    assert detect_format(tmp_path / "n2") == "nemo2"
    mapc.convert(tmp_path / "n2", tmp_path / "back", to="hf", with_optimizer=True)
    _assert_hf_holds_the_live_state(_moments_as_hf(tmp_path / "back"), saved_optim[1])
    with _bound(tmp_path / "n2") as out:
        state = out.training_state()
    assert state["step"] == 1.0 and len(state["param_groups"]) == 2


def test_nemo2_s_default_fully_sharded_model_space_is_refused(nemo2, tmp_path):
    """Earlier NeMo 2 releases' default is fully_sharded_model_space, which megatron-core
    0.16.1 cannot save: refused with the type named and NeMo 2.7.3's own types offered (here
    the content of a saved one is relabelled)."""
    d = tmp_path / "n2"
    shutil.copytree(nemo2["fully_reshardable"], d)
    f = d / "weights" / "common.pt"
    common = torch.load(f, weights_only=False)
    common["optimizer"][0]["param_state_sharding_type"] = "fully_sharded_model_space"
    common["content_metadata"] = {"distrib_optim_sharding_type": "fully_sharded_model_space"}
    torch.save(common, f)
    with pytest.raises(MapcError, match="fully_sharded_model_space") as e:
        open_source(d)
    assert "ckpt_optim_fully_reshardable=True" in e.value.hint


def test_the_write_plan_names_the_optimizer(saved_optim, tmp_path):
    from mapc.cli.main import main
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["convert", str(saved_optim[0]), str(tmp_path / "x"), "--to", "nemo2",
                     "--dp", "2", "--dry-run"]) == 0
    out = buf.getvalue()
    assert "distributed (dp_reshardable)" in out and "weights/common.pt" in out
    assert "iteration directory" not in out and not (tmp_path / "x").exists()


LOAD_AT = (1, 2, 1)


@pytest.fixture(scope="module")
def loaded_nemo2(nemo2, tmp_path_factory):
    """mapc reshards the NeMo 2 dp_zero_gather_scatter checkpoint (TP2 DP2) to NeMo 2 at
    LOAD_AT, dp_reshardable and fully_reshardable; megatron-core loads both as NeMo does and
    takes the next step on value gradients. One megatron-core process group."""
    tp, pp, dp = LOAD_AT
    base = tmp_path_factory.mktemp("nemo2_optim_load")
    src = nemo2["dp_zero_gather_scatter"]
    # the harness's model pads the vocabulary as Megatron-LM does (nemo2 writes it unpadded
    # by default, as NeMo's HF importers do)
    pad = {"vocab_multiple": "128"}
    mapc.convert(src, base / "ckpt", to="nemo2", tp=tp, pp=pp, dp=dp, set=pad)
    mapc.convert(src, base / "fully", to="nemo2", tp=tp, pp=pp, dp=dp,
                 optim_sharding="fully_reshardable", set=pad)
    return base / "ckpt", mcore_dist.load_optimizer(base / "ckpt", CFG, tp, pp, dp, "bf16",
                                                    base / "loaded", fully=base / "fully",
                                                    nemo2=True)


@pytest.mark.parametrize("prefix", ["loaded", "loadedF", "stepped"])
@pytest.mark.parametrize("slot", ["param", "exp_avg", "exp_avg_sq"])
def test_megatron_core_loads_mapc_s_nemo2_as_nemo_does(saved_optim, loaded_nemo2, prefix,
                                                       slot):
    """What megatron-core's DistributedOptimizer at LOAD_AT holds after loading mapc's NeMo 2
    outputs the way NeMo does equals the original TP2 DP2 run's state at every rank's slice,
    bit for bit (dp_reshardable "loaded", fully_reshardable "loadedF"); its next step equals
    the original run's own to STEP_RTOL/STEP_ATOL (another DP)."""
    truth = saved_optim[1]
    tp, pp, dp = LOAD_AT
    want = _hf_of_truth(truth, "stepped" if prefix == "stepped" else "optim", slot)
    for p in range(pp):
        expected = _expected_local(want, tp, pp, 0, p)
        shapes = {n: v.shape for n, v in expected.items()}
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in shapes:
                shapes[name] = (PADDED // tp, CFG["hidden"])
        got = _truth_local(loaded_nemo2[1], 0, slot, p=p, dp=dp, prefix=prefix, shapes=shapes)
        if prefix == "stepped":
            assert sorted(got) == sorted(expected)
            for name, e in expected.items():
                torch.testing.assert_close(got[name][:e.shape[0]], e, rtol=STEP_RTOL,
                                           atol=STEP_ATOL, msg=lambda m: f"{name}: {m}")
        else:
            _assert_rank_equal(got, expected, (prefix, slot, p))


def test_nemo_s_load_finds_every_key_the_step_and_lightning_s_state(loaded_nemo2):
    """megatron-core finds every key it asks for (only the Transformer Engine extra states of
    the attention core and final norm, which its local modules do not have, are left unread);
    the step and param groups load; the
    common state NeMo gets back holds the sharding type, global_step and the source's
    Lightning loops and schedulers."""
    out = loaded_nemo2[1]
    tp, pp, dp = LOAD_AT
    for kind in ("dp_reshardable", "fully_reshardable"):
        for p in range(pp):
            # megatron-core's words: "unexpected" are keys asked for but not in the
            # checkpoint, "missing" keys in the checkpoint that were not asked for
            keys = json.loads((out / f"keys_{kind}_0_{p}_0.json").read_text())
            assert keys["unexpected"] == []
            assert sorted(keys["missing"]) == [
                "module.decoder.final_layernorm._extra_state",
                "module.decoder.layers.self_attention.core_attention._extra_state"]
        common = torch.load(out / f"common_{kind}.pt", weights_only=False)
        assert common["optimizer"] == [{"param_state_sharding_type": kind}]
        assert common["global_step"] == mcore_dist.ITERATION
        assert common["loops"] == mcore_dist.NEMO2_LOOPS
        assert common["lr_schedulers"] == mcore_dist.NEMO2_SCHEDULERS
    for p in range(pp):
        loaded = torch.load(out / f"loaded_0_{p}_0.pt")
        assert loaded["steps"] == [1.0]
        assert torch.load(out / f"stepped_0_{p}_0.pt")["steps"] == [2.0]
