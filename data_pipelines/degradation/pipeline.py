"""The second-order Real-ESRGAN degradation of RASS, batched and jitted: `degrade(key, images, cfg)`.

Order (RASS `feed_data`, rass.md section 4), each image with its own random draws:
  stage 1: blur (kernel1) -> resize by s1 (F.interpolate scale_factor: size floor(H s1)) -> noise -> JPEG
  stage 2: blur (kernel2, p blur_prob) -> resize to int(H s2) -> noise
  final:   order A: resize back to H x W + sinc filter, then JPEG; order B: JPEG, then resize back + sinc
  round to 8 bits.

Static shapes. An image's intermediate size is random, so each stage works on a static canvas as large as
the largest size the config allows (rounded up to a multiple of 16 for the JPEG), with the image in the
top-left corner and zeros elsewhere; every op takes the image's valid size as data:
- resize: per-image taps (resize.py), zero rows/columns past the new size;
- blur: reflect padding taken at the valid size (filter.py), then an FFT correlation;
- noise: drawn on the whole canvas, the grey-level count taken over the valid region, masked;
- JPEG: the zeros right and below the image are exactly DiffJPEG's zero padding to a multiple of 16.
So every op computes what the original computes at the image's true size. To keep the canvas from costing
time too, the ops between two resizes run per image on the smallest of up to six static sub-canvases
(k/n of the canvas, buckets.py) that holds the image, picked with lax.switch (`_map_bucketed`): a new
random size picks another compiled branch, never a new compilation. Deviations from the original,
documented where they live: the Poisson sampler above lambda = 8 (noise.py), the FFT correlation (float32
rounding, ~1e-6), and RASS's final `F.interpolate(lq, size=(H, W), mode="bilinear")`, an identity at
scale 1, which we skip.

Orientation. A resize is two row-gather passes with one transpose between them, and returns its images
transposed (resize.py); the ops up to the next resize work on the transposed images (sizes and kernels
flipped, JPEG with flipped tables), which saves a transpose per resize. Three resizes: the last transpose
is folded into the NCHW -> NHWC one at the end.

Execution. Every op is written for one image and applied over the batch with lax.map (a loop on the
device, no Python loop): per-image branches are real (lax.cond / lax.switch: only the drawn noise kind,
the drawn blur and the drawn final order run), and the loop boundaries make XLA write each stage to
memory; batched with vmap, XLA's CPU backend fuses a stage into the next stage's gathers and recomputes
it per tap, which measured 10-100x slower. The two final orders share one resize + sinc:
JPEG (order B only) -> [resize back + sinc] -> JPEG (order A only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from .buckets import bucket_index, buckets, ceil16, pad_to
from .config import KERNEL_LIST, PRESETS, get_config
from .filter import PAD, filter2d, valid_mask
from .jpeg import jpeg
from .kernels import Draws, sample_blur_kernel, sample_final_sinc
from .noise import NOISE_RNGS, add_noise, grey_plane
from .resize import num_taps, resize_transposed


class DegradationParams(NamedTuple):
    """Every random draw of a batch; leading axis b."""

    blur1: jax.Array  # (b,) bool: apply kernel1
    kernel1: jax.Array  # (b, 21, 21)
    kernel2: jax.Array  # (b, 21, 21)
    blur2: jax.Array  # (b,) bool: apply kernel2
    sinc_on: jax.Array  # (b,) bool: final sinc filter (else the pulse, an identity)
    sinc: jax.Array  # (b, 21, 21) final sinc filter or pulse
    scale1: jax.Array  # (b,) stage-1 scale factor
    size1: jax.Array  # (b, 2) int32 (h, w) after stage 1
    mode1: jax.Array  # (b,) int32: 0 area, 1 bilinear, 2 bicubic
    noise1: dict  # gaussian (b,) bool, sigma (b,), poisson_scale (b,), gray (b,) bool
    quality1: jax.Array  # (b,) JPEG quality
    size2: jax.Array  # (b, 2) int32 after stage 2
    mode2: jax.Array
    noise2: dict
    order_a: jax.Array  # (b,) bool: [resize + sinc] before the final JPEG
    mode3: jax.Array
    quality2: jax.Array
    noise_keys: jax.Array  # (b, 2) keys of the stage-1 and stage-2 noise fields


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one compiled degradation: the config's structure, canvas sizes, tap counts.
    The config's numbers (probabilities, ranges) are traced arguments, so presets share compilations."""

    kernel_sizes: tuple[int, ...]
    kernel_lists: tuple[tuple[str, ...], tuple[str, ...]]  # stage 1, stage 2
    noise_rng: str
    size: tuple[int, int]  # input canvas (H, W)
    min_side: int  # smallest image side the config can degrade
    max1: tuple[int, int]  # largest size after stage 1
    max2: tuple[int, int]  # largest size after stage 2
    canvas1: tuple[int, int]
    canvas2: tuple[int, int]
    taps: tuple[int, int, int]


