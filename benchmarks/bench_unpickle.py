"""mapc's restricted unpickler (runtime/unpickler.py) against Python's C and pure-Python
unpicklers, on pickles shaped like real checkpoints' ``data.pkl``.

    .venv/bin/python benchmarks/bench_unpickle.py [--tensors 4000] [--repeat 3] [--json OUT]

Cases: a state dict of ``--tensors`` tensors as mapc's TorchWriter pickles it (what a
Megatron / DeepSpeed shard holds), and a DeepSpeed-style optimizer state (param groups with
index lists, per-parameter dicts). Prints best-of-``repeat`` wall time per unpickler, opcodes per
second, and the ratio to the C unpickler. (The C and pure-Python runs use a permissive
``find_class`` that resolves through mapc's allow-list, so all three build the same objects.)
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import pickletools
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mapc.runtime import torchfile, unpickler  # noqa: E402


def _state_dict_pickle(n: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.pt"
        with torchfile.TorchWriter(path) as w:
            w.finish({"model": collections.OrderedDict(
                (f"decoder.layers.{i // 12}.mlp.linear_fc{i % 12}.weight",
                 w.add_tensor(np.zeros((1, 1), np.float32))) for i in range(n)),
                "iteration": 100, "args": torchfile.Namespace(lr=1e-4, tp=8)})
        with zipfile.ZipFile(path) as z:
            return z.read("archive/data.pkl")


def _optimizer_pickle(n: int) -> bytes:
    state = {"state": {i: {"step": 10, "exp_avg_norm": float(i), "shape": (i, 4096)}
                       for i in range(n)},
             "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": list(range(n))}]}
    return pickle.dumps(state, protocol=2)


def _storage(pid):
    key, stype, numel = torchfile._parse_storage_pid(pid)
    return torchfile.StorageRef(key, stype.dtype, numel, None, 0)


class _Resolving(pickle.Unpickler):
    def find_class(self, module, name):
        return torchfile.CORE_GLOBALS[f"{module}.{name}"]

    def persistent_load(self, pid):
        return _storage(pid)


class _PyResolving(pickle._Unpickler):
    find_class = _Resolving.find_class
    persistent_load = _Resolving.persistent_load


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = {}
    for case, data in (("state_dict", _state_dict_pickle(args.tensors)),
                       ("optimizer", _optimizer_pickle(args.tensors))):
        ops = sum(1 for _ in pickletools.genops(data))
        row = {"bytes": len(data), "opcodes": ops}
        row["c"] = _best(lambda: _Resolving(io.BytesIO(data)).load(), args.repeat)
        row["pure_python"] = _best(lambda: _PyResolving(io.BytesIO(data)).load(), args.repeat)
        row["mapc"] = _best(lambda: unpickler.unpickle(
            data, torchfile.CORE_GLOBALS, persistent_load=_storage), args.repeat)
        results[case] = row
        print(f"{case}: {len(data)} bytes, {ops} opcodes")
        for k in ("c", "pure_python", "mapc"):
            print(f"  {k:12s} {row[k]:8.3f} s  {ops / row[k] / 1e6:6.2f} M opcodes/s  "
                  f"x{row[k] / row['c']:.1f} of C")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
