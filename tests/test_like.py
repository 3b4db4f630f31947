"""--like TEMPLATE: the target format, topology and naming come from an existing checkpoint."""
from __future__ import annotations

import pytest

import mapc
from mapc.cli.main import main
from tests.conftest import llama_config, tree_hash, write_random_hf


@pytest.fixture
def template(tmp_path):
    """A checkpoint 'freshly initialized on the new hardware': Megatron TP=2 PP=2 with
    Transformer-Engine names, built from other weights of the same model."""
    init = write_random_hf(tmp_path / "init", llama_config(), seed=7)
    tmpl = tmp_path / "template"
    mapc.convert(init, tmpl, to="megatron", tp=2, pp=2, set={"naming": "te"})
    return tmpl


def test_like_takes_format_topology_and_naming(tmp_path, template, capsys):
    src = write_random_hf(tmp_path / "trained", llama_config(), seed=1)
    out = tmp_path / "out"
    code = main(["convert", str(src), str(out), "--like", str(template), "-q"])
    assert code == 0, capsys.readouterr().err
    info = mapc.inspect(out)
    assert (info["format"], info["topology"], info["params"]["naming"]) == \
        ("megatron", {"tp": 2, "pp": 2}, "te")
    tmpl_info = mapc.inspect(template)
    assert [[(t["name"], t["shape"]) for t in s["tensors"]] for s in info["shards"]] == \
        [[(t["name"], t["shape"]) for t in s["tensors"]] for s in tmpl_info["shards"]]
    assert mapc.verify(src, out).identical            # filled from the source, not the template
    assert not mapc.verify(template, out).identical


def test_like_refuses_another_model_and_lists_differences(tmp_path, template, capsys):
    src = write_random_hf(tmp_path / "bigger", llama_config(ffn=128), seed=1)
    before = tree_hash(template)
    code = main(["convert", str(src), str(tmp_path / "out"), "--like", str(template)])
    err = capsys.readouterr().err
    assert code == 1
    assert "does not match the template" in err and "linear_fc1" in err and "[96, 64]" in err
    assert not (tmp_path / "out").exists() and tree_hash(template) == before


def test_like_refuses_contradicting_options(tmp_path, template, capsys):
    src = write_random_hf(tmp_path / "trained", llama_config(), seed=1)
    code = main(["convert", str(src), str(tmp_path / "out"), "--like", str(template),
                 "--tp", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "--tp 4 (the template has 2)" in err
    assert not (tmp_path / "out").exists()


def test_convert_without_target_is_refused(tmp_path, capsys):
    src = write_random_hf(tmp_path / "hf", llama_config())
    assert main(["convert", str(src), str(tmp_path / "out")]) == 1
    assert "--to FORMAT" in capsys.readouterr().err


def test_like_dry_run_prints_the_program(tmp_path, template, capsys):
    src = write_random_hf(tmp_path / "trained", llama_config(), seed=1)
    assert main(["convert", str(src), str(tmp_path / "out"), "--like", str(template),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm_weight" in out and "tp=2" in out
    assert not (tmp_path / "out").exists()


# ---- spec selection: match lines are read before a spec is compiled -----------------------------
@pytest.mark.parametrize("text,config,expected", [
    ('match model_type: "llama", "mistral"\n', {"model_type": "mistral"}, True),
    ('match model_type: "llama", "mistral"  # comment\n', {"model_type": "qwen2"}, False),
    ('match model_type: "gpt2"\n', {"architectures": ["X"]}, True),     # key absent: compile
    ('family x\n', {"model_type": "anything"}, True),                    # no match line
    ('match num_experts: 8\n', {"num_experts": 4}, False),              # numbers too
    ('match num_experts: 8\n', {"num_experts": 8}, True),
    ('family x\nmatch model_type: "a"\nlayout hf { }\nmatch model_type: "b"\n',
     {"model_type": "b"}, False),                                       # header only
    ('family x\nmatch model_type: "a"\nconfig {\nmatch model_type: "b"\n',
     {"model_type": "a"}, True),                                        # broken body: compile
    ('family x\nmatch model_type "a"\n', {"model_type": "b"}, True),   # broken header: compile
])
def test_match_lines_prefilter(text, config, expected):
    from mapc.compiler.resolve import may_match
    assert may_match(text, config) is expected


def test_resolving_compiles_only_the_matching_spec(tmp_path):
    """The match lines are read from each spec's header; only the spec that admits the
    config is compiled."""
    from mapc.compiler import spec as spec_module
    from mapc.compiler.resolve import resolve
    from mapc.runtime.containers import open_source
    src = write_random_hf(tmp_path / "hf", llama_config())
    spec_module._compile_cached.cache_clear()
    with open_source(src) as source:
        res = resolve(source)
    assert spec_module._compile_cached.cache_info().misses == 1
    assert res.spec.ir["file"].endswith(".map")
