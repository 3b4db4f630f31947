"""Load a NeoX / DeepSpeed pipeline checkpoint into DeepSpeed's own PipelineEngine at any
pipeline and data-parallel size, and take one more training step.

Run under torchrun, one process per (stage, data-parallel rank)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/groundtruth/neox_pipe_resume.py \
        --load CKPT --pp 1 --dp 2 --out DIR [--groups neox]

The model is neox_pipe.py's (same layers, same ``type:Block`` partitioning), the DeepSpeed config
is the one the checkpoint's ``mp_rank_00_model_states.pt`` records (what a resume would use:
for a mapc output, mapc's rebatched config). ``engine.load_checkpoint`` loads the layer files,
the model states and the ZeRO optimizer files natively. Right after loading, every rank writes
its stage's fp32 master weights and Adam moments gathered with DeepSpeed's
safe_get_full_fp32_param / safe_get_full_optimizer_state to ``DIR/loaded/``; then one
``train_batch`` on the next two micro batches of neox_pipe.py's data stream (split over the
data-parallel ranks), and the same dump to ``DIR/stepped/``; rank 0 writes
``DIR/result.json`` (the loss and the engine's global step).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ds_train import start_deepspeed_on_cpu  # noqa: E402
from neox_pipe import SEED, VOCAB, dump_optimizer_state, pipeline_module  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--load", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--dp", type=int, required=True)
    p.add_argument("--groups", choices=("one", "neox"), default="one",
                   help="one AdamW param group (neox_pipe.py's), or NeoX's two: weight decay "
                        "for every parameter but the norms' and the biases")
    args = p.parse_args(argv)
    import torch
    import torch.distributed as tdist

    deepspeed = start_deepspeed_on_cpu()
    rank = tdist.get_rank()
    torch.manual_seed(SEED + 1)      # the loaded checkpoint, not the seed, decides the weights
    model = pipeline_module(pp=args.pp, mp=1, dp=args.dp)
    load = Path(args.load)
    tag = (load / "latest").read_text().strip()
    saved = torch.load(load / tag / "mp_rank_00_model_states.pt", weights_only=False)
    config = dict(saved["ds_config"], steps_per_print=10 ** 9)
    if args.groups == "one":
        groups = [q for q in model.parameters() if q.requires_grad]
    else:   # NeoX's rule (gpt-neox megatron/model/utils.py), in module traversal order
        decay, free = [], []
        for mod in model.modules():
            for pname, q in mod.named_parameters(recurse=False):
                norm = isinstance(mod, torch.nn.LayerNorm)
                (free if norm or pname == "bias" else decay).append(q)
        groups = [{"params": decay}, {"params": free, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    engine.load_checkpoint(str(load))
    out = Path(args.out)
    for d in ("loaded", "stepped"):
        (out / d).mkdir(parents=True, exist_ok=True)
    dump_optimizer_state(engine, out / "loaded", rank)
    g = torch.Generator().manual_seed(7)
    stream = [torch.randint(0, VOCAB, (1, 8), generator=g) for _ in range(4)]
    step2 = [(ids, ids.clone()) for ids in stream[2:]]     # neox_pipe.py trained on 0 and 1
    dp_rank = engine.grid.get_data_parallel_rank()
    loss = engine.train_batch(data_iter=iter(step2[dp_rank::args.dp]))
    dump_optimizer_state(engine, out / "stepped", rank)
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "loss": float(loss), "global_steps": engine.global_steps,
            "config": {k: config[k] for k in ("train_batch_size",
                                              "train_micro_batch_size_per_gpu",
                                              "gradient_accumulation_steps")}}) + "\n")
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
