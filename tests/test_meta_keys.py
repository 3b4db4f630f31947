"""A spec's meta keys are checked against the keys each format's consumer reads
(compiler/metakeys.py): an invented key (which Megatron, NeoX or llama.cpp would silently
ignore) is a spec error with its position and the nearest known keys."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from mapc.compiler.metakeys import keys_of
from mapc.compiler.spec import compile_text
from mapc.errors import SpecError

SPECS = Path(__file__).parent.parent / "specs"
LLAMA = (SPECS / "llama.map").read_text()


@pytest.mark.parametrize("good, bad, hint", [
    ("        kv_channels = head_dim\n", "        kv_channel = head_dim\n", "did you mean kv_channels"),
    ("        llama.block_count = layers\n", "        llama.block_cnt = layers\n",
     "did you mean {arch}.block_count"),
    ("        no_weight_tying = not tied\n", "        no_weight_tyin = not tied\n",
     "did you mean no_weight_tying"),
], ids=["megatron", "gguf", "neox"])
def test_an_invented_meta_key_is_refused_with_position_and_nearest_keys(good, bad, hint):
    assert LLAMA.count(good) >= 1     # megatron's entry comes first (torch_dist repeats it)
    text = LLAMA.replace(good, bad, 1)
    line = text[:text.index(bad)].count("\n") + 1
    with pytest.raises(SpecError) as e:
        compile_text(text, "specs/llama.map")
    msg = str(e.value)
    key = bad.split("=")[0].strip()
    assert msg.startswith(f"specs/llama.map:{line}:9: meta key '{key}' is not a ")
    assert hint in msg
    src, caret = msg.splitlines()[-2:]
    assert src.strip() == bad.strip() and caret.index("^") == src.index(key)


def test_hf_meta_keys_are_free():
    """config.json keeps any key (transformers stores it as an attribute): not checked."""
    text = LLAMA.replace('        hidden_act = "silu"\n',
                         '        hidden_act = "silu"\n        my_own_key = 3\n')
    assert compile_text(text, "specs/llama.map")
    assert keys_of("hf") is None


def test_megatron_list_holds_every_megatron_core_transformer_config_field():
    """Newer Megatron-LM makes an argument of each TransformerConfig field: the list must not be
    older than the installed megatron-core. Its source is read as text (importing megatron.core
    takes half a minute on this machine)."""
    import importlib.util
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("megatron-core is not installed")
    root = Path(list(spec.submodule_search_locations)[0]) / "core"
    fields = set()
    for f in ("model_parallel_config.py", "transformer/transformer_config.py"):
        fields |= set(re.findall(r"^    ([a-z_][a-z_0-9]*): [^\n]*? = ", (root / f).read_text(), re.M))
    assert {"num_layers", "qk_layernorm", "num_query_groups", "q_lora_rank"} <= fields
    missing = sorted(f for f in fields if f not in keys_of("megatron"))
    assert not missing, f"regenerate compiler/metakeys/megatron.txt (scripts/meta_keys.py): {missing[:5]}"


def test_gguf_list_is_the_installed_gguf_packages_keys():
    gguf = pytest.importorskip("gguf")
    templates = set()

    def walk(cls):
        for n, v in vars(cls).items():
            if not n.startswith("_"):
                if isinstance(v, str):
                    templates.add(v)
                elif inspect.isclass(v):
                    walk(v)
    walk(gguf.Keys)
    assert set(keys_of("gguf").shown) == templates
    ks = keys_of("gguf")
    assert "llama.attention.head_count_kv" in ks and "qwen3.attention.head_count_kv" in ks
    assert "llama.attention.head_count_kvv" not in ks


@pytest.mark.parametrize("layout", ["megatron", "neox", "gguf"])
def test_every_shipped_meta_key_is_known(layout):
    """Also checked whenever a spec loads; here per spec file, so a failure names it."""
    ks = keys_of(layout)
    for path in sorted(SPECS.glob("*.map")):
        for m in re.finditer(rf"^layout {layout} \{{.*?^    meta \{{(.*?)^    \}}", path.read_text(),
                             re.S | re.M):
            for key in re.findall(r"^\s+([A-Za-z_.0-9]+) =", m.group(1), re.M):
                assert key in ks, (path.name, key)


@pytest.mark.parametrize("layout, key, ok", [
    ("megatron", "nemo.apply_embedding_scaling", True),
    ("megatron", "nemo.mcore_customization_config.query_pre_attn_scalar", True),
    ("megatron", "nemo.apply_embedding_scalin", False),      # not a NeMo 1 key in nemo.txt
    ("torch_dist", "nemo.apply_embedding_scaling", False),   # NeMo 1 does not read torch_dist
])
def test_a_reader_format_has_its_own_prefixed_keys_only_in_the_layout_it_reads(layout, key, ok):
    """compiler/metakeys.py READERS: the megatron layout, which NeMo 1 reads, takes NeMo 1's
    keys that no Megatron argument states as nemo.KEY."""
    assert (key in keys_of(layout)) is ok


def test_split_readers_keeps_prefixed_entries_out_of_the_layouts_own_metadata():
    from mapc.compiler.metakeys import split_readers
    meta = {"num_layers": 2, "nemo.name": "x", "nemo.a.b": 1, "gemma2.block_count": 2}
    assert split_readers("megatron", meta) == (
        {"num_layers": 2, "gemma2.block_count": 2}, {"nemo": {"name": "x", "a.b": 1}})
    assert split_readers("gguf", meta) == (meta, {})
