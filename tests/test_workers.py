"""Many processes writing one output (runtime/workers.py): ``--workers N`` forks workers that
write disjoint shares of the WritePlan's independent files; torchrun ranks do the same. Either
way the output is byte for byte the one-process output, for every format, and a failing or
killed worker (or rank) leaves no DST and no temporary directory."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import mapc
from mapc.cli.main import main
from mapc.errors import MapcError
from mapc.runtime import execute, workers
from mapc.runtime.plan_write import Part
from tests.conftest import llama_config, write_random_hf

CFG = llama_config(hidden=32, layers=4, heads=4, groups=2, ffn=48, vocab=64)

# format -> convert() arguments from the hf source (topologies with several rank files)
FROM_HF = {
    "hf": dict(max_shard_bytes=30000),
    "megatron": dict(tp=2, pp=2),
    "nemo": dict(tp=2, pp=2),
    "nxdt": dict(tp=2, pp=2),
    "gguf": {},
    "dcp": {},
    "torch_dist": dict(tp=2),
    "deepspeed": dict(dp=2),
    "universal": dict(dp=2),
    "neox": dict(tp=2, pp=2),
    "nemo2": {},
    "nxdt-xser": dict(tp=2, set=["xser=true"]),     # a file per tensor beside each rank's
    "nemo-tar.nemo": dict(tp=2),                    # one tar file: one process
    "universal-tp": dict(tp=2),            # Megatron-DeepSpeed's tensor-parallel layout
    "universal-tp-pp": dict(tp=2, pp=2),   # ... and its pipeline layout (megatron_pipe)
}
# formats whose files are independent (and the cases of FROM_DS written so)
PARALLEL = {"hf", "megatron", "nemo", "nxdt", "nxdt-xser", "deepspeed", "universal", "neox",
            "megatron-optimizer", "neox-optimizer",
            "deepspeed-dp3", "deepspeed-zero3-bf16", "deepspeed-autotp", "universal-carried",
            "universal-zero3", "universal-tp", "universal-tp-pp",
            "universal-tp-moments", "hf-with-optimizer"}
# from a DeepSpeed training checkpoint: optimizer state in the parts (megatron), and a
# format whose optimizer file holds every tensor (hf --with-optimizer: one worker writes
# Trainer's files, the others the weight shards)
FROM_DS = {
    "megatron-optimizer": dict(to="megatron", tp=2, pp=2),
    # ZeRO outputs: each data-parallel rank's optimizer file, the model states, and (universal)
    # each parameter's folder are written by one worker each
    "deepspeed-dp3": dict(to="deepspeed", dp=3),
    "deepspeed-zero3-bf16": dict(to="deepspeed", dp=3, zero_stage=3, dtype="bf16"),
    "deepspeed-autotp": dict(to="deepspeed", tp=2, dp=2),
    "universal-carried": dict(to="universal"),           # the model states carried over
    "universal-tp-moments": dict(to="universal", tp=2, pp=2),   # the source's slots merged
    "neox-optimizer": dict(to="neox", tp=2, pp=2, dp=2),
    "hf-with-optimizer": dict(to="hf", with_optimizer=True, max_shard_bytes=30000),
}
CASES = {**{f: ("hf", dict(to=f.split("-")[0].split(".")[0], **kw))
            for f, kw in FROM_HF.items()},
         **{c: ("ds", kw) for c, kw in FROM_DS.items()},
         "universal-zero3": ("hf", dict(to="universal", dp=2, zero_stage=3))}
SAVE_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def tree(path: Path) -> dict[str, bytes]:
    """Every file's bytes, with the output's own path (NeoX's config names it) masked, and
    DCP's random save_id (a uuid4 in ``.metadata``, as torch.distributed.checkpoint writes)."""
    if Path(path).is_file():                     # a .nemo tar
        return {".": Path(path).read_bytes()}
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            data = p.read_bytes().replace(str(Path(path).absolute()).encode(), b"DST")
            out[p.relative_to(path).as_posix()] = SAVE_ID.sub(b"U" * 36, data) \
                if p.name == ".metadata" else data
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers-src")
    hf = write_random_hf(root / "hf", CFG)
    ds = root / "ds"
    mapc.convert(hf, ds, to="deepspeed", dp=2)
    return {"hf": hf, "ds": ds}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, sources):
    """Every case converted by one process: the reference bytes."""
    root = tmp_path_factory.mktemp("workers-one")
    out = {}
    for case, (src, kw) in CASES.items():
        mapc.convert(sources[src], root / case, workers=1, **kw)
        out[case] = tree(root / case)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_workers_write_the_bytes_of_one(tmp_path, sources, one_process, case):
    src, kw = CASES[case]
    report = mapc.convert(sources[src], tmp_path / case, workers=2, **kw)
    assert tree(tmp_path / case) == one_process[case]
    assert report.workers == (2 if case in PARALLEL else 1)
    assert [p.name for p in tmp_path.iterdir()] == [case]


