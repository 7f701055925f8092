"""Our VAE encoder against diffusers' AutoencoderKL (PyTorch) on two tiny random configs.

Compared at max abs diff <= 1e-4 (fp32): every encoder down-block output (torch forward hooks), the
posterior mean and log-variance; the latent sample against mean + std * the same noise, times the scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

from lqseg_jax.convert.diffusers_sd import convert_vae

TINY_A = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 32, 48],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.18215,
)
TINY_B = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[8, 16, 24],
    layers_per_block=1,
    latent_channels=3,
    norm_num_groups=4,
    scaling_factor=0.5,
    mid_block_add_attention=False,
)
CASES = {"A_sd_layout": (TINY_A, (32, 40)), "B_no_mid_attention_odd": (TINY_B, (19, 26))}


@nnx.jit
def encode(model, x, key):
    posterior, features = model.encode(x)
    latents, _ = model.latents(x, key)
    return posterior, features, latents


@pytest.mark.parametrize("case", list(CASES))
def test_vae_encoder_matches_diffusers(case):
    config, hw = CASES[case]
    torch.manual_seed(0)
    vae = TorchVAE(**config).eval()
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, *hw)).astype(np.float32)
    feats = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: feats.append(o.numpy())) for b in vae.encoder.down_blocks
    ]
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
    for h in hooks:
        h.remove()
    nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731

    model = convert_vae(vae.state_dict(), config)
    key = jax.random.key(3)
    posterior, ours, latents = encode(model, jnp.asarray(nhwc(x)), key)
    assert len(ours) == len(config["down_block_types"])
    for i, (f, r) in enumerate(zip(ours, feats)):
        assert f.shape == nhwc(r).shape, f"down block {i}"
        np.testing.assert_allclose(np.asarray(f), nhwc(r), atol=1e-4, rtol=0, err_msg=f"down block {i}")
    np.testing.assert_allclose(np.asarray(posterior.mean), nhwc(dist.mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(posterior.logvar), nhwc(dist.logvar), atol=1e-4, rtol=0)

    noise = np.asarray(jax.random.normal(key, posterior.mean.shape))
    expected = (nhwc(dist.mean) + nhwc(dist.std) * noise) * config["scaling_factor"]
    np.testing.assert_allclose(np.asarray(latents), expected, atol=1e-4, rtol=0)
