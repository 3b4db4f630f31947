"""HF Trainer checkpoints of a model no spec describes (a tiny ViT), in generic mode, against
the REAL transformers Trainer.

A Trainer's ``optimizer.pt`` numbers its state by the model's parameter registration order and
names nothing; with no spec, mapc takes that order from the model's own class
(hf_trainer.registered_parameters). Checked here with no spec and no flags:

* mapc reads every Adam moment of ``checkpoint-2`` exactly, each parameter's state matched to
  its stored tensor by *value* (the model loaded by ``from_pretrained``), not by mapc's rule;
* ``checkpoint-2 -> deepspeed | universal | dcp -> hf --with-optimizer`` gives back
  byte-identical optimizer tensors, param groups and scheduler;
* Trainer resumed from mapc's round trip steps exactly like Trainer resumed from the original.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from mapc.api import convert, resolve  # noqa: E402
from mapc.errors import MapcError  # noqa: E402
from mapc.runtime.containers import open_source  # noqa: E402

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
           image_size=16, patch_size=8, num_labels=3)


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.1, adam_beta2=0.95, lr_scheduler_type="linear", report_to=[],
                use_cpu=True, seed=0, save_strategy="no", train_sampling_strategy="sequential",
                dataloader_num_workers=0, disable_tqdm=True, logging_strategy="no")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _model():
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**VIT))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trainer's checkpoint-2 of a 4-step run."""
    out = tmp_path_factory.mktemp("vit_trainer")
    transformers.Trainer(model=_model(), args=_args(out, max_steps=4, save_strategy="steps",
                                                    save_steps=2),
                         train_dataset=Images()).train()
    return out / "checkpoint-2"


def _opt(path):
    return torch.load(str(Path(path) / "optimizer.pt"), weights_only=True)


@pytest.fixture(scope="module")
def stored_name_of_index(trained):
    """optimizer index -> stored tensor name, from the real Trainer.create_optimizer on the
    model from_pretrained loads, each parameter matched to its stored tensor by value."""
    from safetensors.torch import load_file
    stored = load_file(str(trained / "model.safetensors"))
    model = transformers.ViTForImageClassification.from_pretrained(str(trained))
    opt = transformers.Trainer(model=model, args=_args(trained.parent / "probe"),
                               train_dataset=Images()).create_optimizer()
    out = {}
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        same = [n for n, t in stored.items() if t.shape == p.shape and torch.equal(t, p)]
        assert len(same) == 1, same
        out[i] = same[0]
    return out


@pytest.mark.parametrize("slot", ["exp_avg", "exp_avg_sq"])
def test_reads_moments_of_a_model_no_spec_describes(trained, stored_name_of_index, slot):
    src = open_source(trained)
    res = resolve(src)
    assert res.generic and res.spec.family == "generic"
    opt = _opt(trained)
    assert len(opt["state"]) == len(stored_name_of_index) == 40
    for i, name in stored_name_of_index.items():
        want = opt["state"][i][slot].numpy()
        assert src.read(name, (), slot=slot).tobytes() == want.tobytes(), (i, name)


@pytest.fixture(scope="module")
def round_trips(trained, tmp_path_factory):
    """checkpoint-2 -> FORMAT -> hf --with-optimizer, no spec and no flags."""
    d = tmp_path_factory.mktemp("vit_rt")
    out = {}
    for fmt in ("deepspeed", "universal", "dcp"):
        convert(trained, d / fmt, to=fmt)
        convert(d / fmt, d / f"{fmt}_hf", to="hf", with_optimizer=True)
        out[fmt] = d / f"{fmt}_hf"
    return out


@pytest.mark.parametrize("fmt", ["deepspeed", "universal", "dcp"])
def test_round_trip_is_byte_identical(trained, round_trips, fmt):
    a, b = _opt(trained), _opt(round_trips[fmt])
    assert a["param_groups"] == b["param_groups"]
    assert list(a["state"]) == list(b["state"])
    for i in a["state"]:
        for k, t in a["state"][i].items():
            u = b["state"][i][k]
            assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u), (i, k)
    sched = torch.load(str(round_trips[fmt] / "scheduler.pt"), weights_only=True)
    if fmt == "deepspeed":
        # DeepSpeed's model states keep only a DeepSpeed engine's scheduler: the Trainer's
        # schedule is not carried, and the export holds a constant one at the current lr
        assert sched["base_lrs"] == [g["lr"] for g in a["param_groups"]]
    else:
        assert sched == torch.load(str(trained / "scheduler.pt"), weights_only=True)


@pytest.mark.parametrize("fmt", ["universal", "dcp"])
def test_trainer_resumes_from_round_trip_exactly(fmt, trained, round_trips, tmp_path):
    def resume(ckpt, out):
        model = _model()
        t = transformers.Trainer(model=model, args=_args(out, max_steps=4),
                                 train_dataset=Images())
        loss = t.train(resume_from_checkpoint=str(ckpt)).training_loss
        assert t.state.global_step == 4
        return model.state_dict(), loss

    # two resumed steps: the second one's learning rate comes from the carried schedule
    (sa, la), (sb, lb) = resume(trained, tmp_path / "a"), \
        resume(round_trips[fmt], tmp_path / "b")
    assert la == lb
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    from safetensors.torch import load_file
    before = load_file(str(trained / "model.safetensors"))
    assert not torch.equal(before["classifier.weight"], sa["classifier.weight"])


def test_unknown_model_class_is_refused(trained, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(trained, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForAnything"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MapcError, match=r"needs the model's class for its parameter order; "
                                        r"config.json names 'NoSuchModelForAnything'"):
        convert(d, tmp_path / "out", to="deepspeed")
    assert not (tmp_path / "out").exists()
