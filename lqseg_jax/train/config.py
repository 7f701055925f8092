"""Fields every experiment config has; experiment files in configs/ start from `base_config()`."""

from __future__ import annotations

import difflib
import json

import ml_collections

from .optim import default_config as optimizer_defaults

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.system = ""
    c.seed = 0
    c.batch_size = 8  # global, over all processes and devices
    c.total_steps = 1000  # the schedule's length
    c.stop_at_step = 0  # > 0: stop (with a checkpoint) there without changing the schedule
    c.log_every = 10
    c.eval_every = 0  # > 0: evaluate on config.eval.split during training

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    c.sharding = ml_collections.ConfigDict(dict(default="fsdp", min_shard_size=2**14, rules=()))
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
    c.ema = ml_collections.ConfigDict(dict(enabled=False, decay=0.999, warmup=True, evaluate=True))
    c.optimizer = optimizer_defaults()

    c.model = ml_collections.ConfigDict()
    c.model.num_classes = 19
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.model.scan_blocks = False  # MiT encoders: each stage's blocks as one rematerialised scan (memory)
    c.model.pretrained = ml_collections.ConfigDict(dict(path="", prefix=""))

    c.data = ml_collections.ConfigDict(
        dict(
            pipeline="supervised",  # the training stream (data_pipelines/streams.py): "supervised" | "uda"
            source="cityscapes",  # "cityscapes" | "ade20k"
            root="data/cityscapes",
            train_split="train",
            class_names=(),
            augment="mmseg",  # "mmseg": TrainAugment; "detectron2": Detectron2TrainAugment (Mask2Former/RASS)
            crop=(512, 512),
            scale=(),  # mmseg: (long, short) keep-ratio resize before cropping; () = none
            ratio_range=(),  # random factor on `scale`; () = fixed
            cat_max_ratio=1.0,  # mmseg cat_max_ratio / detectron2 single_category_max_area
            min_sizes=(),  # detectron2: ResizeShortestEdge choices; () = Mask2Former's ADE20K list
            max_size=2048,  # detectron2: ResizeShortestEdge max size
            color_aug=True,  # detectron2: ColorAugSSD
            flip_prob=0.5,
            pad_value=0,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            num_threads=4,
            num_workers=0,  # grain worker processes (0: threads only)
            synthetic=ml_collections.ConfigDict(
                dict(enabled=False, num_train=400, num_val=50, height=120, width=160, seed=0)
            ),
        )
    )
    # On-device Real-ESRGAN degradation of training images (data_pipelines/degradation presets:
    # rass, light, medium, heavy); the clean image stays the high-quality target.
    c.degradation = ml_collections.ConfigDict(dict(enabled=False, preset="rass"))
    c.eval = ml_collections.ConfigDict(
        dict(
            split="val",
            source="",  # dataset kind evaluated (data_pipelines/streams.py eval_source); "" = data.source
            root="",  # its folder; "" = data.root
            resize="keep_ratio",  # "keep_ratio": `scale` (long, short) or none; "detectron2": short edge + pad
            scale=(),
            short_edge=512,
            max_size=2048,
            size_divisibility=8,
            label_bucket=0,  # pad labels to a multiple (never changes metrics; bounds compiles)
            image_bucket=0,  # pad images to a multiple (bounds compiles; 0 keeps evaluation exact)
            mode="whole",
            crop=(512, 512),
            stride=(341, 341),
            batch_size=1,
            num_pictures=8,
            # Protocol fields (refign.md section 9; lqseg_jax/eval/refign_protocols.py, scripts/eval.py):
            resize_labels=False,  # True: labels resized (nearest) to the network input, as refign's val stage
            present_classes_only=True,  # mIoU over classes with ground truth; False: over all, union 0 -> 0
            test_split="",  # split of `scripts/eval.py --protocol test` (labels at full res); "" = split
            predict_split="test",  # split `scripts/eval.py --predict` writes predictions for (unlabelled)
            # more labelled sets scripts/eval.py evaluates after the main split, labels at full resolution:
            # name -> dict(source=kind, root=folder, split=..., options=dict(lister options, e.g. night_list))
            extra_sets=ml_collections.ConfigDict(),
        )
    )
    return c


class ConfigError(ValueError):
    """A config file, variant or field that does not exist, or a value it cannot take."""


def config_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON, keys sorted (`train.py --print_config`, WORKDIR/config.json)."""
    return json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True)


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of `config`, sections included."""
    keys = []
    for k, v in config.items():
        keys.append(f"{prefix}{k}")
        if isinstance(v, ml_collections.ConfigDict):
            keys += config_keys(v, f"{prefix}{k}.")
    return keys


def check_override_keys(config: ml_collections.ConfigDict, keys, flag: str = "config") -> None:
    """Raises ConfigError for the first of `keys` (dotted) that `config` lacks, suggesting close ones."""
    known = config_keys(config)
    for key in keys:
        if key not in known:
            leaf = key.rsplit(".", 1)[-1]  # `lr` -> `optimizer.lr`: the same field name in another section
            same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
            close = list(
                dict.fromkeys([*same_leaf, *difflib.get_close_matches(key, known, n=3, cutoff=0.6)])
            )[:3]
            hint = f"; did you mean {' or '.join(f'{flag}.{c}' for c in close)}?" if close else ""
            raise ConfigError(f"{flag}.{key}: the config has no field '{key}'{hint}")


def load_config(spec: str, **overrides) -> ml_collections.ConfigDict:
    """`"configs/daformer.py:tiny"` -> that file's get_config("tiny"), with dotted-key overrides
    (`load_config(..., **{"data.root": "/x"})`), as scripts' `--config FILE:ARG --config.key=value` do."""
    import importlib.util
    from pathlib import Path

    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file {Path(path).absolute()} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"lqseg_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    check_override_keys(config, overrides)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
