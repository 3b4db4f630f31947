"""Ground truth from the real megatron-core: logits of a GPTModel loaded from a mapc Megatron
checkpoint (tp=1, pp=1), computed on CPU.

``mcore_logits(cfg, model_file, tokens, variants)`` runs one subprocess (a gloo world of size 1)
that builds the model with :func:`mcore_names.build_gpt` (local spec), loads the rank file's
``model`` state dict strictly (every name and shape must be megatron-core's), and returns the
logits for ``tokens``, once per variant. A variant ``{"swap": [a, b]}`` exchanges two tensors
before loading: a negative control showing the comparison can fail. A variant
``{"cfg": CFG, "file": MODEL_FILE}`` runs another model in the same process (one startup for
several models). A variant ``{"mtp": true}`` (a cfg with ``mtp``) returns ``[main logits, MTP
layer 1's logits, ...]``: megatron-core's MultiTokenPredictionBlock run by GPTModel's own
forward (input ids rolled by one, the last position given token 0), its output taken by a hook.

CPU workarounds (test harness only, applied only inside the worker), beyond mcore_names':

* ``torch.cuda.current_device`` returns ``"cpu"``: the rotary embedding moves its
  frequencies to the current CUDA device on first use.
* ``tensor_parallel.get_cuda_rng_tracker`` returns a tracker whose ``fork()`` does nothing:
  core attention forks the CUDA RNG for dropout (none in eval mode).
* An explicit causal ``attention_mask`` (True above the diagonal) is passed: the default one is
  made on CUDA.
* MLA models: megatron-core's local ``DotProductAttention`` (the only core attention without
  Transformer Engine) does not take the ``k_channels``/``v_channels`` that MLA passes (TE's
  does): its ``__init__`` is wrapped to accept them and size its output by ``v_channels``
  (q/k of nope+rope dims, v of v_head_dim). Its math (softmax(QK^T * scale) V, with the scale
  MLA passes) is megatron-core's own, unchanged. ``multi_latent_attention.TELinear`` (None
  without TE, used in an ``isinstance``) becomes a class nothing is an instance of.
* MoE models: ``moe_utils.te_general_gemm`` is set to None when megatron-core did not define it
  (Transformer Engine absent): its router gating reads the name unconditionally (megatron-core
  0.16.1 defines it only when TE imports), and None selects its plain-torch path.

Usage as a script::

    python tests/groundtruth/mcore_forward.py CFG_JSON MODEL_FILE TOKENS_JSON VARIANTS_JSON

prints ``[logits of variant 0, ...]`` (nested lists, [1, len(tokens), padded vocab]) as JSON.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).parent


def mcore_logits(cfg: dict, model_file, tokens: list[int], variants=({},)) -> list:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, str(Path(__file__)), json.dumps(cfg), str(model_file),
                          json.dumps(tokens), json.dumps(list(variants))],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"megatron-core forward failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker(cfg: dict, model_file: str, tokens: list[int], variants: list) -> list:
    import argparse
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    sys.path.insert(0, str(_HERE))
    from mcore_names import single_cpu_rank, end_single_cpu_rank, build_gpt
    single_cpu_rank()

    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(model_file, weights_only=True)["model"]
    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens)).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, len(tokens), len(tokens)), diagonal=1).bool()
    results = []
    for v in variants:
        vcfg, vstate = cfg, state
        if v.get("file"):       # another model in the same process: its own config and file
            vcfg = v["cfg"]
            with torch.serialization.safe_globals([argparse.Namespace]):
                vstate = torch.load(v["file"], weights_only=True)["model"]
        sd = dict(vstate)
        if v.get("swap"):
            a, b = v["swap"]
            sd[a], sd[b] = vstate[b], vstate[a]
        model = build_gpt(vcfg, 1, 1)
        if v.get("dist"):       # a torch_dist checkpoint instead, by megatron-core's own load
            _dist_load(torch, model, v)
        else:
            missing, unexpected = model.load_state_dict(sd, strict=False)
            missing = [m for m in missing if not m.endswith("_extra_state")]
            if missing or unexpected:
                raise SystemExit(f"state dict mismatch: missing {missing}, "
                                 f"unexpected {unexpected}")
        if v.get("dist_save"):
            _dist_save(torch, model, vcfg, v)
        model.eval()
        if v.get("mtp"):
            # a model with mtp_num_layers: its forward (which then needs labels) returns the
            # loss; the MTP block's output, [main hidden; each MTP layer's hidden] stacked on
            # the sequence axis, is taken by a hook and both go through the output layer
            got = {}
            model.mtp.register_forward_hook(lambda m, a, out: got.setdefault("h", out))
            with torch.no_grad():
                model(input_ids=ids, position_ids=pos, attention_mask=mask, labels=ids)
                results.append([model.output_layer(h)[0].transpose(0, 1).tolist()
                                for h in torch.chunk(got["h"], 1 + int(vcfg["mtp"]), dim=0)])
            continue
        with torch.no_grad():
            results.append(model(input_ids=ids, position_ids=pos, attention_mask=mask).tolist())
    end_single_cpu_rank()
    return results


# what Megatron-LM passes as sharded_sd_metadata for a model saved with its default flags
# (passed as a copy: megatron-core adds the data-parallel group of the moment to it in place)
_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
             "distrib_optim_sharding_type": "dp_reshardable"}


def _dist_load(torch, model, v: dict) -> None:
    """``dist_checkpointing.load`` (strict ``raise_all``: every key the model asks for must be
    there, nothing else) of the directory ``v["dist"]`` (the one holding ``metadata.json``),
    keys under ``v["prefix"]`` (NeMo 2: ``module.``; ``v["unread"]``: the exact list of
    checkpoint keys the model does not ask for, Transformer Engine's), then ``load_state_dict(strict=True)``;
    with ``v["out"]`` the loaded ``state_dict()`` is saved there."""
    from megatron.core import dist_checkpointing
    sys.path.insert(0, str(_HERE.parents[1]))
    from tests.groundtruth.mcore_dist import _patch_cuda
    _patch_cuda(torch)
    # megatron-core registers its common.pt classes at import; the safe_globals context that
    # read the Megatron file above dropped argparse.Namespace again on exit
    from megatron.core.safe_globals import register_safe_globals
    register_safe_globals()
    prefix = v.get("prefix", "")
    sharded = model.sharded_state_dict(prefix=prefix, metadata=dict(_METADATA))
    if "unread" in v:       # keys in the checkpoint the model does not ask for, as listed
        loaded, missing, unexpected = dist_checkpointing.load(
            {"model": sharded}, v["dist"], strict="return_all")
        if unexpected or sorted(map(str, missing)) != sorted(v["unread"]):
            raise SystemExit(f"dist load: asked for but absent {sorted(unexpected)}, "
                             f"unread {sorted(map(str, missing))} (expected {v['unread']})")
    else:
        loaded = dist_checkpointing.load({"model": sharded}, v["dist"], strict="raise_all")
    sd = {k[len(prefix):]: t for k, t in loaded["model"].items()}
    model.load_state_dict(sd, strict=True)
    if v.get("out"):
        torch.save({k: t for k, t in model.state_dict().items()
                    if not k.endswith("_extra_state")}, v["out"])


def _dist_save(torch, model, cfg: dict, v: dict) -> None:
    """Megatron-LM's ``--ckpt-format torch_dist`` save of the loaded model into ROOT =
    ``v["dist_save"]``: ``dist_checkpointing.save`` of ``{"model": sharded_state_dict(), "args",
    "checkpoint_version", "iteration", "opt_param_scheduler"}`` into ``ROOT/iter_0000007``
    and the tracker; ``args`` are mcore_dist's with ``v["args"]`` over them."""
    from megatron.core import dist_checkpointing
    sys.path.insert(0, str(_HERE.parents[1]))
    from tests.groundtruth import mcore_dist
    mcore_dist._patch_cuda(torch)
    args = mcore_dist._args(dict(cfg, vocab=cfg.get("true_vocab", cfg["vocab"])), 1, 1, "fp32")
    for key, value in v.get("args", {}).items():
        setattr(args, key, value)
    out = mcore_dist.iter_dir(Path(v["dist_save"]))
    out.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(metadata=dict(_METADATA)),
                             "args": args, "checkpoint_version": 3.0,
                             "iteration": mcore_dist.ITERATION,
                             "opt_param_scheduler": {"max_lr": 1e-3,
                                                     "num_steps": mcore_dist.ITERATION}},
                            str(out), content_metadata=dict(_METADATA))
    (Path(v["dist_save"]) / "latest_checkpointed_iteration.txt").write_text(
        str(mcore_dist.ITERATION))


if __name__ == "__main__":
    cfg, model_file, tokens, variants = sys.argv[1:5]
    print(json.dumps(_worker(json.loads(cfg), model_file, json.loads(tokens),
                             json.loads(variants))))
