"""Device mesh ('data', 'fsdp') and sharding rules as data.

Parameters and optimizer state are sharded by rules: a list of (regex, spec) matched against the dotted
path of each leaf ("params.backbone.block1.0.attn.q.kernel"); the first match wins. A spec is a tuple
with one entry per dimension: None, "data", "fsdp" or a tuple of axes. Leaves no rule matches follow the
default strategy: "fsdp" shards the largest dimension divisible by the fsdp axis size along 'fsdp'
(leaves under `min_shard_size` elements stay replicated); "replicate" replicates.
Batches are sharded along both axes, ('data', 'fsdp'): every device computes on its own examples and
FSDP only shards the state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; data = -1 takes what fsdp leaves."""
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match the {n} devices")
    return jax.make_mesh((data, fsdp), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def path_name(path: Sequence[Any]) -> str:
    """A pytree key path as a dotted name, without NNX's trailing '.value'."""
    name = jax.tree_util.keystr(tuple(path), simple=True, separator=".")
    return name.removesuffix(".value")


def _spec_for(name: str, shape: tuple[int, ...], mesh: Mesh, rules, default: str, min_size: int) -> P:
    for pattern, spec in rules:
        if re.search(pattern, name):
            spec = tuple(spec)
            if len(spec) != len(shape):
                raise ValueError(f"sharding rule {pattern!r} gives {spec} for '{name}' of shape {shape}")
            return P(*spec)
    fsdp = mesh.shape["fsdp"]
    if default == "replicate" or fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    if default != "fsdp":
        raise ValueError(f"sharding.default must be 'fsdp' or 'replicate', got {default!r}")
    for dim in np.argsort(shape, kind="stable")[::-1]:
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(
    abstract: Any,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, Sequence[Any]]] = (),
    default: str = "fsdp",
    min_shard_size: int = 2**14,
) -> Any:
    """NamedShardings for every leaf of an abstract (eval_shape) state tree."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, _spec_for(path_name(path), shape, mesh, rules, default, min_shard_size))

    return jax.tree_util.tree_map_with_path(one, abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dimension 0 over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
