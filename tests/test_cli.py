"""The mapc command, run in-process: outputs, exit codes, and bad input handled cleanly."""
from __future__ import annotations

import json
import os
import zipfile

import pytest

from mapc.cli.main import main
from tests.conftest import llama_config, tree_hash, write_random_hf


@pytest.fixture
def hf(tmp_path):
    return write_random_hf(tmp_path / "hf", llama_config(vocab=100))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_inspect_verify(tmp_path, hf, capsys):
    mg = tmp_path / "mg"
    code, out, err = run(capsys, "convert", hf, mg, "--to", "megatron", "--tp", "2", "--pp",
                         "2", "--json")
    assert code == 0, err
    assert json.loads(out)["tensors"] == 54
    code, out, _ = run(capsys, "inspect", mg, "--json")
    info = json.loads(out)
    assert (info["format"], info["family"], info["topology"]) == \
        ("megatron", "llama", {"tp": 2, "pp": 2})
    assert info["config"]["vocab"] == 100 and info["params"]["naming"] == "local"
    code, out, _ = run(capsys, "verify", hf, mg)
    assert code == 0 and out.startswith("identical: 39 tensors")


def test_verify_reports_per_tensor_difference(tmp_path, hf, capsys):
    other = write_random_hf(tmp_path / "other", llama_config(vocab=100), seed=1)
    code, out, _ = run(capsys, "verify", hf, other)
    assert code == 1
    assert out.startswith("DIFFERENT: 39 of 39 tensors differ")
    assert "layer.q[0]" in out and "max |a-b|" in out


def test_existing_destination_is_refused_unless_force(tmp_path, hf, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    code, _, err = run(capsys, "convert", hf, dst, "--to", "megatron")
    assert code == 1
    assert err.strip().count("\n") == 0 and "already exists" in err and "--force" in err
    assert (dst / "keep").exists()
    code, _, err = run(capsys, "convert", hf, dst, "--to", "megatron", "--force", "-q")
    assert code == 0 and not (dst / "keep").exists()
    assert (dst / "latest_checkpointed_iteration.txt").exists()


def test_destination_inside_source_is_refused(hf, capsys):
    before = tree_hash(hf)
    code, _, err = run(capsys, "convert", hf, hf / "out", "--to", "megatron")
    assert code == 1 and "overlaps the source" in err
    assert tree_hash(hf) == before


def test_truncated_safetensors_is_a_clear_error_and_nothing_is_written(tmp_path, hf, capsys):
    f = hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run(capsys, "convert", hf, tmp_path / "out", "--to", "megatron")
    assert code == 1
    assert "truncated" in err and "model.safetensors" in err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_pickled_code_is_never_run(tmp_path, hf, capsys):
    mg = tmp_path / "mg"
    assert main([str(hf), str(mg), "--to", "megatron", "-q"][:0] + ["convert", str(hf),
                str(mg), "--to", "megatron", "-q"]) == 0
    f = mg / "release" / "mp_rank_00" / "model_optim_rng.pt"
    marker = tmp_path / "pwned"
    payload = (b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"\x85R.")
    with zipfile.ZipFile(f) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = payload
    with zipfile.ZipFile(f, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    code, _, err = run(capsys, "convert", mg, tmp_path / "back", "--to", "hf")
    assert code == 1
    assert "os.system" in err
    assert not marker.exists()


def test_unknown_layout_parameter_and_bad_value(tmp_path, hf, capsys):
    code, _, err = run(capsys, "convert", hf, tmp_path / "o", "--to", "megatron", "--set",
                       "nameing=te")
    assert code == 1 and "has no parameter nameing" in err and "naming" in err
    code, _, err = run(capsys, "convert", hf, tmp_path / "o", "--to", "megatron", "--set",
                       "naming=fancy")
    assert code == 1 and "naming must be one of 'local', 'te', 'legacy'" in err


def test_hf_target_has_no_tensor_parallel_axis(tmp_path, hf, capsys):
    code, _, err = run(capsys, "convert", hf, tmp_path / "o", "--to", "hf", "--tp", "2")
    assert code == 1 and "layout hf has no tp axis" in err


def test_dtype_cast_and_dry_run(tmp_path, hf, capsys):
    code, out, _ = run(capsys, "convert", hf, tmp_path / "plan", "--to", "megatron", "--tp",
                       "2", "--dry-run")
    assert code == 0 and "program llama" in out and not (tmp_path / "plan").exists()
    code, _, err = run(capsys, "convert", hf, tmp_path / "bf", "--to", "hf", "--dtype", "bf16",
                       "-q")
    assert code == 0
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    code, out, _ = run(capsys, "verify", hf, tmp_path / "bf")
    assert code == 1 and "(float32 vs bfloat16)" in out


def test_missing_config_key_names_the_symbol(tmp_path, capsys):
    cfg = llama_config()
    del cfg["intermediate_size"]
    src = write_random_hf(tmp_path / "hf", llama_config())
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "convert", src, tmp_path / "o", "--to", "megatron")
    assert code == 1 and "intermediate_size" in err


def test_compile_prints_ir_and_program(tmp_path, capsys):
    code, out, _ = run(capsys, "compile", "llama", "--json")
    assert code == 0 and json.loads(out)["family"] == "llama"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(llama_config()))
    code, out, _ = run(capsys, "compile", "llama", "--layout", "megatron", "--config", cfg,
                       "--tp", "2", "--pp", "2")
    assert code == 0 and "shard tp=1 pp=1:" in out
    code, _, err = run(capsys, "compile", "nosuch")
    assert code == 1 and "no spec named 'nosuch'" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2


def test_unknown_model_type_is_refused_not_guessed(tmp_path, capsys):
    cfg = llama_config()
    cfg["model_type"] = "no-such-family"
    src = write_random_hf(tmp_path / "hf", llama_config())
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "convert", src, tmp_path / "o", "--to", "megatron")
    assert code == 1 and "no shipped spec describes model_type 'no-such-family'" in err


def test_tensors_the_spec_does_not_place_are_an_error_not_a_silent_drop(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file
    src = write_random_hf(tmp_path / "hf", llama_config())
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.norm.weight"][:64]
    save_file(tensors, str(src / "model.safetensors"))
    code, _, err = run(capsys, "convert", src, tmp_path / "o", "--to", "megatron")
    assert code == 1 and "does not place" in err and "q_proj.bias" in err
    assert "would drop them" in err
    code, _, err = run(capsys, "verify", src, src)
    assert code == 1 and "does not place" in err
