"""A system = model + loss + inference, built from the experiment config.

The training loop knows systems only through this interface, so it holds no model-specific branch.
A system never reads files: the loop hands it device batches {"image": (b, h, w, 3) uint8,
"label": (b, h, w) uint8} and a PRNG key.

Frozen networks: a system may run networks beside its model that are never trained, checkpointed or
optimised (a tagger and a text encoder computing prompts in the step). It returns them, loaded, from
`frozen_networks`; the trainer places their parameters replicated on the mesh once, and every device batch
it builds (`Trainer.device_batch`) carries them as batch[FROZEN] = {name: module}, so the jitted train and
evaluation steps take them as inputs (not as compile-time constants) and `loss` / `predict_batch` call them.
A system without frozen networks sees no FROZEN entry.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

IGNORE = 255
FROZEN = "frozen"  # the device batch's entry holding the system's frozen networks
BATCH_AXES = ("data", "fsdp")  # = lqseg_jax.train.mesh.BATCH_AXES (systems do not import the trainer)


class System(abc.ABC):
    """Extra state: a system may keep state beside its trainable parameters in its model (a teacher, a
    frozen copy, step counters). Whatever `trainable` does not select is the train state's `rest`: sharded,
    checkpointed and resumed with the rest of the state; `loss` may write new values into it (under
    stop_gradient), and what the model holds after `loss` becomes the next step's `rest`, as BatchNorm
    statistics do (systems/uda.py: EMA teacher and step count)."""

    # Which variables the optimizer trains; everything else (frozen params, BN stats, RNG state) is carried.
    trainable: Any = nnx.Param

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The network at the config's size, randomly initialised."""

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar training loss and a dict of scalar metrics (model is in train mode)."""

    @abc.abstractmethod
    def predict(self, model: nnx.Module, images: jax.Array) -> jax.Array:
        """uint8 images (b, h, w, 3) -> class scores (b, h, w, K) at input resolution (eval mode)."""

    def training_images(self, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(lq, hq) float32 images (b, h, w, 3) in [0, 255] for a training step. hq is the clean batch as it
        reached the device; lq is hq degraded on the device by the Real-ESRGAN model
        (lqseg_jax.data_pipelines.degradation, config.degradation.preset) when config.degradation.enabled,
        else hq itself. Degradation randomness comes from `rng`, so it replays on resume."""
        hq = batch["image"].astype(jnp.float32)  # (b, h, w, 3)
        deg = self.config.get("degradation")
        if not deg or not deg.enabled:
            return hq, hq
        from ..data_pipelines.degradation import degrade, get_config

        # Under the trainer's mesh the batch is split over the batch axes and each device degrades its images.
        mesh = jax.sharding.get_abstract_mesh()
        split = {} if mesh.empty else {"mesh": mesh, "batch_axis": BATCH_AXES}
        lq = degrade(jax.random.fold_in(rng, 0xDE6), hq / 255.0, get_config(deg.preset), **split)
        return jnp.round(lq * 255.0), hq  # 8-bit levels, exact whichever way XLA fuses the scaling

    def predict_batch(self, model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
        """Class scores (b, h, w, K) for a device batch, whose extra entries (from `host_batch`) a system may
        use; default: `predict` on batch["image"]."""
        return self.predict(model, batch["image"])

    def frozen_outside_model(self) -> dict[str, nnx.Module]:
        """Abstract (shape-only) copies of the frozen networks the system runs outside the model and its
        train state, by name (e.g. a text encoder used in `host_batch`); for parameter counts."""
        return {}

    def frozen_networks(self) -> dict[str, nnx.Module]:
        """The frozen networks the jitted steps run beside the model, loaded, by name (module docstring):
        they reach `loss` and `predict_batch` as batch[FROZEN]. Called once per trainer; default none."""
        return {}

    def host_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Host-side additions to this process's numpy batch before it goes to the devices (e.g. cached
        text embeddings looked up by image name). Every array in the result is sharded along the batch."""
        return batch

    def has_pretrained(self) -> bool:
        """Whether `load_pretrained` has weights to load (then the model is built on the host first)."""
        pretrained = self.config.model.get("pretrained")
        return bool(pretrained and pretrained.get("path"))

    def load_pretrained(self, model: nnx.Module) -> str:
        """Fills a freshly built `model` with pretrained weights, in place; returns what was loaded.
        Default: config.model.pretrained = {path: a `scripts/convert.py` output folder, prefix: the
        submodule it belongs to}."""
        from ..convert.common import load_converted

        pretrained = self.config.model.pretrained
        target = getattr(model, pretrained.prefix) if pretrained.get("prefix") else model
        meta = load_converted(pretrained.path, target)
        return f"{pretrained.path} -> {pretrained.get('prefix') or 'model'} ({meta.get('source', '?')})"


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, avg_non_ignore: bool = False, weight: jax.Array | None = None
) -> jax.Array:
    """Pixel CE with ignore 255. logits (b, h, w, K) fp32, labels (b, h, w).

    avg_non_ignore=False averages over ALL pixels, ignored ones counting as 0, as mmseg < 1.0 (and so
    DAFormer/Refign) do; True averages over labelled pixels only. `weight` (b, h, w) scales each pixel.
    """
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE  # (b, h, w)
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)  # (b, h, w)
    logp = jax.nn.log_softmax(logits, axis=-1)  # (b, h, w, K)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # (b, h, w)
    nll = jnp.where(valid, nll, 0.0)
    if weight is not None:
        nll = nll * weight
    denom = jnp.maximum(valid.sum(), 1) if avg_non_ignore else nll.size
    return nll.sum() / denom


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """uint8 or [0, 255] float images (b, h, w, 3) -> (x - mean) / std in `dtype`."""
    x = images.astype(jnp.float32)
    return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def pixel_accuracy(pred: jax.Array, labels: jax.Array) -> jax.Array:
    valid = labels != IGNORE
    return jnp.sum((pred == labels) & valid) / jnp.maximum(valid.sum(), 1)
