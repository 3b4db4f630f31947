"""Quantized storage read dequantized: ``quantized fp8_block`` (DeepSeek-V3's fine-grained
FP8: float8_e4m3fn weights with a float32 ``_scale_inv`` per 128 x 128 block) and ``quantized
mxfp4`` (GPT-OSS: ``_blocks`` of packed e2m1 pairs with ``_scales`` e8m0 exponents per 32).

The kernels are checked bit for bit against the reference formula written out here in torch,
and against transformers' own dequantizers (``_dequantize_fp8_weight``,
``convert_moe_packed_tensors``), on shapes that are not multiples of the block. A toy spec then
reads real safetensors files written with torch: quantized, and plain with the same spec."""
from __future__ import annotations

import json

import numpy as np
import pytest

import mapc
from mapc.compiler.spec import compile_text
from mapc.errors import MapcError, SpecError
from mapc.runtime.quantized import dequant_fp8_block, dequant_mxfp4

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

FP8_SHAPES = [(200, 300), (2, 130, 260), (128, 256), (1, 1)]


def fp8_case(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(shape[:-2] + (-(-shape[-2] // 128), -(-shape[-1] // 128)), generator=g) * 3
    return w, s


def fp8_reference(w, s):
    """Per-block scale: w[..., r, c] * s[..., r // 128, c // 128], in float32."""
    rows, cols = w.shape[-2:]
    full = s.repeat_interleave(128, dim=-2)[..., :rows, :].repeat_interleave(128, dim=-1)
    return w.to(torch.float32) * full[..., :cols]


@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_fp8_block_dequantization_is_the_reference_bit_for_bit(shape):
    w, s = fp8_case(shape)
    ours = dequant_fp8_block(w.view(torch.uint8).numpy(), s.numpy())
    assert ours.dtype == np.float32 and ours.shape == shape
    assert ours.view(np.uint32).tobytes() == fp8_reference(w, s).numpy().view(np.uint32).tobytes()
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    theirs = fp8._dequantize_fp8_weight(w.clone(), s, [128, 128], torch.float32)
    assert ours.tobytes() == theirs.numpy().tobytes()


def mxfp4_case(lead=(3, 8), groups=4, lo=100, hi=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, lead + (groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(lo, hi, lead + (groups,), dtype=torch.uint8, generator=g)
    return blocks, scales


def mxfp4_reference(blocks, scales):
    """Low nibble first; e2m1 code -> value; times 2 ** (scale - 127); bfloat16; the last
    two axes swapped (rows last)."""
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()
    vals = lut[codes] * torch.pow(2.0, scales.to(torch.float64) - 127)[..., None]
    return vals.flatten(-2).to(torch.bfloat16).transpose(-1, -2).contiguous()


@pytest.mark.parametrize("lo, hi", [(100, 150), (0, 255)])
def test_mxfp4_dequantization_is_the_reference_bit_for_bit(lo, hi):
    blocks, scales = mxfp4_case(lo=lo, hi=hi)
    ours = dequant_mxfp4(blocks.numpy(), scales.numpy())
    assert ours.shape == (3, 128, 8) and str(ours.dtype) == "bfloat16"
    ref = mxfp4_reference(blocks, scales)
    assert ours.view(np.uint16).tobytes() == ref.view(torch.uint16).numpy().tobytes()
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    theirs = mx.convert_moe_packed_tensors(blocks, scales)
    assert ours.view(np.uint16).tobytes() == theirs.view(torch.uint16).numpy().tobytes()


SPEC = """\
family toyquant
match model_type: "toyquant"
config {
    rows: rows
    cols: cols
    experts: experts
}
tensors {
    w: rows cols
    moe: experts cols rows
    norm: cols
}
layout hf {
    meta { model_type = "toyquant" }
    "model.proj.weight" = w  quantized fp8_block
    "model.experts.proj" = moe  quantized mxfp4
    "model.norm.weight" = norm
}
"""
CONFIG = {"model_type": "toyquant", "rows": 130, "cols": 96, "experts": 2,
          "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}


@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "toyquant.map"
    p.write_text(SPEC)
    return p


def write(path, tensors, config=CONFIG):
    path.mkdir()
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def quantized_checkpoint(path):
    w, s = fp8_case((130, 96))
    blocks, scales = mxfp4_case(lead=(2, 130), groups=3)
    norm = torch.linspace(0.5, 1.5, 96)
    write(path, {"model.proj.weight": w, "model.proj.weight_scale_inv": s,
                 "model.experts.proj_blocks": blocks, "model.experts.proj_scales": scales,
                 "model.norm.weight": norm})
    return {"model.proj.weight": fp8_reference(w, s),
            "model.experts.proj": mxfp4_reference(blocks, scales), "model.norm.weight": norm}


def test_a_quantized_checkpoint_converts_to_its_dequantized_tensors(tmp_path, spec_file):
    want = quantized_checkpoint(tmp_path / "q")
    report = mapc.convert(tmp_path / "q", tmp_path / "out", to="hf", spec=spec_file)
    assert any("read dequantized: 1 fp8_block tensors, 1 mxfp4 tensors" in w
               for w in report.warnings)
    got = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["rows"] == 130


def test_the_same_spec_reads_the_plain_checkpoint(tmp_path, spec_file):
    want = quantized_checkpoint(tmp_path / "q")
    write(tmp_path / "plain", want, {k: v for k, v in CONFIG.items()
                                     if k != "quantization_config"})
    mapc.convert(tmp_path / "plain", tmp_path / "out", to="dcp", spec=spec_file)
    mapc.convert(tmp_path / "out", tmp_path / "back", to="hf")
    got = safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_quantized_tensor_under_a_rule_that_does_not_say_so_is_refused(tmp_path):
    quantized_checkpoint(tmp_path / "q")
    text = SPEC.replace("= moe  quantized mxfp4", "= moe  quantized fp8_block")
    (tmp_path / "bad.map").write_text(text)
    with pytest.raises(MapcError, match=r"model\.experts\.proj is stored quantized \(mxfp4\) "
                                        r"but its rule \(.*bad\.map:16:5\) says quantized "
                                        r"fp8_block"):
        mapc.convert(tmp_path / "q", tmp_path / "out", to="hf", spec=tmp_path / "bad.map")
    assert not (tmp_path / "out").exists()


def test_scales_of_the_wrong_shape_are_refused(tmp_path, spec_file):
    w, s = fp8_case((130, 96))
    blocks, scales = mxfp4_case(lead=(2, 130), groups=3)
    write(tmp_path / "q", {"model.proj.weight": w, "model.proj.weight_scale_inv": s[:1],
                           "model.experts.proj_blocks": blocks,
                           "model.experts.proj_scales": scales,
                           "model.norm.weight": torch.ones(96)})
    with pytest.raises(MapcError, match=r"model\.proj\.weight_scale_inv has shape \[1, 1\] "
                                        r"\(float32\), but a \[130, 96\] fp8 tensor in 128 x "
                                        r"128 blocks needs float32 \[2, 1\]"):
        mapc.convert(tmp_path / "q", tmp_path / "out", to="hf", spec=spec_file)


@pytest.mark.parametrize("edit, mesh, message", [
    ("= w  quantized int4", False,
     "t.map:15:30: unknown quantized storage 'int4' (known: fp8_block, mxfp4)"),
    ("= w  quantized fp8_block split rows over tp", True,
     "t.map:16:30: a quantized tensor is read whole"),
])
def test_quantized_clause_errors_are_located(edit, mesh, message):
    text = SPEC.replace("= w  quantized fp8_block", edit)
    if mesh:
        text = text.replace("layout hf {", "layout hf {\n    mesh tp")
    with pytest.raises(SpecError) as e:
        compile_text(text, "t.map")
    msg = str(e.value)
    assert msg.startswith(message)
    line, caret = msg.splitlines()[-2:]
    assert caret.index("^") == line.index("quantized")
