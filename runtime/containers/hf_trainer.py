"""HuggingFace ``Trainer`` checkpoints: the optimizer beside an ``hf`` model.

``Trainer._save_checkpoint`` writes, in ``checkpoint-N/``: the model (``model.safetensors``,
``config.json``), ``optimizer.pt`` (``torch.optim.AdamW.state_dict()``), ``scheduler.pt``
(the LR scheduler's ``state_dict()``), ``trainer_state.json`` (``TrainerState``, with
``global_step``), ``rng_state.pth`` and ``training_args.bin`` (a pickled ``TrainingArguments``;
never opened here). An optimizer state dict names no parameter: its ``state`` and
``param_groups[g]["params"]`` are integer indices, numbered over the groups in order, and the
groups are the ones ``Trainer.create_optimizer`` builds (transformers 5.23)::

    decay = Trainer.get_decay_parameter_names(model)
    groups = [[p for n, p in model.named_parameters() if n in decay],      # args.weight_decay
              [p for n, p in model.named_parameters() if n not in decay]]  # 0.0

Both halves are derived here, from the ``hf`` layout of the model's spec, without transformers:

* **Order** (:func:`module_order`): ``named_parameters()`` walks the module tree depth first,
  children in registration order. The dotted HF names are that tree; siblings are ordered by
  their first appearance in the spec's ``hf`` layout (whose lines list the tensors in the
  order the transformers module registers them) and list indices (``layers.3``) numerically.
* **Decay** (:func:`decays`, this file is the only place the rule lives): Trainer's
  ``get_decay_parameter_names`` excludes parameters whose name (lower-cased) matches
  :data:`NO_DECAY_PATTERNS`, and every parameter of an ``nn.LayerNorm`` module. The names of
  LayerNorm weights need not say so (GPT-2's ``ln_1``), so the same patterns are also tried on
  the spec's logical tensor names, where every norm weight is called ``*_norm``.

Nothing here knows a model family; tests/test_hf_trainer.py checks both rules against the
real ``Trainer`` for every shipped family whose HF names are transformers' parameter names.
"""
from __future__ import annotations

import re

from mapc.errors import MapcError
from mapc.runtime.containers.zero import plain

OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"

# transformers 5.23 Trainer.get_decay_parameter_names: forbidden_name_patterns
NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (
    r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"))

# The AdamW hyper-parameters a resumed run cannot do without.
REQUIRED_HYPER = ("lr", "betas", "eps", "weight_decay")


def module_order(names: list[str]) -> list[str]:
    """``names`` (dotted HF parameter names, in hf-layout order) in ``named_parameters()``
    order: depth first over the name tree, siblings by first appearance, integers by value."""
    first: dict[tuple, int] = {}
    for n, name in enumerate(names):
        parts = tuple(name.split("."))
        for k in range(1, len(parts) + 1):
            first.setdefault(parts[:k], n)

    def key(name):
        parts = name.split(".")
        return tuple((0, int(p), 0) if p.isdigit() else (1, 0, first[tuple(parts[:k + 1])])
                     for k, p in enumerate(parts))
    # at each level a numbered child (a ModuleList entry) only has numbered siblings
    return sorted(names, key=key)


def decays(name: str, logical: list[str]) -> bool:
    """Whether Trainer applies weight decay to HF parameter ``name`` whose logical tensors
    (spec tensor names, e.g. ``attn_norm``) are ``logical``."""
    return not any(p.search(s.lower()) for s in [name, *logical] for p in NO_DECAY_PATTERNS)


def trainer_groups(plan) -> list[list[str]]:
    """The two param groups of ``Trainer.create_optimizer`` for an unsharded hf-layout plan:
    [decayed names, not decayed names], each in ``named_parameters()`` order."""
    logical: dict[str, list[str]] = {}
    names = []
    for inst, coord, name in plan.placements():
        if coord_is_sharded(coord):
            raise MapcError("internal: a Trainer checkpoint is one unsharded model")
        if name not in logical:
            names.append(name)
        logical.setdefault(name, []).extend(inst.members)   # spec tensor names
    order = module_order(names)
    return [[n for n in order if decays(n, logical[n])],
            [n for n in order if not decays(n, logical[n])]]


def coord_is_sharded(coord) -> bool:
    return any(i for _, i in coord)


def hyper_of(group: dict) -> dict:
    """A param group's hyper-parameters (everything but ``params``), in a torch optimizer's
    own types: ``betas`` is a tuple (JSON records keep it as a list)."""
    out = {k: v for k, v in group.items() if k != "params"}
    if isinstance(out.get("betas"), list):
        out["betas"] = tuple(out["betas"])
    return out


def same_hyper(a: dict, b: dict) -> bool:
    keys = set(a) | set(b)
    return all(plain(a.get(k)) == plain(b.get(k)) for k in keys)


def is_torch_scheduler(state) -> bool:
    """A ``torch.optim.lr_scheduler.LRScheduler.state_dict()`` (what Trainer saves)."""
    return isinstance(state, dict) and "base_lrs" in state and "last_epoch" in state


def constant_scheduler(lrs: list[float], step: int) -> dict:
    """The state of Trainer's ``constant`` schedule (a ``LambdaLR`` with factor 1) after
    ``step`` steps: what stands for "no scheduler" (a fixed learning rate) in scheduler.pt."""
    return {"base_lrs": list(lrs), "last_epoch": int(step), "_step_count": int(step) + 1,
            "_is_initial": False, "_get_lr_called_within_step": False,
            "_last_lr": list(lrs), "lr_lambdas": [{} for _ in lrs]}


def micro_batch(training: dict) -> int:
    """The per-process batch of a training state (TrainerState.train_batch_size, which Trainer
    compares with its arguments on resume): DeepSpeed's micro batch, else samples per step and
    rank, else 1."""
    ds = training.get("ds_config") or {}
    if isinstance(ds, dict) and ds.get("train_micro_batch_size_per_gpu"):
        return int(ds["train_micro_batch_size_per_gpu"])
    samples, it, dp = (training.get(k) for k in ("global_samples", "iteration", "dp_world_size"))
    if samples and it and dp:
        return max(1, int(samples) // int(it) // int(dp))
    return 1


def trainer_state(global_step: int, train_batch_size: int) -> dict:
    """A ``TrainerState`` (transformers 5.23 field defaults) at ``global_step``; Trainer
    re-derives epochs, max_steps and its callbacks from its own arguments on resume."""
    return {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
            "epoch": 0.0, "eval_steps": 500, "global_step": int(global_step),
            "is_hyper_param_search": False, "is_local_process_zero": True,
            "is_world_process_zero": True, "log_history": [], "logging_steps": 500,
            "max_steps": int(global_step), "num_input_tokens_seen": 0, "num_train_epochs": 0,
            "save_steps": 500, "stateful_callbacks": {}, "total_flos": 0.0,
            "train_batch_size": int(train_batch_size), "trial_name": None, "trial_params": None}
