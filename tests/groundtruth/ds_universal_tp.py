"""DeepSpeed's own universal-checkpoint code on a tensor-parallel (TP) Megatron model.

Run as a subprocess (it imports DeepSpeed)::

    python tests/groundtruth/ds_universal_tp.py JOBS.json

``JOBS.json`` is a list of jobs, run in one process (importing torch and DeepSpeed is the slow
part):

``{"build": OUT, "hf": HF_DIR, "tp": 2, "seed": 0}``
    A Megatron-DeepSpeed-style universal checkpoint of the HF Llama-style model in HF_DIR at
    TP=tp, made the way ``ds_to_universal`` makes one: each rank's TP shards (cut here from the
    HF weights with plain torch, by the megatron-core formulas of /work/shared/LAYOUTS.md: fused
    QKV per KV group, fc1 = [gate_r; up_r], row-parallel o/down, vocabulary rows padded to
    128*tp), random Adam moments per shard, written as DeepSpeed's extraction fragments and
    merged by DeepSpeed's ``merge_tp_slices`` with the ``universal_checkpoint_info`` patterns
    Megatron-DeepSpeed declares. The model states per rank hold the shards (``module``,
    ``param_shapes``, ``mp_world_size``). ``OUT/shards.npz`` keeps every shard
    (``name|rank|fp32``, ``|exp_avg``, ``|exp_avg_sq``).

``{"load": UNIVERSAL_DIR, "hf": HF_DIR, "tp": T, "out": NPZ}``
    DeepSpeed's loader, ``load_hp_checkpoint_state``, run on every parameter of UNIVERSAL_DIR
    for each of T ranks (the shard shapes are this file's own megatron shards at TP=T): stores
    ``name|rank|KEY`` (fp32, exp_avg, exp_avg_sq: what the rank's optimizer would hold) and
    ``name|rank|ref`` (this file's weight shard at TP=T).
"""
from __future__ import annotations

import json
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np

PAD = 128                     # make_vocab_size_divisible_by


