"""Compare two DeepSpeed universal checkpoint folders with torch, file by file.

Run as a subprocess (it imports deepspeed's classes through ``torch.load(weights_only=False)``)::

    python tests/groundtruth/ds_universal_compare.py A_universal_dir B_universal_dir [A2 B2 ...]

Prints one JSON line, a list with one ``{"compared": n, "only_a": [...], "only_b": [...],
"diffs": [...]}`` per pair (one process for all pairs: importing torch and DeepSpeed is the
slow part). Every
``.pt`` file is loaded with ``torch.load`` and compared recursively: container types and key
order, tensors by dtype, shape, ``requires_grad`` and exact values (``torch.equal``), objects
(e.g. DeepSpeed's ``LossScaler``) by type and attributes, enums by type and value.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def _same(x, y, where: str, diffs: list) -> None:
    import torch

    if torch.is_tensor(x) or torch.is_tensor(y):
        if not (torch.is_tensor(x) and torch.is_tensor(y)):
            diffs.append(f"{where}: {type(x).__name__} vs {type(y).__name__}")
        elif (x.dtype, tuple(x.shape), x.requires_grad) != (y.dtype, tuple(y.shape),
                                                             y.requires_grad):
            diffs.append(f"{where}: {x.dtype}{list(x.shape)} grad={x.requires_grad} vs "
                         f"{y.dtype}{list(y.shape)} grad={y.requires_grad}")
        elif not torch.equal(x, y):
            diffs.append(f"{where}: values differ")
        return
    if type(x) is not type(y):
        diffs.append(f"{where}: {type(x).__name__} vs {type(y).__name__}")
        return
    if isinstance(x, dict):
        if list(x) != list(y):
            diffs.append(f"{where}: keys {list(x)} vs {list(y)}")
            return
        for k in x:
            _same(x[k], y[k], f"{where}[{k!r}]", diffs)
    elif isinstance(x, (list, tuple)):
        if len(x) != len(y):
            diffs.append(f"{where}: length {len(x)} vs {len(y)}")
            return
        for i, (u, v) in enumerate(zip(x, y)):
            _same(u, v, f"{where}[{i}]", diffs)
    elif isinstance(x, (bool, int, float, str, bytes, type(None))):
        if x != y:
            diffs.append(f"{where}: {x!r} vs {y!r}")
    elif hasattr(x, "__dict__"):
        _same(vars(x), vars(y), f"{where}.__dict__", diffs)
    elif x != y:
        diffs.append(f"{where}: {x!r} vs {y!r}")


def compare(a: Path, b: Path) -> dict:
    import torch

    fa, fb = _files(a), _files(b)
    diffs: list[str] = []
    compared = 0
    for f in sorted(fa & fb):
        if f.endswith(".pt"):
            x = torch.load(a / f, map_location="cpu", weights_only=False)
            y = torch.load(b / f, map_location="cpu", weights_only=False)
            _same(x, y, f, diffs)
            compared += 1
    return {"compared": compared, "only_a": sorted(fa - fb), "only_b": sorted(fb - fa),
            "diffs": diffs}


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = sys.argv[1:]
    print(json.dumps([compare(Path(a), Path(b)) for a, b in zip(args[::2], args[1::2])]))
