"""Train state and the jitted, sharded, pure train step shared by every system.

TrainState = (step, params, rest, opt_state, ema): `params` are the leaves the system's `trainable`
filter selects, `rest` is everything else in the model (frozen parameters, batch statistics, RNG state).
The step is `train_step(state, batch, rng) -> (state, metrics)`, jitted once with explicit in/out
shardings and the state donated. Randomness inside the step comes only from `rng`, which the loop
derives from (seed, step), so a resumed run replays the same stream. The system's frozen networks
(`System.frozen_networks`: never in the state) are placed replicated once and ride in every device batch
as batch[FROZEN]; the step takes them as a replicated input beside the batch.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ..models.tracing import abstract_model, fast_init_tracing, light_compilation, param_count
from ..systems import get_system
from ..systems.base import FROZEN
from .mesh import batch_sharding, make_mesh, replicated, state_shardings
from .optim import build_optimizer

log = logging.getLogger(__name__)

HOST_INIT_PARAMS = 200_000_000  # below: build on the host and place; above: one sharded jitted init


def place_host_tree(tree: Any, shardings: Any) -> Any:
    """Arrays that every process holds whole (the same values everywhere, e.g. a model each process built
    from the same seed) -> global arrays in `shardings`, each process filling only its addressable shards.
    Unlike device_put, this works when a sharding spans devices of other processes."""

    def place(x, sharding):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # e.g. nnx RNG streams: place the raw key data
            data = place(jax.random.key_data(x), sharding)
            return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=jax.random.key_impl(x)))(data)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    ema: Any  # a copy of params, or None when config.ema.enabled is False


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """Constant `decay`, or with warmup the mean-teacher schedule min(1 - 1/(step + 1), decay)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), decay)


