"""Our UNet2DConditionModel against diffusers' (PyTorch) on two tiny random configs.

Compared: the predicted sample and every up-block output (torch forward hooks on up_blocks), in fp32 at
max abs diff <= 1e-4; the input gradient with remat on; the bf16 compute path at a bf16 tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from lqseg_jax.convert.diffusers_sd import build_unet, convert_unet

# A: linear projection, per-block head counts, 3 blocks ending in DownBlock2D, one resnet per block.
TINY_A = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    attention_head_dim=[2, 4, 4],
    cross_attention_dim=24,
    norm_num_groups=8,
    use_linear_projection=True,
)
# B: conv projection, one head count for all blocks, the SD 4-block layout, two resnets per block, two
# transformer layers in one block, a cross-attention-only block, other time-embedding options, a
# mid-block scale, and (in the test) a latent whose size is not a multiple of 8 (forwarded upsample size).
TINY_B = dict(
    sample_size=16,
    in_channels=4,
    out_channels=3,
    block_out_channels=[16, 32, 48, 48],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2,
    attention_head_dim=2,
    cross_attention_dim=20,
    transformer_layers_per_block=[1, 2, 1, 1],
    only_cross_attention=[False, True, False, False],
    norm_num_groups=8,
    use_linear_projection=False,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1.5,
)
CASES = {
    "A_linear_proj": (TINY_A, (16, 16), np.array([1.0, 1.0], np.float32)),
    "B_conv_proj_odd_size": (TINY_B, (10, 14), np.array([37.0, 981.0], np.float32)),
}


pytestmark = pytest.mark.usefixtures("fast_compile")


@nnx.jit
def forward(model, x, timesteps, ctx):
    return model(x, timesteps, ctx)


def torch_reference(config, hw, timesteps, seed=0):
    torch.manual_seed(seed)
    unet = TorchUNet(**config).eval()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, config["in_channels"], *hw)).astype(np.float32)  # NCHW
    ctx = rng.normal(size=(2, 7, config["cross_attention_dim"])).astype(np.float32)
    feats = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: feats.append(o.detach().numpy())) for b in unet.up_blocks
    ]
    with torch.no_grad():
        out = unet(torch.from_numpy(x), torch.from_numpy(timesteps), torch.from_numpy(ctx)).sample.numpy()
    for h in hooks:
        h.remove()
    nhwc = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
    return unet, nhwc(x), ctx, nhwc(out), [nhwc(f) for f in feats]


@pytest.mark.parametrize("case", list(CASES))
def test_unet_matches_diffusers(case):
    config, hw, timesteps = CASES[case]
    unet, x, ctx, ref_out, ref_feats = torch_reference(config, hw, timesteps)
    model = convert_unet(unet.state_dict(), config)
    out, feats = forward(model, jnp.asarray(x), jnp.asarray(timesteps), jnp.asarray(ctx))
    assert len(feats) == len(config["up_block_types"])
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-4, rtol=0)
    for i, (f, r) in enumerate(zip(feats, ref_feats)):
        assert f.shape == r.shape, f"up block {i}"
        np.testing.assert_allclose(np.asarray(f), r, atol=1e-4, rtol=0, err_msg=f"up block {i}")


def test_remat_gradient_and_bf16_match_diffusers():
    config, hw, timesteps = CASES["A_linear_proj"]
    unet, x, ctx, ref_out, ref_feats = torch_reference(config, hw, timesteps, seed=1)
    # torch input gradient of a loss over the sample and every up-block feature
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    feats = []
    hooks = [b.register_forward_hook(lambda m, i, o: feats.append(o)) for b in unet.up_blocks]
    out_t = unet(xt, torch.from_numpy(timesteps), torch.from_numpy(ctx)).sample
    for h in hooks:
        h.remove()
    loss_t = (out_t**2).mean() + sum((f**2).mean() for f in feats)
    loss_t.backward()
    ref_grad = xt.grad.numpy().transpose(0, 2, 3, 1)

    converted = convert_unet(unet.state_dict(), config)
    model = build_unet(config, remat=True)
    nnx.update(model, nnx.state(converted))

    def loss(m, xi):
        o, fs = m(xi, jnp.asarray(timesteps), jnp.asarray(ctx))
        return jnp.mean(o**2) + sum(jnp.mean(f**2) for f in fs)

    value, grad = nnx.jit(nnx.value_and_grad(loss, argnums=1))(model, jnp.asarray(x))
    np.testing.assert_allclose(float(value), float(loss_t.detach()), rtol=1e-5)
    scale = np.abs(ref_grad).max()
    np.testing.assert_allclose(np.asarray(grad) / scale, ref_grad / scale, atol=1e-4)

    # bf16 compute (fp32 params, fp32 norms/softmax) stays within bf16 rounding of the fp32 reference
    bf16_model = build_unet(config, dtype=jnp.bfloat16)
    nnx.update(bf16_model, nnx.state(converted))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16_model, nnx.Param)))
    out, feats_bf16 = forward(bf16_model, jnp.asarray(x), jnp.asarray(timesteps), jnp.asarray(ctx))
    assert out.dtype == jnp.bfloat16
    for got, ref in zip([out, *feats_bf16], [ref_out, *ref_feats]):
        rel = np.linalg.norm(np.asarray(got, np.float32) - ref) / np.linalg.norm(ref)
        assert rel < 2e-2, rel
