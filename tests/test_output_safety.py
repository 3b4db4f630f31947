"""Where the output lands: destinations whose replacement would destroy the user's work are
refused, commit replaces nothing it did not plan to, signals clean up, leftovers of killed runs
are reported and cleaned, outputs follow the umask."""
from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

import mapc
from mapc.cli.main import main
from mapc.errors import MapcError
from mapc.runtime import execute
from mapc.runtime.containers import base
from tests.conftest import llama_config, tree_hash, write_random_hf


@pytest.fixture
def hf(tmp_path):
    return write_random_hf(tmp_path / "hf", llama_config(hidden=32, layers=2, heads=4, groups=2,
                                                         ffn=48, vocab=64))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A current directory holding a file the user cares about."""
    d = tmp_path / "home" / "work"
    d.mkdir(parents=True)
    (d / "precious.txt").write_text("years of work")
    monkeypatch.chdir(d)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("dst", ["", " ", ".", "..", "./", "../..", "/", "~HOME", "~CWD"])
def test_destinations_that_would_destroy_work_are_refused(hf, work, capsys, dst):
    dst = {"~HOME": str(work.parent), "~CWD": str(work)}.get(dst, dst)
    code, _, err = run(capsys, "convert", hf, dst, "--to", "megatron", "--force")
    assert code == 1 and err.count("\n") == 1 and "destination" in err
    assert (work / "precious.txt").read_text() == "years of work"
    assert sorted(p.name for p in work.iterdir()) == ["precious.txt"]


def _during_run(monkeypatch, action):
    """Run ``action`` in the middle of the conversion (after planning, before commit)."""
    real = execute.run

    def run(*a, **kw):
        report = real(*a, **kw)
        action()
        return report
    monkeypatch.setattr(execute, "run", run)


def test_destination_created_meanwhile_is_not_replaced(tmp_path, hf, monkeypatch):
    dst = tmp_path / "out"
    _during_run(monkeypatch, dst.mkdir)         # an empty directory: rename() would replace it
    with pytest.raises(MapcError, match="created by someone else") as e:
        mapc.convert(hf, dst, to="megatron")
    assert dst.is_dir() and not any(dst.iterdir())
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.mapc-")]
    assert len(kept) == 1 and str(kept[0]) in str(e.value)
    assert (kept[0] / "latest_checkpointed_iteration.txt").is_file()   # the finished output


def test_force_replaces_only_what_was_there_at_the_start(tmp_path, hf, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("old output")

    def swap():                                 # (identified by device and inode)
        dst.rename(tmp_path / "moved-away")
        dst.mkdir()
        (dst / "theirs").write_text("someone else's")
    _during_run(monkeypatch, swap)
    with pytest.raises(MapcError, match="changed while converting"):
        mapc.convert(hf, dst, to="megatron", force=True)
    assert (dst / "theirs").read_text() == "someone else's"


def test_force_replaces_the_previous_output(tmp_path, hf):
    dst = tmp_path / "out"
    mapc.convert(hf, dst, to="megatron")
    mapc.convert(hf, dst, to="hf", force=True)
    assert (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".mapc-" in p.name] == []


def test_dangling_symlink_destination_is_refused_before_converting(tmp_path, hf, monkeypatch):
    dst = tmp_path / "link"
    dst.symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(execute, "run", lambda *a, **k: pytest.fail("converted first"))
    with pytest.raises(MapcError, match="already exists"):
        mapc.convert(hf, dst, to="megatron")


def test_force_replaces_a_symlink_not_its_target(tmp_path, hf):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    dst = tmp_path / "link"
    dst.symlink_to(target)
    mapc.convert(hf, dst, to="megatron", force=True)
    assert not dst.is_symlink() and (dst / "latest_checkpointed_iteration.txt").is_file()
    assert (target / "keep").read_text() == "x"


def test_unwritable_destination_parent_is_one_line(tmp_path, hf, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:            # root writes anywhere: make the directory refuse instead
        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(base.tempfile, "mkdtemp", refuse)
    else:
        parent.chmod(0o500)
    code, _, err = run(capsys, "convert", hf, parent / "out", "--to", "megatron")
    parent.chmod(0o700)
    assert code == 1 and err.count("\n") == 1 and "Permission denied" in err
    assert str(parent) in err


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_output_follows_the_umask(tmp_path, hf, mask):
    old = os.umask(mask)
    try:
        mapc.convert(hf, tmp_path / "out", to="megatron")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, hf, capsys, monkeypatch):
    _during_run(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run(capsys, "convert", hf, tmp_path / "out", "--to", "megatron", "-q")
    assert code == 130 and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupt_during_commit_lands_after_it_and_says_so(tmp_path, hf, capsys,
                                                            monkeypatch):
    real = base.AtomicOutput._commit

    def commit(self):
        os.kill(os.getpid(), signal.SIGINT)     # held until both renames are done
        real(self)
    monkeypatch.setattr(base.AtomicOutput, "_commit", commit)
    dst = tmp_path / "out"
    code, _, err = run(capsys, "convert", hf, dst, "--to", "megatron", "-q")
    assert code == 130 and "nothing was written" not in err and str(dst) in err
    assert (dst / "latest_checkpointed_iteration.txt").is_file()


def test_leftovers_of_killed_runs_are_reported_and_cleaned(tmp_path, hf, capsys):
    dead = tmp_path / ".old.mapc-999999999-abcd1234"     # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f".other.mapc-{os.getpid()}-efgh5678"   # a conversion still running
    live.mkdir()
    report = mapc.convert(hf, tmp_path / "out", to="megatron")
    assert any(dead.name in w and "mapc clean" in w for w in report.warnings)
    assert not any(live.name in w for w in report.warnings)
    code, _, err = run(capsys, "clean", tmp_path, "--dry-run")
    assert code == 0 and dead.name in err and dead.exists()
    code, _, err = run(capsys, "clean", tmp_path)
    assert code == 0 and not dead.exists() and live.exists()
    assert (tmp_path / "out").is_dir() and (tmp_path / "hf").is_dir()


def test_refused_conversion_leaves_the_source_untouched(tmp_path, hf, work):
    before = tree_hash(hf)
    with pytest.raises(MapcError):
        mapc.convert(hf, "", to="megatron", force=True)
    assert tree_hash(hf) == before and Path(work / "precious.txt").exists()
