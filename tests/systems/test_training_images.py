"""Degradation wiring: batches reach the device clean and are degraded there; the clean image is kept."""

import jax
import numpy as np

from lqseg_jax.systems import get_system
from lqseg_jax.train.config import load_config


def test_training_images_degrade_on_device_and_keep_hq():
    cfg = load_config("configs/daformer.py:tiny")
    rng = np.random.default_rng(0)
    batch = {"image": jax.numpy.asarray(rng.integers(0, 256, (2, 48, 64, 3)).astype(np.uint8))}
    key = jax.random.key(3)

    lq, hq = get_system(cfg).training_images(batch, key)
    np.testing.assert_array_equal(lq, hq)  # degradation off by default
    cfg.degradation.enabled = True
    system = get_system(cfg)
    step = jax.jit(system.training_images)
    lq, hq = step(batch, key)
    np.testing.assert_array_equal(hq, np.asarray(batch["image"], np.float32))
    assert lq.shape == hq.shape and lq.dtype == np.float32
    assert float(np.abs(np.asarray(lq) - np.asarray(hq)).mean()) > 1.0  # really degraded
    assert 0.0 <= float(lq.min()) and float(lq.max()) <= 255.0
    np.testing.assert_array_equal(step(batch, key)[0], lq)  # replays from the same step key
    assert not np.array_equal(step(batch, jax.random.key(4))[0], lq)
