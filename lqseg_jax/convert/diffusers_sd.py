"""diffusers Stable Diffusion checkpoints -> our NNX state (orbax), and back to models.

Input: a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, each component with its
config.json and weights in safetensors, sharded safetensors or .bin), or one component's state dict
(`convert_unet` / `convert_vae` / `convert_text_encoder`, e.g. the sd.* part of RASS's rass.pth).

Key mapping (everything else is mechanical, `lqseg_jax.convert.common.load_torch_state`):
- unet: diffusers names as they are. peft LoRA keys (`<name>.base_layer.weight`,
  `<name>.lora_A.<adapter>.weight`, `<name>.lora_B.<adapter>.weight`) are detected, the same adapters are
  added to our UNet (rank from lora_A's shape; alpha is not stored by peft: `lora_alpha`, peft's default 8)
  and loaded into them.
- vae: decoder.* and post_quant_conv.* are skipped (we build the encoder only); pre-0.14 diffusers
  attention names (query, key, value, proj_attn) are renamed to to_q, to_k, to_v, to_out.0.
- text_encoder: the transformers-4 prefix `text_model.` is removed; the position_ids buffer is skipped.

Each converted component is written with `save_converted` to OUT/<component>/ with meta.json holding the
component name, its config dict and the LoRA layout, so `load_sd_component(OUT/<component>)` rebuilds and
restores it. The tokenizer folder is copied to OUT/tokenizer (read it with `clip_text.load_tokenizer`).

CLI: python scripts/convert.py sd --src DIFFUSERS_DIR --out OUT_DIR [--components unet,vae,text_encoder]
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lqseg_jax.convert.common import (
    CheckpointError,
    load_converted,
    load_safetensors,
    load_torch_state,
    rename_keys,
    save_converted,
    to_numpy,
    torch_load,
)
from lqseg_jax.models.clip_text import CLIPTextModel
from lqseg_jax.models.lora import add_lora, lora_layout
from lqseg_jax.models.sd_unet import UNet2DConditionModel
from lqseg_jax.models.sd_vae import AutoencoderKL
from lqseg_jax.models.tracing import abstract_model

COMPONENTS = ("unet", "vae", "text_encoder")
PEFT_LORA_ALPHA = 8.0  # peft LoraConfig default lora_alpha (RASS keeps it)

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
VAE_RULES = (
    (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
)
VAE_SKIP = (r"^decoder\.", r"^post_quant_conv\.")
TEXT_RULES = ((r"^text_model\.", ""),)
TEXT_SKIP = (r"(^|\.)embeddings\.position_ids$",)
_LORA_A = re.compile(r"^(.*)\.lora_A\.([^.]+)\.weight$")


# ----------------------------------------------------------------------------------------------------------
# Reading a diffusers component folder


def read_config(component_dir: str | Path) -> dict[str, Any]:
    path = Path(component_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in {component_dir} (expected a diffusers component folder)")
    return json.loads(path.read_text())


def _load_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return to_numpy(load_safetensors(path, "torch"))
    return to_numpy(torch_load(path, trust_pickle=None))


def read_state_dict(component_dir: str | Path) -> dict[str, np.ndarray]:
    """The component's weights as numpy arrays (fp32 for floats), whichever diffusers file holds them."""
    folder = Path(component_dir)
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            out: dict[str, np.ndarray] = {}
            for shard in shards:
                out.update(_load_file(folder / shard))
            return out
        return _load_file(path)
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(_WEIGHT_FILES)})")


# ----------------------------------------------------------------------------------------------------------
# Builders (abstract: nnx.eval_shape, the checkpoint fills every variable)


def peft_lora_layout(state_dict: Mapping[str, np.ndarray], alpha: float = PEFT_LORA_ALPHA) -> list[list]:
    """[[module, adapter, rank, alpha]] for every peft `lora_A` key of a state dict."""
    layout = []
    for key, value in state_dict.items():
        m = _LORA_A.match(key)
        if m:
            layout.append([m.group(1), m.group(2), int(np.shape(value)[0]), float(alpha)])
    return sorted(layout)


