"""RASS: SD 2.1 (VAE encoder + UNet at t = 1, rank-4 LoRA) features + Mask2Former, trained on degraded images.

Variants:
  (none) / "ade20k": the released recipe (rass.md section 3) on ADE20K: SD 2.1-base UNet/VAE/CLIP, projections
        to 512 channels, the Mask2Former ADE20K head (150 classes); AdamW lr 1e-4, x0.1 for every backbone
        parameter, weight decay 0.05 (0 for norm and embedding parameters), poly 0.9 without warmup,
        full-model gradient clipping at L2 norm 0.01, 160k iterations at batch 16, bf16 compute; online
        Real-ESRGAN degradation ("rass" preset); prompts from RAM tags (prompt.tags_file); detectron2
        ADE20K transforms; evaluation ResizeShortestEdge 512 + sliding-window backbone.
        Give model.pretrained.sd (a `scripts/convert.py sd` output of stable-diffusion-2-1-base) to train,
        or model.pretrained.path (a `scripts/convert.py rass` output) + model.tokenizer to evaluate the
        released weights.
  "paper": the released weights evaluated as the original tests them (rass.md, ram.md 1.2-1.4): fp32
        compute, images padded with zeros to a multiple of 8, RAM prompts computed from each whole padded
        image (prompt.mode "ram", tagger at pretrained.path/ram, fp16-rounded sigmoid thresholds).
  "tiny": the same system at toy size on the synthetic scenes (96 px crops, degradation on, a fixed prompt,
        weights from scratch): trains on CPU in minutes (tests, demo).
"""

import dataclasses

import ml_collections

from lqseg_jax.data_pipelines.synthetic import CLASSES
from lqseg_jax.models.clip_text import SD21_TEXT_ENCODER
from lqseg_jax.models.ram import RAMConfig
from lqseg_jax.models.sd_unet import SD21_BASE_UNET
from lqseg_jax.models.sd_vae import SD21_BASE_VAE
from lqseg_jax.train.config import base_config

TINY_UNET = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(1, 1, 2, 2),
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
)
TINY_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)
TINY_TEXT = dict(
    vocab_size=514,  # prompts.byte_level_clip_tokenizer
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="gelu",
)
TINY_HEAD = dict(
    conv_dim=64,
    mask_dim=64,
    enc_layers=2,
    enc_ffn_dim=128,
    hidden_dim=64,
    num_queries=16,
    dec_ffn_dim=256,
    dec_layers=3,
    train_num_points=1024,
    max_targets=10,
)


