"""Virtual pipeline stages (Megatron's interleaved schedule) in the legacy torch format, against
megatron-core.

Ground truth: one megatron-core run (tests/groundtruth/mcore_optim.py with ``cfg["vpp"]``)
builds one GPTModel chunk per virtual stage on each of pp=2 ranks (as Megatron-LM's
``get_model``), steps one bf16 optimizer over both chunks and saves ``model0``/``model1`` with the
optimizer state; the same trained chunks are also saved as a torch_dist checkpoint. It records
megatron-core's own global ``layer_number`` of every chunk's local layer. A second run loads
what mapc wrote into fresh chunks and optimizer. Both are shared by every test here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import mapc  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from mapc.runtime.containers import open_source  # noqa: E402
from tests.groundtruth import mcore_optim  # noqa: E402

# 8 layers over pp=2 ranks x vpp=2 chunks: two layers per chunk, so local != global numbers
CFG = dict(hidden=64, layers=8, heads=8, groups=2, head_dim=8, ffn=96, vocab=256, tied=False,
           vpp=2)
TP, PP, VPP, DTYPE = 1, 2, 2, "bf16"


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    """(legacy vpp checkpoint, torch_dist checkpoint) of one megatron-core run."""
    d = tmp_path_factory.mktemp("vpp_gt")
    root = mcore_optim.save_checkpoint(d / "torch", CFG, TP, PP, DTYPE, dist=d / "dist")
    return root, d / "dist"


@pytest.fixture(scope="module")
def flat(gt, tmp_path_factory):
    """mapc: the vpp checkpoint -> megatron tp=1 pp=1 (no virtual stages)."""
    out = tmp_path_factory.mktemp("vpp_flat") / "flat"
    mapc.convert(gt[0], out, to="megatron", tp=1, pp=1)
    return out


def _file(root, p):
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    return root / f"iter_{int(it):07d}" / mcore_optim.rank_dir(0, p, PP) / "model_optim_rng.pt"


def _global_name(name: str, v: int, layers: dict) -> str:
    """Chunk v's local tensor name at its global layer number (``layers``: megatron-core's
    ``model{v}.decoder.layers.{local}`` -> global layer, as the worker saved it)."""
    for local, g in layers.items():
        pre = local.removeprefix(f"model{v}.") + "."
        if local.startswith(f"model{v}.") and name.startswith(pre):
            return f"decoder.layers.{g}." + name[len(pre):]
    return name


def _vcoord(v, p):
    return (("tp", 0), ("pp", v * PP + p))


def _np(t):
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def test_mapc_reads_megatron_core_chunks(gt):
    """Every chunk's parameters and their optimizer slots, as mapc reads them at virtual stage
    v * pp + p, equal megatron-core's (the index -> name map from the live optimizer, which
    spans both chunks)."""
    root = gt[0]
    with open_source(root) as src:
        assert src.format == "megatron" and src.vpp == VPP
        assert src.topology == {"tp": TP, "pp": PP * VPP}
        assert src.slots() == ["param", "master", "exp_avg", "exp_avg_sq"]
        for p in range(PP):
            sd = torch.load(_file(root, p), weights_only=False)
            opt = sd["optimizer"]
            names = json.loads((root / f"names_0_{p}.json").read_text())
            assert sum(map(len, names)) == sum(len(sd[f"model{v}"]) - sum(
                k.endswith("_extra_state") for k in sd[f"model{v}"]) for v in range(VPP))
            for g, group in enumerate(names):
                fp16 = [n for n in group if n.split(".", 1)[0] and
                        sd[n.split(".", 1)[0]][n.split(".", 1)[1]].dtype != torch.float32]
                for j, full in enumerate(group):
                    chunk, name = full.split(".", 1)
                    coord = _vcoord(int(chunk[5:]), p)
                    state = opt["optimizer"]["state"][opt["optimizer"]["param_groups"][g]
                                                      ["params"][j]]
                    np.testing.assert_array_equal(src.read(name, coord), _np(sd[chunk][name]))
                    for slot in ("exp_avg", "exp_avg_sq"):
                        np.testing.assert_array_equal(src.read(name, coord, slot=slot),
                                                      _np(state[slot]), err_msg=full)
                    if full in fp16:
                        np.testing.assert_array_equal(
                            src.read(name, coord, slot="master"),
                            _np(opt["fp32_from_fp16_params"][g][fp16.index(full)]))
        assert src.training_state()["step"] == float(mcore_optim.STEPS)


def test_chunk_layers_are_megatron_core_global_layers(gt, flat):
    """Chunk v of rank p, local layer j, is the layer megatron-core numbers it
    (``layer_number`` - 1, its get_transformer_layer_offset): mapc's pp=1 output holds every
    chunk layer's tensors and moments under that global number; embedding and output layer
    come from the first and last virtual stage."""
    root = gt[0]
    with open_source(flat) as one:
        c0 = (("tp", 0), ("pp", 0))
        seen = set()
        for p in range(PP):
            sd = torch.load(_file(root, p), weights_only=False)
            layers = json.loads((root / f"layers_0_{p}.json").read_text())
            with open_source(root) as src:
                for v in range(VPP):
                    for name, t in sd[f"model{v}"].items():
                        if name.endswith("_extra_state"):
                            continue
                        glob = _global_name(name, v, layers)
                        seen.add(glob)
                        np.testing.assert_array_equal(one.read(glob, c0), _np(t), err_msg=name)
                        np.testing.assert_array_equal(
                            one.read(glob, c0, slot="exp_avg"),
                            src.read(name, _vcoord(v, p), slot="exp_avg"), err_msg=name)
        assert seen == set(one.names(c0))
        assert {g for p in range(PP) for g in json.loads(
            (root / f"layers_0_{p}.json").read_text()).values()} == set(range(CFG["layers"]))


def test_megatron_core_loads_mapc_vpp_output(gt, flat, tmp_path):
    """pp=1 -> megatron --pp 2 --vpp 2 through mapc, then megatron-core's chunks
    load_state_dict (strict) and optimizer.load_state_dict: the loaded chunks and optimizer
    state_dict equal what megatron-core saved, index for index, bit for bit."""
    root = gt[0]
    mapc.convert(flat, tmp_path / "vpp", to="megatron", tp=TP, pp=PP, vpp=VPP)
    loaded = mcore_optim.load_checkpoint(tmp_path / "vpp", CFG, TP, PP, DTYPE, tmp_path / "ld")
    from tests.test_megatron_optim import _same
    for p in range(PP):
        saved = torch.load(_file(root, p), weights_only=False)
        written = torch.load(_file(tmp_path / "vpp", p), weights_only=False)
        assert [k for k in written if k.startswith("model")] == ["model0", "model1"]
        assert written["args"].virtual_pipeline_model_parallel_size == VPP
        assert written["args"].pipeline_model_parallel_size == PP
        got = torch.load(loaded / f"rank0_{p}.pt", weights_only=False)
        _same(saved["optimizer"], got["optimizer"], f"rank {p}")
        _same(saved["opt_param_scheduler"], got["opt_param_scheduler"])
        for v in range(VPP):
            assert [k for k in got[f"model{v}"] if not k.endswith("_extra_state")] == \
                [k for k in saved[f"model{v}"] if not k.endswith("_extra_state")]
            for k, t in got[f"model{v}"].items():
                if not k.endswith("_extra_state"):
                    assert torch.equal(t, saved[f"model{v}"][k]), (v, k)


def test_torch_dist_saved_with_vpp_is_global(gt, flat):
    """torch_dist keys are global, so virtual stages change nothing there: the torch_dist
    checkpoint megatron-core saved from the same vpp chunks reads (as torch_dist, no
    virtual stages) into the same tensors as the legacy vpp checkpoint."""
    with open_source(gt[1]) as dist:
        assert dist.format == "torch_dist"
    # dist -> megatron pp=1 and legacy vpp -> megatron pp=1 hold the same weights
    out = flat.parent / "from_dist"
    mapc.convert(gt[1], out, to="megatron", tp=1, pp=1)
    c0 = (("tp", 0), ("pp", 0))
    with open_source(out) as a, open_source(flat) as b:
        assert sorted(a.names(c0)) == sorted(b.names(c0))
        for n in a.names(c0):
            x, y = a.read(n, c0), b.read(n, c0)
            assert x.dtype == y.dtype and np.array_equal(x, y), n


# ---- without megatron-core ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf8(tmp_path_factory):
    from tests.conftest import llama_config, write_random_hf
    return write_random_hf(tmp_path_factory.mktemp("vpp_hf") / "hf", llama_config(layers=8))


def test_hf_vpp_round_trip_and_like(hf8, tmp_path):
    """hf -> megatron tp=2 pp=2 vpp=2 -> hf is bit-exact; --like a vpp checkpoint writes vpp."""
    from safetensors.numpy import load_file
    mapc.convert(hf8, tmp_path / "m", to="megatron", tp=2, pp=2, vpp=2)
    sd = torch.load(tmp_path / "m/release/mp_rank_01_001/model_optim_rng.pt",
                    weights_only=False)
    assert "model" not in sd and {"model0", "model1"} <= set(sd)
    assert sd["args"].num_layers_per_virtual_pipeline_stage == 2
    assert "output_layer.weight" in sd["model1"] and "output_layer.weight" not in sd["model0"]
    assert mapc.inspect(tmp_path / "m")["topology"] == {"tp": 2, "pp": 2, "vpp": 2}
    mapc.convert(tmp_path / "m", tmp_path / "back", to="hf")
    a, b = (load_file(str(p / "model.safetensors")) for p in (hf8, tmp_path / "back"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    mapc.convert(hf8, tmp_path / "like", like=tmp_path / "m")
    with open_source(tmp_path / "like") as s:
        assert s.vpp == 2 and s.topology == {"tp": 2, "pp": 4}


def test_vpp_in_dry_run(hf8, tmp_path, capsys):
    from mapc.cli.main import main
    assert main(["convert", str(hf8), str(tmp_path / "x"), "--to", "megatron", "--pp", "2",
                 "--vpp", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "    vpp: 2\n" in out and "    pp: 2\n" in out
    assert "release/mp_rank_00_001/model_optim_rng.pt" in out and "mp_rank_00_003" not in out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw,words", [
    (dict(to="hf", vpp=2), "--to hf does not take --vpp 2"),
    (dict(to="megatron", vpp=2), "--vpp 2 needs --pp of at least 2"),
    (dict(to="megatron", pp=3, vpp=2), "--pp 3 --vpp 2 is 6 virtual pipeline stages"),
    (dict(to="megatron", pp=2, vpp=0), "--vpp 0 must be a positive integer"),
    # torch_dist's weights are global: --vpp lays out the distributed optimizer's buffers only
    (dict(to="torch_dist", pp=2, vpp=2), "--vpp 2 sets the distributed optimizer's virtual "
                                         "pipeline size, but the source has no optimizer state"),
])
def test_vpp_refusals(hf8, tmp_path, kw, words):
    with pytest.raises(MapcError, match=words):
        mapc.convert(hf8, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_chunks_with_a_gap_are_a_clean_error(hf8, tmp_path):
    mapc.convert(hf8, tmp_path / "m", to="megatron", pp=2, vpp=2)
    f = tmp_path / "m/release/mp_rank_00_000/model_optim_rng.pt"
    sd = torch.load(f, weights_only=False)
    sd["model2"] = sd.pop("model1")
    torch.save(sd, f)
    with pytest.raises(MapcError, match="not model0..model1"):
        mapc.convert(tmp_path / "m", tmp_path / "out", to="hf")


# ---- virtual pipeline with uneven stages -------------------------------------------------------
def _virtual_stage_layers(layers, pp, vpp, first, last):
    """mapc's megatron layout at pp * vpp virtual stages with these stage sizes: the global
    layer numbers of each virtual stage, in local order."""
    from mapc.compiler.plan import bind_config, plan_layout
    from mapc.compiler.resolve import read_config
    from mapc.compiler.spec import load_spec
    from tests.conftest import llama_config
    sp = load_spec("llama")
    env = bind_config(sp, read_config(llama_config(hidden=32, layers=layers, heads=4, groups=2,
                                                   ffn=48, vocab=50)))
    plan = plan_layout(sp, "megatron", env, {"pp": pp * vpp},
                       {"first_stage_layers": first or 0, "last_stage_layers": last or 0},
                       vpp=vpp)
    out = [[] for _ in range(pp * vpp)]
    for inst, coord, name in plan.placements():
        if name.endswith("self_attention.linear_proj.weight"):
            out[dict(coord)["pp"]].append((int(name.split(".")[2]), inst.index))
    return [[g for _, g in sorted(s)] for s in out]


@pytest.mark.parametrize("layers, pp, vpp, first, last", [
    (8, 2, 2, 2, None), (8, 2, 2, None, 2), (12, 3, 2, 2, 2), (14, 3, 2, 4, 2),
    (10, 2, 2, 4, None), (18, 4, 3, 3, 3), (16, 4, 2, None, 4), (12, 2, 3, 3, None),
])
def test_vpp_uneven_layers_are_megatron_cores(layers, pp, vpp, first, last):
    """megatron-core's get_transformer_layer_offset and get_num_layers_to_build, called per
    (virtual stage, pp rank) with virtual_pipeline_model_parallel_size and uneven first/last
    stages, give each chunk's first global layer and layer count; mapc places exactly those
    layers at virtual stage ``chunk * pp + rank``."""
    tl = pytest.importorskip("megatron.core.transformer.transformer_layer")
    tb = pytest.importorskip("megatron.core.transformer.transformer_block")
    import types
    config = types.SimpleNamespace(
        num_layers=layers, pipeline_model_parallel_size=pp, pipeline_model_parallel_layout=None,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        virtual_pipeline_model_parallel_size=vpp, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False, mtp_num_layers=None)
    ours = _virtual_stage_layers(layers, pp, vpp, first, last)
    for v in range(vpp):
        for r in range(pp):
            offset = tl.get_transformer_layer_offset(config, v, r)
            n = tb.get_num_layers_to_build(config, v, r)
            assert ours[v * pp + r] == list(range(offset, offset + n)), (v, r)
    assert sorted(g for s in ours for g in s) == list(range(layers))


@pytest.mark.parametrize("first, last, words", [
    (3, None, r"first stage \(3 layers\), each middle stage \(5 layers\) not divisible"),
    (2, None, "each middle stage"),          # 8 - 2 = 6 on ranks 1..2: 3 each
])
def test_vpp_uneven_sizes_megatron_core_refuses_are_refused(hf8, tmp_path, first, last, words):
    with pytest.raises(MapcError, match=words):
        mapc.convert(hf8, tmp_path / "out", to="megatron", pp=3 if first == 2 else 2, vpp=2,
                     pp_first_stage=first, pp_last_stage=last)
    assert not (tmp_path / "out").exists()


# 8 layers, pp=2, vpp=2, 2 on the first rank: chunks of 1 | 3 | 1 | 3 layers
CFG_U = dict(CFG, layers_first_stage=2)


@pytest.fixture(scope="module")
def gt_uneven(tmp_path_factory):
    """megatron-core's legacy vpp checkpoint with an uneven first stage (one run)."""
    d = tmp_path_factory.mktemp("vpp_uneven_gt")
    return mcore_optim.save_checkpoint(d / "torch", CFG_U, TP, PP, DTYPE)


