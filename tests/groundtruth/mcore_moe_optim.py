"""Ground truth from the real megatron-core: a MoE model's distributed optimizer (megatron-core's
ChainedOptimizer of a dense and an expert DistributedOptimizer) in ``torch_dist``.

Every run has ``WORLD`` = 2 gloo ranks; a topology is ``(tp, ep, etp)`` (pp 1), the data-parallel
size ``WORLD / tp`` and the expert data-parallel size ``WORLD / (etp * ep)``.

``save(root, cfg, topo, truth)`` builds the MoE GPTModel of ``cfg`` (``mcore_names.build_gpt``:
local spec, SequentialMLP; bf16 through Float16Module, as Megatron-LM builds it) at ``topo``,
fills it with seeded values (dense parameters by name and tensor rank if TP-sharded, so DP
replicas agree; experts by name, expert rank and expert-TP rank), wraps it in megatron-core's
DDP (distributed-optimizer buffers, fp32 grads, one bucket) and builds the optimizer with
``get_megatron_optimizer`` (Adam, clip_grad 0): a ChainedOptimizer of the dense optimizer (over
``ddp.buffers``, the data-parallel group) and the expert one (over
``ddp.expert_parallel_buffers``, the expert data-parallel group). One step on seeded gradients;
``dist_checkpointing.save`` of ``{"model", "optimizer": opt.sharded_state_dict(...)
(dp_reshardable), "args", "iteration", "checkpoint_version", "opt_param_scheduler"}`` into
``root/iter_0000007/``, as Megatron-LM saves; each rank's live state per chained optimizer
(``mcore_dist._inner_truth``: dp_group_idx, buffers, param_index_map, its pieces of masters and
moments, groups, step) goes to ``truth/optim_R.pt`` with its ranks, then one more step on value
gradients (``_value_step``) and ``truth/stepped_R.pt``.

The same state is also saved ``fully_reshardable`` into ``ROOT_fully_reshardable``.

``load(entries, cfg, out)`` does, for each ``(ckpt, topo, tag, sharding type)`` in turn (the
model-parallel state re-initialized in between), what Megatron-LM's ``--load`` does: builds the
model, DDP and ChainedOptimizer at ``topo``, loads ``ckpt`` (model and optimizer,
``strict="raise_all"``, the content metadata naming the sharding type) with
``dist_checkpointing.load`` and ``load_state_dict``, saves ``out/<tag>_loaded_R.pt``, takes the
value step and saves ``out/<tag>_stepped_R.pt``.

The value step's gradients are ``sin(1000 w)`` of every weight element, the same at any split.
megatron-core scales every gradient by 1/dp before it sums them over the data-parallel group of
the buffer -- for experts the expert data-parallel group -- so an expert's gradient is written
as ``sin(1000 w) * dp / edp`` (a power of two here: exact) to reduce to the same value at any
(dp, edp). CPU workarounds are ``mcore_dist``'s.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WORLD = 2
HERE = Path(__file__).resolve()


def _run(mode: str, cfg: dict, payload, out: Path) -> None:
    from tests.groundtruth.mcore_names import run_ranks
    repo = str(HERE.parents[2])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_ranks(WORLD, [str(HERE), mode, json.dumps(cfg), json.dumps(payload), str(out)], out,
              {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")},
              "megatron-core MoE distributed-optimizer worker", timeout=300, cwd=repo)


def save(root: Path, cfg: dict, topo: tuple, truth: Path) -> Path:
    """The dp_reshardable save into ``root``, the same state fully_reshardable into
    ``ROOT_fully_reshardable``."""
    from tests.groundtruth import mcore_dist
    _run("save", cfg, {"root": str(root), "topo": list(topo)}, truth)
    for r in (Path(root), Path(f"{root}_fully_reshardable")):
        (r / "latest_checkpointed_iteration.txt").write_text(str(mcore_dist.ITERATION))
    return Path(root)


def load(entries: list, cfg: dict, out: Path) -> Path:
    """``entries``: (ckpt, topo, tag, sharding type)."""
    _run("load", cfg, [[str(c), list(t), tag, kind] for c, t, tag, kind in entries], out)
    return Path(out)


# --------------------------------------------------------------------------------- worker
METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "distrib_optim_sharding_type": "dp_reshardable"}


def _is_expert(param) -> bool:
    return not getattr(param, "allreduce", True)


def _build(torch, cfg, topo, init=None):
    """(ddp, ChainedOptimizer, args, ranks) at ``topo`` = (tp, ep, etp); ``init(model, ranks)``
    fills the parameters before the optimizer takes its masters."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module
    from tests.groundtruth import mcore_dist
    from tests.groundtruth.mcore_names import build_gpt
    tp, ep, etp = topo
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=etp)
    dp = WORLD // tp
    args = mcore_dist._args(cfg, tp, 1, "bf16", dp)
    args.num_experts, args.moe_router_topk = cfg["experts"], cfg.get("topk", 2)
    args.moe_ffn_hidden_size = cfg["ffn"]
    args.expert_model_parallel_size, args.expert_tensor_parallel_size = ep, etp
    args.use_distributed_optimizer = True
    model = build_gpt(dict(cfg, vocab=args.padded_vocab_size), tp, 1,
                      params_dtype=torch.bfloat16)
    model = Float16Module(model.config, model).module
    ranks = {"tp": parallel_state.get_tensor_model_parallel_rank(),
             "ep": parallel_state.get_expert_model_parallel_rank(),
             "etp": parallel_state.get_expert_tensor_parallel_rank(),
             "dp": parallel_state.get_data_parallel_rank(),
             "edp": parallel_state.get_expert_data_parallel_rank(),
             "edp_size": parallel_state.get_expert_data_parallel_world_size(), "dp_size": dp}
    if init is not None:
        init(model, ranks)
    import torch.distributed as dist
    ddp, opt = mcore_dist._distributed_optimizer(torch, dist, model, "bf16", torch.bfloat16)
    return ddp, opt, args, ranks


