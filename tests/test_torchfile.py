"""Tests for mapc.runtime.torchfile: torch-free reading and writing of .pt checkpoints.

Cross-checks against real torch (``torch.save`` -> ``load``; ``TorchWriter`` ->
``torch.load``) skip when torch is not installed; everything else runs without it.
"""
from __future__ import annotations

import argparse
import collections
import enum
import itertools
import math
import random
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.torchfile import (DTYPES, Namespace, TensorRef, TorchDevice, TorchDType,
                                    TorchWriter, load)

# The dtypes the brief requires, then the extra ones torchfile also handles.
CORE_DTYPES = ["float32", "bfloat16", "float16", "float64", "int64", "int32", "int16", "int8",
               "uint8", "bool"]
EXTRA_DTYPES = ["complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn",
                "float8_e5m2"]
ALL_DTYPES = CORE_DTYPES + EXTRA_DTYPES

_counter = itertools.count()


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


# ---------------------------------------------------------------------------- helpers


def random_array(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """An array of arbitrary bit patterns (NaNs included) of a canonical dtype."""
    dtype = DTYPES[name]
    raw = np.random.default_rng(seed).integers(0, 256, math.prod(shape) * dtype.itemsize,
                                               dtype=np.uint8)
    if name == "bool":
        raw %= 2
    return raw.view(dtype).reshape(shape)


def random_tensor(torch, name: str, shape: tuple[int, ...], seed: int = 0):
    array = random_array(name, shape, seed)
    if array.size == 0:
        return torch.empty(shape, dtype=getattr(torch, name))
    return torch.frombuffer(bytearray(array.tobytes()), dtype=getattr(torch, name)).reshape(shape)


def torch_bytes(t) -> bytes:
    if t.numel() == 0:
        return b""
    # copy into a fresh 1-D tensor: .contiguous() keeps odd strides on size-1 dims
    flat = t.new_empty(t.numel()).copy_(t.detach().reshape(-1))
    return flat.view(t.new_empty(0).byte().dtype).numpy().tobytes()


def array_bytes(a) -> bytes:
    return np.ascontiguousarray(np.asarray(a)).tobytes()


def assert_same_tensor(ref: TensorRef, t) -> None:
    assert ref.dtype == str(t.dtype).removeprefix("torch.")
    assert ref.shape == tuple(t.shape)
    assert array_bytes(ref.numpy()) == torch_bytes(t)


def unique(tmp_path, stem: str = "ckpt"):
    return tmp_path / f"{stem}{next(_counter)}.pt"


def write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def binint(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def call_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle of ``module.name(arg)``."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + binunicode(arg) + b"\x85R."


def float_tensor_expr(storage_numel: int, size: int) -> bytes:
    """Pickle opcodes pushing ``_rebuild_tensor_v2(<FloatStorage '0' of storage_numel>, 0,
    (size,), (1,), False, OrderedDict())``."""
    pid = (b"(" + binunicode("storage") + b"ctorch\nFloatStorage\n" + binunicode("0")
           + binunicode("cpu") + binint(storage_numel) + b"tQ")
    args = (b"(" + pid + binint(0) + binint(size) + b"\x85" + binint(1) + b"\x85" + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"t")
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def float_tensor_pickle(storage_numel: int, size: int) -> bytes:
    """``{'x': <float_tensor_expr>}``"""
    return b"\x80\x02}" + binunicode("x") + float_tensor_expr(storage_numel, size) + b"s."


def local_data_offsets(path) -> dict[str, int]:
    """Where each member's payload starts, parsed from the local headers."""
    offsets = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            assert header[:4] == b"PK\x03\x04"
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
    return offsets


def memmap_in_base_chain(array: np.ndarray) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base if isinstance(array.base, np.ndarray) else None
    return False


class Color(enum.Enum):
    RED = 1


# ---------------------------------------------------------------------------- torch.save -> load


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_load_reads_each_dtype_from_torch_save(torch, tmp_path, name):
    t = random_tensor(torch, name, (3, 5), seed=1)
    path = unique(tmp_path)
    torch.save({"x": t}, path)
    assert_same_tensor(load(path)["x"], t)


VIEWS = {
    "transpose": lambda b: b.t(),
    "strided_slice": lambda b: b[1:, ::2],
    "row": lambda b: b[2],
    "offset_block": lambda b: b[2:],
    "broadcast": lambda b: b[:1].expand(3, 6),
}


@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("name", ["float32", "bfloat16", "float8_e5m2", "complex128", "bool"])
def test_load_views_sharing_a_storage(torch, tmp_path, view, name):
    base = random_tensor(torch, name, (4, 6), seed=4)
    derived = VIEWS[view](base)
    path = unique(tmp_path)
    torch.save({"base": base, "view": derived}, path)
    loaded = load(path)
    assert loaded["view"].storage is loaded["base"].storage
    assert_same_tensor(loaded["view"], derived)


@pytest.mark.parametrize("make", [
    lambda torch: torch.tensor(3.5),
    lambda torch: torch.tensor(7, dtype=torch.int64),
    lambda torch: torch.zeros(0, 3),
    lambda torch: torch.zeros(2, 0, dtype=torch.bfloat16),
], ids=["0d_float", "0d_int", "empty_float", "empty_bf16"])
def test_load_zero_dim_and_empty_tensors(torch, tmp_path, make):
    t = make(torch)
    path = unique(tmp_path)
    torch.save({"t": t}, path)
    ref = load(path)["t"]
    assert_same_tensor(ref, t)
    assert ref.numpy().shape == tuple(t.shape)


def test_contiguous_tensor_is_a_zero_copy_memmap_view(torch, tmp_path):
    path = unique(tmp_path)
    torch.save({"w": torch.arange(64, dtype=torch.bfloat16).reshape(8, 8)}, path)
    array = load(path)["w"].numpy()
    assert array.dtype == np.dtype(ml_dtypes.bfloat16)
    assert not array.flags.owndata and not array.flags.writeable
    assert memmap_in_base_chain(array)


def test_load_nested_containers_and_plain_values(torch, tmp_path):
    t = torch.ones(2)
    obj = collections.OrderedDict(
        model=collections.OrderedDict(layer=collections.OrderedDict(weight=t)),
        meta={"list": [1, 2.5, "s", None, True], "tuple": (1, (2, 3)), "bytes": b"\x00\xff",
              "empty_bytes": b"", "set": {1, 2}, "complex": 1 + 2j, "big": 2**70},
        size=torch.Size([2, 3]), device=torch.device("cuda", 1), dtype=torch.bfloat16)
    path = unique(tmp_path)
    torch.save(obj, path)
    loaded = load(path)
    assert type(loaded) is collections.OrderedDict and list(loaded) == list(obj)
    assert type(loaded["model"]["layer"]) is collections.OrderedDict
    assert_same_tensor(loaded["model"]["layer"]["weight"], t)
    assert loaded["meta"] == obj["meta"]
    assert loaded["size"] == (2, 3)
    assert loaded["device"] == TorchDevice("cuda:1") and loaded["device"].index == 1
    assert loaded["dtype"] == TorchDType("bfloat16")


def test_load_argparse_namespace_as_inert_record(torch, tmp_path):
    args = argparse.Namespace(lr=0.1, layers=[1, 2], params_dtype=torch.float16, name="gpt")
    path = unique(tmp_path)
    torch.save({"args": args}, path)
    ns = load(path)["args"]
    assert isinstance(ns, Namespace)
    assert ns.lr == 0.1 and ns["layers"] == [1, 2] and ns.name == "gpt"
    assert ns.params_dtype == TorchDType("float16")
    assert ns.to_dict() == {"lr": 0.1, "layers": [1, 2], "params_dtype": TorchDType("float16"),
                            "name": "gpt"}


def test_load_numpy_rng_state(torch, tmp_path):
    state = np.random.RandomState(3).get_state()
    path = unique(tmp_path)
    torch.save({"rng": state}, path)
    loaded = load(path)["rng"]
    assert loaded[0] == state[0] and loaded[2:] == state[2:]
    assert loaded[1].dtype == state[1].dtype and np.array_equal(loaded[1], state[1])


def test_load_torch_rng_state(torch, tmp_path):
    state = torch.get_rng_state()
    path = unique(tmp_path)
    torch.save({"rng": state}, path)
    assert_same_tensor(load(path)["rng"], state)


def test_load_python_random_state(torch, tmp_path):
    state = random.Random(5).getstate()
    path = unique(tmp_path)
    torch.save({"rng": state}, path)
    assert load(path)["rng"] == state


def test_load_parameter(torch, tmp_path):
    p = torch.nn.Parameter(torch.arange(3.0))
    path = unique(tmp_path)
    torch.save({"p": p}, path)
    ref = load(path)["p"]
    assert ref.is_parameter and ref.requires_grad
    assert_same_tensor(ref, p)


def test_load_legacy_non_zip_format(torch, tmp_path):
    base = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    obj = {"base": base, "t": base.t(), "f": torch.ones(3)[1:], "s": torch.tensor(2.0)}
    path = unique(tmp_path)
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    loaded = load(path)
    for key, t in obj.items():
        assert_same_tensor(loaded[key], t)
    assert loaded["t"].storage is loaded["base"].storage


# ---------------------------------------------------------------------------- TorchWriter -> torch.load


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("name", ALL_DTYPES)
def test_writer_output_loads_in_torch(torch, tmp_path, name, mmap):
    array = random_array(name, (4, 3), seed=2)
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.finish({"x": w.add_tensor(array)})
    t = torch.load(path, weights_only=True, mmap=mmap)["x"]
    assert t.dtype == getattr(torch, name) and tuple(t.shape) == (4, 3)
    assert torch_bytes(t) == array.tobytes()


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1, 1, 1)])
def test_writer_zero_dim_and_empty_tensors_load_in_torch(torch, tmp_path, shape):
    array = random_array("float32", shape, seed=3)
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.finish({"x": w.add_tensor(array)})
    t = torch.load(path, weights_only=True, mmap=True)["x"]
    assert tuple(t.shape) == shape and torch_bytes(t) == array.tobytes()


