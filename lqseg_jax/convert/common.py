"""Mechanical PyTorch -> Flax NNX conversion shared by every converter.

Our modules mirror the attribute names of the PyTorch originals, so a converter is two things:
1. a table of regex renames from the checkpoint's key names to our module paths (`rename_keys`), and
2. `load_torch_state`, which finds, for a key `path.to.module.weight`, the NNX module at
   `path.to.module` and maps the leaf name and memory layout from the module's type:

   | NNX module                    | torch leaf                     | NNX leaf    | layout                        |
   |-------------------------------|--------------------------------|-------------|-------------------------------|
   | nnx.Linear                    | weight, bias                   | kernel, bias| (out, in) -> (in, out)        |
   | nnx.Conv                      | weight, bias                   | kernel, bias| (O, I, *k) -> (*k, I, O)      |
   | nnx.LayerNorm/GroupNorm/RMSNorm| weight, bias                  | scale, bias | -                             |
   | nnx.BatchNorm                 | weight, bias, running_mean/var | scale, bias, mean, var | -          |
   | nnx.Embed                     | weight                         | embedding   | -                             |
   | any other module              | <name>                         | <name>      | - (or the module's `from_torch`) |

A module with an unusual layout defines `from_torch(self, name, array) -> (leaf_name, array)`.
Every error names the key, what was found and what was expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

IGNORED_TORCH_LEAVES = ("num_batches_tracked",)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: a missing, unexpected or mis-shaped key."""


def load_safetensors(path: str | Path, framework: str = "numpy") -> dict[str, Any]:
    """safetensors.load_file of `path` ("numpy" or "torch" tensors); an unreadable file (a bad header, a
    truncated body) is a CheckpointError naming it."""
    if framework == "torch":
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ValueError depending on the damage
        raise CheckpointError(
            f"{Path(path).absolute()} is not a readable safetensors file ({type(e).__name__}: {_first_line(e)})"
        ) from e


def torch_load(path: str | Path, *, trust_pickle: bool | None) -> Any:
    """torch.load on CPU, restricted to tensors unless `trust_pickle`. An unreadable file is a
    CheckpointError naming it; it advises --trust-pickle only when the converter has that flag
    (trust_pickle is False, not None) and it was not passed."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        message = (
            f"{Path(path).absolute()} could not be read by torch.load ({type(e).__name__}: {_first_line(e)})"
        )
        if trust_pickle is False:
            message += (
                "; expected a torch checkpoint of tensors. If it holds other objects and you trust its origin, "
                "pass --trust-pickle"
            )
        else:
            message += "; expected a file written by torch.save"
        raise CheckpointError(message) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Torch tensors (any dtype, any device) or arrays -> float32/int numpy arrays, keys unchanged."""
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch.Tensor; bf16/fp16 have no numpy dtype, widen them
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.float()
            value = value.numpy()
        out[key] = np.asarray(value)
    return out


def rename_keys(
    state_dict: Mapping[str, np.ndarray],
    rules: Sequence[tuple[str, str]],
    *,
    skip: Sequence[str] = (),
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Applies regex `rules` in order to every key; keys matching a `skip` regex are dropped.

    Returns (renamed dict, skipped keys). Two keys renamed onto one name is an error.
    """
    skip_res = [re.compile(s) for s in skip]
    rule_res = [(re.compile(p), r) for p, r in rules]
    renamed, skipped = {}, []
    for key, value in state_dict.items():
        if any(s.search(key) for s in skip_res):
            skipped.append(key)
            continue
        new = key
        for pattern, repl in rule_res:
            new = pattern.sub(repl, new)
        if new in renamed:
            raise CheckpointError(f"two checkpoint keys map onto '{new}' (second: '{key}')")
        renamed[new] = value
    return renamed, skipped


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Keeps the keys that start with `prefix`, without it."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _torch_layout_kernel(array: np.ndarray) -> np.ndarray:
    """(O, I, *k) -> (*k, I, O)."""
    nd = array.ndim
    return np.transpose(array, (*range(2, nd), 1, 0))


def _map_leaf(module: nnx.Module, name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Maps a torch leaf name and layout onto the NNX leaf of `module`."""
    custom = getattr(module, "from_torch", None)
    if custom is not None:
        return custom(name, array)
    if isinstance(module, nnx.Linear):
        return ("kernel", array.T) if name == "weight" else (name, array)
    if isinstance(module, nnx.Conv | nnx.ConvTranspose):
        if name == "weight":
            return "kernel", _torch_layout_kernel(array)
        return name, array
    if isinstance(module, nnx.BatchNorm):
        leaf = {"weight": "scale", "running_mean": "mean", "running_var": "var"}.get(name, name)
        return leaf, array
    if isinstance(module, nnx.LayerNorm | nnx.GroupNorm | nnx.RMSNorm):
        return {"weight": "scale"}.get(name, name), array
    if isinstance(module, nnx.Embed):
        return {"weight": "embedding"}.get(name, name), array
    return name, array


def _find_module(root: nnx.Module, parts: Sequence[str]) -> nnx.Module | None:
    node: Any = root
    for part in parts:
        if isinstance(node, nnx.List | list | tuple) and part.isdigit():
            idx = int(part)
            if idx >= len(node):
                return None
            node = node[idx]
        elif isinstance(node, nnx.Dict | dict):
            if part not in node:
                return None
            node = node[part]
        else:
            if not hasattr(node, part):
                return None
            node = getattr(node, part)
    return node


def _path_str(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def model_leaves(model: nnx.Module, filt: Any = (nnx.Param, nnx.BatchStat)) -> dict[str, nnx.Variable]:
    """Our loadable leaves by dotted path ('blocks.0.attn.q.kernel' -> Variable)."""
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, filt)):
        parent = _find_module(model, [str(p) for p in path[:-1]])
        out[_path_str(path)] = getattr(parent, str(path[-1]))
    return out


