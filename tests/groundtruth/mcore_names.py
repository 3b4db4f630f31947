"""Ground truth from the real megatron-core: state-dict names and shapes.

Builds a Llama-style ``GPTModel`` (local spec, ``get_gpt_layer_local_spec``)
with the real megatron-core on CPU, once per ``(tp_rank, pp_rank)``, and
reports ``{state_dict key: shape}`` for each rank.  Keys ending in
``_extra_state`` are dropped.

Every rank runs in its own subprocess (this file, run with ``--worker``)
under a gloo process group, because megatron-core's ``parallel_state``
needs a real ``torch.distributed`` world of size ``tp * pp``.  Each worker
writes one JSON file into a temporary directory; the parent collects them.

CPU workarounds (test harness only, applied only inside the worker):

* ``use_cpu_initialization=True`` and ``perform_initialization=False``:
  parameters are created with ``torch.empty`` on CPU, so the CUDA RNG
  tracker (``model_parallel_cuda_manual_seed``, which needs CUDA) is never
  used and is not seeded.
* ``torch.Tensor.cuda`` is replaced by the identity.  With tied embeddings
  and ``pp > 1``, ``LanguageModule.setup_embeddings_and_output_layer`` does
  ``weight.data = weight.data.cuda()`` before an all-reduce over the
  embedding group; on CPU the tensor simply stays put (gloo reduces CPU
  tensors).  Nothing else reached while building the model touches CUDA.
* ``meta=True`` (optional) also sets ``torch.set_default_device("meta")`` in
  the worker, so full-size configs allocate nothing (same names and shapes).

Usage as a script::

    python tests/groundtruth/mcore_names.py '{"hidden":64,"layers":4,...}' TP PP [--meta]

prints ``{"tp_rank,pp_rank": {name: shape}}`` as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["mcore_state_dict_shapes", "CFG_KEYS"]

CFG_KEYS = ("hidden", "layers", "heads", "groups", "head_dim", "ffn", "vocab", "tied")

_WORKER_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mcore_state_dict_shapes(
    cfg: dict, tp: int, pp: int, *, meta: bool = False
) -> dict[tuple[int, int], dict[str, list[int]]]:
    """Build megatron-core GPTModel (local spec, get_gpt_layer_local_spec) for a Llama-style config
    on CPU with use_cpu_initialization=True, for every (tp_rank, pp_rank), and return
    {(tp_rank, pp_rank): {state_dict key: shape}} with `_extra_state` keys dropped.

    Optional cfg keys: ``layers_first_stage`` / ``layers_last_stage`` (passed as
    ``num_layers_in_first/last_pipeline_stage``, megatron-core's uneven-PP knobs) and
    ``max_seq`` (default 128; the shape of learned position embeddings, if any).

    Optional architecture keys (defaults give the Llama-style model above):
    ``norm`` ("RMSNorm" or "LayerNorm"), ``gated`` (True: SwiGLU fc1 of 2*ffn rows),
    ``activation`` ("silu", "gelu"; default "silu" if gated else "gelu"),
    ``linear_bias`` (``add_bias_linear``, default False), ``qkv_bias`` (``add_qkv_bias``,
    default False), ``position_embedding`` ("rope" or "learned_absolute").

    MoE: ``experts`` (``num_moe_experts``, SequentialMLP experts, local spec) and ``topk``;
    the expert-parallel sizes come from ``parallel_state``.

    ``meta=True`` builds the model under ``torch.set_default_device("meta")`` so that
    full-size configs (e.g. 8B) cost no memory; names and shapes are identical.

    Raises RuntimeError (carrying a worker's stderr) if megatron-core rejects the
    configuration, e.g. ``layers % pp != 0`` without the uneven-PP keys.
    """
    missing = [k for k in CFG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"cfg is missing keys {missing}")
    tp, pp = int(tp), int(pp)
    world = tp * pp
    if world < 1:
        raise ValueError("tp and pp must be >= 1")

    with tempfile.TemporaryDirectory(prefix="mcore_names_") as out_dir:
        run_ranks(world, [os.path.abspath(__file__), "--worker", json.dumps(cfg), str(tp),
                          str(pp), out_dir], Path(out_dir),
                  {"MCORE_NAMES_META": "1" if meta else "0"}, "megatron-core worker")

        result: dict[tuple[int, int], dict[str, list[int]]] = {}
        for rank in range(world):
            data = json.loads(Path(out_dir, f"rank{rank}.json").read_text())
            result[(data["tp_rank"], data["pp_rank"])] = data["shapes"]
    if len(result) != world:
        raise RuntimeError(f"expected {world} distinct (tp_rank, pp_rank), got {sorted(result)}")
    return dict(sorted(result.items()))


def run_ranks(world: int, argv: list[str], log_dir: Path, extra_env: dict, what: str,
              timeout: float | None = None, cwd: str | None = None) -> None:
    """Start ``world`` ranks of ``python ARGV...`` on a gloo group (RANK, WORLD_SIZE, a free
    MASTER_PORT; one thread each, no CUDA) and wait for all. Output goes to files, not pipes:
    a rank blocked on a full pipe would stall the collectives of all the others. A rank that
    fails or hangs kills the rest (their collectives would hang too); raises RuntimeError with
    the first failing rank's output."""
    env_base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                    WORLD_SIZE=str(world), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                    PYTHONWARNINGS="ignore", **extra_env)
    procs, logs = [], []
    for rank in range(world):
        log = open(Path(log_dir, f".rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, *argv], env=dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd))
    failures = []  # (rank, reason, output)
    try:
        for rank, p in enumerate(procs):
            try:
                p.wait(timeout=timeout or _WORKER_TIMEOUT_S)
                reason = None if p.returncode == 0 else f"exit {p.returncode}"
            except subprocess.TimeoutExpired:
                reason = "timeout"
                for q in procs:
                    if q.poll() is None:
                        q.kill()
                p.wait()
            if reason:
                logs[rank].seek(0)
                failures.append((rank, reason, logs[rank].read()))
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
        for log in logs:
            log.close()
    if failures:
        rank, reason, err = failures[0]
        others = ", ".join(f"rank {r}: {why}" for r, why, _ in failures[1:])
        raise RuntimeError(f"{what} rank {rank} failed ({reason})"
                           + (f"; also {others}" if others else "")
                           + f"\n--- rank {rank} output (tail) ---\n{err[-5000:]}")


# --------------------------------------------------------------------------- worker


def _worker(cfg: dict, tp: int, pp: int, out_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    # See module docstring: tied embeddings with pp > 1 call `.cuda()` on the
    # shared weight before all-reducing it.  Keep it on CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)

    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if os.environ.get("MCORE_NAMES_META") == "1":
        torch.set_default_device("meta")
    model = build_gpt(cfg, tp, pp)
    shapes = {
        k: list(v.shape)
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state")
    }
    tmp = Path(out_dir, f"rank{rank}.json.tmp")
    tmp.write_text(json.dumps({"tp_rank": tp_rank, "pp_rank": pp_rank, "shapes": shapes}))
    tmp.rename(Path(out_dir, f"rank{rank}.json"))

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def build_gpt(cfg: dict, tp: int, pp: int, params_dtype=None, vp_stage=None):
    """The megatron-core GPTModel of ``cfg`` for this process's (tp, pp) rank; call after
    ``parallel_state.initialize_model_parallel`` (see ``_worker``). With ``cfg["vpp"]`` it is
    the chunk of virtual stage ``vp_stage`` (as Megatron-LM's ``get_model`` builds it)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = params_dtype or torch.float32
    extra = {}
    experts = cfg.get("experts")
    if experts:   # MoE (SequentialMLP, allgather dispatcher: no CUDA streams)
        extra.update(num_moe_experts=int(experts), moe_router_topk=int(cfg.get("topk", 2)),
                     moe_ffn_hidden_size=int(cfg["ffn"]), moe_grouped_gemm=False,
                     moe_token_dispatcher_type="allgather",
                     expert_model_parallel_size=parallel_state
                     .get_expert_model_parallel_world_size(),
                     expert_tensor_parallel_size=parallel_state
                     .get_expert_tensor_parallel_world_size())
    if cfg.get("layers_first_stage") is not None:
        extra["num_layers_in_first_pipeline_stage"] = int(cfg["layers_first_stage"])
    if cfg.get("layers_last_stage") is not None:
        extra["num_layers_in_last_pipeline_stage"] = int(cfg["layers_last_stage"])
    norm = cfg.get("norm", "RMSNorm")
    gated = bool(cfg.get("gated", True))
    activation = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[
        cfg.get("activation", "silu" if gated else "gelu")]
    config = TransformerConfig(
        num_layers=int(cfg["layers"]),
        hidden_size=int(cfg["hidden"]),
        ffn_hidden_size=int(cfg["ffn"]),
        num_attention_heads=int(cfg["heads"]),
        num_query_groups=int(cfg["groups"]),
        kv_channels=int(cfg["head_dim"]),
        normalization=norm,
        gated_linear_unit=gated,
        activation_func=activation,
        add_bias_linear=bool(cfg.get("linear_bias", False)),
        add_qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_layernorm=bool(cfg.get("qk_layernorm", False)),
        layernorm_epsilon=float(cfg.get("norm_eps", 1e-5)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        virtual_pipeline_model_parallel_size=cfg.get("vpp"),
        **extra,
    )
    if cfg.get("vpp"):
        extra_model = {"vp_stage": vp_stage}
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    else:
        extra_model = {}
        first = parallel_state.is_pipeline_first_stage()
        last = parallel_state.is_pipeline_last_stage()
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(
            normalization=norm, qk_layernorm=bool(cfg.get("qk_layernorm", False)),
            num_experts=int(experts) if experts else None, moe_grouped_gemm=False),
        vocab_size=int(cfg["vocab"]),
        max_sequence_length=int(cfg.get("max_seq", 128)),
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=bool(cfg["tied"]),
        position_embedding_type=cfg.get("position_embedding", "rope"),
        rotary_base=int(cfg.get("rotary_base", 10000)),
        rotary_percent=float(cfg.get("rotary_percent", 1.0)),
        **extra_model,
    )


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        _, cfg_json, tp, pp, out_dir = argv
        _worker(json.loads(cfg_json), int(tp), int(pp), out_dir)
        return 0
    meta = "--meta" in argv
    argv = [a for a in argv if a != "--meta"]
    if len(argv) != 3:
        print(f"usage: {sys.argv[0]} CFG_JSON TP PP [--meta]", file=sys.stderr)
        return 2
    cfg_json, tp, pp = argv
    res = mcore_state_dict_shapes(json.loads(cfg_json), int(tp), int(pp), meta=meta)
    # one "name": shape per line, ranks in (tp_rank, pp_rank) order
    lines = []
    for (t, p), shapes in res.items():
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
        lines.append(f" {json.dumps(f'{t},{p}')}: {{\n{body}\n }}")
    sys.stdout.write("{\n" + ",\n".join(lines) + "\n}\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
