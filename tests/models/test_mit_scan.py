"""MiT `scan_blocks`: each stage's blocks as one jax.lax.scan over their stacked states with a
rematerialised body. Same outputs, parameter gradients and drop-path draws (per block, from each block's
own key stream, at its own rate) as the unrolled blocks; the parameter layout is unchanged; the backward
pass is one loop per stage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lqseg_jax.models.mit import MixVisionTransformer

pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))


def build(scan_blocks, drop_path_rate, train):
    model = MixVisionTransformer(
        **TINY, drop_path_rate=drop_path_rate, scan_blocks=scan_blocks, rngs=nnx.Rngs(0, dropout=1)
    )
    model.train() if train else model.eval()
    return model


def loss_fn(model, x):
    feats = model(x)  # 4 x (b, h_s, w_s, c_s)
    return sum(jnp.sum(jnp.sin(f) * (i + 1)) for i, f in enumerate(feats)), feats


def run(model, x):
    (loss, feats), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model, x)
    return (
        loss,
        feats,
        dict(nnx.to_flat_state(grads)),
        dict(nnx.to_flat_state(nnx.state(model, nnx.RngState))),
    )


def key_values(v):
    return jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v


def assert_same(scan, unrolled):
    (loss1, feats1, grads1, rng1), (loss0, feats0, grads0, rng0) = scan, unrolled
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for f0, f1 in zip(feats0, feats1):
        np.testing.assert_allclose(f1, f0, rtol=1e-6, atol=1e-6)
    assert grads1.keys() == grads0.keys() and len(grads0) > 100  # the same parameter layout
    for path, g0 in grads0.items():
        g0 = g0.get_value()
        np.testing.assert_allclose(
            grads1[path].get_value(), g0, rtol=1e-6, atol=1e-6 * np.abs(g0).max(), err_msg=str(path)
        )
    assert rng1.keys() == rng0.keys()
    for path, r0 in rng0.items():  # the streams advanced alike: the next step draws the same masks too
        np.testing.assert_array_equal(
            key_values(rng1[path].get_value()), key_values(r0.get_value()), str(path)
        )


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_scan_gives_the_unrolled_outputs_and_gradients(train):
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))  # (b, h, w, 3)
    rate = 0.0 if train else 0.3  # eval: stochastic depth is off whatever the rate
    assert_same(run(build(True, rate, train), x), run(build(False, rate, train), x))


def test_scan_draws_each_blocks_stochastic_depth_at_its_rate():
    x = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))  # (b, h, w, 3)
    scan = build(True, 0.6, train=True)
    rates = [blk.drop_path.rate for s in range(1, 5) for blk in getattr(scan, f"block{s}")]
    np.testing.assert_allclose(rates, np.linspace(0, 0.6, 8))  # the decay rule, per block
    before = {p: int(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(scan, nnx.RngCount))}
    result = run(scan, x)
    # the same masks as the unrolled blocks (each block's own stream, its own rate) ...
    assert_same(result, run(build(False, 0.6, train=True), x))
    # ... which draw: every block with a positive rate advanced its stream twice (attention, Mix-FFN),
    # the first block (rate 0) not at all
    after = {p: int(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(scan, nnx.RngCount))}
    advanced = [after[p] - before[p] for p in sorted(before, key=str)]
    assert sorted(advanced) == [0] + [2] * 7
    # ... and drop: the train-mode features differ from the eval-mode ones
    scan.eval()
    assert not np.allclose(scan(x)[-1], result[1][-1], atol=1e-3)


def test_scan_backward_is_one_loop_per_stage():
    model = build(True, 0.0, train=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x):
        return loss_fn(nnx.merge(graphdef, params, rest, copy=True), x)[0]

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, jnp.ones((1, 32, 32, 3))))
    assert jaxpr.count("scan[") == 8  # 4 stages forward, 4 backward loops
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= 4  # each body rematerialised


def test_scan_blocks_refuses_block_remat():
    with pytest.raises(ValueError, match="block_remat must be None"):
        MixVisionTransformer(**TINY, scan_blocks=True, block_remat="nothing_saveable", rngs=nnx.Rngs(0))
