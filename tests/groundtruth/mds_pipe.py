"""A Megatron-DeepSpeed-style pipeline checkpoint, written by DeepSpeed's own PipelineEngine.

Run under torchrun, one process per (pipeline stage, tensor-parallel rank)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 4 tests/groundtruth/mds_pipe.py \
        --hf HF_DIR --out DIR --tp 2 --pp 2

The layer list is Megatron-DeepSpeed's ``GPTModelPipe`` for a Llama-style model (RMSNorm,
SwiGLU, no biases): 0 a parameter-free function (``_to_float16``), 1 ``EmbeddingPipe``
(``word_embeddings.weight``; with ``tie_word_embeddings`` in the HF config the tied module
``embed``, also last, as ``tied_modules.embed.word_embeddings.weight``), 2..L+1
``ParallelTransformerLayerPipe``
(``input_layernorm``, ``self_attention.query_key_value``, ``self_attention.dense``,
``post_attention_layernorm``, ``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``), L+2 the final
``RMSNorm`` (``weight``), L+3 ``LMHeadPipe`` (``lm_head.weight``; tied: the embedding), on
``PipeModelDataParallelTopology(num_pp=PP, num_mp=TP, num_dp=1)`` partitioned by transformer
layer. Each tp rank's parameters are its tensor-parallel shards of the HF weights in HF_DIR,
cut with plain torch by the megatron formulas of ds_universal_tp.megatron_shards (Megatron's
legacy ParallelAttention and SwiGLU MLP keep the same per-rank layouts as megatron-core); the
forward is a stand-in (the files do not depend on it). The module carries the
``universal_checkpoint_info`` Megatron-DeepSpeed's ``GPTModelPipe`` declares.

ZeRO stage 1, a client ``torch.optim.AdamW`` with lr 0 (the weights stay the HF weights); after
one ``train_batch`` the Adam moments are set to seeded random values with DeepSpeed's
``safe_set_full_optimizer_state`` (equal on every tp rank for the tp-replicated norms, zero on
the vocabulary padding rows), then ``engine.save_checkpoint(DIR, client_state={"iteration":
1})``. Every rank writes ``DIR/state.rank{R}.npz``: ``name|fp32``, ``name|exp_avg``,
``name|exp_avg_sq`` gathered back with DeepSpeed's ``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``; rank 0 writes ``DIR/expected.json`` (the tag, tp, pp and
every rank's (pp, tp) and names).

``--load UNIVERSAL`` (instead of training) or ``--then-load FILE`` (after it, once FILE names
``{"load": UNIVERSAL, "out": DIR}``) builds the same model with zero weights, loads UNIVERSAL
with DeepSpeed's universal loader (``"checkpoint": {"load_universal": true}``,
``engine.load_checkpoint``) and writes ``DIR/load.rank{R}.npz``: ``name|fp32``, ``|exp_avg``,
``|exp_avg_sq`` (what the rank's optimizer then holds), ``|weight`` (its live parameter) and
``|ref`` (its HF shard).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ds_train import start_deepspeed_on_cpu  # noqa: E402
from ds_universal_tp import megatron_shards  # noqa: E402

LAYER_OFFSET = 2              # GPTModelPipe: _to_float16, the embedding, then the layers


TIED = "tied_modules.embed.word_embeddings.weight"


def pipe_names(layers: int, tied: bool = False) -> dict:
    """megatron-core local name (megatron_shards) -> GPTModelPipe's pipeline name."""
    out = {"embedding.word_embeddings.weight": TIED if tied else "1.word_embeddings.weight"}
    for i in range(layers):
        p, q = f"decoder.layers.{i}.", f"{i + LAYER_OFFSET}."
        for a, b in (("input_layernorm.weight", "input_layernorm.weight"),
                     ("self_attention.linear_qkv.weight", "self_attention.query_key_value.weight"),
                     ("self_attention.linear_proj.weight", "self_attention.dense.weight"),
                     ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
                     ("mlp.linear_fc1.weight", "mlp.dense_h_to_4h.weight"),
                     ("mlp.linear_fc2.weight", "mlp.dense_4h_to_h.weight")):
            out[p + a] = q + b
    out["decoder.final_layernorm.weight"] = f"{layers + LAYER_OFFSET}.weight"
    out["output_layer.weight"] = f"{layers + LAYER_OFFSET + 1}.lm_head.weight"
    return out


def pipe_shards(hf: Path, tp: int) -> dict:
    """pipeline name -> [tp rank 0 shard, ...] (torch fp32)."""
    cfg = json.loads((hf / "config.json").read_text())
    names = pipe_names(cfg["num_hidden_layers"], bool(cfg.get("tie_word_embeddings")))
    return {names[k]: v for k, v in megatron_shards(hf, tp).items()}


