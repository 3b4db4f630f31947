"""Ground truth from the real DeepSpeed: ZeRO checkpoints, and DeepSpeed's own tools run on them.

Everything DeepSpeed runs in subprocesses (``DS_ACCELERATOR=cpu``, gloo, one process per
data-parallel rank under ``torch.distributed.run``), so the test process never imports
deepspeed and stays free of its global side effects.

* :func:`make_zero_checkpoint` trains the tiny Llama of ``ds_train.py`` for a few steps
  at ZeRO stage 1/2/3 (fp32 or bf16) and returns the checkpoint directory (the one
  holding ``latest``).  Results are cached: a directory that already holds a finished run
  with the same settings is returned as is.
* :func:`zero_to_fp32` runs ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``.
* :func:`ds_to_universal` runs ``python -m deepspeed.checkpoint.ds_to_universal ... --inject_missing_state``.
* :func:`resume_and_step` loads a checkpoint at any world size (optionally with
  ``"checkpoint": {"load_universal": true}``), trains more steps and reports the loss and the
  resulting full fp32 weights and Adam moments: the oracle for "the next training step after
  resharding gives exactly what DeepSpeed's own universal path gives".

Every finished run directory holds ``expected.json`` (``loss`` per step and the settings),
``config.json`` (HF config), DeepSpeed's ``latest`` + ``global_stepN/`` and
``fp32.safetensors`` / ``exp_avg.safetensors`` / ``exp_avg_sq.safetensors``: the full,
unpartitioned fp32 master weights and Adam moments by HF parameter name, gathered with
DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` right after
the save.

Usage as a script (used by the helpers, handy by hand)::

    python tests/groundtruth/deepspeed_ckpt.py zero_to_fp32 CKPT_DIR OUT.safetensors [TAG]
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["make_zero_checkpoint", "zero_to_fp32", "ds_to_universal", "resume_and_step",
           "read_expected", "load_state", "ODD_MODEL", "STATE_KEYS", "TRAIN_SCRIPT"]

HERE = Path(__file__).resolve().parent
TRAIN_SCRIPT = HERE / "ds_train.py"
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
# Odd hidden size / GQA 9:3 / odd vocab: every ZeRO flat group and several stage-3 parameters
# need alignment padding at DP 2 and 3 (the default model has none). Same as ds_train.ODD_MODEL.
ODD_MODEL = {"hidden_size": 63, "num_attention_heads": 9, "num_key_value_heads": 3,
             "head_dim": 16, "vocab_size": 101}

TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    # a CUDA-less machine: make sure nothing tries to find one
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    """Run cmd, output to log; raise RuntimeError with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                                timeout=timeout, cwd=str(HERE.parent.parent)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({rc}); log {log}:\n{tail}")


class _Resident:
    """A resident ``ds_train.py --serve`` group of ``nproc`` ranks (see ds_train.serve): each
    run is a job file, so DeepSpeed is imported and gloo started once per world size and test
    session instead of once per run.  ``MAPC_DS_FRESH=1`` runs every job in its own torchrun."""

    def __init__(self, nproc: int):
        import tempfile

        self.nproc = nproc
        self.dir = Path(tempfile.mkdtemp(prefix=f"mapc-ds-serve{nproc}-"))
        self.count = 0
        self.fh = open(self.dir / "server.log", "ab")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               str(TRAIN_SCRIPT), "--serve", str(self.dir), str(os.getpid())]
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=_env(),
                                     cwd=str(HERE.parent.parent), start_new_session=True)

    def run(self, args: list[str], log: Path, timeout: float) -> None:
        k, self.count = self.count, self.count + 1
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        tmp = self.dir / f"job-{k}.tmp"
        tmp.write_text(json.dumps({"argv": [str(a) for a in args], "log": str(log)}))
        tmp.rename(self.dir / f"job-{k}.json")
        deadline = time.monotonic() + timeout
        while not (self.dir / f"job-{k}.ok").is_file():
            failed = sorted(self.dir.glob(f"job-{k}.err.*"))
            if failed or self.proc.poll() is not None or time.monotonic() > deadline:
                why = ("timeout" if not failed and self.proc.poll() is None
                       else f"rank error {failed[0].name}" if failed
                       else f"group exited ({self.proc.returncode})")
                self.stop()
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
                server = (self.dir / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ds_train.py {' '.join(map(str, args))} failed ({why}); "
                                   f"log {log}:\n{tail}\n-- group log:\n{server}")
            time.sleep(0.02)

    def stop(self) -> None:
        _RESIDENT.pop(self.nproc, None)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
            self.proc.wait()
        self.fh.close()


_RESIDENT: dict[int, _Resident] = {}


def _stop_resident() -> None:
    for r in list(_RESIDENT.values()):
        r.stop()


import atexit  # noqa: E402

atexit.register(_stop_resident)


