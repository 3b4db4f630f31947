"""DeepSpeed AutoTP checkpoints (plain engine, ``mp_rank > 0``) against the real DeepSpeed
(0.19.8, CPU, gloo): a transformers Llama trained with ``autotp_size`` 2 and ZeRO 1 (fp32),
again with ZeRO 2 (bf16), and a Qwen2 (q/k/v biases) with ZeRO 1, in the same processes
(tests/groundtruth/ds_autotp.py, one launch shared by every test here), read and written by
mapc with the TP layout of the family spec's ``autotp`` layout (llama.map, qwen2.map).

Checked: mapc -> hf gives DeepSpeed's own gathered full weights bit for bit, and logits within
LOGITS_TOL of the training module's; AutoTP -> deepspeed (tp 1) and -> universal carry every
fp32 master weight and Adam moment (the merge of DeepSpeed's per-rank optimizer shards, by
DeepSpeed's own partition_dim); AutoTP -> deepspeed tp 1 -> deepspeed --tp 2 gives DeepSpeed's
files back (with DeepSpeed's universal_checkpoint_info); a real AutoTP engine loads mapc's
hf -> deepspeed --tp 2 (its logits are the original's), the tp 1 -> tp 2 output and
(DeepSpeed's universal loader) the universal output, and both next steps equal the original
run's own next step exactly; DeepSpeed's ds_to_universal holds the same
tensors as mapc's universal output and merges mapc's AutoTP output as it merges its own. The same
launches train a tied-embedding Qwen3 (specs/qwen3.map: q_norm/k_norm replicated; the tied
head cut with the embedding on the vocabulary) a Llama whose KV heads, MLP and vocabulary
tp does not divide (AutoTP's uneven split, ``split F over tp unevenly``) and a Llama with
ZeRO stage 3: read against
DeepSpeed's gathered weights, written (tp 1 -> tp 2) to DeepSpeed's own files, and resumed by a
real engine to the original run's next step. Two DeepSpeed torchrun launches in all
(training, and one resume that loads the outputs; ds_to_universal runs serially on rank 0
inside them).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)
torch = pytest.importorskip("torch")

import mapc  # noqa: E402
from tests.conftest import llama_config, write_random_hf  # noqa: E402
from tests.groundtruth import deepspeed_ckpt as ds  # noqa: E402

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "groundtruth" / "ds_autotp.py"
KEYS = ("fp32", "exp_avg", "exp_avg_sq")
TP = 2
# the ground truth's extra models: model_type and class
EXTRA = {"qwen3": ("qwen3", "Qwen3ForCausalLM"), "uneven": ("llama", "LlamaForCausalLM"),
         "z3": ("llama", "LlamaForCausalLM")}
# transformers' full-model forward against the AutoTP training module's (sharded matmuls, the
# row-parallel partial sums all-reduced): measured 3.0e-7 on logits of magnitude 1.
LOGITS_TOL = 3e-6


def _load(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The AutoTP training run: ckpt/ as engine.save_checkpoint left it (no config.json), the
    gathered weights, the logits, per-rank optimizer shards at the save and after one more
    step, and a config.json of the model beside it (for --config)."""
    root = tmp_path_factory.mktemp("autotp")
    out = root / "run"
    ds._torchrun(TP, ["--out", str(out)], root / "train.log", ds.TIMEOUT_S, script=SCRIPT)
    exp = json.loads((out / "expected.json").read_text())
    cfg = dict(exp["model"], model_type="llama", architectures=["LlamaForCausalLM"])
    (out / "model_config.json").write_text(json.dumps(cfg))
    qwen2 = dict(exp["model"], model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                 use_sliding_window=False)
    (out / "qwen2_config.json").write_text(json.dumps(qwen2))
    for arch, (mt, cls) in EXTRA.items():
        (out / f"{arch}_config.json").write_text(json.dumps(dict(exp[arch], model_type=mt,
                                                                 architectures=[cls])))
    return out


