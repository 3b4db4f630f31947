"""GPT-OSS: attention sinks and biases, biased router and experts, HF's fused expert tensors
(gate and up interleaved along gate_up_proj's last axis), bf16 and MXFP4 releases.

One tiny transformers GptOss model (module fixture, bfloat16). Checked against transformers,
not only by round trips: the logical gate/up/down mapc reads are the ones the module computes
with (``gate_up[..., ::2]``, ``gate_up[..., 1::2]``, transposed to [out, in]); hf -> dcp -> hf
gives the same safetensors and logits; an MXFP4 checkpoint (``_blocks``/``_scales``, as the
released models) converts to the bf16 tensors transformers' ``convert_moe_packed_tensors``
gives, and the result loads with transformers' plain GptOss model to the same logits as that
model with those expert weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

import mapc
from tests.conftest import assert_same_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOKENS = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10]]
CONFIG = dict(model_type="gpt_oss", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=64, vocab_size=128,
              num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
              sliding_window=4, layer_types=["sliding_attention", "full_attention"])
MX = ("gate_up_proj", "down_proj")


def logits(path_or_model):
    m = path_or_model if not isinstance(path_or_model, str) else \
        transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    with torch.no_grad():
        return m.eval()(torch.tensor(TOKENS)).logits


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**CONFIG))
    with torch.no_grad():       # biases, sinks and norms start at 0/1: make them count
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")) or "norm" in name:
                p.uniform_(-0.5, 0.5) if "norm" not in name else p.uniform_(0.5, 1.5)
    model.to(torch.bfloat16).save_pretrained(str(root / "hf"))
    return root


def test_logical_gate_up_down_are_what_the_module_computes_with(hf):
    from mapc.compiler.resolve import resolve
    from mapc.runtime.backends import get_backend
    from mapc.runtime.containers import open_source
    from mapc.runtime.execute import Report, read_instances
    sd = safetensors_torch.load_file(str(hf / "hf" / "model.safetensors"))
    source = open_source(hf / "hf")
    try:
        res = resolve(source)
        assert res.spec.family == "gpt_oss"
        insts = [i for i in res.plan.instances if i.index == 1 and "experts" in i.rule["name"]]
        got = read_instances(insts, res.source, get_backend("numpy"), Report())
    finally:
        source.close()
    gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"]          # [E, hidden, 2 ffn]
    want = {"layer.gate[1]": gate_up[..., ::2].transpose(1, 2),       # x @ W -> [out, in]
            "layer.up[1]": gate_up[..., 1::2].transpose(1, 2),
            "layer.down[1]": sd["model.layers.1.mlp.experts.down_proj"].transpose(1, 2),
            "layer.gate_bias[1]": sd["model.layers.1.mlp.experts.gate_up_proj_bias"][..., ::2],
            "layer.up_bias[1]": sd["model.layers.1.mlp.experts.gate_up_proj_bias"][..., 1::2]}
    for key, w in want.items():
        x = np.ascontiguousarray(got[key])
        assert x.shape == tuple(w.shape), key
        assert x.view(np.uint16).tobytes() == w.contiguous().view(torch.uint16).numpy().tobytes()


def test_hf_to_dcp_and_back_is_bit_exact_with_identical_logits(hf, tmp_path):
    mapc.convert(hf / "hf", tmp_path / "dcp", to="dcp")
    assert mapc.verify(hf / "hf", tmp_path / "dcp").identical
    mapc.convert(tmp_path / "dcp", tmp_path / "back", to="hf")
    a = safetensors_torch.load_file(str(hf / "hf" / "model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["layer_types"] == CONFIG["layer_types"] and cfg["sliding_window"] == 4
    assert torch.equal(logits(str(hf / "hf")), logits(str(tmp_path / "back")))


def test_an_mxfp4_checkpoint_reads_as_transformers_dequantizes_it(hf, tmp_path):
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    sd = safetensors_torch.load_file(str(hf / "hf" / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    quant, want = {}, {}
    for name in list(sd):
        if not name.endswith(MX):
            quant[name] = sd[name]
            continue
        e, a, b = sd[name].shape                     # the parameter is [E, a, b]; MXFP4 of
        blocks = torch.randint(0, 256, (e, b, a // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 128, (e, b, a // 32), dtype=torch.uint8, generator=g)
        quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales   # its transpose
        want[name] = mx.convert_moe_packed_tensors(blocks, scales)
        assert want[name].shape == sd[name].shape
    (tmp_path / "mx").mkdir()
    safetensors_torch.save_file(quant, str(tmp_path / "mx" / "model.safetensors"))
    cfg = json.loads((hf / "hf" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "mx" / "config.json").write_text(json.dumps(cfg))

    report = mapc.convert(tmp_path / "mx", tmp_path / "out", to="hf")
    assert any("read dequantized: 4 mxfp4 tensors" in w for w in report.warnings)
    out = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out.keys() == sd.keys()
    for name in sd:
        expect = want.get(name, sd[name])
        assert out[name].dtype == expect.dtype and torch.equal(out[name], expect), name
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    # the reference model: the bf16 one with the dequantized experts put in by hand
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf / "hf"), dtype=torch.float32)
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, value in want.items():
            params[name].copy_(value.float())
    assert torch.equal(logits(ref), logits(str(tmp_path / "out")))


@pytest.mark.parametrize("fmt", ["deepspeed", "universal"])
def test_deepspeed_and_universal_keep_the_hf_tensors(hf, tmp_path, fmt):
    mapc.convert(hf / "hf", tmp_path / fmt, to=fmt)
    mapc.convert(tmp_path / fmt, tmp_path / "back", to="hf", dtype="bf16")
    a = safetensors_torch.load_file(str(hf / "hf" / "model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_megatron_at_tp2_ep2_is_megatron_cores_expert_grid(hf, tmp_path):
    """megatron-core builds GPT-OSS's biased experts only with expert tensor parallelism 1, so
    at tp=2 ep=2 its torch-format checkpoint has 2 rank files, not 4. A world of 2
    megatron-core GPTModels (local spec, add_bias_linear, softmax_type "learnable", MoE at
    ep=2 etp=1) has exactly the files, names and shapes mapc writes, and each loads its file
    with load_state_dict(strict=True); the values are checked against the layout written out
    here (HF's interleaved gate_up_proj to fc1 = [gate; up] rows); and the files convert back
    to the same tensors."""
    pytest.importorskip("megatron.core")
    import importlib.util
    from pathlib import Path
    from mapc.runtime import torchfile
    src = hf / "hf"
    mapc.convert(src, tmp_path / "mg", to="megatron", tp=2, ep=2)
    release = tmp_path / "mg" / "release"
    assert sorted(p.name for p in release.iterdir()) == ["mp_rank_00_000", "mp_rank_01_001"]
    path = Path(__file__).parent / "groundtruth" / "mcore_names.py"
    spec = importlib.util.spec_from_file_location("_groundtruth_mcore_names_gpt_oss", path)
    names = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(names)
    cfg = {"hidden": 64, "layers": 2, "heads": 4, "groups": 2, "head_dim": 16, "ffn": 64,
           "vocab": 256, "tied": False, "linear_bias": True, "qkv_bias": True,
           "softmax_type": "learnable", "experts": 4, "moe_ffn": 64, "topk": 2, "ep": 2,
           "etp": 1, "load": str(release)}
    truth = names.mcore_ranks(cfg, 2, 1)
    assert sorted(truth) == [(0, 0, 0), (1, 0, 1)]
    w = {n: v.view(torch.int16) for n, v in
         safetensors_torch.load_file(str(src / "model.safetensors")).items()}
    for (t, _, e), rank in truth.items():
        assert rank["loaded"] == f"mp_rank_{t:02d}_{e:03d}" and rank["etp_rank"] == 0
        model = torchfile.load(release / rank["loaded"] / "model_optim_rng.pt")["model"]
        assert {n: list(v.shape) for n, v in model.items()} == rank["shapes"], (t, e)
        # compared as bits (bf16)
        got = {n: torch.from_numpy(np.asarray(v).view(np.int16).copy()) for n, v in model.items()}
        pre, hl = "decoder.layers.1.", "model.layers.1."
        assert torch.equal(got[pre + "self_attention.core_attention.softmax_offset"],
                           w[hl + "self_attn.sinks"][2 * t:2 * t + 2])
        # tp rank t holds query group t: its 2 query heads' biases, then its k, then its v
        qkv_bias = torch.cat([w[hl + "self_attn.q_proj.bias"][32 * t:32 * t + 32],
                              w[hl + "self_attn.k_proj.bias"][16 * t:16 * t + 16],
                              w[hl + "self_attn.v_proj.bias"][16 * t:16 * t + 16]])
        assert torch.equal(got[pre + "self_attention.linear_qkv.bias"], qkv_bias)
        assert torch.equal(got[pre + "self_attention.linear_proj.bias"],
                           w[hl + "self_attn.o_proj.bias"])
        for k in range(2):
            x, ex = 2 * e + k, f"{pre}mlp.experts.local_experts.{k}."
            gate_up, gub = w[hl + "mlp.experts.gate_up_proj"][x], \
                w[hl + "mlp.experts.gate_up_proj_bias"][x]
            assert torch.equal(got[ex + "linear_fc1.weight"],
                               torch.cat([gate_up[:, 0::2].T, gate_up[:, 1::2].T]))
            assert torch.equal(got[ex + "linear_fc1.bias"], torch.cat([gub[0::2], gub[1::2]]))
            assert torch.equal(got[ex + "linear_fc2.weight"],
                               w[hl + "mlp.experts.down_proj"][x].T)
            assert torch.equal(got[ex + "linear_fc2.bias"],
                               w[hl + "mlp.experts.down_proj_bias"][x])
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    back = safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == w.keys() and all(torch.equal(back[k].view(torch.int16), w[k])
                                           for k in w)


def test_megatron_core_computes_transformers_logits(tmp_path):
    """mapc's Megatron file in megatron-core's GPTModel (local spec, biases, learnable softmax
    offsets, MoE with biased experts, quick_gelu GLU with offset 1 and clamp 7) computes
    transformers' logits. The model has a sliding window longer than the tokens and default
    rope: megatron-core's local attention has no window, and YaRN is not written to the args.
    A negative control exchanges two layers' sinks. The same process loads mapc's torch_dist and
    nemo2 outputs (strict dist_checkpointing.load: logits, and the loaded sinks, router biases
    and experts against the HF tensors) and saves the model as torch_dist itself, which reads
    back as the HF tensors."""
    pytest.importorskip("megatron.core")
    import importlib.util
    from pathlib import Path
    cfg = dict(CONFIG, sliding_window=16,
               rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.uniform_(-0.5, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(tmp_path / "hf"))
    ref = logits(model).numpy()
    mapc.convert(tmp_path / "hf", tmp_path / "mg", to="megatron")
    path = Path(__file__).parent / "groundtruth" / "mcore_forward.py"
    spec = importlib.util.spec_from_file_location("_groundtruth_mcore_forward_gpt_oss", path)
    forward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(forward)
    mcfg = {"hidden": 64, "layers": 2, "heads": 4, "groups": 2, "head_dim": 16, "ffn": 64,
            "vocab": 128, "tied": False, "linear_bias": True, "qkv_bias": True,
            "softmax_type": "learnable", "experts": 4, "moe_ffn": 64, "topk": 2,
            "activation": "quick_gelu", "glu_offset": 1.0, "clamp": 7.0, "rotary_base": 150000,
            "norm_eps": 1e-5}
    sinks = "decoder.layers.{}.self_attention.core_attention.softmax_offset"
    mapc.convert(tmp_path / "hf", tmp_path / "td", to="torch_dist")
    mapc.convert(tmp_path / "hf", tmp_path / "n2", to="nemo2")
    # the same world also loads mapc's torch_dist and nemo2 outputs by megatron-core's strict
    # dist_checkpointing.load, and saves the model as torch_dist itself
    ours, swapped, td, n2, _ = (np.array(x)[..., :128] for x in forward.mcore_logits(
        mcfg, tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt", TOKENS[0],
        [{}, {"swap": [sinks.format(0), sinks.format(1)]},
         {"dist": str(tmp_path / "td" / "release"), "out": str(tmp_path / "loaded.pt")},
         {"dist": str(tmp_path / "n2" / "weights"), "prefix": "module.",
          "unread": ["module.decoder.final_layernorm._extra_state",
                     "module.decoder.layers.self_attention.core_attention._extra_state"]},
         {"dist_save": str(tmp_path / "saved"), "args": {"norm_epsilon": 1e-5}}]))
    assert np.abs(ours - ref).max() <= 1e-5          # observed: 9e-8 (fp32 on CPU)
    assert np.abs(swapped - ref).max() > 1e-4
    assert np.abs(td - ref).max() <= 1e-5 and np.abs(n2 - ref).max() <= 1e-5
    # what megatron-core loaded from torch_dist, against the HF tensors taken here
    from safetensors.numpy import load_file
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    loaded = torch.load(tmp_path / "loaded.pt")
    for i in range(2):
        np.testing.assert_array_equal(
            loaded[sinks.format(i)].numpy(), w[f"model.layers.{i}.self_attn.sinks"])
        np.testing.assert_array_equal(loaded[f"decoder.layers.{i}.mlp.router.bias"].numpy(),
                                      w[f"model.layers.{i}.mlp.router.bias"])
        gate_up = w[f"model.layers.{i}.mlp.experts.gate_up_proj"]       # [E, H, 2F] interleaved
        gate_up_bias = w[f"model.layers.{i}.mlp.experts.gate_up_proj_bias"]
        for e in range(4):
            fc1 = f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1."
            np.testing.assert_array_equal(
                loaded[fc1 + "weight"].numpy(),
                np.concatenate([gate_up[e][:, ::2].T, gate_up[e][:, 1::2].T]))
            np.testing.assert_array_equal(
                loaded[fc1 + "bias"].numpy(),
                np.concatenate([gate_up_bias[e][::2], gate_up_bias[e][1::2]]))
    # hf -> torch_dist / nemo2 -> hf bit for bit, and megatron-core's own save (no mapc.json;
    # the HF config given: the harness's args do not describe GPT-OSS) reads as the HF tensors
    for kind in ("td", "n2", "saved"):
        mapc.convert(tmp_path / kind, tmp_path / f"{kind}_back", to="hf",
                     config=tmp_path / "hf" / "config.json" if kind == "saved" else None)
        assert_same_safetensors(tmp_path / "hf", tmp_path / f"{kind}_back", kind)
