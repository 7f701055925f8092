"""Mask2Former head configuration: the RASS head (detectron2 names in comments) and a tiny test variant."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from lqseg_jax.kernels.ms_deform_attn import op as msda_op

FEATURES = ("res2", "res3", "res4", "res5")


@dataclasses.dataclass(frozen=True)
class Mask2FormerConfig:
    """Sizes of the pixel decoder, the transformer decoder and the loss.

    The decoder always attends to the 3 coarsest pixel-decoder outputs (as the original). `dec_layers` is
    the number of masked-attention layers, i.e. detectron2's MODEL.MASK_FORMER.DEC_LAYERS - 1.
    """

    num_classes: int = 150  # SEM_SEG_HEAD.NUM_CLASSES (no-object is class `num_classes`)
    in_channels: tuple[int, ...] = (512, 512, 512, 512)  # channels of res2..res5
    feature_strides: tuple[int, ...] = (4, 8, 16, 32)  # strides of res2..res5
    transformer_in_features: tuple[str, ...] = (
        "res3",
        "res4",
        "res5",
    )  # DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES
    common_stride: int = 4  # SEM_SEG_HEAD.COMMON_STRIDE
    conv_dim: int = 256  # SEM_SEG_HEAD.CONVS_DIM
    mask_dim: int = 256  # SEM_SEG_HEAD.MASK_DIM
    norm_groups: int = 32  # SEM_SEG_HEAD.NORM "GN"
    enc_layers: int = 6  # SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    enc_heads: int = 8  # MASK_FORMER.NHEADS
    enc_points: int = 4
    enc_ffn_dim: int = 1024  # hard-coded 1024 in the original
    hidden_dim: int = 256  # MASK_FORMER.HIDDEN_DIM
    num_queries: int = 100  # MASK_FORMER.NUM_OBJECT_QUERIES
    dec_heads: int = 8  # MASK_FORMER.NHEADS
    dec_ffn_dim: int = 2048  # MASK_FORMER.DIM_FEEDFORWARD
    dec_layers: int = 9  # MASK_FORMER.DEC_LAYERS (10) - 1
    enforce_input_proj: bool = False  # MASK_FORMER.ENFORCE_INPUT_PROJ
    msda_impl: str = "auto"  # lqseg_jax.kernels.ms_deform_attn implementation
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # loss (MASK_FORMER.*)
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    max_targets: int = 100  # static number of target slots per image (one per class present)
    ignore_label: int = 255

    def __post_init__(self):
        if len(self.in_channels) != len(FEATURES) or len(self.feature_strides) != len(FEATURES):
            raise ValueError(
                f"in_channels and feature_strides need one entry per {FEATURES}, got "
                f"{self.in_channels} and {self.feature_strides}"
            )
        if not set(self.transformer_in_features) <= set(FEATURES) or len(self.transformer_in_features) < 3:
            raise ValueError(
                f"transformer_in_features must name at least 3 of {FEATURES}, got {self.transformer_in_features}"
            )
        for name, dim, div in (
            ("conv_dim", self.conv_dim, self.norm_groups),
            ("conv_dim", self.conv_dim, self.enc_heads),
            ("hidden_dim", self.hidden_dim, self.dec_heads),
        ):
            if dim % div:
                raise ValueError(f"{name}={dim} must be divisible by {div}")
        if self.conv_dim % 2 or self.hidden_dim % 2:
            raise ValueError(f"conv_dim and hidden_dim must be even, got {self.conv_dim}, {self.hidden_dim}")
        if self.msda_impl not in msda_op.IMPLS:
            raise ValueError(f"msda_impl must be one of {msda_op.IMPLS}, got {self.msda_impl!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0 < self.max_targets <= self.num_queries:
            raise ValueError(
                f"max_targets must be in [1, num_queries={self.num_queries}] (every target needs its own "
                f"query), got {self.max_targets}"
            )
        if self.num_fpn_levels < 0:
            raise ValueError(
                f"the finest transformer feature (stride {min(self.transformer_strides)}) must not be finer "
                f"than common_stride={self.common_stride}"
            )
        if not 0.0 <= self.importance_sample_ratio <= 1.0 or self.oversample_ratio < 1.0:
            raise ValueError(
                f"need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], got "
                f"{self.oversample_ratio}, {self.importance_sample_ratio}"
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def transformer_strides(self) -> tuple[int, ...]:
        return tuple(self.feature_strides[FEATURES.index(f)] for f in self.transformer_in_features)

    @property
    def num_fpn_levels(self) -> int:
        """Pixel-decoder levels finer than the transformer ones, handled by FPN convs (res2 for RASS)."""
        return int(math.log2(min(self.transformer_strides)) - math.log2(self.common_stride))

    @property
    def channels(self) -> dict[str, int]:
        return dict(zip(FEATURES, self.in_channels))


def rass_config(**overrides) -> Mask2FormerConfig:
    """The RASS head: Mask2Former ADE20K semantic config on 512-channel res2..res5 features, 150 classes."""
    return dataclasses.replace(Mask2FormerConfig(), **overrides)


def tiny_config(**overrides) -> Mask2FormerConfig:
    """A small variant for tests: same structure, narrow widths (GroupNorm(32) as transformers hard-codes)."""
    base = Mask2FormerConfig(
        num_classes=5,
        in_channels=(16, 24, 32, 40),
        conv_dim=32,
        mask_dim=32,
        enc_layers=2,
        enc_heads=2,
        enc_ffn_dim=48,
        hidden_dim=32,
        num_queries=8,
        dec_heads=2,
        dec_ffn_dim=48,
        dec_layers=4,
        train_num_points=64,
        max_targets=6,
    )
    return dataclasses.replace(base, **overrides)
