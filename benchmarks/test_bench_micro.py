"""Micro benchmarks (pytest-benchmark): a ~20 MB Llama-shaped bf16 HF checkpoint to Megatron
tp2 pp2 and back, in process. Run with ``pytest benchmarks/`` (the main suite is ``tests/``).

    pytest benchmarks/ --benchmark-columns=min,median,max,rounds
    pytest benchmarks/ --benchmark-json=micro.json        # machine-readable

Each benchmark converts into a fresh directory per round (made by ``pedantic``'s setup, not
timed); the round trip is checked bit for bit afterwards (not timed).
"""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

import mapc

pytest.importorskip("pytest_benchmark")

_spec = importlib.util.spec_from_file_location(
    "mapc_bench_convert", Path(__file__).with_name("bench_convert.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SIZE_BYTES = 20e6
ROUNDS = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The generated HF checkpoint and its Megatron tp2 pp2 conversion (built once)."""
    root = tmp_path_factory.mktemp("micro")
    hf = root / "hf"
    layers = bench.layers_for_size(SIZE_BYTES, bench.TINY)
    bench.write_llama_checkpoint(hf, layers, bench.TINY, max_shard_bytes=8 * 10**6)
    mg = root / "mg"
    mapc.convert(hf, mg, to="megatron", tp=2, pp=2, quiet=True)
    return {"root": root, "hf": hf, "mg": mg, "bytes": bench.dir_bytes(hf), "layers": layers}


def _fresh(root: Path, prefix: str):
    counter = itertools.count()

    def setup():
        return (root / f"{prefix}-{next(counter)}",), {}
    return setup


def test_generated_checkpoint_shape(checkpoints):
    hf = checkpoints["hf"]
    assert 15e6 < checkpoints["bytes"] < 25e6
    assert (hf / "model.safetensors.index.json").is_file()
    assert len(list(hf.glob("model-*-of-*.safetensors"))) > 1
    from safetensors import safe_open
    names = set()
    for f in hf.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            names |= set(st.keys())
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight"} <= names


def test_hf_to_megatron_tp2_pp2(benchmark, checkpoints):
    root = checkpoints["root"] / "to-mg"
    root.mkdir()

    def run(dst):
        return mapc.convert(checkpoints["hf"], dst, to="megatron", tp=2, pp=2, quiet=True)
    benchmark.extra_info["source_bytes"] = checkpoints["bytes"]
    report = benchmark.pedantic(run, setup=_fresh(root, "mg"), rounds=ROUNDS, iterations=1,
                                warmup_rounds=1)
    assert report.bytes_written > 0.9 * checkpoints["bytes"]
    last = sorted(root.iterdir())[-1]
    assert mapc.verify(checkpoints["hf"], last).identical


def test_megatron_tp2_pp2_to_hf(benchmark, checkpoints):
    root = checkpoints["root"] / "to-hf"
    root.mkdir()

    def run(dst):
        return mapc.convert(checkpoints["mg"], dst, to="hf", quiet=True)
    benchmark.extra_info["source_bytes"] = checkpoints["bytes"]
    report = benchmark.pedantic(run, setup=_fresh(root, "hf"), rounds=ROUNDS, iterations=1,
                                warmup_rounds=1)
    assert report.bytes_written > 0.9 * checkpoints["bytes"]
    last = sorted(root.iterdir())[-1]
    assert mapc.verify(checkpoints["hf"], last).identical


# ---- spec selection: reading a spec's match lines (its header) against compiling it ---------------
def _spec_text():
    from mapc.compiler.spec import builtin_specs
    path = sorted(builtin_specs().values())[0]
    return path, path.read_text()


def test_match_header_parse(benchmark):
    """What compiler/resolve.py pays per shipped spec to skip one that cannot match."""
    from mapc.compiler import spec as spec_module
    _, text = _spec_text()

    def run():
        spec_module._match_rules_cached.cache_clear()
        return spec_module.match_rules(text)
    assert benchmark(run)


def test_spec_compile(benchmark):
    """What it saves: compiling the same spec (parse, lower, check), uncached."""
    from mapc.compiler import spec as spec_module
    path, _ = _spec_text()

    def run():
        spec_module._compile_cached.cache_clear()
        return spec_module.load_spec(path)
    assert benchmark(run).family
