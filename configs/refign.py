"""Refign-DAFormer (refign.md sections 7 and 8): self-training UDA with MiT + DAFormer head, Cityscapes ->
adverse conditions, the teacher's target prediction refined with its prediction of the aligned
normal-condition reference (frozen UAWarpC; config.uda.refign), adapting to the reference half the time.

Variants (`--config configs/refign.py:VARIANT[,FLAG]`):
  "acdc" (default): Cityscapes (512x1024, 512 crops, cat_max_ratio 0.75, RCS) -> ACDC (540x960, 512 crops);
         MiT-B5 from ImageNet weights (model.pretrained.path = a `scripts/convert.py mit` output), batch 2 + 2,
         AdamW head 6e-4 / backbone 6e-5, wd 0.01 (0 on 1-D), warmup 1500 then linear to 0 at 40k.
  "darkzurich": the same with Dark Zurich (540x960) as target.
  "robotcar": Cityscapes -> RobotCar pairs (720x720, 512 crops), 20k steps, validation every 2000 steps over
         present classes; batch 2 Cityscapes + 2 labelled RobotCar (rotation 10 deg, torchvision
         ColorJitter(0.25, 0.25, 0.25, 0.1), no cat-max check; dropped from the step with p 0.5) + 2 pairs.
  "tiny": MiT-B0 with a 64-wide head, random init, on the synthetic paired data (Cityscapes-layout scenes ->
         ACDC-layout night/fog/rain), 64x64 crops, batch 8 + 8, 300 steps, EMA 0.99,
         pseudo-label threshold 0.9 (tests, demo); a tiny UAWarpC (VGG widths 8-32, head at a quarter width
         on 144x144 coarse copies: the network of configs/uawarpc.py:tiny) left random unless
         uda.refign.alignment.path names trained weights (`scripts/eval_matching.py --export` of a
         configs/uawarpc.py:tiny run); static classes = the synthetic scenes' sky, grass, road, water,
         building, sand.
The main variants are the paper's Refign (ablation row 6: use_refign, use_align, gamma 0.25, adapt_to_ref),
with the alignment network from uda.refign.alignment.path = a `scripts/convert.py uawarpc --src
uawarpc_megadepth.ckpt` output folder (default weights/uawarpc_megadepth; an empty path is refused unless
uda.refign.alignment.allow_random). One flag may follow the variant:
  ",row1" .. ",row6": the ablation rows of refign.md section 8 (row 1: unaligned reference, eps 0.5;
         row 2: aligned, eps 0.5 inside the valid warp; row 3: eps P; row 4: max(P, M); row 5: s max(P, M),
         gamma 0.25; row 6 = the default);
  ",no_refign": the UDA baseline without Refign (plain teacher on the target, no adaptation to the
         reference, no alignment network), e.g. `:tiny,no_refign`;
  ",source_only": the source-only baseline (same network, data and schedule, no target loss, no Refign).
Evaluation (scripts/eval.py, eval_every) is on the target's val split (eval.source / eval.root): ACDC,
Dark Zurich, RobotCar val; for "tiny" the synthetic ACDC-layout val split. refign.md section 9: the val
stage at 540x960 with the label resized too, `scripts/eval.py --protocol test` keeps full-resolution labels
(logits resized to them), `--predict` writes the test split as the servers take it; Dark Zurich adds
Nighttime Driving and BDD100k-night (eval.extra_sets); mIoU over all 19 classes (RobotCar: over present
classes). Override any field with --config.key=value (when changing data.target_root, change eval.root too).
"""

import ml_collections

