"""Degradation wiring: batches reach the device clean and are degraded there; the clean image is kept."""

import jax
import numpy as np

from lqseg_jax.systems import get_system
from lqseg_jax.train.config import load_config


def test_training_images_degrade_on_device_and_keep_hq():
    cfg = load_config("configs/daformer.py:tiny")
    rng = np.random.default_rng(0)
    batch = {"image": jax.numpy.asarray(rng.integers(0, 256, (2, 80, 96, 3)).astype(np.uint8))}
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


def test_training_images_under_a_mesh_match_unsharded():
    from lqseg_jax.train.mesh import batch_sharding, make_mesh

    cfg = load_config(
        "configs/daformer.py:tiny", **{"degradation.enabled": True, "degradation.preset": "light"}
    )
    system = get_system(cfg)
    images = np.random.default_rng(1).integers(0, 256, (4, 80, 80, 3)).astype(np.uint8)
    key = jax.random.key(5)
    plain = jax.jit(system.training_images)({"image": jax.numpy.asarray(images)}, key)[0]
    mesh = make_mesh(4, 1, jax.devices()[:4])
    with jax.set_mesh(mesh):
        batch = {"image": jax.device_put(images, batch_sharding(mesh))}
        sharded = jax.jit(system.training_images)(batch, key)[0]
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), atol=1.0)  # 8-bit steps of 1/255
    assert float(np.mean(np.asarray(sharded) != np.asarray(plain))) < 1e-3
