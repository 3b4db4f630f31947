"""Crafted pickles (issue 9, part 3): what the restricted unpickler must refuse, in bounded time
and memory, with one MapcError line naming the file, however the value is placed.

Each payload below pushes exactly one value, built only from globals on the allow-list: the
attacks the issue measured against Python's own unpickler (segfaults from object dtypes over raw
bytes, BUILD patching an allowed class for the whole process, a 40-byte file allocating 2 GiB,
memo references building an exponential graph, 100 000-deep nesting). They are spliced into
real checkpoints mapc wrote (at the values mapc reads or prints: megatron/neox ``iteration``,
DeepSpeed ``global_steps`` / ``lr_scheduler`` / a param group's ``lr``, Trainer ``scheduler.pt``
/ ``optimizer.pt``), then ``inspect`` and ``convert`` run in-process.
"""
from __future__ import annotations

import collections
import pickle
import shutil
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

import mapc
from mapc.cli.main import main
from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers import dcp
from mapc.runtime.containers.zero import DEEPSPEED_PICKLES, LossScaler
from tests.conftest import llama_config, write_random_hf

MARKER = "MAPC-HOSTILE-VALUE"


# ------------------------------------------------------------------------------ payloads
def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _get(k: int) -> bytes:
    return b"j" + struct.pack("<I", k)


def _put(k: int) -> bytes:
    return b"r" + struct.pack("<I", k)


_FALSE, _TRUE, _NONE = b"\x89", b"\x88", b"N"


def _np_dtype(name: str) -> bytes:          # numpy.dtype(name, False, True), no state
    return _glob("numpy", "dtype") + _str(name) + _FALSE + _TRUE + b"\x87R"


def _reconstruct() -> bytes:
    return (_glob("numpy.core.multiarray", "_reconstruct") + _glob("numpy", "ndarray") +
            b"K\x00\x85" + b"C\x01b" + b"\x87R")


_BASE = 1_000_000           # memo keys far from those of the surrounding pickle

# numpy.dtype("V8") given, by its BUILD state, one field "f" of dtype object (flag 1: has
# objects): values of it over raw bytes are PyObject pointers read from the file
_OBJ_FIELD_DTYPE = (_np_dtype("V8") +
                    b"(K\x03" + _str("|") + _NONE + b"(" + _str("f") + b"t" +
                    b"}" + _str("f") + _np_dtype("O") + b"K\x00\x86s" +
                    b"K\x08K\x01K\x01tb")

PAYLOADS = {
    # a scalar of that dtype (Python's unpickler + numpy: SIGSEGV when it is printed)
    "object_field_dtype": (_glob("numpy.core.multiarray", "scalar") + _OBJ_FIELD_DTYPE +
                           b"C\x08" + struct.pack("<Q", 0xDEADBEEF) + b"\x86R"),
    # the same with a plain field: mapc rebuilds no structured dtype either
    "structured_dtype": (_np_dtype("V8") +
                         b"(K\x03" + _str("|") + _NONE + b"(" + _str("f") + b"t" +
                         b"}" + _str("f") + _np_dtype("f8") + b"K\x00\x86s" +
                         b"K\x08K\x01K\x00tb"),
    # an array of that dtype over raw bytes
    "object_field_array": (_reconstruct() +
                           b"(K\x01K\x02\x85" + _OBJ_FIELD_DTYPE + _FALSE +
                           b"C\x10" + struct.pack("<QQ", 0x41414141, 0x42424242) + b"tb"),
    # a plain object array over raw bytes
    "object_array": (_reconstruct() +
                     b"(K\x01K\x02\x85" + _np_dtype("O") + _FALSE +
                     b"C\x10" + struct.pack("<QQ", 0x41414141, 0x42424242) + b"tb"),
    # BUILD on an allowed class: would patch collections.Counter for the whole process
    "counter_class_build": (_glob("collections", "Counter") +
                            _NONE + b"}" + _str("most_common") + b"K\x01s" + b"\x86b"),
    "bytearray_2gib": _glob("builtins", "bytearray") + b"J\xff\xff\xff\x7f\x85R",
    "bytes_2gib": _glob("builtins", "bytes") + b"J\xff\xff\xff\x7f\x85R",
    # a_{i+1} = [a_i, a_i]: 2**80 nodes when walked
    "exponential_memo": (b"]" + _put(_BASE) + b"0" + b"".join(
        b"(" + _get(_BASE + i) + _get(_BASE + i) + b"l" + _put(_BASE + i + 1) + b"0"
        for i in range(80)) + _get(_BASE + 80)),
    "nesting_100000": b"]" * 100_000 + b"a" * 99_999,
    "tuple_nesting_100000": b"(" * 100_000 + b"t" * 100_000,
    "list_contains_itself": b"]" + _put(_BASE) + _get(_BASE) + b"a",
    # a list is put into another, then the other into it: a cycle through re-opening
    "reopened_list": (b"]" + _put(_BASE) + b"]" + _put(_BASE + 1) + _get(_BASE) + b"a0" +
                      _get(_BASE) + _get(_BASE + 1) + b"a"),
    "bytes_length_2_62": b"\x8e" + struct.pack("<Q", 1 << 62),
    "long_length_2_31": b"\x8b" + struct.pack("<i", 2**31 - 1),
}
SEGFAULTING = ["object_field_dtype", "object_field_array", "exponential_memo"]