from lqseg_jax.train.config import base_config

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
TARGETS = ("acdc", "darkzurich", "robotcar", "tiny")
# refign.md section 8 (refign configs/cityscapes_acdc/ablations):
# use_align, disable_P, disable_M, gamma, adapt_to_ref
ROWS = {
    "row1": (False, False, True, 0.0, False),
    "row2": (True, True, True, 0.0, False),
    "row3": (True, False, True, 0.0, False),
    "row4": (True, False, False, 0.0, False),
    "row5": (True, False, False, 0.25, False),
    "row6": (True, False, False, 0.25, True),
}
FLAGS = ("source_only", "no_refign", *ROWS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "acdc").split(",")
    variant, flags = parts[0], set(parts[1:])
    if variant not in TARGETS or not flags <= set(FLAGS) or len(flags) > 1:
        raise ValueError(
            f"configs/refign.py variants: {', '.join(TARGETS)} (default acdc), optionally followed by one of "
            f"{', '.join(',' + f for f in FLAGS)}; got {arg!r}"
        )
    flag = next(iter(flags), "row6")
    use_align, disable_p, disable_m, gamma, adapt_to_ref = ROWS.get(flag, ROWS["row6"])
    c = base_config()
    c.system = "uda"
    c.model.backbone = "mit_b5"
    c.model.num_classes = 19
    c.model.drop_path_rate = 0.1
    c.model.head = ml_collections.ConfigDict(
        dict(embed_dims=256, channels=256, dilations=(1, 6, 12, 18), dropout_ratio=0.1)
    )
    c.model.pretrained.prefix = "backbone"  # copied into the teacher and the ImageNet encoder at load
    c.uda = ml_collections.ConfigDict(
        dict(
            enabled=flag != "source_only",  # False: source CE (+ feature distance) only
            ema_momentum=0.999,
            teacher_dropout=True,  # refign's quirk; False as DAFormer/HRDA (teacher dropout and drop-path off)
            pseudo_threshold=0.968,
            labelled_drop_p=0.5,  # refign ignore_every_second_semantic_training_batch (labelled target only)
            classmix_per_image=False,  # True: candidate classes of each source image instead of the batch
            color_jitter_p=0.2,
            color_jitter_strength=0.2,
            blur=True,
            fdist=dict(
                enabled=True,
                weight=0.005,
                classes=(6, 7, 11, 12, 13, 14, 15, 16, 17, 18),
                min_ratio=0.75,
            ),
            refign=dict(  # refign.md sections 3.9 and 8; systems/refign.py
                use_refign=flag in ROWS,  # teacher on target + reference, refine with the reference
                use_align=use_align,  # warp the reference logits onto the target (False: row 1)
                disable_P=disable_p,  # P := 0.5
                disable_M=disable_m,  # M := 0
                gamma=gamma,  # trust s = (mean normalised entropy)^gamma
                adapt_to_ref=flag in ROWS and adapt_to_ref,  # p 0.5: self-train on the reference alone
                # M's classes: road, sidewalk, building, wall, fence, vegetation, terrain, sky
                static_classes=(0, 1, 2, 3, 4, 8, 9, 10),
                alignment=dict(
                    path="weights/uawarpc_megadepth",  # a `scripts/convert.py uawarpc` output folder
                    allow_random=False,  # True: an empty path leaves the alignment random (tests, demos)
                    vgg_widths=(),  # () = VGG-16's (64, 128, 256, 512, 512)
                    coarse_size=256,  # the head's `area` copies (refign: 256; 144 for tiny copies)
                    head_width=1.0,  # head channel widths x this (refign: 1)
                ),
            ),
        )
    )

    c.data.pipeline = "uda"  # data_pipelines/streams.py: source + target/reference batches
    c.data.source = "cityscapes"
    c.data.root = "data/cityscapes"
    c.data.class_names = CITYSCAPES_CLASSES
    c.data.source_size = (512, 1024)  # (h, w) at load, refign's `dims`
    c.data.crop = (512, 512)
    c.data.cat_max_ratio = 0.75
    c.data.rcs = ml_collections.ConfigDict(
        dict(enabled=True, temperature=0.01, min_pixels=3000, min_crop_ratio=0.5)
    )
    c.data.target = "acdc"
    c.data.target_root = "data/acdc"
    c.data.target_size = (540, 960)
    c.data.target_split = "train"
    c.data.labelled_target = ml_collections.ConfigDict(
        dict(enabled=False, split="train", rotation=10.0, jitter=(0.25, 0.25, 0.25, 0.1))
    )
    c.eval.split = "val"
    c.eval.scale = (960, 540)
    c.eval.resize_labels = True  # refign's val stage: label resized with the image; --protocol test: full res
    c.eval.present_classes_only = False  # refign's IoU: mean over all 19 classes, union 0 -> 0

    c.batch_size = 2  # source images per step; the same number of target pairs
    c.total_steps = 40_000
    c.checkpoint.every = 4000
    c.eval_every = 4000
    c.optimizer.lr = 6e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.no_decay_1d = True
    c.optimizer.lr_mults = ((r"^backbone\.", 0.1),)
    c.optimizer.schedule.kind = "warmup_linear"
    c.optimizer.schedule.warmup_steps = 1500
    c.optimizer.schedule.warmup_ratio = 1e-6

    if variant == "darkzurich":
        c.data.target = "darkzurich"
        c.data.target_root = "data/dark_zurich"
        c.eval.extra_sets = ml_collections.ConfigDict(
            dict(  # refign's Dark Zurich test stage; roots: prepared records, or the on-disk folders (+ night list)
                nighttimedriving=dict(source="nighttimedriving", root="data/nighttime_driving", split="test"),
                bdd100k_night=dict(
                    source="bdd100k-night",
                    root="data/bdd100k_night",
                    split="test",
                    options=dict(night_list="data/bdd100k_night/images_trainval_night_correct_filenames.txt"),
                ),
            )
        )
    elif variant == "robotcar":
        c.data.target = "robotcar"
        c.data.target_root = "data/robotcar"
        c.data.target_size = (720, 720)
        c.data.target_split = "pairs"
        c.data.labelled_target.enabled = True
        c.eval.scale = ()
        c.eval.present_classes_only = True  # refign over_present_classes
        c.eval.test_split = "test"  # refign's test stage: RobotCar's testing split
        c.total_steps = 20_000
        c.checkpoint.every = 2000
        c.eval_every = 2000
    elif variant == "tiny":
        from lqseg_jax.data_pipelines.synthetic import CLASSES

        c.model.backbone = "mit_b0"
        c.model.num_classes = len(CLASSES)
        c.model.head.embed_dims = 64
        c.model.head.channels = 64
        c.uda.fdist.classes = (6, 7, 8, 9)  # tree, ball, car, sign: the objects
        # 300 steps: a teacher averaging over ~100 steps (0.999 would average the whole run, random init
        # included) and a threshold a 300-step network reaches on the adverse images
        c.uda.ema_momentum = 0.99
        c.uda.pseudo_threshold = 0.9
        c.uda.refign.static_classes = (0, 1, 2, 3, 4, 5)  # sky, grass, road, water, building, sand
        c.uda.refign.alignment.path = ""
        c.uda.refign.alignment.allow_random = True
        c.uda.refign.alignment.vgg_widths = (8, 16, 24, 32, 32)  # the tiny UAWarpC of configs/uawarpc.py:tiny
        c.uda.refign.alignment.coarse_size = 144
        c.uda.refign.alignment.head_width = 0.25
        c.data.root = "data/synthetic_adverse/cityscapes"
        c.data.target_root = "data/synthetic_adverse/acdc"
        c.data.class_names = CLASSES
        c.data.synthetic.enabled = True  # written under data.root/.. on first use (train and val splits)
        c.data.synthetic.num_train = 200  # source scenes
        c.data.synthetic.num_val = 40
        c.data.synthetic.num_target_train = 40  # pairs per condition (night, fog, rain)
        c.data.synthetic.num_target_val = 10
        c.data.source_size = ()
        c.data.target_size = ()
        c.data.crop = (64, 64)
        c.data.rcs.enabled = False
        c.eval.scale = ()
        c.eval.present_classes_only = True  # as the demo numbers were measured (classes with GT pixels)
        c.eval.batch_size = 10
        c.batch_size = 8
        c.total_steps = 300
        c.log_every = 10
        c.checkpoint.every = 100
        c.eval_every = 0
        c.optimizer.schedule.warmup_steps = 30
        c.optimizer.lr_mults = ()  # random init: one learning rate
    c.eval.source = c.data.target  # refign.md section 9: the target's val split
    c.eval.root = c.data.target_root
    return c
