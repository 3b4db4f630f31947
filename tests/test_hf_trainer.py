"""HuggingFace Trainer checkpoints with optimizer state, against the REAL transformers Trainer.

* A tiny LlamaForCausalLM trained by ``transformers.Trainer`` (CPU, AdamW, linear schedule,
  fixed data, sequential sampler) saves ``checkpoint-3``; mapc reads its Adam moments exactly
  (compared with ``torch.load(optimizer.pt)`` mapped through the parameter order of the real
  ``Trainer.create_optimizer``), and ``hf(Trainer) -> dcp -> hf --with-optimizer`` gives back
  bit-identical optimizer tensors.
* Trainer resuming from mapc's export of that checkpoint steps exactly like Trainer resuming
  from the original.
* A real DeepSpeed ZeRO-1 checkpoint (conftest ``make("z1")``: two param groups, weight decay
  0.1 / 0.0) exported with ``--to hf --with-optimizer``: Trainer resumed from it on the next
  batch of the DeepSpeed data stream matches DeepSpeed continuing the run.
* mapc's decay/order rules (runtime/containers/hf_trainer.py) equal Trainer's own for every
  shipped family whose hf names are transformers' parameter names.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from mapc.api import convert, resolve  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from mapc.runtime.containers import open_source  # noqa: E402
from tests.conftest import llama_config, write_random_hf  # noqa: E402

MODEL = dict(hidden_size=64, head_dim=16, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, vocab_size=100,
             max_position_embeddings=64, tie_word_embeddings=False)
SEQ, BATCH = 16, 4


class Rows(torch.utils.data.Dataset):
    """Fixed token rows: row i is seeded by i (or the given tensor's rows)."""

    def __init__(self, n=0, rows=None):
        self.rows = rows if rows is not None else torch.stack(
            [torch.randint(0, MODEL["vocab_size"], (SEQ,),
                           generator=torch.Generator().manual_seed(i)) for i in range(n)])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=1e-2,
                weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                max_grad_norm=1.0, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                seed=0, save_strategy="no", train_sampling_strategy="sequential",
                dataloader_num_workers=0, disable_tqdm=True, logging_strategy="no")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _model(config=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**(config or MODEL))
    return transformers.LlamaForCausalLM(cfg)


def _trainer(model, args, rows):
    return transformers.Trainer(model=model, args=args, train_dataset=rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trainer's checkpoint-3 of a 6-step linear-schedule run over 24 fixed rows."""
    out = tmp_path_factory.mktemp("trainer")
    t = _trainer(_model(), _args(out, max_steps=6, save_strategy="steps", save_steps=3),
                 Rows(24))
    t.train()
    ckpt = out / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "training_args.bin").is_file()
    return ckpt


def _index_names(config_dir: Path) -> dict[int, str]:
    """optimizer index -> parameter name, from the REAL Trainer.create_optimizer."""
    model = _model(json.loads((config_dir / "config.json").read_text()))
    t = _trainer(model, _args(config_dir.parent / "probe"), Rows(1))
    opt = t.create_optimizer()
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    return dict(enumerate(order))


def assert_same_state(a: dict, b: dict) -> None:
    """Two optimizer state dicts hold the same slots in the same order, byte for byte."""
    assert list(a["state"]) == list(b["state"])
    for i in a["state"]:
        assert list(a["state"][i]) == list(b["state"][i])
        for k, t in a["state"][i].items():
            u = b["state"][i][k]
            assert t.dtype == u.dtype and t.shape == u.shape
            assert t.numpy().tobytes() == u.numpy().tobytes(), (i, k)


def _torch_opt(path):
    return torch.load(str(Path(path) / "optimizer.pt"), weights_only=True)


@pytest.fixture(scope="module")
def index_names(trained):
    return _index_names(trained)


@pytest.mark.parametrize("slot", ["exp_avg", "exp_avg_sq"])
def test_reads_trainer_moments_exactly(trained, index_names, slot):
    opt = _torch_opt(trained)
    src = open_source(trained)
    resolve(src)
    assert src.slots() == ["param", "master", "exp_avg", "exp_avg_sq"]
    assert len(index_names) == len(opt["state"]) == 21
    for i, name in index_names.items():
        want = opt["state"][i][slot].numpy()
        got = src.read(name, (), slot=slot)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), f"{slot} of {name} (index {i})"


def test_reads_trainer_master_and_training_state(trained):
    from safetensors.numpy import load_file
    weights = load_file(str(trained / "model.safetensors"))
    src = open_source(trained)
    resolve(src)
    for name, w in weights.items():
        assert src.read(name, (), slot="master").tobytes() == w.astype(np.float32).tobytes()
    opt = _torch_opt(trained)
    ts = src.training_state()
    assert ts["iteration"] == json.loads((trained / "trainer_state.json").read_text())[
        "global_step"] == 3
    assert ts["step"] == float(opt["state"][0]["step"]) == 3.0
    for mine, theirs in zip(ts["param_groups"], opt["param_groups"], strict=True):
        assert {k: v for k, v in mine.items() if k != "params"} == \
            {k: v for k, v in theirs.items() if k != "params"}
    names = _index_names(trained)
    assert [n for g in ts["param_groups"] for n in g["params"]] == [names[i] for i in
                                                                    range(len(names))]
    assert ts["lr_scheduler"] == torch.load(str(trained / "scheduler.pt"), weights_only=True)