def test_writer_non_contiguous_input_is_written_row_major(torch, tmp_path):
    array = np.arange(20, dtype=np.int32).reshape(4, 5).T[:, ::2]
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.finish({"x": w.add_tensor(array)})
    assert np.array_equal(torch.load(path, weights_only=True)["x"].numpy(), array)


@pytest.mark.parametrize("mode", ["weights_only_safe_globals", "unrestricted"])
def test_writer_namespace_loads_in_torch(torch, tmp_path, mode):
    path = unique(tmp_path)
    w = TorchWriter(path)
    ns = Namespace(lr=0.5, dt=TorchDType("bfloat16"), dev=TorchDevice("cuda:0"), tags=["a"])
    w.finish({"args": ns, "w": w.add_tensor(np.zeros(2, np.float32))})
    if mode == "unrestricted":
        loaded = torch.load(path, weights_only=False)
    else:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, weights_only=True)
    args = loaded["args"]
    assert type(args) is argparse.Namespace
    assert vars(args) == {"lr": 0.5, "dt": torch.bfloat16, "dev": torch.device("cuda", 0),
                          "tags": ["a"]}


def test_writer_plain_values_load_in_torch_weights_only(torch, tmp_path):
    obj = collections.OrderedDict(
        a=[1, -5, 2**40, -(2**70), 1.5, "text", None, True, False],
        b=(1, (2, 3), ()), c={"nested": collections.OrderedDict(k=b"\x00\x01")}, d=b"",
        e={3, 4}, f=1 - 1j, g=TorchDType("float16"), h=TorchDevice("cpu"))
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.finish(obj)
    loaded = torch.load(path, weights_only=True)
    assert type(loaded) is collections.OrderedDict
    expected = dict(obj, g=torch.float16, h=torch.device("cpu"))
    assert dict(loaded) == expected