def _stage_scales(stage) -> tuple[float, float]:
    """Smallest and largest scale factor a stage can draw."""
    up, down, keep = stage.resize_prob
    lo, hi = stage.resize_range
    scales = [1.0] * (keep > 0) + [hi] * (up > 0) + [lo] * (down > 0)
    return min(scales), max(scales)


def _check_stage(name: str, stage) -> None:
    def prob(field, n):
        p = tuple(stage[field])
        if len(p) != n or min(p) < 0 or not math.isclose(sum(p), 1.0, rel_tol=1e-6):
            raise ValueError(
                f"degradation config {name}.{field}: expected {n} probabilities summing to 1, got {p}"
            )

    prob("resize_prob", 3)
    prob("resize_mode_prob", 3)
    prob("kernel_prob", len(tuple(stage.kernel_list)))
    unknown = set(stage.kernel_list) - set(KERNEL_LIST)
    if unknown:
        raise ValueError(
            f"degradation config {name}.kernel_list: unknown {sorted(unknown)}, expected {KERNEL_LIST}"
        )
    lo, hi = stage.resize_range
    if not 0 < lo <= 1 <= hi:
        raise ValueError(
            f"degradation config {name}.resize_range: expected 0 < lo <= 1 <= hi, got {(lo, hi)}"
        )


def min_image_side(cfg: ml_collections.ConfigDict) -> int:
    """The smallest image side `cfg` can degrade: after the first stage's strongest shrink the second
    stage's blur needs >= 11 pixels (reflect padding by 10), and the second stage must leave >= 1."""
    (lo1, _), (lo2, _) = _stage_scales(cfg.stage1), _stage_scales(cfg.stage2)
    need = PAD + 1
    return next(n for n in range(need, 1 << 20) if math.floor(n * lo1) >= need and int(n * lo2) >= 1)


def _spec(shape: tuple[int, ...], cfg: ml_collections.ConfigDict) -> _Spec:
    """Checks the config and derives the static sizes for images on an (H, W) canvas.

    An image of side n becomes floor(n s1) after stage 1 (reflect padding of the stage-2 blur needs >= 11)
    and int(n s2) >= 1 after stage 2; tap counts cover the largest ratio over every side n the canvas holds.
    Canvases and taps cover the scale ranges of `cfg` and of every preset, so that the presets (which
    change only numbers) share one compiled function per image shape.
    """
    h, w = shape[1], shape[2]
    for name in ("stage1", "stage2"):
        _check_stage(name, cfg[name])
    if cfg.noise_rng not in NOISE_RNGS:
        raise ValueError(f"degradation config noise_rng: expected one of {NOISE_RNGS}, got {cfg.noise_rng!r}")
    envelope = [cfg] + [get_config(preset) for preset in PRESETS]
    lo1, hi1 = (
        min(_stage_scales(c.stage1)[0] for c in envelope),
        max(_stage_scales(c.stage1)[1] for c in envelope),
    )
    lo2, hi2 = (
        min(_stage_scales(c.stage2)[0] for c in envelope),
        max(_stage_scales(c.stage2)[1] for c in envelope),
    )
    min_side = min_image_side(cfg)
    if min(h, w) < min_side:
        raise ValueError(
            f"degrade: images of {h}x{w} are too small for the {cfg.get('preset', 'given')!r} degradation: its "
            f"first stage can shrink a side by {_stage_scales(cfg.stage1)[0]} and the second stage's blur needs "
            f">= {PAD + 1} pixels; "
            f"expected sides >= {min_side}"
        )
    max1 = (math.floor(h * hi1), math.floor(w * hi1))
    max2 = (int(h * hi2), int(w * hi2))
    sides = range(min(min_image_side(c) for c in envelope), max(h, w) + 1)
    taps1 = num_taps(max(n / math.floor(n * lo1) for n in sides))
    taps2 = num_taps(max(math.floor(n * hi1) / int(n * lo2) for n in sides))
    taps3 = num_taps(max(int(n * hi2) / n for n in sides))
    return _Spec(
        kernel_sizes=tuple(int(k) for k in cfg.kernel_sizes),
        kernel_lists=(tuple(cfg.stage1.kernel_list), tuple(cfg.stage2.kernel_list)),
        noise_rng=str(cfg.noise_rng),
        size=(h, w),
        min_side=min_side,
        max1=max1,
        max2=max2,
        canvas1=(ceil16(max1[0]), ceil16(max1[1])),
        canvas2=(ceil16(max2[0]), ceil16(max2[1])),
        taps=(taps1, taps2, taps3),
    )