def _public(d: dict) -> dict:
    """A diffusers/transformers config dict without its '_' metadata keys."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "ade20k"
    if variant not in ("ade20k", "paper", "tiny"):
        raise ValueError(f"configs/rass.py variants: ade20k (default), paper, tiny; got {variant!r}")
    c = base_config()
    c.system = "rass"
    m = c.model
    m.num_classes = 150
    m.dtype = "bfloat16"
    m.remat = False  # True rematerialises the UNet blocks (RASS's gradient_checkpointing, off in the release)
    m.unet = ml_collections.ConfigDict(_public(SD21_BASE_UNET))
    m.vae = ml_collections.ConfigDict(_public(SD21_BASE_VAE))
    m.text_encoder = ml_collections.ConfigDict(_public(SD21_TEXT_ENCODER))
    m.tokenizer = ""  # CLIP tokenizer folder; default pretrained.sd/tokenizer
    m.lora = ml_collections.ConfigDict(dict(rank=4, alpha=8.0))  # stage-2 adapters; peft lora_alpha 8
    m.projection = ml_collections.ConfigDict(dict(dim=512, norm_groups=32))
    m.timestep = 1
    m.slide_inference = True
    m.head = ml_collections.ConfigDict()  # Mask2FormerConfig overrides on top of the RASS head
    m.pretrained = ml_collections.ConfigDict(dict(path="", prefix="", sd=""))

    c.prompt = ml_collections.ConfigDict(
        dict(mode="tags", text="", tags_file="", suffix="", cache_size=1024)  # suffix: pos_prompt_vsd
    )
    # mode "ram": the converted tagger (default pretrained.path/ram), its compute dtype, RASS's fp16-rounded
    # sigmoid before the thresholds; train_mode: the tagger in train mode in training steps (drop-path and
    # dropout, as the original's: ram.md 1.6); `model` is the tagger's RAMConfig (for conversion and counts).
    c.prompt.ram = ml_collections.ConfigDict(
        dict(
            path="",
            dtype="float32",
            fp16_sigmoid=True,
            train_mode=False,
            model=dataclasses.asdict(RAMConfig()),
        )
    )
    c.degradation.enabled = True  # RASS's online Real-ESRGAN degradation of the training crops
    c.degradation.preset = "rass"

    c.data.source = "ade20k"
    c.data.root = "data/ADEChallengeData2016"
    c.data.train_split = "training"
    c.data.class_names = ()
    # The detectron2 / Mask2Former ADE20K transforms (data_pipelines/detectron2_transforms.py): short side from
    # {256, ..., 1024} (max 2048), category-area crop 512, ColorAugSSD, flip, pad image 128 / label 255.
    c.data.augment = "detectron2"
    c.data.crop = (512, 512)
    c.data.min_sizes = ()  # () = Mask2Former's ADE20K list
    c.data.max_size = 2048
    c.data.cat_max_ratio = 1.0  # SINGLE_CATEGORY_MAX_AREA
    c.data.color_aug = True
    c.data.pad_value = 128
    c.data.mean = (0.0, 0.0, 0.0)  # RASS never normalises: the model takes image / 255
    c.data.std = (1.0, 1.0, 1.0)

    c.eval.split = "validation"
    c.eval.resize = "detectron2"  # ResizeShortestEdge(512, max 2048), pad to a multiple of 8 (MaskFormer)
    c.eval.short_edge = 512
    c.eval.max_size = 2048
    c.eval.size_divisibility = 8
    # Bounded compiles over ADE's image sizes: images padded (0) to a multiple of 64, labels (255) of 256.
    # image_bucket = 8 reproduces the original padding exactly, at one compile per distinct padded size.
    c.eval.image_bucket = 64
    c.eval.label_bucket = 256
    c.eval.mode = "whole"  # the system slides its own backbone (model.slide_inference)
    c.eval.batch_size = 1  # images of different sizes: one per process (and one device per process)

    c.batch_size = 16
    c.total_steps = 160_000
    c.log_every = 20
    c.checkpoint.every = 5000
    c.eval_every = 5000

    o = c.optimizer
    o.lr = 1e-4
    o.eps = 1e-8
    o.weight_decay = 0.05
    o.lr_mults = ((r"^backbone\.", 0.1),)  # detectron2 BACKBONE_MULTIPLIER on every module under "backbone"
    # WEIGHT_DECAY_NORM / _EMBED = 0: every norm layer (GroupNorm at input_proj.i.1 too) and nn.Embedding
    # (the predictor's query_feat, query_embed, level_embed; the pixel decoder's level_embed is a Parameter)
    o.no_decay = (r"norm", r"input_proj\.\d+\.1\.", r"predictor\.(query_feat|query_embed|level_embed)\.")
    o.no_decay_1d = False
    o.clip_norm = 0.01
    o.schedule.warmup_steps = 0
    o.schedule.power = 0.9

    if variant == "paper":
        m.dtype = "float32"
        c.prompt.mode = "ram"
        c.eval.image_bucket = 8  # the original's zero padding to a multiple of 8, exactly
    if variant == "tiny":
        m.num_classes = len(CLASSES)
        m.dtype = "float32"
        m.unet = ml_collections.ConfigDict(TINY_UNET)
        m.vae = ml_collections.ConfigDict(TINY_VAE)
        m.text_encoder = ml_collections.ConfigDict(TINY_TEXT)
        m.projection = ml_collections.ConfigDict(dict(dim=64, norm_groups=8))
        m.head = ml_collections.ConfigDict(TINY_HEAD)
        c.prompt.mode = "fixed"
        c.prompt.text = ", ".join(CLASSES)
        c.data.augment = "mmseg"
        c.data.root = "data/synthetic"
        c.data.class_names = CLASSES
        c.data.synthetic.enabled = True
        c.data.scale = (160, 120)
        c.data.ratio_range = (0.75, 1.5)
        c.data.crop = (96, 96)
        c.eval.short_edge = 96
        c.eval.image_bucket = 32
        c.eval.label_bucket = 32
        c.eval.batch_size = 8
        c.eval.num_pictures = 4
        c.batch_size = 8
        c.total_steps = 300
        c.log_every = 10
        c.checkpoint.every = 100
        c.eval_every = 0
        o.lr = 1e-3
        o.lr_mults = ()
        o.clip_norm = 0.0
    return c
