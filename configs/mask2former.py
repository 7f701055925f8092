"""Supervised Mask2Former head (the RASS head) on a MiT encoder.

Variants:
  (none) / "ade20k": MiT-B5 + Mask2Former (conv dim 256, 100 queries, 9 decoder layers, 6 MSDeformAttn
        encoder layers) on ADE20K, 512 crops, the Mask2Former ADE20K recipe (rass.md section 3): AdamW 1e-4
        (x0.1 backbone), wd 0.05 (0 for norms and embeddings), poly 0.9, clip 0.01, 160k steps at batch 16.
  "tiny": MiT-B0 with a narrow head on the synthetic scenes (same data and steps as configs/daformer.py:tiny).
"""

import ml_collections

from lqseg_jax.train.config import load_config

ADE_MEAN = (123.675, 116.28, 103.53)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "ade20k"
    if variant not in ("ade20k", "tiny"):
        raise ValueError(f"configs/mask2former.py variants: ade20k (default), tiny; got {variant!r}")
    c = load_config("configs/daformer.py:tiny" if variant == "tiny" else "configs/daformer.py")
    c.system = "mask2former"
    del c.model["head"]
    c.model.head = ml_collections.ConfigDict()  # Mask2FormerConfig overrides on top of the RASS head
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.05
    c.optimizer.no_decay = (r"norm", r"query_feat", r"query_embed", r"level_embed")
    c.optimizer.no_decay_1d = False
    c.optimizer.clip_norm = 0.01
    c.optimizer.schedule.warmup_steps = 0
    c.optimizer.schedule.power = 0.9
    if variant == "ade20k":
        c.model.num_classes = 150
        c.data.source = "ade20k"
        c.data.root = "data/ADEChallengeData2016"
        c.data.train_split = "training"
        c.data.class_names = ()
        c.data.scale = (2048, 512)
        c.data.ratio_range = (0.5, 2.0)
        c.data.crop = (512, 512)
        c.data.cat_max_ratio = 1.0
        c.eval.split = "validation"
        c.eval.scale = (2048, 512)
        c.batch_size = 16
        c.total_steps = 160_000
        c.checkpoint.every = 5000
        c.eval_every = 5000
        c.model.dtype = "bfloat16"
    else:
        c.model.head.update(
            dict(
                conv_dim=64,
                mask_dim=64,
                enc_layers=2,
                enc_ffn_dim=128,
                hidden_dim=64,
                num_queries=16,
                dec_ffn_dim=256,
                dec_layers=6,
                train_num_points=2048,
                max_targets=10,
            )
        )
        c.optimizer.lr = 6e-4
        c.optimizer.clip_norm = 0.0
    return c
