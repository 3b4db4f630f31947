"""Train a tiny GPT-NeoX-shaped model with DeepSpeed's own PipelineModule on CPU and save it.

Run under torchrun, one process per pipeline stage::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/groundtruth/neox_pipe.py --out DIR
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 4 tests/groundtruth/neox_pipe.py --out DIR --tp 2

The layer list mirrors GPT-NeoX's ``GPT2ModelPipe`` positions for ``LAYERS`` blocks: 0 the
embedding (``word_embeddings``), 1 a parameter-free function (NeoX's ``_pre_transformer_block``),
2..L+1 the blocks (NeoX's parameter names: ``input_layernorm``, ``attention.query_key_value``,
``attention.dense``, ``post_attention_layernorm``, ``mlp.linear1``, ``mlp.linear2``), L+2 a
parameter-free function (``_post_transformer_block``), L+3 the final ``norm``, L+4 the head
(``final_linear``). ``PipeModelDataParallelTopology(num_pp=2, num_mp=TP, num_dp=1)`` as in
NeoX (with ``--tp 2`` every tp rank holds the whole layers: only the file names are NeoX's), ZeRO stage 1 with a client ``torch.optim.AdamW``; one ``train_batch`` step, then
``engine.save_checkpoint(DIR)``. Every rank (stage) then writes its parameters' fp32 master
weights and Adam moments, gathered with DeepSpeed's own API, to
``DIR/{fp32,exp_avg,exp_avg_sq}.rank{R}.safetensors``, and rank 0 writes ``DIR/expected.json``
(the model sizes and the tag). The forward is a simple stand-in (the files do not depend on it). DeepSpeed's CPU
shared-memory op is stubbed out as in ds_train.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ds_train import start_deepspeed_on_cpu  # noqa: E402

HIDDEN, HEADS, FFN, VOCAB, LAYERS = 32, 4, 48, 128, 2
SEED = 1234


def build_layers():
    import torch
    from torch import nn
    from deepspeed.pipe import LayerSpec

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)

        def forward(self, ids):
            return self.word_embeddings(ids)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query_key_value = nn.Linear(HIDDEN, 3 * HIDDEN)
            self.dense = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            q, k, v = self.query_key_value(x).chunk(3, dim=-1)
            return self.dense(v * torch.sigmoid(q * k))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1 = nn.Linear(HIDDEN, FFN)
            self.linear2 = nn.Linear(FFN, HIDDEN)

        def forward(self, x):
            return self.linear2(torch.nn.functional.gelu(self.linear1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = nn.LayerNorm(HIDDEN)
            self.post_attention_layernorm = nn.LayerNorm(HIDDEN)
            self.attention = Attention()
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attention(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class FinalNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(HIDDEN)

        def forward(self, x):
            return self.norm(x)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.final_linear = nn.Linear(HIDDEN, VOCAB, bias=False)

        def forward(self, x):
            return self.final_linear(x)

    def pre_transformer_block(x):
        return x

    def post_transformer_block(x):
        return x

    return ([LayerSpec(Embedding), pre_transformer_block]
            + [LayerSpec(Block) for _ in range(LAYERS)]
            + [post_transformer_block, LayerSpec(FinalNorm), LayerSpec(Head)])


def dump_optimizer_state(engine, out: Path, rank: int) -> None:
    """Each stage's fp32 master weights and Adam moments by PipelineModule name, gathered with
    DeepSpeed's own safe_get_full_fp32_param / safe_get_full_optimizer_state:
    ``{fp32,exp_avg,exp_avg_sq}.rank{R}.safetensors``."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    opt = engine.optimizer   # re-link the state views (see ds_train.dump_full_state)
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    full = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():
        full["fp32"][name] = safe_get_full_fp32_param(p)
        for k in ("exp_avg", "exp_avg_sq"):
            full[k][name] = safe_get_full_optimizer_state(p, k)
    for k, d in full.items():
        save_file({n: t.detach().float().cpu().contiguous() for n, t in d.items()},
                  str(out / f"{k}.rank{rank}.safetensors"))


def pipeline_module(pp: int, mp: int, dp: int):
    """DeepSpeed's PipelineModule of build_layers() on a (pp, mp, dp) topology, with the
    harness's loss, partitioned by transformer block as NeoX does."""
    import torch
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))

    return PipelineModule(layers=build_layers(), loss_fn=loss_fn,
                          topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=mp,
                                                                 num_dp=dp),
                          partition_method="type:Block")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1,
                   help="the topology's model-parallel size (world size = 2 * tp); the layers "
                        "are not tensor-parallel, so tp > 1 only shows the file naming")
    args = p.parse_args(argv)
    import torch
    import torch.distributed as tdist

    deepspeed = start_deepspeed_on_cpu()
    rank = tdist.get_rank()
    torch.manual_seed(SEED)
    model = pipeline_module(pp=2, mp=args.tp, dp=1)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
              "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
              "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    g = torch.Generator().manual_seed(7)
    batches = [(ids, ids.clone()) for ids in
               (torch.randint(0, VOCAB, (1, 8), generator=g) for _ in range(2))]
    engine.train_batch(data_iter=iter(batches))
    out = Path(args.out)
    engine.save_checkpoint(str(out))
    tdist.barrier()
    dump_optimizer_state(engine, out, rank)
    if rank == 0:
        (out / "expected.json").write_text(json.dumps({
            "hidden_size": HIDDEN, "num_attention_heads": HEADS, "intermediate_size": FFN,
            "vocab_size": VOCAB, "num_hidden_layers": LAYERS, "pp": 2, "tp": args.tp,
            "tag": f"global_step{engine.global_steps}"}) + "\n")
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
