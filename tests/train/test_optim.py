"""Our optimizer recipe against torch.optim.AdamW with parameter groups and mmcv's poly/warmup formula."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import torch

from lqseg_jax.train.optim import build_optimizer, default_config, warmup_poly_schedule


def test_schedule_matches_mmcv_formula():
    sched = warmup_poly_schedule(6e-4, 100, warmup_steps=10, warmup_ratio=1e-6, power=1.0)
    for t in (0, 3, 9, 10, 50, 99, 100):
        poly = 6e-4 * (1 - t / 100)
        expected = poly * (1 - (1 - t / 10) * (1 - 1e-6)) if t < 10 else poly
        np.testing.assert_allclose(float(sched(t)), expected, rtol=1e-5, atol=1e-12)
    rass = warmup_poly_schedule(1e-4, 1000, power=0.9)
    np.testing.assert_allclose(float(rass(250)), 1e-4 * 0.75**0.9, rtol=1e-5)


def test_adamw_groups_match_torch():
    rng = np.random.default_rng(0)
    init = {
        "backbone": {
            "kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "bias": rng.normal(size=4).astype(np.float32),
        },
        "head": {
            "kernel": rng.normal(size=(4, 2)).astype(np.float32),
            "scale": rng.normal(size=2).astype(np.float32),
        },
    }
    cfg = default_config()
    cfg.lr, cfg.weight_decay, cfg.clip_norm = 1e-2, 0.05, 0.5
    cfg.lr_mults = ((r"^backbone\.", 0.1),)
    cfg.schedule = ml_collections.ConfigDict(dict(warmup_steps=0, warmup_ratio=1e-6, power=0.9, end_lr=0.0))
    total = 20
    tx, _ = build_optimizer(cfg, init, total)

    tparams = {k: {n: torch.nn.Parameter(torch.tensor(v)) for n, v in g.items()} for k, g in init.items()}
    groups = []
    for k, g in tparams.items():
        for p in g.values():
            groups.append(
                {
                    "params": [p],
                    "lr": 1e-2 * (0.1 if k == "backbone" else 1.0),
                    "weight_decay": 0.05 if p.ndim > 1 else 0.0,
                }
            )
    topt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    base = [g["lr"] for g in topt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(topt, [lambda t: (1 - t / total) ** 0.9] * len(groups))

    params = {k: {n: jnp.asarray(v) for n, v in g.items()} for k, g in init.items()}
    state = tx.init(params)
    for _ in range(5):
        grads_np = {
            k: {n: rng.normal(size=v.shape).astype(np.float32) * 3 for n, v in g.items()}
            for k, g in init.items()
        }
        updates, state = tx.update(
            {k: {n: jnp.asarray(v) for n, v in g.items()} for k, g in grads_np.items()}, state, params
        )
        params = optax.apply_updates(params, updates)
        for k, g in tparams.items():
            for n, p in g.items():
                p.grad = torch.tensor(grads_np[k][n])
        torch.nn.utils.clip_grad_norm_([p for g in tparams.values() for p in g.values()], 0.5)
        topt.step()
        sched.step()
    assert base[0] != base[-1]
    for k, g in tparams.items():
        for n, p in g.items():
            np.testing.assert_allclose(np.asarray(params[k][n]), p.detach().numpy(), rtol=1e-5, atol=1e-6)
