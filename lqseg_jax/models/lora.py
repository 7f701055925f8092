"""LoRA for nnx.Linear and nnx.Conv, with peft's structure and key names.

An adapted layer holds `base_layer` plus `lora_A.<adapter>` and `lora_B.<adapter>`, so a peft state dict
(`<name>.base_layer.weight`, `<name>.lora_A.<adapter>.weight`, ...) loads mechanically through
`lqseg_jax.convert.common.load_torch_state`. As in peft:
- Linear: A = Linear(in, r, no bias), B = Linear(r, out, no bias).
- Conv: A = Conv(in, r) with the base kernel size, stride and padding (no bias); B = 1x1 Conv(r, out).
- y = base(x) + sum over adapters of (alpha / r) * B(A(x)); no dropout (peft's default lora_dropout 0).
- init "gaussian": A ~ N(0, (1/r)^2), B = 0, so an adapted model starts equal to its base.

LoRA factors are `LoRAParam` variables (a subclass of nnx.Param): `nnx.state(model, LoRAParam)` selects
exactly the LoRA parameters, and optimizers built with `wrt=nnx.Param` still see them.
`RASS_UNET_TRAINABLE` adds conv_in (trained fully in RASS) to that filter.

RASS (Ka1Guan/RASS restoration_adaptation/ras.py, `unet_lora`) adds three rank-4 adapters to the SD UNet:
every parameter whose name contains neither "bias" nor "norm" and contains one of `RASS_TARGETS` (a
substring test on the full parameter name; "conv" thus matches every convolution) gives its module, except
`conv_out`; names containing "down_blocks" or "conv_in" go to `default_encoder_s2`, "up_blocks" to
`default_decoder_s2`, the rest (mid_block) to `default_others_s2`. time_embedding.* and time_emb_proj
match no pattern and stay plain. peft then matches those exact module names. `apply_lora` with the
defaults below reproduces that selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

RASS_TARGETS: tuple[str, ...] = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "proj_out",
    "proj_in",
    "ff.net.2",
    "ff.net.0.proj",
)
RASS_EXCLUDE: tuple[str, ...] = ("conv_out",)


def rass_s2_group(name: str) -> str:
    """The RASS stage-2 adapter for a UNet module name (first match wins, as in ras.py)."""
    if "down_blocks" in name or "conv_in" in name:
        return "default_encoder_s2"
    if "up_blocks" in name or "conv_out" in name:
        return "default_decoder_s2"
    return "default_others_s2"


class LoRAParam(nnx.Param):
    """A LoRA factor (lora_A / lora_B kernel): the trainable part of an adapted layer."""


# What RASS trains in the UNet (ras.py set_train): every LoRA factor plus the whole conv_in.
RASS_UNET_TRAINABLE = nnx.Any(LoRAParam, nnx.PathContains("conv_in"))


def _as_lora_param(layer: nnx.Linear | nnx.Conv) -> nnx.Linear | nnx.Conv:
    layer.kernel = LoRAParam(layer.kernel[...])
    return layer


class _LoRABase(nnx.Module):
    """Common to LoRALinear and LoRAConv: the adapters, their scales, merging."""

    def __init__(self, base_layer: nnx.Linear | nnx.Conv):
        self.base_layer = base_layer
        self.lora_A = nnx.Dict()
        self.lora_B = nnx.Dict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, adapter: str, rank: int, alpha: float, *, rngs: nnx.Rngs) -> None:
        if adapter in self.lora_A:
            raise ValueError(f"LoRA adapter '{adapter}' already exists on this layer")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        a, b = self._make_factors(rank, rngs)
        self.lora_A[adapter] = _as_lora_param(a)
        self.lora_B[adapter] = _as_lora_param(b)
        self.scaling = {**self.scaling, adapter: alpha / rank}

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base_layer(x)  # (..., out)
        for name in self.lora_A:
            y = y + self.scaling[name] * self.lora_B[name](self.lora_A[name](x))  # (..., out)
        return y

    def merged_kernel(self) -> jax.Array:
        """The base kernel plus every adapter's scaled delta, in our layout."""
        kernel = self.base_layer.kernel[...]
        for name in self.lora_A:
            kernel = kernel + self.scaling[name] * self._delta(
                self.lora_A[name].kernel[...], self.lora_B[name].kernel[...]
            )
        return kernel


