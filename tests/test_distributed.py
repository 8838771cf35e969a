"""Calibration across processes: two gloo ranks on disjoint halves of the data give the report one
process gives on all of it (the statistics are sums; the reservoir is gathered in rank order)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError

# exact curvature: the sums over ranks then equal the single process's (Hutchinson draws differ per rank);
# the last, default options check that every rank picks the single process's probe count
OPTIONS = [dict(keep=0.5, curvature="exact"), dict(keep=0.25, replacement="affine", score="kl", curvature="exact"),
           dict(keep=0.5)]


def model_and_data():
    """A small tanh MLP and 600 samples (more than the 512-sample reservoir, so it is cut across ranks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 48), nn.Tanh(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    x = torch.randn(600, 10, generator=torch.Generator().manual_seed(1))
    return model, x


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, x = model_and_data()
        shard = x.chunk(world)[rank]                      # rank 0 the first half, rank 1 the second
        reports = [fxa.abstract(model, list(shard.split(100)), distributed=True, **o).report for o in OPTIONS]
        with open(f"{out}.{rank}", "w") as f:
            json.dump(reports, f)
    finally:
        dist.destroy_process_group()


def close(a, b, path="report"):
    """Reports equal: identical structure and integers, floats to 1e-6 relative (summation order, and the
    joint sums' float32 Gram products chunk the rows differently on two ranks)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (u, v) in enumerate(zip(a, b)):
            close(u, v, f"{path}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-6 * abs(a) + 1e-12, f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_two_ranks_on_halves_give_the_single_process_report(tmp_path):
    out = str(tmp_path / "report")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    model, x = model_and_data()
    single = [json.loads(json.dumps(fxa.abstract(model, list(x.split(100)), **o).report)) for o in OPTIONS]
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            reports = json.load(f)
        for options, got, expected in zip(OPTIONS, reports, single):
            assert got["calibration_samples"] == 600, "every rank must count all 600 samples"
            assert any(s["replaced"] for s in got["sites"]), "the test must remove units"
            if "curvature" in options:
                close(got, expected, f"rank {rank} {options}")
            else:       # 600 samples in all: 3 probes (300 per rank alone would give 6)
                assert got["curvature"] == expected["curvature"], (got["curvature"], expected["curvature"])
                assert got["curvature"]["method"] == "hutchinson" and got["curvature"]["probes"] == 3


def test_distributed_without_a_process_group_says_what_to_do():
    assert not dist.is_initialized()
    model, x = model_and_data()
    with pytest.raises(ConfigError, match="init_process_group"):
        fxa.abstract(model, [x[:50]], distributed=True)
