"""Fuzzing the safetensors reader and the HF shard index, in-process: thousands of mutated
small files (deterministic seeds). Only MapcError may come out, each case within bounded time
and the whole batch within bounded memory; and whatever mapc accepts, the safetensors library
(the reference reader) accepts too, with the same tensors."""
from __future__ import annotations

import json
import random
import resource
import struct
import time
import tracemalloc

import numpy as np
import pytest

from mapc.errors import MapcError
from mapc.runtime.safetensors_io import SafetensorsFile

SEEDS = range(12)
PER_SEED = 300            # 3600 safetensors mutations in all
INDEX_PER_SEED = 50       # 600 index.json mutations
MAX_SECONDS = 2.0         # per case
MAX_PEAK = 64 << 20       # bytes allocated at once by a whole batch


def base_file() -> bytes:
    """Three small tensors of different dtypes, written by the safetensors library."""
    from safetensors.numpy import save
    rng = np.random.default_rng(0)
    return save({"w": rng.standard_normal((4, 3)).astype(np.float32),
                 "b": np.arange(5, dtype=np.int64),
                 "h": rng.standard_normal((2, 2)).astype(np.float16)},
                metadata={"format": "np"})


def split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes, pad=True) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


JUNK = [None, True, -1, 0, 2**63, 2**70, 1e308, -0.5, float("nan"), "", "F32", [], [1], [-1, 8],
        [0, 2**64], {}, {"dtype": "F32"}, "\udcff", [[1]], 3.0]


def junk(rng):
    return rng.choice(JUNK)


def mutate_json(rng, header):
    """Change one thing in the parsed header: a value, a key, an entry."""
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    kind = rng.randrange(9)
    name = rng.choice(names)
    if kind == 0:
        h[name][rng.choice(["dtype", "shape", "data_offsets"])] = junk(rng)
    elif kind == 1:
        del h[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 2:
        h[name] = junk(rng)
    elif kind == 3:
        h["__metadata__"] = junk(rng)
    elif kind == 4:
        other = rng.choice(names)
        h[name]["data_offsets"] = list(h[other]["data_offsets"])   # share another's bytes
    elif kind == 5:
        b, e = h[name]["data_offsets"]
        d = rng.choice([-8, -4, -1, 1, 4, 8, 1000])
        h[name]["data_offsets"] = [b + d, e + d] if rng.random() < 0.5 else [b, e + d]
    elif kind == 6:
        shape = h[name]["shape"]
        if shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2**31, 2**62, -3, 2.5, "4"])
        else:
            h[name]["shape"] = [2**40]
    elif kind == 7:
        h[name]["dtype"] = rng.choice(["F64", "I8", "BOOL", "BF16", "U64", "F8_E4M3", "f32"])
    else:
        h = rng.choice([[h], "x", 7, None, [list(h.items())]])
    return h


