"""Reading PyTorch Lightning `.ckpt` files without running their pickled code.

A Lightning checkpoint is a `torch.save` pickle: `state_dict` (tensors in an OrderedDict) beside
bookkeeping (epoch, global_step, loops, callback states, optimizer states, sometimes `hyper_parameters`
as a Lightning `AttributeDict` holding omegaconf or jsonargparse objects). torch >= 2.6 loads with
`weights_only=True` by default, which refuses those extra objects; `weights_only=False` would import and
call whatever the pickle names. `load_lightning_checkpoint` takes a third way: `torch.load` with our
restricted `pickle_module`, whose `find_class` returns only
- the globals needed to rebuild tensors and parameters (`torch._utils._rebuild_*`, torch dtypes,
  `torch.Size`, `torch.Tensor`, `torch.nn.Parameter`; storages are resolved by torch itself),
- plain containers (`collections.OrderedDict`, `builtins.set` / `frozenset` / `complex` / `slice`),
- Lightning's `AttributeDict` (any of its module paths), rebuilt as a plain dict,
and, for every other global (omegaconf configs, numpy scalars, paths, callback classes, ...), an inert
placeholder `Skipped` that records the global's name, its arguments and state but runs no code. So
weights and plain values load exactly; the skipped objects are listed by `skipped_globals`.
"""

from __future__ import annotations

import pickle
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lqseg_jax.convert.common import CheckpointError

_TORCH_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
}
_BUILTINS = {"set", "frozenset", "complex", "slice"}
_ATTRIBUTE_DICT_MODULES = {
    "pytorch_lightning.utilities.parsing",
    "lightning.pytorch.utilities.parsing",
    "lightning_fabric.utilities.data",
    "lightning.fabric.utilities.data",
}


class AttributeDict(dict):
    """Lightning's AttributeDict (hyper-parameters) rebuilt as a dict."""


class Skipped:
    """Stand-in for a pickled object whose class is not allowed: keeps the global's name (`_global`),
    the construction arguments and the pickled state, and runs none of the original code."""

    _global = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"Skipped({self._global})"


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class resolves only the allowed globals (module docstring) and turns
    every other one into a `Skipped` subclass named after it."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _TORCH_REBUILDERS:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and name in ("Size", "Tensor"):
            return getattr(torch, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.nn.parameter", "Parameter"):
            return torch.nn.Parameter
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "builtins" and name in _BUILTINS:
            return getattr(__import__("builtins"), name)
        if module in _ATTRIBUTE_DICT_MODULES and name == "AttributeDict":
            return AttributeDict
        return type(name, (Skipped,), {"_global": f"{module}.{name}", "__module__": __name__})


# torch.load(pickle_module=...) needs a module-like object with Unpickler, load and __name__.
restricted_pickle = types.ModuleType("lqseg_jax_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
restricted_pickle.__dict__["__name__"] = "lqseg_jax_restricted_pickle"


def load_lightning_checkpoint(path: str | Path) -> dict:
    """`torch.load` of a Lightning `.ckpt` (or any torch pickle) through `RestrictedUnpickler`, on CPU."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(ckpt).__name__}")
    return ckpt


def lightning_state_dict(ckpt: Mapping, source: str) -> Mapping[str, Any]:
    """`ckpt["state_dict"]` of a Lightning checkpoint, or the mapping itself when it is a bare state dict
    (every value a tensor)."""
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        return ckpt["state_dict"]
    if ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
        return ckpt
    raise CheckpointError(
        f"{source}: expected a Lightning checkpoint with 'state_dict', found keys {sorted(ckpt)[:20]}"
    )


def skipped_globals(obj: Any) -> list[str]:
    """Names of the globals that were replaced by `Skipped` placeholders anywhere inside `obj`."""
    found: set[str] = set()
    stack = [obj]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Skipped):
            found.add(item._global)
            stack += [*item.args, *item.kwargs.values(), item.state]
        elif isinstance(item, Mapping):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple | set | frozenset):
            stack += list(item)
    return sorted(found)
