"""Writing GPT-OSS's MXFP4 release form: ``--to hf --quantize mxfp4``.

The release stores each layer's ``mlp.experts.gate_up_proj`` and ``down_proj`` as
``NAME_blocks`` (uint8 [experts, rows, K / 32, 16], two e2m1 values a byte, the first in the
low nibble) and ``NAME_scales`` (uint8 e8m0 [experts, rows, K / 32]), blocks of 32 along the
module parameter's K axis (``[experts, K, rows]``); everything else in bfloat16; config.json's
``quantization_config`` names ``quant_method: mxfp4`` and the modules left alone.

Ground truth here: the model authors' quantizer (triton_kernels' ``downcast_to_mxfp``, whose
pure-torch reference spells out the rounding: amax / 6 rounded up to a power of two, the
values rounded at the bit level, ties away from zero) re-implemented below in torch from that
reference, without mapc's code; transformers' MXFP4 loader (on CPU it dequantizes) reading
mapc's output; and an MXFP4 release made with that formula going through megatron and back.
A negative control: the reference with the nibbles of a byte swapped does not match."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

import mapc
from mapc.runtime.quantized import dequant_mxfp4, quant_mxfp4
from tests.test_gpt_oss import CONFIG, MX, TOKENS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
mx = pytest.importorskip("transformers.integrations.mxfp4")

# config.json's entry of the released gpt-oss-20b / gpt-oss-120b
RELEASE_CONFIG = {"modules_to_not_convert": ["model.layers.*.self_attn",
                                             "model.layers.*.mlp.router",
                                             "model.embed_tokens", "lm_head"],
                  "quant_method": "mxfp4"}


def authors_mxfp4(w, low_first=True):
    """(blocks, scales) of a module parameter ``w`` [..., K, N] by the authors' formula, in
    float32 along K: per 32 values, the scale is amax / 6 with its float32 bits rounded up to
    a power of two (the exponent field is the e8m0 byte); the values times the inverse scale
    (0 for a zero scale) are cut to e2m1 at the bit level: below 1 the implicit bit shifts into
    the mantissa, the exponent counts from 0.5, and the two leading mantissa bits with the
    exponent plus one half-step, halved, saturated at 7, give the magnitude code; the sign is
    bit 3. ``low_first=False`` packs the first value in the high nibble (a negative control)."""
    x = w.transpose(-1, -2).to(torch.float32).contiguous()            # [..., N, K]
    g = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = g.abs().amax(dim=-1, keepdim=True)
    pow2 = ((amax / 6.0).view(torch.int32) + 0x7FFFFF) & 0x7F800000
    scale = pow2.view(torch.float32)
    q = (g * torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)).view(torch.int32)
    sign = (q >> 31) & 1
    exp = (q >> 23) & 0xFF
    man = q & 0x7FFFFF
    shift = (126 - exp).clamp(min=0, max=31)
    man = torch.where(exp < 127, (0x400000 | (man >> 1)) >> shift, man)
    exp = (exp - 126).clamp(min=0)
    code = ((((exp << 2) | (man >> 21)) + 1) >> 1).clamp(max=7)
    nib = (code | (sign << 3)).to(torch.uint8)
    lo, hi = (nib[..., 0::2], nib[..., 1::2]) if low_first else (nib[..., 1::2], nib[..., 0::2])
    return (lo | (hi << 4)).contiguous(), (pow2 >> 23).squeeze(-1).to(torch.uint8)


def np_of(t):
    """A torch tensor as numpy (bfloat16 through ml_dtypes)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 96, 48), (96, 8), (2, 64, 3)])
