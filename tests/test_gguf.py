"""GGUF (llama.cpp): files mapc writes, read back with gguf's own reader; files gguf's own writer
makes (with Q/K permuted and tensors quantized here, independently of mapc) converted by mapc;
round trips; broken files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mapc
from mapc.cli.main import main
from tests.conftest import (build_transformers_model, hf_names_shapes, llama_config, logits_of,
                            write_random_hf)

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TOKENS = [1, 7, 42, 99, 3, 64, 17, 5]

CONFIGS = {
    "gqa": llama_config(hidden=64, layers=2, heads=8, groups=2),
    "mha": llama_config(hidden=64, layers=2, heads=4, groups=4),
    "mqa_head_dim": llama_config(hidden=64, layers=2, heads=4, groups=1, head_dim=32),
    "tied": llama_config(hidden=64, layers=2, heads=8, groups=2, tied=True),
}


# ---- the reference, written here from llama.cpp's conventions and LAYOUTS.md, not from mapc ----
def gguf_name(hf_name: str) -> str:
    table = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in table:
        return table[hf_name]
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"


def hf_to_meta_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF[h*hd + s*hd/2 + p] = Meta[h*hd + 2p + s], row by row."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for s in range(2):
            for p in range(hd // 2):
                out[h * hd + 2 * p + s] = w[h * hd + s * hd // 2 + p]
    return out


def meta_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for s in range(2):
            for p in range(hd // 2):
                out[h * hd + s * hd // 2 + p] = w[h * hd + 2 * p + s]
    return out


def heads_of(hf_name: str, cfg: dict) -> int | None:
    if hf_name.endswith("q_proj.weight"):
        return cfg["num_attention_heads"]
    if hf_name.endswith("k_proj.weight"):
        return cfg["num_key_value_heads"]
    return None


def write_reference_gguf(path, model, cfg, qtype=None):
    """A GGUF written by gguf's own GGUFWriter, the way llama.cpp's convert_hf_to_gguf does it;
    with ``qtype``, every 2-D weight is quantized with gguf.quants."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_string("tokenizer.ggml.model", "llama")
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue          # llama.cpp: no output.weight, the embedding is reused
        arr = tensor.numpy()
        heads = heads_of(name, cfg)
        if heads is not None:
            arr = hf_to_meta_rows(arr, heads)
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_gguf(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def load_hf(path):
    return safetensors_numpy.load_file(str(path / "model.safetensors"))


# ---- files mapc writes, read by gguf's reader ---------------------------------------------------
@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def written(request, tmp_path):
    cfg = CONFIGS[request.param]
    src = write_random_hf(tmp_path / "hf", cfg)
    mapc.convert(src, tmp_path / "out", to="gguf")
    return cfg, src, tmp_path / "out" / "model.gguf"


def test_written_metadata_values(written):
    cfg, _, path = written
    reader, _ = read_gguf(path)
    got = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    want = {
        "general.architecture": "llama",
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": float(np.float32(cfg["rms_norm_eps"])),
        "llama.vocab_size": cfg["vocab_size"],
        "llama.attention.key_length": hd,
        "llama.attention.value_length": hd,
        "tokenizer.ggml.model": "no_vocab",
    }
    assert {k: got.get(k) for k in want} == want


def test_written_metadata_has_the_types_llama_cpp_requires(written):
    _, _, path = written
    reader, _ = read_gguf(path)
    types = {k: f.types[0] for k, f in reader.fields.items()}
    t = gguf.GGUFValueType
    assert types["llama.block_count"] == t.UINT32
    assert types["llama.attention.head_count_kv"] == t.UINT32
    assert types["llama.rope.freq_base"] == t.FLOAT32
    assert types["llama.attention.layer_norm_rms_epsilon"] == t.FLOAT32
    assert types["general.architecture"] == t.STRING


def test_written_tensor_names_and_dims(written):
    cfg, _, path = written
    _, tensors = read_gguf(path)
    want = {gguf_name(n): list(reversed(s)) for n, s in hf_names_shapes(cfg).items()}
    assert {n: t.shape.tolist() for n, t in tensors.items()} == want


def test_written_tensors_are_the_hf_tensors_with_q_and_k_in_meta_order(written):
    cfg, src, path = written
    _, tensors = read_gguf(path)
    hf = load_hf(src)
    for name, arr in hf.items():
        heads = heads_of(name, cfg)
        want = arr if heads is None else hf_to_meta_rows(arr, heads)
        assert np.array_equal(tensors[gguf_name(name)].data, want), name


def test_written_record_makes_the_file_alone_convert_without_flags(written, tmp_path):
    cfg, src, path = written
    alone = tmp_path / "elsewhere.gguf"
    shutil.copy(path, alone)
    mapc.convert(alone, tmp_path / "back", to="hf")
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: back[k] for k in cfg} == cfg