def test_vpp_uneven_chunks_read_as_megatron_core_numbers_them(gt_uneven, tmp_path):
    """mapc reads the uneven vpp checkpoint (stage sizes from its args) and its pp=1 output
    holds every chunk's tensors and Adam moments under the global layer megatron-core
    numbered them (``layer_number`` - 1)."""
    root = gt_uneven
    flat = tmp_path / "flat"
    mapc.convert(root, flat, to="megatron", tp=1, pp=1)
    c0 = (("tp", 0), ("pp", 0))
    seen = set()
    with open_source(flat) as one, open_source(root) as src:
        assert src.vpp == VPP and src.topology == {"tp": TP, "pp": PP * VPP}
        for p in range(PP):
            sd = torch.load(_file(root, p), weights_only=False)
            layers = json.loads((root / f"layers_0_{p}.json").read_text())
            assert len(layers) == (1 if p == 0 else 3) * VPP
            for v in range(VPP):
                for name, t in sd[f"model{v}"].items():
                    if name.endswith("_extra_state"):
                        continue
                    glob = _global_name(name, v, layers)
                    seen.add(glob)
                    np.testing.assert_array_equal(one.read(glob, c0), _np(t), err_msg=name)
                    np.testing.assert_array_equal(
                        one.read(glob, c0, slot="exp_avg"),
                        src.read(name, _vcoord(v, p), slot="exp_avg"), err_msg=name)
        assert seen == set(one.names(c0))


