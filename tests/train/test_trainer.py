"""The train step under sharding, resume, and the config check of checkpoints."""

import jax
import numpy as np
import pytest

from lqseg_jax.convert.common import CheckpointError
from lqseg_jax.train.config import load_config
from lqseg_jax.train.loop import train
from lqseg_jax.train.mesh import make_mesh
from lqseg_jax.train.trainer import Trainer
from tests.helpers import restore_state


def tiny(root=None, **overrides):
    cfg = load_config("configs/daformer.py:tiny", **overrides)
    cfg.data.crop = (64, 64)
    if root is not None:
        cfg.data.root = str(root)
        cfg.data.synthetic.enabled = False
    return cfg


def random_batch(b=8, h=64, w=64, k=10, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, k, (b, h, w)).astype(np.uint8)
    label[:, :5] = 255
    return {"image": rng.integers(0, 256, (b, h, w, 3)).astype(np.uint8), "label": label}


def test_batch_not_divisible_by_devices_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size 4 is not divisible by the 8 devices"):
        Trainer(tiny(batch_size=4))


def run_steps(trainer, n):
    state = trainer.init_state()
    losses = []
    for i in range(n):
        batch = trainer.device_batch(random_batch(seed=i))
        state, metrics = trainer.train_step(state, batch, trainer.step_rng(i))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), jax.device_get(state.rest)


def test_sharded_step_matches_single_device():
    cfg = tiny(**{"mesh.fsdp": 4, "ema.enabled": True})
    sharded = Trainer(cfg, make_mesh(2, 4))
    # The FSDP rules must really shard something on this mesh.
    specs = {str(s.spec) for s in jax.tree.leaves(sharded.state_sharding.params)}
    assert any("fsdp" in s for s in specs), specs
    single = Trainer(cfg, make_mesh(1, 1, jax.devices()[:1]))
    loss_a, params_a, rest_a = run_steps(sharded, 2)
    loss_b, params_b, rest_b = run_steps(single, 2)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    for a, b in zip(jax.tree.leaves(rest_a), jax.tree.leaves(rest_b)):  # BN statistics, RNG state
        if jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_resume_is_bit_identical(tmp_path, synthetic_root, capsys):
    overrides = {"total_steps": 4, "checkpoint.every": 100, "log_every": 1, "batch_size": 8}
    straight = train(tiny(synthetic_root, **overrides), tmp_path / "straight")
    first = train(tiny(synthetic_root, stop_at_step=2, **overrides), tmp_path / "resumed")
    assert first["step"] == 2
    resumed = train(tiny(synthetic_root, **overrides), tmp_path / "resumed")
    assert "Resumed from step 2" in capsys.readouterr().out
    assert resumed["step"] == straight["step"] == 4
    assert resumed["loss"] == straight["loss"]

    abstract_state = Trainer(tiny(synthetic_root, **overrides)).abstract_state
    for a, b in zip(
        jax.tree.leaves(jax.device_get(restore_state(tmp_path / "straight", 4, abstract_state).params)),
        jax.tree.leaves(jax.device_get(restore_state(tmp_path / "resumed", 4, abstract_state).params)),
    ):
        np.testing.assert_array_equal(a, b)


def test_non_finite_step_stops_before_saving(tmp_path, synthetic_root, monkeypatch):
    original = Trainer.train_step

    def spoiled_from_third_step(self, state, batch, rng):
        index = int(state.step)
        state, metrics = original(self, state, batch, rng)
        return state, {**metrics, "grad_norm": np.float32(np.nan)} if index >= 2 else metrics

    monkeypatch.setattr(Trainer, "train_step", spoiled_from_third_step)
    cfg = tiny(synthetic_root, total_steps=6, batch_size=8, log_every=5, **{"checkpoint.every": 2})
    with pytest.raises(FloatingPointError, match=r"grad_norm is nan at step 4;.*latest checkpoint is step 2"):
        train(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_checkpoint_from_other_model_config_is_rejected(tmp_path, synthetic_root):
    train(tiny(synthetic_root, total_steps=1, batch_size=8), tmp_path)
    other = tiny(synthetic_root, total_steps=2, batch_size=8)
    other.model.backbone = "mit_b1"
    other.ema.enabled = True
    with pytest.raises(
        CheckpointError,
        match=r"different config \(ema\.enabled: checkpoint has False, config has True; model\.backbone: "
        r"checkpoint has 'mit_b0', config has 'mit_b1'; total_steps: checkpoint has 1, config has 2\)",
    ):
        train(other, tmp_path)


def test_bf16_compute_keeps_fp32_params():
    trainer = Trainer(tiny(**{"model.dtype": "bfloat16"}), make_mesh(1, 1, jax.devices()[:1]))
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, trainer.device_batch(random_batch()), trainer.step_rng(0))
    assert np.isfinite(float(metrics["loss"]))
    assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {"float32"}
    # the warmup schedule's first value: lr * warmup_ratio (mmcv linear warmup)
    np.testing.assert_allclose(float(metrics["lr"]), 6e-4 * 1e-6, rtol=1e-5)