def test_writer_shared_placeholder_loads_as_one_tensor(torch, tmp_path):
    path = unique(tmp_path)
    w = TorchWriter(path)
    ph = w.add_tensor(np.arange(4, dtype=np.float32))
    w.finish({"embed": ph, "lm_head": ph})
    loaded = torch.load(path, weights_only=True)
    assert loaded["embed"] is loaded["lm_head"]


# ---------------------------------------------------------------------------- TorchWriter -> load


def test_writer_round_trips_through_load(tmp_path):
    arrays = {name: random_array(name, (2, 3), seed=i) for i, name in enumerate(ALL_DTYPES)}
    rng_state = np.random.RandomState(1).get_state()
    path = unique(tmp_path)
    w = TorchWriter(path)
    tensors = {name: w.add_tensor(a) for name, a in arrays.items()}
    w.finish({"model": collections.OrderedDict(tensors), "args": Namespace(x=1, dt=TorchDType("int8")),
              "rng": rng_state, "scalar": np.float32(2.5), "iteration": 7})
    loaded = load(path)
    for name, array in arrays.items():
        ref = loaded["model"][name]
        assert ref.dtype == name and ref.shape == array.shape
        assert ref.numpy().tobytes() == array.tobytes()
    assert loaded["args"] == Namespace(x=1, dt=TorchDType("int8"))
    assert loaded["rng"][0] == rng_state[0] and np.array_equal(loaded["rng"][1], rng_state[1])
    assert loaded["scalar"] == np.float32(2.5) and loaded["iteration"] == 7


