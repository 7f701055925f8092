"""grain pipelines: per-process sharding, seeded shuffle, decode, augment, batch, prefetch.

Train: source -> seeded shuffle -> repeat -> decode -> random resize/crop/flip (rng from seed and global
index) -> this process's contiguous block of every global batch -> batch -> threaded/multiprocess prefetch.
Global batch t holds the global indices [t*B, (t+1)*B) in the same order whatever the number of
processes, and process p reads only its B/n of them, so a 2-process run sees exactly the batches of a
1-process run. The iterator's state ({"next_index": ...}) is saved with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import grain
import numpy as np

from .sources import DataError, FolderSource
from .transforms import IGNORE, Decode, EvalCanvas, TrainAugment


@dataclasses.dataclass(frozen=True)
class ProcessBlock:
    """Local example j of `process_index` -> the global example it stands for."""

    dataset: grain.MapDataset
    global_batch: int
    process_index: int
    process_count: int

    def __call__(self, j: int) -> dict:
        local = self.global_batch // self.process_count
        step, k = divmod(int(j), local)
        return self.dataset[step * self.global_batch + self.process_index * local + k]


@dataclasses.dataclass(frozen=True)
class _Origin:
    source: object

    def __call__(self, index: int, record: dict) -> dict:
        return self.source.with_origin(index, record)


def with_origin(source) -> grain.MapDataset:
    """The source as a MapDataset whose records name where they come from (a prepared split's record and
    shard), for decoding errors; a folder source's records already carry their files' paths."""
    dataset = grain.MapDataset.source(source)
    return dataset.map_with_index(_Origin(source)) if hasattr(source, "with_origin") else dataset


def _check_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


def train_dataset(
    source: FolderSource,
    augment: TrainAugment,
    *,
    seed: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    num_workers: int = 0,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Infinite training batches {"image": (b, h, w, 3) uint8, "label": (b, h, w) uint8} for this process."""
    local = _check_batch(global_batch, process_count)
    examples = (
        with_origin(source)
        .seed(seed)
        .shuffle()
        .repeat(None)
        .map(Decode(source.label_map, source.num_classes))
        .random_map(augment)
    )
    ds = grain.MapDataset.range(np.iinfo(np.int64).max // 2).map(
        ProcessBlock(examples, global_batch, process_index, process_count)
    )
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    it = it.batch(local, drop_remainder=True)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


@dataclasses.dataclass(frozen=True)
class _PadToMultiple:
    """Eval examples padded with fully ignored copies so every process runs the same number of batches."""

    dataset: grain.MapDataset
    size: int

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        if index < n:
            return {**self.dataset[index], "valid": True}
        ex = self.dataset[n - 1]
        return {**ex, "label": np.full_like(ex["label"], IGNORE), "valid": False}


def _stack(items: list[dict]) -> dict:
    shapes = {(it["image"].shape, it["label"].shape) for it in items}
    if len(shapes) > 1:
        raise DataError(
            f"eval batch mixes image/label sizes {sorted(shapes)}; set eval.batch_size to the number of "
            "processes or give eval.scale so images share a size"
        )
    batch = {
        "image": np.stack([it["image"] for it in items]),  # (b, h, w, 3)
        "label": np.stack([it["label"] for it in items]),  # (b, H, W)
        "valid": np.array([it["valid"] for it in items]),  # (b,)
        "name": [it["name"] for it in items],
    }
    for key in ("valid_hw", "label_hw"):  # image size before padding, label size before padding
        batch[key] = np.stack([it[key] for it in items])  # (b, 2)
    return batch


def eval_batches(
    source: FolderSource,
    resize,
    *,
    canvas: EvalCanvas | None = None,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
) -> tuple[int, Iterator[dict]]:
    """(number of batches, iterator over this process's eval batches). `resize` is an EvalResize-like
    callable; each batch has "valid" (real examples), "valid_hw" and "label_hw" (sizes before padding)."""
    local = _check_batch(global_batch, process_count)
    steps = math.ceil(len(source) / global_batch)
    examples = (
        with_origin(source)
        .map(Decode(source.label_map, source.num_classes))
        .map(resize)
        .map(canvas or EvalCanvas())
    )
    padded = grain.MapDataset.source(_PadToMultiple(examples, steps * global_batch))
    ds = grain.MapDataset.range(steps * local).map(
        ProcessBlock(padded, global_batch, process_index, process_count)
    )
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * local))
    return steps, iter(it.batch(local, batch_fn=_stack))
