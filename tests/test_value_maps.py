"""Value maps (``value 1 + x``): the file stores an elementwise affine map of the logical value.

A toy spec stores its norm as ``1 + x`` in GGUF (as llama.cpp does for some families). Checked:
the GGUF tensor read with the ``gguf`` package equals ``float32(w) + 1`` computed here; the way
back gives ``w`` bit for bit on every backend; a map that rounds in the stored dtype is refused
(or written with --allow-lossy and a warning); a map that is not affine or not invertible is a
spec error with file:line:col and a caret."""
from __future__ import annotations

import json

import numpy as np
import pytest

import mapc
from mapc.compiler.spec import compile_text
from mapc.errors import MapcError, SpecError

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

SPEC = """\
family toyvalue
match model_type: "toyvalue"
config {
    hidden: hidden_size
    vocab:  vocab_size
    shift:  norm_shift  default 1
}
tensors {
    embed: vocab hidden
    norm:  hidden
}
layout hf {
    meta { model_type = "toyvalue" }
    "model.embed_tokens.weight" = embed
    "model.norm.weight"         = norm
}
layout gguf {
    meta { general.architecture = "toyvalue" }
    "token_embd.weight"  = embed
    "output_norm.weight" = norm  value shift + x
}
"""


def write_src(path, norm: np.ndarray, cfg=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(
        cfg or {"model_type": "toyvalue", "hidden_size": norm.size, "vocab_size": 16}))
    rng = np.random.default_rng(0)
    safetensors_numpy.save_file(
        {"model.embed_tokens.weight": rng.standard_normal((16, norm.size)).astype(norm.dtype),
         "model.norm.weight": norm}, str(path / "model.safetensors"))
    return path


@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "toy.map"
    p.write_text(SPEC)
    return p


def gguf_tensor(path, name):
    r = gguf.GGUFReader(str(path / "model.gguf"))
    t = next(t for t in r.tensors if t.name == name)
    return t.tensor_type.name, np.array(t.data)


def read_hf(path):
    return safetensors_numpy.load_file(str(path / "model.safetensors"))


def bf16_norm(n=64, seed=1):
    """bfloat16 norm weights around 0 (as HF stores w of a ``1 + w`` norm), with values
    whose ``1 + w`` needs float32 (small and negative ones)."""
    w = np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.05
    w[:4] = [0.0, -0.0, 2.0 ** -12, -3.0]
    return w.astype(BF16)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_bf16_norm_stored_as_float32_one_plus_w_and_back_bit_exact(tmp_path, spec_file,
                                                                   backend):
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "jax": "jax"}[backend])
    w = bf16_norm()
    src = write_src(tmp_path / "src", w)
    mapc.convert(src, tmp_path / "g", to="gguf", spec=spec_file, backend=backend)
    kind, stored = gguf_tensor(tmp_path / "g", "output_norm.weight")
    assert kind == "F32"     # widened: 1 + w of a bfloat16 w needs float32
    assert stored.tobytes() == (w.astype(np.float32) + np.float32(1)).tobytes()
    _, embed = gguf_tensor(tmp_path / "g", "token_embd.weight")
    assert embed.view(np.uint16).tobytes() == \
        read_hf(src)["model.embed_tokens.weight"].view(np.uint16).tobytes()
    mapc.convert(tmp_path / "g", tmp_path / "back", to="hf", dtype="bf16", backend=backend)
    back = read_hf(tmp_path / "back")["model.norm.weight"]
    same = w.copy()
    same[1] = 0.0      # 1 + -0.0 is 1.0: the zero comes back as +0.0 (the same weight)
    assert back.dtype == BF16 and back.view(np.uint16).tobytes() == \
        same.view(np.uint16).tobytes()


def test_the_map_takes_config_symbols(tmp_path, spec_file):
    w = np.linspace(-1, 1, 9, dtype=np.float32)[:8]     # multiples of 1/4: w + 0.5 is exact
    src = write_src(tmp_path / "src", w, {"model_type": "toyvalue", "hidden_size": 8,
                                          "vocab_size": 16, "norm_shift": 0.5})
    mapc.convert(src, tmp_path / "g", to="gguf", spec=spec_file)
    assert gguf_tensor(tmp_path / "g", "output_norm.weight")[1].tolist() == (w + 0.5).tolist()
    mapc.convert(tmp_path / "g", tmp_path / "back", to="hf")
    assert read_hf(tmp_path / "back")["model.norm.weight"].tobytes() == w.tobytes()


def test_lossy_store_is_refused_then_written_with_allow_lossy(tmp_path, spec_file):
    w = bf16_norm()
    src = write_src(tmp_path / "src", w)
    with pytest.raises(MapcError) as e:
        mapc.convert(src, tmp_path / "g", to="gguf", spec=spec_file, dtype="bf16")
    msg = str(e.value)
    assert "toy.map:20:34) storing output_norm.weight in bfloat16 is not exact" in msg
    assert msg.startswith("value map 'shift + x' (")
    assert "--allow-lossy" in msg and "--dtype fp32" in msg
    assert not (tmp_path / "g").exists()        # nothing half-written
    report = mapc.convert(src, tmp_path / "g", to="gguf", spec=spec_file, dtype="bf16",
                          allow_lossy=True)
    assert any("written rounded (--allow-lossy)" in x for x in report.warnings)
    kind, stored = gguf_tensor(tmp_path / "g", "output_norm.weight")
    want = (w.astype(np.float64) + 1).astype(BF16)
    assert kind == "BF16" and stored.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()