def _torchrun(nproc: int, args: list[str], log: Path, timeout: float,
              script: Path = TRAIN_SCRIPT) -> None:
    """Run ``script ARGS`` under torchrun with ``nproc`` ranks: ds_train.py's runs in the
    resident group of that size (unless MAPC_DS_FRESH=1), any other script fresh."""
    if script == TRAIN_SCRIPT and os.environ.get("MAPC_DS_FRESH") != "1":
        if nproc not in _RESIDENT:
            _RESIDENT[nproc] = _Resident(nproc)
        _RESIDENT[nproc].run(args, log, timeout)
        return
    for attempt in range(3):
        port = _free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(script), *args]
        try:
            _run(cmd, log, timeout)
            return
        except RuntimeError as e:
            # the free port can be taken between _free_port() and the rendezvous: retry
            if attempt < 2 and "address already in use" in str(e).lower():
                continue
            raise


def _train_args(stage, dtype, groups, steps, model, grad_accum_fp32, clip, batch, seq,
                arch="llama"):
    a = ["--stage", str(stage), "--dtype", dtype, "--groups", str(groups), "--steps", str(steps),
         "--model", json.dumps(model or {}, sort_keys=True), "--clip", repr(float(clip)),
         "--batch", str(batch), "--seq", str(seq)]
    if arch != "llama":
        a += ["--arch", arch]
    if grad_accum_fp32:
        a.append("--grad-accum-fp32")
    return a


def read_expected(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "expected.json").read_text())


def load_state(run_dir: Path, key: str = "fp32") -> dict:
    """{HF name: np.ndarray (fp32)} of a finished run's gathered full state
    (key in STATE_KEYS)."""
    from safetensors.numpy import load_file

    return load_file(str(Path(run_dir) / f"{key}.safetensors"))