@pytest.fixture(scope="session")
def converted(run, tmp_path_factory):
    root = tmp_path_factory.mktemp("autotp-mapc")
    cfg = run / "model_config.json"
    made = {"hf": mapc.convert(run / "ckpt", root / "hf", to="hf", config=cfg),
            "dp1": mapc.convert(run / "ckpt", root / "dp1", to="deepspeed", config=cfg),
            "universal": mapc.convert(run / "ckpt", root / "universal", to="universal",
                                      config=cfg)}
    made["tp2"] = mapc.convert(root / "dp1", root / "tp2", to="deepspeed", tp=TP)
    made["hf_tp2"] = mapc.convert(root / "hf", root / "hf_tp2", to="deepspeed", tp=TP)
    made["z2bf16-hf"] = mapc.convert(run / "z2bf16", root / "z2bf16-hf", to="hf", config=cfg)
    made["z2bf16-dp1"] = mapc.convert(run / "z2bf16", root / "z2bf16-dp1", to="deepspeed",
                                      config=cfg)
    made["z2bf16-tp2"] = mapc.convert(root / "z2bf16-dp1", root / "z2bf16-tp2",
                                      to="deepspeed", tp=TP)
    qcfg = run / "qwen2_config.json"
    made["qwen2-hf"] = mapc.convert(run / "qwen2", root / "qwen2-hf", to="hf", config=qcfg)
    made["qwen2-dp1"] = mapc.convert(run / "qwen2", root / "qwen2-dp1", to="deepspeed",
                                     config=qcfg)
    made["qwen2-tp2"] = mapc.convert(root / "qwen2-dp1", root / "qwen2-tp2", to="deepspeed",
                                     tp=TP)
    for arch in EXTRA:
        c = run / f"{arch}_config.json"
        made[f"{arch}-hf"] = mapc.convert(run / arch, root / f"{arch}-hf", to="hf", config=c)
        made[f"{arch}-dp1"] = mapc.convert(run / arch, root / f"{arch}-dp1", to="deepspeed",
                                           config=c)
        made[f"{arch}-tp2"] = mapc.convert(root / f"{arch}-dp1", root / f"{arch}-tp2",
                                           to="deepspeed", tp=TP)
    made["uneven-universal"] = mapc.convert(run / "uneven", root / "uneven-universal",
                                            to="universal", config=run / "uneven_config.json")
    return {k: (root / k, r) for k, r in made.items()}


@pytest.fixture(scope="session")
def resumed(run, converted, tmp_path_factory):
    """A real AutoTP engine: loads hf -> deepspeed --tp 2 (weights only; its logits), then
    AutoTP -> tp 1 -> tp 2 and trains one step; a second engine in the same processes
    (``"load_universal": true``) loads AutoTP -> universal and trains one step."""
    out = tmp_path_factory.mktemp("autotp-resume") / "run"
    ds._torchrun(TP, ["--out", str(out), "--weights", str(converted["hf_tp2"][0]),
                      "--load", str(converted["tp2"][0]),
                      "--universal", str(converted["universal"][0]),
                      *(a for arch in EXTRA
                        for a in ("--also", f"{arch}={converted[arch + '-tp2'][0]}")),
                      "--also-universal", f"uneven={converted['uneven-universal'][0]}"],
                 out.parent / "resume.log", ds.TIMEOUT_S, script=SCRIPT)
    return out


def _merged(run, prefix, key) -> dict:
    """The full tensors of DeepSpeed's per-rank shards, joined on DeepSpeed's own
    partition_dim (ds_autotp_universal_checkpoint_meta); replicated ones are equal on both."""
    exp = json.loads((run / "expected.json").read_text())
    shards = [_load(run / f"{prefix}.t{t}.{key}.safetensors") for t in range(TP)]
    out = {}
    for name, dim in exp["partition_dim"].items():
        parts = [s[name] for s in shards]
        if dim is None:
            assert all(np.array_equal(parts[0], p) for p in parts[1:]), name
            out[name] = parts[0]
        else:
            out[name] = np.concatenate(parts, axis=dim)
    return out