def test_float32_values_whose_map_rounds_are_refused(tmp_path, spec_file):
    w = np.full(8, 1e-30, dtype=np.float32)      # 1 + 1e-30 is 1.0 in float32
    src = write_src(tmp_path / "src", w)
    with pytest.raises(MapcError, match=r"8 of 8 elements round \(e\.g\. 1e-30 comes back "
                                        r"as 0\)"):
        mapc.convert(src, tmp_path / "g", to="gguf", spec=spec_file)


def test_reading_a_map_that_rounds_is_refused(tmp_path, spec_file):
    # a GGUF storing 1 + x = 1e-10: x = 1e-10 - 1 is -1.0 in float32, and 1 + (-1.0) != 1e-10
    w = np.zeros(8, dtype=np.float32)
    src = write_src(tmp_path / "src", w)
    mapc.convert(src, tmp_path / "g", to="gguf", spec=spec_file, set=None)
    path = tmp_path / "g" / "model.gguf"
    data = bytearray(path.read_bytes())
    one = np.float32(1).tobytes() * 8
    at = bytes(data).rindex(one)
    data[at:at + 32] = np.full(8, 1e-10, dtype=np.float32).tobytes()
    path.write_bytes(bytes(data))
    assert gguf_tensor(tmp_path / "g", "output_norm.weight")[1][0] == np.float32(1e-10)
    with pytest.raises(MapcError, match=r"reading output_norm\.weight in float32 is not exact"):
        mapc.convert(tmp_path / "g", tmp_path / "back", to="hf")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("direction", ["store", "load"])
def test_integer_tensors_are_refused(direction):
    from mapc.compiler.values import ValueMap
    from mapc.runtime import values
    from mapc.runtime.backends import get_backend
    from mapc.runtime.execute import Report
    vm = ValueMap(1.0, 1.0, "1 + x", "t.map:1:1")
    x = np.arange(8, dtype=np.int32)
    with pytest.raises(MapcError, match="needs floating values"):
        if direction == "store":
            values.store(get_backend("numpy"), vm, x, "int32", "t", Report())
        else:
            values.load(vm, x, "t", Report())


def test_program_printout_and_ir_name_the_map(spec_file):
    program = mapc.compile_spec(spec_file, layout="gguf", config={
        "model_type": "toyvalue", "hidden_size": 8, "vocab_size": 16})
    assert "  output_norm.weight [8] = R1(norm)  # value shift + x" in program.pretty()
    rule = mapc.compile_spec(spec_file).layout("gguf")["rules"][1]
    assert rule["value"] == {"expr": ["op", "+", ["sym", "shift"], ["sym", "x"]],
                             "scale": ["op", "+", ["num", 0], ["num", 1]],
                             "offset": ["op", "+", ["sym", "shift"], ["num", 0]],
                             "at": rule["value"]["at"]}
    assert "value" not in mapc.compile_spec(spec_file).layout("gguf")["rules"][0]


def test_ir_with_a_value_map_validates_against_the_schema(spec_file):
    jsonschema = pytest.importorskip("jsonschema")
    from tests.test_language import schema
    jsonschema.validate(mapc.compile_spec(spec_file).ir, schema())


def spec_error(clause: str) -> str:
    with pytest.raises(SpecError) as e:
        compile_text(SPEC.replace("value shift + x", clause), "t.map")
    return str(e.value)


@pytest.mark.parametrize("clause, message", [
    ("value x * x", "t.map:20:34: value map 'x * x' is not affine in x"),
    ("value 1 / x", "t.map:20:34: value map '1 / x' is not affine in x"),
    ("value max(x, 1)", "t.map:20:34: value map 'max(x, 1)' is not affine in x"),
    ("value shift + 1", "t.map:20:34: value map 'shift + 1' does not use x"),
])
def test_a_map_that_is_not_affine_in_x_is_a_located_spec_error(clause, message):
    msg = spec_error(clause)
    assert msg.startswith(message)
    line, caret = msg.splitlines()[-2:]
    assert line.strip() == f'"output_norm.weight" = norm  {clause}'
    assert caret.index("^") == line.index("value")


def test_a_syntax_error_in_the_map_is_located():
    msg = spec_error("value x +")
    assert msg.startswith("t.map:21:1: unexpected '}'")


@pytest.mark.parametrize("clause", ["value shift * x - 1", "value (x - 1) * (shift - 1)"])
def test_a_map_of_scale_zero_is_refused_when_planned(spec_file, clause):
    text = SPEC.replace("value shift + x", clause)
    cfg = {"model_type": "toyvalue", "hidden_size": 8, "vocab_size": 16, "norm_shift": 0 if
           clause.startswith("value shift") else 1}
    from mapc.compiler.plan import bind_config, plan_layout
    sp = compile_text(text, "t.map")
    with pytest.raises(SpecError, match=r"t\.map:20:34: value map .* not invertible"):
        plan_layout(sp, "gguf", bind_config(sp, cfg))


@pytest.mark.parametrize("clause, x, y", [
    ("value 1 + x", 0.25, 1.25),
    ("value x - 1", 0.25, -0.75),
    ("value 2 * x + 1", 0.25, 1.5),
    ("value -x", 0.25, -0.25),
    ("value (x + 1) / 2", 0.5, 0.75),
    ("value shift * (1 - x)", 0.25, 0.75),
])
def test_affine_forms(clause, x, y):
    from mapc.compiler.values import plan_value
    sp = compile_text(SPEC.replace("value shift + x", clause), "t.map")
    vm = plan_value(sp.layout("gguf")["rules"][1], {"shift": 1, "hidden": 8, "vocab": 16})
    assert vm.scale * x + vm.offset == y