def test_the_quantizer_is_the_authors_formula_bit_for_bit(shape, dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    w[..., :32, 0] = 0                                   # an all-zero block
    w[..., 32:64, -1] = -w[..., 32:64, -1].abs()         # a block with values that round to -0
    if shape[-2] >= 96:
        # every rounding tie (0.25 ... 5.0 times a block scale of 1) and its neighbours
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
        row = torch.cat([ties, -ties, ties * (1 - 2 ** -8), ties * (1 + 2 ** -7)])
        w[..., 64:96, 0] = row.to(dtype)
    blocks, scales, info = quant_mxfp4(np_of(w))
    rb, rs = authors_mxfp4(w)
    assert blocks.dtype == scales.dtype == np.uint8
    assert blocks.shape == (*shape[:-2], shape[-1], shape[-2] // 32, 16)
    assert blocks.tobytes() == rb.numpy().tobytes()
    assert scales.tobytes() == rs.numpy().tobytes()
    back = mx.convert_moe_packed_tensors(torch.from_numpy(blocks.reshape(-1, *blocks.shape[-3:])),
                                         torch.from_numpy(scales.reshape(-1, *scales.shape[-2:])),
                                         dtype=torch.float32).reshape(shape)
    assert info.size == w.numel() and info.rounded == int((back != w.float()).sum()) > 0
    # the negative control: the first value in the high nibble is not the release's order
    swapped, _ = authors_mxfp4(w, low_first=False)
    assert blocks.tobytes() != swapped.numpy().tobytes()


def test_a_dequantized_release_quantizes_back_to_its_bytes():
    """Blocks made by the formula, dequantized as transformers does, quantized again: the same
    bytes. About a quarter of such blocks have largest code 3 (their amax was 3 to 3.5 times the
    scale), whose values the formula alone would store at half the scale, codes doubled."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(4, 128, 64, generator=g) * 0.02).to(torch.bfloat16)
    rb, rs = authors_mxfp4(w)
    values = mx.convert_moe_packed_tensors(rb.reshape(4, 64, 4, 16), rs)      # [4, 128, 64]
    blocks, scales, info = quant_mxfp4(np_of(values))
    assert info.rounded == 0
    assert blocks.tobytes() == rb.numpy().tobytes() and scales.tobytes() == rs.numpy().tobytes()
    largest = torch.maximum(rb & 7, (rb >> 4) & 7).amax(dim=-1)       # code 5 is 3.0
    assert 0.1 < float((largest == 5).float().mean()) < 0.5


def test_a_block_its_values_cannot_tell_from_its_twin():
    """A block with largest code 6 and no 0.5 or 1.5 has the values of its twin at twice the
    scale (codes halved, largest 3): mapc stores the twin (the one the formula makes from
    amax 3 to 3.5 times a scale). Its values come back; its bytes are the twin's."""
    codes = torch.tensor([6.0, 4, 3, 2, 1, 0, -1, -6] * 4)
    w = (codes * 2.0 ** -6).reshape(32, 1)
    blocks, scales, info = quant_mxfp4(np_of(w))
    assert info.rounded == 0 and scales.tolist() == [[127 - 6 + 1]]
    back = dequant_mxfp4(blocks, scales).astype(np.float32)
    assert back.tobytes() == w.numpy().tobytes()


def test_quant_mxfp4_counts_what_float64_loses():
    """A float64 value is computed on in float32: what that rounds counts as rounded too."""
    w = np.full((64, 3), 1 + 2.0 ** -40, np.float64)
    blocks, scales, info = quant_mxfp4(w)
    assert (dequant_mxfp4(blocks, scales).astype(np.float64) != w).all()
    assert info.rounded == w.size and info.example == (w[0, 0], 1.0)
    assert quant_mxfp4(np.full((64, 3), 1.5, np.float64))[2].rounded == 0


def test_quant_mxfp4_refuses_what_the_release_cannot_store():
    with pytest.raises(mapc.MapcError, match=r"K a multiple of 32, not shape \[2, 48, 8\]"):
        quant_mxfp4(np.ones((2, 48, 8), np.float32))
    w = np.ones((32, 4), np.float32)
    w[3, 1] = np.nan
    with pytest.raises(mapc.MapcError, match="inf or NaN"):
        quant_mxfp4(w, where="x")


# ---- the tiny GptOss model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(root, plain bf16 state dict, reference (blocks, scales) of the experts): the plain
    save_pretrained in root/hf, and root/mx the MXFP4 release made from it by the authors'
    formula (the release's names, dtypes and quantization_config)."""
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.uniform_(-0.5, 0.5)
            elif name.endswith(MX):
                p.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(str(root / "hf"))
    sd = safetensors_torch.load_file(str(root / "hf" / "model.safetensors"))
    ref, release = {}, {}
    for name, t in sd.items():
        if name.endswith(MX):
            b, s = authors_mxfp4(t)
            ref[name] = (b, s)
            release[name + "_blocks"], release[name + "_scales"] = b, s
        else:
            release[name] = t
    (root / "mx").mkdir()
    safetensors_torch.save_file(release, str(root / "mx" / "model.safetensors"),
                                metadata={"format": "pt"})
    cfg = json.loads((root / "hf" / "config.json").read_text())
    (root / "mx" / "config.json").write_text(json.dumps(dict(cfg, quantization_config=
                                                             RELEASE_CONFIG)))
    return root, sd, ref


def assert_same_bytes(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(-1).view(torch.uint8), want[k].view(-1).view(torch.uint8)), k


def test_bf16_to_mxfp4_is_the_release_form_and_refused_without_allow_lossy(tmp_path, models,
                                                                          capsys):
    from mapc.cli.main import main
    root, _, _ = models
    argv = ["convert", str(root / "hf"), str(tmp_path / "q"), "--to", "hf",
            "--quantize", "mxfp4"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        "mapc: error: --quantize mxfp4 rounds 4 of 4 tensors (bfloat16 values not read from "
        "mxfp4 storage, e.g. model.layers.0.mlp.experts.gate_up_proj)")
    assert err.endswith("(pass --allow-lossy to accept the rounding)")
    assert main(argv + ["--allow-lossy", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "quantize: mxfp4: 4 tensors as uint8 NAME_blocks (two e2m1 values a byte) + uint8 " \
           "e8m0 NAME_scales per 32 values (0 exact, 4 rounded)" in out
    assert "lossy: --quantize mxfp4 rounds 4 of 4 tensors" in out
    assert not (tmp_path / "q").exists()
    assert main(argv + ["--allow-lossy", "-q"]) == 0
    assert "quantized 4 tensors to mxfp4: " in capsys.readouterr().err
    got = safetensors_torch.load_file(str(tmp_path / "q" / "model.safetensors"))
    assert_same_bytes(got, safetensors_torch.load_file(str(root / "mx" / "model.safetensors")))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == RELEASE_CONFIG and config["dtype"] == "bfloat16"


def test_transformers_loads_mapcs_mxfp4_output(tmp_path, models):
    """transformers' MXFP4 loader (dequantize path, as on a machine without triton kernels)
    reads mapc's output: its experts are the reference dequantization bit for bit, every
    other tensor the plain model's, and its logits those of the plain model with the
    reference-quantized experts put in (and not the plain model's)."""
    root, sd, ref = models
    mapc.convert(root / "hf", tmp_path / "q", to="hf", quantize="mxfp4", allow_lossy=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "q"), dtype=torch.float32,
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    theirs = loaded.state_dict()
    want = {k: (mx.convert_moe_packed_tensors(*ref[k], dtype=torch.float32) if k in ref else
                v.float()) for k, v in sd.items()}
    assert set(theirs) == set(want)
    for k, v in want.items():
        assert theirs[k].dtype == torch.float32 and torch.equal(theirs[k], v), k
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"),
                                                              dtype=torch.float32)
    with torch.no_grad():
        plain_logits = plain.eval()(torch.tensor(TOKENS)).logits
        params = dict(plain.named_parameters())
        for k in ref:
            params[k].copy_(want[k])
        ref_logits = plain(torch.tensor(TOKENS)).logits
        ours = loaded.eval()(torch.tensor(TOKENS)).logits
    assert torch.equal(ours, ref_logits) and not torch.equal(ours, plain_logits)


def test_mxfp4_to_mxfp4_and_through_megatron_gives_the_release_bytes(tmp_path, models):
    root, _, _ = models
    release = safetensors_torch.load_file(str(root / "mx" / "model.safetensors"))
    cp = mapc.plan_convert(root / "mx", tmp_path / "a", to="hf", quantize="mxfp4")
    cp.close()
    assert cp.write.decisions["quantize"].endswith("(4 exact, 0 rounded)")
    report = mapc.convert(root / "mx", tmp_path / "a", to="hf", quantize="mxfp4")
    assert not any("rounded" in w for w in report.warnings)
    assert_same_bytes(safetensors_torch.load_file(str(tmp_path / "a" / "model.safetensors")),
                      release)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"] == \
        RELEASE_CONFIG
    # megatron holds the bf16 values: planned as lossy, none rounds, the release's bytes
    mapc.convert(root / "mx", tmp_path / "mg", to="megatron", tp=2, ep=2)
    report = mapc.convert(tmp_path / "mg", tmp_path / "b", to="hf", quantize="mxfp4",
                          allow_lossy=True, workers=2, max_shard_bytes=20000)
    assert not any(" elements rounded" in w for w in report.warnings)
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    files = index["weight_map"]
    assert len(set(files.values())) > 2
    assert all(files[k] == files[k[:-len("_blocks")] + "_scales"] for k in files
               if k.endswith("_blocks"))
    got = {}
    for f in set(files.values()):
        got.update(safetensors_torch.load_file(str(tmp_path / "b" / f)))
    assert_same_bytes(got, release)
