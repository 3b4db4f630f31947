"""A real transformers Trainer checkpoint of a tiny Mixtral: transformers 5 steps the module's
merged expert parameters (mlp.experts.gate_up_proj [experts, 2 * ffn, hidden], down_proj), so
optimizer.pt numbers their states ([16, 5] parameters), while model.safetensors holds
save_pretrained's per-expert names (36 decayed tensors). mapc numbers the optimizer by the hf
layout's other naming (expert_names=module) and cuts each stored tensor's moments from its
parameters' moments with the compiled program between the two namings.

Writing (--with-optimizer), model.safetensors keeps save_pretrained's names while optimizer.pt
numbers the module's parameters (their moments cut from the stored tensors' by the program
the other way), as Trainer saves them.

Ground truth: the real Trainer.create_optimizer's parameter order on the real module, and
slices of optimizer.pt taken here (gate rows first in gate_up_proj, as transformers' own
save_pretrained splits the weights: checked on the weights below); the export gives back
the checkpoint's optimizer.pt and weights bit for bit, and a Trainer resumed from it steps
exactly like Trainer resumed from the original."""
from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from mapc.api import convert, resolve  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from mapc.runtime.containers import open_source  # noqa: E402
from tests.test_hf_trainer import Rows, _args, assert_same_state  # noqa: E402
from tests.test_mixtral_module_names import CONFIG  # noqa: E402

FFN = CONFIG["intermediate_size"]


def _model():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**CONFIG))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """checkpoint-3 of a 6-step run, and the module's parameter names in optimizer order."""
    out = tmp_path_factory.mktemp("mixtral_trainer")
    model = _model()
    t = transformers.Trainer(model=model, args=_args(out, max_steps=6, save_strategy="steps",
                                                     save_steps=3), train_dataset=Rows(24))
    t.train()
    probe = _model()
    opt = transformers.Trainer(model=probe, args=_args(out / "probe"),
                               train_dataset=Rows(1)).create_optimizer()
    name_of = {id(p): n for n, p in probe.named_parameters()}
    order = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    return out / "checkpoint-3", order


def _opt(path):
    return torch.load(str(path / "optimizer.pt"), weights_only=True)


def _slice(module_state: dict, stored: str):
    """The module parameter's state a stored (save_pretrained) tensor's state is: an
    independent statement of transformers' Mixtral weight conversion."""
    if ".block_sparse_moe.experts." in stored:
        layer, rest = stored.split(".block_sparse_moe.experts.")
        e, w = int(rest.split(".")[0]), rest.split(".")[1]
        if w == "w2":
            return module_state[f"{layer}.mlp.experts.down_proj"][e]
        gate_up = module_state[f"{layer}.mlp.experts.gate_up_proj"][e]
        return gate_up[:FFN] if w == "w1" else gate_up[FFN:]
    return module_state[stored.replace(".block_sparse_moe.gate.", ".mlp.gate.")]


