"""MiT per-block rematerialisation (`block_remat`: a jax.checkpoint policy, or "gated"): same outputs and
parameter gradients as without, in train mode (stochastic depth draws replayed identically), and the
backward really recomputes each block ("gated": behind a barrier with the block's output cotangent)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lqseg_jax.models.mit import MixVisionTransformer

pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(2, 1, 2, 1), sr_ratios=(8, 4, 2, 1))


def build(block_remat):
    return MixVisionTransformer(
        **TINY, drop_path_rate=0.5, block_remat=block_remat, rngs=nnx.Rngs(0, dropout=1)
    )


def loss_fn(model, x):
    feats = model(x)  # 4 x (b, h_s, w_s, c_s)
    return sum(jnp.sum(jnp.sin(f) * (i + 1)) for i, f in enumerate(feats)), feats


@pytest.mark.parametrize("policy", ["nothing_saveable", "gated"])
def test_block_remat_gives_the_same_outputs_and_gradients(policy):
    x = jax.random.normal(jax.random.key(3), (2, 64, 72, 3))  # (b, h, w, 3)
    results = []
    for block_remat in (None, policy):
        model = build(block_remat)
        model.train()  # drop-path on: its draws must be replayed identically in the recomputation
        (loss, feats), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model, x)
        results.append((loss, feats, grads, nnx.state(model, nnx.RngState)))
    (loss0, feats0, grads0, rng0), (loss1, feats1, grads1, rng1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for f0, f1 in zip(feats0, feats1):
        np.testing.assert_allclose(f1, f0, rtol=1e-6, atol=1e-6)
    flat0, flat1 = dict(nnx.to_flat_state(grads0)), dict(nnx.to_flat_state(grads1))
    assert flat0.keys() == flat1.keys() and len(flat0) > 50
    for path, g0 in flat0.items():
        g0 = g0.get_value()  # fp32: the recomputed forward may fuse differently (reassociation)
        np.testing.assert_allclose(
            flat1[path].get_value(), g0, rtol=1e-4, atol=1e-5 * np.abs(g0).max(), err_msg=str(path)
        )
    # the random streams advanced the same way (the next step's drop-path draws are the same too)
    for (path, r0), (_, r1) in zip(nnx.to_flat_state(rng0), nnx.to_flat_state(rng1)):
        v0, v1 = r0.get_value(), r1.get_value()
        if jnp.issubdtype(v0.dtype, jax.dtypes.prng_key):
            v0, v1 = jax.random.key_data(v0), jax.random.key_data(v1)
        np.testing.assert_array_equal(v1, v0, err_msg=str(path))
    # and the drop-path draws were not all "keep": the test exercises the replay
    no_drop = build(None)
    no_drop.eval()
    assert not np.allclose(no_drop(x)[-1], feats0[-1], atol=1e-3)


@pytest.mark.parametrize("block_remat", [None, "nothing_saveable"])
def test_block_remat_recomputes_each_block_in_the_backward(block_remat):
    model = build(block_remat)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x):
        return loss_fn(nnx.merge(graphdef, params, rest, copy=True), x)[0]

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, jnp.ones((1, 64, 64, 3))))
    # the backward pass holds one rematerialised forward per block (none without block_remat)
    assert jaxpr.count("remat") == (sum(TINY["depths"]) if block_remat else 0)


def test_gated_block_remat_recomputes_each_block_behind_its_output_cotangent():
    model = build("gated")
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x):
        return loss_fn(nnx.merge(graphdef, params, rest, copy=True), x)[0]

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, jnp.ones((1, 64, 64, 3))))
    # one barrier per block joins its saved input with its output cotangent before the recomputation
    assert jaxpr.count("optimization_barrier") == sum(TINY["depths"])


def test_block_remat_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match=r"block_remat must be None or one of nothing_saveable, "):
        build("save_everything_please")
