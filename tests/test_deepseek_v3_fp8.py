"""DeepSeek-V3's FP8 hub release read through specs/deepseek_v3.map's 'quantized fp8_block'
rules. A tiny DeepseekV3ForCausalLM is quantized here as the release is: every linear weight of
the layers (attention projections, dense MLP, routed and shared experts; not the router, norms,
embedding or lm_head) as float8_e4m3fn with a float32 ``weight_scale_inv`` per 128 x 128 block
(amax / 448, the blocks at the right and bottom edges partial). Its dense MLP is 136 wide, so
those weights have two blocks along one axis and a partial one.

What mapc writes is checked against the model authors' ``weight_dequant`` (their inference
kernel: each block's fp8 values in float32 times the block's scale; their ``fp8_cast_bf16``
runs it with bfloat16 as the default dtype) re-implemented here block by block: bit for bit in
float32, and in bfloat16 with ``--dtype bf16``; transformers computes the same logits from it as
from the reference weights, and the FP8 release goes to megatron and back to the same tensors.
transformers' own loader (it dequantizes an FP8 checkpoint on a machine without a GPU) reads a
release whose weights are single blocks to the same logits."""
from __future__ import annotations

import json
import math
import re
import shutil
from math import ceil

import pytest

import mapc
from tests.conftest import build_transformers_model, logits_of
from tests.test_deepseek_v3 import CFG as BASE_CFG

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOKENS = [1, 5, 9, 3, 7, 2, 8, 4, 11, 0]
# tests/test_deepseek_v3.py's model with a 136-wide dense MLP: 128x128 blocks are partial
CFG = dict(BASE_CFG, intermediate_size=136)
# the release's config entry (DeepSeek-V3's config.json)
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]}
# the weights the release stores in FP8: the layers' linear projections (mlp.gate, the router,
# is not one)
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.\w+_proj(_with_mqa)?|"
                       r"mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight$")
BLOCK, FP8_MAX = 128, 448.0


def blocks(shape):
    """(row slice, column slice, scale index) of each 128 x 128 block of a 2-D ``shape``."""
    rows, cols = shape
    for r in range(ceil(rows / BLOCK)):
        for c in range(ceil(cols / BLOCK)):
            yield (slice(r * BLOCK, (r + 1) * BLOCK), slice(c * BLOCK, (c + 1) * BLOCK), (r, c))


def quantize(w):
    """float8_e4m3fn values and float32 scales (block amax / 448) of a 2-D float32 ``w``."""
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty((ceil(w.shape[0] / BLOCK), ceil(w.shape[1] / BLOCK)), dtype=torch.float32)
    for rs, cs, idx in blocks(w.shape):
        scale = (w[rs, cs].abs().max() / FP8_MAX).clamp(min=1e-12)
        s[idx] = scale
        q[rs, cs] = (w[rs, cs] / scale).to(torch.float8_e4m3fn)
    return q, s


def weight_dequant(q, s, dtype=torch.float32):
    """The model authors' weight_dequant: per block, float32(x) * s, stored in ``dtype``."""
    y = torch.empty(q.shape, dtype=dtype)
    for rs, cs, idx in blocks(q.shape):
        y[rs, cs] = (q[rs, cs].to(torch.float32) * s[idx]).to(dtype)
    return y


def fp8_release(src, dst):
    """``src`` (a bf16/fp32 save_pretrained) as the FP8 release stores it; returns the reference
    weights: the dequantized FP8 ones and the others unchanged."""
    dst.mkdir()
    plain = safetensors_torch.load_file(str(src / "model.safetensors"))
    stored, reference, n = {}, {}, 0
    for name, w in plain.items():
        if QUANTIZED.match(name):
            q, s = quantize(w.float())
            stored[name], stored[name + "_scale_inv"] = q, s
            reference[name] = weight_dequant(q, s)
            n += 1
        else:
            stored[name] = reference[name] = w
    safetensors_torch.save_file(stored, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (dst / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    return reference, n


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_v3_fp8")
    model = build_transformers_model(CFG, root / "plain")
    with torch.no_grad():     # the score correction bias starts at 0: make it count
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    model.save_pretrained(str(root / "plain"))
    reference, n = fp8_release(root / "plain", root / "fp8")
    return root / "fp8", reference, n, model


def test_the_fp8_release_reads_as_the_authors_dequantization_bit_for_bit(tmp_path, release):
    src, reference, n, model = release
    # 3 layers x (q_a, q_b, kv_a, kv_b, o) + dense gate/up/down + 2 MoE layers x (4 experts +
    # shared) x 3
    assert n == 15 + 3 + 2 * 5 * 3
    report = mapc.convert(src, tmp_path / "out", to="hf")
    assert any(f"read dequantized: {n} fp8_block tensors" in w for w in report.warnings)
    got = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got.keys() == reference.keys()
    for name, want in reference.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].view(-1).view(torch.uint8).tolist() == \
            want.view(-1).view(torch.uint8).tolist(), name
    # the dense MLP's weights cross a block boundary: their scales were two, not one
    wide = safetensors_torch.load_file(str(src / "model.safetensors"))
    assert list(wide["model.layers.0.mlp.down_proj.weight_scale_inv"].shape) == [1, 2]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["intermediate_size"] == 136

    # transformers computes from mapc's output what it computes from the reference weights
    # (saved by hand under the on-disk names), and the quantization did change the model
    (tmp_path / "ref").mkdir()
    safetensors_torch.save_file(reference, str(tmp_path / "ref" / "model.safetensors"),
                                metadata={"format": "pt"})
    (tmp_path / "ref" / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((src / "config.json").read_text()).items()
         if k != "quantization_config"}))
    ours = logits_of(tmp_path / "out", TOKENS)
    assert torch.equal(ours, logits_of(tmp_path / "ref", TOKENS))
    assert not torch.equal(ours, logits_of(model, TOKENS))


