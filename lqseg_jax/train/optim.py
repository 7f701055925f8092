"""Optimizer recipes: AdamW with per-group learning-rate multipliers, no decay on 1-D (or named)
parameters, linear warmup then poly decay, and global-norm gradient clipping.

The update of a parameter in group g is -lr(t) * mult_g * (adam + wd * p), which is what PyTorch's
AdamW does when group g has lr = base_lr * mult_g (decoupled decay scales with the group's lr).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from .mesh import path_name


def warmup_poly_schedule(
    base_lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    end_lr: float = 0.0,
) -> optax.Schedule:
    """mmcv 'poly' with linear warmup: poly(t) = (base - end) (1 - t/T)^power + end, and during the first
    `warmup_steps` steps lr(t) = poly(t) * (1 - (1 - t/W)(1 - warmup_ratio)). detectron2's WarmupPolyLR
    without warmup is the same curve with end_lr = 0."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        frac = jnp.clip(1.0 - t / total_steps, 0.0, 1.0)
        lr = (base_lr - end_lr) * frac**power + end_lr
        if warmup_steps > 0:
            # 1 - (1 - t/W)(1 - r), written so that float32 keeps r's precision at t = 0
            factor = warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps
            lr = jnp.where(t < warmup_steps, lr * factor, lr)
        return lr

    return schedule


def warmup_linear_schedule(
    base_lr: float, total_steps: int, *, warmup_steps: int, warmup_ratio: float = 1e-6
) -> optax.Schedule:
    """refign's schedule (helpers/lr_scheduler.py): lr(t) = base (1 - (1 - t/W)(1 - warmup_ratio)) for
    t < W, then base (1 - (t - W)/(T - W)), reaching 0 at T (the decay runs over the steps after warmup)."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        # 1 - (t - W)/(T - W) written as (T - t)/(T - W): exact in float32 near T
        decay = base_lr * jnp.clip((total_steps - t) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        if warmup_steps <= 0:
            return decay
        warm = base_lr * (warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps)
        return jnp.where(t < warmup_steps, warm, decay)

    return schedule


def _by_rules(params: Any, rules, default, fn=None) -> Any:
    """A tree like `params` holding, per leaf, the value of the first (regex, value) rule matching its path."""

    def pick(path, leaf):
        name = path_name(path)
        for pattern, value in rules:
            if re.search(pattern, name):
                return value
        return default if fn is None else fn(name, leaf)

    return jax.tree_util.tree_map_with_path(pick, params)


def scale_by_tree(factors: Any) -> optax.GradientTransformation:
    """Multiplies each update leaf by the matching leaf of `factors` (a static tree of floats)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda f, u: u * f, factors, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def lr_multipliers(params: Any, rules) -> Any:
    return _by_rules(params, [(p, float(m)) for p, m in rules], 1.0)


def decay_mask(params: Any, no_decay: tuple[str, ...], no_decay_1d: bool) -> Any:
    rules = [(p, False) for p in no_decay]
    return _by_rules(params, rules, None, fn=lambda name, leaf: not (no_decay_1d and leaf.ndim <= 1))


def build_optimizer(
    cfg: ml_collections.ConfigDict, params: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer described by `cfg` (config.optimizer) for `params` (a tree of arrays or abstract leaves)."""
    if cfg.name != "adamw":
        raise ValueError(f"optimizer.name must be 'adamw', got {cfg.name!r}")
    s = cfg.schedule
    kind = s.get("kind", "poly")
    if kind == "warmup_linear":
        schedule = warmup_linear_schedule(
            cfg.lr, total_steps, warmup_steps=s.warmup_steps, warmup_ratio=s.warmup_ratio
        )
    elif kind == "poly":
        schedule = warmup_poly_schedule(
            cfg.lr,
            total_steps,
            warmup_steps=s.warmup_steps,
            warmup_ratio=s.warmup_ratio,
            power=s.power,
            end_lr=s.end_lr,
        )
    elif kind == "multistep":
        from .multistep import multistep_schedule

        schedule = multistep_schedule(cfg.lr, tuple(s.milestones), s.gamma)
    else:
        raise ValueError(
            f"optimizer.schedule.kind must be 'poly', 'warmup_linear' or 'multistep', got {kind!r}"
        )
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(
            cfg.weight_decay, mask=decay_mask(params, tuple(cfg.no_decay), cfg.no_decay_1d)
        ),
        optax.scale_by_learning_rate(schedule),
        scale_by_tree(lr_multipliers(params, cfg.lr_mults)),
    ]
    return optax.chain(*parts), schedule


def default_config() -> ml_collections.ConfigDict:
    """Fields of config.optimizer (experiment configs override them)."""
    return ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=6e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            no_decay_1d=True,
            no_decay=(),
            lr_mults=(),
            clip_norm=0.0,
            schedule=dict(warmup_steps=0, warmup_ratio=1e-6, power=1.0, end_lr=0.0),
        )
    )
