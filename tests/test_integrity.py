"""The spec that wrote an output travels in its record: re-conversion needs no flags even for a
user's own spec, and a spec that differs from the recorded one (by sha256) is refused unless
--allow-spec-change (issue #12: a spec with [gate up] swapped converted back with exit 0)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mapc
from mapc.cli.main import main
from mapc.errors import MapcError
from tests.conftest import llama_config, write_random_hf

LLAMA = (Path(__file__).parent.parent / "specs" / "llama.map").read_text()
FC1 = "as ([gate up] ffn) hidden  split ffn over tp  if naming != \"legacy\""
CFG = llama_config(hidden=32, layers=2, heads=4, groups=2, ffn=48, vocab=50)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "hf"
    write_random_hf(path, CFG)
    return path


@pytest.fixture(scope="module")
def mg(hf):
    """hf -> megatron tp=2 with the shipped spec."""
    out = hf.parent / "mg"
    mapc.convert(hf, out, to="megatron", tp=2)
    return out


def swapped_spec(tmp_path) -> Path:
    assert LLAMA.count(FC1) == 1
    p = tmp_path / "swapped.map"
    p.write_text(LLAMA.replace(FC1, FC1.replace("[gate up]", "[up gate]")))
    return p


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_the_record_carries_the_spec_text(mg):
    import base64
    import hashlib
    import zlib
    rec = json.loads((mg / "mapc.json").read_text())
    text = zlib.decompress(base64.b64decode(rec["spec"]["text_zlib_base64"])).decode()
    assert text == LLAMA
    assert rec["spec"]["sha256"] == rec["spec_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_a_users_own_spec_is_found_again_without_flags(tmp_path, hf):
    own = tmp_path / "own.map"
    own.write_text(LLAMA.replace("family llama", "family ownfamily"))
    mapc.convert(hf, tmp_path / "mg", to="megatron", tp=2, pp=2, spec=own)
    own.unlink()                      # the spec file is gone: the record must suffice
    mapc.convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert json.loads((tmp_path / "back" / "mapc.json").read_text())["family"] == "ownfamily"
    assert same_tensors(hf, tmp_path / "back")


def test_a_spec_other_than_the_recorded_one_is_refused(tmp_path, mg):
    with pytest.raises(MapcError) as e:
        mapc.convert(mg, tmp_path / "back", to="hf", spec=swapped_spec(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert "swapped.map" in msg and "is not the spec that wrote" in msg
    assert "--allow-spec-change" in msg and "leave out --spec" in msg
    assert not (tmp_path / "back").exists()


def test_allow_spec_change_uses_it_with_a_warning(tmp_path, hf, mg):
    report = mapc.convert(mg, tmp_path / "back", to="hf", spec=swapped_spec(tmp_path),
                          allow_spec_change=True)
    assert any("--allow-spec-change" in w for w in report.warnings)
    # the swapped spec reads gate as up: what the check is there to stop
    assert not same_tensors(hf, tmp_path / "back")


def test_the_same_spec_given_again_is_accepted(tmp_path, hf, mg):
    mapc.convert(mg, tmp_path / "back", to="hf", spec="llama")
    assert same_tensors(hf, tmp_path / "back")


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_a_damaged_recorded_spec_is_named(tmp_path, mg):
    bad = copy_tree(mg, tmp_path / "mg")
    rec = json.loads((bad / "mapc.json").read_text())
    import base64
    import zlib
    rec["spec"]["text_zlib_base64"] = base64.b64encode(zlib.compress(b"family x\n")).decode()
    (bad / "mapc.json").write_text(json.dumps(rec))
    with pytest.raises(MapcError, match="does not match its sha256"):
        mapc.convert(bad, tmp_path / "back", to="hf")


@pytest.mark.parametrize("allow", [False, True])
def test_an_old_record_without_the_text_checks_the_shipped_spec_hash(tmp_path, hf, mg, allow):
    old = copy_tree(mg, tmp_path / "mg")
    rec = json.loads((old / "mapc.json").read_text())
    del rec["spec"]
    rec["spec_sha256"] = "0" * 64      # written by an edited llama.map, say
    (old / "mapc.json").write_text(json.dumps(rec))
    if not allow:
        with pytest.raises(MapcError) as e:
            mapc.convert(old, tmp_path / "back", to="hf")
        assert "sha256 000000000000, in its record" in str(e.value)
        assert "leave out --spec" not in str(e.value)
    else:
        mapc.convert(old, tmp_path / "back", to="hf", allow_spec_change=True)
        assert same_tensors(hf, tmp_path / "back")


def test_an_old_record_of_an_unshipped_spec_says_what_to_pass(tmp_path, mg):
    old = copy_tree(mg, tmp_path / "mg")
    rec = json.loads((old / "mapc.json").read_text())
    del rec["spec"]
    rec["family"] = "ownfamily"
    (old / "mapc.json").write_text(json.dumps(rec))
    with pytest.raises(MapcError, match="not shipped, and its record holds no copy"):
        mapc.convert(old, tmp_path / "back", to="hf")


def test_cli_refuses_then_allows(tmp_path, mg, capsys):
    spec = str(swapped_spec(tmp_path))
    assert main(["convert", str(mg), str(tmp_path / "a"), "--to", "hf", "--spec", spec]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the spec that wrote" in err
    assert main(["convert", str(mg), str(tmp_path / "b"), "--to", "hf", "--spec", spec,
                 "--allow-spec-change", "-q"]) == 0
    assert "--allow-spec-change" in capsys.readouterr().err


def test_a_gguf_file_alone_carries_its_spec(tmp_path, hf):
    """GGUF keeps the record (spec included) in its header: the file converts again alone."""
    own = tmp_path / "own.map"
    own.write_text(LLAMA.replace("family llama", "family ownfamily"))
    mapc.convert(hf, tmp_path / "g", to="gguf", spec=own)
    (tmp_path / "g" / "mapc.json").unlink()
    own.unlink()
    mapc.convert(tmp_path / "g", tmp_path / "back", to="hf")
    assert same_tensors(hf, tmp_path / "back")