@pytest.mark.parametrize("dtype,ggml", [("fp32", "F32"), ("fp16", "F16"), ("bf16", "BF16")])
def test_written_tensor_types_follow_the_dtype(tmp_path, dtype, ggml):
    src = write_random_hf(tmp_path / "hf", CONFIGS["gqa"])
    mapc.convert(src, tmp_path / "out", to="gguf", dtype=dtype)
    _, tensors = read_gguf(tmp_path / "out" / "model.gguf")
    assert {t.tensor_type.name for t in tensors.values()} == {ggml}


def test_record_longer_than_the_reserved_space_moves_the_data(tmp_path, monkeypatch):
    from mapc.runtime.containers import gguf as container
    monkeypatch.setattr(container, "RECORD_RESERVE", 16)
    src = write_random_hf(tmp_path / "hf", CONFIGS["gqa"])
    mapc.convert(src, tmp_path / "out", to="gguf")
    mapc.convert(tmp_path / "out" / "model.gguf", tmp_path / "back", to="hf")
    hf, back = load_hf(src), load_hf(tmp_path / "back")
    assert all(np.array_equal(hf[n], back[n]) for n in hf)


# ---- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_hf_gguf_hf_is_bit_exact(tmp_path, dtype, tied):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                "float16": np.float16}[dtype]
    src = write_random_hf(tmp_path / "hf", llama_config(tied=tied), dtype=np_dtype)
    mapc.convert(src, tmp_path / "gguf", to="gguf")
    mapc.convert(tmp_path / "gguf", tmp_path / "back", to="hf")
    hf, back = load_hf(src), load_hf(tmp_path / "back")
    assert set(back) == set(hf)
    for name in hf:
        assert back[name].dtype == hf[name].dtype and \
            back[name].tobytes() == hf[name].tobytes(), name


@pytest.fixture
def cli_out(tmp_path, capsys):
    src = write_random_hf(tmp_path / "hf", CONFIGS["gqa"])
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "gguf", "-q"]) == 0
    capsys.readouterr()
    return src, tmp_path / "out"


def test_cli_convert_writes_a_directory_holding_model_gguf(cli_out):
    _, out = cli_out
    assert sorted(p.name for p in out.iterdir()) == ["mapc.json", "model.gguf"]


@pytest.mark.parametrize("command,expect", [
    ("convert {out} {tmp}/back --to hf -q", ""),
    ("inspect {out}", "gguf checkpoint, family llama"),
    ("inspect {out}/model.gguf", "gguf checkpoint, family llama"),
    ("verify {src} {out}", "identical"),
], ids=["convert_back", "inspect_dir", "inspect_file", "verify"])
def test_cli_reads_what_it_wrote(cli_out, tmp_path, capsys, command, expect):
    src, out = cli_out
    argv = command.format(src=src, out=out, tmp=tmp_path).split()
    assert main(argv) == 0
    assert expect in capsys.readouterr().out


# ---- GGUF files written by gguf itself ----------------------------------------------------------
@pytest.fixture
def reference(tmp_path):
    cfg = llama_config(hidden=64, layers=2, heads=8, groups=2, ffn=96, vocab=100)
    model = build_transformers_model(cfg, tmp_path / "ref")
    return cfg, model


@pytest.mark.parametrize("as_dir", [False, True], ids=["file", "directory"])
def test_foreign_gguf_converts_to_identical_logits(tmp_path, reference, as_dir):
    torch = pytest.importorskip("torch")
    cfg, model = reference
    (tmp_path / "g").mkdir()
    path = write_reference_gguf(tmp_path / "g" / "tiny.gguf", model, cfg)
    mapc.convert(tmp_path / "g" if as_dir else path, tmp_path / "back", to="hf")
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), logits_of(model, TOKENS))


def test_foreign_gguf_config_comes_from_its_metadata(tmp_path, reference):
    cfg, model = reference
    path = write_reference_gguf(tmp_path / "tiny.gguf", model, cfg)
    mapc.convert(path, tmp_path / "back", to="hf")
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings"]
    assert {k: back[k] for k in keys} == {k: cfg[k] for k in keys}


