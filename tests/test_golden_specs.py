"""Golden recipes of every shipped spec: each layout (and each choice of its enumerated
parameters) compiled from hf for one small config, its recipes printed. Any change to what a
shipped spec compiles to (member order in a fusion, an axis order, a split) shows up here in
review. Regenerate with MAPC_UPDATE_GOLDEN=1 after checking the difference is intended."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

import mapc
from mapc.compiler.spec import builtin_specs, load_spec
from mapc.errors import MapcError
from tests.conftest import llama_config

GOLDEN = Path(__file__).parent / "golden" / "specs"

# One small config per shipped spec, divisible by tp=2, pp=2, ep=2.
CONFIGS = {
    "llama": llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=50),
    "qwen2": dict(llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=50),
                  model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(llama_config(hidden=32, layers=2, heads=4, groups=2, head_dim=16, ffn=48,
                               vocab=50), model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
    "phi3": dict(llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=50),
                 model_type="phi3", architectures=["Phi3ForCausalLM"]),
    "mixtral": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50,
                "num_local_experts": 4, "num_experts_per_tok": 2,
                "max_position_embeddings": 64},
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=48,
                      moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                      mlp_only_layers=[0], vocab_size=50, max_position_embeddings=64),
    "deepseek_v3": dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                        hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        vocab_size=50, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        n_group=2, topk_group=1, max_position_embeddings=64),
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32,
             "n_layer": 2, "n_head": 4, "n_inner": None, "vocab_size": 50, "n_positions": 64,
             "tie_word_embeddings": True},
    "gpt_neox": {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
                 "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 48, "vocab_size": 50, "rotary_pct": 0.5,
                 "use_parallel_residual": True, "tie_word_embeddings": False,
                 "max_position_embeddings": 64},
    "gemma2": {"model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "intermediate_size": 48, "vocab_size": 50, "max_position_embeddings": 64},
    "gemma3": {"model_type": "gemma3_text", "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "intermediate_size": 48, "vocab_size": 50, "max_position_embeddings": 64},
    "gpt_oss": {"model_type": "gpt_oss", "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "intermediate_size": 48, "vocab_size": 50, "num_local_experts": 4,
                "max_position_embeddings": 64},
}
# Specs of stored tensors (``NAME: *``, generic mode) are planned for a checkpoint's own
# tensors, not a config: (name, shape) of a small module's state dict, odd and 0-d shapes.
STORED = {
    "generic": [("embed.weight", (5, 3)), ("conv.weight", (3, 3, 2)), ("conv.bias", (3,)),
                ("bn.num_batches_tracked", ())],
}
# Boolean parameters whose non-default value selects other rules.
EXTRA_SETS = {"fuse_qkv": ["fuse_qkv=true"]}


def variants(layout: dict) -> list[list[str]]:
    """Every combination of the layout's enumerated parameter choices, plus the extra sets."""
    axes = [[f"{p['name']}={c}" for c in p["choices"]] for p in layout["params"]
            if len(p["choices"]) > 1]
    out = [list(combo) for combo in itertools.product(*axes)]
    for p in layout["params"]:
        for extra in EXTRA_SETS.get(p["name"], []):
            out += [list(combo) + [extra] for combo in itertools.product(*axes)]
    return out


def stored_recipes_text(family: str) -> str:
    from mapc.compiler.plan import plan_layout, stored_inventory
    from mapc.compiler.program import compile_program
    spec = load_spec(family)
    lines = []
    for lay in spec.ir["layouts"]:
        env = stored_inventory(spec, lay["name"], STORED[family])
        lines.append(f"== {lay['name']}")
        text = compile_program(plan_layout(spec, lay["name"], env),
                               plan_layout(spec, lay["name"], env)).pretty()
        lines += [x for x in text.split("\nshard ")[0].splitlines()[3:] if x]
    return "\n".join(lines) + "\n"


def recipes_text(family: str) -> str:
    if family in STORED:
        return stored_recipes_text(family)
    spec = load_spec(family)
    lines = []
    for lay in spec.ir["layouts"]:
        # etp (expert tensor parallel) is no topology argument: it defaults to tp
        topo = {a: 2 for a in lay["mesh"] if a != "etp"}
        for sets in variants(lay):
            head = f"== {lay['name']} {' '.join(f'{a}={n}' for a, n in topo.items())} " \
                   f"{' '.join(sets)}".rstrip()
            lines.append(head)
            try:
                text = mapc.compile_spec(family, layout=lay["name"], config=CONFIGS[family],
                                         set=sets, **topo).pretty()
            except MapcError as e:
                lines.append(f"  refused: {str(e).splitlines()[0]}")
                continue
            body = text.split("\nshard ")[0].splitlines()[3:]
            lines += [x for x in body if x]
            # value maps are the rule's, not the recipe's: the first shard's mapped tensors
            first = text.split("\nshard ")[1].splitlines()[1:] if "\nshard " in text else []
            lines += [f"  value-mapped: {x.strip()}" for x in first if "  # value " in x]
    return "\n".join(lines) + "\n"


def test_every_shipped_spec_has_a_golden_config():
    assert sorted(CONFIGS | STORED) == sorted(builtin_specs())


@pytest.mark.parametrize("family", sorted(CONFIGS | STORED))
def test_shipped_spec_recipes_match_golden(family):
    text = recipes_text(family)
    path = GOLDEN / f"{family}.txt"
    if os.environ.get("MAPC_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()
