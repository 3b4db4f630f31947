"""Ground truth from the real megatron-core: MoE (Mixtral-style) ``torch_dist`` checkpoints.

One run of ``WORLD`` = 2 gloo ranks does two things, so its start-up is paid once:

1. **load**: builds the MoE GPTModel (``mcore_names.build_gpt`` with ``experts``: local spec,
   SequentialMLP) at ``load`` = (tp, ep, etp) and loads the checkpoint ``ckpt`` (mapc's output)
   with megatron-core's own ``dist_checkpointing.load`` (``strict="raise_all"``: every key the
   model asks for must be there, and nothing else) and ``load_state_dict(strict=True)``; each
   rank saves its loaded local ``state_dict()`` into ``out/loaded_R.pt`` with its tp/ep ranks.
2. **save**: re-initializes the model-parallel groups at ``save`` = (tp, ep, etp), builds the
   model again, fills it with seeded random values and saves ``{"model":
   model.sharded_state_dict(), "args", ...}`` with ``dist_checkpointing.save`` into
   ``root/iter_0000007/`` (+ the tracker), as Megatron-LM's ``--ckpt-format torch_dist`` does;
   each rank saves its live local ``state_dict()`` into ``out/live_R.pt``.

``extra`` lists further loads and saves done in the same run, each a dict with ``path``,
``prefix`` (prepended to every model key: ``model.sharded_state_dict(prefix=...)``, as NeMo
2's ``MegatronParallel`` wrapper gives ``module.``), ``te`` (the Transformer Engine spec's key
names: the local spec's ``pre_mlp_layernorm.`` -> ``mlp.linear_fc1.layer_norm_`` mapping is
dropped, so the MoE layer's norm is ``pre_mlp_layernorm.weight``, as
``get_gpt_layer_with_transformer_engine_spec`` names it; the modules stay the local spec's,
Transformer Engine not being installed) and ``tag``. ``{"load": ...}`` entries are loaded in
phase 1 after a zeroing of the parameters with ``strict="return_all"``: ``out/loaded_<tag>_R.pt``
holds the loaded state dict and the missing and unexpected keys. ``{"save": ...}`` entries save
phase 2's model into ``path`` (``{"model": ...}``, with ``"args": true`` also the args,
checkpoint_version and iteration of Megatron-LM's save).

The vocabulary is padded for each phase's tp (``mcore_dist._args``). CPU workarounds are
``mcore_dist``'s; the allgather token dispatcher needs no CUDA streams.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WORLD = 2
HERE = Path(__file__).resolve()


def run(cfg: dict, ckpt: Path, load: tuple, root: Path, save: tuple, out: Path,
        extra: list | None = None) -> Path:
    """Load ``ckpt`` at ``load`` = (tp, ep, etp), then save a checkpoint at ``save`` into
    ``root``; the loaded and live state dicts go into ``out``. ``extra``: see above."""
    from tests.groundtruth import mcore_dist
    from tests.groundtruth.mcore_names import run_ranks
    repo = str(HERE.parents[2])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_ranks(WORLD, [str(HERE), json.dumps(cfg), str(ckpt), json.dumps(load), str(root),
                      json.dumps(save), str(out),
                      json.dumps([{k: str(v) if isinstance(v, Path) else v for k, v in e.items()}
                                  for e in extra or ()])], out,
              {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")},
              "megatron-core MoE dist-checkpoint worker", timeout=300, cwd=repo)
    (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(mcore_dist.ITERATION))
    return out


def _naming(model, te: bool):
    """Give every transformer layer the local spec's sharded-key mapping (``te`` False) or
    that mapping without ``pre_mlp_layernorm.`` (the Transformer Engine spec's MoE names)."""
    import dataclasses
    for layer in model.decoder.layers:
        if not hasattr(layer, "_local_keys_map"):
            layer._local_keys_map = dict(layer.submodules_config.sharded_state_dict_keys_map)
        keys = {k: v for k, v in layer._local_keys_map.items()
                if not (te and k == "pre_mlp_layernorm.")}
        layer.submodules_config = dataclasses.replace(layer.submodules_config,
                                                      sharded_state_dict_keys_map=keys)


def _worker(cfg, ckpt, load, root, save, out, extra):
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    from tests.groundtruth import mcore_dist
    mcore_dist._patch_cuda(torch)
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=WORLD)
    from megatron.core import dist_checkpointing, parallel_state
    from tests.groundtruth.mcore_names import build_gpt, seeded_fill
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "distrib_optim_sharding_type": "dp_reshardable"}

    def build(tp, ep, etp):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 expert_model_parallel_size=ep,
                                                 expert_tensor_parallel_size=etp)
        args = mcore_dist._args(cfg, tp, 1, "fp32")
        args.num_experts, args.moe_router_topk = cfg["experts"], cfg.get("topk", 2)
        args.moe_ffn_hidden_size, args.expert_model_parallel_size = cfg["ffn"], ep
        args.expert_tensor_parallel_size = etp
        model = build_gpt(dict(cfg, vocab=args.padded_vocab_size), tp, 1)
        ranks = {"tp": parallel_state.get_tensor_model_parallel_rank(),
                 "ep": parallel_state.get_expert_model_parallel_rank(),
                 "etp": parallel_state.get_expert_tensor_parallel_rank()}
        return model, args, ranks

    def live(model):
        return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    model, _, ranks = build(*load)
    sharded = {"model": model.sharded_state_dict(metadata=metadata)}
    loaded = dist_checkpointing.load(sharded, str(ckpt), strict="raise_all")
    model.load_state_dict(loaded["model"], strict=True)
    torch.save({**ranks, "sd": live(model)}, Path(out) / f"loaded_{rank}.pt")
    for e in (e for e in extra if "load" in e):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        _naming(model, e["te"])
        sharded = {"model": model.sharded_state_dict(prefix=e["prefix"], metadata=metadata)}
        loaded, missing, unexpected = dist_checkpointing.load(sharded, e["load"],
                                                              strict="return_all")
        model.load_state_dict({k.removeprefix(e["prefix"]): v
                               for k, v in loaded["model"].items()}, strict=True)
        torch.save({**ranks, "sd": live(model), "missing": sorted(map(str, missing)),
                    "unexpected": sorted(map(str, unexpected))},
                   Path(out) / f"loaded_{e['tag']}_{rank}.pt")
    parallel_state.destroy_model_parallel()
    dist.barrier()

    model, args, ranks = build(*save)
    seeded_fill(torch, model, lambda name, param: f"{ranks['tp']}|{ranks['ep']}|{ranks['etp']}")
    state = {"args": args, "checkpoint_version": 3.0, "iteration": mcore_dist.ITERATION,
             "model": model.sharded_state_dict(metadata=metadata)}
    d = mcore_dist.iter_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(d), content_metadata=metadata)
    torch.save({**ranks, "sd": live(model)}, Path(out) / f"live_{rank}.pt")
    for e in (e for e in extra if "save" in e):
        _naming(model, e["te"])
        Path(e["save"]).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        sd = {"model": model.sharded_state_dict(prefix=e["prefix"], metadata=metadata)}
        if e.get("args"):
            sd.update({k: v for k, v in state.items() if k != "model"})
        dist_checkpointing.save(sd, e["save"], content_metadata=metadata)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    cfg_json, ckpt, load, root, save, out, extra = sys.argv[1:8]
    _worker(json.loads(cfg_json), ckpt, tuple(json.loads(load)), Path(root),
            tuple(json.loads(save)), out, json.loads(extra))
