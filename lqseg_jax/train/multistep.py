"""torch's MultiStepLR as an optax schedule, for UAWarpC's Adam (refign.md O13): lr(t) = base * gamma^k with k
the number of milestones <= t (the scheduler steps after every optimizer step, so update t, counted from 0,
uses it). lqseg_jax/train/optim.py dispatches optimizer.schedule.kind "multistep" here."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import optax


def multistep_schedule(base_lr: float, milestones: Sequence[int], gamma: float) -> optax.Schedule:
    if list(milestones) != sorted(milestones):
        raise ValueError(f"optimizer.schedule.milestones must be increasing, got {tuple(milestones)}")
    bounds = jnp.asarray(list(milestones), jnp.int32)

    def schedule(step):
        k = jnp.sum(jnp.asarray(step, jnp.int32) >= bounds)
        return base_lr * jnp.asarray(gamma, jnp.float32) ** k

    return schedule