@pytest.fixture
def tied_reference(tmp_path):
    cfg = llama_config(hidden=64, layers=2, heads=8, groups=2, tied=True)
    model = build_transformers_model(cfg, tmp_path / "ref")
    return cfg, model, write_reference_gguf(tmp_path / "tied.gguf", model, cfg)


def test_foreign_tied_gguf_converts_given_its_config(tmp_path, tied_reference):
    torch = pytest.importorskip("torch")
    cfg, model, path = tied_reference
    mapc.convert(path, tmp_path / "back", to="hf", config=cfg)
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), logits_of(model, TOKENS))


def test_foreign_tied_gguf_converts_without_flags(tmp_path, tied_reference):
    _, _, path = tied_reference
    mapc.convert(path, tmp_path / "back", to="hf")


QTYPES = ["Q8_0", "Q4_0"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_gguf_converts_to_the_dequantized_weights(tmp_path, reference, qtype):
    cfg, model = reference
    q = gguf.GGMLQuantizationType[qtype]
    path = write_reference_gguf(tmp_path / "q.gguf", model, cfg, qtype=q)
    mapc.convert(path, tmp_path / "back", to="hf")
    back = load_hf(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        arr, heads = tensor.numpy(), heads_of(name, cfg)
        if arr.ndim == 2:
            meta = arr if heads is None else hf_to_meta_rows(arr, heads)
            arr = gguf.quants.dequantize(gguf.quants.quantize(meta, q), q)
            arr = arr if heads is None else meta_to_hf_rows(arr, heads)
        assert back[name].dtype == np.float32 and np.array_equal(back[name], arr), name


# Largest |logit difference| allowed, relative to the largest |logit|. Q8_0 stores each block of
# 32 weights as int8 times one scale (absmax / 127), so a weight is off by at most 1/254 of its
# block's absmax; Q4_0 keeps 4 bits (scale absmax / 8), at most 1/16. Measured through this
# two-layer model: Q8_0 0.7%, Q4_0 18% (small random weights make Q4_0 coarse). The bounds leave
# about 2x for other seeds. Exactness is the previous test's job (weights == dequantized weights);
# this one bounds the end-to-end effect.
LOGIT_TOLERANCE = {"Q8_0": 0.015, "Q4_0": 0.35}


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_gguf_logits_within_quantization_error(tmp_path, reference, qtype):
    cfg, model = reference
    q = gguf.GGMLQuantizationType[qtype]
    path = write_reference_gguf(tmp_path / "q.gguf", model, cfg, qtype=q)
    mapc.convert(path, tmp_path / "back", to="hf")
    want = logits_of(model, TOKENS)
    got = logits_of(tmp_path / "back", TOKENS)
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= LOGIT_TOLERANCE[qtype]


# ---- broken files ---------------------------------------------------------------------------
def test_directory_with_two_gguf_files_is_refused(tmp_path):
    src = write_random_hf(tmp_path / "hf", CONFIGS["gqa"])
    mapc.convert(src, tmp_path / "out", to="gguf")
    shutil.copy(tmp_path / "out" / "model.gguf", tmp_path / "out" / "other.gguf")
    with pytest.raises(mapc.MapcError, match="expected one .gguf file, found 2"):
        mapc.convert(tmp_path / "out", tmp_path / "back", to="hf", source_format="gguf")


def truncation_points(path):
    reader, _ = read_gguf(path)
    return {"empty": 0, "magic": 2,
            "metadata": int(reader.fields["llama.block_count"].offset) + 3,
            "tensor_infos": int(reader.tensors[1].field.offset) + 5,
            "data": int(reader.tensors[-1].data_offset) + 10}


@pytest.mark.parametrize("where", ["empty", "magic", "metadata", "tensor_infos", "data"])
def test_truncated_gguf_is_an_error_naming_the_file(tmp_path, where):
    src = write_random_hf(tmp_path / "hf", CONFIGS["gqa"])
    mapc.convert(src, tmp_path / "out", to="gguf")
    good = tmp_path / "out" / "model.gguf"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:truncation_points(good)[where]])
    with pytest.raises(mapc.MapcError) as e:
        mapc.convert(bad, tmp_path / "back", to="hf")
    assert str(bad) in str(e.value)
    assert not (tmp_path / "back").exists()