def universal_info(vocab: int, tied: bool = False) -> dict:
    """GPTModelPipe's universal_checkpoint_info (Megatron-DeepSpeed, swiglu, RMSNorm, no
    biases; tied or untied embeddings), with the original vocabulary size Megatron's
    checkpointing records beside it."""
    from deepspeed.checkpoint import constants as c
    vocab_patterns = [r"tied_modules.embed.word_embeddings.weight"] if tied else \
        [r"\d+.word_embeddings.weight", r"\d+.lm_head.weight"]
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2,
        c.ORIGINAL_VOCAB_SIZE: vocab,
        c.VOCABULARY_PARAMETER_PATTERNS: vocab_patterns,
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: vocab_patterns if tied else [],
        c.TP_REPLICATED_PARAMETER_PATTERNS: [r"\d+.input_layernorm.weight",
                                             r"\d+.post_attention_layernorm.weight",
                                             r"\d+.weight"],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r"\d+.mlp.dense_4h_to_h.weight",
                                                    r"\d+.self_attention.dense.weight"],
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [r"\d+.mlp.dense_h_to_4h.weight"],
        c.PARAMETER_TO_AVERAGE_PATTERNS: [],
    }


def build_layers(shapes: dict, layers: int, tied: bool = False):
    """GPTModelPipe's layer list with parameters of this tp rank's shard shapes."""
    import torch
    from torch import nn
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    def param(name):
        return nn.Parameter(torch.zeros(shapes[name]))

    class Holder(nn.Module):
        def __init__(self, **params):
            super().__init__()
            for k, v in params.items():
                setattr(self, k, v)

    class EmbeddingPipe(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = Holder(
                weight=param(TIED if tied else "1.word_embeddings.weight"))

        def forward(self, ids):
            w = self.word_embeddings.weight
            return torch.tanh(w[ids % w.shape[0]])

    class ParallelTransformerLayerPipe(nn.Module):
        def __init__(self):
            super().__init__()
            p = f"{LAYER_OFFSET}."
            self.input_layernorm = Holder(weight=param(p + "input_layernorm.weight"))
            self.self_attention = Holder(
                query_key_value=Holder(weight=param(p + "self_attention.query_key_value.weight")),
                dense=Holder(weight=param(p + "self_attention.dense.weight")))
            self.post_attention_layernorm = Holder(
                weight=param(p + "post_attention_layernorm.weight"))
            self.mlp = Holder(dense_h_to_4h=Holder(weight=param(p + "mlp.dense_h_to_4h.weight")),
                              dense_4h_to_h=Holder(weight=param(p + "mlp.dense_4h_to_h.weight")))

        def forward(self, x):
            a = self.self_attention
            h = x * self.input_layernorm.weight
            qkv = h @ a.query_key_value.weight.t()
            x = torch.tanh(x + torch.tanh(qkv[..., :a.dense.weight.shape[1]]) @ a.dense.weight.t())
            h = x * self.post_attention_layernorm.weight
            g, u = torch.tanh(h @ self.mlp.dense_h_to_4h.weight.t()).chunk(2, dim=-1)
            return torch.tanh(x + (g * u) @ self.mlp.dense_4h_to_h.weight.t())

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = param(f"{layers + LAYER_OFFSET}.weight")

        def forward(self, x):
            return x * self.weight

    class LMHeadPipe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = Holder(weight=param(f"{layers + LAYER_OFFSET + 1}.lm_head.weight"))

        def forward(self, x):
            return x @ self.lm_head.weight.t()

    def _to_float16(x):
        return x

    def _logits_helper(embedding, x):
        return x @ embedding.word_embeddings.weight.t()

    if tied:
        return ([_to_float16, TiedLayerSpec("embed", EmbeddingPipe,
                                            tied_weight_attr="word_embeddings.weight")]
                + [LayerSpec(ParallelTransformerLayerPipe) for _ in range(layers)]
                + [LayerSpec(RMSNorm),
                   TiedLayerSpec("embed", EmbeddingPipe, forward_fn=_logits_helper,
                                 tied_weight_attr="word_embeddings.weight")])
    return ([_to_float16, LayerSpec(EmbeddingPipe)]
            + [LayerSpec(ParallelTransformerLayerPipe) for _ in range(layers)]
            + [LayerSpec(RMSNorm), LayerSpec(LMHeadPipe)])


def load(engine, path, out: Path, rank, shards, t):
    """DeepSpeed's universal loader on this rank (engine.load_checkpoint of ``path`` with
    ``load_universal``), then what the rank's optimizer holds: ``out/load.rank{R}.npz``."""
    import numpy as np
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    engine.load_checkpoint(path, load_optimizer_states=True, load_lr_scheduler_states=False)
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    got = {}
    for name, q in engine.module.named_parameters():
        got[f"{name}|fp32"] = safe_get_full_fp32_param(q).detach().float().numpy()
        got[f"{name}|weight"] = q.detach().float().numpy()
        for k in ("exp_avg", "exp_avg_sq"):
            got[f"{name}|{k}"] = safe_get_full_optimizer_state(q, k).detach().float().numpy()
        got[f"{name}|ref"] = shards[name][t].numpy()
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"load.rank{rank}.npz", **got)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--load", help="a universal checkpoint to load instead of training: "
                                  "every rank writes OUT/load.rank{R}.npz (|fp32, |exp_avg, "
                                  "|exp_avg_sq as the engine holds them; |weight its live "
                                  "weight; |ref its HF shard)")
    p.add_argument("--then-load", metavar="FILE",
                   help="after training, wait (up to 10 min) for FILE to name a universal "
                        "checkpoint and load it as --load does, in the same processes (one "
                        "torch and DeepSpeed start-up for both)")
    args = p.parse_args(argv)
    import numpy as np
    import torch
    import torch.distributed as tdist
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                 safe_set_full_optimizer_state)

    deepspeed = start_deepspeed_on_cpu()
    rank = tdist.get_rank()
    hf = Path(args.hf)
    cfg = json.loads((hf / "config.json").read_text())
    layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings"))
    topo = PipeModelDataParallelTopology(num_pp=args.pp, num_mp=args.tp, num_dp=1)
    coord = topo.get_coord(rank)
    t = coord.model
    shards = pipe_shards(hf, args.tp)
    shapes = {n: tuple(s[t].shape) for n, s in shards.items()}
    for n in list(shapes):                     # every layer has layer 0's shapes
        head, _, key = n.partition(".")
        if head.isdigit() and LAYER_OFFSET <= int(head) < layers + LAYER_OFFSET:
            shapes.setdefault(f"{LAYER_OFFSET}.{key}", shapes[n])
    vshape = shapes[TIED if tied else "1.word_embeddings.weight"]

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vshape[0]),
                                                 labels.reshape(-1) % vshape[0])

    def make_engine(universal: bool):
        model = PipelineModule(layers=build_layers(shapes, layers, tied), loss_fn=loss_fn,
                               topology=topo, partition_method="type:ParallelTransformerLayerPipe")
        model.universal_checkpoint_info = universal_info(vocab, tied)
        with torch.no_grad():
            for name, q in model.named_parameters():
                q.copy_(torch.zeros_like(q) if universal else shards[name][t])
        opt = torch.optim.AdamW(list(model.parameters()), lr=0.0, weight_decay=0.0)
        config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
                  "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        if universal:
            config["checkpoint"] = {"load_universal": True}
        return deepspeed.initialize(model=model, optimizer=opt, config=config)[0]

    if args.load:
        load(make_engine(True), args.load, Path(args.out), rank, shards, t)
        tdist.barrier()
        tdist.destroy_process_group()
        return
    engine = make_engine(False)
    g = torch.Generator().manual_seed(7)
    batches = [(ids, ids.clone()) for ids in
               (torch.randint(0, vocab, (1, 8), generator=g) for _ in range(2))]
    engine.train_batch(data_iter=iter(batches))

    opt = engine.optimizer                   # re-link the state views (see neox_pipe.py)
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    names = [n for n, _ in engine.module.named_parameters()]
    for name, q in engine.module.named_parameters():
        replicated = len(q.shape) == 1
        gen = torch.Generator().manual_seed(1000 * (sorted(shards).index(name) + 1)
                                            + (0 if replicated else t))
        m, m2 = torch.randn(q.shape, generator=gen), torch.rand(q.shape, generator=gen)
        if name.endswith(("word_embeddings.weight", "lm_head.weight")):
            rows = t * q.shape[0] + torch.arange(q.shape[0])
            m[rows >= vocab] = 0
            m2[rows >= vocab] = 0
        safe_set_full_optimizer_state(q, m, "exp_avg")
        safe_set_full_optimizer_state(q, m2, "exp_avg_sq")
    out = Path(args.out)
    engine.save_checkpoint(str(out), client_state={"iteration": engine.global_steps})
    tdist.barrier()
    state = {}
    for name, q in engine.module.named_parameters():
        state[f"{name}|fp32"] = safe_get_full_fp32_param(q).detach().float().numpy()
        for k in ("exp_avg", "exp_avg_sq"):
            state[f"{name}|{k}"] = safe_get_full_optimizer_state(q, k).detach().float().numpy()
    np.savez(out / f"state.rank{rank}.npz", **state)
    ranks = [None] * tdist.get_world_size()
    tdist.all_gather_object(ranks, {"rank": rank, "pp": coord.pipe, "tp": t, "names": names})
    if rank == 0:
        (out / "expected.json").write_text(json.dumps({
            "tag": f"global_step{engine.global_steps}", "tp": args.tp, "pp": args.pp,
            "ranks": ranks}) + "\n")
    tdist.barrier()
    if args.then_load:
        flag, deadline = Path(args.then_load), time.time() + 600
        while not flag.is_file() and time.time() < deadline:
            time.sleep(0.2)
        what = json.loads(flag.read_text())
        load(make_engine(True), what["load"], Path(what["out"]), rank, shards, t)
        tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
