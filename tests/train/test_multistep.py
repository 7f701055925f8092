"""MultiStepLR schedule (train/multistep.py) and Adam with the L2 added to the loss (systems/uawarpc.py)
against torch.optim.Adam(weight_decay) + MultiStepLR."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from lqseg_jax.train.multistep import multistep_schedule


def test_multistep_schedule_and_coupled_l2_adam_match_torch():
    lr, wd, milestones, gamma = 0.1, 4e-4, (3, 5), 0.5
    target = np.array([1.0, -2.0, 0.5], np.float32)
    p0 = np.array([0.3, 0.1, -0.4], np.float32)

    t_p = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.Adam([t_p], lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    t_lrs = []
    for _ in range(8):
        opt.zero_grad()
        ((t_p - torch.tensor(target)) ** 4).sum().backward()
        t_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    schedule = multistep_schedule(lr, milestones, gamma)
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(schedule))
    loss = lambda p: jnp.sum((p - target) ** 4) + 0.5 * wd * jnp.sum(p * p)  # noqa: E731
    p = jnp.asarray(p0)
    state = tx.init(p)
    for step in range(8):
        assert float(schedule(step)) == pytest.approx(t_lrs[step], rel=1e-7)
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(np.asarray(p), t_p.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert t_lrs == [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.025]


def test_milestones_must_increase():
    with pytest.raises(ValueError, match="increasing"):
        multistep_schedule(1.0, (5, 3), 0.5)


@pytest.mark.parametrize("variant", ["stage1", "stage2"])
def test_uawarpc_stages_build_their_multistep_optimizer(variant):
    from configs.uawarpc import get_config
    from lqseg_jax.train.optim import build_optimizer

    config = get_config(variant)
    s = config.optimizer.schedule
    tx, schedule = build_optimizer(config.optimizer, {"w": jnp.zeros((2, 3))}, config.total_steps)
    tx.init({"w": jnp.zeros((2, 3))})
    first = s.milestones[0]
    assert float(schedule(first - 1)) == pytest.approx(config.optimizer.lr, rel=1e-7)
    assert float(schedule(first)) == pytest.approx(config.optimizer.lr * s.gamma, rel=1e-7)
    assert float(schedule(config.total_steps - 1)) == pytest.approx(
        config.optimizer.lr * s.gamma ** len(s.milestones), rel=1e-7
    )