def test_fp8_cast_to_bf16_is_the_authors_bf16_conversion(tmp_path, release):
    """Their fp8_cast_bf16 (weight_dequant with bfloat16 as the default dtype) rounds each
    float32 product once to bfloat16: so does mapc's --dtype bf16."""
    src, _, _, _ = release
    mapc.convert(src, tmp_path / "out", to="hf", dtype="bf16")
    got = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    stored = safetensors_torch.load_file(str(src / "model.safetensors"))
    names = [k for k in stored if k.endswith("_scale_inv")]
    for scale in names:
        name = scale[:-len("_scale_inv")]
        want = weight_dequant(stored[name], stored[scale], torch.bfloat16)
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name


def test_the_fp8_release_goes_to_megatron_and_back(tmp_path, release):
    """... and back to FP8 (--quantize fp8_block): megatron holds the float32 dequantized
    values, so the planner cannot know them exact (--allow-lossy), but none rounds and the
    release's bytes come back."""
    src, reference, _, _ = release
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, ep=2)
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    got = safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    report = mapc.convert(tmp_path / "mg", tmp_path / "fp8", to="hf", quantize="fp8_block",
                          allow_lossy=True)
    assert not any(" elements rounded" in w for w in report.warnings)
    assert_bytes_equal(safetensors_torch.load_file(str(tmp_path / "fp8" / "model.safetensors")),
                       safetensors_torch.load_file(str(src / "model.safetensors")))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A release whose weights are single blocks (all dims <= 128), which transformers' own
    FP8 loader dequantizes right: (plain model dir, FP8 release dir, plain model)."""
    pytest.importorskip("accelerate")
    root = tmp_path_factory.mktemp("deepseek_v3_fp8_small")
    model = build_transformers_model(dict(CFG, intermediate_size=48, num_hidden_layers=2),
                                     root / "plain")
    fp8_release(root / "plain", root / "fp8")
    return root / "plain", root / "fp8", model


def test_transformers_own_fp8_loader_gives_the_same_logits(tmp_path, small):
    """transformers dequantizes an FP8 checkpoint itself when there is no GPU, deriving the
    block from the scales' shape: right where each weight is one block (all dims <= 128)."""
    _, release_dir, model = small
    mapc.convert(release_dir, tmp_path / "out", to="hf")
    theirs = logits_of(release_dir, TOKENS)
    assert torch.equal(logits_of(tmp_path / "out", TOKENS), theirs)
    # and the quantization mattered: the plain model's logits differ
    assert not torch.equal(logits_of(model, TOKENS), theirs)


# ---- writing the release's form: --quantize fp8_block -----------------------------------------
def assert_bytes_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(-1).view(torch.uint8), want[k].view(-1).view(torch.uint8)), k