def mutate_bytes(rng, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:                                   # flip bytes anywhere
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:                                 # truncate
        del b[rng.randrange(len(b)):]
    elif kind == 2:                                 # a lying header length
        b[:8] = struct.pack("<Q", rng.choice([0, 1, len(b), 2**40, 2**64 - 1,
                                              struct.unpack("<Q", data[:8])[0] + rng.randint(-9, 9)]))
    elif kind == 3:                                 # insert or delete inside the header
        n = struct.unpack("<Q", data[:8])[0]
        at = rng.randrange(8, 8 + n)
        if rng.random() < 0.5:
            del b[at:at + rng.randint(1, 4)]
        else:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    elif kind == 4:                                 # trailing or missing body bytes
        b += b"\0" * rng.randint(1, 64)
    else:                                           # deep nesting / huge numbers in JSON
        header, body = split(data)
        raw = rng.choice([b"[" * 100000 + b"]" * 100000, b'{"w": ' + b"9" * 5000 + b"}",
                          b'{"w": {"dtype": "F32", "shape": [' + b"1," * 20000 + b'1], '
                          b'"data_offsets": [0, 4]}}'])
        return join(raw, body)
    return bytes(b)


def case(rng, base):
    header, body = split(base)
    if rng.random() < 0.5:
        return join(mutate_json(rng, header), body)
    return mutate_bytes(rng, base)


def check_against_library(data: bytes, sf: SafetensorsFile):
    from safetensors import deserialize
    from mapc.runtime.safetensors_io import ST_TO_NAME
    ref = dict(deserialize(data))     # the reference must accept what mapc accepted
    assert sorted(ref) == sorted(sf.keys())
    for k, r in ref.items():
        got = np.asarray(sf.read(k))
        assert sf.dtype(k) == ST_TO_NAME[r["dtype"]] and list(got.shape) == r["shape"], k
        assert got.tobytes() == bytes(r["data"]), k


def run_bounded(fn, label):
    t = time.monotonic()
    try:
        fn()
    except MapcError:
        pass
    except Exception as e:     # noqa: BLE001 - the point: nothing but MapcError
        pytest.fail(f"{label}: {type(e).__name__}: {e}")
    assert time.monotonic() - t < MAX_SECONDS, label


class memory_bound:
    """The batch's memory: every allocation traced (tracemalloc, 10x slower, so for one seed),
    else the growth of the process's peak resident set."""

    def __init__(self, traced: bool):
        self.traced = traced

    def __enter__(self):
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.traced:
            tracemalloc.start()
        return self

    def __exit__(self, *exc):
        peak = 0
        if self.traced:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        if exc[0] is None:
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss
            assert peak < MAX_PEAK and grown < MAX_PEAK, (peak, grown)


@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_safetensors_give_only_mapc_errors(tmp_path, seed):
    base = base_file()
    rng = random.Random(seed)
    f = tmp_path / "x.safetensors"
    with memory_bound(traced=seed == 0):
        for i in range(PER_SEED):
            data = case(rng, base)
            f.write_bytes(data)

            def read():
                sf = SafetensorsFile(f)
                check_against_library(data, sf)
            run_bounded(read, f"seed {seed} case {i}")


def mutate_index(rng, index: dict):
    idx = json.loads(json.dumps(index))
    kind = rng.randrange(7)
    names = list(idx["weight_map"])
    if kind == 0:
        idx["weight_map"][rng.choice(names)] = rng.choice(
            ["/etc/passwd", "../x.safetensors", "a/../../x.safetensors", "", ".", "missing.safetensors",
             "model.safetensors/", "\\model.safetensors", 5, None, ["model.safetensors"]])
    elif kind == 1:
        idx["weight_map"] = junk(rng)
    elif kind == 2:
        del idx["weight_map"]
    elif kind == 3:
        idx = junk(rng)
    elif kind == 4:
        return rng.choice([b"{", b"\xff\xfe", b"[" * 100000, b"", b"null"])
    elif kind == 5:
        idx["weight_map"]["extra.tensor"] = "model.safetensors"
    else:
        del idx["weight_map"][rng.choice(names)]
    return json.dumps(idx).encode()


@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_shard_index_gives_only_mapc_errors(tmp_path, seed):
    from mapc.runtime.containers.hf import HFSource
    base = base_file()
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(base)
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in split(base)[0]
                                            if k != "__metadata__"}}
    outside = tmp_path / "x.safetensors"         # what an escaping index would reach
    outside.write_bytes(base)
    rng = random.Random(1000 + seed)
    with memory_bound(traced=False):
        for i in range(INDEX_PER_SEED):
            (d / "model.safetensors.index.json").write_bytes(mutate_index(rng, index))

            def read():
                src = HFSource(d)
                for n in src.names():
                    assert src.where[n].path == str(d / "model.safetensors"), n
                    np.asarray(src.read(n)).sum()
            run_bounded(read, f"seed {seed} case {i}")
