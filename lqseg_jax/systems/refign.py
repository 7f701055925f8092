"""Refign's refinement of the teacher's target prediction with the aligned reference prediction (refign.md
section 8; refign segmentation_model.py `refine`, `eta`): pure functions, NHWC, fp32.

    p_T = softmax(l_T), p_R = softmax(l_R)  (l_R: the reference logits warped onto the target, or unaligned)
    s_b = (mean_{h,w} eta(l_T))^gamma per image, eta = -sum_c p_T log p_T / ln K  (gamma 0 -> s = 1)
    M = 1 on the static channels S where argmax p_T in S and argmax p_R in S, 0 elsewhere (disable_M -> 0)
    P = the alignment confidence broadcast over channels (disable_P or no alignment -> 0.5)
    eps = s max(P, M), 0 where the warp is invalid (only when aligned)
    p~ = (1 - eps) p_T + eps p_R, per channel, not renormalised.

The ablation rows of refign.md section 8 are switches of `refine`: row 1 passes the unaligned reference
logits without `valid` and `confidence` (eps = 0.5 everywhere), rows 2-6 the aligned ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

UNTRUSTED_P = 0.5  # P when the confidence is disabled or there is no alignment


def normalised_entropy(logits: jax.Array) -> jax.Array:
    """refign `eta`: the entropy of softmax(logits) over the K channels divided by ln K; logits (b, h, w, K)
    -> (b, h, w) fp32 in [0, 1]."""
    logits = logits.astype(jnp.float32)
    p_log_p = jax.nn.softmax(logits, axis=-1) * jax.nn.log_softmax(logits, axis=-1)  # (b, h, w, K)
    return -p_log_p.sum(axis=-1) / math.log(logits.shape[-1])  # (b, h, w)


def trust(logits_trg: jax.Array, gamma: float) -> jax.Array:
    """s = (mean over pixels of the normalised entropy of the target prediction)^gamma per image: (b,).
    gamma 0 gives 1 (0^0 = 1 as in torch)."""
    return jnp.power(normalised_entropy(logits_trg).mean(axis=(1, 2)), gamma)  # (b,)


def static_class_mask(probs_trg: jax.Array, probs_ref: jax.Array, static_classes: Sequence[int]) -> jax.Array:
    """M (b, h, w, K) fp32: 1 on the channels of `static_classes` at pixels where both argmaxes are static
    classes, 0 on every other channel and pixel."""
    k = probs_trg.shape[-1]
    static = jnp.zeros((k,), bool).at[jnp.asarray(static_classes, jnp.int32)].set(True)  # (K,)
    both = static[jnp.argmax(probs_trg, axis=-1)] & static[jnp.argmax(probs_ref, axis=-1)]  # (b, h, w)
    return (both[..., None] & static).astype(jnp.float32)  # (b, h, w, K)


def refine(
    logits_trg: jax.Array,
    logits_ref: jax.Array,
    valid: jax.Array | None = None,
    confidence: jax.Array | None = None,
    *,
    gamma: float,
    static_classes: Sequence[int],
    disable_M: bool = False,
    disable_P: bool = False,
) -> jax.Array:
    """The refined target probabilities p~ (b, h, w, K) fp32.

    logits_trg, logits_ref (b, h, w, K): the teacher's target logits and the reference logits (warped onto
    the target when aligned); valid (b, h, w) bool: the warp's validity mask, None when not aligned (no
    zeroing); confidence (b, h, w, 1): the alignment's P, None when not aligned (P = 0.5)."""
    if logits_trg.shape != logits_ref.shape:
        raise ValueError(
            f"refine: target and reference logits differ: {logits_trg.shape}, {logits_ref.shape}"
        )
    probs_trg = jax.nn.softmax(logits_trg.astype(jnp.float32), axis=-1)  # (b, h, w, K)
    probs_ref = jax.nn.softmax(logits_ref.astype(jnp.float32), axis=-1)  # (b, h, w, K)
    s = trust(logits_trg, gamma)  # (b,)
    if disable_M:
        m = jnp.zeros_like(probs_trg)
    else:
        m = static_class_mask(probs_trg, probs_ref, static_classes)  # (b, h, w, K)
    if disable_P or confidence is None:
        p = jnp.full_like(probs_trg, UNTRUSTED_P)  # (b, h, w, K)
    else:
        p = jnp.broadcast_to(confidence.astype(jnp.float32), probs_trg.shape)  # (b, h, w, K)
    eps = s[:, None, None, None] * jnp.maximum(p, m)  # (b, h, w, K)
    if valid is not None:
        eps = jnp.where(valid[..., None], eps, 0.0)  # no match: keep the target's prediction
    return (1.0 - eps) * probs_trg + eps * probs_ref  # (b, h, w, K)