def make_zero_checkpoint(root: Path, stage: int, dtype: str, groups: int = 1, steps: int = 3, *,
                         world_size: int = 2, model: dict | None = None,
                         grad_accum_fp32: bool = False, clip: float = 1.0, batch: int = 6,
                         seq: int = 16, name: str | None = None, arch: str = "llama",
                         timeout: float = TIMEOUT_S) -> Path:
    """Train ds_train.py's tiny Llama with DeepSpeed ZeRO ``stage`` (1, 2, 3) in ``dtype``
    ("fp32" or "bf16") for ``steps`` steps at data-parallel ``world_size`` and save.

    Returns the checkpoint directory ``root / name`` (holding ``latest``, ``global_step{steps}/``,
    ``expected.json``, ``config.json`` and the gathered ``{fp32,exp_avg,exp_avg_sq}.safetensors``).
    ``model`` overrides fields of the LlamaConfig (e.g. :data:`ODD_MODEL`);
    ``grad_accum_fp32`` with bf16 at stage 1 selects DeepSpeed's ``BF16_Optimizer``;
    ``arch="convnet"`` trains ds_train.conv_net() instead (no config.json is written).
    A directory already holding a finished run with the same settings is reused.
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, not {dtype!r}")
    root = Path(root)
    if name is None:
        name = f"zero{stage}_{dtype}_g{groups}_dp{world_size}_s{steps}"
        if model:
            name += "_odd" if model == ODD_MODEL else "_m" + hashlib.sha1(
                json.dumps(model, sort_keys=True).encode()).hexdigest()[:8]
        if grad_accum_fp32:
            name += "_accfp32"
        if arch != "llama":
            name = f"{arch}_{name}"
    ckpt = root / name
    args = _train_args(stage, dtype, groups, steps, model, grad_accum_fp32, clip, batch, seq,
                       arch)
    settings = {"args": args, "world_size": world_size}
    stamp = ckpt / "run.json"
    if (ckpt / "expected.json").is_file() and stamp.is_file() \
            and json.loads(stamp.read_text()).get("settings") == settings:
        return ckpt
    if ckpt.exists():
        import shutil
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    t0 = time.monotonic()
    _torchrun(world_size, [*args, "--out", str(ckpt)], root / f"{name}.log", timeout)
    stamp.write_text(json.dumps({"settings": settings, "seconds": round(time.monotonic() - t0, 1)}))
    return ckpt


def _latest_tag(ckpt: Path, universal: bool = False) -> str:
    return (Path(ckpt) / ("latest_universal" if universal else "latest")).read_text().strip()


def zero_to_fp32(ckpt: Path, tag: str | None = None, *, timeout: float = TIMEOUT_S) -> dict:
    """DeepSpeed's own consolidation (``get_fp32_state_dict_from_zero_checkpoint(ckpt, tag)``),
    run in a subprocess: ``{name: np.ndarray}`` (fp32)."""
    from safetensors.numpy import load_file

    ckpt = Path(ckpt)
    out = ckpt / f"zero_to_fp32.{tag or _latest_tag(ckpt)}.safetensors"
    if not out.is_file():
        cmd = [sys.executable, str(Path(__file__).resolve()), "zero_to_fp32", str(ckpt), str(out)]
        if tag:
            cmd.append(tag)
        _run(cmd, out.with_suffix(".log"), timeout)
    return load_file(str(out))


def ds_to_universal(ckpt: Path, out: Path | None = None, tag: str | None = None, *,
                    timeout: float = TIMEOUT_S) -> Path:
    """``python -m deepspeed.checkpoint.ds_to_universal --input_folder ckpt/tag
    --output_folder out --inject_missing_state``; returns ``out``.

    ``out`` defaults to ``ckpt / f"{tag}_universal"``.  DeepSpeed writes ``latest_universal``
    (holding ``out.name``) into ``out.parent``, so with the default a universal resume can
    use ``ckpt`` as its load directory.  An existing complete output is reused.
    """
    ckpt = Path(ckpt)
    tag = tag or _latest_tag(ckpt)
    out = Path(out) if out is not None else ckpt / f"{tag}_universal"
    done = out / "zero" / "optimizer_state.pt"
    if not done.is_file():
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(ckpt / tag), "--output_folder", str(out),
               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
        _run(cmd, out.parent / f"{out.name}.log", timeout)
    return out


def resume_and_step(ckpt: Path, world_size: int, universal: bool, steps: int = 1, *,
                    out: Path | None = None, tag: str | None = None, like: Path | None = None,
                    stage: int | None = None, timeout: float = TIMEOUT_S) -> dict:
    """Load ``ckpt`` (a dir with ``latest``; or with ``latest_universal`` when ``universal``)
    at data-parallel ``world_size`` (1, 2 or 3 with the default batch of 6), train ``steps``
    more steps on the continuing data stream and save to ``out``.

    Training settings (stage, dtype, groups, model, clip, batch) come from
    ``(like or ckpt)/expected.json``; ``stage`` may override the ZeRO stage (a universal
    checkpoint loads at any stage).  Returns::

        {"loss": [loss of each new step], "start_step": int, "dir": out,
         "weights": out/"fp32.safetensors", "exp_avg": ..., "exp_avg_sq": ...}

    (the three files: full fp32 master weights / Adam moments after the new steps, gathered
    by DeepSpeed).  Use :func:`load_state` to read them.

    Caveats (DeepSpeed 0.19.8, see docs/formats/deepspeed.md §9-§10): a native load
    (``universal=False``) at another DP size than the checkpoint's is refused by DeepSpeed;
    results at different world sizes agree to rounding only (all-reduce order), so compare
    runs at the same ``world_size``; a stage-3 universal load gives every param group the
    hyper-parameters of group 0 (use ``groups=1`` there); a stage 1/2 universal folder does
    not load at stage 3.
    """
    ckpt = Path(ckpt)
    meta = read_expected(Path(like) if like is not None else ckpt)
    st = meta["stage"] if stage is None else stage
    if out is None:
        out = ckpt.parent / (f"{ckpt.name}.resume_{'univ' if universal else 'native'}"
                             f"_z{st}_dp{world_size}_{tag or 'latest'}_n{steps}")
    out = Path(out)
    if not (out / "expected.json").is_file():
        if out.exists():
            import shutil
            shutil.rmtree(out)
        out.mkdir(parents=True)
        args = _train_args(st, meta["dtype"], meta["groups"], steps, meta.get("model"),
                           meta.get("grad_accum_fp32", False), meta.get("gradient_clipping", 1.0),
                           meta["train_batch_size"], meta["seq_len"], meta.get("arch", "llama"))
        args += ["--load", str(ckpt), "--out", str(out)]
        if tag:
            args += ["--tag", tag]
        if universal:
            args.append("--universal")
        _torchrun(world_size, args, out.parent / f"{out.name}.log", timeout)
    res = read_expected(out)
    return {"loss": res["loss"], "start_step": res["start_step"], "dir": out,
            **{("weights" if k == "fp32" else k): out / f"{k}.safetensors" for k in STATE_KEYS}}


def dcp_load_with_adam(dcp_dir: Path, like: dict) -> dict:
    """torch's own ``dcp.load`` of a DCP checkpoint holding weights and AdamW state as
    ``get_state_dict`` lays them out: ``{name: tensor, "optim": {"state": {name: {exp_avg,
    exp_avg_sq, step}}}}`` for the names and shapes of ``like`` (``{name: array}``)."""
    import torch
    import torch.distributed.checkpoint as dcp

    state = {n: torch.zeros(tuple(a.shape)) for n, a in like.items()}
    state["optim"] = {"state": {n: {"exp_avg": torch.zeros(tuple(a.shape)),
                                    "exp_avg_sq": torch.zeros(tuple(a.shape)),
                                    "step": torch.tensor(0.0)} for n, a in like.items()}}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(dcp_dir)), no_dist=True)
    return state


def _main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "zero_to_fp32":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from safetensors.torch import save_file

        sd = get_fp32_state_dict_from_zero_checkpoint(argv[1], tag=argv[3] if len(argv) > 3 else None)
        save_file({k: v.float().contiguous().clone() for k, v in sd.items()}, argv[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