def test_quantize_writes_the_release_form_from_the_plain_model(tmp_path, release):
    """The plain model written with --quantize fp8_block is the FP8 release made in this test
    (the authors' formula, block by block, partial blocks included), byte for byte; lossy, so
    refused without --allow-lossy; mapc reads its own FP8 output as the authors' dequant."""
    src, reference, n, _ = release
    plain = src.parent / "plain"
    with pytest.raises(mapc.MapcError, match=rf"--quantize fp8_block rounds {n} of {n} tensors"):
        mapc.convert(plain, tmp_path / "q", to="hf", quantize="fp8_block")
    report = mapc.convert(plain, tmp_path / "q", to="hf", quantize="fp8_block",
                          allow_lossy=True)
    assert any(w.startswith(f"quantized {n} tensors to fp8_block: ") for w in report.warnings)
    got = safetensors_torch.load_file(str(tmp_path / "q" / "model.safetensors"))
    assert_bytes_equal(got, safetensors_torch.load_file(str(src / "model.safetensors")))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    # re-read by mapc: the authors' dequantization of what it wrote
    mapc.convert(tmp_path / "q", tmp_path / "back", to="hf")
    assert_bytes_equal(safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors")),
                       reference)


def test_fp8_to_fp8_gives_back_the_release_bytes(tmp_path, release):
    """Read the FP8 release and write it FP8 again: exact (no --allow-lossy needed), every
    weight and scale the release's bytes."""
    src, _, n, _ = release
    cp = mapc.plan_convert(src, tmp_path / "q", to="hf", quantize="fp8_block")
    cp.close()
    assert cp.write.decisions["quantize"].endswith(f"({n} exact, 0 rounded)")
    report = mapc.convert(src, tmp_path / "q", to="hf", quantize="fp8_block")
    assert not any("rounded" in w for w in report.warnings)
    assert mapc.verify(src, tmp_path / "q").identical
    release_tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    assert_bytes_equal(safetensors_torch.load_file(str(tmp_path / "q" / "model.safetensors")),
                       release_tensors)
    # a shard limit reached right after a weight keeps its scale in its file anyway
    sizes = [(name, math.prod(shape) * (1 if dt == "float8_e4m3fn" else 4))
             for _, name, shape, dt in cp.write.tensors]
    limits = [sum(n for _, n in sizes[:k + 1]) for k, (name, _) in enumerate(sizes)
              if 0 < k < len(sizes) - 1 and sizes[k + 1][0] == name + "_scale_inv"][:3]
    for limit in limits:
        plan = mapc.plan_convert(src, tmp_path / "x", to="hf", quantize="fp8_block",
                                 max_shard_bytes=limit)
        plan.close()
        file_of = {n: f for f, group in plan.write.detail.shards for n, _, _ in group}
        assert len(set(file_of.values())) > 1
        assert all(file_of[n] == file_of[n + "_scale_inv"] for n in file_of
                   if n + "_scale_inv" in file_of), limit
    # sharded, by two worker processes: each scale in its weight's file, the same bytes
    report = mapc.convert(src, tmp_path / "w", to="hf", quantize="fp8_block", workers=2,
                          max_shard_bytes=10000)
    index = json.loads((tmp_path / "w" / "model.safetensors.index.json").read_text())
    files = index["weight_map"]
    assert report.workers == 2 and len(set(files.values())) > 2
    assert all(files[k] == files[k + "_scale_inv"] for k in files if k + "_scale_inv" in files)
    got = {}
    for f in set(files.values()):
        got.update(safetensors_torch.load_file(str(tmp_path / "w" / f)))
    assert_bytes_equal(got, release_tensors)


def test_transformers_loads_mapcs_fp8_output_as_the_reference_dequantization(tmp_path, small):
    """transformers' fine-grained FP8 loader (CPU: dequantized, here in float32) reads mapc's
    FP8 output of the plain model to the test's quantize -> the authors' weight_dequant of the
    plain weights, bit for bit, and computes the FP8 release's logits."""
    transformers = pytest.importorskip("transformers")
    plain, release_dir, _ = small
    mapc.convert(plain, tmp_path / "q", to="hf", quantize="fp8_block", allow_lossy=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"),
                                                               dtype=torch.float32).state_dict()
    source = safetensors_torch.load_file(str(plain / "model.safetensors"))
    want = {k: weight_dequant(*quantize(w.float())) if QUANTIZED.match(k) else w
            for k, w in source.items()}
    checked = 0
    for name, w in theirs.items():
        if name in want:
            ref = want[name]
        else:           # transformers 5 holds each layer's experts merged: [gate; up], down
            m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up|down)_proj$", name)
            assert m, name
            parts = ("gate", "up") if m[2] == "gate_up" else ("down",)
            ref = torch.stack([torch.cat([want[f"{m[1]}.{e}.{p}_proj.weight"] for p in parts])
                               for e in range(CFG["n_routed_experts"])])
        assert ref.dtype == w.dtype == torch.float32 and torch.equal(ref, w), name
        checked += 1
    assert checked == len(theirs) and any(QUANTIZED.match(k) for k in theirs)
    assert torch.equal(logits_of(tmp_path / "q", TOKENS), logits_of(release_dir, TOKENS))
