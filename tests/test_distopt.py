"""mapc's derivation of megatron-core's DDP buffer layout (runtime/containers/distopt.py), which
places every parameter in the distributed optimizer's flat buckets, against megatron-core
0.16.1's own ``_ParamAndGradBuffer``: many bucket sizes, DP sizes, the high-busbw padding and
shared embeddings (each in a bucket of its own), all built in one megatron-core process. (The
single-bucket layout of real models is checked against a live DistributedOptimizer in
tests/test_torch_dist.py.)"""
from __future__ import annotations

import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from mapc.runtime.containers import distopt  # noqa: E402
from tests.groundtruth import mcore_dist  # noqa: E402


def _cases(n=60, seed=0):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        k = rng.randint(1, 10)
        params = []
        for j in range(k):
            # a shared embedding is the first or last parameter of a pipeline stage
            shared = (j in (0, k - 1)) and rng.random() < 0.3
            params.append([f"p{j}", rng.choice([1, 63, 64, 65, 127, 1000, rng.randint(1, 9000)]),
                           shared])
        dp = rng.choice([1, 2, 3, 4, 8, 24, 64])
        size = rng.choice([None, 1, 64, rng.randint(1, 6000), rng.randint(1, 30000)])
        cases.append([params, dp, size, rng.random() < 0.2])
    # the shapes real runs have: one bucket; a shared embedding at both ends (tied, one stage)
    cases.append([[["emb", 16000, True], ["w", 6144, False], ["n", 64, False],
                   ["out", 16000, True]], 2, None, False])
    return cases


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    cases = _cases()
    return cases, mcore_dist.buffer_layouts(cases, tmp_path_factory.mktemp("ddp_buffers"))


def test_bucket_layout_is_megatron_cores(layouts):
    """Every parameter's (start, end, bucket) in the buffer and every bucket's offset, padded
    size and unpadded size are megatron-core's, for every case."""
    cases, truth = layouts
    multi = 0
    for (params, dp, size, high), want in zip(cases, truth):
        buckets = distopt.ddp_buckets([tuple(p) for p in params], dp, size, high_busbw=high)
        got_index, got_buckets, offset = {}, [], 0
        for k, b in enumerate(buckets):
            got_buckets.append([offset, b.numel, b.numel_unpadded])
            for name, start, numel in b.params:
                got_index[name] = [offset + start, offset + start + numel, k]
            offset += b.numel
        assert got_index == want["index"], (params, dp, size, high)
        assert got_buckets == want["buckets"], (params, dp, size, high)
        multi += len(buckets) > 1
    assert multi > 20                       # the cases do exercise several buckets