def test_writer_accepts_loaded_tensor_refs(tmp_path):
    src, dst = unique(tmp_path), unique(tmp_path)
    w = TorchWriter(src)
    w.finish({"x": w.add_tensor(np.arange(6, dtype=np.int16).reshape(2, 3))})
    ref = load(src)["x"]
    w = TorchWriter(dst)
    w.finish({"x": w.add_tensor(ref)})
    assert np.array_equal(load(dst)["x"].numpy(), ref.numpy())


def test_writer_aligns_payloads_to_64_bytes_and_checksums(tmp_path):
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.finish({str(n): w.add_tensor(np.ones(n, np.uint8)) for n in (1, 3, 64, 100)})
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert {n.split("/")[0] for n in zf.namelist()} == {"archive"}
    offsets = local_data_offsets(path)
    assert all(off % 64 == 0 for name, off in offsets.items() if "/data/" in name)


def test_writer_writes_tensor_bytes_before_finish(tmp_path):
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.add_tensor(np.zeros(1 << 16, np.float32))
    assert path.stat().st_size >= 4 << 16
    w.abort()


@pytest.mark.parametrize("reader", ["zipfile", "mapc", "torch"])
def test_zip64_layout_is_readable(tmp_path, monkeypatch, reader):
    monkeypatch.setattr(torchfile, "_ZIP64_LIMIT", 1)  # force zip64 fields on every entry
    array = np.arange(10, dtype=np.float64)
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.finish({"x": w.add_tensor(array)})
    if reader == "zipfile":
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None
    elif reader == "mapc":
        assert np.array_equal(load(path)["x"].numpy(), array)
    else:
        torch = pytest.importorskip("torch")
        assert np.array_equal(torch.load(path, weights_only=True, mmap=True)["x"].numpy(), array)


def test_writer_abort_deletes_partial_file(tmp_path):
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.add_tensor(np.ones(3, np.float32))
    w.abort()
    assert not path.exists()


def test_writer_context_manager_without_finish_deletes_file(tmp_path):
    path = unique(tmp_path)
    with pytest.raises(RuntimeError):
        with TorchWriter(path) as w:
            w.add_tensor(np.ones(3, np.float32))
            raise RuntimeError("boom")
    assert not path.exists()


@pytest.mark.parametrize("value", [object(), Color.RED, lambda: 0], ids=["object", "enum", "lambda"])
def test_writer_refuses_values_it_cannot_write(tmp_path, value):
    path = unique(tmp_path)
    w = TorchWriter(path)
    with pytest.raises(MapcError, match="cannot write"):
        w.finish({"v": value})
    w.finish({"v": 1})  # still usable
    assert load(path) == {"v": 1}


def test_writer_refuses_unsupported_dtype(tmp_path):
    w = TorchWriter(unique(tmp_path))
    with pytest.raises(MapcError, match="dtype"):
        w.add_tensor(np.array(["a"]))
    w.abort()


