"""Calibration past one process: the statistics are sums, so ranks that each stream their own shard
of the calibration data add theirs up with one all-reduce (torch.distributed; gloo on CPU).

    >>> dist.init_process_group("gloo", ...)                       # on every rank
    >>> result = fxa.abstract(model, my_shard, keep=0.5, distributed=True)

Every rank then holds the statistics of all the data and makes the same abstraction. The
calibration reservoir (the first samples, for measured risks) is gathered in rank order, so with
shards that split the data in order (rank 0 the first part, ...) the result is the one a single
process makes on all of it, up to float64 summation order. With Hutchinson curvature each rank draws
its own probes, so the estimate is as unbiased but not the same draw; the default probe count comes
from the total sample count over the ranks (`total_samples`), so every rank picks the same one.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .calibrate import Statistics


def _sum_fields(obj, group) -> None:
    """All-reduce (sum) every tensor and int field of a Moments or Curvature dataclass, in place."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        elif isinstance(value, int) and not isinstance(value, bool):
            t = torch.tensor([value], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            setattr(obj, f.name, int(t.item()))


def _truncate(chunks: list, limit: int) -> list:
    """The first `limit` samples of a list of reservoir chunks [(inputs, targets)]."""
    out, n = [], 0
    for inputs, targets in chunks:
        size = next((len(v) for v in inputs if isinstance(v, torch.Tensor) and v.dim()), 0)
        take = min(size, limit - n)
        if take <= 0:
            break
        out.append(([v[:take] if isinstance(v, torch.Tensor) and v.shape[:1] == (size,) else v for v in inputs],
                    None if targets is None else targets[:take]))
        n += take
    return out


def _initialised() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("distributed=True needs torch.distributed initialised on every rank: call "
                          "torch.distributed.init_process_group first (backend 'gloo' on CPU)")


def total_samples(n: int | None, group=None) -> int | None:
    """The sum over ranks of their shards' sample counts, or None if any rank's is not known; every rank
    gets the same answer (so every rank picks the same default probe count)."""
    _initialised()
    t = torch.tensor([float(n or 0), float(n is None)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return None if t[1] > 0 else int(t[0])


def all_reduce(stats: Statistics, group=None, reservoir: int = 512, fit_reservoir: int = 4096) -> Statistics:
    """Sum `stats` over the processes of `group` (in place) and gather the reservoirs (calibration and fit
    data) in rank order."""
    _initialised()
    names = sorted(stats.moments)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (names, stats.method), group=group)
    if any(other != everyone[0] for other in everyone):
        raise ConfigError(f"ranks disagree on the sites or curvature method ({everyone}); give every rank the "
                          "same model, options and input shapes")
    for name in names:   # the same order on every rank
        _sum_fields(stats.moments[name], group)
        _sum_fields(stats.curvature[name], group)
    for name in sorted(stats.branch_moments):
        _sum_fields(stats.branch_moments[name], group)
    counts = torch.tensor([stats.nonfinite_outputs, stats.fit_samples], dtype=torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)    # every rank then fits alike (fit_data)
    stats.nonfinite_outputs, stats.fit_samples = (int(c) for c in counts.tolist())
    chunks = [None] * len(everyone)
    dist.all_gather_object(chunks, [(list(i), t) for i, t in stats.reservoir], group=group)
    stats.reservoir = _truncate([c for rank in chunks for c in rank], reservoir)
    dist.all_gather_object(chunks, [(list(i), t) for i, t in stats.fit_reservoir], group=group)
    stats.fit_reservoir = _truncate([c for rank in chunks for c in rank], fit_reservoir)
    return stats
