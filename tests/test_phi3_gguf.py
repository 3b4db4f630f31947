"""specs/phi3.map's gguf layout (llama.cpp's "phi3": fused attn_qkv = [q | k | v] and
ffn_up = [gate | up] rows as HF stores them, NeoX rotary order, so no q/k permutation)
against the real readers: transformers' own GGUF loader builds a Phi3ForCausalLM from mapc's
file with HF's weights bit for bit and identical logits, the gguf package reads llama.cpp's
metadata keys, and a file without mapc's record converts back to the same weights."""
from __future__ import annotations

import json

import pytest

import mapc
from mapc.errors import MapcError
from tests.conftest import build_transformers_model, logits_of
from tests.test_phi3 import CFG, TOKENS

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3gguf")
    model = build_transformers_model(CFG, root / "hf")
    mapc.convert(root / "hf", root / "gguf", to="gguf")
    return root, model, logits_of(model, TOKENS)


def test_transformers_gguf_loader_builds_the_original_model(converted):
    root, model, ref = converted
    # the file has no tokenizer: the token ids come from the test's config
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(root / "gguf"), gguf_file="model.gguf", dtype=torch.float32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    assert type(loaded).__name__ == "Phi3ForCausalLM"
    want = {k: v.float() for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert torch.equal(logits_of(loaded, TOKENS), ref)


def test_metadata_and_tensors_are_llama_cpps(converted):
    root, _, _ = converted
    r = gguf.GGUFReader(str(root / "gguf" / "model.gguf"))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "phi3"
    assert (f["phi3.block_count"], f["phi3.embedding_length"], f["phi3.feed_forward_length"],
            f["phi3.attention.head_count"], f["phi3.attention.head_count_kv"]) == (2, 32, 48, 4, 2)
    assert f["phi3.rope.dimension_count"] == 8 and f["phi3.context_length"] == 64
    assert f["phi3.rope.scaling.original_context_length"] == 64
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == [32, (4 + 2 + 2) * 8]      # ggml: fastest first
    assert shapes["blk.0.ffn_up.weight"] == [32, 2 * 48]
    assert not any(n.endswith(("attn_q.weight", "ffn_gate.weight")) for n in shapes)


def test_a_file_without_mapcs_record_converts_back_bit_exact(converted, tmp_path):
    root, _, ref = converted
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model.gguf").write_bytes((root / "gguf" / "model.gguf").read_bytes())
    mapc.convert(tmp_path / "g", tmp_path / "back", to="hf")
    assert mapc.verify(root / "hf", tmp_path / "back").identical
    assert torch.equal(logits_of(tmp_path / "back", TOKENS), ref)


def test_longrope_is_refused_in_one_line(converted, tmp_path):
    import shutil
    root, _, _ = converted
    src = tmp_path / "hf"
    shutil.copytree(root / "hf", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MapcError, match="rope_factors"):
        mapc.convert(src, tmp_path / "out", to="gguf")
    assert not (tmp_path / "out").exists()