def abstract_module(make: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
    """`make(nnx.Rngs(seed))` built abstractly (shapes only), without the quadratic tracing cost
    (see lqseg_jax.models.tracing)."""
    return abstract_model(lambda: make(nnx.Rngs(seed)))


def build_unet(
    config: Mapping[str, Any], *, lora: Sequence[Sequence] = (), dtype=jnp.float32, remat: bool = False
) -> UNet2DConditionModel:
    """Abstract UNet (no arrays) with the given LoRA layout: fill it with load_torch_state/load_converted."""

    def make(rngs):
        model = UNet2DConditionModel(config, dtype=dtype, remat=remat, rngs=rngs)
        for name, adapter, rank, alpha in lora:
            add_lora(model, name, adapter, int(rank), float(alpha), rngs=rngs)
        return model

    return abstract_module(make)


def build_vae(config: Mapping[str, Any], *, dtype=jnp.float32) -> AutoencoderKL:
    return abstract_module(lambda rngs: AutoencoderKL(config, dtype=dtype, rngs=rngs))


def build_text_encoder(config: Mapping[str, Any], *, dtype=jnp.float32) -> CLIPTextModel:
    return abstract_module(lambda rngs: CLIPTextModel(config, dtype=dtype, rngs=rngs))


# ----------------------------------------------------------------------------------------------------------
# State dict -> model


def convert_unet(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    lora_alpha: float = PEFT_LORA_ALPHA,
    source: str = "unet",
    progress: bool = False,
) -> UNet2DConditionModel:
    """A diffusers UNet2DConditionModel state dict (optionally with peft LoRA keys) -> our UNet."""
    sd = to_numpy(state_dict)
    model = build_unet(config, lora=peft_lora_layout(sd, lora_alpha))
    load_torch_state(model, sd, source=source, progress=progress)
    return model


def convert_vae(
    state_dict: Mapping[str, Any], config: Mapping[str, Any], *, source: str = "vae", progress: bool = False
) -> AutoencoderKL:
    """A diffusers AutoencoderKL state dict -> our encoder + quant_conv (decoder keys skipped)."""
    sd, _ = rename_keys(to_numpy(state_dict), VAE_RULES, skip=VAE_SKIP)
    model = build_vae(config)
    load_torch_state(model, sd, source=source, progress=progress)
    return model


def convert_text_encoder(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    source: str = "text_encoder",
    progress: bool = False,
) -> CLIPTextModel:
    """A transformers CLIPTextModel state dict (with or without `text_model.`) -> our CLIPTextModel."""
    sd, _ = rename_keys(to_numpy(state_dict), TEXT_RULES, skip=TEXT_SKIP)
    model = build_text_encoder(config)
    load_torch_state(model, sd, source=source, progress=progress)
    return model


_CONVERTERS = {"unet": convert_unet, "vae": convert_vae, "text_encoder": convert_text_encoder}


def save_component(
    out_dir: str | Path, component: str, model: nnx.Module, config: Mapping[str, Any], source: str
) -> Path:
    """save_converted with the meta `load_sd_component` needs."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown SD component '{component}' (expected one of {COMPONENTS})")
    meta = {
        "format": "diffusers_sd",
        "component": component,
        "config": dict(config),
        "lora": [list(entry) for entry in lora_layout(model)] if component == "unet" else [],
        "source": source,
    }
    return save_converted(out_dir, model, meta)


def convert_pipeline(
    src: str | Path,
    out: str | Path,
    components: Sequence[str] = (*COMPONENTS, "tokenizer"),
    *,
    progress: bool = True,
) -> dict[str, Path]:
    """Converts the chosen components of a diffusers SD folder into OUT/<component>; returns their paths."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"diffusers folder {src} does not exist")
    unknown = [c for c in components if c not in (*COMPONENTS, "tokenizer")]
    if unknown:
        raise ValueError(f"unknown components {unknown} (expected some of {(*COMPONENTS, 'tokenizer')})")
    for component in components:
        if not (src / component).is_dir():
            raise FileNotFoundError(f"{src} has no {component}/ folder")
    written = {}
    for component in tqdm(components, desc="SD components", disable=not progress):
        if component == "tokenizer":
            written[component] = Path(
                shutil.copytree(src / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
            )
            continue
        config = read_config(src / component)
        state = read_state_dict(src / component)
        model = _CONVERTERS[component](state, config, source=str(src / component), progress=progress)
        written[component] = save_component(out / component, component, model, config, str(src / component))
    return written


def load_sd_component(path: str | Path, *, dtype=jnp.float32, remat: bool = False) -> nnx.Module:
    """Rebuilds a converted component (UNet2DConditionModel, AutoencoderKL or CLIPTextModel) from
    OUT/<component> and restores its state. `dtype` is the compute dtype; `remat` applies to the UNet."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no meta.json in {path} (expected a folder written by the sd converter)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "diffusers_sd":
        raise CheckpointError(
            f"{path} was not written by the sd converter (meta format {meta.get('format')!r})"
        )
    component, config = meta["component"], meta["config"]
    if component == "unet":
        model = build_unet(config, lora=meta["lora"], dtype=dtype, remat=remat)
    elif component == "vae":
        model = build_vae(config, dtype=dtype)
    elif component == "text_encoder":
        model = build_text_encoder(config, dtype=dtype)
    else:
        raise CheckpointError(f"{path}: unknown component {component!r} in meta.json")
    load_converted(path, model)
    return model


# ----------------------------------------------------------------------------------------------------------
# CLI


def _run_cli(args) -> None:
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    written = convert_pipeline(args.src, args.out, components)
    for component, path in written.items():
        print(f"{component}: {path}")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "sd",
        help="diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/)",
        description="Converts a diffusers Stable Diffusion folder into NNX state, one orbax folder per component.",
    )
    parser.add_argument("--src", required=True, help="diffusers pipeline folder")
    parser.add_argument("--out", required=True, help="output folder (OUT/<component>/ is written)")
    parser.add_argument(
        "--components",
        default=",".join((*COMPONENTS, "tokenizer")),
        help="comma-separated subset of unet,vae,text_encoder,tokenizer (default: all)",
    )
    parser.set_defaults(run=_run_cli)
