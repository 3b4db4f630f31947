"""Worker for tests/test_dcp.py: load a DCP checkpoint into DTensors sharded over 2 ranks.

Run with ``python -m torch.distributed.run --nproc_per_node 2 dcp_sharded_load.py CKPT OUT``.
Every rank builds an empty state dict of DTensors (Shard(0) of each 2-D weight, replicated 1-D
weights) on a CPU mesh, lets torch.distributed.checkpoint.load fill it, and saves its local
shards to OUT/rank{r}.safetensors.
"""
import json
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def main(ckpt, out):
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    meta = dcp.FileSystemReader(ckpt).read_metadata()
    state = {}
    for name, md in meta.state_dict_metadata.items():
        empty = torch.zeros(tuple(md.size), dtype=md.properties.dtype)
        placement = Shard(0) if len(md.size) == 2 and md.size[0] % 2 == 0 else Replicate()
        state[name] = distribute_tensor(empty, mesh, [placement])
    dcp.load(state, storage_reader=dcp.FileSystemReader(ckpt))
    save_file({k: v.to_local().contiguous() for k, v in state.items()},
              f"{out}/rank{rank}.safetensors")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({k: str(v.placements[0]) for k, v in state.items()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