def test_reads_what_deepspeed_gathers(run, converted):
    out, report = converted["hf"]
    assert not any(w.startswith("generic mode") for w in report.warnings)
    mine, theirs = _load(out / "model.safetensors"), _load(run / "ckpt.full.safetensors")
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert np.array_equal(mine[name], theirs[name]), name
    from transformers import LlamaForCausalLM
    from tests.groundtruth.ds_autotp import BATCH, MODEL, PROBE, SEQ, batch_for_step
    model = LlamaForCausalLM.from_pretrained(str(out)).float().eval()
    with torch.no_grad():
        logits = model(input_ids=batch_for_step(PROBE, BATCH, SEQ, MODEL["vocab_size"])).logits
    ref = _load(run / "logits.safetensors")["logits"]
    assert np.abs(logits.numpy() - ref).max() <= LOGITS_TOL


def test_optimizer_state_carried_to_tp1_and_universal(run, converted):
    want = {k: _merged(run, "saved", k) for k in KEYS}
    # deepspeed tp 1: the flat ZeRO 1 partitions (dp 1: the group is the parameters
    # concatenated in param_shapes order, docs/formats/deepspeed.md section 4)
    dp1 = converted["dp1"][0]
    tag = (dp1 / "latest").read_text().strip()
    ms = torch.load(dp1 / tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert ms["mp_world_size"] == 1 and "tensor_parallel" not in ms["ds_config"]
    osd = torch.load(dp1 / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     weights_only=False)["optimizer_state_dict"]
    for key, flat in (("fp32", osd["single_partition_of_fp32_groups"][0]),
                      ("exp_avg", osd["base_optimizer_state"]["state"][0]["exp_avg"]),
                      ("exp_avg_sq", osd["base_optimizer_state"]["state"][0]["exp_avg_sq"])):
        off = 0
        for name, shape in ms["param_shapes"][0].items():
            n = int(np.prod(shape))
            assert np.array_equal(flat[off:off + n].detach().numpy().reshape(tuple(shape)),
                                  want[key][name]), (key, name)
            off += n
        assert len(ms["param_shapes"][0]) == len(want[key]) and off <= flat.numel()
    # universal: zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt
    udir = converted["universal"][0] / (converted["universal"][0] / "latest_universal") \
        .read_text().strip()
    for key in KEYS:
        for name, arr in want[key].items():
            got = torch.load(udir / "zero" / name / f"{key}.pt", weights_only=False)["param"]
            assert np.array_equal(got.detach().numpy(), arr), (key, name)


def test_zero2_bf16_read(run, converted):
    # the second run (ZeRO 2, bf16): the fp32 masters merged, and DeepSpeed's gathered bf16
    # weights are them rounded
    out = converted["z2bf16-hf"][0]
    mine = _load(out / "model.safetensors")
    want = _merged(run, "z2bf16", "fp32")
    assert mine.keys() == want.keys()
    for name in want:
        assert np.array_equal(mine[name], want[name]), name
    from safetensors.torch import load_file
    gathered = load_file(str(run / "z2bf16.full.safetensors"))
    for name, t in gathered.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(torch.from_numpy(mine[name]).to(torch.bfloat16), t), name


def test_qwen2_read(run, converted):
    # a Qwen2 (specs/qwen2.map's autotp layout: the q/k/v biases cut as their weights' rows)
    mine = _load(converted["qwen2-hf"][0] / "model.safetensors")
    theirs = _load(run / "qwen2.full.safetensors")
    assert mine.keys() == theirs.keys() and any(n.endswith("q_proj.bias") for n in mine)
    for name in theirs:
        assert np.array_equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("arch", list(EXTRA))
def test_extra_models_read(run, converted, arch):
    # qwen3 (tied): DeepSpeed gathers lm_head.weight too, the embedding itself; the hf output
    # names it once (tied). uneven: the first rank's extra KV group, MLP and vocabulary rows.
    mine = _load(converted[f"{arch}-hf"][0] / "model.safetensors")
    theirs = _load(run / f"{arch}.full.safetensors")
    if arch == "qwen3":
        assert np.array_equal(theirs.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])
        assert any(n.endswith("q_norm.weight") for n in mine)
        # DeepSpeed's own cut of the tied pair: the embedding on its vocabulary rows
        shard = _load(run / "qwen3.t1.fp32.safetensors")["model.embed_tokens.weight"]
        assert shard.shape[0] == theirs["model.embed_tokens.weight"].shape[0] // TP
    elif arch == "uneven":
        ms = torch.load(run / arch / "global_step2" / "mp_rank_01_model_states.pt",
                        weights_only=False)["module"]
        assert tuple(ms["model.layers.0.self_attn.k_proj.weight"].shape)[0] == 16   # 1 of 3
        assert tuple(ms["model.layers.0.mlp.up_proj.weight"].shape)[0] == 48        # of 97
        assert tuple(ms["lm_head.weight"].shape)[0] == 63                           # of 127
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert np.array_equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("case", ["ckpt", "z2bf16", "qwen2", "qwen3", "uneven"])
def test_tp1_to_tp2_gives_deepspeeds_files_back(run, converted, case):
    prefix = "bf16_" if case == "z2bf16" else ""
    ours = converted["tp2" if case == "ckpt" else f"{case}-tp2"][0] / "global_step2"
    theirs = run / case / "global_step2"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for t in range(TP):
        a = torch.load(theirs / f"mp_rank_{t:02d}_model_states.pt", weights_only=False)
        b = torch.load(ours / f"mp_rank_{t:02d}_model_states.pt", weights_only=False)
        assert list(a["module"]) == list(b["module"])
        assert all(torch.equal(a["module"][n], b["module"][n]) and
                   a["module"][n].dtype == b["module"][n].dtype for n in a["module"])
        assert a["param_shapes"] == b["param_shapes"]
        # a tied head: DeepSpeed lists it in shared_params on tp rank 0 only
        assert a["shared_params"] == b["shared_params"]
        for key in ("mp_world_size", "checkpoint_parallel_dimensions", "dp_world_size",
                    "global_steps", "global_samples"):
            assert a[key] == b[key], key
        assert b["ds_config"]["tensor_parallel"] == {"autotp_size": TP}
        # DeepSpeed's own AutoTP metadata (patterns, vocabulary, affine maps), as its
        # ds_to_universal reads it
        assert b["universal_checkpoint_info"] == a["universal_checkpoint_info"]
        oa = torch.load(theirs / f"{prefix}zero_pp_rank_0_mp_rank_{t:02d}_optim_states.pt",
                        weights_only=False)["optimizer_state_dict"]
        ob = torch.load(ours / f"{prefix}zero_pp_rank_0_mp_rank_{t:02d}_optim_states.pt",
                        weights_only=False)["optimizer_state_dict"]
        assert oa["zero_stage"] == ob["zero_stage"]
        assert torch.equal(oa["single_partition_of_fp32_groups"][0],
                           ob["single_partition_of_fp32_groups"][0])
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["base_optimizer_state"]["state"][0][k],
                               ob["base_optimizer_state"]["state"][0][k]), k
        assert oa["param_slice_mappings"] == ob["param_slice_mappings"]