def _truth(torch, ddp, opt, ranks) -> dict:
    from tests.groundtruth.mcore_dist import _inner_truth
    shapes = {name: tuple(p.shape) for name, p in ddp.module.named_parameters()}
    # at ep 1 megatron-core marks no parameter as expert: one optimizer
    return {**ranks, "shapes": shapes, "optimizers": [
        _inner_truth(torch, ddp, inner, buffers) for inner, buffers in
        zip(opt.chained_optimizers, (ddp.buffers, ddp.expert_parallel_buffers))]}


def _value_step(torch, ddp, opt, ranks):
    from tests.groundtruth.mcore_dist import _step
    scale = ranks["dp_size"] / ranks["edp_size"]
    for _, param in ddp.module.named_parameters():
        g = torch.sin(param.detach().float() * 1000.0)
        param.main_grad.copy_(g * scale if _is_expert(param) else g)
    _step(ddp, opt)


def _worker(mode, cfg, payload, out):
    import warnings
    warnings.filterwarnings("ignore")
    import zlib

    import torch
    from tests.groundtruth import mcore_dist
    mcore_dist._patch_cuda(torch)
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=WORLD)
    from megatron.core import dist_checkpointing, parallel_state
    from tests.groundtruth.mcore_names import seeded_fill
    out = Path(out)
    if mode == "save":
        def who(param, ranks):
            return f"{ranks['ep']}|{ranks['etp']}" if _is_expert(param) else \
                str(ranks["tp"] if getattr(param, "tensor_model_parallel", False) else -1)

        def init(model, ranks):
            seeded_fill(torch, model, lambda name, param: who(param, ranks))
        ddp, opt, args, ranks = _build(torch, cfg, tuple(payload["topo"]), init)
        model = ddp.module
        for name, param in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(
                f"{name}|{who(param, ranks)}|g".encode()))
            param.main_grad.copy_(torch.randn(param.shape, generator=g))
        mcore_dist._step(ddp, opt)
        torch.save(_truth(torch, ddp, opt, ranks), out / f"optim_{rank}.pt")
        model_sd = model.sharded_state_dict(metadata=METADATA)
        state = {"args": args, "checkpoint_version": 3.0, "iteration": mcore_dist.ITERATION,
                 "model": model_sd, "optimizer": opt.sharded_state_dict(
                     model_sd, is_loading=False, metadata=METADATA),
                 "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": mcore_dist.ITERATION}}
        d = mcore_dist.iter_dir(payload["root"])
        d.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, str(d), content_metadata=METADATA)
        meta = dict(METADATA, distrib_optim_sharding_type="fully_reshardable")
        model_sd = model.sharded_state_dict(metadata=meta)
        fully = dict(state, model=model_sd, optimizer=opt.sharded_state_dict(
            model_sd, is_loading=False, metadata=meta))
        d = mcore_dist.iter_dir(f"{payload['root']}_fully_reshardable")
        d.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(fully, str(d), content_metadata=meta)
        live = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        torch.save({**ranks, "sd": live}, out / f"live_{rank}.pt")
        _value_step(torch, ddp, opt, ranks)
        torch.save(_truth(torch, ddp, opt, ranks), out / f"stepped_{rank}.pt")
        parallel_state.destroy_model_parallel()
    else:
        mcore_dist._patch_fully_reshardable_load()
        for ckpt, topo, tag, kind in payload:
            meta = dict(METADATA, distrib_optim_sharding_type=kind)
            ddp, opt, _, ranks = _build(torch, cfg, tuple(topo))
            model = ddp.module
            # torch's Adam (no Transformer Engine / Apex) has no state_dict before a first
            # step: one on zero gradients; the load replaces every value and the step
            for _, param in model.named_parameters():
                param.main_grad.zero_()
            mcore_dist._step(ddp, opt)
            tracker = (Path(ckpt) / "latest_checkpointed_iteration.txt").read_text().strip()
            sub = "release" if tracker == "release" else f"iter_{int(tracker):07d}"
            model_sd = model.sharded_state_dict(metadata=meta)
            sharded = {"model": model_sd, "optimizer": opt.sharded_state_dict(
                model_sd, is_loading=True, metadata=meta)}
            loaded = dist_checkpointing.load(sharded, str(Path(ckpt) / sub), strict="raise_all")
            model.load_state_dict(loaded["model"], strict=True)
            with torch.no_grad():
                opt.load_state_dict(loaded["optimizer"])
            for inner in opt.chained_optimizers:     # as mcore_dist's unshare_steps
                for st in inner.optimizer.state.values():
                    if "step" in st:
                        st["step"] = st["step"].clone()
            torch.save(_truth(torch, ddp, opt, ranks), out / f"{tag}_loaded_{rank}.pt")
            _value_step(torch, ddp, opt, ranks)
            torch.save(_truth(torch, ddp, opt, ranks), out / f"{tag}_stepped_{rank}.pt")
            parallel_state.destroy_model_parallel()
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, cfg_json, payload, out = sys.argv[1:5]
    _worker(mode, json.loads(cfg_json), json.loads(payload), out)