def test_the_checkpoint_is_numbered_by_merged_parameters(trained):
    from safetensors.torch import load_file
    ckpt, order = trained
    opt = _opt(ckpt)
    assert [len(g["params"]) for g in opt["param_groups"]] == [16, 5]
    assert "model.layers.0.mlp.experts.gate_up_proj" in order
    stored = load_file(str(ckpt / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in stored
    # the slicing rule of _slice is transformers' own: the module's weights cut by it are the
    # tensors save_pretrained stored
    m = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    module = m.state_dict()
    assert [n for n in stored if not torch.equal(_slice(module, n), stored[n])] == []


@pytest.mark.parametrize("slot", ["exp_avg", "exp_avg_sq"])
def test_reads_each_stored_tensors_moments_from_its_parameter(trained, slot):
    ckpt, order = trained
    opt = _opt(ckpt)
    module = {n: opt["state"][i][slot] for i, n in enumerate(order)}
    src = open_source(ckpt)
    res = resolve(src)
    assert res.plan.params == {"expert_names": "saved"}
    names = src.names()
    assert len(names) == 36 + 5
    for name in names:
        want = _slice(module, name).numpy()
        got = src.read(name, (), slot=slot)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), (slot, name)


def test_param_groups_name_the_stored_tensors(trained):
    ckpt, _ = trained
    src = open_source(ckpt)
    resolve(src)
    ts = src.training_state()
    opt = _opt(ckpt)
    decay, plain = (g["params"] for g in ts["param_groups"])
    assert len(decay) == 36 and len(plain) == 5
    assert all("norm" in n for n in plain) and not any("norm" in n for n in decay)
    assert set(decay + plain) == set(src.names())
    for mine, theirs in zip(ts["param_groups"], opt["param_groups"], strict=True):
        assert {k: v for k, v in mine.items() if k != "params"} == \
            {k: v for k, v in theirs.items() if k != "params"}
    assert ts["step"] == 3.0 and ts["iteration"] == 3


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """checkpoint-3 -> deepspeed -> hf --with-optimizer, and checkpoint-3 -> hf
    --with-optimizer: model.safetensors in save_pretrained's names, optimizer.pt numbered by
    the module's parameters (found from MixtralForCausalLM built on the meta device)."""
    ckpt, _ = trained
    d = tmp_path_factory.mktemp("mixtral_export")
    convert(ckpt, d / "ds", to="deepspeed")
    convert(d / "ds", d / "via_ds", to="hf", with_optimizer=True)
    convert(ckpt, d / "direct", to="hf", with_optimizer=True)
    convert(ckpt, d / "td", to="torch_dist")
    convert(d / "td", d / "via_td", to="hf", with_optimizer=True)
    return d


@pytest.mark.parametrize("way", ["via_ds", "direct", "via_td"])
def test_export_gives_back_the_checkpoint(trained, exported, way):
    """Through megatron-core's torch_dist, every state tensor and group membership comes back
    (its param groups carry megatron-core's hyper-parameter keys instead of Trainer's)."""
    from safetensors.torch import load_file
    ckpt, _ = trained
    a, b = _opt(ckpt), _opt(exported / way)
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    if way != "via_td":
        assert a["param_groups"] == b["param_groups"]
    assert_same_state(a, b)
    w, v = load_file(str(ckpt / "model.safetensors")), load_file(str(exported / way /
                                                                     "model.safetensors"))
    assert w.keys() == v.keys() and all(torch.equal(w[k], v[k]) for k in w)


def _resume(ckpt, out):
    model = _model()
    t = transformers.Trainer(model=model, args=_args(out, max_steps=4), train_dataset=Rows(24))
    loss = t.train(resume_from_checkpoint=str(ckpt)).training_loss
    assert t.state.global_step == 4
    return model.state_dict(), loss


def test_trainer_resumes_from_the_export_as_from_the_original(trained, exported, tmp_path):
    ckpt, _ = trained
    a, la = _resume(ckpt, tmp_path / "a")
    b, lb = _resume(exported / "via_ds", tmp_path / "b")
    assert la == lb
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    from safetensors.torch import load_file
    before = load_file(str(ckpt / "model.safetensors"))
    assert not torch.equal(before["lm_head.weight"], a["lm_head.weight"])


def test_module_names_written_with_set_number_the_optimizer_alike(trained, exported,
                                                                   tmp_path):
    """--set expert_names=module: the stored names are the module's, the same optimizer."""
    convert(exported / "ds", tmp_path / "module", to="hf", with_optimizer=True,
            set=["expert_names=module"])
    a, b = _opt(trained[0]), _opt(tmp_path / "module")
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"]
               for k in a["state"][i])


def test_an_optimizer_of_neither_naming_is_refused(trained, tmp_path):
    ckpt, _ = trained
    bad = tmp_path / "checkpoint-3"
    shutil.copytree(ckpt, bad)
    opt = _opt(bad)
    g0, g1 = opt["param_groups"]
    g1["params"].insert(0, g0["params"].pop())
    torch.save(opt, str(bad / "optimizer.pt"))
    with pytest.raises(MapcError, match=r"param groups of \[15, 6\] parameters; .* as \[36, 5\] "
                                        r".*or \[16, 5\] named as hf\(expert_names='module'\)"):
        convert(bad, tmp_path / "out", to="dcp")
    assert not (tmp_path / "out").exists()