@pytest.mark.parametrize("tp", [1, 2])
def test_each_worker_reads_only_what_its_files_need(tmp_path, sources, tp):
    """With pp=2 each worker holds one stage's ranks and reads only that stage's tensors:
    the workers' reads add up to one process's (reading every unit, each would read it all)."""
    one = mapc.convert(sources["hf"], tmp_path / "a", to="megatron", tp=tp, pp=2, workers=1)
    two = mapc.convert(sources["hf"], tmp_path / "b", to="megatron", tp=tp, pp=2, workers=2)
    assert two.workers == 2 and two.bytes_read == one.bytes_read > 0


# ---- a failing or killed worker aborts all --------------------------------------------------------
def _fail_in(monkeypatch, how, marker="mp_rank_01_001"):
    """Worker processes are forked: a patched write_share is theirs too. The share holding
    the file named with ``marker`` (the last rank's) fails."""
    real = workers.write_share

    def share(cp, tmp, parts, **kw):
        if any(marker in f for p in parts for f in p.files):
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise MapcError("injected failure")
        return real(cp, tmp, parts, **kw)
    monkeypatch.setattr(workers, "write_share", share)


@pytest.mark.parametrize("how,message", [("raise", "failed: injected failure"),
                                         ("kill", "died (killed by signal 9)")])
@pytest.mark.parametrize("to,marker", [("megatron", "mp_rank_01_001"),
                                       ("universal", "mp_rank_01_model_states")])
def test_a_failing_worker_aborts_all(tmp_path, sources, monkeypatch, how, message, to,
                                     marker):
    _fail_in(monkeypatch, how, marker)
    with pytest.raises(MapcError) as e:
        mapc.convert(sources["hf"], tmp_path / "out", to=to, tp=2, pp=1 if to == "universal"
                     else 2, workers=2)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []          # no DST, no temporary directory


# ---- partition, choice, dry run, report ---------------------------------------------------------
def _parts(sizes):
    return tuple(Part((f"f{i}",), frozenset({((), f"t{i}")}), b) for i, b in enumerate(sizes))


@pytest.mark.parametrize("sizes,n", [([5, 1, 1, 1, 1, 1], 2), ([3] * 7, 3), ([1, 2], 4),
                                     ([10, 9, 8, 1, 1, 1, 1], 3), ([1] * 8, 8), ([0, 0, 5], 2)])
