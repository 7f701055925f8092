"""UAWarpC alignment training and matching evaluation (refign.md 3.6-3.10; refign configs/megadepth).

Variants (`--config configs/uawarpc.py:VARIANT`):
  "stage1" (default): MegaDepth pairs (prepared records at data.root, 750x750, swap p 0.5, first 30000 of the
         shuffled list), homography / TPS / affine+TPS warps (0.333, 0.333, 0.08), 520 crops, batch 6, warp
         supervision + W-bipath without the visibility mask, Adam lr 1e-4 with coupled L2 4e-4, MultiStep
         x0.5 at 250k and 325k of 400k steps. VGG-16 from ImageNet weights (model.pretrained.path = a
         `scripts/convert.py vgg16` output, prefix alignment_backbone), frozen; the head trains.
  "stage2": warps (0.4, 0.4, 0.26) with the elastic composition, visibility mask on, lr 5e-5, MultiStep x0.5
         at 100k, 150k, 200k of 225k; initialised from model.pretrained.path = a converted UAWarpC folder
         (prefix ""): a stage-1 workdir exported by `scripts/eval_matching.py --workdir W --export DIR`, or
         `scripts/convert.py uawarpc` of refign's `uawarpc_megadepth.ckpt`.
  "eval": matching evaluation only (scripts/eval_matching.py): MegaDepth test1600Pairs or RobotCar test6511
         records (eval.source / eval.root), short side 480 lanczos, bottom-right padding.
  "tiny": a tiny copy (VGG widths (8, 16, 24, 32, 32), head at a quarter of its widths on 144x144 coarse
         copies) on the synthetic paired adverse data (written at data.root on first use), 48x48 crops of
         64x64 pairs, stage-1 warps, batch 8, constant lr 1e-3 (tests, CPU demo); evaluated every 100 steps
         on the synthetic val pairs (true flows) at short side 64.
Validation during training (refign: MegaDepth val pairs at `dims` 480x720, SparseEPE): stages 1 and 2
evaluate config.eval (split "val", eval.dims (480, 720)) every eval_every = 5000 steps through the loop
(UAWarpCSystem.training_evaluation), logging eval/AEPE, eval/PCK_1..10 and eval/AUSE.
Stages 1 and 2 use torch's MultiStepLR (optimizer.schedule.kind "multistep", lqseg_jax/train/multistep.py);
"tiny" uses a constant rate (poly with power 0).
"""

import ml_collections

from lqseg_jax.train.config import base_config

VARIANTS = ("stage1", "stage2", "eval", "tiny")


def constant_schedule() -> ml_collections.ConfigDict:
    """A constant rate in optim.py's terms: poly with power 0."""
    return ml_collections.ConfigDict(
        dict(kind="poly", warmup_steps=0, warmup_ratio=1e-6, power=0.0, end_lr=0.0)
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "stage1"
    if variant not in VARIANTS:
        raise ValueError(f"configs/uawarpc.py variants: {', '.join(VARIANTS)} (default stage1); got {arg!r}")
    c = base_config()
    c.system = "uawarpc"
    c.batch_size = 6
    c.total_steps = 400_000
    c.log_every = 100
    c.checkpoint.every = 5000
    c.model.num_classes = 0
    c.model.vgg_widths = ()  # () = VGG-16's (64, 128, 256, 512, 512)
    c.model.coarse_size = 256  # the head's `area` copies (refign: 256; 144 for tiny copies)
    c.model.head_width = 1.0  # head channel widths x this (refign: 1)
    c.model.iterative_refinement = True  # eval-only extra passes (MegaDepth configs)
    c.model.pretrained.path = "weights/vgg16"
    c.model.pretrained.prefix = "alignment_backbone"
    c.uawarpc = ml_collections.ConfigDict(
        dict(
            stage=1,
            warps=ml_collections.ConfigDict({}),  # WarpSpec fields overriding the stage's constants
            crop=(520, 520),
            visibility_mask=False,
            alpha_1=0.03,
            alpha_2=0.5,
            loss_weight_quirk=False,  # True: refign's (0,1)/(1,100)/(1,-inf) weights (refign.md O0b)
            loss_ratio=1.0,  # DenseMatching: warp_supervision / w_bipath weight
            weight_decay=4e-4,  # Adam's coupled L2, added to the loss
        )
    )
    o = c.optimizer
    o.lr = 1e-4
    o.weight_decay = 0.0  # plain Adam: the L2 is coupled (uawarpc.weight_decay)
    o.no_decay_1d = False
    o.schedule = ml_collections.ConfigDict(dict(kind="multistep", milestones=(250_000, 325_000), gamma=0.5))

    d = c.data
    d.pipeline = "matching"
    d.source = "megadepth"
    d.root = "data/megadepth_records"
    d.size = (750, 750)
    d.swap_prob = 0.5
    d.max_examples = 30_000
    d.synthetic = ml_collections.ConfigDict(
        dict(enabled=False, num_target_train=40, num_target_val=10, height=120, width=160, seed=0)
    )
    c.eval_every = 5000
    c.eval = ml_collections.ConfigDict(
        dict(
            source="megadepth",
            root="data/megadepth_records",
            split="val",
            dims=(480, 720),  # (h, w) both images resized to it; () = short_side
            short_side=480,
            max_pairs=0,
        )
    )

    if variant == "stage2":
        c.uawarpc.stage = 2
        c.uawarpc.visibility_mask = True
        c.total_steps = 225_000
        o.lr = 5e-5
        o.schedule.milestones = (100_000, 150_000, 200_000)
        c.model.pretrained.path = "weights/uawarpc_stage1"
        c.model.pretrained.prefix = ""
    elif variant == "eval":
        c.eval_every = 0
        c.eval.split = "test"
        c.eval.dims = ()
        c.model.pretrained.path = "weights/uawarpc_megadepth"
        c.model.pretrained.prefix = ""
        o.schedule = constant_schedule()  # no training: any schedule optim.py builds today
    elif variant == "tiny":
        c.batch_size = 8  # a multiple of the test session's 8 CPU devices
        c.total_steps = 300
        c.log_every = 10
        c.checkpoint.every = 100
        c.checkpoint.async_save = False
        c.model.vgg_widths = (8, 16, 24, 32, 32)
        c.model.coarse_size = 144
        c.model.head_width = 0.25
        c.model.iterative_refinement = False
        c.model.pretrained.path = ""
        c.uawarpc.crop = (48, 48)
        o.lr = 1e-3
        o.schedule = constant_schedule()
        d.source = "synthetic"
        d.root = "data/synthetic_matching"
        d.size = (64, 64)
        d.synthetic.enabled = True
        d.num_threads = 2
        c.eval.source = "synthetic"
        c.eval.root = "data/synthetic_matching"
        c.eval.split = "val"
        c.eval.dims = ()
        c.eval.short_side = 64  # the training pairs' scale (stored 120x160, trained at 64x64)
        c.eval_every = 100
    return c
