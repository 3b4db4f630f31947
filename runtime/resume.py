"""Ready-to-resume training settings for a resharded checkpoint.

When the data-parallel size changes, a DeepSpeed config's batch settings no longer multiply
out: DeepSpeed requires ``train_batch_size == train_micro_batch_size_per_gpu *
gradient_accumulation_steps * dp``. :func:`rebatch` keeps the global batch (what the
optimizer sees per step, so the loss curve continues) and, in this order of preference, the
micro batch (what fits in a device's memory), then adjusts the accumulation steps. Shared by
every container that writes a DeepSpeed-style config (deepspeed, neox).
"""
from __future__ import annotations

import copy

from mapc.errors import MapcError

BATCH = "train_batch_size"
MICRO = "train_micro_batch_size_per_gpu"
ACCUM = "gradient_accumulation_steps"


def _int(config: dict, key: str):
    v = config.get(key)
    if v is None or v == "auto":
        return None
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise MapcError(f"the DeepSpeed config's {key} is {config.get(key)!r}, not an integer",
                        hint="fix the source's ds_config") from None
    if v < 1:
        raise MapcError(f"the DeepSpeed config's {key} is {v}; it must be positive")
    return v


def batch_sizes(config: dict, dp: int) -> tuple[int, int, int]:
    """(global batch, micro batch, accumulation steps) of ``config`` at data-parallel ``dp``,
    completing the missing ones as DeepSpeed does (any two determine the third; accumulation
    defaults to 1)."""
    batch, micro, accum = _int(config, BATCH), _int(config, MICRO), _int(config, ACCUM)
    if batch is None and micro is None:
        raise MapcError(f"the DeepSpeed config gives neither {BATCH} nor {MICRO}",
                        hint="add one of them to the source's ds_config")
    if batch is None:
        accum = accum or 1
        batch = micro * accum * dp
    elif micro is None:
        accum = accum or 1
        micro = max(1, batch // (accum * dp))
    elif accum is None:
        accum = max(1, batch // (micro * dp))
    return batch, micro, accum


def rebatch(config: dict, old_dp: int, new_dp: int) -> tuple[dict, list[str]]:
    """``config`` (a DeepSpeed config dict; not modified) updated for ``new_dp`` ranks.

    Returns (new config, notes). The global batch ``train_batch_size`` is kept exactly when
    ``new_dp`` divides it: with the same micro batch and ``batch / (micro * new_dp)``
    accumulation steps if that is whole, else with the largest micro batch below the original
    one that makes it whole (noted). When ``new_dp`` does not divide the global batch, the
    achievable global batch closest to it is taken (micro batch at most the original one,
    ties to the larger micro batch) and a note says plainly that the global batch changed."""
    if new_dp < 1:
        raise MapcError(f"data-parallel size {new_dp} must be a positive integer")
    batch, micro, accum = batch_sizes(config, old_dp)
    notes: list[str] = []
    if batch % (micro * new_dp) == 0:
        new = (batch, micro, batch // (micro * new_dp))
    elif batch % new_dp == 0:
        per_rank = batch // new_dp
        m = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
        new = (batch, m, per_rank // m)
        notes.append(f"the micro batch per GPU changes from {micro} to {m} to keep the global "
                     f"batch {batch} at dp={new_dp} ({m} x {per_rank // m} accumulation x "
                     f"{new_dp})")
    else:
        best = None
        for m in range(1, micro + 1):
            for a in {max(1, batch // (m * new_dp)), max(1, -(-batch // (m * new_dp)))}:
                got = m * a * new_dp
                key = (abs(got - batch), -m, got)
                if best is None or key < best[0]:
                    best = (key, (got, m, a))
        new = best[1]
        notes.append(f"the global batch {batch} (train_batch_size) cannot be kept at dp="
                     f"{new_dp}: it is not a multiple of {new_dp}; the resume config uses "
                     f"{new[0]} = {new[1]} micro x {new[2]} accumulation x {new_dp} ranks, so "
                     f"the optimizer sees a different batch per step than before")
    out = copy.deepcopy(config)
    out[BATCH], out[MICRO], out[ACCUM] = new
    return out, notes