def _pickle(payload: bytes) -> bytes:
    return b"\x80\x02}" + _str("iteration") + payload + b"s."


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _bounded_refusal(path: Path, run, budget_s: float = 30.0, budget_mib: int = 64):
    """``run()`` raises a one-line MapcError naming ``path``, fast and without allocating.
    The time bound separates "refused" from the minutes (or the hang) of the unbounded reader;
    it is generous because the refusal is traced by tracemalloc on a machine that may be busy."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(MapcError) as err:
            run()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert elapsed < budget_s, f"took {elapsed:.1f}s"
    assert peak < budget_mib << 20, f"peak {peak >> 20} MiB"
    return message


# ------------------------------------------------------------------------------ torchfile.load
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_zip_payload_is_refused_in_bounds(tmp_path, name):
    path = _write_zip(tmp_path / "x.pt", {"archive/data.pkl": _pickle(PAYLOADS[name]),
                                          "archive/version": b"3\n"})
    counter = collections.Counter.__dict__.copy()
    message = _bounded_refusal(path, lambda: torchfile.load(path))
    assert "corrupt" in message
    assert collections.Counter.__dict__ == counter


@pytest.mark.parametrize("name", ["object_field_dtype", "exponential_memo", "nesting_100000"])
def test_legacy_payload_is_refused_in_bounds(tmp_path, name):
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {}))
    path = tmp_path / "legacy.pt"
    path.write_bytes(head + _pickle(PAYLOADS[name]) + pickle.dumps([], protocol=2))
    _bounded_refusal(path, lambda: torchfile.load(path))


@pytest.mark.parametrize("name", ["counter_class_build", "exponential_memo", "nesting_100000",
                                  "bytearray_2gib"])
def test_dcp_metadata_payload_is_refused_in_bounds(tmp_path, name):
    (tmp_path / ".metadata").write_bytes(_pickle(PAYLOADS[name]))
    _bounded_refusal(tmp_path / ".metadata", lambda: dcp.read_metadata(tmp_path))


def test_plain_numpy_values_still_load(tmp_path):
    """The numpy values real checkpoints hold (RNG state arrays, scalars, dtypes) survive."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    value = {"rng": np.random.RandomState(3).get_state(), "lr": np.float64(0.25),
             "dt": np.dtype(">i4"), "s": np.dtype("U5"), "big": 2**70,
             "arr": np.arange(6, dtype=np.float32).reshape(2, 3, order="F")}
    torch.save(value, tmp_path / "np.pt")
    got = torchfile.load(tmp_path / "np.pt")
    assert got["rng"][0] == "MT19937" and (got["rng"][1] == value["rng"][1]).all()
    assert got["lr"] == 0.25 and got["lr"].dtype == np.float64
    assert (got["dt"], got["s"], got["big"]) == (value["dt"], value["s"], 2**70)
    assert (got["arr"] == value["arr"]).all()