def test_zero3_tp1_to_tp2_gives_deepspeeds_files_back(run, converted):
    # ZeRO stage 3 with AutoTP (DeepSpeed 0.19 trains it): AutoTP -> deepspeed tp 1 (stage 3
    # kept) -> --tp 2 gives each tp rank's stage 3 files back, flat fp32 partitions and Adam
    # moments bit for bit, placeholders in the module
    ours = converted["z3-tp2"][0] / "global_step2"
    theirs = run / "z3" / "global_step2"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for t in range(TP):
        a, b = (torch.load(d / f"zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt",
                           weights_only=False) for d in (theirs, ours))
        assert list(a["module"]) == list(b["module"])
        assert all(b["module"][n].numel() == 0 == a["module"][n].numel() for n in a["module"])
        assert a["param_shapes"] == b["param_shapes"]
        assert b["universal_checkpoint_info"] == a["universal_checkpoint_info"]
        for key in ("mp_world_size", "checkpoint_parallel_dimensions", "dp_world_size"):
            assert a[key] == b[key], key
        oa, ob = (torch.load(d / f"zero_pp_rank_0_mp_rank_{t:02d}_optim_states.pt",
                             weights_only=False)["optimizer_state_dict"] for d in (theirs, ours))
        assert oa["zero_stage"] == ob["zero_stage"]
        assert torch.equal(oa["fp32_flat_groups"][0], ob["fp32_flat_groups"][0])
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["optimizer_state_dict"]["state"][0][k],
                               ob["optimizer_state_dict"]["state"][0][k]), k


