"""Fuzzing the readers of untrusted binary inputs: thousands of mutations (bit flips,
truncations, splices, length-field edits) of small ``.pt`` (zip and legacy), GGUF and DCP
checkpoints, read in-process. The only exception allowed out is a one-line MapcError, and each
case must finish within a deadline and a memory bound (tracemalloc peak).

Deterministic: batch ``b`` of kind ``k`` uses ``random.Random(f"{k}-{b}")``; a failure names the
case (kind, batch, index, mutation), so it reproduces with ``_mutated`` alone.
(Safetensors headers are fuzzed in the safetensors tests.)
"""
from __future__ import annotations

import collections
import io
import random
import shutil
import signal
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mapc
from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers.dcp import DCPSource
from mapc.runtime.containers.gguf import GGUFSource
from tests.conftest import llama_config, write_random_hf

BATCHES = {"zip_pickle": 8, "zip_raw": 4, "legacy": 4, "gguf": 2, "dcp_metadata": 4,
           "dcp_data": 2}
PER_BATCH = 100
DEADLINE_S = 3.0        # one case, on a loaded 2-core machine
PEAK_BYTES = 64 << 20   # one case's traced allocations

_BOUNDARY = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
             1 << 32, 1 << 62, (1 << 63) - 1, (1 << 64) - 1]


# ------------------------------------------------------------------------------ seeds
@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    value = {
        "model": collections.OrderedDict(
            w=np.arange(16, dtype=np.float32).reshape(4, 4),
            b=np.arange(3, dtype=np.float16)),
        "args": torchfile.Namespace(lr=0.1, name="x", dims=[1, 2], dtype=torchfile.TorchDType("bfloat16")),
        "iteration": 7, "rng": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.0),
        "scalar": np.float64(2.5), "device": torchfile.TorchDevice("cpu"), "raw": b"ab",
        "nested": [{"a": (1, 2.5, None, True)}, {"s": {1, 2}}],
    }
    zip_pt = root / "seed.pt"
    with torchfile.TorchWriter(zip_pt) as w:
        tree = dict(value, model=collections.OrderedDict(
            (k, w.add_tensor(v)) for k, v in value["model"].items()))
        w.finish(tree)
    out = {"zip": zip_pt}
    torch = pytest.importorskip("torch")
    legacy = root / "legacy.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "v": torch.arange(4)[1:3],
                "meta": {"it": 3, "names": ["a", "b"]}}, legacy,
               _use_new_zipfile_serialization=False)
    out["legacy"] = legacy
    cfg = llama_config(hidden=16, layers=1, heads=2, groups=1, ffn=16, vocab=16)
    hf = write_random_hf(root / "hf", cfg)
    mapc.convert(hf, root / "gguf", to="gguf")
    mapc.convert(hf, root / "dcp", to="dcp")
    out["gguf"] = root / "gguf" / "model.gguf"
    out["dcp"] = root / "dcp"
    return out