# ------------------------------------------------------------------------------ per-format lists
def test_allow_list_is_per_format_not_per_import(tmp_path):
    """A DeepSpeed record is read from a DeepSpeed file, and refused in a megatron one even
    though the DeepSpeed container (which names it) is imported in this process."""
    path = tmp_path / "m.pt"
    torchfile.repickle({"iteration": 3, "scaler": LossScaler(cur_scale=1.0)}, path)
    assert torchfile.load(path, DEEPSPEED_PICKLES)["scaler"].cur_scale == 1.0
    from mapc.runtime.containers import megatron
    with pytest.raises(MapcError, match="LossScaler.*Megatron-LM"):
        torchfile.load(path, megatron.PICKLES)
    with pytest.raises(MapcError, match="LossScaler"):
        torchfile.load(path)


# ------------------------------------------------------------------------------ in real checkpoints
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cfg = llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=64)
    hf = write_random_hf(root / "hf", cfg)
    for fmt in ("megatron", "deepspeed", "neox"):
        mapc.convert(hf, root / fmt, to=fmt)
    mapc.convert(root / "deepspeed", root / "trainer", to="hf", with_optimizer=True)
    return root


def _pg0(key):
    return lambda o: o["optimizer_state_dict"]["base_optimizer_state"]["param_groups"][0], key


