"""RASS in Flax NNX: Stable Diffusion 2.1 features (VAE encoder + one UNet call at t = 1, rank-4 LoRA),
feature projections, and the Mask2Former head (Ka1Guan/RASS rass/rass.py MaskFormer_rass,
rass/modeling/backbone/{rass_backbone,feature_projection}.py, restoration_adaptation/ras.py).

Module tree = the names of the released checkpoint `rass.pth` (rass.md section 6), so conversion is a key
for key load:
    RASS
      backbone.feature_extractor.sd.unet            UNet2DConditionModel with peft-layout LoRA adapters
      backbone.feature_extractor.sd.vae             AutoencoderKL (encoder + quant_conv)
      backbone.feature_extractor.feature_projections.{0..5}.0.{conv1,conv2,conv3,shortcut}(.norm)
      sem_seg_head                                  Mask2FormerHead (pixel_decoder, predictor)
The CLIP text encoder (`backbone.feature_extractor.sd.text_encoder` in the checkpoint) is frozen and only
turns prompts into embeddings; it lives with the system's prompt provider, outside this module tree.

Features, for an image x in [-1, 1] of size (H, W) (FeatureProjection.forward_features):
    latent = VAE posterior SAMPLE x scaling_factor; VAE down-block outputs vae1 (stride 4), vae3 (stride 8)
    UNet(latent, t = 1, text embeddings) -> up-block outputs up0 (stride 32), up1 (16), up2 (8), up3 (8)
    feature i in [vae1, vae3, up0, up1, up2, up3] -> nearest resize to (H // s, W // s) -> projection P_i
    res2 = P0, res3 = P1 + P4 + P5, res4 = P3, res5 = P2   (all `projection_dim` channels)
Evaluation runs `slide_features` (FeatureProjection.slide_forward): square windows with side = the
short side of the input, stride = side, the last window shifted back to the border; each window through
VAE + UNet + projections; per-stride features summed and divided by the overlap count; the head runs once
on the stitched features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lqseg_jax.models.layers import kaiming_fan_out_init
from lqseg_jax.models.lora import apply_lora
from lqseg_jax.models.mask2former import Mask2FormerConfig, Mask2FormerHead
from lqseg_jax.models.mask2former.config import FEATURES
from lqseg_jax.models.sd_unet import GroupNorm, UNet2DConditionModel, UNetConfig, nearest_resize
from lqseg_jax.models.sd_vae import AutoencoderKL, VAEConfig

Dtype = Any

# The six SD features in the order of the original FEATURE_PROJECTION config (maskformer2_RASS.yaml):
# FEATURE_DIMS [256, 512, 1280, 1280, 640, 320], FEATURE_STRIDES [4, 8, 32, 16, 8, 8].
SD_FEATURES = ("vae1", "vae3", "up0", "up1", "up2", "up3")
SD_FEATURE_STRIDES = (4, 8, 32, 16, 8, 8)
# Features of equal stride are summed, in index order (FeatureProjection._sorted_grouped_indices).
GROUPS: dict[str, tuple[int, ...]] = {"res2": (0,), "res3": (1, 4, 5), "res4": (3,), "res5": (2,)}
OUT_STRIDES: dict[str, int] = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class ConvNorm(nnx.Conv):
    """detectron2 `Conv2d(..., bias=False, norm=GroupNorm)` with c2_msra_fill (kaiming normal, fan_out):
    a convolution with a `norm` child, no activation (NHWC)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, groups: int, dtype: Dtype, rngs: nnx.Rngs):
        pad = kernel // 2
        super().__init__(
            cin,
            cout,
            (kernel, kernel),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=kaiming_fan_out_init(),
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = GroupNorm(cout, groups, 1e-5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(super().__call__(x))  # (b, h, w, cout)


class BottleneckBlock(nnx.Module):
    """detectron2 BottleneckBlock (stride 1, GN): 1x1 in->mid, GN, ReLU; 3x3 mid->mid, GN, ReLU; 1x1 mid->out,
    GN; shortcut 1x1 conv + GN when in != out (identity otherwise); add; ReLU."""

    def __init__(self, cin: int, cout: int, mid: int, *, groups: int, dtype: Dtype, rngs: nnx.Rngs):
        self.shortcut = ConvNorm(cin, cout, 1, groups=groups, dtype=dtype, rngs=rngs) if cin != cout else None
        self.conv1 = ConvNorm(cin, mid, 1, groups=groups, dtype=dtype, rngs=rngs)
        self.conv2 = ConvNorm(mid, mid, 3, groups=groups, dtype=dtype, rngs=rngs)
        self.conv3 = ConvNorm(mid, cout, 1, groups=groups, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.conv1(x))  # (b, h, w, mid)
        out = jax.nn.relu(self.conv2(out))  # (b, h, w, mid)
        out = self.conv3(out)  # (b, h, w, cout)
        short = self.shortcut(x) if self.shortcut is not None else x  # (b, h, w, cout)
        return jax.nn.relu(out + short.astype(out.dtype))  # (b, h, w, cout)


@dataclasses.dataclass(frozen=True)
class RASSConfig:
    """Sizes of every part of RASS. `unet`, `vae` are diffusers config dicts (or parsed configs)."""

    unet: Mapping[str, Any] | UNetConfig
    vae: Mapping[str, Any] | VAEConfig
    head: Mask2FormerConfig
    projection_dim: int = 512
    projection_groups: int = 32  # detectron2 get_norm("GN"): GroupNorm(32, C)
    lora_rank: int = 4  # RASS stage-2 adapters (0: none)
    lora_alpha: float = 8.0  # peft default lora_alpha
    timestep: int = 1
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # rematerialise the UNet blocks in the backward pass

    def __post_init__(self):
        unet = self.unet_config
        vae = self.vae_config
        if len(unet.block_out_channels) != 4 or len(vae.block_out_channels) != 4:
            raise ValueError(
                "RASS takes VAE down blocks 1 and 3 (strides 4, 8) and four UNet up blocks (strides 32, 16, 8, "
                f"8): both need 4 blocks, got UNet {unet.block_out_channels}, VAE {vae.block_out_channels}"
            )
        if unet.in_channels != vae.latent_channels:
            raise ValueError(
                f"UNet in_channels {unet.in_channels} != VAE latent_channels {vae.latent_channels}"
            )
        if self.projection_dim % 4 or (self.projection_dim // 4) % self.projection_groups:
            raise ValueError(
                f"projection_dim {self.projection_dim}: its bottleneck (dim / 4) must be divisible by "
                f"projection_groups {self.projection_groups}"
            )
        if tuple(self.head.in_channels) != (self.projection_dim,) * 4:
            raise ValueError(
                f"head.in_channels {self.head.in_channels} must be 4 x projection_dim {self.projection_dim}"
            )
        if tuple(self.head.feature_strides) != tuple(OUT_STRIDES.values()):
            raise ValueError(f"head.feature_strides must be {tuple(OUT_STRIDES.values())}")

    @property
    def unet_config(self) -> UNetConfig:
        return self.unet if isinstance(self.unet, UNetConfig) else UNetConfig.from_dict(self.unet)

    @property
    def vae_config(self) -> VAEConfig:
        return self.vae if isinstance(self.vae, VAEConfig) else VAEConfig.from_dict(self.vae)

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Channels of vae1, vae3, up0..up3 (256, 512, 1280, 1280, 640, 320 for SD 2.1)."""
        v, u = self.vae_config.block_out_channels, self.unet_config.block_out_channels
        return (v[1], v[3], u[3], u[2], u[1], u[0])


class StableDiffusion(nnx.Module):
    """`sd`: the SD UNet (with the RASS stage-2 LoRA adapters) and the VAE encoder."""

    def __init__(self, cfg: RASSConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.unet = UNet2DConditionModel(cfg.unet_config, dtype=dtype, remat=cfg.remat, rngs=rngs)
        if cfg.lora_rank:
            apply_lora(self.unet, cfg.lora_rank, cfg.lora_alpha, rngs=rngs)
        self.vae = AutoencoderKL(cfg.vae_config, dtype=dtype, rngs=rngs)


class FeatureExtractor(nnx.Module):
    """`backbone.feature_extractor`: SD features -> grouped projections res2..res5."""

    def __init__(self, cfg: RASSConfig, *, rngs: nnx.Rngs):
        self.timestep = cfg.timestep
        self.sd = StableDiffusion(cfg, rngs=rngs)
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.projection_dim
        self.feature_projections = nnx.List(
            [
                nnx.List(
                    [BottleneckBlock(c, d, d // 4, groups=cfg.projection_groups, dtype=dtype, rngs=rngs)]
                )
                for c in cfg.feature_dims
            ]
        )

    def sd_features(self, x: jax.Array, text_emb: jax.Array, key: jax.Array) -> list[jax.Array]:
        """x (b, H, W, 3) in [-1, 1] -> [vae1, vae3, up0, up1, up2, up3] (Generator_with_pretrain.forward)."""
        latent, vae_feats = self.sd.vae.latents(x, key)  # (b, H/8, W/8, 4), 4 x (b, h_i, w_i, c_i)
        _, up_feats = self.sd.unet(latent, self.timestep, text_emb)  # 4 x (b, h_i, w_i, c_i)
        return [vae_feats[1], vae_feats[3], *up_feats]

    def project(self, feats: Sequence[jax.Array], hw: tuple[int, int]) -> dict[str, jax.Array]:
        """forward_features: nearest resize to (H // s, W // s), project, sum per output stride."""
        out = {}
        for name, indices in GROUPS.items():
            s = OUT_STRIDES[name]
            size = (hw[0] // s, hw[1] // s)
            total = None
            for i in indices:
                f = feats[i]
                if tuple(f.shape[1:3]) != size:
                    f = nearest_resize(f, size)  # (b, H/s, W/s, c_i)
                p = self.feature_projections[i][0](f)  # (b, H/s, W/s, d)
                total = p if total is None else total + p
            out[name] = total
        return out

    def __call__(self, x: jax.Array, text_emb: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        """single_forward: x (b, H, W, 3) in [-1, 1], text_emb (b, tokens, d), key (posterior sample)."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"RASS feature extractor: images must be (b, H, W, 3), got {x.shape}")
        if text_emb.ndim != 3 or text_emb.shape[0] != x.shape[0]:
            raise ValueError(
                f"RASS feature extractor: text_emb must be (b={x.shape[0]}, tokens, dim), got {text_emb.shape}"
            )
        return self.project(self.sd_features(x, text_emb, key), x.shape[1:3])


def slide_windows(h: int, w: int) -> tuple[int, list[tuple[int, int]]]:
    """FeatureProjection.slide_forward without slide training: (crop side, [(y, x) window corners])."""
    crop = min(h, w)

    def starts(size: int) -> list[int]:
        n = max(size - crop + crop - 1, 0) // crop + 1
        return [max(min(i * crop + crop, size) - crop, 0) for i in range(n)]

    return crop, [(y, x) for y in starts(h) for x in starts(w)]


class Backbone(nnx.Module):
    """`backbone` (the detectron2 RASS backbone): holds `feature_extractor`."""

    def __init__(self, cfg: RASSConfig, *, rngs: nnx.Rngs):
        self.feature_extractor = FeatureExtractor(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, text_emb: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        return self.feature_extractor(x, text_emb, key)

    def slide_features(self, x: jax.Array, text_emb: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        return slide_features(self.feature_extractor, x, text_emb, key)


def slide_features(extractor: nnx.Module, x: jax.Array, text_emb: jax.Array, key: jax.Array) -> dict:
    """Sliding-window features (module docstring) of `extractor(window, text_emb, key) -> {res2..res5}`.

    Windows are static and run one after the other (`lax.map`: the network is traced once), window k
    with key fold_in(key, k); each output stride's features are summed over the windows covering a cell
    and divided by their number."""
    b, h, w, _ = x.shape
    crop, windows = slide_windows(h, w)
    if len(windows) == 1:
        return extractor(x, text_emb, jax.random.fold_in(key, 0))
    for name, s in OUT_STRIDES.items():
        for y, x0 in windows:
            if (y + crop) // s - y // s != crop // s or (x0 + crop) // s - x0 // s != crop // s:
                raise ValueError(
                    f"slide inference: window ({y}, {x0}) of side {crop} in a {h}x{w} image does not map onto "
                    f"{crop // s} cells of the stride-{s} feature '{name}' (the original fails here too); pad "
                    "the image to a multiple of 32"
                )
    crops = jnp.stack([x[:, y : y + crop, x0 : x0 + crop] for y, x0 in windows])  # (n, b, c, c, 3)
    keys = jnp.stack([jax.random.fold_in(key, k) for k in range(len(windows))])  # (n,) keys
    graphdef, state = nnx.split(extractor)

    def one(args):
        window, k = args
        return nnx.merge(graphdef, state)(window, text_emb, k)  # res2..res5 of one window

    feats = jax.lax.map(one, (crops, keys))  # {name: (n, b, c/s, c/s, d)}
    out = {}
    for name, s in OUT_STRIDES.items():
        f = feats[name].astype(jnp.float32)
        total = jnp.zeros((b, h // s, w // s, f.shape[-1]), jnp.float32)
        count = jnp.zeros((1, h // s, w // s, 1), jnp.float32)
        for k, (y, x0) in enumerate(windows):
            ys, xs = slice(y // s, y // s + crop // s), slice(x0 // s, x0 // s + crop // s)
            total = total.at[:, ys, xs].add(f[k])  # (b, H/s, W/s, d)
            count = count.at[:, ys, xs].add(1.0)
        out[name] = (total / count).astype(feats[name].dtype)  # every cell is covered at least once
    return out


class RASS(nnx.Module):
    """MaskFormer_rass: `backbone` (SD features + projections) and `sem_seg_head` (Mask2Former)."""

    def __init__(self, cfg: RASSConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = Backbone(cfg, rngs=rngs)
        self.sem_seg_head = Mask2FormerHead(cfg.head, rngs)

    def __call__(self, x: jax.Array, text_emb: jax.Array, key: jax.Array, *, slide: bool = False) -> dict:
        """x (b, H, W, 3) in [-1, 1] -> Mask2Former outputs (pred_logits, pred_masks at H/4, aux_outputs)."""
        feats = (self.backbone.slide_features if slide else self.backbone)(x, text_emb, key)
        return self.sem_seg_head(dict(zip(FEATURES, (feats[f] for f in FEATURES), strict=True)))
