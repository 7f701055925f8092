"""Refign-HRDA* (refign `refign_hrda_star.yaml`, refign.md sections 6, 7 and 8): the Refign UDA system of
configs/refign.py (align + refine with the frozen UAWarpC, gamma 0.25, adapt_to_ref) with `model.hrda` on:
the student trains on a x0.5 context crop and a full-resolution detail crop fused by a learned scale
attention, loss 0.9 fused + 0.1 detail; the EMA teacher (on target and reference together under Refign) and
evaluation use sliding detail crops; evaluation slides 1080x1080 windows every 420 pixels over
full-resolution images.

Variants (`--config configs/hrda.py:VARIANT`, optionally followed by `,no_refign` (HRDA* UDA without
Refign) or `,source_only`, as in configs/refign.py):
  "acdc" (default): Cityscapes (full resolution 1024x2048, 1024 crops, cat_max_ratio 0.75, RCS with
         min_crop_ratio 2.0) -> ACDC (full resolution 1080x1920, 1024 crops); batch 2 + 2; MiT-B5 started from
         the Cityscapes-trained SegFormer (refign.md O6): model.pretrained.path = the folder written by
         `python scripts/convert.py segformer-mmseg --src segformer.b5.1024x1024.city.160k.pth --out DIR`.
  "darkzurich": the same with Dark Zurich (1080x1920) as target.
  "tiny": configs/refign.py:tiny (MiT-B0, random init, synthetic paired data 120x160) with HRDA on 96 crops
         (48 context / detail), a 64-wide scale attention, and sliding 96x96 evaluation windows every 48;
         the tiny random UAWarpC of configs/refign.py:tiny.
Everything else (optimiser, schedule, EMA, ClassMix, feature distance: on the context features against
the ImageNet-side encoder on the x0.5 image; uda.refign and its alignment weights) is configs/refign.py's.
"""

from pathlib import Path

import ml_collections

from lqseg_jax.train.config import load_config

VARIANTS = ("acdc", "darkzurich", "tiny")
FLAGS = ("no_refign", "source_only")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "acdc").split(",")
    if parts[0] not in VARIANTS or not set(parts[1:]) <= set(FLAGS) or len(parts) > 2:
        raise ValueError(
            f"configs/hrda.py variants: {', '.join(VARIANTS)} (default acdc), optionally followed by "
            f"',no_refign' or ',source_only'; got {arg!r}"
        )
    c = load_config(f"{Path(__file__).with_name('refign.py')}:{arg or 'acdc'}")
    c.model.hrda = ml_collections.ConfigDict(
        dict(
            enabled=True,
            output_stride=4,  # refign `hrda_output_stride`: the head's stride
            hr_loss_weight=0.1,  # loss = (1 - w) CE(fused) + w CE(detail)
            scale_attention=dict(channels=256, dropout_ratio=0.1),  # SegFormerHead
            remat=False,  # recompute the encoder's activations in the backward pass (memory for compute)
        )
    )
    # MiT stages as rematerialised scans: the backward recomputes one block at a time (mit.py scan_blocks;
    # benchmarks/RESULTS.md "HRDA* UDA step memory"); the tiny variant keeps the unrolled blocks
    c.model.scan_blocks = parts[0] != "tiny"
    c.data.source_size = ()  # full resolution
    c.data.target_size = ()
    c.data.crop = (1024, 1024)
    c.data.rcs.min_crop_ratio = 2.0
    c.eval.scale = ()
    c.eval.mode = "slide"  # refign `use_slide_inference`
    c.eval.crop = (1080, 1080)
    c.eval.stride = (420, 420)
    c.eval.resize_labels = False  # HRDA*: val and test on full-resolution images and labels
    if parts[0] == "tiny":
        c.model.hrda.scale_attention.channels = 64
        c.data.crop = (96, 96)
        c.eval.crop = (96, 96)
        c.eval.stride = (48, 48)
    return c
