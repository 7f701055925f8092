"""The data a config asks for: its training stream (config.data.pipeline), its evaluation source
(config.eval.source / eval.root) and the synthetic datasets written on first use.

Pipelines (config.data.pipeline):
    "supervised"  one labelled source (data.source at data.root), `train_augment(config.data)`, batch keys
                  image, label (pipeline.train_dataset); the iterator's index counts examples
    "uda"         labelled source + target with references (paired.uda_dataset, batch keys image_src,
                  label_src, image_trg, image_ref; with data.labelled_target.enabled also image_lab,
                  label_lab, blank_lab); the iterator's index counts steps
    "matching"    UAWarpC image pairs (matching_stream.py, batch keys image, image_ref); counts examples
The training loop only sees `train_stream(config)`; a system never builds its data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import ml_collections

from .detectron2_transforms import MASK2FORMER_ADE20K_MIN_SIZES, ColorAugSSD, Detectron2TrainAugment
from .transforms import TrainAugment

PIPELINES = ("supervised", "uda", "matching")


@dataclasses.dataclass(frozen=True)
class TrainStream:
    """A training dataset and how far its iterator's `next_index` advances per training step (to re-derive
    the position of a resumed run whose checkpoint holds no iterator state)."""

    dataset: grain.IterDataset
    index_per_step: int


def _pipeline(config: ml_collections.ConfigDict) -> str:
    kind = config.data.pipeline
    if kind not in PIPELINES:
        raise ValueError(f"config.data.pipeline must be one of {PIPELINES}, got {kind!r}")
    return kind


def _local_batch(config: ml_collections.ConfigDict, process_count: int) -> int:
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {process_count} processes")
    return config.batch_size // process_count


def train_augment(data: ml_collections.ConfigDict):
    """The host-side augmentation of the supervised pipeline (data.augment)."""
    if data.augment == "detectron2":
        return Detectron2TrainAugment(
            crop=tuple(data.crop),
            min_sizes=tuple(data.min_sizes) or MASK2FORMER_ADE20K_MIN_SIZES,
            max_size=data.max_size,
            single_category_max_area=data.cat_max_ratio,
            color_aug=ColorAugSSD() if data.color_aug else None,
            flip_prob=data.flip_prob,
            pad_value=data.pad_value,
        )
    if data.augment != "mmseg":
        raise ValueError(f"data.augment must be 'mmseg' or 'detectron2', got {data.augment!r}")
    return TrainAugment(
        crop=tuple(data.crop),
        scale=tuple(data.scale) if data.scale else None,
        ratio_range=tuple(data.ratio_range) if data.ratio_range else None,
        cat_max_ratio=data.cat_max_ratio,
        flip_prob=data.flip_prob,
        pad_value=data.pad_value,
    )


def train_stream(
    config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> TrainStream:
    """This process's training stream of `config` (data.pipeline), resumable through its iterator state."""
    if _pipeline(config) == "uda":
        return TrainStream(uda_stream(config, process_index, process_count), 1)
    if _pipeline(config) == "matching":  # UAWarpC image pairs (matching_stream.py)
        from . import matching_stream

        return TrainStream(*matching_stream.train_stream(config, process_index, process_count))
    from .pipeline import train_dataset
    from .sources import build_source

    d = config.data
    source = build_source(d.source, d.root, d.train_split, num_classes=config.model.num_classes)
    dataset = train_dataset(
        source,
        train_augment(d),
        seed=config.seed,
        global_batch=config.batch_size,
        process_index=process_index,
        process_count=process_count,
        num_threads=d.num_threads,
        num_workers=d.num_workers,
    )
    return TrainStream(dataset, _local_batch(config, process_count))


