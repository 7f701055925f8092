"""DAFormer-style self-training UDA (refign.md section 7): MiT + DAFormer head student, EMA teacher,
ImageNet feature distance, DACS ClassMix with kornia-0.5.8 strong augmentation.

The model carries its own state beside the student (base.py: a system may keep extra state in its model
that its loss updates): `m_backbone` / `m_head` (the EMA teacher), `imnet_backbone` (frozen encoder for
the feature distance) and `global_step` (t of the EMA). Only the student's `backbone` / `head` parameters
are trainable (`trainable`); the rest travels in the train state's `rest`, so it is sharded, checkpointed
and resumed with everything else. One loss call is one refign training step:

1. teacher <- m teacher + (1 - m) student, parameters only, m = min(1 - 1/(t+1), ema_momentum); t += 1;
2. L_src = CE(student(x_s) -> crop, y_s), mean over all pixels (ignored ones count 0);
3. L_fd = fdist.weight * mean_{thing pixels of the label at the last stage} ||f_S - f_I||_2;
   with a labelled target (RobotCar, refign.md O8) x_s is the source images followed by the labelled
   target ones (rotated-in pixels zeroed after normalisation), except with probability labelled_drop_p
   per step, when it is the source images alone (refign's ignore_every_second_semantic_training_batch);
4. teacher (train mode: BN batch statistics, its running stats updated; dropout and drop-path on unless
   teacher_dropout is False) on x_t -> softmax probabilities; pseudo-label, one confidence weight.
   Refign (config.uda.refign, refign.md sections 3.9 and 8; the math in systems/refign.py): with
   use_refign the teacher runs once on cat[x_t, x_r] (its BN sees 2 bt images), logits bilinear to the
   crop; with use_align the frozen UAWarpC (`alignment_backbone`, `alignment_head`, eval mode: BN running
   statistics, never updated, never trained) warps the reference logits onto the target with its validity
   mask and confidence P, else the reference stays unaligned (ablation row 1); `refine` mixes them into the
   probabilities. adapt_to_ref: with probability 0.5 per step (one draw from the loss rng's
   ADAPT_TO_REF_STREAM) x_t := the reference images and the probabilities are the teacher's softmax on them
   alone; nnx.cond runs only the branch taken;
5. ClassMix of the first B_t source images with the targets, strong augmentation;
6. L_mix = CE(student(x_mix), y_mix, pixel weights). The trainer differentiates L_src + L_fd + L_mix.

Batch keys (data_pipelines/paired.py uda_dataset, built for config.data.pipeline = "uda" by
data_pipelines/streams.py): image_src (bs, h, w, 3) uint8, label_src (bs, h, w) uint8 (255 ignore),
image_trg (bt, h, w, 3) uint8, image_ref (bt, h, w, 3) uint8 (used by Refign and adapt_to_ref); optionally
image_lab (bl, h, w, 3) uint8, label_lab (bl, h, w) uint8, blank_lab (bl, h, w) bool. Every random draw
comes from the loss's rng, per example. Evaluation uses the student, as the original.

HRDA (config.model.hrda.enabled, refign.md section 6; lqseg_jax/models/hrda.py): the student gains a
scale-attention head `hrda_scale_attention` (EMA copy `m_hrda_scale_attention`, trained at the head's
learning rate) and every student forward is the multi-resolution one: a x0.5 context and one detail crop
(box from the loss rng, one per forward), each cross-entropy becoming (1 - w) CE(fused -> crop) +
w CE(detail logits, labels and pixel weights cropped to the box), w = hr_loss_weight (0.1). The teacher
fuses sliding detail crops; the feature distance compares the student's context features with the
ImageNet encoder on the x0.5 image; `predict` is refign's whole_inference of one window (the config's
eval.mode "slide" runs the 1080x1080 windows). hrda.remat recomputes the student encoder's activations in
the backward pass instead of keeping them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..models import hrda
from ..models.daformer_head import DAFormerHead
from ..models.layers import resize_bilinear
from ..models.mit import MIT_PRESETS, MixVisionTransformer
from ..models.segmentor import EncoderDecoder
from ..models.uawarpc import UAWarpC, align
from . import refign
from . import uda_augment as aug
from .base import System, cross_entropy, normalize, pixel_accuracy

STUDENT = ("backbone", "head", "hrda_scale_attention")
LABELLED_DROP_STREAM = 0x1AB  # fold_in of the loss rng for the labelled-target drop (one draw per step)
HRDA_BOX_STREAM = 0x4D8  # fold_in of the loss rng for the HRDA detail boxes (source, mix)
ADAPT_TO_REF_STREAM = 0xAD7  # fold_in of the loss rng for Refign's adapt-to-reference coin (one per step)
ADAPT_TO_REF_P = 0.5


class StepCount(nnx.Variable):
    """Steps taken by the UDA loss (the EMA's t); carried in the train state's `rest`."""


class UDAModel(nnx.Module):
    """Student (`backbone`, `head`, HRDA's `hrda_scale_attention`), EMA teacher (`m_backbone`, `m_head`,
    `m_hrda_scale_attention`), frozen ImageNet encoder (`imnet_backbone`), Refign's frozen UAWarpC
    (`alignment_backbone`, `alignment_head`); None where unused: the attribute names of refign's
    SegmentationModel, so its Lightning checkpoints convert key for key."""

    def __init__(
        self,
        student: EncoderDecoder,
        teacher: EncoderDecoder,
        imnet_backbone: nnx.Module | None,
        scale_attention: tuple[nnx.Module, nnx.Module] | None = None,
        alignment: UAWarpC | None = None,
    ):
        self.backbone = student.backbone
        self.head = student.head
        self.m_backbone = teacher.backbone
        self.m_head = teacher.head
        self.imnet_backbone = imnet_backbone
        self.hrda_scale_attention, self.m_hrda_scale_attention = scale_attention or (None, None)
        # Refign's frozen alignment network (eval mode), when config.uda.refign.use_align
        self.alignment_backbone = None if alignment is None else alignment.alignment_backbone
        self.alignment_head = None if alignment is None else alignment.alignment_head
        self.global_step = StepCount(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalised images (b, h, w, 3) -> student logits (b, h/4, w/4, K)."""
        return self.head(self.backbone(x))


class AlignmentNet(UAWarpC):
    """UAWarpC's forward over a UDA model's own `alignment_backbone` / `alignment_head` (shared, not copied):
    what `models.uawarpc.align` runs in the step, and the module a converted UAWarpC folder loads into."""

    def __init__(self, alignment_backbone: nnx.Module, alignment_head: nnx.Module):
        self.alignment_backbone = alignment_backbone
        self.alignment_head = alignment_head


def _is_student(path, _) -> bool:
    return bool(path) and path[0] in STUDENT


def _copy_params(dst: nnx.Module, src: nnx.Module) -> None:
    nnx.update(dst, jax.tree.map(jnp.copy, nnx.state(src, nnx.Param)))


def _no_dropout(*modules: nnx.Module) -> None:
    for module in modules:
        for _, m in module.iter_modules():
            if isinstance(m, nnx.Dropout):  # DropPath included
                m.deterministic = True


class UDASystem(System):
    trainable = nnx.All(nnx.Param, _is_student)

    # ------------------------------------------------------------------------------------ networks
    def build_network(self, rngs: nnx.Rngs) -> EncoderDecoder:
        """Student / teacher architecture: MiT + DAFormer head at the config's size."""
        m = self.config.model
        dtype = jnp.dtype(m.dtype)
        backbone = MixVisionTransformer.from_preset(
            m.backbone, drop_path_rate=m.drop_path_rate, dtype=dtype, scan_blocks=m.scan_blocks, rngs=rngs
        )
        head = DAFormerHead(
            backbone.embed_dims,
            m.num_classes,
            channels=m.head.channels,
            embed_dims=m.head.embed_dims,
            dilations=tuple(m.head.dilations),
            dropout_ratio=m.head.dropout_ratio,
            dtype=dtype,
            rngs=rngs,
        )
        return EncoderDecoder(backbone, head)

    def build_encoder(self, rngs: nnx.Rngs) -> nnx.Module:
        """The frozen ImageNet encoder: the student's backbone without stochastic depth (eval mode)."""
        m = self.config.model
        return MixVisionTransformer.from_preset(
            m.backbone, drop_path_rate=0.0, dtype=jnp.dtype(m.dtype), scan_blocks=m.scan_blocks, rngs=rngs
        )

    def build_scale_attention(self, rngs: nnx.Rngs) -> hrda.SegFormerHead:
        """HRDA's scale attention: a SegFormer head over the encoder's 4 features (refign.md section 4)."""
        m = self.config.model
        sa = m.hrda.scale_attention
        return hrda.SegFormerHead(
            MIT_PRESETS[m.backbone.removeprefix("mit_")]["embed_dims"],
            m.num_classes,
            channels=sa.channels,
            dropout_ratio=sa.dropout_ratio,
            dtype=jnp.dtype(m.dtype),
            rngs=rngs,
        )

    def build_alignment(self, rngs: nnx.Rngs) -> UAWarpC:
        """Refign's frozen UAWarpC at config.uda.refign.alignment's size (vgg_widths () = VGG-16's,
        coarse_size, head_width), in the compute dtype."""
        a = self.config.uda.refign.alignment
        return UAWarpC(
            False,
            jnp.dtype(self.config.model.dtype),
            vgg_widths=tuple(a.vgg_widths) or None,
            coarse_size=a.coarse_size,
            head_width=a.head_width,
            rngs=rngs,
        )

    def _hrda(self):
        """config.model.hrda when HRDA is on, else None."""
        h = self.config.model.get("hrda")
        return h if h is not None and h.enabled else None

    def _refign(self):
        """config.uda.refign when the target step uses Refign or adapt_to_ref, else None."""
        u = self.config.uda
        r = u.get("refign")
        return r if u.enabled and r is not None and (r.use_refign or r.adapt_to_ref) else None

    def _aligns(self) -> bool:
        """Whether the step runs the alignment network (use_refign and use_align)."""
        r = self._refign()
        return r is not None and bool(r.use_refign and r.use_align)

    def build_model(self, rngs: nnx.Rngs) -> UDAModel:
        r = self._refign()
        k = self.config.model.num_classes
        if r is not None and r.use_refign and not all(0 <= c < k for c in r.static_classes):
            raise ValueError(
                f"config.uda.refign.static_classes {tuple(r.static_classes)} must be class ids below "
                f"model.num_classes {k}"
            )
        student, teacher = self.build_network(rngs), self.build_network(rngs)
        imnet = self.build_encoder(rngs) if self.config.uda.fdist.enabled else None
        attention = None
        if self._hrda() is not None:
            attention = (self.build_scale_attention(rngs), self.build_scale_attention(rngs))
        alignment = self.build_alignment(rngs) if self._aligns() else None
        model = UDAModel(student, teacher, imnet, attention, alignment)
        self._sync_copies(model)
        return model

    def _ema_pairs(self, model: UDAModel) -> list[tuple[nnx.Module, nnx.Module]]:
        """(teacher, student) module pairs: backbone, head, scale attention (when HRDA is on)."""
        pairs = [(model.m_backbone, model.backbone), (model.m_head, model.head)]
        if model.hrda_scale_attention is not None:
            pairs.append((model.m_hrda_scale_attention, model.hrda_scale_attention))
        return pairs

    def _sync_copies(self, model: UDAModel) -> None:
        """Teacher := student, ImageNet encoder := student backbone (its initial / pretrained weights)."""
        for teacher, student in self._ema_pairs(model):
            _copy_params(teacher, student)
        if model.imnet_backbone is not None:
            _copy_params(model.imnet_backbone, model.backbone)

    def has_pretrained(self) -> bool:
        """The segmentation weights (model.pretrained.path) or the alignment network's."""
        return super().has_pretrained() or self._aligns()

    def load_pretrained(self, model: UDAModel) -> str:
        """model.pretrained.path: a whole converted Refign checkpoint (`scripts/convert.py refign`: every
        group, the alignment network included) fills the model as it is; else the ImageNet / Cityscapes
        encoder weights, copied to the teacher and the ImageNet encoder. Then, for Refign, the alignment
        network from uda.refign.alignment."""
        from ..convert.refign import is_refign_converted, load_refign_converted

        if super().has_pretrained() and is_refign_converted(self.config.model.pretrained.path):
            path = self.config.model.pretrained.path
            meta = load_refign_converted(model, path)
            return f"{path} -> the whole UDA model ({meta.get('source', '?')})"
        loaded = []
        if super().has_pretrained():
            loaded.append(f"{super().load_pretrained(model)} (copied to m_backbone and imnet_backbone)")
            self._sync_copies(model)
        if self._aligns():
            loaded.append(self._load_alignment(model))
        return "; ".join(loaded)

    def _load_alignment(self, model: UDAModel) -> str:
        """config.uda.refign.alignment.path (a `scripts/convert.py uawarpc` or `scripts/eval_matching.py
        --export` folder) -> `alignment_backbone`, `alignment_head`; an empty path only with allow_random."""
        from ..convert.common import load_converted

        a = self.config.uda.refign.alignment
        if not a.path:
            if not a.allow_random:
                raise ValueError(
                    "config.uda.refign.alignment.path is empty: Refign's alignment needs the UAWarpC weights "
                    "(a `scripts/convert.py uawarpc` or `scripts/eval_matching.py --export` folder); set "
                    "config.uda.refign.alignment.allow_random=True only for tests and demos"
                )
            return "alignment_backbone, alignment_head: random (uda.refign.alignment.allow_random)"
        meta = load_converted(a.path, AlignmentNet(model.alignment_backbone, model.alignment_head))
        return f"{a.path} -> alignment_backbone, alignment_head ({meta.get('source', '?')})"

    # --------------------------------------------------------------------------------------- draws
    def draw(self, rng: jax.Array, labels: jax.Array) -> dict[str, Any]:
        """This step's random choices, per example from `rng`: ClassMix classes (b, K+1), jitter factors
        and orders, blur sigmas (b,), and the two batch gates (jitter iff u > p, blur iff u > 0.5)."""
        u = self.config.uda
        b = labels.shape[0]
        k_mix, k_jit, k_sig, k_gate = jax.random.split(rng, 4)
        gates = jax.random.uniform(k_gate, (2,))
        return dict(
            chosen=aug.classmix_choice(k_mix, labels, self.config.model.num_classes, u.classmix_per_image),
            jitter=aug.jitter_params(k_jit, b, u.color_jitter_strength),
            sigma=jax.random.uniform(k_sig, (b,), minval=0.15, maxval=1.15),
            do_jitter=gates[0] > u.color_jitter_p,
            do_blur=(gates[1] > 0.5) & u.blur,
        )

    # ---------------------------------------------------------------------------------------- step
    def _input(self, images: jax.Array) -> jax.Array:
        d = self.config.data
        return normalize(images, d.mean, d.std)  # (b, h, w, 3) fp32

    def _net(self, backbone: nnx.Module, head: nnx.Module, x: jax.Array, size) -> tuple[jax.Array, list]:
        feats = backbone(x.astype(jnp.dtype(self.config.model.dtype)))  # 4 x (b, h_s, w_s, c_s)
        return resize_bilinear(head(feats).astype(jnp.float32), size), feats  # (b, h, w, K)

    def _student(self, model: UDAModel, x: jax.Array, size, key: jax.Array):
        """Student training forward of normalised x (b, h, w, 3) -> (logits (b, h, w, K) at `size`, HRDA's
        (detail logits, box offset) or None, the features for the feature distance: HRDA's context ones)."""
        h = self._hrda()
        if h is None:
            logits, feats = self._net(model.backbone, model.head, x, size)  # (b, h, w, K)
            return logits, None, feats
        backbone = model.backbone
        if h.remat:
            backbone = partial(nnx.remat(lambda m, y: m(y)), model.backbone)
        fused, hr_logits, offset, lr_feats = hrda.student_forward(
            backbone, model.head, model.hrda_scale_attention, x, key, h.output_stride
        )  # (b, h/4, w/4, K), (b, h/2, w/2, K), (2,), 4 x (b, h_s/2, w_s/2, c_s)
        return resize_bilinear(fused, size), (hr_logits, offset), lr_feats

    def _cross_entropy(self, logits, detail, labels, weight=None) -> jax.Array:
        """CE of the student's logits; under HRDA (1 - w) CE(fused) + w CE(detail) on the cropped labels."""
        if detail is None:
            return cross_entropy(logits, labels, weight=weight)
        hr_logits, offset = detail
        crop, w = hr_logits.shape[1:3], self._hrda().hr_loss_weight
        hr_weight = None if weight is None else hrda.crop_at(weight, offset, crop)  # (b, h/2, w/2)
        return (1.0 - w) * cross_entropy(logits, labels, weight=weight) + w * cross_entropy(
            hr_logits, hrda.crop_at(labels, offset, crop), weight=hr_weight
        )

    def _teacher(self, model: UDAModel, x: jax.Array, size) -> jax.Array:
        """EMA teacher logits (b, h, w, K) at `size` (HRDA: sliding detail crops)."""
        h = self._hrda()
        if h is None:
            return self._net(model.m_backbone, model.m_head, x, size)[0]
        fused = hrda.slide_forward(
            model.m_backbone, model.m_head, model.m_hrda_scale_attention, x, h.output_stride
        )  # (b, h/4, w/4, K)
        return resize_bilinear(fused, size)

    def teacher_logits(self, model: UDAModel, images: jax.Array, size) -> jax.Array:
        """The EMA teacher's logits (b, h, w, K) at `size` for uint8 images (b, h, w, 3), as the step runs it
        (the teacher's mode is the model's: train mode in the step)."""
        return self._teacher(model, self._input(images), size)

    def _teacher_probs(self, model: UDAModel, x: jax.Array, size) -> jax.Array:
        """Teacher softmax (b, h, w, K) at `size` of normalised x (b, h, w, 3), no gradient."""
        return jax.lax.stop_gradient(jax.nn.softmax(self._teacher(model, x, size), axis=-1))

    def _refined_probs(self, model: UDAModel, x_t: jax.Array, x_r: jax.Array, size) -> jax.Array:
        """Refign: the teacher once on cat[x_t, x_r] (bt each, normalised), the reference logits aligned onto
        the target by the frozen UAWarpC (use_align; else unaligned), refined -> probabilities
        (bt, h, w, K)."""
        r = self.config.uda.refign
        bt = x_t.shape[0]
        logits = self._teacher(model, jnp.concatenate([x_t, x_r]), size)  # (2 bt, h, w, K): BN sees both
        logits_t, logits_r = logits[:bt], logits[bt:]  # (bt, h, w, K) each
        valid = conf = None
        if r.use_align:
            net = AlignmentNet(model.alignment_backbone, model.alignment_head)
            logits_r, valid, conf = align(net, x_t, x_r, logits_r)  # (bt, h, w, K), (bt, h, w), (bt, h, w, 1)
        probs = refign.refine(
            logits_t,
            logits_r,
            valid,
            conf,
            gamma=r.gamma,
            static_classes=tuple(r.static_classes),
            disable_M=r.disable_M,
            disable_P=r.disable_P,
        )  # (bt, h, w, K)
        return jax.lax.stop_gradient(probs)

    def target_probs(
        self, model: UDAModel, batch, rng: jax.Array, size
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Step 4: (the target images of the mix (bt, h, w, 3) normalised, the teacher's probabilities for
        them (bt, h, w, K), metrics). adapt_to_ref's coin comes from `rng` (the loss rng)."""
        x_t = self._input(batch["image_trg"])  # (bt, h, w, 3)
        r = self._refign()
        if r is None:
            return x_t, self._teacher_probs(model, x_t, size), {}
        x_r = self._input(batch["image_ref"])  # (bt, h, w, 3)
        if self._aligns():  # frozen and in eval mode whatever the trainer set
            model.alignment_backbone.eval()
            model.alignment_head.eval()

        def on_target(m: UDAModel) -> jax.Array:
            return (
                self._refined_probs(m, x_t, x_r, size) if r.use_refign else self._teacher_probs(m, x_t, size)
            )

        if not r.adapt_to_ref:
            return x_t, on_target(model), {}
        to_ref = jax.random.uniform(jax.random.fold_in(rng, ADAPT_TO_REF_STREAM)) < ADAPT_TO_REF_P
        probs = nnx.cond(to_ref, lambda m: self._teacher_probs(m, x_r, size), on_target, model)
        return jnp.where(to_ref, x_r, x_t), probs, {"adapted_to_ref": to_ref.astype(jnp.float32)}

    def _source_terms(
        self, model: UDAModel, x_s: jax.Array, y_s: jax.Array, key: jax.Array
    ) -> dict[str, jax.Array]:
        """L_src, the pixel accuracy and (fdist.enabled) L_fd of labelled images x_s (b, h, w, 3) normalised,
        y_s (b, h, w); `key` draws HRDA's detail box."""
        u, k = self.config.uda, self.config.model.num_classes
        logits_s, detail, feats_s = self._student(model, x_s, y_s.shape[1:3], key)  # (b, h, w, K)
        terms = {
            "loss_src": self._cross_entropy(logits_s, detail, y_s),
            "pixel_acc": pixel_accuracy(jnp.argmax(logits_s, -1), y_s),
        }
        if u.fdist.enabled:
            f_s = feats_s[-1]  # (b, h/32, w/32, c); HRDA: of the x0.5 context
            x_i = x_s if detail is None else hrda.half(x_s)  # (b, h, w, 3) or (b, h/2, w/2, 3)
            f_i = jax.lax.stop_gradient(model.imnet_backbone(x_i.astype(f_s.dtype))[-1])  # like f_s
            y_low = aug.downscale_label_ratio(y_s, y_s.shape[2] // f_s.shape[2], u.fdist.min_ratio, k)
            mask = jnp.isin(y_low, jnp.asarray(u.fdist.classes))  # (b, h/32, w/32)
            terms["loss_fd"] = u.fdist.weight * aug.feature_distance(f_s, f_i, mask)
        return terms

    def loss(self, model: UDAModel, batch, rng):
        u, k = self.config.uda, self.config.model.num_classes
        t = model.global_step.get_value()
        momentum = aug.ema_momentum(t, u.ema_momentum)
        for teacher, student in self._ema_pairs(model):
            nnx.update(
                teacher,
                aug.ema_update(nnx.state(teacher, nnx.Param), nnx.state(student, nnx.Param), momentum),
            )
        model.global_step.set_value(t + 1)
        if not u.teacher_dropout:
            _no_dropout(*(teacher for teacher, _ in self._ema_pairs(model)))
        key_src, key_mix = jax.random.split(jax.random.fold_in(rng, HRDA_BOX_STREAM))

        x_s, y_s = self._input(batch["image_src"]), batch["label_src"]  # (bs, h, w, 3), (bs, h, w)
        size = y_s.shape[1:3]
        if "image_lab" in batch:
            blank = batch["blank_lab"][..., None]  # (bl, h, w, 1)
            x_l = jnp.where(blank, 0.0, self._input(batch["image_lab"]))  # (bl, h, w, 3)
            x_all = jnp.concatenate([x_s, x_l])  # (bs + bl, h, w, 3)
            y_all = jnp.concatenate([y_s, batch["label_lab"].astype(y_s.dtype)])  # (bs + bl, h, w)
            drop = jax.random.uniform(jax.random.fold_in(rng, LABELLED_DROP_STREAM)) < u.labelled_drop_p
            metrics = nnx.cond(
                drop,
                lambda m: self._source_terms(m, x_s, y_s, key_src),
                lambda m: self._source_terms(m, x_all, y_all, key_src),
                model,
            )
            metrics["labelled_dropped"] = drop.astype(jnp.float32)
        else:
            metrics = self._source_terms(model, x_s, y_s, key_src)
        total = metrics["loss_src"] + metrics.get("loss_fd", 0.0)

        if u.enabled:
            x_t, probs, target_metrics = self.target_probs(model, batch, rng, size)  # (bt, h, w, 3), (.., K)
            bt = x_t.shape[0]
            metrics.update(target_metrics)
            pseudo = jnp.argmax(probs, axis=-1)  # (bt, h, w)
            weight = aug.pseudo_weight(probs, u.pseudo_threshold)
            xs_b, ys_b = x_s[:bt], y_s[:bt]
            draws = self.draw(rng, ys_b)
            mask = aug.class_masks(ys_b, draws["chosen"], k)  # (bt, h, w)
            x_mix = mask[..., None] * xs_b + (1.0 - mask[..., None]) * x_t  # (bt, h, w, 3)
            y_mix = jnp.where(mask > 0, ys_b, pseudo)  # (bt, h, w)
            w_mix = mask + (1.0 - mask) * weight  # (bt, h, w)
            d = self.config.data
            x_mix = aug.strong_augment(
                x_mix, d.mean, d.std, draws["jitter"], draws["sigma"], draws["do_jitter"], draws["do_blur"]
            )
            logits_mix, detail, _ = self._student(model, x_mix, size, key_mix)  # (bt, h, w, K)
            loss_mix = self._cross_entropy(logits_mix, detail, y_mix, weight=w_mix)
            metrics.update(loss_mix=loss_mix, pseudo_weight=weight)
            total = total + loss_mix
        metrics["ema_momentum"] = momentum
        return total, metrics

    # ----------------------------------------------------------------------------------- inference
    def predict(self, model: UDAModel, images):
        x = self._input(images)  # (b, h, w, 3)
        h = self._hrda()
        if h is not None:  # refign whole_inference of one window under HRDA
            return hrda.window_predict(
                model.backbone, model.head, model.hrda_scale_attention, x, h.output_stride
            )
        logits, _ = self._net(model.backbone, model.head, x, images.shape[1:3])
        return logits  # (b, h, w, K)