class _Fields(dict):
    """A dict read with attribute access, as the config is."""

    __getattr__ = dict.__getitem__


def _numbers(cfg: ml_collections.ConfigDict) -> dict:
    """The config's numbers as float32 arrays (traced by jit); structure (lists, sizes, names) stays static."""
    skip = {"kernel_list", "kernel_sizes", "noise_rng", "preset"}

    def convert(node):
        return {k: convert(v) if isinstance(v, ml_collections.ConfigDict) else np.asarray(v, np.float32)
                for k, v in node.items() if k not in skip}  # fmt: skip

    return convert(cfg)


def _scale(draws: Draws, stage) -> jax.Array:
    kind = draws.choice(stage.resize_prob)  # 0 up, 1 down, 2 keep
    lo, hi = stage.resize_range
    u = draws.uniform()
    return jnp.select([kind == 0, kind == 1], [1.0 + (hi - 1.0) * u, lo + (1.0 - lo) * u], 1.0)


def _noise_params(draws: Draws, stage) -> dict:
    return dict(
        gaussian=draws.bernoulli(stage.gaussian_noise_prob),
        sigma=draws.uniform(*stage.noise_range),
        poisson_scale=draws.uniform(*stage.poisson_scale_range),
        gray=draws.bernoulli(stage.gray_noise_prob),
    )


def _sample_one(key: jax.Array, size0: jax.Array, numbers: dict, spec: _Spec) -> DegradationParams:
    """One image's draws; size0 (2,) int32 is its (h, w); numbers: `_numbers(cfg)`."""
    cfg = _Fields(
        stage1=_Fields(numbers["stage1"], kernel_list=spec.kernel_lists[0]),
        stage2=_Fields(numbers["stage2"], kernel_list=spec.kernel_lists[1]),
        final=_Fields(numbers["final"]),
    )
    sizes = spec.kernel_sizes
    k_draws, k_noise = jax.random.split(key)
    d = Draws(k_draws, 42)
    hw = size0.astype(jnp.float32)
    blur1, kernel1 = d.bernoulli(cfg.stage1.blur_prob), sample_blur_kernel(d, cfg.stage1, sizes)
    s1 = _scale(d, cfg.stage1)
    size1 = jnp.clip(jnp.floor(hw * s1).astype(jnp.int32), 1, jnp.asarray(spec.max1))
    mode1, noise1 = d.choice(cfg.stage1.resize_mode_prob), _noise_params(d, cfg.stage1)
    quality1 = d.uniform(*cfg.stage1.jpeg_range)
    blur2, kernel2 = d.bernoulli(cfg.stage2.blur_prob), sample_blur_kernel(d, cfg.stage2, sizes)
    s2 = _scale(d, cfg.stage2)
    size2 = jnp.clip(jnp.floor(hw * s2).astype(jnp.int32), 1, jnp.asarray(spec.max2))
    mode2, noise2 = d.choice(cfg.stage2.resize_mode_prob), _noise_params(d, cfg.stage2)
    sinc_on, sinc = sample_final_sinc(d, cfg.final, sizes)
    return DegradationParams(
        blur1=blur1,
        kernel1=kernel1,
        kernel2=kernel2,
        blur2=blur2,
        sinc_on=sinc_on,
        sinc=sinc,
        scale1=s1,
        size1=size1,
        mode1=mode1,
        noise1=noise1,
        quality1=quality1,
        size2=size2,
        mode2=mode2,
        noise2=noise2,
        order_a=d.bernoulli(cfg.final.order_a_prob),
        mode3=d.choice(cfg.final.resize_mode_prob),
        quality2=d.uniform(*cfg.final.jpeg_range),
        noise_keys=jax.random.split(k_noise, 2),
    )


