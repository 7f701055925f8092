"""Supervised MiT + DAFormer head (Refign's segmentation network), refign.md sections 2-3.

Variants:
  (none) / "b5": MiT-B5 + DAFormer head on Cityscapes: resize to 512x1024, 512x512 crops, batch 2,
         AdamW 6e-4 (x0.1 for the backbone), wd 0.01 (0 on 1-D params), warmup 1500 then poly 1.0, 40k steps.
  "tiny": MiT-B0 with a 64-wide head on the synthetic scenes at 96x96 crops, one learning rate for all
          (random init), 300 steps at batch 8 (tests, demo, resume checks).
Override any field with --config.key=value.
"""

import ml_collections

from lqseg_jax.data_pipelines.synthetic import CLASSES
from lqseg_jax.train.config import base_config

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "b5"
    if variant not in ("b5", "tiny"):
        raise ValueError(f"configs/daformer.py variants: b5 (default), tiny; got {variant!r}")
    c = base_config()
    c.system = "daformer"
    c.model.backbone = "mit_b5"
    c.model.num_classes = 19
    c.model.drop_path_rate = 0.1
    c.model.avg_non_ignore = False
    c.model.head = ml_collections.ConfigDict(
        dict(embed_dims=256, channels=256, dilations=(1, 6, 12, 18), dropout_ratio=0.1)
    )
    c.model.pretrained.prefix = "backbone"  # path: a `scripts/convert.py mit` output of ImageNet MiT weights

    c.data.source = "cityscapes"
    c.data.root = "data/cityscapes"
    c.data.class_names = CITYSCAPES_CLASSES
    c.data.scale = (1024, 512)
    c.data.crop = (512, 512)
    c.data.cat_max_ratio = 0.75
    c.eval.split = "val"
    c.eval.scale = (1024, 512)

    c.batch_size = 2
    c.total_steps = 40_000
    c.checkpoint.every = 4000
    c.eval_every = 4000
    c.optimizer.lr = 6e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.lr_mults = ((r"^backbone\.", 0.1),)
    c.optimizer.schedule.warmup_steps = 1500
    c.optimizer.schedule.warmup_ratio = 1e-6
    c.optimizer.schedule.power = 1.0

    if variant == "tiny":
        c.model.backbone = "mit_b0"
        c.model.num_classes = len(CLASSES)
        c.model.head.embed_dims = 64
        c.model.head.channels = 64
        c.data.source = "ade20k"
        c.data.train_split = "training"
        c.data.root = "data/synthetic"
        c.data.class_names = CLASSES
        c.data.synthetic.enabled = True
        c.data.scale = (160, 120)
        c.data.ratio_range = (0.75, 1.5)
        c.data.crop = (96, 96)
        c.eval.split = "validation"
        c.eval.scale = ()
        c.eval.batch_size = 10
        c.batch_size = 8
        c.total_steps = 300
        c.log_every = 10
        c.checkpoint.every = 100
        c.eval_every = 0
        c.optimizer.schedule.warmup_steps = 30
        c.optimizer.lr_mults = ()  # the backbone starts from random weights here: no x0.1
    return c
