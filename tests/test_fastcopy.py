"""At the floor of the disk: tensors that are ranges of source files are copied by the
kernel (with fallbacks when it refuses), the rest is built in reused buffers, and the bytes
are those of the plain path."""
from __future__ import annotations

import errno
import os

import ml_dtypes
import numpy as np
import pytest

from mapc.errors import MapcError
from mapc.runtime import fastcopy as F
from mapc.runtime.safetensors_io import SafetensorsFile
from tests.conftest import llama_config, tree_hash, write_random_hf


@pytest.fixture
def mapped(tmp_path):
    """A 64x48 bf16 tensor stored at byte 100 of a file, and its memmap."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((64, 48)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "src.bin"
    path.write_bytes(b"h" * 100 + data.tobytes() + b"t" * 7)
    m = np.memmap(path, np.uint8, mode="r", offset=100, shape=(data.nbytes,))
    return str(path), data, m.view(ml_dtypes.bfloat16).reshape(data.shape)


def _read(path, ranges):
    raw = open(path, "rb").read()
    return b"".join(raw[o:o + n] for _, o, n in ranges)


@pytest.mark.parametrize("view, expect", [
    (lambda a: a, [(100, 64 * 96)]),                        # whole tensor
    (lambda a: a[8:24], [(100 + 8 * 96, 16 * 96)]),           # a block of rows
    (lambda a: a[:, 24:], [(100 + r * 96 + 48, 48) for r in range(64)]),   # column split
    (lambda a: a.reshape(4, 16, 48)[:, 2:4], [(100 + g * 16 * 96 + 2 * 96, 2 * 96)
                                              for g in range(4)]),        # per-group rows
])
def test_array_ranges_are_where_the_bytes_are(mapped, view, expect):
    path, data, arr = mapped
    x = view(arr)
    ranges = F.array_ranges(x)
    assert [(o, n) for _, o, n in ranges] == expect
    assert _read(path, ranges) == np.ascontiguousarray(view(data)).tobytes()


@pytest.mark.parametrize("make", [
    lambda a: np.array(a),                                   # a copy in memory
    lambda a: a[::-1],                                       # negative stride
    lambda a: np.zeros((3, 3)),
])
def test_no_ranges_for_memory(mapped, make):
    assert F.array_ranges(make(mapped[2])) is None


def test_copy_on_write_mapping_has_no_ranges(mapped):
    path = mapped[0]
    m = np.memmap(path, np.uint8, mode="c", offset=100, shape=(96,))
    assert F.file_range(m) is None and F.array_ranges(m) is None


def test_concat_ranges_interleave_pieces(mapped):
    path, data, arr = mapped
    a, b = arr[:, :16], arr[:, 16:40]
    c = F.Concat([a, b], 1).reshape((64 * 40,))
    got = _read(path, F.byte_ranges(c))
    want = np.concatenate([data[:, :16], data[:, 16:40]], 1).tobytes()
    assert got == want and c.shape == (64 * 40,)


@pytest.mark.parametrize("refuse", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copy_range_and_its_fallbacks(tmp_path, mapped, monkeypatch, refuse):
    path, data, _ = mapped
    for name in refuse:
        def no(*a, **k):
            raise OSError(errno.EXDEV, "refused")
        monkeypatch.setattr(F.os, name, no)
    monkeypatch.setattr(F, "FALLBACK_CHUNK", 1000)           # several pread rounds
    monkeypatch.setattr(F._Fallback, "buf", None)
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 10, 0)
        F.copy_range(path, 100 + 96, fd, 10, data.nbytes - 96, str(out))
    finally:
        os.close(fd)
    assert out.read_bytes() == b"x" * 10 + data.tobytes()[96:]


def test_copy_past_the_end_is_an_error(tmp_path, mapped):
    path, data, _ = mapped
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(MapcError, match="truncated"):
            F.copy_range(path, 100, fd, 0, data.nbytes + 1000, "out.bin")
    finally:
        os.close(fd)


def test_scratch_is_reused(mapped):
    s = F.Scratch()
    arr = mapped[2]
    a = s.materialize(arr[:, :20])
    first = s.buf
    np.testing.assert_array_equal(a.view(np.uint16), np.array(arr[:, :20]).view(np.uint16))
    b = s.materialize(arr[:, 20:40])
    assert s.buf is first and np.shares_memory(b, first)
    assert s.materialize(arr) is arr                   # contiguous: passed through
    c = s.materialize(arr[:, :20], np.float32)          # a cast lands in the buffer too
    np.testing.assert_array_equal(c, np.array(arr[:, :20]).astype(np.float32))


def test_file_bytes_reads_back_as_an_array(mapped):
    path, data, arr = mapped
    fb = F.FileBytes((64, 8), data.dtype, F.byte_ranges(arr[:, 8:16]))
    np.testing.assert_array_equal(np.asarray(fb).view(np.uint16),
                                  np.array(data[:, 8:16]).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(fb, np.float32), data[:, 8:16].astype(np.float32))


def test_safetensors_reader_views_are_file_ranges(tmp_path):
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=100))
    f = SafetensorsFile(src / "model.safetensors")
    name = "model.embed_tokens.weight"
    path, off = F.file_range(f.read(name))
    raw = open(path, "rb").read()
    assert raw[off:off + f.read(name).nbytes] == np.array(f.read(name)).tobytes()


# ---- end to end: the kernel paths give the bytes of the plain path ---------------------------
CASES = {
    "hf->megatron tp2 pp2": ("hf", "megatron", ["--tp", "2", "--pp", "2"]),
    "hf->hf bf16": ("hf", "hf", []),
    "megatron->hf": ("megatron", "hf", []),
    "hf->gguf": ("hf", "gguf", []),
    "hf->nxdt tp2": ("hf", "nxdt", ["--tp", "2"]),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from mapc.cli.main import main
    root = tmp_path_factory.mktemp("fastcopy")
    hf = write_random_hf(root / "hf", llama_config(hidden=128, ffn=256, vocab=512),
                         dtype=ml_dtypes.bfloat16)
    assert main(["convert", str(hf), str(root / "megatron"), "--to", "megatron", "--tp", "2",
                 "-q"]) == 0
    return {"hf": hf, "megatron": root / "megatron"}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_paths_match_the_plain_path(tmp_path, sources, monkeypatch, case):
    from mapc.cli.main import main
    frm, to, extra = CASES[case]
    monkeypatch.setattr(F, "MIN_KERNEL_COPY", 1)     # tiny tensors take the kernel paths too
    copied = []
    real = F.copy_range
    monkeypatch.setattr(F, "copy_range", lambda *a: (copied.append(a[-2]), real(*a)))
    argv = ["convert", str(sources[frm]), None, "--to", to, *extra, "-q"]
    assert main(argv[:2] + [str(tmp_path / "fast")] + argv[3:]) == 0
    if to in ("megatron", "hf"):
        assert sum(copied) > 0
    monkeypatch.setattr(F, "copy_range", real)
    monkeypatch.setattr(F, "file_range", lambda arr: None)
    from mapc.runtime.plan_write import PlannedWriter as Writer
    for cls in Writer.__subclasses__():              # the plain path: fresh arrays, write()
        monkeypatch.setattr(cls, "keeps_arrays", True)
    assert main(argv[:2] + [str(tmp_path / "plain")] + argv[3:]) == 0
    assert tree_hash(tmp_path / "fast") == tree_hash(tmp_path / "plain")


def test_arena_reuses_buffers_unit_after_unit():
    a = F.Arena()
    x, y = a.take((1000,), np.float32), a.take((10,), np.float32)
    a.reset()
    small, big = a.take((10,), np.float32), a.take((900,), np.float32)   # best fit
    assert np.shares_memory(small, y) and np.shares_memory(big, x)
    a.reset()
    z = a.take((5000,), np.float32)          # too big for all: replaces the largest free one
    assert len(a.free) + len(a.used) == 2 and not np.shares_memory(z, x)


# ---- writes behind the building of the next shards ----------------------------------------
def test_write_behind_keeps_the_order_of_writes(tmp_path, sources, monkeypatch):
    from mapc.cli.main import main
    from mapc.runtime.containers.megatron import MegatronWriter
    real = MegatronWriter.write
    orders = []

    def record(self, coord, name, arr):
        orders[-1].append((coord, name))
        return real(self, coord, name, arr)
    monkeypatch.setattr(MegatronWriter, "write", record)
    for keeps in (False, True):          # pipelined, then inline
        monkeypatch.setattr(MegatronWriter, "keeps_arrays", keeps)
        orders.append([])
        assert main(["convert", str(sources["hf"]), str(tmp_path / f"o{keeps}"), "--to",
                     "megatron", "--tp", "2", "--pp", "2", "-q"]) == 0
    assert orders[0] == orders[1] and len(orders[0]) > 20
    assert tree_hash(tmp_path / "oFalse") == tree_hash(tmp_path / "oTrue")


def test_a_failing_write_behind_fails_the_conversion_cleanly(tmp_path, sources, monkeypatch,
                                                             capsys):
    from mapc.cli.main import main
    from mapc.runtime.containers.megatron import MegatronWriter
    real, calls = MegatronWriter.write, []

    def fail_third(self, coord, name, arr):
        calls.append(name)
        if len(calls) == 3:
            raise MapcError("cannot write: No space left on device", where=name)
        return real(self, coord, name, arr)
    monkeypatch.setattr(MegatronWriter, "write", fail_third)
    assert main(["convert", str(sources["hf"]), str(tmp_path / "out"), "--to", "megatron",
                 "--tp", "2", "-q"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []             # no DST, no temporary directory


# ---- MoE: a layer's stacked experts are never materialized whole ------------------------------
MOE_TARGETS = {"megatron tp2 ep2": ("megatron", ["--tp", "2", "--ep", "2"]),
               "gguf (stacked)": ("gguf", []),
               "nxdt tp2": ("nxdt", ["--tp", "2"])}


@pytest.fixture(scope="module")
def mixtral_hf(tmp_path_factory):
    from tests.conftest import build_transformers_model
    from tests.test_moe import mixtral_config
    path = tmp_path_factory.mktemp("moe") / "hf"
    cfg = mixtral_config(experts=8)
    cfg.update(hidden_size=64, intermediate_size=128)
    build_transformers_model(cfg, path)
    return path


@pytest.mark.parametrize("target", list(MOE_TARGETS))
def test_moe_experts_stay_lazy(tmp_path, mixtral_hf, monkeypatch, target):
    from mapc.cli.main import main
    from mapc.runtime.plan_write import PlannedWriter as Writer
    to, extra = MOE_TARGETS[target]
    stack_bytes = 8 * 128 * 64 * 4                     # one layer's gate, all experts, fp32
    taken = []
    real_take = F.Arena.take
    monkeypatch.setattr(F.Arena, "take",
                        lambda self, shape, dtype: (taken.append(np.dtype(dtype).itemsize *
                                                                 int(np.prod(shape))),
                                                    real_take(self, shape, dtype))[1])
    monkeypatch.setattr(F, "MIN_KERNEL_COPY", 1)
    argv = ["convert", str(mixtral_hf), None, "--to", to, *extra, "-q"]
    assert main(argv[:2] + [str(tmp_path / "lazy")] + argv[3:]) == 0
    assert max(taken, default=0) < stack_bytes       # the gather never built a whole stack
    for cls in Writer.__subclasses__():
        monkeypatch.setattr(cls, "keeps_arrays", True)
    monkeypatch.setattr(F, "file_range", lambda arr: None)
    assert main(argv[:2] + [str(tmp_path / "plain")] + argv[3:]) == 0
    assert tree_hash(tmp_path / "lazy") == tree_hash(tmp_path / "plain")


# ---- lazy stacks of experts -------------------------------------------------------------------
def test_selecting_one_expert_of_a_stack_keeps_whole_pieces(mapped):
    """Selecting expert ranks and then one local expert (as a megatron local_experts rule
    does: split over ep, each as k) must leave the pieces whole. Indexing the object array
    of pieces with an integer returned the piece itself, which the stack then took for an
    array of pieces: one Python object per number (a tiny 256-expert layer took 370 s)."""
    path, data, m = mapped
    experts = [m[8 * e:8 * (e + 1)] for e in range(8)]      # 8 experts of [8, 48]
    stack = F.Stack.of(experts, 0)
    grid = stack.reshape((2, 4, 1, 8, 48))                 # (ep, local, tp, rows, hidden)
    ranks = grid.take(0, 1)                                # ep rank 1: 4 whole experts
    assert isinstance(ranks, F.Stack) and ranks.lead.shape == (4,)
    assert ranks.piece_shape == (1, 8, 48)
    one = ranks.take(0, 2)                                 # its local expert 2: the piece
    assert not isinstance(one, F.Stack) and one.shape == (1, 8, 48)
    assert np.array_equal(np.asarray(one), data[8 * 6:8 * 7][None])
    assert [(str(p), o, n) for p, o, n in F.byte_ranges(one)] == \
        [(path, 100 + 8 * 6 * 48 * 2, 8 * 48 * 2)]
    last = grid.take(1, -1)                                # a negative index too
    assert last.lead.shape == (2,) and np.array_equal(np.asarray(last)[1], data[56:64][None])


def test_file_bytes_are_mapped_a_window_at_a_time(tmp_path):
    """A kernel-copied tensor's bytes are read (for the .pt CRC) through one bounded mapping at
    a time, not one mapping of the whole range: mapped pages count as resident memory (a
    1.85 GB embedding mapped whole put a conversion at 1.9 GB of RSS)."""
    import zlib
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3 * (1 << 20) + 12345, dtype=np.uint8)
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 777 + data.tobytes())
    fb = F.FileBytes((data.size,), np.uint8, [(str(path), 777, data.size)])
    sizes, crc = [], 0
    for view in fb.mapped(window=1 << 20):
        sizes.append(len(view))
        crc = zlib.crc32(view, crc)
    assert len(sizes) == 4 and max(sizes) <= 1 << 20 and sum(sizes) == data.size
    assert crc == zlib.crc32(data.tobytes())
    assert np.array_equal(np.asarray(fb), data)


def _resident(arr) -> int:
    """Rss (bytes) of the mapping in /proc/self/smaps that holds ``arr``'s first byte."""
    ptr = arr.__array_interface__["data"][0]
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")
def test_release_lets_go_of_a_views_pages_and_keeps_its_bytes(tmp_path):
    """release() of a view of a read-only mapping drops the pages the view spans from the
    process's resident set (the rest stays), the bytes read the same afterwards; an array in
    memory is left alone."""
    data = np.random.default_rng(2).integers(0, 256, 8 << 20, dtype=np.uint8)
    path = tmp_path / "src.bin"
    path.write_bytes(data.tobytes())
    m = np.memmap(path, np.uint8, mode="r", offset=4096, shape=(data.size - 4096,))
    rows = m.reshape(-1, 4096)
    assert int(rows.sum(dtype=np.int64)) == int(data[4096:].sum(dtype=np.int64))   # all touched
    full = _resident(m)
    assert full >= data.size - 8192
    F.release(rows[:1024])                                   # the first 4 MiB
    assert _resident(m) <= full - (4 << 20) + 8192
    assert np.array_equal(rows[:1024].reshape(-1), data[4096:4096 + (4 << 20)])
    F.release(np.ones(10))                                   # not a mapping: nothing
