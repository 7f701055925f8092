"""Mask2Former head converters: detectron2 / RASS (`sem_seg_head.*`) and transformers' Mask2Former.

Our `Mask2FormerHead` mirrors detectron2's `sem_seg_head` (pixel_decoder + predictor), so the detectron2
converter only strips the prefix; `torch.nn.MultiheadAttention.in_proj_weight` is transposed by the
module's `from_torch`. transformers' `Mask2FormerForUniversalSegmentation` renames most modules and
splits attention into q/k/v projections; `convert_transformers` fuses and renames them onto the same
names. Both verify `criterion.empty_weight` and raise CheckpointError on any missing, unexpected or
mis-shaped key.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lqseg_jax.convert.common import (
    CheckpointError,
    load_safetensors,
    load_torch_state,
    rename_keys,
    save_converted,
    to_numpy,
    torch_load,
)

DETECTRON2_PREFIX = "sem_seg_head."

_PD = r"^model\.pixel_level_module\.decoder\."
_TM = r"^model\.transformer_module\."
_DL = _TM + r"decoder\.layers\.(\d+)\."
TRANSFORMERS_RULES: tuple[tuple[str, str], ...] = (
    (_PD + r"input_projections\.", "pixel_decoder.input_proj."),
    (_PD + r"level_embed$", "pixel_decoder.transformer.level_embed"),
    (_PD + r"encoder\.layers\.(\d+)\.self_attn\.", r"pixel_decoder.transformer.encoder.layers.\1.self_attn."),
    (
        _PD + r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.",
        r"pixel_decoder.transformer.encoder.layers.\1.norm1.",
    ),
    (_PD + r"encoder\.layers\.(\d+)\.fc1\.", r"pixel_decoder.transformer.encoder.layers.\1.linear1."),
    (_PD + r"encoder\.layers\.(\d+)\.fc2\.", r"pixel_decoder.transformer.encoder.layers.\1.linear2."),
    (
        _PD + r"encoder\.layers\.(\d+)\.final_layer_norm\.",
        r"pixel_decoder.transformer.encoder.layers.\1.norm2.",
    ),
    (_PD + r"mask_projection\.", "pixel_decoder.mask_features."),
    (_PD + r"(adapter|layer)_(\d+)\.0\.", r"pixel_decoder.\1_\2."),  # Sequential(conv, GN) -> Conv2d(norm=GN)
    (_PD + r"(adapter|layer)_(\d+)\.1\.", r"pixel_decoder.\1_\2.norm."),
    (_TM + r"queries_embedder\.", "predictor.query_embed."),
    (_TM + r"queries_features\.", "predictor.query_feat."),
    (_TM + r"level_embed\.", "predictor.level_embed."),
    (_TM + r"input_projections\.", "predictor.input_proj."),
    (_DL + r"self_attn\.", r"predictor.transformer_self_attention_layers.\1.self_attn."),
    (_DL + r"self_attn_layer_norm\.", r"predictor.transformer_self_attention_layers.\1.norm."),
    (_DL + r"cross_attn\.", r"predictor.transformer_cross_attention_layers.\1.multihead_attn."),
    (_DL + r"cross_attn_layer_norm\.", r"predictor.transformer_cross_attention_layers.\1.norm."),
    (_DL + r"fc1\.", r"predictor.transformer_ffn_layers.\1.linear1."),
    (_DL + r"fc2\.", r"predictor.transformer_ffn_layers.\1.linear2."),
    (_DL + r"final_layer_norm\.", r"predictor.transformer_ffn_layers.\1.norm."),
    (_TM + r"decoder\.layernorm\.", "predictor.decoder_norm."),
    (_TM + r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.", r"predictor.mask_embed.layers.\1."),
    (r"^class_predictor\.", "predictor.class_embed."),
)
TRANSFORMERS_SKIP = (r"^model\.pixel_level_module\.encoder\.", r"^criterion\.empty_weight$")
_QKV = re.compile(_DL + r"self_attn\.([qkv])_proj\.(weight|bias)$")


def _check_empty_weight(sd: Mapping[str, np.ndarray], num_classes: int, no_object_weight: float, source: str):
    """The criterion's class weights (1 per class, `no_object_weight` last) must fit the config."""
    if "criterion.empty_weight" not in sd:
        return
    found = np.asarray(sd["criterion.empty_weight"], np.float32)
    expected = np.ones(num_classes + 1, np.float32)
    expected[-1] = no_object_weight
    if found.shape != expected.shape or not np.allclose(found, expected):
        raise CheckpointError(
            f"{source}: 'criterion.empty_weight' has shape {found.shape} (last {found[-1:]}), but the config "
            f"expects {num_classes} classes + no-object weight {no_object_weight}"
        )