def test_real_autotp_engine_loads_and_resumes(run, resumed):
    # hf -> deepspeed --tp 2, loaded weights only: the training module's logits, exactly
    assert np.array_equal(_load(resumed / "weights_logits.safetensors")["logits"],
                          _load(run / "logits.safetensors")["logits"])
    # AutoTP -> tp 1 -> tp 2, resumed one step: the original run's own next step. Measured:
    # identical (every shard of fp32 weights and both moments, and the loss); tolerance 0.
    exp, got = (json.loads((d / "expected.json").read_text()) for d in (run, resumed))
    assert got["start_step"] == exp["global_step"]
    assert got["loss"] == [exp["next_loss"]]
    _same_next_step(run, resumed, "next")


def test_real_autotp_engine_resumes_from_the_universal_output(run, resumed):
    # AutoTP -> universal (the whole module, tp 1), loaded by an AutoTP engine at tp 2 with
    # DeepSpeed's own universal loader: the original run's own next step. Measured:
    # identical; tolerance 0.
    exp, got = (json.loads((d / "expected.json").read_text()) for d in (run, resumed))
    assert got["universal_start_step"] == exp["global_step"]
    assert got["universal_loss"] == [exp["next_loss"]]
    _same_next_step(run, resumed, "unext")


@pytest.mark.parametrize("arch", list(EXTRA))
def test_real_autotp_engine_resumes_the_extra_models(run, resumed, arch):
    # the tied Qwen3, the uneven Llama and the ZeRO 3 Llama, AutoTP -> tp 1 -> tp 2, loaded
    # by a real AutoTP engine and trained one step: the original run's own next step. Measured: identical
    # (every shard of fp32 weights and both moments, and the loss); tolerance 0.
    exp, got = (json.loads((d / "expected.json").read_text()) for d in (run, resumed))
    assert got[f"{arch}_start_step"] == exp["global_step"]
    assert got[f"{arch}_loss"] == [exp[f"{arch}_next_loss"]]
    _same_next_step(run, resumed, f"{arch}resumed", f"{arch}next")


def test_real_autotp_engine_resumes_the_uneven_model_from_the_universal_output(run, resumed):
    # the uneven Llama -> universal (the whole module), loaded by an AutoTP engine at tp 2
    # with DeepSpeed's universal loader (which makes the uneven cut itself): the original
    # run's own next step. Measured: identical; tolerance 0.
    exp, got = (json.loads((d / "expected.json").read_text()) for d in (run, resumed))
    assert got["uneven_universal_start_step"] == exp["global_step"]
    assert got["uneven_universal_loss"] == [exp["uneven_next_loss"]]
    _same_next_step(run, resumed, "unevenunext", "unevennext")


