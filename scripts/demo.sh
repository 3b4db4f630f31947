#!/usr/bin/env bash
# A demo of mapc's main job, end to end: build a small Llama (GQA) with transformers, convert it
# to Megatron-LM at TP=2 PP=2, reshard that to TP=1 PP=4, convert back to HuggingFace, and check
# that the weights are bit-identical and the logits are the same. Output lands in demo-output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
MAPC=.venv/bin/mapc
OUT=demo-output
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1. a small Llama with grouped-query attention, saved by transformers" 
"$PY" - "$OUT/llama-hf" <<'PYEOF'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                  max_position_embeddings=256, tie_word_embeddings=False)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
print(f"   {sys.argv[1]}: {sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())/1e6:.1f}M parameters")
PYEOF

echo "== 2. HF -> Megatron-LM (megatron-core names), TP=2 PP=2"
$MAPC convert "$OUT/llama-hf" "$OUT/llama-megatron-tp2-pp2" --to megatron --tp 2 --pp 2
$MAPC inspect "$OUT/llama-megatron-tp2-pp2"
find "$OUT/llama-megatron-tp2-pp2" -name '*.pt' | sort | sed 's/^/   /'

echo "== 3. reshard Megatron TP=2 PP=2 -> TP=1 PP=4 (no flags needed: the checkpoint says what it is)"
$MAPC convert "$OUT/llama-megatron-tp2-pp2" "$OUT/llama-megatron-tp1-pp4" --to megatron --tp 1 --pp 4

echo "== 4. back to HuggingFace"
$MAPC convert "$OUT/llama-megatron-tp1-pp4" "$OUT/llama-hf-back" --to hf

echo "== 5. checks"
$MAPC verify "$OUT/llama-hf" "$OUT/llama-megatron-tp2-pp2"
$MAPC verify "$OUT/llama-hf" "$OUT/llama-hf-back"
"$PY" - "$OUT/llama-hf" "$OUT/llama-hf-back" <<'PYEOF'
import sys, torch
from transformers import AutoModelForCausalLM
tokens = torch.tensor([[1, 15, 92, 7, 404, 3, 77, 512]])
a, b = (AutoModelForCausalLM.from_pretrained(p).eval() for p in sys.argv[1:3])
with torch.no_grad():
    la, lb = a(tokens).logits, b(tokens).logits
same = torch.equal(la, lb)
print(f"   logits of the original and the round-tripped model: "
      f"{'IDENTICAL' if same else 'DIFFERENT'} (max |diff| = {(la - lb).abs().max().item():.3g})")
print(f"   next-token predictions: {la[0].argmax(-1).tolist()} vs {lb[0].argmax(-1).tolist()}")
sys.exit(0 if same else 1)
PYEOF
echo "demo ok: outputs in $OUT/"