def test_megatron_core_loads_mapc_vpp_uneven_output(gt_uneven, tmp_path):
    """pp=1 -> megatron --pp 2 --vpp 2 --pp-first-stage 2 through mapc: megatron-core's
    uneven chunks load_state_dict (strict) and optimizer.load_state_dict, and what they hold
    equals what megatron-core saved, bit for bit; the args state the split as Megatron-LM
    takes it (chunks per rank, not layers per chunk)."""
    root = gt_uneven
    mapc.convert(root, tmp_path / "flat", to="megatron", tp=1, pp=1)
    mapc.convert(tmp_path / "flat", tmp_path / "vpp", to="megatron", tp=TP, pp=PP, vpp=VPP,
                 pp_first_stage=2)
    loaded = mcore_optim.load_checkpoint(tmp_path / "vpp", CFG_U, TP, PP, DTYPE,
                                         tmp_path / "ld")
    from tests.test_megatron_optim import _same
    for p in range(PP):
        saved = torch.load(_file(root, p), weights_only=False)
        written = torch.load(_file(tmp_path / "vpp", p), weights_only=False)
        args = written["args"]
        assert args.virtual_pipeline_model_parallel_size == VPP
        assert args.num_virtual_stages_per_pipeline_rank == VPP
        assert args.num_layers_per_virtual_pipeline_stage is None
        assert args.num_layers_in_first_pipeline_stage == 2
        got = torch.load(loaded / f"rank0_{p}.pt", weights_only=False)
        _same(saved["optimizer"], got["optimizer"], f"rank {p}")
        for v in range(VPP):
            assert [k for k in got[f"model{v}"] if not k.endswith("_extra_state")] == \
                [k for k in saved[f"model{v}"] if not k.endswith("_extra_state")]
            for k, t in got[f"model{v}"].items():
                if not k.endswith("_extra_state"):
                    assert torch.equal(t, saved[f"model{v}"][k]), (v, k)
