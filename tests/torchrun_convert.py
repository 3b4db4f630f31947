"""Run by tests/test_workers.py under torchrun: every rank runs the conversions of a job file
(JSON: a list of {"cli": argv} run as ``torchrun -m mapc convert ARGV`` runs it, or
{"api": [src, dst, kwargs]} through mapc.convert) and writes its results ([0 or the one-line
error, whether this rank wrote a share of the files]) to ``<job file>.rank<N>``. One process group serves every conversion.

A job with ``"fail_on_rank": K`` fails on rank K (a MapcError raised in its share), to test
that a failing rank aborts the whole output. A "cli" job with ``"hog_on_rank": K`` makes rank
K hold ``hog_mb`` MB more memory than the others during it, and its results are
[code, shared, the --json report printed (or None), this rank's peak RSS before, after]."""
from __future__ import annotations

import json
import os
import sys


def main(job_file: str) -> int:
    from mapc.cli.main import main as mapc_main
    from mapc.errors import MapcError
    from mapc.runtime import workers
    rank = int(os.environ["RANK"])
    real = workers.write_share
    import mapc
    codes = []
    for job in json.loads(open(job_file).read()):
        fail = job.get("fail_on_rank")

        shared = []

        def share(*a, fail=fail, shared=shared, **k):
            shared.append(True)
            if rank == fail:
                raise MapcError(f"injected failure on rank {rank}")
            return real(*a, **k)
        workers.write_share = share
        if "hog_on_rank" in job:
            import contextlib
            import io
            import numpy as np
            from mapc.runtime.execute import peak_rss_bytes
            hog = np.ones(job["hog_mb"] * 2**20, np.uint8) if rank == job["hog_on_rank"] \
                else None
            before, out = peak_rss_bytes(), io.StringIO()
            with contextlib.redirect_stdout(out):
                code = mapc_main(["convert", *job["cli"], "--json", "-q"])
            del hog
            codes.append([code, bool(shared), json.loads(out.getvalue()) if rank == 0 else
                          None, before, peak_rss_bytes()])
            continue
        if "cli" in job:
            codes.append([mapc_main(["convert", *job["cli"], "-q"]), bool(shared)])
            continue
        src, dst, kw = job["api"]
        try:
            mapc.convert(src, dst, **kw)
            codes.append([0, bool(shared)])
        except MapcError as e:
            codes.append([str(e), bool(shared)])
    with open(f"{job_file}.rank{rank}", "w") as f:
        json.dump(codes, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