def _map(fn, *args):
    """fn applied to each image: a loop on the device (lax.map), whose boundary also makes XLA write each
    stage to memory instead of fusing it into the next stage's gathers and recomputing it there."""
    return jax.lax.map(lambda a: fn(*a), args)


def _map_bucketed(fn, canvases, x, valid, *args):
    """fn(img, valid, *a) for each image, run on the smallest of `canvases` that holds its valid region.

    x (b, c, R, C), zero outside each image's valid size valid (b, 2) (rows, cols); canvases: `buckets` of
    (R, C). lax.switch picks the image's branch, which crops x to that canvas (a static shape), applies fn
    there and pads the result back to (R, C) with zeros. fn must give zeros outside `valid`, as every op
    here does on a zero canvas (JPEG: the zeros are DiffJPEG's padding), so the result equals fn on the
    whole canvas. Arguments that are images like x (the grey plane) are cropped by fn itself."""
    big_r, big_c = x.shape[2:]

    def body(img, k, v, *a):
        def branch(r, c):
            return lambda: pad_to(fn(img[:, :r, :c], v, *a), big_r, big_c)

        return jax.lax.switch(k, [branch(r, c) for r, c in canvases])

    return _map(body, x, bucket_index(valid, canvases), valid, *args)


def _apply(images: jax.Array, size0: jax.Array, p: DegradationParams, spec: _Spec) -> jax.Array:
    h, w = spec.size
    method = spec.noise_rng
    taps1, taps2, taps3 = spec.taps

    # Each resize returns its images transposed (resize.py); the ops between resizes take the orientation
    # as it comes: sizes and kernels flipped, JPEG told (its tables flip). Sizes below are (rows, cols).
    def flip(a):
        return a[..., ::-1]  # (b, 2) sizes: (rows, cols) -> (cols, rows)

    def flip_buckets(canvases):
        return tuple(c[::-1] for c in canvases)

    def flip_kernel(k):
        return jnp.swapaxes(k, 1, 2)  # (b, 21, 21)

    def blur(img, kernel, valid, on):
        return jax.lax.cond(on, lambda: filter2d(img, kernel, valid), lambda: img)

    def noise(img, grey, valid, key, prm):  # grey: the canvas's grey plane, cropped here to img
        grey = grey[:, : img.shape[1], : img.shape[2]]
        return add_noise(img, grey, valid_mask(valid, *img.shape[1:]), key, prm, method)

    def compress(img, valid, q, transposed):
        return jpeg(img, q, transposed) * valid_mask(valid, *img.shape[1:])

    def stage1(img, valid, grey, key, prm, q, kernel, on):  # (3, W1, H1): noise, JPEG, stage-2 blur
        img = compress(noise(img, grey, valid, key, prm), valid, q, True)
        return blur(img, kernel, valid, on)

    def stage2(img, valid, grey, key, prm, q, order_a):  # (3, H2, W2): noise, order B's JPEG
        img = noise(img, grey, valid, key, prm)
        return jax.lax.cond(order_a, lambda: img, lambda: compress(img, valid, q, False))

    def first(img, valid, kernel, on):  # (H, W, 3) -> (3, H, W) (ops are per channel): mask, stage-1 blur
        img = jnp.moveaxis(img.astype(jnp.float32), -1, 0)  # per image: cheaper than the batch's transpose
        return blur(img * valid_mask(valid, h, w), kernel, valid, on)

    def final(img, valid, kernel, on, q, order_a):  # (3, W, H): sinc, order A's JPEG, 8 bits
        img = blur(img, kernel, valid, on)
        padded = pad_to(jnp.clip(img, 0.0, 1.0), ceil16(w), ceil16(h))  # DiffJPEG's zero padding
        img = jax.lax.cond(order_a, lambda: compress(padded, valid, q, True)[:, :w, :h], lambda: img)
        return jnp.clip(jnp.round(img * 255.0), 0.0, 255.0) / 255.0

    # stage 1: blur, resize (F.interpolate(scale_factor=s1)), noise, JPEG
    x = _map(first, images, size0, p.kernel1, p.blur1)  # (b, 3, H, W)
    inv_s1 = jnp.broadcast_to((1.0 / p.scale1)[:, None], size0.shape)
    x = resize_transposed(x, spec.canvas1, size0, p.size1, p.mode1, inv_s1, taps1)  # (b, 3, W1, H1)
    size1 = flip(p.size1)
    x = _map_bucketed(
        stage1, flip_buckets(buckets(spec.canvas1)), x, size1, grey_plane(x), p.noise_keys[:, 0], p.noise1,
        p.quality1, flip_kernel(p.kernel2), p.blur2,
    )  # fmt: skip

    # stage 2: (blur, above) resize, noise; final: order B's JPEG -> resize back + sinc -> order A's JPEG
    ratio2 = size1.astype(jnp.float32) / flip(p.size2).astype(jnp.float32)
    x = resize_transposed(
        x, spec.canvas2[::-1], size1, flip(p.size2), p.mode2, ratio2, taps2
    )  # (b, 3, H2, W2)
    x = _map_bucketed(
        stage2, buckets(spec.canvas2), x, p.size2, grey_plane(x), p.noise_keys[:, 1], p.noise2, p.quality2,
        p.order_a,
    )  # fmt: skip
    ratio3 = p.size2.astype(jnp.float32) / size0.astype(jnp.float32)
    x = resize_transposed(x, (h, w), p.size2, size0, p.mode3, ratio3, taps3)  # (b, 3, W, H)
    x = _map(final, x, flip(size0), flip_kernel(p.sinc), p.sinc_on, p.quality2, p.order_a)
    return jnp.transpose(x, (0, 3, 2, 1)).astype(images.dtype)  # (b, W, H, 3) -> (b, H, W, 3)


