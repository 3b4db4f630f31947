"""The ZeRO optimizer-file layout of docs/formats/deepspeed.md, re-implemented from scratch.

One independent reading of DeepSpeed's flat partitions, by the documented formulas only
(``test_groundtruth_deepspeed.test_documented_layout`` checks it against DeepSpeed's own
gathered state; the writer tests then use it as the oracle for what mapc writes). Needs torch.
"""
from __future__ import annotations

import math
from pathlib import Path

SLOTS = ("master", "exp_avg", "exp_avg_sq")


def _load(path: Path):
    import torch
    # DeepSpeed pickles its own classes (fragment_address, LossScaler, ZeroStageEnum)
    return torch.load(path, map_location="cpu", weights_only=False)


def read_documented_layout(tag_dir: Path, dp: int, *, strict_padding: bool = True
                           ) -> tuple[dict, list]:
    """``({slot: {name: array}}, param_shapes)`` from the raw ZeRO files of ``tag_dir``.

    Stage 1/2 (and BF16_Optimizer) padding, ``group_paddings`` and ``param_slice_mappings`` are
    asserted as documented. ``strict_padding=False`` accepts stage 3's fp32 padding, which
    DeepSpeed leaves uninitialised (``torch.empty``); moments' padding is always zero."""
    import torch

    files = sorted(Path(tag_dir).glob("*zero_pp_rank_*_optim_states.pt"),
                   key=lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0]))
    assert len(files) == dp
    osds = [_load(p)["optimizer_state_dict"] for p in files]
    stage3 = "fp32_flat_groups" in osds[0]
    bf16opt = not stage3 and "zero_stage" not in osds[0]
    model = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage3 else "mp_rank_00_model_states.pt"
    shapes = _load(Path(tag_dir) / model)["param_shapes"]   # list (per group) of {name: Size}
    out = {s: {} for s in SLOTS}
    for g, group in enumerate(shapes):
        numels = [math.prod(s) for s in group.values()]
        if stage3:
            # each param padded to dp * ceil(n/dp); rank r holds slice r of every param, in order
            parts = [math.ceil(n / dp) for n in numels]
            flats = {"master": [o["fp32_flat_groups"][g] for o in osds],
                     **{k: [o["optimizer_state_dict"]["state"][g][k] for o in osds]
                        for k in ("exp_avg", "exp_avg_sq")}}
            for key, per_rank in flats.items():
                assert all(t.numel() == sum(parts) for t in per_rank)
                off = 0
                for (name, shape), n, p in zip(group.items(), numels, parts):
                    full = torch.cat([t[off:off + p] for t in per_rank])
                    if key != "master" or strict_padding:
                        assert not full[n:].any(), f"{name}/{key} padding"
                    out[key][name] = full[:n].reshape(tuple(shape)).detach().numpy()
                    off += p
            continue
        total = sum(numels)
        part = math.ceil(total / (2 * dp)) * 2 * dp // dp      # alignment 2*dp, equal parts
        for r, o in enumerate(osds):
            pad_r = max(0, min(part, (r + 1) * part - total))  # this rank's share of padding
            if bf16opt:   # fp32 keeps its padding; all of it is attributed to the last rank
                assert o["group_paddings"][g] == (dp * part - total if r == dp - 1 else 0)
                assert o["single_partition_of_fp32_groups"][g].numel() == part
            else:         # fp32 stripped of it
                assert o["group_paddings"][g] == pad_r
                assert o["single_partition_of_fp32_groups"][g].numel() == part - pad_r
            assert o["base_optimizer_state"]["state"][g]["exp_avg"].numel() == part
            # param_slice_mappings: the params overlapping [r*part, (r+1)*part)
            want, off = {}, 0
            for name, n in zip(group, numels):
                lo, hi = max(off, r * part), min(off + n, (r + 1) * part)
                if lo < hi:
                    want[name] = (lo - r * part, hi - lo)
                off += n
            got = {k: (v.start, v.numel) for k, v in o["param_slice_mappings"][g].items()}
            assert got == want
        for key in SLOTS:
            per_rank = [o["single_partition_of_fp32_groups"][g] if key == "master" else
                        o["base_optimizer_state"]["state"][g][key] for o in osds]
            flat = torch.cat(per_rank).detach()
            assert not flat[total:].any()
            off = 0
            for (name, shape), n in zip(group.items(), numels):
                out[key][name] = flat[off:off + n].reshape(tuple(shape)).numpy()
                off += n
    return out, shapes