def _same_next_step(run, resumed, prefix, theirs="next"):
    for t in range(TP):
        for key in KEYS:
            a, b = _load(run / f"{theirs}.t{t}.{key}.safetensors"), \
                _load(resumed / f"{prefix}.t{t}.{key}.safetensors")
            assert a.keys() == b.keys()
            for name in a:
                assert np.array_equal(a[name], b[name]), (t, key, name)


def _universal_files(udir: Path) -> dict:
    """zero/<name>/<key>.pt of a universal folder: (name, file) -> the loaded object."""
    return {(d.name, f.name): torch.load(f, weights_only=False)
            for d in sorted((udir / "zero").iterdir()) if d.is_dir()
            for f in sorted(d.iterdir())}


def test_universal_holds_what_ds_to_universal_merges(run, converted):
    # DeepSpeed's ds_to_universal of the AutoTP checkpoint keeps the tp shards' model states
    # and marks each tensor for its tp cut; mapc's universal is the whole module (cut by the
    # loader from the model's own AutoTP metadata, test above): the same tensors
    theirs = _universal_files(run / "ckpt_universal")
    udir = converted["universal"][0] / (converted["universal"][0] / "latest_universal") \
        .read_text().strip()
    mine = _universal_files(udir)
    assert mine.keys() == theirs.keys() and len(mine) == 4 * 21
    for key, obj in theirs.items():
        if isinstance(obj, dict):
            assert torch.equal(mine[key]["param"], obj["param"]), key
        else:
            assert torch.equal(mine[key], obj), key


def test_ds_to_universal_merges_mapcs_autotp_output(run, resumed):
    # DeepSpeed's ds_to_universal of mapc's AutoTP -> tp 1 -> --tp 2 output (it reads the
    # universal_checkpoint_info mapc writes) equals its ds_to_universal of the original, file
    # for file (tensors and cut keys)
    theirs, mine = _universal_files(run / "ckpt_universal"), \
        _universal_files(resumed / "load_universal")
    assert mine.keys() == theirs.keys()
    for key, obj in theirs.items():
        if isinstance(obj, dict):
            assert mine[key].keys() == obj.keys(), key
            for k, v in obj.items():
                assert torch.equal(mine[key][k], v) if torch.is_tensor(v) else \
                    mine[key][k] == v, (key, k)
        else:
            assert torch.equal(mine[key], obj), key


def test_data_and_tensor_parallel_round_trip(run, converted, tmp_path):
    # tp 2 x dp 2 (no DeepSpeed run here: four processes): each tp rank's ZeRO files cut at
    # dp 2, read back to the same weights and moments
    out = tmp_path / "tp2dp2"
    mapc.convert(converted["tp2"][0], out, to="deepspeed", tp=TP, dp=2)
    names = sorted(p.name for p in (out / "global_step2").iterdir())
    assert names == sorted([f"mp_rank_{t:02d}_model_states.pt" for t in range(TP)] +
                           [f"zero_pp_rank_{r}_mp_rank_{t:02d}_optim_states.pt"
                            for r in range(2) for t in range(TP)])
    ms = torch.load(out / "global_step2" / "mp_rank_01_model_states.pt", weights_only=False)
    assert ms["dp_world_size"] == 2 and ms["mp_world_size"] == TP
    mapc.convert(out, tmp_path / "back", to="universal")
    udir = tmp_path / "back" / (tmp_path / "back" / "latest_universal").read_text().strip()
    for key in KEYS:
        for name, arr in _merged(run, "saved", key).items():
            got = torch.load(udir / "zero" / name / f"{key}.pt", weights_only=False)["param"]
            assert np.array_equal(got.detach().numpy(), arr), (key, name)


