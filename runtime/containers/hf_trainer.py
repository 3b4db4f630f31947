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

A model no spec describes (generic mode) has no spec to give the order: it comes from the
model's own class instead (:func:`registered_parameters`: config.json's ``architectures`` in
transformers, built on the meta device), the decay rule from the same patterns and the
class's ``nn.LayerNorm`` modules. Without transformers such a checkpoint is refused.
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


def trainer_groups(plan, registered=None) -> list[list[str]]:
    """The two param groups of ``Trainer.create_optimizer`` for an unsharded hf-layout plan:
    [decayed names, not decayed names], each in ``named_parameters()`` order. ``registered``
    (:func:`registered_parameters`, for a model no spec describes) gives the order and the
    LayerNorm parameters instead of the spec."""
    logical: dict[str, list[str]] = {}
    names = []
    for inst, coord, name in plan.placements():
        if coord_is_sharded(coord):
            raise MapcError("internal: a Trainer checkpoint is one unsharded model")
        if name not in logical:
            names.append(name)
        logical.setdefault(name, []).extend(inst.members)   # spec tensor names
    if registered is not None:
        order, norms = registered
        missing = sorted(set(names) - set(order))
        if missing:
            raise MapcError(f"the model's class has no parameter {missing[0]} (of "
                            f"{len(missing)} stored tensors it lacks)",
                            hint="is config.json the checkpoint's own? pass --spec FILE.map")
        order = [n for n in order if n in logical]
        return [[n for n in order if n not in norms and decays(n, [])],
                [n for n in order if n in norms or not decays(n, [])]]
    order = module_order(names)
    return [[n for n in order if decays(n, logical[n])],
            [n for n in order if not decays(n, logical[n])]]


def other_name_plans(plan):
    """The plans of ``plan``'s layout under every other combination of its enumerated
    parameters (``param NAME = "a" | "b"``): the other namings of the same model, one of which
    may be the module's own parameter list when the stored names are not (an ``hf`` layout's
    choice between what ``save_pretrained`` writes and the in-memory module). Combinations
    the layout refuses for this config are skipped."""
    import itertools

    from mapc.compiler.plan import plan_layout
    choices = [p for p in plan.spec.layout_params(plan.name) if len(p.choices) > 1]
    for combo in itertools.product(*(p.choices for p in choices)):
        params = dict(plan.params, **{p.name: v for p, v in zip(choices, combo)})
        if params == plan.params:
            continue
        try:
            yield plan_layout(plan.spec, plan.name, plan.env, dict(plan.mesh), params)
        except MapcError:
            continue


def module_naming(plan, config: dict | None):
    """The plan of another naming of ``plan``'s layout (:func:`other_name_plans`) whose names
    are the parameters of the model's own class (``named_parameters()`` of config.json's
    ``architectures`` in transformers, built on the meta device), when ``plan``'s are not:
    Trainer numbers its optimizer by those. None when the stored names are the class's, no
    other naming is, or transformers cannot build the class."""
    others = list(other_name_plans(plan))
    if not others:
        return None
    try:
        names = {n for n, _ in _meta_model(config, "")[1].named_parameters()}
    except MapcError:
        return None
    if {n for _, _, n in plan.placements()} == names:
        return None
    for other in others:
        if {n for _, _, n in other.placements()} == names:
            return other
    return None


def _meta_model(config: dict | None, where: str):
    """(torch, the model of config.json's first ``architectures`` class in transformers,
    built on torch's meta device); refused in one line when it cannot be."""
    arch = (config or {}).get("architectures") or [None]
    hint = ("install transformers (the model's class gives its parameter order), or pass "
            "--spec FILE.map")
    try:
        import torch
        import transformers
    except ImportError:
        raise MapcError("a Trainer checkpoint of a model no spec describes numbers its "
                        "optimizer state by the model's parameter order, which only the model's "
                        "class knows, and transformers is not installed", where=where,
                        hint=hint) from None
    cls = getattr(transformers, str(arch[0]), None) if arch[0] else None
    if cls is None or not isinstance(cls, type) or \
            not issubclass(cls, transformers.PreTrainedModel):
        raise MapcError(f"a Trainer checkpoint of a model no spec describes needs the model's "
                        f"class for its parameter order; config.json names "
                        f"{arch[0]!r}, which transformers {transformers.__version__} does not "
                        f"have", where=where, hint=hint)
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            return torch, cls(cfg)
    except Exception as e:          # the model's own code: any failure is the user's to see
        raise MapcError(f"cannot build {arch[0]} from config.json on the meta device "
                        f"({type(e).__name__}: {e})", where=where, hint=hint) from None


def registered_parameters(config: dict | None, where: str):
    """For a model no spec describes: (its parameters in ``named_parameters()`` order, the
    names of those in ``nn.LayerNorm`` modules), from the model's own class, the first of
    config.json's ``architectures`` in transformers, built on torch's meta device (no memory,
    no weights). A Trainer checkpoint numbers its optimizer state in that order and records
    no names, so without the class it cannot be read: refused."""
    arch = (config or {}).get("architectures") or [None]
    torch, model = _meta_model(config, where)
    norms = {id(p) for mod in model.modules() if isinstance(mod, torch.nn.LayerNorm)
             for p in mod.parameters(recurse=False)}
    named = list(model.named_parameters())
    # transformers 5 renames some modules after loading: save_pretrained stores the names its
    # own revert_weight_conversion gives, so that maps every parameter to its stored name (a
    # parameter it fuses or splits instead has no stored tensor of its own: refused)
    try:
        from transformers.core_model_loading import revert_weight_conversion
        stored = {id(v): k for k, v in revert_weight_conversion(model, dict(named)).items()}
    except ImportError:
        stored = {id(p): n for n, p in named}
    lost = [n for n, p in named if id(p) not in stored]
    if lost:
        raise MapcError(f"{arch[0]} stores {lost[0]} converted (fused or split with others), "
                        "so its optimizer state has no stored tensor of its own", where=where,
                        hint="write a spec for this model (--spec FILE.map)")
    return [stored[id(p)] for _, p in named], {stored[id(p)] for _, p in named if id(p) in norms}


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