def test_writer_refuses_foreign_placeholder(tmp_path):
    other = TorchWriter(unique(tmp_path))
    ph = other.add_tensor(np.ones(1, np.float32))
    w = TorchWriter(unique(tmp_path))
    with pytest.raises(MapcError, match="not created by this TorchWriter"):
        w.finish({"x": ph})
    other.abort()
    w.abort()


# ---------------------------------------------------------------------------- never run pickled code

PAYLOADS = {
    "os.system": lambda marker: ("os", "system", f"touch '{marker}'"),
    "builtins.exec": lambda marker: ("builtins", "exec", f"open({str(marker)!r}, 'w').close()"),
    "builtins.eval": lambda marker: ("builtins", "eval", f"open({str(marker)!r}, 'w')"),
    "posix.system": lambda marker: ("posix", "system", f"touch '{marker}'"),
}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_code_global_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / f"pwned-{payload}"
    module, name, arg = PAYLOADS[payload](marker)
    path = unique(tmp_path)
    write_zip(path, {"archive/data.pkl": call_pickle(module, name, arg), "archive/version": b"3\n"})
    with pytest.raises(MapcError) as err:
        load(path)
    message = str(err.value)
    assert str(path) in message and f"{module}.{name}" in message
    assert "never runs code" in message and "allow-list" in message
    assert not marker.exists()


