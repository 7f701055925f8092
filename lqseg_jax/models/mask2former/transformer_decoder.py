"""MultiScaleMaskedTransformerDecoder (Mask2Former), post-norm, dropout 0.

Attribute names mirror mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py, so
detectron2 keys `sem_seg_head.predictor.*` load mechanically. Masks are NHWC-like: (b, h, w, queries).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from lqseg_jax.models.layers import resize_bilinear

from .common import (
    Conv2d,
    MultiheadAttention,
    layer_norm,
    sine_position_embedding,
    torch_linear,
    torch_normal_init,
    xavier_uniform_init,
)
from .config import Mask2FormerConfig

NUM_FEATURE_LEVELS = 3  # the decoder always uses 3 scales


class SelfAttentionLayer(nnx.Module):
    def __init__(self, d_model: int, nhead: int, *, dtype, rngs: nnx.Rngs):
        self.self_attn = MultiheadAttention(d_model, nhead, dtype=dtype, rngs=rngs)
        self.norm = layer_norm(d_model, dtype=dtype, rngs=rngs)

    def __call__(self, tgt, query_pos):
        q = tgt + query_pos  # (b, q, c)
        return self.norm(tgt + self.self_attn(q, q, tgt))  # (b, q, c)


class CrossAttentionLayer(nnx.Module):
    def __init__(self, d_model: int, nhead: int, *, dtype, rngs: nnx.Rngs):
        self.multihead_attn = MultiheadAttention(d_model, nhead, dtype=dtype, rngs=rngs)
        self.norm = layer_norm(d_model, dtype=dtype, rngs=rngs)

    def __call__(self, tgt, memory, mask, pos, query_pos):
        """tgt (b, q, c), memory (b, s, c), mask (b, q, s) True = may attend, pos (s, c), query_pos (q, c)."""
        out = self.multihead_attn(tgt + query_pos, memory + pos, memory, mask)  # (b, q, c)
        return self.norm(tgt + out)  # (b, q, c)


class FFNLayer(nnx.Module):
    def __init__(self, d_model: int, dim_feedforward: int, *, dtype, rngs: nnx.Rngs):
        self.linear1 = torch_linear(
            d_model, dim_feedforward, kernel_init=xavier_uniform_init, dtype=dtype, rngs=rngs
        )
        self.linear2 = torch_linear(
            dim_feedforward, d_model, kernel_init=xavier_uniform_init, dtype=dtype, rngs=rngs
        )
        self.norm = layer_norm(d_model, dtype=dtype, rngs=rngs)

    def __call__(self, tgt):
        return self.norm(tgt + self.linear2(jax.nn.relu(self.linear1(tgt))))  # (b, q, c)


class MLP(nnx.Module):
    """ReLU MLP (the mask embedding head), layers named `layers.{i}` as the original."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *, dtype, rngs):
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nnx.List(
            [torch_linear(a, b, dtype=dtype, rngs=rngs) for a, b in itertools.pairwise(dims)]
        )

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class MultiScaleMaskedTransformerDecoder(nnx.Module):
    """Queries attend to one pixel-decoder scale per layer (round-robin, coarsest first), masked by the
    previous layer's mask prediction; a prediction head runs on the initial queries and after every layer.
    """

    def __init__(self, cfg: Mask2FormerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, d = cfg.compute_dtype, cfg.hidden_dim
        self.transformer_self_attention_layers = nnx.List(
            [SelfAttentionLayer(d, cfg.dec_heads, dtype=dt, rngs=rngs) for _ in range(cfg.dec_layers)]
        )
        self.transformer_cross_attention_layers = nnx.List(
            [CrossAttentionLayer(d, cfg.dec_heads, dtype=dt, rngs=rngs) for _ in range(cfg.dec_layers)]
        )
        self.transformer_ffn_layers = nnx.List(
            [FFNLayer(d, cfg.dec_ffn_dim, dtype=dt, rngs=rngs) for _ in range(cfg.dec_layers)]
        )
        self.decoder_norm = layer_norm(d, dtype=dt, rngs=rngs)
        self.query_feat = nnx.Embed(cfg.num_queries, d, embedding_init=torch_normal_init, dtype=dt, rngs=rngs)
        self.query_embed = nnx.Embed(
            cfg.num_queries, d, embedding_init=torch_normal_init, dtype=dt, rngs=rngs
        )
        self.level_embed = nnx.Embed(
            NUM_FEATURE_LEVELS, d, embedding_init=torch_normal_init, dtype=dt, rngs=rngs
        )
        if cfg.conv_dim != d or cfg.enforce_input_proj:
            self.input_proj = nnx.List(
                [
                    Conv2d(cfg.conv_dim, d, 1, use_bias=True, norm=None, relu=False, dtype=dt, rngs=rngs)
                    for _ in range(NUM_FEATURE_LEVELS)
                ]
            )
        else:  # the original's empty nn.Sequential: no parameters
            self.input_proj = None
        self.class_embed = torch_linear(d, cfg.num_classes + 1, dtype=dt, rngs=rngs)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3, dtype=dt, rngs=rngs)

    def forward_prediction_heads(self, output, mask_features, attn_mask_size):
        """-> class logits (b, q, K+1) f32, mask logits (b, H, W, q) f32, attention mask (b, q, h*w) bool
        (True = may attend) for the next layer, from the prediction resized to `attn_mask_size`."""
        decoder_output = self.decoder_norm(output)  # (b, q, c)
        outputs_class = self.class_embed(decoder_output).astype(jnp.float32)  # (b, q, K+1)
        mask_embed = self.mask_embed(decoder_output)  # (b, q, mask_dim)
        outputs_mask = jnp.einsum(
            "bqc,bhwc->bhwq", mask_embed, mask_features, preferred_element_type=jnp.float32
        )  # (b, H, W, q)
        small = resize_bilinear(outputs_mask, attn_mask_size)  # (b, h, w, q)
        b, h, w, q = small.shape
        blocked = jax.nn.sigmoid(small).reshape(b, h * w, q).transpose(0, 2, 1) < 0.5  # (b, q, h*w)
        # a query whose mask blocks every position attends everywhere (the original's "fully masked row")
        blocked = blocked & ~jnp.all(blocked, axis=-1, keepdims=True)
        return outputs_class, outputs_mask, jax.lax.stop_gradient(~blocked)

    def __call__(self, x: list[jax.Array], mask_features: jax.Array) -> dict:
        """x: 3 pixel-decoder features (b, h_i, w_i, conv_dim), coarsest first; mask_features (b, H, W, mask_dim).

        Returns {"pred_logits" (b, q, K+1), "pred_masks" (b, H, W, q), "aux_outputs": [dec_layers dicts]}.
        """
        if len(x) != NUM_FEATURE_LEVELS:
            raise ValueError(f"the decoder takes {NUM_FEATURE_LEVELS} feature levels, got {len(x)}")
        dt, d = self.cfg.compute_dtype, self.cfg.hidden_dim
        level_embed = self.level_embed.embedding[...].astype(dt)  # (3, c)
        src, pos, size_list = [], [], []
        for i, feat in enumerate(x):
            b, h, w, _ = feat.shape
            size_list.append((h, w))
            pos.append(jnp.asarray(sine_position_embedding(h, w, d // 2).reshape(h * w, d), dt))  # (s_i, c)
            proj = feat.astype(dt) if self.input_proj is None else self.input_proj[i](feat.astype(dt))
            src.append(proj.reshape(b, h * w, d) + level_embed[i])  # (b, s_i, c)

        b = x[0].shape[0]
        query_embed = self.query_embed.embedding[...].astype(dt)  # (q, c)
        output = jnp.broadcast_to(
            self.query_feat.embedding[...].astype(dt), (b, *query_embed.shape)
        )  # (b, q, c)
        mask_features = mask_features.astype(dt)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, size_list[0]
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.cfg.dec_layers):
            level = i % NUM_FEATURE_LEVELS
            output = self.transformer_cross_attention_layers[i](
                output, src[level], attn_mask, pos[level], query_embed
            )  # (b, q, c)
            output = self.transformer_self_attention_layers[i](output, query_embed)  # (b, q, c)
            output = self.transformer_ffn_layers[i](output)  # (b, q, c)
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % NUM_FEATURE_LEVELS]
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_masks": m}
                for c, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ],
        }


def stack_predictions(outputs: dict) -> tuple[jax.Array, jax.Array]:
    """All predictions in decoder order (initial queries first, final last): logits (L, b, q, K+1),
    masks (L, b, H, W, q)."""
    preds = [*outputs["aux_outputs"], outputs]
    return (
        jnp.stack([p["pred_logits"] for p in preds]),
        jnp.stack([p["pred_masks"] for p in preds]),
    )
