"""Baselines that ignore the failures: self-loss and random.

They answer "does conditioning on the failures earn its cost?": self-loss ranks examples by
how badly the model fits their own label, which already flags most flipped labels.
"""

from __future__ import annotations

import numpy as np

from netmend.identification.base import Context, MethodOutput, register
from netmend.model.functional import log_likelihoods


@register("loss", options=())
def self_loss(ctx: Context) -> MethodOutput:
    """Scores ``-log p(z|theta_hat) - log 2``, ``[N]``: the example's own loss, shifted so
    that ``r > 0`` exactly when the model gives the example's label less than even odds.

    Per-failure culprits are the same ranking for every failure (the method sees none).
    """
    ll = log_likelihoods(ctx.fm, ctx.theta, ctx.X, ctx.y, ctx.chunk_size, ctx.device)
    scores = (-ll).double().numpy() - np.log(2.0)
    m = len(ctx.Xq)
    return MethodOutput(
        scores=scores,
        per_failure=lambda: np.repeat(scores.astype(np.float32)[:, None], m, axis=1),
    )


@register("random", options=())
def random_scores(ctx: Context) -> MethodOutput:
    """Uniform random scores in [-1, 1) from ``ctx.seed``: the chance reference."""
    # a stream of its own: np.random.default_rng(seed) alone would replay the very draws that
    # seeded corruptions (netmend.corrupt) made, and rank the flipped examples last
    rng = np.random.default_rng([ctx.seed, 0x52414E44])
    m = len(ctx.Xq)
    return MethodOutput(
        scores=rng.uniform(-1, 1, size=ctx.N),
        per_failure=lambda: rng.uniform(-1, 1, size=(ctx.N, m)).astype(np.float32),
    )