class LoRALinear(_LoRABase):
    """peft lora.Linear around an nnx.Linear."""

    def _make_factors(self, rank: int, rngs: nnx.Rngs) -> tuple[nnx.Linear, nnx.Linear]:
        base = self.base_layer
        a = nnx.Linear(
            base.in_features,
            rank,
            use_bias=False,
            dtype=base.dtype,
            kernel_init=nnx.initializers.normal(stddev=1.0 / rank),
            rngs=rngs,
        )
        b = nnx.Linear(
            rank,
            base.out_features,
            use_bias=False,
            dtype=base.dtype,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        return a, b

    @staticmethod
    def _delta(a: jax.Array, b: jax.Array) -> jax.Array:
        return a @ b  # (in, r) @ (r, out) -> (in, out)


class LoRAConv(_LoRABase):
    """peft lora.Conv2d around an nnx.Conv: A copies the base kernel size, stride and padding."""

    def _make_factors(self, rank: int, rngs: nnx.Rngs) -> tuple[nnx.Conv, nnx.Conv]:
        base = self.base_layer
        if base.feature_group_count != 1:
            raise ValueError("LoRA on a grouped convolution is not supported")
        a = nnx.Conv(
            base.in_features,
            rank,
            base.kernel_size,
            strides=base.strides,
            padding=base.padding,
            kernel_dilation=base.kernel_dilation,
            use_bias=False,
            dtype=base.dtype,
            kernel_init=nnx.initializers.normal(stddev=1.0 / rank),
            rngs=rngs,
        )
        ones = (1,) * len(base.kernel_size)
        b = nnx.Conv(
            rank,
            base.out_features,
            ones,
            use_bias=False,
            dtype=base.dtype,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        return a, b

    @staticmethod
    def _delta(a: jax.Array, b: jax.Array) -> jax.Array:
        # conv(x, A) then 1x1 conv B == conv(x, A . B): (*k, in, r) x (r, out) -> (*k, in, out)
        return jnp.einsum("...ir,ro->...io", a, b.reshape(b.shape[-2:]))


LoRALayer = LoRALinear | LoRAConv


def _children(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, nnx.List):
        yield from ((str(i), m) for i, m in enumerate(node))
    elif isinstance(node, nnx.Dict):
        yield from node.items()
    else:
        yield from ((k, v) for k, v in vars(node).items() if isinstance(v, nnx.Module))


def _replace_child(parent: Any, key: str, new: nnx.Module) -> None:
    if isinstance(parent, nnx.List):
        parent[int(key)] = new
    elif isinstance(parent, nnx.Dict):
        parent[key] = new
    else:
        setattr(parent, key, new)


def iter_modules(model: nnx.Module, prefix: str = "") -> Iterator[tuple[str, Any, str, nnx.Module]]:
    """(dotted name, parent, key in parent, module) for every submodule, depth first, parents first."""
    for key, child in _children(model):
        if child is None:
            continue
        name = f"{prefix}{key}"
        yield name, model, key, child
        if not isinstance(child, _LoRABase):
            yield from iter_modules(child, name + ".")


def lora_target_names(
    model: nnx.Module, targets: Sequence[str] = RASS_TARGETS, exclude: Sequence[str] = RASS_EXCLUDE
) -> list[str]:
    """Names of the Linear/Conv modules RASS adapts: the parameter name `<module>.weight` contains one of
    `targets` and neither "bias" nor "norm"; names in `exclude` are left out."""
    names = []
    for name, _, _, module in iter_modules(model):
        if not isinstance(module, nnx.Linear | nnx.Conv) or name in exclude:
            continue
        weight = f"{name}.weight"
        if "bias" in weight or "norm" in weight:
            continue
        if any(t in weight for t in targets):
            names.append(name)
    return names


def add_lora(
    model: nnx.Module, name: str, adapter: str, rank: int, alpha: float, *, rngs: nnx.Rngs
) -> LoRALayer:
    """Adds adapter `adapter` to the module at dotted path `name` (wrapping it on first use)."""
    for mname, parent, key, module in iter_modules(model):
        if mname != name:
            continue
        if isinstance(module, _LoRABase):
            layer = module
        elif isinstance(module, nnx.Linear):
            layer = LoRALinear(module)
        elif isinstance(module, nnx.Conv):
            layer = LoRAConv(module)
        else:
            raise TypeError(
                f"LoRA target '{name}' is a {type(module).__name__}, expected nnx.Linear or nnx.Conv"
            )
        layer.add_adapter(adapter, rank, alpha, rngs=rngs)
        if layer is not module:
            _replace_child(parent, key, layer)
        return layer
    raise KeyError(f"LoRA target '{name}' is not a submodule of {type(model).__name__}")


def apply_lora(
    model: nnx.Module,
    rank: int = 4,
    alpha: float = 8.0,
    groups: Callable[[str], str | None] = rass_s2_group,
    *,
    rngs: nnx.Rngs,
    targets: Sequence[str] = RASS_TARGETS,
    exclude: Sequence[str] = RASS_EXCLUDE,
) -> dict[str, str]:
    """Adds LoRA in place to every module `lora_target_names` selects; `groups(name)` names its adapter
    (None: leave it plain). Returns {module name: adapter}. Defaults: RASS stage 2 (r 4, alpha 8)."""
    chosen = {}
    for name in lora_target_names(model, targets, exclude):
        adapter = groups(name)
        if adapter is not None:
            chosen[name] = adapter
    for name, adapter in chosen.items():
        add_lora(model, name, adapter, rank, alpha, rngs=rngs)
    return chosen


def lora_layers(model: nnx.Module) -> dict[str, LoRALayer]:
    """{dotted name: adapted layer} for every LoRA layer in `model`."""
    return {name: m for name, _, _, m in iter_modules(model) if isinstance(m, _LoRABase)}


def lora_layout(model: nnx.Module) -> list[tuple[str, str, int, float]]:
    """[(module name, adapter, rank, alpha)] for every adapter in `model`: enough to rebuild it."""
    out = []
    for name, layer in lora_layers(model).items():
        for adapter in layer.lora_A:
            rank = layer.lora_A[adapter].kernel.shape[-1]
            out.append((name, adapter, rank, layer.scaling[adapter] * rank))
    return out


def merge_lora(model: nnx.Module) -> int:
    """peft merge_and_unload: folds every adapter into its base kernel and puts the plain base layer back.

    Returns the number of layers merged.
    """
    merged = 0
    for _, parent, key, module in list(iter_modules(model)):
        if isinstance(module, _LoRABase):
            base = module.base_layer
            base.kernel[...] = module.merged_kernel().astype(base.kernel.dtype)
            _replace_child(parent, key, base)
            merged += 1
    return merged
