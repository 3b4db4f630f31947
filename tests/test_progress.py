"""Progress a person can trust: bytes done of the planned total, throughput, time left; the
final line and --json report the rate and the peak memory."""
from __future__ import annotations

import io
import json
import re

import pytest

from mapc.cli.main import main
from mapc.runtime import execute
from tests.conftest import llama_config, write_random_hf


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    t = [100.0]
    monkeypatch.setattr(execute.time, "monotonic", lambda: t[0])
    return t


def test_log_lines_show_bytes_rate_and_time_left(clock):
    out = io.StringIO()
    p = execute.Progress(4 * 10**9, "convert", unit="B", every=10, stream=out)
    clock[0] += 5
    p.step(10**9)                   # before `every` seconds: nothing yet
    assert out.getvalue() == ""
    clock[0] += 5
    p.step(10**9)
    assert out.getvalue() == "convert 2.00 GB / 4.00 GB  50% 200.00 MB/s elapsed 0:10 " \
                             "left 0:10\n"


def test_terminal_redraws_one_line(clock):
    out = _Tty()
    p = execute.Progress(1000, "convert", unit="B", stream=out)
    clock[0] += 1
    p.step(500)
    clock[0] += 1
    p.step(500)
    p.done()
    text = out.getvalue()
    assert text.count("\n") == 0 and text.count("\r") == 3
    assert "1.00 kB / 1.00 kB 100% 500 B/s" in text and text.endswith("\r\033[K")


def test_quiet_prints_nothing(clock):
    out = _Tty()
    p = execute.Progress(10, "convert", quiet=True, unit="B", stream=out)
    clock[0] += 20
    p.step(10)
    p.done("summary")
    assert out.getvalue() == ""


@pytest.mark.parametrize("to, extra", [("megatron", ["--tp", "2", "--pp", "2"]), ("hf", [])])
def test_planned_total_is_what_is_written(tmp_path, capsys, monkeypatch, to, extra):
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=100))
    seen = []
    monkeypatch.setattr(execute.Progress, "done",
                        lambda self, summary=None: seen.append((self.n, self.total)))
    code = main(["convert", str(src), str(tmp_path / "out"), "--to", to, *extra, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert seen == [(report["bytes"], report["bytes"])]
    assert report["gb_per_s"] > 0 and report["peak_rss_bytes"] > 10 * 2**20


def test_summary_line_has_the_rate(tmp_path, capsys):
    src = write_random_hf(tmp_path / "hf", llama_config(vocab=100))
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "megatron"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"{src} -> {tmp_path / 'out'} (megatron): ")
    assert re.search(r" in \d+\.\ds \(\d+\.\d{3} GB/s\)$", err.strip()), err
    assert main(["convert", str(src), str(tmp_path / "q"), "--to", "megatron", "-q"]) == 0
    assert capsys.readouterr().err == ""
