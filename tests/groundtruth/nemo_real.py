"""Ground truth from the real NeMo 2 (nemo_toolkit 2.7.3, its ``nemo.lightning`` and llm
collection): NeMo's own save and load of a tiny Llama, on CPU.

NeMo is installed by scripts/setup.sh into ``$VENV/nemo`` (``requirements/nemo.txt``, no
dependencies resolved), apart from the venv's site-packages: this worker runs with the venv's
python (torch, megatron-core 0.16.1, transformers) and that directory appended to ``sys.path``.
:func:`available` says whether it is there.

``save(out, cfg, truth, tokens)``: NeMo's ``LlamaModel(LlamaConfig(...))`` of ``cfg`` set up
and saved the way ``llm.import_ckpt`` does it (``ModelConnector.nemo_setup`` on a CPU
``Trainer`` with ``MegatronStrategy``, then ``nemo_save``: ``trainer.save_checkpoint`` writes
``weights/`` through NeMo's ``MegatronCheckpointIO``, ``TrainerContext.io_dump`` writes
``context/io.json`` and ``context/model.yaml``), its parameters seeded and random. ``truth/``
gets the live ``state_dict()`` of the megatron-core model (``live.pt``) and its logits on
``tokens`` (``logits.pt``).

``load(ckpt, truth, tokens)``: NeMo's loader of ``llm.export_ckpt``
(``ModelConnector.nemo_load``: ``io.load_context(ckpt, subpath="model")`` builds the model from
``context/io.json``, the strategy loads ``weights/`` with ``dist_checkpointing.load``), then the
same two files, plus ``config.json``: the built config's fields.

Stand-ins (test harness only, inside the worker), for what NeMo imports at module level but does
not use on these paths and is not installed: ``datasets``, ``tensorstore``, ``modelopt``
(NVIDIA Model Optimizer; NeMo's restore asks it for a ModelOpt state, there is none) and
megatron-core's ``dist_checkpointing.strategies.tensorstore`` (gone in megatron-core 0.16.1;
NeMo 2.7.3's ``dist_ckpt_io`` imports it for a zarr load strategy). ``nemo_run`` is the real
package without its ``__init__`` (which imports its launchers: fabric, torchx, ...): NeMo needs
its ``config`` and YAML serializer. The CUDA workarounds of ``mcore_dist`` apply (no CUDA here).
Transformer Engine is absent, so NeMo builds megatron-core's local layer spec.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
_TIMEOUT_S = 300
STUBBED = ("datasets", "tensorstore", "modelopt",
           "megatron.core.dist_checkpointing.strategies.tensorstore")


def nemo_dir() -> Path:
    return Path(os.environ.get("MAPC_NEMO_DIR") or Path(sys.prefix) / "nemo")


def available() -> bool:
    return (nemo_dir() / "nemo" / "lightning" / "io" / "api.py").is_file() and \
        (nemo_dir() / "nemo_run" / "config.py").is_file()


def _run(mode: str, a: Path, b: Path, cfg: dict | None, tokens: list[int]):
    from tests.groundtruth.mcore_names import run_ranks
    Path(b).mkdir(parents=True, exist_ok=True)
    run_ranks(1, [str(HERE), mode, str(a), str(b), json.dumps(cfg or {}), json.dumps(tokens)],
              Path(b), {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        "MAPC_NEMO_DIR": str(nemo_dir())},
              "NeMo 2 worker", timeout=_TIMEOUT_S, cwd=str(b))


def save(out: Path, cfg: dict, truth: Path, tokens: list[int]) -> Path:
    _run("save", out, truth, cfg, tokens)
    return Path(out)


def load(ckpt: Path, truth: Path, tokens: list[int]) -> Path:
    _run("load", ckpt, truth, None, tokens)
    return Path(truth)


# --------------------------------------------------------------------------------- worker
class _Anything(type):
    """A stand-in class: any attribute, subscript or call gives a stand-in again (a call with one
    function returns it: a decorator)."""
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __getitem__(cls, item):
        return cls

    def __call__(cls, *a, **k):
        if len(a) == 1 and callable(a[0]) and not k:
            return a[0]
        return cls


class _StandIn(types.ModuleType):
    real_names: str | None = None

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if self.real_names:
            mod = importlib.import_module(self.real_names)
            if hasattr(mod, name):
                return getattr(mod, name)
        return _Anything(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: dict):
        self.packages = packages     # name -> (its real directory, module re-exported)

    def find_spec(self, name, path, target=None):
        if name in self.packages or name in STUBBED or name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StandIn(spec.name)
        real = self.packages.get(spec.name)
        m.__path__ = [real[0]] if real else []
        m.real_names = real[1] if real else None
        return m

    def exec_module(self, module):
        pass


def _setup():
    import torch
    # first: the nemo_toolkit wheel's own top-level `tests` package would take the name
    from tests.groundtruth.mcore_dist import _patch_cuda
    _patch_cuda(torch)
    # MegatronParallel.init_model_parallel runs on a side CUDA stream (no CUDA here)
    import contextlib
    torch.cuda.Stream = type("Stream", (), {"__init__": lambda self, *a, **k: None})
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    # MegatronCheckpointIO.load_checkpoint asserts CUDA is initialized after the load
    torch.cuda.is_initialized = lambda: True
    sys.path.append(str(nemo_dir()))
    sys.meta_path.insert(0, _Finder({"nemo_run": (str(nemo_dir() / "nemo_run"),
                                                  "nemo_run.config")}))
    return torch


def _llama_config(cfg: dict):
    import torch
    from nemo.collections.llm.gpt.model.llama import LlamaConfig
    return LlamaConfig(
        num_layers=cfg["layers"], hidden_size=cfg["hidden"], ffn_hidden_size=cfg["ffn"],
        num_attention_heads=cfg["heads"], num_query_groups=cfg["groups"],
        seq_length=cfg["max_positions"], vocab_size=cfg["vocab"],
        layernorm_epsilon=cfg["norm_eps"], rotary_base=cfg["rope_theta"],
        share_embeddings_and_output_weights=cfg["tied"],
        # plain torch on CPU: no fused kernels
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        params_dtype=torch.float32, bf16=False, init_method_std=0.02)


def _logits(torch, gpt, tokens):
    import contextlib
    from megatron.core.tensor_parallel import random as mcore_random
    ids = torch.tensor([tokens], dtype=torch.long)
    pos = torch.arange(len(tokens)).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, len(tokens), len(tokens), dtype=torch.bool), 1)
    gpt.eval()
    mcore_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    with torch.no_grad():
        return gpt(ids, pos, mask).float()


def _dump(torch, model, truth: Path, tokens):
    gpt = model.module
    torch.save({k: v.detach().clone() for k, v in gpt.state_dict().items()
                if isinstance(v, torch.Tensor)}, truth / "live.pt")
    torch.save(_logits(torch, gpt, tokens), truth / "logits.pt")


def _main(mode, a, b, cfg, tokens):
    torch = _setup()
    from nemo.lightning.io.connector import ModelConnector
    a, b = Path(a), Path(b)
    conn = ModelConnector.__new__(ModelConnector)
    if mode == "save":
        from nemo.collections.llm.gpt.model.llama import LlamaModel
        torch.manual_seed(0)
        model = LlamaModel(_llama_config(cfg))
        # ckpt_async_save=False: the async save's worker queue is not needed for one rank
        trainer = conn.nemo_setup(model, ckpt_async_save=False)
        with torch.no_grad():
            for p in model.module.parameters():
                p.normal_(0, 0.02)
        conn.nemo_save(a, trainer)
    else:
        model, trainer = conn.nemo_load(a, cpu=True)
        c = model.config
        (b / "config.json").write_text(json.dumps(
            {k: getattr(c, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                        "num_attention_heads", "num_query_groups", "kv_channels",
                                        "vocab_size", "layernorm_epsilon", "rotary_base",
                                        "seq_length", "normalization", "gated_linear_unit",
                                        "position_embedding_type", "add_bias_linear",
                                        "share_embeddings_and_output_weights")} |
            {"activation_func": f"{c.activation_func.__module__}.{c.activation_func.__name__}",
             "model_class": f"{type(model).__module__}.{type(model).__name__}",
             "config_class": f"{type(c).__module__}.{type(c).__name__}"}))
    _dump(torch, model, b, tokens)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5]))