# ------------------------------------------------------------------------------ mutations
def _mutate(rng: random.Random, data: bytes, hot: int | None = None) -> tuple[bytes, str]:
    """One random mutation of ``data``; positions favour the first ``hot`` bytes (for DCP data:
    the first tensor's archive, which the reader reads with the last one)."""
    b = bytearray(data)

    def pos() -> int:
        span = hot if hot and rng.random() < 0.8 else len(b)
        return rng.randrange(max(1, min(span, len(b))))

    kind = rng.choice(["flip", "flip", "truncate", "splice", "length", "length"])
    if kind == "flip":
        spots = [(pos(), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
        for p, bit in spots:
            b[p] ^= 1 << bit
        return bytes(b), f"flip {spots}"
    if kind == "truncate":
        n = rng.randrange(len(b))
        return bytes(b[:n]), f"truncate {n}"
    if kind == "splice":
        a, n, c = pos(), rng.randint(1, 64), pos()
        chunk = b[a:a + n]
        if rng.random() < 0.5:
            b[c:c] = chunk
            return bytes(b), f"insert {a}+{n} at {c}"
        b[c:c + len(chunk)] = chunk
        return bytes(b), f"overwrite {a}+{n} at {c}"
    width = rng.choice([1, 2, 4, 8])
    v = rng.choice(_BOUNDARY + [len(b), len(b) - 1, rng.getrandbits(8 * width)])
    v &= (1 << 8 * width) - 1
    p = pos()
    b[p:p + width] = v.to_bytes(width, "little")
    return bytes(b), f"length {v:#x} ({width} bytes) at {p}"


def _zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _rezip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _gguf_data_start(path: Path) -> int:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    return min(int(t.data_offset) for t in reader.tensors)


# ------------------------------------------------------------------------------ readers
def _touch(obj) -> None:
    """Walk what a reader returned as mapc's code would: read every tensor, print values."""
    todo, seen = [obj], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torchfile.TensorRef):
            x.read()
        elif isinstance(x, (dict, torchfile.Record)):
            todo.extend(x.values())
            todo.extend(getattr(x, "__dict__", {}).values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo.extend(x)
    repr(obj)
    str(obj)


def _read_pt(path: Path) -> None:
    _touch(torchfile.load(path))


def _read_gguf(path: Path) -> None:
    src = GGUFSource(path)
    for name in src.names():
        np.asarray(src.read(name)).sum()
        src.shape(name), src.dtype(name)
    repr(src.format_meta)


def _read_dcp(path: Path, every_tensor: bool = True) -> None:
    src = DCPSource(path)
    names = src.names(())
    for name in names if every_tensor else names[:1] + names[-1:]:
        np.asarray(src.read(name)).sum()
    src.training_state()


# ------------------------------------------------------------------------------ the test
class _Deadline(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Deadline()


def _cases(kind: str, batch: int, seeds: dict, work: Path):
    """(description, file to write, its bytes, reader, what to read) for one batch."""
    rng = random.Random(f"{kind}-{batch}")
    if kind in ("zip_pickle", "zip_raw"):
        members = _zip_members(seeds["zip"])
        pkl = next(n for n in members if n.endswith("data.pkl"))
        raw = seeds["zip"].read_bytes()
        for i in range(PER_BATCH):
            if kind == "zip_pickle":
                data, how = _mutate(rng, members[pkl])
                yield f"data.pkl {how}", work / "x.pt", _rezip({**members, pkl: data}), _read_pt
            else:
                data, how = _mutate(rng, raw)
                yield how, work / "x.pt", data, _read_pt
    elif kind == "legacy":
        raw = seeds["legacy"].read_bytes()
        hot = raw.index(b"\x80\x02]")        # the storage-key list: pickles end there
        for i in range(PER_BATCH):
            data, how = _mutate(rng, raw, hot + 64)
            yield how, work / "x.pt", data, _read_pt
    elif kind == "gguf":
        raw = seeds["gguf"].read_bytes()
        hot = _gguf_data_start(seeds["gguf"])
        for i in range(PER_BATCH):
            data, how = _mutate(rng, raw, hot)
            yield how, work / "model.gguf", data, _read_gguf
    else:
        d = work / "dcp"
        if not d.exists():
            shutil.copytree(seeds["dcp"], d)
        name = ".metadata" if kind == "dcp_metadata" else \
            next(p.name for p in d.iterdir() if p.suffix == ".distcp")
        raw = (seeds["dcp"] / name).read_bytes()
        for i in range(PER_BATCH):
            data, how = _mutate(rng, raw, 512)
            yield f"{name} {how}", d / name, data, \
                lambda _p, d=d: _read_dcp(d, every_tensor=False)


@pytest.mark.parametrize("kind,batch", [(k, b) for k, n in BATCHES.items() for b in range(n)])
def test_fuzzed_input_gives_only_mapc_errors(seeds, tmp_path, kind, batch):
    old = signal.signal(signal.SIGALRM, _on_alarm)
    tracemalloc.start()
    failures = []
    try:
        for i, (how, path, data, read) in enumerate(_cases(kind, batch, seeds, tmp_path)):
            case = f"{kind} batch {batch} case {i}: {how}"
            path.write_bytes(data)
            tracemalloc.reset_peak()
            signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
            try:
                with np.errstate(all="ignore"):      # sums of mutated float bytes
                    read(path)
            except MapcError as e:
                if "\n" in str(e):
                    failures.append(f"{case}: a multi-line message {str(e)!r}")
            except _Deadline:
                failures.append(f"{case}: no answer within {DEADLINE_S} s")
            except Exception as e:     # noqa: BLE001 - this is what the test looks for
                failures.append(f"{case}: {type(e).__name__}: {e}"[:300])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            peak = tracemalloc.get_traced_memory()[1]
            if peak > PEAK_BYTES:
                failures.append(f"{case}: allocated {peak >> 20} MiB")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        tracemalloc.stop()
    assert not failures, f"{len(failures)} of {PER_BATCH} cases failed:\n" + "\n".join(failures[:20])
