"""The real NeMo 2 (tests/groundtruth/nemo_real.py, installed by scripts/setup.sh into
$VENV/nemo): NeMo's own checkpoint of a tiny Llama reads in mapc, and mapc's ``nemo2`` output
loads in NeMo through its ``io.json``. Skipped when NeMo is not installed."""
from __future__ import annotations

import json

import numpy as np
import pytest

import mapc
from tests.groundtruth import nemo_real

pytestmark = pytest.mark.skipif(not nemo_real.available(),
                                reason=f"NeMo 2 is not installed in {nemo_real.nemo_dir()} "
                                       f"(scripts/setup.sh installs it)")

CFG = dict(layers=2, hidden=64, ffn=128, heads=4, groups=2, max_positions=128, vocab=96,
           norm_eps=1e-5, rope_theta=10000.0, tied=False)
TOKENS = [1, 5, 9, 33, 2, 7, 95, 0]


@pytest.fixture(scope="session")
def nemo_run(tmp_path_factory):
    """NeMo saves a seeded tiny Llama (truth: its live tensors and logits); mapc converts that
    checkpoint to HF and the HF model back to nemo2 (--tp 2); NeMo loads mapc's output with the
    loader of llm.export_ckpt (truth2)."""
    torch = pytest.importorskip("torch")
    base = tmp_path_factory.mktemp("nemo_real")
    ckpt = nemo_real.save(base / "nemo", CFG, base / "truth", TOKENS)
    mapc.convert(ckpt, base / "hf", to="hf")
    mapc.convert(base / "hf", base / "mapc_nemo2", to="nemo2", tp=2)
    nemo_real.load(base / "mapc_nemo2", base / "truth2", TOKENS)
    return torch, base


def test_nemo_checkpoint_reads_as_the_hf_model(nemo_run):
    """NeMo's own save (weights/ by MegatronCheckpointIO, context/model.yaml and io.json by
    io_dump; no mapc.json) is detected, its config read from model.yaml, and the HF model mapc
    writes gives NeMo's logits (transformers vs megatron-core's forward in NeMo's model)."""
    torch, base = nemo_run
    import transformers
    assert not (base / "nemo" / "mapc.json").exists()
    assert (base / "nemo" / "context" / "io.json").is_file()
    hf = json.loads((base / "hf" / "config.json").read_text())
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"],
            hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"],
            hf["rms_norm_eps"]) == (2, 64, 128, 4, 2, 96, 1e-5)
    model = transformers.AutoModelForCausalLM.from_pretrained(base / "hf", dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits
    want = torch.load(base / "truth" / "logits.pt")
    assert want.shape == logits.shape
    assert torch.allclose(logits, want, rtol=1e-5, atol=1e-6), (logits - want).abs().max()


def test_nemo_loads_mapc_output_bit_for_bit(nemo_run):
    """io.load_context builds the model from mapc's io.json (GPTModel / GPTConfig with the
    checkpoint's sizes), dist_checkpointing.load fills it from weights/ (strict: no key missing),
    and every tensor equals what NeMo saved, bit for bit; so do the logits."""
    torch, base = nemo_run
    cfg = json.loads((base / "truth2" / "config.json").read_text())
    assert cfg["model_class"] == "nemo.collections.llm.gpt.model.base.GPTModel"
    assert cfg["activation_func"] == "torch.nn.functional.silu"
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["ffn_hidden_size"],
            cfg["num_attention_heads"], cfg["num_query_groups"], cfg["vocab_size"],
            cfg["normalization"], cfg["gated_linear_unit"],
            cfg["share_embeddings_and_output_weights"]) == \
        (2, 64, 128, 4, 2, 96, "RMSNorm", True, False)
    a = torch.load(base / "truth" / "live.pt")
    b = torch.load(base / "truth2" / "live.pt")
    assert a.keys() == b.keys() and len(a) == 15
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert torch.equal(torch.load(base / "truth" / "logits.pt"),
                       torch.load(base / "truth2" / "logits.pt"))
    assert np.isfinite(a["embedding.word_embeddings.weight"].numpy()).all()