def _sample(keys: jax.Array, size0: jax.Array, numbers: dict, spec: _Spec) -> DegradationParams:
    return jax.vmap(_sample_one, in_axes=(0, 0, None, None))(keys, size0, numbers, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _degrade(keys: jax.Array, images: jax.Array, size0: jax.Array, numbers: dict, spec: _Spec) -> jax.Array:
    return _apply(images, size0, _sample(keys, size0, numbers, spec), spec)


def _per_image_keys(key, b: int) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    elif key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        typed = jax.random.wrap_key_data(key)
    else:
        raise ValueError(f"degrade: key must be a jax.random key, got dtype {key.dtype} shape {key.shape}")
    if typed.shape == ():
        return jax.random.split(typed, b)
    if typed.shape == (b,):
        return typed
    raise ValueError(
        f"degrade: expected one key or one per image (shape ({b},)), got key shape {typed.shape}"
    )


def _concrete(x) -> np.ndarray | None:
    """x as numpy when its values are known here (not traced), else None."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_images(images) -> None:
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"degrade: images must be (B, H, W, 3), got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"degrade: images must be floating point in [0, 1], got dtype {dtype} (divide by 255)"
        )
    values = _concrete(images)
    if values is not None:  # traced values are unknown here and not checked
        lo, hi = float(values.min()), float(values.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"degrade: image values must lie in [0, 1], found min {lo:.4g}, max {hi:.4g}")


def _image_sizes(sizes, images, spec: _Spec) -> jax.Array:
    b, (h, w) = images.shape[0], spec.size
    if sizes is None:
        return jnp.broadcast_to(jnp.asarray([h, w], jnp.int32), (b, 2))
    sizes = jnp.asarray(sizes, jnp.int32)
    if sizes.shape != (b, 2):
        raise ValueError(
            f"degrade: sizes must be (B, 2) = ({b}, 2) image heights and widths, got {sizes.shape}"
        )
    values = _concrete(sizes)
    if values is not None and (values.min() < spec.min_side or (values > np.asarray([h, w])).any()):
        raise ValueError(
            f"degrade: sizes must lie in [{spec.min_side}, canvas {h}x{w}] for this config, got "
            f"min {values.min()}, max heights {values[:, 0].max()}, widths {values[:, 1].max()}"
        )
    return sizes


def sample_params(key, images_shape: tuple[int, ...], cfg=None, sizes=None) -> DegradationParams:
    """The per-image random draws `degrade(key, images, cfg, sizes)` makes for images of `images_shape`."""
    cfg = cfg if cfg is not None else get_config()
    spec = _spec(tuple(images_shape), cfg)
    size0 = _image_sizes(sizes, jax.ShapeDtypeStruct(images_shape, jnp.float32), spec)
    keys = _per_image_keys(key, images_shape[0])
    return jax.jit(_sample, static_argnames=("spec",))(keys, size0, _numbers(cfg), spec=spec)


def degrade(
    key,
    images,
    cfg: ml_collections.ConfigDict | None = None,
    sizes=None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    batch_axis: str | tuple[str, ...] = "data",
) -> jax.Array:
    """Degrades a batch of clean images with the second-order Real-ESRGAN model of RASS.

    key: one jax.random key (split into one per image) or one key per image, shape (B,); an image's result
    depends only on its key and pixels, not on the rest of the batch (up to float rounding, ~1e-6).
    images: (B, H, W, 3) floating point in [0, 1].
    cfg: `get_config(preset)`; default the "rass" preset.
    sizes: optional (B, 2) int32 (h, w) of images smaller than the canvas, placed in its top-left corner
        (e.g. a dataset of mixed sizes padded to one shape); default: every image fills the canvas.
    mesh, batch_axis: split the batch over these mesh axes with shard_map (the work is per image).
    Returns the degraded images, same shape and dtype, values multiples of 1/255, zero outside `sizes`.
    Compiled once per (shape, dtype, cfg); callable under jit (the [0, 1] and `sizes` range checks then
    skip the traced values).
    """
    _check_images(images)
    cfg = cfg if cfg is not None else get_config()
    spec = _spec(tuple(images.shape), cfg)
    size0 = _image_sizes(sizes, images, spec)
    keys = _per_image_keys(key, images.shape[0])
    if mesh is None:
        return _degrade(keys, images, size0, _numbers(cfg), spec)
    return _sharded_degrade(spec, mesh, batch_axis)(keys, images, size0, _numbers(cfg))


@functools.lru_cache(maxsize=32)
def _sharded_degrade(spec: _Spec, mesh: jax.sharding.Mesh, batch_axis) -> Callable:
    """`_degrade` with the batch split over `batch_axis` of `mesh` (one compiled function per arguments)."""
    batch, replicated = jax.sharding.PartitionSpec(batch_axis), jax.sharding.PartitionSpec()
    split = jax.shard_map(
        functools.partial(_degrade, spec=spec),
        mesh=mesh,
        in_specs=(batch, batch, batch, replicated),
        out_specs=batch,
    )

    names = batch_axis if isinstance(batch_axis, tuple) else (batch_axis,)
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    explicit = all(types[n] == jax.sharding.AxisType.Explicit for n in names)
    place = jax.reshard if explicit else jax.lax.with_sharding_constraint  # Explicit vs Auto mesh axes

    def run(keys, images, size0, numbers):
        keys, images, size0 = (
            place(a, jax.sharding.NamedSharding(mesh, batch)) for a in (keys, images, size0)
        )
        return split(keys, images, size0, numbers)

    return jax.jit(run)


def rass_pair(key, images, cfg: ml_collections.ConfigDict | None = None) -> tuple[jax.Array, jax.Array]:
    """RASS's training inputs from 0-255 RGB images (B, H, W, 3): (clean, degraded), both mapped to [-1, 1]
    as its PairedSROnlineTxtDataset does."""
    clean = jnp.asarray(images, jnp.float32) / 255.0
    return clean * 2.0 - 1.0, degrade(key, clean, cfg) * 2.0 - 1.0