def test_partition_is_disjoint_complete_and_balanced(sizes, n):
    parts = _parts(sizes)
    shares = workers.partition(parts, n)
    assert tuple(p for s in shares for p in s) == parts      # consecutive runs, all once
    assert len(shares) == min(n, len(parts)) and all(shares)
    loads = [sum(p.bytes for p in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes)
    assert shares == workers.partition(parts, n)            # every rank computes the same


def test_default_workers_follow_cpus_and_size(monkeypatch):
    from mapc.runtime.plan_write import make_plan
    plan = make_plan("megatron", ["f0", "f1", "f2", "f3"],
                     parts=_parts([2**30] * 4))
    monkeypatch.setattr(workers, "cpu_count", lambda: 2)
    assert workers.choose(plan, None)[0] == 2
    assert workers.choose(plan, 3)[0] == 3 and workers.choose(plan, 9)[0] == 4
    small = make_plan("megatron", ["f0", "f1"], parts=_parts([2**20] * 2))
    assert workers.choose(small, None)[0] == 1                # tiny: not worth a fork
    serial = make_plan("gguf", ["m.gguf"], serial="one .gguf file holds every tensor")
    assert workers.choose(serial, 4) == (1, "gguf: one .gguf file holds every tensor")


@pytest.mark.parametrize("args,shown", [
    (["--to", "megatron", "--tp", "2", "--pp", "2", "--workers", "2"],
     ["workers: 2 (as asked)", "  worker 0: 2 files", "  worker 1: 2 files",
      "  metadata and commit: the parent process"]),
    (["--to", "deepspeed", "--dp", "2", "--workers", "2"],     # a rank's optimizer file each
     ["workers: 2 (as asked)",
      "  worker 0: 1 file, 210.62 kB, reads 20 of 39 tensors: "
      "global_step0/zero_pp_rank_0_mp_rank_00_optim_states.pt",
      "  worker 1: 2 files, 351.04 kB, reads 39 of 39 tensors: "
      "global_step0/zero_pp_rank_1_mp_rank_00_optim_states.pt, "
      "global_step0/mp_rank_00_model_states.pt"]),
    (["--to", "gguf", "--workers", "2"], ["workers: 1 (gguf: one .gguf file holds every tensor)"]),
    (["--to", "megatron", "--tp", "2", "--workers", "2", "--backend", "torch"],   # as the run
     ["workers: 1 (--backend torch: its thread pools do not survive fork())"]),
])
def test_dry_run_shows_the_workers(tmp_path, sources, capsys, args, shown):
    assert main(["convert", str(sources["hf"]), str(tmp_path / "out"), *args,
                 "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(any(line.startswith(s) for line in lines) for s in shown), lines[-6:]


@pytest.mark.parametrize("argv", [
    ["--to", "universal", "--tp", "2", "--workers", "2"],
    ["--to", "universal", "--tp", "2", "--pp", "2", "--workers", "3"],
    ["--to", "hf", "--with-optimizer", "--workers", "2"]])
def test_dry_run_names_the_shares_the_run_writes(tmp_path, sources, capsys, monkeypatch,
                                                 argv):
    """Each worker's line of --dry-run (its files, their number and bytes) is the share the
    worker of that number writes in the real run: the files exist when it returns, no
    other worker writes them, and they are files of the output."""
    import multiprocessing
    real, log = workers.write_share, tmp_path / "shares"
    log.mkdir()

    def share(cp, tmp, parts, **k):          # in the forked worker "mapc-worker-K"
        report = real(cp, tmp, parts, **k)
        files = [f for p in parts for f in p.files]
        done = [f for f in files if (Path(tmp) / f).is_file()]
        name = multiprocessing.current_process().name
        (log / f"{name}.json").write_text(json.dumps([files, done]))
        return report
    monkeypatch.setattr(workers, "write_share", share)
    args = ["convert", str(sources["ds"]), str(tmp_path / "out"), *argv]
    assert main([*args, "--dry-run"]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("  worker ")]
    assert main([*args, "-q"]) == 0
    n = int(argv[-1])
    assert len(shown) == n and len(list(log.iterdir())) == n
    every = []
    for k, line in enumerate(shown):
        files, done = json.loads((log / f"mapc-worker-{k}.json").read_text())
        count, labels = re.fullmatch(r"  worker \d+: (\d+) files?, [^,]+, reads \d+ of \d+ "
                                     r"tensors: (.*)", line).groups()
        first, last = labels.split(", ")[0], labels.split(", ")[-1]
        assert int(count) == len(files) and done == files, (line, files)
        assert files[0].startswith(first.split(" (")[0]), (line, files[0])
        if "(+" not in last:                  # a file, or "FOLDER/ (N files)"
            assert files[-1].startswith(last.split(" (")[0]), (line, files[-1])
        every += files
    assert len(every) == len(set(every)) and set(every) <= set(tree(tmp_path / "out"))


def test_json_reports_the_workers(tmp_path, sources, capsys):
    assert main(["convert", str(sources["hf"]), str(tmp_path / "out"), "--to", "megatron",
                 "--tp", "2", "--workers", "2", "--json", "-q"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["workers"] == 2 and err == ""


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_bad_worker_count_is_refused(tmp_path, sources, capsys, bad):
    assert main(["convert", str(sources["hf"]), str(tmp_path / "out"), "--to", "megatron",
                 "--workers", bad]) == 1
    assert "--workers" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_progress_shows_each_worker():
    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return False

        def write(self, s):
            self.text += s

        def flush(self):
            pass
    stream = Tty()
    p = execute.Progress(100, "convert", unit="B", every=0.0, stream=stream,
                         detail=lambda: "w0 40% w1 60%")
    p.step(50)
    assert "[w0 40% w1 60%]" in stream.text
    quiet = execute.Progress(100, "convert", True, unit="B", every=0.0, stream=Tty())
    quiet.step(50)
    assert quiet.stream.text == ""
    # each worker's share done and its time left at its own rate
    assert workers._each_worker([40, 100, 0], [100, 100, 50], start=0.0, now=10.0) == \
        "w0 40% left 0:15 w1 100% w2 0%"


def test_workers_do_not_import_torch(tmp_path, sources):
    code = ("import sys, mapc; r = mapc.convert(sys.argv[1], sys.argv[2], to='megatron', "
            "tp=2, workers=2); print(r.workers, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(sources["hf"]), str(tmp_path / "o")],
                         capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items()
                              if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")})
    assert out.stdout.split() == ["2", "False"]


# ---- torchrun: ranks write disjoint shares, rank 0 commits --------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory, sources):
    """One torchrun of 2 processes converting every case (and one whose rank 1 fails)."""
    pytest.importorskip("torch.distributed")
    root = tmp_path_factory.mktemp("torchrun")
    jobs = [{"api": [str(sources[src]), str(root / case), kw]}
            for case, (src, kw) in CASES.items()]
    jobs.append({"cli": [str(sources["hf"]), str(root / "cli"), "--to", "megatron", "--tp",
                         "2", "--pp", "2"]})
    jobs.append({"api": [str(sources["hf"]), str(root / "failed"), dict(to="megatron", tp=2)],
                 "fail_on_rank": 1})
    jobs.append({"cli": [str(sources["hf"]), str(root / "rss"), "--to", "universal", "--tp",
                         "2"], "hog_on_rank": 1, "hog_mb": 96})
    job_file = root / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(Path(__file__).parent.parent.parent) + os.pathsep + \
        env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
         "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         str(Path(__file__).with_name("torchrun_convert.py")), str(job_file)],
        capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    codes = [json.loads(Path(f"{job_file}.rank{r}").read_text()) for r in (0, 1)]
    return root, dict(zip([*CASES, "cli", "failed", "rss"], zip(*codes)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_torchrun_ranks_write_the_bytes_of_one_process(torchrun, one_process, case):
    root, codes = torchrun
    shared = case in PARALLEL                       # else rank 0 writes it all
    assert codes[case] == ([0, shared], [0, shared])
    assert tree(root / case) == one_process[case]


def test_torchrun_runs_the_cli(torchrun, one_process):
    root, codes = torchrun
    assert codes["cli"] == ([0, True], [0, True])
    assert tree(root / "cli") == one_process["megatron"]


def test_torchrun_json_reports_the_largest_ranks_peak_memory(torchrun, one_process):
    """--json's peak_rss_bytes under torchrun is that of the rank with the largest peak
    (here rank 1, which holds 96 MB more), not rank 0's own."""
    root, codes = torchrun
    (code0, _, report, _, own0), (code1, _, none, before1, after1) = codes["rss"]
    assert (code0, code1, none) == (0, 0, None)
    assert own0 < before1 <= report["peak_rss_bytes"] <= after1
    assert report["workers"] == 2 and tree(root / "rss") == one_process["universal-tp"]


def test_torchrun_failing_rank_aborts_all(torchrun):
    root, codes = torchrun
    assert codes["failed"] == (["rank 1 of 2 failed: injected failure on rank 1", True],) * 2
    assert not (root / "failed").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".failed")]