TARGETS = {
    "megatron-iteration": ("megatron", "release/mp_rank_00/model_optim_rng.pt",
                           lambda o: (o, "iteration")),
    "neox-iteration": ("neox", "global_step0/mp_rank_00_model_states.pt",
                       lambda o: (o, "iteration")),
    "deepspeed-global_steps": ("deepspeed", "global_step0/mp_rank_00_model_states.pt",
                               lambda o: (o, "global_steps")),
    "deepspeed-lr_scheduler": ("deepspeed", "global_step0/mp_rank_00_model_states.pt",
                               lambda o: (o, "lr_scheduler")),
    "deepspeed-param_group_lr": (
        "deepspeed", "global_step0/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        lambda o: (o["optimizer_state_dict"]["base_optimizer_state"]["param_groups"][0], "lr")),
    "trainer-scheduler": ("trainer", "scheduler.pt", lambda o: (o, "last_epoch")),
    "trainer-optimizer_lr": ("trainer", "optimizer.pt", lambda o: (o["param_groups"][0], "lr")),
}


def _splice(path: Path, edit, payload: bytes) -> None:
    """Put MARKER at the value ``edit`` names, re-pickle, then swap MARKER's opcode for
    ``payload`` in data.pkl."""
    obj = torchfile.load(path, DEEPSPEED_PICKLES)
    parent, key = edit(obj)
    parent[key] = MARKER
    tmp = path.with_name(path.name + ".tmp")
    torchfile.repickle(obj, tmp)
    del obj, parent
    tmp.replace(path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    assert members[pkl].count(_str(MARKER)) == 1
    members[pkl] = members[pkl].replace(_str(MARKER), payload)
    path.unlink()
    _write_zip(path, members)


@pytest.mark.parametrize("payload", SEGFAULTING)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_inspect_and_convert_refuse_the_payload(written, tmp_path, capsys, target, payload):
    fmt, rel, edit = TARGETS[target]
    src = tmp_path / fmt
    shutil.copytree(written / fmt, src)
    _splice(src / rel, edit, PAYLOADS[payload])
    for argv in (["inspect", str(src)],
                 ["convert", str(src), str(tmp_path / "out"), "--to",
                  "megatron" if fmt == "trainer" else "hf", "--quiet"]):
        capsys.readouterr()
        t0 = time.perf_counter()
        assert main(argv) == 1, argv
        assert time.perf_counter() - t0 < 20
        err = capsys.readouterr().err.strip().splitlines()
        assert any(str(src / rel) in line and "corrupt" in line for line in err), err
        assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ laundering
@pytest.fixture(scope="module")
def deepspeed_source(written):
    return written / "deepspeed"


def _extra_model_states(src: Path) -> Path:
    return src / "global_step0" / "zero_pp_rank_1_mp_rank_00_model_states.pt"


def test_unparsed_code_pickle_is_not_laundered_into_universal(deepspeed_source, tmp_path):
    """An extra model-states file that would run code under torch.load(weights_only=False)
    stops the conversion, naming the file, instead of arriving byte for byte in DST."""
    src = tmp_path / "ds"
    shutil.copytree(deepspeed_source, src)
    extra = _write_zip(_extra_model_states(src), {
        "archive/data.pkl": b"\x80\x02" + _glob("os", "system") + _str("true") + b"\x85R.",
        "archive/version": b"3\n"})
    with pytest.raises(MapcError, match="os.system") as err:
        mapc.convert(src, tmp_path / "u", to="universal")
    assert str(extra) in str(err.value)
    assert not (tmp_path / "u").exists()


def test_model_states_are_repickled_not_copied(deepspeed_source, tmp_path):
    """A model-states file torch wrote (and an extra one) reach the universal output as mapc's
    own pickles of what mapc read: the same content, none of the source's bytes."""
    torch = pytest.importorskip("torch")
    src = tmp_path / "ds"
    shutil.copytree(deepspeed_source, src)
    main_file = src / "global_step0" / "mp_rank_00_model_states.pt"
    states = torch.load(main_file, weights_only=False)
    states["junk"] = {"note": "torch wrote this", "t": torch.arange(3.0)}
    torch.save(states, main_file)
    torch.save({"rank": 1, "t": torch.ones(2)}, _extra_model_states(src))
    mapc.convert(src, tmp_path / "u", to="universal")
    out = tmp_path / "u" / "global_step0_universal"
    for f in (main_file, _extra_model_states(src)):
        mine = out / f.name
        assert mine.read_bytes() != f.read_bytes()
        a = torch.load(mine, weights_only=True)
        b = torch.load(f, weights_only=False)
        assert a.keys() == b.keys()
        t = a["junk"]["t"] if f is main_file else a["t"]
        u = b["junk"]["t"] if f is main_file else b["t"]
        assert torch.equal(t, u)
    a = torch.load(out / main_file.name, weights_only=False)
    assert type(a["param_shapes"][0][next(iter(a["param_shapes"][0]))]) is torch.Size


# ------------------------------------------------------------------------------ wrong types
WRONG_TYPE = {
    "megatron": ("megatron", "release/mp_rank_00/model_optim_rng.pt", [1, 2]),
    "deepspeed-model_states": ("deepspeed", "global_step0/mp_rank_00_model_states.pt", [1]),
    "deepspeed-param_shapes": ("deepspeed", "global_step0/mp_rank_00_model_states.pt",
                               {"module": {}, "param_shapes": 3}),
    "deepspeed-optim_states": ("deepspeed",
                               "global_step0/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                               {"optimizer_state_dict": [1]}),
    "neox-model_states": ("neox", "global_step0/mp_rank_00_model_states.pt", "text"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPE))
def test_pt_holding_the_wrong_type_is_one_line(written, tmp_path, capsys, case):
    """A .pt whose content is well-formed but of the wrong type is named, not a traceback."""
    fmt, rel, value = WRONG_TYPE[case]
    src = tmp_path / fmt
    shutil.copytree(written / fmt, src)
    (src / rel).unlink()
    torchfile.repickle(value, src / rel)
    assert main(["inspect", str(src)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(src / rel) in err[0], err
