"""Full-size SD 2.1-base components: parameter counts equal the PyTorch references built on torch's
meta device from the same configs, and the RASS feature shapes at 512x512 (all abstract: eval_shape)."""

import jax
import jax.numpy as jnp
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from transformers import CLIPTextConfig as TorchCLIPConfig
from transformers import CLIPTextModel as TorchCLIP

from lqseg_jax.convert.diffusers_sd import build_text_encoder, build_unet, build_vae
from lqseg_jax.models.clip_text import SD21_TEXT_ENCODER
from lqseg_jax.models.sd_unet import SD21_BASE_UNET
from lqseg_jax.models.sd_vae import SD21_BASE_VAE


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def torch_config(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_sd21_parameter_counts_match_torch():
    with torch.device("meta"):
        unet = TorchUNet(**torch_config(SD21_BASE_UNET))
        vae = TorchVAE(**torch_config(SD21_BASE_VAE))
        text = TorchCLIP(TorchCLIPConfig(**SD21_TEXT_ENCODER))
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    assert n_params(build_unet(SD21_BASE_UNET)) == count([unet]) == 865_910_724
    assert n_params(build_vae(SD21_BASE_VAE)) == count([vae.encoder, vae.quant_conv]) == 34_163_664
    assert n_params(build_text_encoder(SD21_TEXT_ENCODER)) == count([text]) == 340_387_840


def test_rass_feature_shapes_at_512():
    vae, unet = build_vae(SD21_BASE_VAE), build_unet(SD21_BASE_UNET)
    image = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    (posterior, vae_feats) = nnx.eval_shape(lambda m, x: m.encode(x), vae, image)
    assert posterior.mean.shape == (1, 64, 64, 4)
    assert [f.shape for f in vae_feats] == [
        (1, 256, 256, 128),
        (1, 128, 128, 256),
        (1, 64, 64, 512),
        (1, 64, 64, 512),
    ]
    ctx = jax.ShapeDtypeStruct((1, 77, 1024), jnp.float32)
    out, up = nnx.eval_shape(lambda m, z, c: m(z, 1, c), unet, posterior.mean, ctx)
    assert out.shape == (1, 64, 64, 4)
    # up0 1280 ch stride 32, up1 1280 stride 16, up2 640 stride 8, up3 320 stride 8 (image pixels)
    assert [f.shape for f in up] == [(1, 16, 16, 1280), (1, 32, 32, 1280), (1, 64, 64, 640), (1, 64, 64, 320)]