@pytest.fixture(scope="module")
def round_trip(trained, tmp_path_factory):
    """checkpoint-3 -> dcp -> hf --with-optimizer."""
    d = tmp_path_factory.mktemp("rt")
    convert(trained, d / "dcp", to="dcp")
    convert(d / "dcp", d / "hf", to="hf", with_optimizer=True)
    return d / "hf"


def test_round_trip_through_dcp_is_byte_identical(trained, round_trip):
    a, b = _torch_opt(trained), _torch_opt(round_trip)
    assert a["param_groups"] == b["param_groups"]
    assert_same_state(a, b)
    assert torch.load(str(round_trip / "scheduler.pt"), weights_only=True) == \
        torch.load(str(trained / "scheduler.pt"), weights_only=True)
    assert json.loads((round_trip / "trainer_state.json").read_text()) == \
        json.loads((trained / "trainer_state.json").read_text())


def _resume(ckpt, out, max_steps, rows=None, config=None, **kw):
    """Trainer.train(resume_from_checkpoint=ckpt) for one more step, to max_steps;
    returns (model, that step's loss)."""
    model = _model(config)
    t = _trainer(model, _args(out, max_steps=max_steps, **kw),
                 rows if rows is not None else Rows(24))
    result = t.train(resume_from_checkpoint=str(ckpt))
    assert t.state.global_step == max_steps
    return model, result.training_loss


def test_trainer_resumes_from_export_exactly_as_from_original(trained, round_trip, tmp_path):
    a, la = _resume(trained, tmp_path / "a", 4)
    b, lb = _resume(round_trip, tmp_path / "b", 4)
    assert la == lb
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    # the resumed step really moved the weights away from checkpoint-3's
    from safetensors.torch import load_file
    before = load_file(str(trained / "model.safetensors"))
    assert not torch.equal(before["lm_head.weight"], sa["lm_head.weight"])


# ---- DeepSpeed -> Trainer --------------------------------------------------------------------
def test_trainer_continues_deepspeed_run(make, tmp_path):
    """DeepSpeed ZeRO-1 (dp=2, 3 steps, AdamW groups wd 0.1 / 0.0, clip 1.0) exported for
    Trainer; Trainer's step 4 on batch_for_step(3) vs DeepSpeed's own step 4 (universal resume
    at world size 1, so neither side all-reduces)."""
    from tests.groundtruth import deepspeed_ckpt as ds
    from tests.groundtruth.ds_train import batch_for_step
    ckpt = make("z1")
    meta = ds.read_expected(ckpt)
    ds.ds_to_universal(ckpt)
    ref = ds.resume_and_step(ckpt, 1, universal=True, steps=1)
    out = tmp_path / "hf"
    convert(ckpt, out, to="hf", with_optimizer=True)
    step = meta["global_step"]
    rows = batch_for_step(step, meta["train_batch_size"], meta["seq_len"],
                          meta["model"]["vocab_size"])
    opt = _torch_opt(out)
    assert [g["weight_decay"] for g in opt["param_groups"]] == [meta["weight_decay"], 0.0]
    model, loss = _resume(
        out, tmp_path / "run", step + 1, rows=Rows(rows=rows), config=meta["model"],
        per_device_train_batch_size=meta["train_batch_size"], learning_rate=meta["lr"],
        weight_decay=meta["weight_decay"], max_grad_norm=meta["gradient_clipping"],
        lr_scheduler_type="constant", ignore_data_skip=True)
    # Tolerance: both sides start from the same fp32 weights, moments, step and batch and run
    # the same AdamW math; they may differ only in summation order (Trainer divides the
    # token-summed loss by the token count where DeepSpeed takes the mean; DeepSpeed's clip norm
    # is over one flat partition, torch's over per-tensor norms). DeepSpeed's own spread across
    # world sizes for this step is 1.2e-7 (dp1 vs dp3); on the reference machine Trainer
    # matched dp1 bit for bit. atol 1e-6 is 1e-4 of this step's movement (~1e-2 = lr), while a
    # wrong moment, step, decay group or lr moves weights by 1e-5 (decay lr*wd*|w|) or more.
    assert loss == pytest.approx(ref["loss"][0], rel=1e-6)
    want = ds.load_state(ref["dir"], "fp32")
    got = {n: p.detach().numpy() for n, p in model.named_parameters()}
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


# ---- errors --------------------------------------------------------------------------------------
def test_with_optimizer_needs_optimizer_state(tmp_path):
    src = write_random_hf(tmp_path / "plain", llama_config(layers=2))
    with pytest.raises(MapcError, match="no optimizer state"):
        convert(src, tmp_path / "out", to="hf", with_optimizer=True)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---- the order and decay rules against Trainer's own ---------------------------------------------
