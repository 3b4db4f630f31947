"""Quantized storage read dequantized: ``quantized fp8_block`` (DeepSeek-V3's fine-grained
FP8: float8_e4m3fn weights with a float32 ``_scale_inv`` per 128 x 128 block) and ``quantized
mxfp4`` (GPT-OSS: ``_blocks`` of packed e2m1 pairs with ``_scales`` e8m0 exponents per 32).

The kernels are checked bit for bit against the reference formula written out here in torch,
and against transformers' own dequantizers (``_dequantize_fp8_weight``,
``convert_moe_packed_tensors``), on shapes that are not multiples of the block. A toy spec then
reads real safetensors files written with torch: quantized, and plain with the same spec.

Writing (``--quantize fp8_block``): the quantizer against the model authors' formula written
out here per block in torch (DeepSeek-V3's README_WEIGHTS and their ``act_quant``: a block's
scale is its amax / 448 in float32, a partial block's amax that of the elements it has; the
values ``x / scale`` cast to float8_e4m3fn), and its idempotence on FP8 dequantizations; then
the option's refusals."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

import mapc
from mapc.compiler.spec import compile_text
from mapc.errors import MapcError, SpecError
from mapc.runtime.quantized import dequant_fp8_block, dequant_mxfp4, quant_fp8_block

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


# ---- writing: quant_fp8_block and --quantize ----------------------------------------------------
def authors_quantize(w):
    """Per 128 x 128 block of a 2-D float32 ``w``: scale = amax / 448 (float32), values
    (w / scale) cast to e4m3 (round to nearest even); an all-zero block gets scale 1.0."""
    rows, cols = w.shape
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty((-(-rows // 128), -(-cols // 128)), dtype=torch.float32)
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            blk = w[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
            amax = blk.abs().max()
            scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            s[r, c] = scale
            q[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128] = (blk / scale).to(torch.float8_e4m3fn)
    return q, s


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (136, 48), (1, 1), (7, 129),
                                   (2, 130, 260)])
def test_fp8_block_quantization_is_the_authors_formula_bit_for_bit(shape, dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=g) * 0.05).to(getattr(torch, dtype))
    if shape[-2] > 128 and shape[-1] > 128:
        w[..., 128:, 128:] = 0                   # an all-zero block
    x = w.numpy() if dtype == "float32" else w.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    q, s, info = quant_fp8_block(x)
    if len(shape) == 3:                          # per leading index, as 2-D tensors
        ref = [authors_quantize(m.float()) for m in w]
        rq, rs = torch.stack([a for a, _ in ref]), torch.stack([b for _, b in ref])
    else:
        rq, rs = authors_quantize(w.float())
    assert q.view(np.uint8).tobytes() == rq.view(torch.uint8).numpy().tobytes()
    assert s.dtype == np.float32 and s.tobytes() == rs.numpy().tobytes()
    back = fp8_reference(rq, rs)
    assert info.size == w.numel() and info.rounded == int((back != w.float()).sum())
    assert shape == (1, 1) or info.rounded > 0


def test_fp8_block_quantization_of_an_fp8_dequantization_gives_back_its_bytes():
    """An FP8 tensor quantized as the authors do (each block's largest value +-448) and
    dequantized: quantized again, its values and scales come back byte for byte, also where
    amax / 448 of the dequantized block is one ulp off its scale (about 1 block in 10); a
    3-D (per-expert) tensor too."""
    g = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(2)
    off = 0
    for shape in [(256, 384), (2, 200, 136)]:
        for _ in range(4):
            q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
            grid = shape[:-2] + (-(-shape[-2] // 128), -(-shape[-1] // 128))
            for r in range(grid[-2]):
                for c in range(grid[-1]):
                    q[..., r * 128, c * 128] = 448.0
            s = torch.tensor(rng.random(grid) * np.exp(rng.uniform(-20, 0, grid)),
                             dtype=torch.float32)
            w = fp8_reference(q, s)
            amax_scale = torch.stack([w[..., r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
                                      .abs().amax(dim=(-1, -2)) / 448.0
                                      for r in range(grid[-2]) for c in range(grid[-1])], -1)
            off += int((amax_scale.reshape(s.shape) != s).sum())
            q2, s2, info = quant_fp8_block(w.numpy())
            assert q2.view(np.uint8).tobytes() == q.view(torch.uint8).numpy().tobytes()
            assert s2.tobytes() == s.numpy().tobytes() and info.rounded == 0
    assert off > 0          # the case the one-ulp search is for did occur


def test_fp8_block_quantization_refuses_non_finite_values():
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.inf
    with pytest.raises(MapcError, match="inf or NaN"):
        quant_fp8_block(w, where="x.weight")


def test_fp8_block_quantization_of_a_subnormal_block_stays_in_range():
    """A block whose amax / 448 is a float32 subnormal: rounded down, that scale puts amax /
    scale past 448, which e4m3 cannot hold (the cast gives NaN); the scale is rounded up
    instead, so every value dequantizes finite, within half an e4m3 step of 448 (16 scales)."""
    tiny = np.finfo(np.float32).smallest_subnormal
    w = np.zeros((4, 4), np.float32)
    w[0, 0], w[0, 1], w[2, 3] = 448 * 2.5 * tiny, -448 * 2.5 * tiny, 7 * tiny
    q, s, info = quant_fp8_block(w)
    back = dequant_fp8_block(q, s).astype(np.float32)
    assert np.isfinite(back).all() and np.isfinite(q.astype(np.float32)).all()
    assert np.abs(back - w).max() <= 16 * s.max()
    assert info.rounded == int((back != w).sum()) and info.max_abs > 0


def test_fp8_block_quantization_counts_what_float64_loses():
    """A float64 value is computed on in float32: what that rounds counts as rounded too (it
    does not come back as its value), so --quantize does not call such a tensor exact."""
    w = np.full((3, 5), 1 + 2.0 ** -40, np.float64)
    q, s, info = quant_fp8_block(w)
    assert (dequant_fp8_block(q, s).astype(np.float64) != w).all()
    assert info.rounded == w.size and info.example == (w[0, 0], 1.0)
    q, s, info = quant_fp8_block(np.full((3, 5), 1.5, np.float64))
    assert info.rounded == 0


def plain_checkpoint(path):
    want = quantized_checkpoint(path.parent / (path.name + "-q"))
    write(path, want, {k: v for k, v in CONFIG.items() if k != "quantization_config"})
    return want


def test_quantize_writes_the_fp8_rules_and_their_scales(tmp_path, spec_file):
    want = plain_checkpoint(tmp_path / "plain")
    mapc.convert(tmp_path / "plain", tmp_path / "out", to="hf", spec=spec_file,
                 quantize="fp8_block", allow_lossy=True)
    got = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted(want) + ["model.proj.weight_scale_inv"]
    rq, rs = authors_quantize(want["model.proj.weight"])
    assert torch.equal(got["model.proj.weight"].view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(got["model.proj.weight_scale_inv"], rs)
    # the mxfp4 rule is not fp8_block's: written plain; the norm is no quantized rule
    assert torch.equal(got["model.experts.proj"], want["model.experts.proj"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3",
                                             "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}


def test_a_foreign_fp8_quantization_is_refused_where_it_would_round(tmp_path, spec_file):
    """The toy checkpoint's scales are random, its blocks' largest values not 448: quantized
    again by amax / 448, they round. Planned as exact (read from fp8_block storage), refused
    when the tensor is written, naming it; --allow-lossy writes it with a warning."""
    quantized_checkpoint(tmp_path / "q")
    with pytest.raises(MapcError, match=r"quantizing model\.proj\.weight to fp8_block is "
                                        r"not exact: \d+ of 12480 elements round"):
        mapc.convert(tmp_path / "q", tmp_path / "out", to="hf", spec=spec_file,
                     quantize="fp8_block")
    assert not (tmp_path / "out").exists()
    report = mapc.convert(tmp_path / "q", tmp_path / "out", to="hf", spec=spec_file,
                          quantize="fp8_block", allow_lossy=True)
    assert any(w.startswith("quantized 1 tensors to fp8_block: ") for w in report.warnings)


@pytest.mark.parametrize("kw, message", [
    ({}, r"--quantize fp8_block rounds 1 of 1 tensors \(float32 values not read from "
         r"fp8_block storage, e\.g\. model\.proj\.weight\).*pass --allow-lossy"),
    ({"quantize": "mxfp4"}, r"--quantize mxfp4 rounds 1 of 1 tensors \(bfloat16 values not "
                            r"read from mxfp4 storage, e\.g\. model\.experts\.proj\).*pass "
                            r"--allow-lossy"),
    ({"quantize": "int4"}, r"--quantize int4 is not a quantized storage mapc knows.*fp8_block, "
                           r"mxfp4"),
    ({"to": "dcp"}, r"--to dcp does not take --quantize fp8_block.*taken by: hf"),
    ({"with_optimizer": True}, r"--quantize fp8_block with --with-optimizer"),
])
def test_quantize_refusals(tmp_path, spec_file, kw, message):
    plain_checkpoint(tmp_path / "plain")
    args = dict(to="hf", spec=spec_file, quantize="fp8_block") | kw
    with pytest.raises(MapcError, match=message):
        mapc.convert(tmp_path / "plain", tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_quantize_needs_a_quantized_rule(tmp_path, spec_file):
    plain_checkpoint(tmp_path / "plain")
    (tmp_path / "none.map").write_text(SPEC.replace("= w  quantized fp8_block", "= w"))
    with pytest.raises(MapcError, match=r"--quantize fp8_block: layout hf of spec toyquant has "
                                        r"no rule that says 'quantized fp8_block'"):
        mapc.convert(tmp_path / "plain", tmp_path / "out", to="hf", quantize="fp8_block",
                     spec=tmp_path / "none.map", allow_lossy=True)


def test_the_dry_run_says_what_rounds(tmp_path, spec_file, capsys):
    from mapc.cli.main import main
    plain_checkpoint(tmp_path / "plain")
    assert main(["convert", str(tmp_path / "plain"), str(tmp_path / "out"), "--to", "hf",
                 "--spec", str(spec_file), "--quantize", "fp8_block", "--allow-lossy",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "quantize: fp8_block: 1 tensors as float8_e4m3fn + float32 NAME_scale_inv per " \
           "128x128 block (0 exact, 1 rounded)" in out
    assert "lossy: --quantize fp8_block rounds 1 of 1 tensors" in out
    assert not (tmp_path / "out").exists()


def refusal_of_edited_spec(tmp_path, old, new, kind) -> str:
    """The message of a --quantize KIND --allow-lossy write of the plain toy checkpoint with
    the spec edited (``old`` -> ``new``); nothing is written. Its spec is tmp_path/e.map."""
    plain_checkpoint(tmp_path / "plain")
    (tmp_path / "e.map").write_text(SPEC.replace(old, new))
    with pytest.raises(MapcError) as e:
        mapc.convert(tmp_path / "plain", tmp_path / "out", to="hf", quantize=kind,
                     spec=tmp_path / "e.map", allow_lossy=True)
    assert not (tmp_path / "out").exists()
    return str(e.value)


def test_quantize_refuses_a_quantized_rule_on_a_vector(tmp_path):
    msg = refusal_of_edited_spec(tmp_path, '"model.norm.weight" = norm',
                                 '"model.norm.weight" = norm  quantized fp8_block', "fp8_block")
    assert msg.startswith(f"{tmp_path / 'e.map'}:17:5: model.norm.weight: --quantize "
                          f"fp8_block: model.norm.weight is float32 [96]; fp8_block quantizes "
                          f"floating tensors of at least 2 axes")


def test_quantize_mxfp4_writes_the_blocks_and_scales(tmp_path, spec_file):
    """The toy layout names no modules: quantization_config is quant_method alone; the
    blocks and scales replace the tensor, beside the plain others."""
    want = plain_checkpoint(tmp_path / "plain")
    mapc.convert(tmp_path / "plain", tmp_path / "out", to="hf", spec=spec_file,
                 quantize="mxfp4", allow_lossy=True)
    got = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == ["model.experts.proj_blocks", "model.experts.proj_scales",
                           "model.norm.weight", "model.proj.weight"]
    assert got["model.experts.proj_blocks"].shape == (2, 130, 3, 16)
    assert got["model.experts.proj_scales"].shape == (2, 130, 3)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mxfp4"}


def test_quantize_mxfp4_refuses_a_let_that_is_no_module_list(tmp_path):
    msg = refusal_of_edited_spec(tmp_path, '    meta { model_type = "toyquant" }',
                                 '    meta { model_type = "toyquant" }\n'
                                 '    let mxfp4_modules_to_not_convert = 3', "mxfp4")
    assert msg.startswith(f"{tmp_path / 'e.map'}:15:5: let mxfp4_modules_to_not_convert of "
                          f"layout hf is 3, not a list of module names")
