"""A netmend run for tests/test_cache.py's kill-and-resume test, in its own process.

Usage: python tests/_cache_worker.py CACHE_DIR OUT_FILE
Runs ``netmend.identify(..., cache_dir=CACHE_DIR)`` on a small seeded problem and writes the
scores and the cache summary to OUT_FILE (safetensors). With ``NETMEND_TEST_SLEEP=s`` in the
environment, every forward pass over a training chunk sleeps ``s`` seconds, so that the test
can kill the process in the middle of a pass. Every chunk is checkpointed.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn

import netmend
import netmend.store

N, D, CLASSES, FAILURES = 3000, 6, 3, 6
CHUNK = 128


class SlowMLP(nn.Module):
    """A small MLP; sleeps per training chunk when NETMEND_TEST_SLEEP is set (not numerics)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, CLASSES))
        self.sleep = float(os.environ.get("NETMEND_TEST_SLEEP", "0"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sleep and x.shape[0] > FAILURES:
            time.sleep(self.sleep)
        return self.net(x)


def problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """A seeded model (float64), training set ``[N, D]`` and failures it gets wrong."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    torch.manual_seed(0)
    model = SlowMLP().double().eval()
    Xf = torch.randn(FAILURES, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        yf = (model.net(Xf).argmax(1) + 1) % CLASSES
    return model, (X, y), (Xf, yf)


def run(cache_dir: str | None) -> netmend.Identification:
    model, train, failures = problem()
    return netmend.identify(
        model, train, failures, "ewc", chunk_size=CHUNK, progress=False, device="cpu",
        cache_dir=cache_dir,
    )  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    netmend.store.CHECKPOINT_SECONDS = 0.0
    cache_dir, out = sys.argv[1], sys.argv[2]
    res = run(cache_dir)
    scores = torch.from_numpy(res.scores)
    netmend.store.save_tensors(out, {"scores": scores}, {"cache": res.info["cache"]})
    print(json.dumps(res.info["cache"]))


if __name__ == "__main__":
    main()