FAMILIES = {
    "llama": llama_config(layers=2),
    "qwen2": dict(llama_config(layers=2), model_type="qwen2",
                  architectures=["Qwen2ForCausalLM"]),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=32, n_layer=2,
                 n_head=4, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_groups_are_trainers(family, tmp_path):
    """mapc's two groups (names in optimizer-index order) == the real Trainer.create_optimizer
    on the real transformers model of the family."""
    from mapc.compiler.plan import bind_config, plan_layout
    from mapc.compiler.spec import load_spec
    from mapc.runtime.containers.hf_trainer import trainer_groups
    cfg = FAMILIES[family]
    sp = load_spec(family)
    mine = trainer_groups(plan_layout(sp, "hf", bind_config(sp, cfg)))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    t = _trainer(model, _args(tmp_path), Rows(1))
    name_of = {id(p): n for n, p in model.named_parameters()}
    theirs = [[name_of[id(p)] for p in g["params"]] for g in t.create_optimizer().param_groups]
    assert mine == theirs
    assert mine[0] and mine[1]


def test_conflicting_source_groups_are_refused(trained, tmp_path):
    """A source whose groups put a norm (Trainer: no decay) with the decayed weights: Trainer's
    no-decay group would need two sets of hyper-parameters."""
    convert(trained, tmp_path / "dcp", to="dcp")
    rec_file = tmp_path / "dcp" / "mapc.json"
    rec = json.loads(rec_file.read_text())
    g0, g1 = rec["training"]["param_groups"]
    g1["params"].remove("model.norm.weight")
    g0["params"].append("model.norm.weight")
    rec_file.write_text(json.dumps(rec))
    with pytest.raises(MapcError, match="no-decay group takes parameters from source groups"):
        convert(tmp_path / "dcp", tmp_path / "out", to="hf", with_optimizer=True)
    assert not (tmp_path / "out").exists()


def test_custom_trainer_grouping_is_refused(trained, tmp_path):
    """optimizer.pt saved by an optimizer with one group (not Trainer.create_optimizer's)."""
    import shutil
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(trained, ckpt)
    opt = _torch_opt(ckpt)
    merged = dict(opt["param_groups"][0])
    merged["params"] = [i for g in opt["param_groups"] for i in g["params"]]
    opt["param_groups"] = [merged]
    torch.save(opt, str(ckpt / "optimizer.pt"))
    with pytest.raises(MapcError, match=r"param groups of \[21\] parameters.*\[16, 5\]"):
        convert(ckpt, tmp_path / "out", to="dcp")


# ---- property: the order rule == torch's named_parameters on random module trees ----------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ident = st.sampled_from(["attn", "mlp", "norm", "proj", "gate", "up", "ln", "wte", "head", "q"])


@st.composite
def _trees(draw):
    """(top children, block children, layers): children are (name, [param names]) leaves, a
    block is a list of (name, leaves); 'layers' is a ModuleList of copies of the block."""
    def leaves(n):
        names = draw(st.lists(_ident, min_size=1, max_size=n, unique=True))
        return [(x, draw(st.lists(st.sampled_from(["weight", "bias", "scale"]), min_size=1,
                                  max_size=2, unique=True))) for x in names]
    block = [(m, leaves(3)) for m in draw(st.lists(_ident, min_size=1, max_size=3, unique=True))]
    top = leaves(3)
    split = draw(st.integers(0, len(top)))
    return top[:split], block, top[split:], draw(st.integers(1, 12))


def _leaf(params):
    m = torch.nn.Module()
    for p in params:
        m.register_parameter(p, torch.nn.Parameter(torch.zeros(1)))
    return m


@settings(max_examples=60, deadline=None)
@given(_trees())
def test_module_order_matches_torch(tree):
    from mapc.runtime.containers.hf_trainer import module_order
    before, block, after, layers = tree
    root = torch.nn.Module()
    for name, params in before:
        root.add_module(name, _leaf(params))
    blocks = torch.nn.ModuleList()
    for _ in range(layers):
        b = torch.nn.Module()
        for sub, leaves in block:
            s = torch.nn.Module()
            for name, params in leaves:
                s.add_module(name, _leaf(params))
            b.add_module(sub, s)
        blocks.append(b)
    root.add_module("layers", blocks)
    for name, params in after:
        root.add_module(name + "_out", _leaf(params))
    want = [n for n, _ in root.named_parameters()]
    # a layout lists per-layer templates once; a plan expands them rule-major (all layers of
    # the first template, then the next), which is the order module_order receives
    templates = [f"{n}.{p}" for n, ps in before for p in ps] + \
        [f"layers.{{i}}.{s}.{n}.{p}" for s, leaves in block for n, ps in leaves for p in ps] + \
        [f"{n}_out.{p}" for n, ps in after for p in ps]
    rule_major = [t.format(i=i) for t in templates for i in (range(layers) if "{i}" in t
                                                             else [0])]
    assert module_order(rule_major) == want