def test_without_config_refused_in_one_line(run, tmp_path):
    with pytest.raises(mapc.MapcError) as e:
        mapc.convert(run / "ckpt", tmp_path / "x", to="hf")
    msg = str(e.value)
    assert "AutoTP" in msg and "--config" in msg and "\n" not in msg.split("hint")[0].strip()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change,why", [
    # tp above the KV heads: DeepSpeed leaves ranks without attention; mapc refuses it
    ({"groups": 1}, "tp=2 is more than groups=1 .* a rank would hold none of it"),
    # DeepSpeed AutoTP itself refuses Phi-3 (checked against 0.19.8 and transformers 5.23:
    # ValueError on the tp_plan style rowwise_split_input; the phi3 preset cannot cut a GQA
    # qkv_proj)
    ({"model_type": "phi3"}, "DeepSpeed AutoTP does not shard Phi-3")])
def test_what_autotp_does_not_cut_is_refused(tmp_path, change, why):
    if change.get("model_type") == "phi3":
        from transformers import Phi3Config, Phi3ForCausalLM
        src = tmp_path / "hf"
        Phi3ForCausalLM(Phi3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                                   pad_token_id=None, bos_token_id=None, eos_token_id=None)
                        ).save_pretrained(src)
    else:
        cfg = llama_config(hidden=64, layers=2, heads=4, head_dim=16, **{"groups": 2, **change})
        src = write_random_hf(tmp_path / "hf", cfg)
    with pytest.raises(mapc.MapcError, match=why) as e:
        mapc.convert(src, tmp_path / "x", to="deepspeed", tp=TP)
    assert "\n" not in e.value.message and not (tmp_path / "x").exists()


def test_uneven_split_round_trip(tmp_path):
    # 3 KV groups, ffn 100, vocab 101 at tp 2 (no DeepSpeed run: the layout is checked
    # against DeepSpeed's files above, at other sizes): the first rank holds 2 KV groups,
    # 50 MLP rows and 51 vocabulary rows; hf -> AutoTP -> hf is the identity
    cfg = llama_config(hidden=96, layers=2, heads=6, groups=3, head_dim=16, ffn=100, vocab=101)
    src = write_random_hf(tmp_path / "hf", cfg)
    mapc.convert(src, tmp_path / "tp2", to="deepspeed", tp=2)
    ms = torch.load(tmp_path / "tp2" / "global_step0" / "mp_rank_01_model_states.pt",
                    weights_only=False)
    assert tuple(ms["module"]["model.layers.1.self_attn.q_proj.weight"].shape) == (32, 96)
    assert tuple(ms["module"]["model.layers.1.self_attn.o_proj.weight"].shape) == (96, 32)
    assert tuple(ms["module"]["lm_head.weight"].shape) == (50, 96)
    mapc.convert(tmp_path / "tp2", tmp_path / "back", to="hf")
    a, b = _load(src / "model.safetensors"), _load(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("setting,why", [
    ({"tp": {"tp_grain_size": 64}}, "tp_grain_size 64"),
    ({"partition_config": {"layer_specs": []}}, "partition_config"),
    ({"vocab_parallel_lm_head": False}, "vocab_parallel_lm_head false")])
def test_autotp_settings_that_cut_otherwise_are_refused(converted, tmp_path, setting, why):
    # DeepSpeed settings that change AutoTP's cut (tensor_parallel.tp.tp_grain_size,
    # partition_config, vocab_parallel_lm_head false): refused in one line, not misread
    import shutil
    src = tmp_path / "ck"
    shutil.copytree(converted["tp2"][0], src)
    for t in range(TP):
        f = src / "global_step2" / f"mp_rank_{t:02d}_model_states.pt"
        ms = torch.load(f, weights_only=False)
        ms["ds_config"]["tensor_parallel"].update(setting)
        torch.save(ms, f)
    with pytest.raises(mapc.MapcError, match=why) as e:
        mapc.convert(src, tmp_path / "x", to="hf")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
