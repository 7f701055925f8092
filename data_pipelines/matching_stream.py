"""Image pairs for UAWarpC (refign.md 3.8, 3.10): the training stream of config.data.pipeline = "matching"
and the matching evaluation sets.

Sources (config.data.source):
    "megadepth"  prepared records (scripts/prepare_data.py megadepth; data_pipelines/refign_matching.py) at
                 data.root/<split>: image = target, reference = source, matches (n, 4) x_ref, y_ref, x, y.
                 Training uses the first data.max_examples (30000) of the seed-400 shuffled list, as refign.
    "robotcar-matching"  prepared records of the RobotCar test6511 pairs (evaluation; 1024x1024 at load).
    "synthetic"  the synthetic paired adverse dataset (synthetic_adverse.py) at data.root: target = the
                 adverse image, reference = its normal-condition view, true flow target -> reference stored,
                 so evaluation matches are the flow's correspondences on a pixel grid.

Training examples (`PairAugment`): both images PIL-lanczos-resized to data.size (750x750, aspect not kept),
then swapped with probability data.swap_prob (0.5): {"image": target, "image_ref": reference} uint8. The
warps, prime augmentation and centre crop run on the device in the system (flow_warps.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import ml_collections
import numpy as np
from PIL import Image

from .pipeline import ProcessBlock
from .refign_matching import MatchDecode
from .sources import DataError

SOURCES = ("megadepth", "robotcar-matching", "synthetic")
LOAD_SIZE = {"megadepth": None, "robotcar-matching": (1024, 1024), "synthetic": None}


def lanczos(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL lanczos resize of (h, w, 3) uint8 to size (h', w')."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.LANCZOS))


class SyntheticPairs:
    """The target / reference pairs of a written synthetic paired dataset (ROOT/acdc, every condition) with
    their true flows; random access, grain data source. Items: {"name", "image", "reference", "flow"
    (h, w, 2) float32 target -> reference}."""

    def __init__(self, root: str | Path, split: str):
        from .synthetic_adverse import flow_path

        acdc = Path(root) / "acdc"
        images = sorted((acdc / "rgb_anon").glob(f"*/{split}/*/*_rgb_anon.png"))
        if not images:
            raise DataError(
                f"synthetic matching pairs: no {acdc}/rgb_anon/<condition>/{split}/<rec>/*_rgb_anon.png (write the "
                "dataset with data_pipelines/synthetic_adverse.py or data.synthetic.enabled)"
            )
        self.items = []
        for image in images:
            cond, _, rec, name = image.relative_to(acdc / "rgb_anon").parts
            ref = acdc / "rgb_anon" / cond / f"{split}_ref" / rec / name.replace("_rgb_anon", "_rgb_ref_anon")
            flow = flow_path(acdc, image.relative_to(acdc))
            for path in (ref, flow):
                if not path.is_file():
                    raise DataError(f"synthetic matching pairs: {path} is missing (the pair of {image})")
            self.items.append((str(image.relative_to(acdc)), image, ref, flow))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        name, image, ref, flow = self.items[index]
        return {
            "name": name,
            "image": np.asarray(Image.open(image).convert("RGB")),
            "reference": np.asarray(Image.open(ref).convert("RGB")),
            "flow": np.load(flow).astype(np.float32),
        }


def flow_matches(flow: np.ndarray, step: int = 4) -> np.ndarray:
    """Correspondences (n, 4) x_ref, y_ref, x, y of a target -> reference flow (h, w, 2) on every `step`-th
    target pixel whose match lies inside the reference."""
    h, w, _ = flow.shape
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    f = flow[ys, xs]  # (hs, ws, 2)
    xr, yr = xs + f[..., 0], ys + f[..., 1]
    ok = (xr >= 0) & (xr <= w - 1) & (yr >= 0) & (yr <= h - 1)
    return np.stack([xr[ok], yr[ok], xs[ok], ys[ok]], -1).astype(np.float32)


class _Records:
    """Prepared matching records decoded by MatchDecode(size)."""

    def __init__(self, directory: Path, size):
        from .records import RecordSource

        self.source = RecordSource(directory, num_classes=0)
        self.decode = MatchDecode(size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return self.decode(self.source[index])


def matching_source(kind: str, root: str | Path, split: str):
    """A random-access source of {"name", "image", "reference"} (+ "matches" or "flow") for `kind`."""
    if kind not in SOURCES:
        raise ValueError(f"matching source must be one of {SOURCES}, got {kind!r}")
    if kind == "synthetic":
        return SyntheticPairs(root, split)
    directory = Path(root) / split
    if not directory.is_dir():
        raise DataError(
            f"{kind} {split}: {directory} does not exist (expected records written by scripts/prepare_data.py {kind})"
        )
    return _Records(directory, LOAD_SIZE[kind])


def eval_example(example: dict) -> dict:
    """An evaluation item with its matches: the records' own, or the synthetic flow's correspondences."""
    if "matches" in example:
        return example
    return {**example, "matches": flow_matches(example["flow"])}


@dataclasses.dataclass(frozen=True)
class PairAugment:
    """Resize both images to `size` with lanczos, swap them with probability `swap_prob`."""

    size: tuple[int, int]
    swap_prob: float = 0.5

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        image, ref = lanczos(element["image"], self.size), lanczos(element["reference"], self.size)
        if rng.random() < self.swap_prob:
            image, ref = ref, image
        return {"image": image, "image_ref": ref}


def train_dataset(
    source,
    augment: PairAugment,
    *,
    seed: int,
    global_batch: int,
    max_examples: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Infinite batches {"image", "image_ref"} (b, S, S, 3) uint8 for this process; the iterator's index
    counts examples."""
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {process_count} processes")
    ds = grain.MapDataset.source(source)
    if max_examples:
        ds = ds[: min(max_examples, len(ds))]
    examples = ds.seed(seed).shuffle().repeat(None).random_map(augment)
    it = grain.MapDataset.range(np.iinfo(np.int64).max // 2).map(
        ProcessBlock(examples, global_batch, process_index, process_count)
    )
    it = it.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    return it.batch(global_batch // process_count, drop_remainder=True)


def train_stream(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1):
    """(dataset, iterator index per step) of config.data for UAWarpC training."""
    d = config.data
    source = matching_source(d.source, d.root, d.train_split)
    dataset = train_dataset(
        source,
        PairAugment(tuple(d.size), d.swap_prob),
        seed=config.seed,
        global_batch=config.batch_size,
        max_examples=d.max_examples,
        process_index=process_index,
        process_count=process_count,
        num_threads=d.num_threads,
    )
    return dataset, config.batch_size // process_count


def ensure_data(config: ml_collections.ConfigDict) -> None:
    """With data.synthetic.enabled, writes the synthetic paired dataset at data.root (train and val pairs,
    no source scenes) on first use; process 0 writes, the others wait."""
    syn = config.data.synthetic
    if not syn.enabled:
        return
    import jax
    from jax.experimental import multihost_utils

    from .synthetic_adverse import ensure_dataset

    if jax.process_index() == 0:
        ensure_dataset(
            Path(config.data.root),
            num_source=(0, 0),
            num_target=(syn.num_target_train, syn.num_target_val),
            height=syn.height,
            width=syn.width,
            seed=syn.seed,
            progress=False,
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic matching dataset written")


def _warped_pair(key, image, stored_flow, spec, against: str):
    """warped_eval_examples' device half for one pair: (prime (h, w, 3) uint8, flow (h, w, 2))."""
    import jax.numpy as jnp

    from lqseg_jax.models.uawarpc import warp

    from .flow_warps import OUT_OF_RANGE, synthetic_flow

    h, w, _ = image.shape
    s = synthetic_flow(key, h, w, spec)  # (h, w, 2) prime -> target
    prime, inside = warp(image[None], s[None])  # (1, h, w, 3) fp32, (1, h, w) strictly inside the target
    prime = jnp.clip(jnp.round(prime[0]), 0, 255).astype(jnp.uint8)  # (h, w, 3)
    flow = s
    if against == "reference":
        f, _ = warp(stored_flow[None], s[None])  # (1, h, w, 2): the stored flow at p + s(p)
        flow = s + f[0]  # (h, w, 2) prime -> reference
    return prime, jnp.where(inside[0, ..., None], flow, OUT_OF_RANGE)


def warped_eval_examples(
    source, spec, *, seed: int = 0, against: str = "target", count: int = 0
) -> list[dict]:
    """Held-out matching pairs with large known flows: each target image of `source` (items {"name",
    "image", "reference", "flow"} as SyntheticPairs', at their stored size) warped by one training-family
    synthetic flow (flow_warps.synthetic_flow with `spec`, e.g. WarpSpec.stage(1); key fold_in(key(seed), i)
    for pair i, so a seed always gives the same pairs).

    Pair i is {"name", "image": prime, "reference", "flow", "matches"} for eval/matching.evaluate_matching:
    prime(p) = target(p + s(p)) (bilinear, 0 outside, rounded to uint8) with s the synthetic flow (prime ->
    target, pixels), as the training's image prime without its photometric augmentation;
    against "target": reference = the target itself, flow = s (the warp-supervision pass prime -> target);
    against "reference": reference = the pair's reference, flow = s(p) + f(p + s(p)) with f the stored
    target -> reference flow sampled bilinearly (the real cross-condition pair with a large warp added).
    "flow" is OUT_OF_RANGE (1e10) where p + s(p) is not strictly inside the target; "matches" =
    flow_matches(flow), the correspondences inside the reference. `count` > 0 keeps the first `count` items."""
    import jax

    if against not in ("target", "reference"):
        raise ValueError(f"warped_eval_examples: against must be 'target' or 'reference', got {against!r}")
    build = jax.jit(_warped_pair, static_argnums=(3, 4))
    base = jax.random.key(seed)
    n = min(count, len(source)) if count else len(source)
    out = []
    for i in range(n):
        item = source[i]
        if item["image"].shape[:2] != item["flow"].shape[:2]:
            raise ValueError(
                f"warped_eval_examples: {item['name']}: image {item['image'].shape} and flow "
                f"{item['flow'].shape} differ in size"
            )
        key = jax.random.fold_in(base, i)
        prime, flow = build(key, item["image"], np.asarray(item["flow"], np.float32), spec, against)
        flow = np.asarray(flow)
        out.append(
            {
                "name": f"{item['name']} warped",
                "image": np.asarray(prime),
                "reference": item["image"] if against == "target" else item["reference"],
                "flow": flow,
                "matches": flow_matches(flow),
            }
        )
    return out