def uda_stream(
    config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> grain.IterDataset:
    """config.batch_size source images and as many target pairs per step, globally (paired.uda_dataset).
    Sources: the prepared records or on-disk layouts of data.source (data.root) and data.target
    (data.target_root, split data.target_split, default data.train_split); with data.synthetic.enabled, the
    synthetic paired dataset whose Cityscapes part is data.root (synthetic_adverse.py). Rare-class sampling
    with data.rcs.enabled. With data.labelled_target.enabled (RobotCar, refign.md O8) config.batch_size
    labelled target images (split data.labelled_target.split) per step as well, rotated and jittered."""
    from . import paired, refign_sources, synthetic_adverse

    d, k = config.data, config.model.num_classes
    if d.synthetic.enabled:
        source, target = synthetic_adverse.sources(Path(d.root).parent, d.train_split)
    else:
        source = refign_sources.paired_source(d.source, d.root, d.train_split, num_classes=k)
        target_split = d.get("target_split") or d.train_split
        target = refign_sources.paired_source(d.target, d.target_root, target_split, num_classes=k)
    local = _local_batch(config, process_count)
    lab = d.get("labelled_target")
    labelled, labelled_augment = None, None
    if lab is not None and lab.enabled:
        if d.synthetic.enabled:  # the synthetic target pairs are labelled
            labelled = synthetic_adverse.sources(Path(d.root).parent, lab.split)[1]
        else:
            labelled = refign_sources.paired_source(d.target, d.target_root, lab.split, num_classes=k)
        labelled_augment = paired.LabelledTargetAugment(
            tuple(d.crop), lab.rotation, tuple(lab.jitter), d.flip_prob
        )
    rcs = None
    if d.rcs.enabled:
        rcs = dict(
            stats_dir=Path(d.root) / d.train_split,
            temperature=d.rcs.temperature,
            min_pixels=d.rcs.min_pixels,
            min_crop_ratio=d.rcs.min_crop_ratio,
        )
    return paired.uda_dataset(
        source,
        target,
        source_augment=paired.PairedAugment(tuple(d.crop), d.cat_max_ratio, d.flip_prob),
        target_augment=paired.PairedAugment(tuple(d.crop), 1.0, d.flip_prob),
        seed=config.seed,
        source_size=tuple(d.source_size) or None,
        target_size=tuple(d.target_size) or None,
        source_batch=local,
        target_batch=local,
        num_classes=k,
        rcs=rcs,
        labelled=labelled,
        labelled_augment=labelled_augment,
        labelled_batch=local,
        process_index=process_index,
        process_count=process_count,
        num_threads=d.num_threads,
    )


def eval_source(
    config: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    kind: str | None = None,
    root: str | None = None,
    options: dict | None = None,
):
    """The source of `split` (default config.eval.split) of dataset `kind` at `root`, defaulting to
    eval.source at eval.root, themselves defaulting to data.source / data.root. Kinds of sources.SOURCES
    (ade20k, cityscapes) or of refign_sources (acdc, darkzurich, robotcar, ...; `options` go to its lister,
    e.g. night_list); on synthetic paired data, the conditions that were written."""
    from . import refign_sources, synthetic_adverse
    from .sources import SOURCES, build_source

    e, d, k = config.eval, config.data, config.model.num_classes
    split = split or e.split
    kind, root = kind or e.source or d.source, root or e.root or d.root
    if kind in SOURCES:
        return build_source(kind, root, split, num_classes=k)
    options = dict(options or {})
    if d.synthetic.enabled:
        options["check_counts"] = False
        if kind == "acdc":
            written = Path(root) / "rgb_anon"
            options["conditions"] = [
                c for c in synthetic_adverse.CONDITIONS if (written / c / split).is_dir()
            ]
    return refign_sources.paired_source(kind, root, split, num_classes=k, **options)


def ensure_data(config: ml_collections.ConfigDict) -> None:
    """With data.synthetic.enabled, writes the pipeline's synthetic dataset on first use (process 0 writes,
    the others wait): "supervised" the scenes at data.root (synthetic.py), "uda" the paired adverse dataset
    (synthetic_adverse.py, train and val splits) whose Cityscapes part is data.root."""
    from . import synthetic, synthetic_adverse

    syn = config.data.synthetic
    if not syn.enabled:
        return
    if _pipeline(config) == "supervised":
        synthetic.ensure_data(config)
        return
    if _pipeline(config) == "matching":  # the paired dataset at data.root, pairs only (matching_stream.py)
        from . import matching_stream

        matching_stream.ensure_data(config)
        return
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        synthetic_adverse.ensure_dataset(
            Path(config.data.root).parent,
            num_source=(syn.num_train, syn.num_val),
            num_target=(syn.num_target_train, syn.num_target_val),
            height=syn.height,
            width=syn.width,
            seed=syn.seed,
            progress=False,
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic paired dataset written")