def test_exec_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the payload above really would run if unpickled naively."""
    marker = tmp_path / "pwned-control"
    module, name, arg = PAYLOADS["builtins.exec"](marker)
    import pickle

    pickle.loads(call_pickle(module, name, arg))
    assert marker.exists()


# BUILD sets attributes on whatever object is on the stack; the objects the allow-list hands
# out (and the tensors built from them) must not be modifiable that way.
TAMPER_TARGETS = {
    "function_defaults": (b"ctorch._utils\n_rebuild_tensor_v2\n", "__defaults__",
                          binint(1) + b"\x85"),
    "record_class": (b"cargparse\nNamespace\n", "pickle_global", binunicode("os.system")),
    "dtype_singleton": (b"ctorch\nfloat32\n", "name", binunicode("int8")),
    "tensor_stride": (float_tensor_expr(4, 4), "stride", binint(1 << 30) + b"\x85"),
}


def module_state():
    return (torchfile._rebuild_tensor_v2.__defaults__, Namespace.pickle_global,
            torchfile.ALLOWED_GLOBALS["torch.float32"].name)


@pytest.mark.parametrize("form", ["dict_state", "slot_state"])
@pytest.mark.parametrize("target", sorted(TAMPER_TARGETS))
def test_pickle_cannot_modify_allowed_objects(tmp_path, target, form):
    push, attr, value = TAMPER_TARGETS[target]
    state = b"}" + binunicode(attr) + value + b"s"
    if form == "slot_state":
        state = b"N" + state + b"\x86"
    path = unique(tmp_path)
    write_zip(path, {"archive/data.pkl": b"\x80\x02" + push + state + b"b.",
                     "archive/data/0": bytes(16), "archive/version": b"3\n"})
    before = module_state()
    with pytest.raises(MapcError, match="corrupt"):
        load(path)
    assert module_state() == before


def test_load_and_write_do_not_import_torch(tmp_path):
    path = unique(tmp_path)
    script = (
        "import sys, numpy as np\n"
        "from mapc.runtime.torchfile import TorchWriter, load\n"
        f"w = TorchWriter({str(path)!r})\n"
        "w.finish({'x': w.add_tensor(np.arange(3.0))})\n"
        f"assert load({str(path)!r})['x'].numpy().tolist() == [0.0, 1.0, 2.0]\n"
        "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_unknown_class_from_torch_save_is_refused(torch, tmp_path):
    path = unique(tmp_path)
    torch.save({"mode": Color.RED}, path)
    with pytest.raises(MapcError, match=r"Color.*allow-list"):
        load(path)


# ---------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_file_is_reported(tmp_path, keep):
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.finish({"x": w.add_tensor(np.ones(4096, np.float32))})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MapcError, match="truncated") as err:
        load(path)
    assert str(path) in str(err.value)


def test_storage_running_past_end_of_file_is_reported(tmp_path):
    path = unique(tmp_path)
    write_zip(path, {"archive/data.pkl": float_tensor_pickle(1 << 18, 1 << 18),
                     "archive/data/0": bytes(16), "archive/version": b"3\n"})
    raw = bytearray(path.read_bytes())
    name = b"archive/data/0"
    for at in (i for i in range(len(raw)) if raw.startswith(b"PK\x01\x02", i)):
        name_len = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46:at + 46 + name_len] == name:  # claim a 1 MiB member in the directory
            struct.pack_into("<II", raw, at + 20, 1 << 20, 1 << 20)
    path.write_bytes(bytes(raw))
    with pytest.raises(MapcError, match=r"truncated: storage 0 needs 1048576 bytes at offset "
                                        r"\d+ but the file ends at \d+") as err:
        load(path)
    assert str(path) in str(err.value)


def test_storage_larger_than_its_member_is_reported(tmp_path):
    path = unique(tmp_path)
    write_zip(path, {"archive/data.pkl": float_tensor_pickle(100, 100),
                     "archive/data/0": bytes(16), "archive/version": b"3\n"})
    with pytest.raises(MapcError, match="storage 0 needs 400 bytes but its archive member holds 16"):
        load(path)


def test_handmade_tensor_pickle_loads(tmp_path):
    """Sanity check for the two tests above: the same pickle with honest sizes loads."""
    path = unique(tmp_path)
    write_zip(path, {"weird_prefix/data.pkl": float_tensor_pickle(4, 4),
                     "weird_prefix/data/0": np.arange(4, dtype=np.float32).tobytes(),
                     "weird_prefix/version": b"3\n"})
    assert np.array_equal(load(path)["x"].numpy(), np.arange(4, dtype=np.float32))


def test_missing_storage_member_is_reported(tmp_path):
    path = unique(tmp_path)
    write_zip(path, {"archive/data.pkl": float_tensor_pickle(4, 4), "archive/version": b"3\n"})
    with pytest.raises(MapcError, match="archive/data/0 is missing"):
        load(path)


def test_zip_without_data_pkl_is_reported(tmp_path):
    path = unique(tmp_path)
    write_zip(path, {"archive/version": b"3\n"})
    with pytest.raises(MapcError, match="no data.pkl") as err:
        load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", b"\x80\x02K\x05."],
                         ids=["empty", "text", "other_pickle"])
def test_non_checkpoint_file_is_reported(tmp_path, content):
    path = unique(tmp_path)
    path.write_bytes(content)
    with pytest.raises(MapcError) as err:
        load(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------- properties

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@SETTINGS
@given(name=st.sampled_from(ALL_DTYPES), shape=shapes, seed=st.integers(0, 2**16),
       transpose=st.booleans())
def test_property_writer_to_torch_is_bit_exact(torch, tmp_path, name, shape, seed, transpose):
    array = random_array(name, shape, seed)
    if transpose:
        array = array.T
    path = unique(tmp_path)
    w = TorchWriter(path)
    w.finish({"x": w.add_tensor(array)})
    t = torch.load(path, weights_only=True, mmap=True)["x"]
    assert t.dtype == getattr(torch, name) and tuple(t.shape) == array.shape
    assert torch_bytes(t) == array_bytes(array)


@SETTINGS
@given(name=st.sampled_from(ALL_DTYPES), shape=shapes, seed=st.integers(0, 2**16),
       view=st.sampled_from(["none", "permute", "step"]))
def test_property_torch_save_to_load_is_bit_exact(torch, tmp_path, name, shape, seed, view):
    t = random_tensor(torch, name, shape, seed)
    if view == "permute":
        t = t.permute(tuple(reversed(range(t.dim()))))
    elif view == "step" and t.dim():
        t = t[..., ::2]
    path = unique(tmp_path)
    torch.save({"x": t}, path)
    assert_same_tensor(load(path)["x"], t)


@pytest.mark.parametrize("make", [
    lambda t: t, lambda t: t.t(), lambda t: t[1:3], lambda t: t[:, 1], lambda t: t.reshape(-1)[5:],
], ids=["contiguous", "transposed", "row-slice", "column", "offset"])
def test_read_copies_exactly_what_numpy_maps(tmp_path, make):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.bfloat16).reshape(4, 6)
    torch.save({"x": make(base), "base": base}, tmp_path / "f.pt")
    from mapc.runtime.torchfile import load
    ref = load(tmp_path / "f.pt")["x"]
    got = ref.read()
    assert got.flags.c_contiguous and got.flags.writeable
    assert np.array_equal(got.view(np.uint16), np.ascontiguousarray(ref.numpy()).view(np.uint16))


# -- tensors laid out first, their bytes written later in pieces (the ZeRO optimizer files) --

@given(st.binary(max_size=3000), st.binary(max_size=3000), st.integers(0, 5 << 20))
@settings(max_examples=60, deadline=None)
def test_crc32_combine_and_zeros_match_zlib(a, b, zeros):
    import zlib
    assert torchfile.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert torchfile.crc32_zeros(zeros, zlib.crc32(a)) == zlib.crc32(a + bytes(zeros))


@pytest.mark.parametrize("chunk", [None, 64], ids=["inline-crc", "threaded-crc"])
def test_reserved_tensors_filled_in_pieces_equal_add_tensor(torch, tmp_path, monkeypatch, chunk):
    """Pieces written in shuffled order into a suspended writer, with holes left for zeros,
    give the same bytes as add_tensor of the whole arrays (the CRCs combined, not re-read),
    and torch.load reads them."""
    if chunk:
        monkeypatch.setattr(torchfile, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1000, 1, 77)]
    arrays[0][990:] = 0                                      # a padding hole
    whole = unique(tmp_path)
    w = TorchWriter(whole)
    w.finish({"a": [w.add_tensor(a) for a in arrays], "s": w.add_tensor(np.array(3.5, np.float32))})
    pieces_path = unique(tmp_path)
    w = TorchWriter(pieces_path)
    phs = [w.reserve_tensor("float32", a.shape, requires_grad=False) for a in arrays]
    step = w.reserve_tensor("float32", ())
    w.suspend()
    cuts = [(0, 0, 300), (0, 300, 301), (0, 301, 990), (1, 0, 1), (2, 0, 40), (2, 40, 77)]
    for i in rng.permutation(len(cuts)):
        k, lo, hi = cuts[i]
        w.fill(phs[k], lo * 4, arrays[k][lo:hi])
    w.fill(step, 0, np.array(3.5, np.float32))
    w.finish({"a": phs, "s": step})
    assert pieces_path.read_bytes() == whole.read_bytes()
    with zipfile.ZipFile(pieces_path) as zf:
        assert zf.testzip() is None
    got = torch.load(pieces_path, weights_only=True)
    assert all(np.array_equal(g.numpy(), a) for g, a in zip(got["a"], arrays))


def test_reserved_tensor_refuses_overlapping_or_outside_pieces(tmp_path):
    w = TorchWriter(unique(tmp_path))
    ph = w.reserve_tensor("float32", (10,))
    with pytest.raises(MapcError, match="outside tensor"):
        w.fill(ph, 36, np.ones(2, np.float32))
    w.fill(ph, 0, np.ones(5, np.float32))
    w.fill(ph, 16, np.ones(2, np.float32))
    with pytest.raises(MapcError, match="overlapping"):
        w.finish({"x": ph})
    w.abort()


@pytest.mark.parametrize("table_after", [32, 2], ids=["combine", "tables"])
def test_strided_fills_equal_add_tensor_of_the_concatenation(torch, tmp_path, monkeypatch,
                                                              table_after):
    """Column blocks of a matrix (tp slices concatenated on axis 1) filled by rows, ``stride``
    bytes apart, in shuffled order and some rows split further, give the bytes add_tensor
    writes for the whole matrix; the rows' CRCs are combined by the plain combine and by the
    lookup tables alike, zipfile and torch.load accept the file."""
    monkeypatch.setattr(torchfile, "_TABLE_AFTER", table_after)
    torchfile._shift_tables.cache_clear()
    rng = np.random.default_rng(4)
    full = rng.standard_normal((37, 12)).astype(np.float32)
    whole = unique(tmp_path)
    w = TorchWriter(whole)
    w.finish({"w": w.add_tensor(full)})
    path = unique(tmp_path)
    w = TorchWriter(path)
    ph = w.reserve_tensor("float32", full.shape)
    w.suspend()
    cuts = [(0, 20, 0, 4), (20, 37, 0, 4), (0, 37, 4, 8), (0, 5, 8, 12), (5, 37, 8, 12)]
    for i in rng.permutation(len(cuts)):
        r0, r1, c0, c1 = cuts[i]
        w.fill(ph, (r0 * 12 + c0) * 4, full[r0:r1, c0:c1], stride=12 * 4)
    w.finish({"w": ph})
    assert path.read_bytes() == whole.read_bytes()
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    assert np.array_equal(torch.load(path, weights_only=True)["w"].numpy(), full)


def test_strided_fill_refuses_rows_that_overlap(tmp_path):
    w = TorchWriter(unique(tmp_path))
    ph = w.reserve_tensor("float32", (4, 4))
    with pytest.raises(MapcError, match="overlap"):
        w.fill(ph, 0, np.ones((2, 4), np.float32), stride=8)
    with pytest.raises(MapcError, match="outside tensor"):
        w.fill(ph, 16, np.ones((4, 2), np.float32), stride=16)
    w.abort()


# -- archives written straight into a larger file (each item of a DCP .distcp) --

def _archive_in_memory(obj=None, array=None) -> bytes:
    """The same archive built the other way: whole in a BytesIO (offsets from its start)."""
    import io
    buf = io.BytesIO()
    w = TorchWriter("x.distcp", fileobj=buf)
    w.finish(w.add_tensor(np.require(array, requirements="C")) if array is not None else obj)
    return buf.getvalue()


@pytest.mark.parametrize("chunk", [None, 64], ids=["inline-crc", "threaded-crc"])
def test_append_archive_writes_the_in_memory_archive_at_any_offset(torch, tmp_path,
                                                                   monkeypatch, chunk):
    """Archives appended after 13 bytes of other data (plain arrays, a 0-d one, a range of a
    source file copied in-kernel, plain objects) are byte for byte the archives built whole in
    memory, each loads with torch.load from its slice, and a failing one (an object mapc cannot
    pickle) leaves the file as it was, the next appended after it."""
    import io
    from mapc.runtime import fastcopy
    if chunk:
        monkeypatch.setattr(torchfile, "_CHUNK", chunk)
    rng = np.random.default_rng(1)
    src = tmp_path / "source.bin"
    big = rng.standard_normal(fastcopy.MIN_KERNEL_COPY // 4 + 17).astype(np.float32)
    src.write_bytes(b"\0" * 64 + big.tobytes())
    mapped = np.memmap(src, dtype=np.float32, mode="r", offset=64, shape=big.shape)
    assert fastcopy.file_range(mapped) is not None          # so it goes in-kernel
    items = [(None, rng.standard_normal((7, 5)).astype(np.float32)),
             (None, np.array(2.5, np.float32)),
             (None, mapped),
             ({"param_groups": [{"lr": 1e-3}]}, None),
             ([None], None)]
    path = tmp_path / "__0_0.distcp"
    with open(path, "wb") as f:
        f.write(b"thirteen byte")
        places = [torchfile.append_archive(f, path, obj, arr) for obj, arr in items]
        end = f.tell()
        with pytest.raises(MapcError):
            torchfile.append_archive(f, path, {"bad": object()})
        assert f.tell() == end
        places.append(torchfile.append_archive(f, path, array=np.arange(3, dtype=np.int64)))
        items.append((None, np.arange(3, dtype=np.int64)))
    data = path.read_bytes()
    assert len(data) == places[-1][0] + places[-1][1]
    assert places[0][0] == 13 and all(a[0] + a[1] == b[0] for a, b in zip(places, places[1:]))
    for (obj, arr), (offset, length) in zip(items, places):
        piece = data[offset:offset + length]
        assert piece == _archive_in_memory(obj, None if arr is None else np.asarray(arr))
        got = torch.load(io.BytesIO(piece), weights_only=True)
        if arr is None:
            assert got == obj
        else:
            assert got.shape == arr.shape and np.array_equal(got.numpy(), arr)