def convert_detectron2(head, state_dict: Mapping[str, Any], *, source: str = "detectron2") -> list[str]:
    """Loads the `sem_seg_head.*` keys of a detectron2 Mask2Former / RASS state dict into `head` in place.

    Keys outside `sem_seg_head.` (backbone, criterion) are not the head's and are returned as ignored;
    `criterion.empty_weight`, if present, is checked against the config.
    """
    sd = to_numpy(state_dict)
    head_sd = {k[len(DETECTRON2_PREFIX) :]: v for k, v in sd.items() if k.startswith(DETECTRON2_PREFIX)}
    if not head_sd:
        raise CheckpointError(f"{source}: no '{DETECTRON2_PREFIX}*' keys (first keys: {sorted(sd)[:5]})")
    _check_empty_weight(sd, head.cfg.num_classes, head.cfg.no_object_weight, source)
    load_torch_state(head, head_sd, source=source)
    return sorted(k for k in sd if not k.startswith(DETECTRON2_PREFIX))


def _fuse_qkv(sd: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """q_proj/k_proj/v_proj of the decoder self-attention -> torch MultiheadAttention in_proj_{weight,bias}."""
    out, groups = {}, {}
    for key, value in sd.items():
        m = _QKV.match(key)
        if m is None:
            out[key] = value
        else:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
    for (layer, leaf), parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                f"{source}: decoder layer {layer} self_attn {leaf} has projections {sorted(parts)}, expected q, k, v"
            )
        fused = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
        out[f"model.transformer_module.decoder.layers.{layer}.self_attn.in_proj_{leaf}"] = fused
    return out


def convert_transformers(head, state_dict: Mapping[str, Any], *, source: str = "transformers") -> list[str]:
    """Loads a transformers Mask2FormerForUniversalSegmentation state dict (backbone skipped) into `head`.

    Returns the skipped keys (the backbone and criterion.empty_weight, which is checked).
    """
    sd = to_numpy(state_dict)
    _check_empty_weight(sd, head.cfg.num_classes, head.cfg.no_object_weight, source)
    renamed, skipped = rename_keys(_fuse_qkv(sd, source), TRANSFORMERS_RULES, skip=TRANSFORMERS_SKIP)
    load_torch_state(head, renamed, source=source)
    return skipped


def _load_checkpoint(path: Path, trust_pickle: bool) -> dict[str, Any]:
    """A state dict from .safetensors, .pth/.pt/.bin (torch) or .pkl (detectron2 model zoo)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix == ".pkl":
        if not trust_pickle:
            raise CheckpointError(f"{path} is a pickle; pass --trust-pickle if you trust its origin")
        import pickle

        with path.open("rb") as f:
            try:
                obj = pickle.load(f, encoding="latin1")
            except Exception as e:
                raise CheckpointError(
                    f"{path.absolute()} could not be unpickled ({type(e).__name__}: {e}); expected a detectron2 .pkl"
                ) from e
    else:
        obj = torch_load(path, trust_pickle=trust_pickle)
    return obj.get("model", obj) if isinstance(obj, dict) else obj


def _run(args: argparse.Namespace) -> None:
    from flax import nnx

    from lqseg_jax.models.mask2former import Mask2FormerHead, rass_config

    overrides = {}
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if args.in_channels is not None:
        overrides["in_channels"] = tuple(int(c) for c in args.in_channels.split(","))
    cfg = rass_config(**overrides)
    src, out_dir = _src_and_out(args)
    head = nnx.eval_shape(lambda: Mask2FormerHead(cfg, nnx.Rngs(0)))  # abstract: filled by the checkpoint
    sd = _load_checkpoint(Path(src), args.trust_pickle)
    convert = convert_detectron2 if args.source_format == "detectron2" else convert_transformers
    ignored = convert(head, sd, source=str(src))
    out = save_converted(
        out_dir, head, {"source": str(src), "format": args.source_format, "config": dataclasses.asdict(cfg)}
    )
    print(f"converted {src} -> {out} ({len(ignored)} keys outside the head ignored)")


def _src_and_out(args: argparse.Namespace) -> tuple[str, str]:
    """--src and --out, or the deprecated positional CHECKPOINT OUT (with a note on stderr)."""
    if args.legacy:
        if args.src is not None or args.out is not None or len(args.legacy) != 2:
            raise ValueError(
                f"convert.py mask2former: unexpected arguments {args.legacy}; expected --src CHECKPOINT --out OUT"
            )
        print(
            "note: `convert.py mask2former CHECKPOINT OUT` is deprecated; use --src CHECKPOINT --out OUT",
            file=sys.stderr,
        )
        return args.legacy[0], args.legacy[1]
    if args.src is None or args.out is None:
        raise ValueError("convert.py mask2former: --src CHECKPOINT and --out OUT are required")
    return args.src, args.out


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "mask2former",
        help="Mask2Former head (detectron2/RASS sem_seg_head.* or transformers) -> orbax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--src", help=".pth/.pkl (detectron2, RASS) or .safetensors/.bin (transformers)")
    p.add_argument("--out", help="output folder (orbax state + meta.json)")
    p.add_argument("legacy", nargs="*", help=argparse.SUPPRESS)  # deprecated: CHECKPOINT OUT
    p.add_argument("--source-format", choices=("detectron2", "transformers"), default="detectron2")
    p.add_argument("--num-classes", type=int, default=None, help="default: 150 (ADE20K, RASS)")
    p.add_argument(
        "--in-channels", default=None, help="res2..res5 channels, e.g. 64,128,320,512 (default 512s)"
    )
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of the checkpoint")
    p.set_defaults(run=_run)