def megatron_shards(hf: Path, tp: int) -> OrderedDict:
    """name -> [rank 0 shard, rank 1 shard, ...] (torch fp32), megatron-core local names."""
    import torch
    from safetensors.torch import load_file
    cfg = json.loads((hf / "config.json").read_text())
    w = load_file(str(hf / "model.safetensors"))
    nh, ng, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = cfg.get("head_dim") or h // nh
    v = cfg["vocab_size"]
    vp = -(-v // (PAD * tp)) * PAD * tp

    def vocab(x):
        return list(torch.cat([x, torch.zeros(vp - v, x.shape[1])]).chunk(tp, 0))

    out = OrderedDict()
    out["embedding.word_embeddings.weight"] = vocab(w["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[q + "input_layernorm.weight"] = [w[p + "input_layernorm.weight"]] * tp
        qw = w[p + "self_attn.q_proj.weight"].reshape(ng, nh // ng, hd, h)
        kw = w[p + "self_attn.k_proj.weight"].reshape(ng, 1, hd, h)
        vw = w[p + "self_attn.v_proj.weight"].reshape(ng, 1, hd, h)
        qkv = torch.cat([qw, kw, vw], 1).reshape(-1, h)       # per group: its q heads, k, v
        out[q + "self_attention.linear_qkv.weight"] = list(qkv.chunk(tp, 0))
        out[q + "self_attention.linear_proj.weight"] = \
            list(w[p + "self_attn.o_proj.weight"].chunk(tp, 1))
        out[q + "pre_mlp_layernorm.weight"] = [w[p + "post_attention_layernorm.weight"]] * tp
        g, u = w[p + "mlp.gate_proj.weight"].chunk(tp, 0), w[p + "mlp.up_proj.weight"].chunk(tp, 0)
        out[q + "mlp.linear_fc1.weight"] = [torch.cat([g[r], u[r]]) for r in range(tp)]
        out[q + "mlp.linear_fc2.weight"] = list(w[p + "mlp.down_proj.weight"].chunk(tp, 1))
    out["decoder.final_layernorm.weight"] = [w["model.norm.weight"]] * tp
    if "lm_head.weight" in w:
        out["output_layer.weight"] = vocab(w["lm_head.weight"])
    return OrderedDict((k, [s.float().contiguous() for s in x]) for k, x in out.items())


def megatron_info(vocab: int) -> dict:
    """The universal_checkpoint_info a Megatron-DeepSpeed GPT model declares (megatron-core
    names): these patterns, not mapc, say which tensor is which."""
    from deepspeed.checkpoint import constants as c
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2,
        c.ORIGINAL_VOCAB_SIZE: vocab,
        c.VOCABULARY_PARAMETER_PATTERNS: [r"embedding\.word_embeddings\.weight",
                                          r"output_layer\.weight"],
        c.TP_REPLICATED_PARAMETER_PATTERNS: [r".*layernorm\.weight$"],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r".*linear_proj\.weight$",
                                                    r".*linear_fc2\.weight$"],
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [r".*linear_fc1\.weight$"],
        c.PARAMETER_TO_AVERAGE_PATTERNS: [],
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [],
    }


def build(job):
    import torch
    from deepspeed.checkpoint.ds_to_universal import dump_param_fragment, merge_tp_slices
    out, tp = Path(job["build"]), int(job["tp"])
    hf = Path(job["hf"])
    cfg = json.loads((hf / "config.json").read_text())
    shards = megatron_shards(hf, tp)
    g = torch.Generator().manual_seed(int(job.get("seed", 0)))
    udir = out / "global_step7_universal"
    tmp = out / "fragments"
    saved = {}
    vocab_names = ("embedding.word_embeddings.weight", "output_layer.weight")
    for idx, (name, per_rank) in enumerate(shards.items()):
        for r, s in enumerate(per_rank):
            if name.endswith("layernorm.weight"):
                # a replicated tensor has the same moments on every rank
                gg = torch.Generator().manual_seed(1000 + idx)
                m, m2 = torch.randn(s.shape, generator=gg), torch.rand(s.shape, generator=gg)
            else:
                m, m2 = torch.randn(s.shape, generator=g), torch.rand(s.shape, generator=g)
            if name in vocab_names:         # padding rows never get a gradient
                rows = r * s.shape[0] + torch.arange(s.shape[0])
                m[rows >= cfg["vocab_size"]] = 0
                m2[rows >= cfg["vocab_size"]] = 0
            for key, t in (("fp32", s), ("exp_avg", m), ("exp_avg_sq", m2)):
                # the fp32 partitions are the optimizer's parameters (requires_grad)
                flat = t.reshape(-1).clone().requires_grad_(key == "fp32")
                dump_param_fragment(str(tmp), r, 0, key, flat, name, 0, flat.numel())
                saved[f"{name}|{r}|{key}"] = t.detach().numpy()
            dump_param_fragment(str(tmp), r, 0, "step", torch.tensor(7.0), name, 0, 1)
    info = megatron_info(cfg["vocab_size"])
    left = None                       # patterns no tensor matched
    for name, per_rank in shards.items():
        unmatched = set(merge_tp_slices(info, str(udir / "zero"), str(tmp), tp,
                                        (name, [s.shape for s in per_rank])))
        left = unmatched if left is None else left & unmatched
    import shutil
    shutil.rmtree(tmp)
    names = list(shards)
    for r in range(tp):
        module = OrderedDict((n, shards[n][r].clone()) for n in names)
        torch.save({
            "module": module, "buffer_names": [], "optimizer": None,
            "param_shapes": [OrderedDict((n, shards[n][r].shape) for n in names)],
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
            "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
            "global_steps": 7, "global_samples": 56, "dp_world_size": 1, "mp_world_size": tp,
            "ds_config": {"train_micro_batch_size_per_gpu": 1,
                          "zero_optimization": {"stage": 1}},
            "ds_version": "0.19.8", "universal_checkpoint_info": info, "iteration": 7,
        }, udir / f"mp_rank_{r:02d}_model_states.pt")
    from deepspeed.runtime.zero.config import ZeroStageEnum
    torch.save({"zero_stage": ZeroStageEnum.optimizer_states, "partition_count": 1,
                "clip_grad": 1.0, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95),
                                                    "eps": 1e-8, "weight_decay": 0.0,
                                                    "params": [0]}]},
               udir / "zero" / "optimizer_state.pt")
    (out / "latest_universal").write_text(udir.name)
    np.savez(out / "shards.npz", **saved)
    return {"unmatched": sorted(left or ())}


def load(job):
    import torch
    from deepspeed.checkpoint.universal_checkpoint import load_hp_checkpoint_state
    root, tp = Path(job["load"]), int(job["tp"])
    udir = root / (root / "latest_universal").read_text().strip()
    ref = megatron_shards(Path(job["hf"]), tp)
    got = {}
    for name, per_rank in ref.items():
        for r, s in enumerate(per_rank):
            p = torch.nn.Parameter(torch.empty(s.shape))
            hp = torch.empty(s.numel())
            p._hp_mapping = types.SimpleNamespace(
                lp_fragment_address=types.SimpleNamespace(start=0, numel=s.numel()),
                get_hp_fragment=lambda hp=hp: hp, optim_fragment={})
            load_hp_checkpoint_state(p, str(udir / "zero" / name), r, tp)
            got[f"{name}|{r}|fp32"] = hp.reshape(s.shape).numpy()
            for key, t in p._hp_mapping.optim_fragment.items():
                got[f"{name}|{r}|{key}"] = t.reshape(s.shape).numpy()
            got[f"{name}|{r}|ref"] = s.numpy()
    np.savez(job["out"], **got)
    return {"loaded": len(got)}


def main(argv):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    jobs = json.loads(Path(argv[0]).read_text())
    print(json.dumps([build(j) if "build" in j else load(j) for j in jobs]))


if __name__ == "__main__":
    main(sys.argv[1:])