def load_torch_state(
    model: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    source: str,
    filt: Any = (nnx.Param, nnx.BatchStat),
    allow_missing: Sequence[str] = (),
    progress: bool = False,
) -> None:
    """Loads a renamed torch state dict (keys are our module paths) into `model` in place.

    Every leaf of `model` selected by `filt` must be set (unless it matches an `allow_missing`
    regex), every key must land on a leaf, and every shape must match: otherwise CheckpointError
    names the offending keys. `source` names the checkpoint in messages. `model` may be abstract
    (built under `nnx.eval_shape`): its variables then receive the checkpoint arrays, so a large model
    is never randomly initialised only to be overwritten.
    """
    targets = model_leaves(model, filt)
    assigned: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    new_values: dict[str, np.ndarray] = {}
    items = sorted(state_dict.items())
    for key, array in tqdm(items, desc=f"converting {source}", disable=not progress, leave=False):
        parts = key.split(".")
        if parts[-1] in IGNORED_TORCH_LEAVES:
            continue
        module = _find_module(model, parts[:-1])
        if module is None or not isinstance(module, nnx.Module):
            unexpected.append(key)
            continue
        leaf, mapped = _map_leaf(module, parts[-1], np.asarray(array))
        target = _path_str([*parts[:-1], leaf])
        if target not in targets:
            unexpected.append(key)
            continue
        expected = tuple(targets[target].shape)
        if tuple(mapped.shape) != expected:
            mismatched.append(
                f"'{key}' (-> '{target}'): checkpoint has {tuple(np.asarray(array).shape)} (mapped "
                f"{tuple(mapped.shape)}), model expects {expected}"
            )
        new_values[target] = mapped
        assigned.add(target)
    if mismatched:  # every one named: a weight's wrong shape is not blamed on its bias
        raise CheckpointError(
            f"{source}: shape mismatch for "
            + "; ".join(mismatched[:10])
            + (f"; and {len(mismatched) - 10} more" if len(mismatched) > 10 else "")
        )
    allow = [re.compile(a) for a in allow_missing]
    missing = sorted(t for t in targets if t not in assigned and not any(a.search(t) for a in allow))
    if unexpected or missing:
        raise CheckpointError(
            f"{source} does not match the model: {len(missing)} missing, {len(unexpected)} unexpected.\n"
            f"  missing (first 20): {missing[:20]}\n  unexpected (first 20): {unexpected[:20]}"
        )
    for target, mapped in new_values.items():
        var = targets[target]
        value = jnp.array(mapped, dtype=var.dtype, copy=True)  # never alias the torch tensor's memory
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):  # a model built with nnx.eval_shape
            var.set_value(value)
        else:
            var[...] = value


SAVED = (nnx.Param, nnx.BatchStat)  # what a converted checkpoint holds (no RNG stream state)


def save_converted(out_dir: str | Path, model: nnx.Module, meta: Mapping[str, Any]) -> Path:
    """Writes the parameters and batch statistics of `model` with orbax under out_dir/state and `meta`
    (config, source) as JSON."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, SAVED))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "state", state, force=True)
    (out / "meta.json").write_text(json.dumps(dict(meta), indent=2, default=str))
    return out


def load_converted(out_dir: str | Path, model: nnx.Module) -> dict[str, Any]:
    """Restores a `save_converted` folder into `model` in place; returns its meta."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if not (out / "state").exists():
        raise FileNotFoundError(f"no converted state at {out / 'state'} (expected a save_converted folder)")
    target = nnx.to_pure_dict(nnx.state(model, SAVED))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    with ocp.StandardCheckpointer() as ckptr:
        _check_converted_shapes(out, ckptr.metadata(out / "state"), abstract)
        try:
            restored = ckptr.restore(out / "state", abstract)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"converted state at {out} does not fit the model: {e}") from e
    state = nnx.state(model, SAVED)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return json.loads((out / "meta.json").read_text())


def _check_converted_shapes(out: Path, metadata: Any, abstract: Any) -> None:
    """Names every array of a converted folder whose shape differs from the model's, and the arrays only one
    side has (orbax reports only the first mismatch it meets, without its key)."""

    def shapes(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {".".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}

    stored, wanted = shapes(getattr(metadata, "item_metadata", metadata)), shapes(abstract)
    problems = [
        f"'{k}': saved {stored[k]}, model expects {wanted[k]}"
        for k in sorted(stored.keys() & wanted.keys())
        if stored[k] != wanted[k]
    ]
    problems += [f"'{k}': missing from the folder" for k in sorted(wanted.keys() - stored.keys())]
    problems += [f"'{k}': not in the model" for k in sorted(stored.keys() - wanted.keys())]
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"converted state at {out} does not fit the model ({len(problems)} arrays): "
            + "; ".join(problems[:10])
            + more
            + " (was it converted for another config, e.g. another model.num_classes?)"
        )
