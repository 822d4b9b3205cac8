"""Sharding passes over ``torch.distributed`` ranks (netmend.data.distributed).

The sharding rule is checked alone; then two gloo processes on this CPU score a tiny float64
problem and must agree with one process; a rank that fails must stop every rank.
"""

from __future__ import annotations

import copy
import time

import _dist_worker  # tests/ is on sys.path (pytest rootdir conftest)
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from netmend.data import distributed
from netmend.lab.models import MLP
from netmend.model.training import TrainConfig, fit


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shards_cover_every_index_once(world_size):
    for n in [0, 1, 5, 16, 17, 101, 1000, 1003]:
        for chunk in [1, 3, 16, 128]:
            for start in sorted({0, min(n, 5), n}):
                blocks = [
                    distributed.shard(n, chunk, r, world_size, start) for r in range(world_size)
                ]
                rows = [i for b in blocks for i in b]
                assert rows == list(range(start, n)), (n, chunk, start)  # once, in rank order
                count = -(-(n - start) // chunk)
                sizes = [-(-len(b) // chunk) for b in blocks]  # chunks per rank
                assert sum(sizes) == count
                assert max(sizes) - min(sizes) <= 1  # balanced to one chunk
                for b in blocks:  # chunk-aligned: one process's chunk boundaries
                    assert len(b) == 0 or (b.start - start) % chunk == 0


def test_shard_refuses_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        distributed.shard(10, 0, 0, 1)
    with pytest.raises(ValueError, match="rank"):
        distributed.shard(10, 2, 2, 2)
    with pytest.raises(ValueError, match="start"):
        distributed.shard(10, 2, 0, 1, start=11)


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.world()
    monkeypatch.setenv(distributed.DISABLE_ENV, "0")
    assert distributed.world() == (0, 1)


def _problem() -> dict:
    g = torch.Generator().manual_seed(0)
    n, d, c = 101, 5, 3  # 101 = 7 chunks of 16 (the last one short): uneven over 2 ranks
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    torch.manual_seed(0)
    model = MLP(d, c, hidden=(8,)).double()
    fresh = copy.deepcopy(model)
    fit(model, X, y, TrainConfig(epochs=20, batch_size=32, lr=1e-2), seed=0, progress=False)
    Xq = torch.randn(60, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        pred = model(Xq).argmax(1)
    yq = (pred + 1) % c  # failures: labelled against the prediction
    return {"model": model.eval(), "fresh": fresh, "train": (X, y), "failures": (Xq[:12], yq[:12])}


def _spawn(target, args, size: int, wait_s: float) -> list:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, size, *args)) for r in range(size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return hung


def _on_two_ranks(worker, problem: dict, tmp_path, wait_s: float) -> list:
    """``worker`` on 2 gloo ranks over ``problem`` (saved for them); what each rank recorded.
    A rank that hangs fails the test."""
    torch.save(problem, tmp_path / "problem.pt")
    args = (str(tmp_path / "rdv"), str(tmp_path / "problem.pt"), str(tmp_path))
    assert not _spawn(worker, args, 2, wait_s)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_two_processes_score_as_one(tmp_path):
    problem = _problem()
    ranks = _on_two_ranks(_dist_worker.equal_scores, problem, tmp_path, 120)
    one = _dist_worker.score_all(problem)
    for name in [*_dist_worker.METHODS, "ewc_dataset", "ewc_per_failure", "fit"]:
        want = one[name].numpy()
        scale = np.abs(want).max()
        assert scale > 0
        for got in ranks:
            np.testing.assert_allclose(
                got[name].numpy(), want, rtol=1e-6, atol=1e-9 * scale, err_msg=name
            )
    assert [tuple(got["world"].tolist()) for got in ranks] == [(0, 2), (1, 2)]
    for got in ranks:
        np.testing.assert_array_equal(got["ewc_auto_causes"], one["ewc_auto_causes"])
        np.testing.assert_allclose(got["cached_first"], one["ewc"], rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(got["cached_again"], got["cached_first"])
        assert int(got["cache_reused"]) == 1  # the rerun read the result back on every rank
    # rank 0 wrote the cache alone: one settings file, one result, its passes
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert "settings.json" in files and "result.call0.safetensors" in files
    assert not [f for f in files if f.endswith(".tmp")]


@pytest.mark.parametrize("mode", ["hard", "stall"])
def test_a_failed_rank_stops_every_rank(tmp_path, mode):
    """An exception, a dead process and a stalled one on rank 1 all end rank 0's pass with
    an error: at once, or after the group's timeout for the stalled rank."""
    hung = _spawn(_dist_worker.failing, (str(tmp_path / "rdv"), str(tmp_path), mode), 2, 90)
    assert not hung, "a rank hung instead of raising"
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # an exception on rank 1: rank 1 raises it, rank 0 raises RankFailedError naming it
    assert r1["soft"][0] == "ValueError" and "exploded" in r1["soft"][1]
    assert r0["soft"][0] == "RankFailedError"
    assert "rank 1: ValueError: chunk exploded on purpose" in r0["soft"][1]
    # rank 1 dies or stalls (it records nothing more): rank 0 gets an error, not a hang
    assert mode not in r1
    assert r0[mode][0] != "no error"
    if mode == "hard":  # the closed connection is seen at once
        assert r0[mode][2] < _dist_worker.STALL_TIMEOUT_S
    else:  # the group's timeout ends the wait
        assert _dist_worker.STALL_TIMEOUT_S - 1 < r0[mode][2] < _dist_worker.STALL_TIMEOUT_S + 15


def test_check_same_names_what_differs(monkeypatch):
    """Ranks holding other parameter values were reported as holding 'different model and
    data sizes'; the refusal now names what differs, with each rank's reading."""
    ranks = [
        {"model parameters": "ab12", "training examples": 100, "failures": 8},
        {"model parameters": "ff00", "training examples": 100, "failures": 8},
    ]
    monkeypatch.setattr(distributed, "agree", lambda error, what, meta: ranks)
    with pytest.raises(ValueError) as exc:
        distributed.check_same(ranks[0], "identify")
    msg = str(exc.value)
    assert "different model parameters (by rank: model parameters: ['ab12', 'ff00'])" in msg
    assert "training examples" not in msg and "sizes" not in msg
    ranks[1] = dict(ranks[0], failures=9)
    with pytest.raises(ValueError, match=r"different failures \(by rank: failures: \[8, 9\]\)"):
        distributed.check_same(ranks[0], "identify")
    ranks[1] = dict(ranks[0])
    distributed.check_same(ranks[0], "identify")  # equal readings pass


def test_ranks_holding_other_inputs_are_refused_and_only_rank_0_warns(tmp_path):
    """Ranks with another buffer, other labels or images of the same shape, another seed or
    another cache folder chose other causes with no word (or hung on different collectives);
    a Repairer loaded right after its save read the folder before rank 0 had written it; and
    every warning was printed once per rank."""
    ranks = _on_two_ranks(_dist_worker.rank_differences, _problem(), tmp_path, 180)
    named = {"buffer": "model parameters and buffers", "labels": "training data (content hash)",
             "images": "training data (content hash)", "seed": "seed",
             "cache": "cache_dir"}  # fmt: skip
    for what, name in named.items():
        for got in ranks:  # refused on every rank, naming what differs
            assert got[what] != "no error" and name in got[what], (what, got[what])
    for got in ranks:
        assert got["loaded_causes"] == got["saved_causes"] == ranks[0]["saved_causes"]
    # the failures (labelled as the model predicts) warn, on rank 0 only
    assert ranks[0]["warnings"] and not ranks[1]["warnings"]