class Trainer:
    """Builds the model, optimizer, shardings and jitted functions for one experiment config."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh.data, config.mesh.fsdp)
        if config.batch_size % self.mesh.size:
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by the {self.mesh.size} devices of the mesh "
                f"(data={self.mesh.shape['data']} x fsdp={self.mesh.shape['fsdp']})"
            )
        self.system = get_system(config)
        abstract = abstract_model(lambda: self.system.build_model(nnx.Rngs(params=0, dropout=0)))
        self.num_params = param_count(abstract)
        abstract.train()
        self.graphdef, abs_params, _ = nnx.split(abstract, self.system.trainable, ...)
        abstract.eval()
        self.eval_graphdef, _, _ = nnx.split(abstract, self.system.trainable, ...)
        self.tx, self.schedule = build_optimizer(config.optimizer, abs_params, config.total_steps)

        with fast_init_tracing():
            abstract_state = jax.eval_shape(self._init)
        s = config.sharding
        self.state_sharding = state_shardings(
            abstract_state, self.mesh, rules=s.rules, default=s.default, min_shard_size=s.min_shard_size
        )
        self.abstract_state = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            abstract_state,
            self.state_sharding,
        )
        self.batch_sharding = batch_sharding(self.mesh)
        self._base_key = jax.random.key(config.seed)
        repl = replicated(self.mesh)
        self._train_step_jit = jax.jit(
            self._train_step,
            in_shardings=(self.state_sharding, self.batch_sharding, repl),
            out_shardings=(self.state_sharding, repl),
            donate_argnums=0,
        )
        # the same step for systems with frozen networks, which come in replicated beside the batch
        self._train_step_frozen_jit = jax.jit(
            self._train_step,
            in_shardings=(self.state_sharding, self.batch_sharding, repl, repl),
            out_shardings=(self.state_sharding, repl),
            donate_argnums=0,
        )

    def train_step(self, state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        """The jitted step, traced under this trainer's mesh (kernels shard_map over it)."""
        with jax.set_mesh(self.mesh):
            if FROZEN in batch:
                data = {k: v for k, v in batch.items() if k != FROZEN}
                return self._train_step_frozen_jit(state, data, rng, batch[FROZEN])
            return self._train_step_jit(state, batch, rng)

    @functools.cached_property
    def frozen(self) -> dict[str, nnx.Module]:
        """The system's frozen networks (`System.frozen_networks`), loaded once, replicated on the mesh."""
        out = {}
        for name, network in self.system.frozen_networks().items():
            graphdef, state = nnx.split(network)
            state = place_host_tree(state, jax.tree.map(lambda _: replicated(self.mesh), state))
            out[name] = nnx.merge(graphdef, state)
        return out

    # ---------------------------------------------------------------- state
    def _new_model(self) -> nnx.Module:
        seed = self.config.seed
        return self.system.build_model(nnx.Rngs(params=seed, dropout=seed + 1))

    def _state_from_parts(self, params: Any, rest: Any) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            rest=rest,
            opt_state=self.tx.init(params),
            ema=jax.tree.map(jnp.copy, params) if self.config.ema.enabled else None,
        )

    def _init(self) -> TrainState:
        model = self._new_model()
        model.train()
        _, params, rest = nnx.split(model, self.system.trainable, ...)
        return self._state_from_parts(params, rest)

    def init_state(self) -> TrainState:
        """A fresh state placed in its shardings.

        Models under HOST_INIT_PARAMS parameters, and any model the system loads pretrained weights into,
        are built eagerly on the host (one-off ops, compiled with light optimisation: 16 s for tiny RASS
        where one jitted init compiles for 80 s on CPU), filled, and placed in their shardings. Larger
        models without pretrained weights are created by one jitted init directly in their shardings, so
        no device ever holds more than its shard.
        """
        if not self.system.has_pretrained() and self.num_params >= HOST_INIT_PARAMS:
            with fast_init_tracing():
                return jax.jit(self._init, out_shardings=self.state_sharding)()
        with light_compilation():
            model = self._new_model()
        if self.system.has_pretrained():
            log.info("loaded pretrained weights: %s", self.system.load_pretrained(model))
        model.train()
        _, params, rest = nnx.split(model, self.system.trainable, ...)
        sh = self.state_sharding
        params, rest = place_host_tree((params, rest), (sh.params, sh.rest))
        return jax.jit(self._state_from_parts, out_shardings=sh)(params, rest)

    def step_rng(self, step: int) -> jax.Array:
        return jax.random.fold_in(self._base_key, step)

    def device_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's numpy batch (plus the system's host additions) -> global arrays sharded along the
        batch axes; non-numeric entries (names) stay on the host. The system's frozen networks, if any,
        come along as batch[FROZEN]."""
        out = {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in self.system.host_batch(local_batch).items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"
        }
        return {**out, FROZEN: self.frozen} if self.frozen else out

    def local_rows(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded global array, in its local batch order."""
        if jax.process_count() == 1:
            return np.asarray(x)
        return np.asarray(
            multihost_utils.global_array_to_host_local_array(x, self.mesh, self.batch_sharding.spec)
        )

    # ---------------------------------------------------------------- step
    def _train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: dict | None = None
    ) -> tuple[TrainState, dict]:
        if frozen is not None:
            batch = {**batch, FROZEN: frozen}
        # copy=True: fresh Variables owned by this trace, so the model may update its RNG counts and BN stats.
        reseeded = nnx.merge(self.graphdef, state.params, state.rest, copy=True)
        nnx.reseed(reseeded, dropout=jax.random.fold_in(rng, 1))  # dropout/drop-path from (seed, step)
        _, _, rest_in = nnx.split(reseeded, self.system.trainable, ...)

        def loss_fn(params, rest):
            model = nnx.merge(self.graphdef, params, rest, copy=True)
            loss, metrics = self.system.loss(model, batch, jax.random.fold_in(rng, 2))
            _, _, rest = nnx.split(model, self.system.trainable, ...)
            return loss, (metrics, rest)

        (loss, (metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, rest_in)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            m = ema_decay(state.step, self.config.ema.decay, self.config.ema.warmup)
            ema = jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema, params)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": self.schedule(state.step),
        }
        new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state, ema=ema)
        return new_state, metrics

    # ---------------------------------------------------------------- inference
    def eval_params(self, state: TrainState) -> Any:
        """EMA parameters when the config keeps them and asks to evaluate them, else the raw ones."""
        if state.ema is not None and self.config.ema.evaluate:
            return state.ema
        return state.params

    def model_from_state(self, state: TrainState, *, eval_mode: bool = True) -> nnx.Module:
        graphdef = self.eval_graphdef if eval_mode else self.graphdef
        return nnx.merge(graphdef, self.eval_params(state) if eval_mode else state.params, state.rest)
