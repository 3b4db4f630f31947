"""Show what a checkpoint holds: format, model family, topology, tensors, dtypes and bytes."""
from __future__ import annotations

from mapc.cli.common import print_json

HELP = "describe a checkpoint"
EXAMPLES = """examples:
  mapc inspect llama-mcore
  mapc inspect llama-hf --json | jq '.config'
  mapc inspect llama-mcore --tensors
"""


def add_arguments(p):
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--config", help="model config JSON, when the checkpoint carries none")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--spec", help="spec file to use instead of detecting the family")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def run(args) -> int:
    from mapc.api import inspect
    info = inspect(args.ckpt, config=args.config, spec=args.spec)
    if args.json:
        print_json(info)
        return 0
    topo = ", ".join(f"{k}={v}" for k, v in info["topology"].items()) or "unsharded"
    if info.get("saved_topology"):
        topo = "global tensors saved at " + ", ".join(
            f"{k}={v}" for k, v in info["saved_topology"].items())
    print(f"{info['path']}: {info['format']} checkpoint, family {info['family'] or '?'}, "
          f"{topo}")
    if info.get("config"):
        print("  config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    if info.get("params"):
        print("  layout params: " + ", ".join(f"{k}={v!r}" for k, v in info["params"].items()))
    if info.get("unresolved"):
        print(f"  (not matched to a spec: {info['unresolved']})")
    dtypes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in info["dtypes"].items())
    print(f"  {info['tensor_count']} tensors in {len(info['shards'])} shard(s), "
          f"{info['bytes'] / 2**20:.1f} MiB ({dtypes})")
    tr = info.get("training")
    if tr:
        facts = [f"{k}={tr[k]}" for k in ("iteration", "step", "zero_stage", "dp_world_size",
                                           "loss_scale") if tr.get(k) is not None]
        print("  training state: " + (", ".join(facts) or "no scalars"))
        print("  optimizer slots: " + (", ".join(tr["optimizer_slots"]) or "none (weights only)"))
        for g, group in enumerate(tr["param_groups"]):
            hyper = ", ".join(f"{k}={v}" for k, v in group.items()
                              if k in ("lr", "weight_decay", "betas", "eps"))
            print(f"    param group {g}: {group['params']} tensors, {hyper}")
    for w in info.get("warnings", []):
        print(f"  warning: {w}")
    if args.tensors:
        for shard in info["shards"]:
            print(f"  [{shard['shard']}]")
            for t in shard["tensors"]:
                print(f"    {t['name']:<60} {t['dtype']:<9} {t['shape']}")
    return 0
