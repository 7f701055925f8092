"""UAWarpC alignment training (refign.md 3.6-3.8; refign models/alignment_model.py): warp supervision and
the W-bipath constraint on pairs of images.

Batch (data_pipelines/matching_stream.py, config.data.pipeline = "matching"): image (b, S, S, 3) uint8 =
the target, image_ref (b, S, S, 3) uint8 = the reference (source), both resized to data.size (750x750 for
MegaDepth). One loss call is one refign training step:

1. on the device, from the step's key, per sample: a synthetic flow (flow_warps.synthetic_flows, config
   uawarpc.stage and its constants), image_prime = warp(normalise(photometric(target)), flow) and its mask,
   then the centre crop (uawarpc.crop, 520x520) of target, reference, prime, flow and mask;
2. the VGG (frozen: only `alignment_head` parameters train, as refign) once on cat[ref, trg, prime] at the
   crop size and on their 256x256 `area` copies (model.coarse_size: tiny copies use 144);
3. three head passes, each in train mode with its own batch statistics and running-statistics update:
   prime -> target (warp supervision), prime -> reference and reference -> target (W-bipath);
4. loss = w_ss L_ss + w_us L_us with uawarpc_losses.loss_weights (DenseMatching's weighting, or refign's
   quirk with uawarpc.loss_weight_quirk), plus 0.5 wd |theta|^2 over the trained parameters: Adam's coupled
   L2 (torch Adam(weight_decay=wd) adds wd theta to the gradient), so config.optimizer is plain Adam
   (name adamw, weight_decay 0).

Evaluation is matching, not segmentation: `match(model, target, reference)` gives the dense flow target ->
reference and the uncertainty 1 - P (eval/matching.py, scripts/eval_matching.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..data_pipelines.flow_warps import WarpSpec, make_training_triplet
from ..models.resize import resize_area, resize_bilinear
from ..models.uawarpc import UAWarpC, confidence
from ..models.vgg import POOL2_POOL3, POOL3_POOL4
from . import uawarpc_losses as losses
from .base import System, normalize

HEAD = "alignment_head"


def _in_head(path, _) -> bool:
    return bool(path) and path[0] == HEAD


def warp_spec(config) -> WarpSpec:
    """The CompositeFlow constants of config.uawarpc (stage 1 or 2, with the fields it overrides)."""
    u = config.uawarpc
    over = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in u.warps.items()}
    return WarpSpec.stage(u.stage, **over)


def three_passes(head, passes, size):
    """The head on each (trg, src, trg_256, src_256) of `passes` in order, in train mode: each pass normalises
    with its own batch statistics and updates the running statistics after the previous pass, as refign's
    three calls. One `nnx.scan` over the stacked passes (same shapes), so the head compiles once, not three
    times. Returns one tuple of 4 (flow, log-variance) levels per pass."""
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *passes)  # every leaf (n, b, ...)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def run(head, inputs):
        trg, src, trg_256, src_256 = inputs
        return head, head(trg, src, trg_256, src_256, size)

    _, out = run(head, stacked)  # 4 x (flow (n, b, h, w, 2), log-var (n, b, h, w, 1))
    return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(len(passes))]


class UAWarpCSystem(System):
    trainable = nnx.All(nnx.Param, _in_head)

    def build_model(self, rngs: nnx.Rngs) -> UAWarpC:
        m = self.config.model
        widths = tuple(m.vgg_widths) or None
        return UAWarpC(
            m.iterative_refinement,
            jnp.dtype(m.dtype),
            vgg_widths=widths,
            coarse_size=m.coarse_size,
            head_width=m.head_width,
            rngs=rngs,
        )

    def _pyramids(self, model: UAWarpC, images: jax.Array, n: int):
        """VGG features of n stacked batches (n b, h, w, 3): lists of n (pool2, pool3) and n (pool3, pool4)
        of the 256 (coarse_size) copies."""
        cs = model.alignment_head.coarse_size
        full = model.alignment_backbone(images, POOL2_POOL3)
        small = model.alignment_backbone(resize_area(images, (cs, cs)), POOL3_POOL4)
        split = lambda feats: list(zip(*[jnp.split(f, n) for f in feats], strict=True))  # noqa: E731
        return split(full), split(small)

    def loss(self, model: UAWarpC, batch, rng):
        u, d = self.config.uawarpc, self.config.data
        for key in ("image", "image_ref"):
            if key not in batch:
                raise ValueError(
                    f"UAWarpC batch has no {key!r} (keys {sorted(batch)}); use data.pipeline 'matching'"
                )
        t = make_training_triplet(
            rng, batch["image"], batch["image_ref"], warp_spec(self.config), tuple(u.crop), d.mean, d.std
        )
        dtype = jnp.dtype(self.config.model.dtype)
        size = t["image_trg"].shape[1:3]
        both = jnp.concatenate([t["image_ref"], t["image_trg"], t["image_prime"]]).astype(
            dtype
        )  # (3b, h, w, 3)
        (ref, trg, prime), (ref256, trg256, prime256) = self._pyramids(model, both, 3)
        prime_trg, prime_ref, ref_trg = three_passes(
            model.alignment_head,
            [(prime, trg, prime256, trg256), (prime, ref, prime256, ref256), (ref, trg, ref256, trg256)],
            size,
        )
        flow, mask = t["flow_prime"], t["mask_prime"]
        loss_ss = losses.multiscale_flow_loss(prime_trg, flow, mask)
        loss_us = losses.wbipath_loss(
            prime_ref, ref_trg, flow, mask, visibility=u.visibility_mask, alpha_1=u.alpha_1, alpha_2=u.alpha_2
        )
        w_ss, w_us = losses.loss_weights(loss_ss, loss_us, quirk=u.loss_weight_quirk, ratio=u.loss_ratio)
        total = w_ss * loss_ss + w_us * loss_us
        metrics = {"loss_ss": loss_ss, "loss_us": loss_us, "weight_ss": w_ss, "weight_us": w_us}
        if u.weight_decay:
            params = jax.tree.leaves(nnx.state(model, self.trainable))
            l2 = 0.5 * u.weight_decay * sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in params)
            metrics["l2"] = l2
            total = total + l2
        finest = prime_trg[-1][0]  # (b, h1, w1, 2)
        valid = losses.resize_mask(
            mask, finest.shape[1:3]
        )  # (b, h1, w1): the gt's out-of-range 1e10 left out
        gt = jnp.where(valid[..., None], resize_bilinear(flow, finest.shape[1:3]), 0.0)  # (b, h1, w1, 2)
        epe = jnp.linalg.norm(finest - gt, axis=-1)  # (b, h1, w1)
        metrics["epe_finest"] = jnp.sum(jnp.where(valid, epe, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        return total, metrics

    def match(self, model: UAWarpC, target: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
        """uint8 (or [0, 255]) images (b, H, W, 3) -> flow target -> reference (b, H, W, 2) in pixels and the
        uncertainty 1 - P (b, H, W), as AlignmentModel.forward (eval mode)."""
        d = self.config.data
        x_t = normalize(target, d.mean, d.std)
        x_r = normalize(reference, d.mean, d.std)
        flow, log_var = model.dense_flow(x_t, x_r)  # (b, H, W, 2), (b, H, W, 1)
        return flow, 1.0 - confidence(log_var)[..., 0]

    def training_evaluation(self, trainer, state) -> dict[str, float]:
        """The training loop's evaluation every config.eval_every steps (train/loop.py): matching metrics on
        config.eval's set (refign validates on MegaDepth pairs with SparseEPE; :tiny on the synthetic val
        pairs), logged as eval/AEPE, eval/PCK_1 ... eval/AUSE."""
        from ..eval.matching import evaluate_state

        results = evaluate_state(trainer, state)
        return {f"eval/{k}": v for k, v in results.items() if not k.startswith("num_")}

    def predict(self, model, images):
        raise NotImplementedError(
            "UAWarpC predicts flows between image pairs, not class scores: use UAWarpCSystem.match or "
            "scripts/eval_matching.py"
        )
