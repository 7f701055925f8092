"""UAWarpC system pieces: the three train-mode head passes (one scan) equal three sequential calls, outputs
and BatchNorm running statistics alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lqseg_jax.models.uawarpc import UAWarpCHead
from lqseg_jax.systems.uawarpc import three_passes


def _feats(key, b=2, c=8):
    k = jax.random.split(key, 4)
    return (
        [jax.random.normal(k[0], (b, 16, 16, c)), jax.random.normal(k[1], (b, 8, 8, c))],
        [jax.random.normal(k[2], (b, 32, 32, c)), jax.random.normal(k[3], (b, 16, 16, c))],
    )


@pytest.mark.slow
def test_three_passes_equal_sequential_train_mode_calls():
    head = UAWarpCHead(rngs=nnx.Rngs(0))
    head.train()
    (a, a256), (b, b256), (c, c256) = (_feats(jax.random.key(i)) for i in range(3))
    passes = [(a, b, a256, b256), (a, c, a256, c256), (c, b, c256, b256)]
    size = (64, 64)
    twin = nnx.clone(head)

    @nnx.jit
    def scanned(h):
        return three_passes(h, passes, size)

    @nnx.jit
    def sequential(h):
        return [h(*p, size) for p in passes]

    got, expect = scanned(head), sequential(twin)
    # fp32 reassociation inside the scan: flows (tens of pixels) and log-variances agree to 1e-4 (measured
    # 6e-5 px at most: the level-4 flow is a mapping times 16 minus the grid, which amplifies rounding)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expect), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)
    stats = jax.tree.leaves(nnx.state(head, nnx.BatchStat))
    twin_stats = jax.tree.leaves(nnx.state(twin, nnx.BatchStat))
    fresh = jax.tree.leaves(nnx.state(UAWarpCHead(rngs=nnx.Rngs(0)), nnx.BatchStat))
    assert any(not np.allclose(s, f) for s, f in zip(stats, fresh))  # the running statistics moved
    for s, t in zip(stats, twin_stats, strict=True):
        np.testing.assert_allclose(np.asarray(s), np.asarray(t), rtol=1e-4, atol=1e-5)
    assert jnp.isfinite(got[2][-1][0]).all()


def test_tiny_head_options_keep_the_structure():
    """coarse_size 144 / head_width 0.25 (configs/uawarpc.py:tiny): level 4 sees a 9x9 global correlation (81
    channels, search size 9), every head width is a quarter; other coarse sizes are refused in one line."""
    head = UAWarpCHead(coarse_size=144, head_width=0.25, rngs=nnx.Rngs(0))
    assert head.decoder4.conv_0.conv.kernel.shape == (3, 3, 81, 32)
    assert head.estimate_uncertainty_components4.search_size == 9
    assert head.decoder1.predict_mapping.kernel.shape == (3, 3, 8, 2)
    assert head.refinement_module_finest.dc_convs[0].conv.kernel.shape == (3, 3, 8, 32)
    assert head.estimate_uncertainty_components1.pred_conv_0.conv.kernel.shape == (3, 3, 6 + 8 + 3, 8)
    assert head.reduce.kernel.shape == (1, 1, 8, 2)
    with pytest.raises(ValueError, match=r"coarse_size must be 256 or 144 .* got 128"):
        UAWarpCHead(coarse_size=128, rngs=nnx.Rngs(0))
