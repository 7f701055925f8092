"""The released RASS checkpoint (`rass.pth`, a detectron2 pickle with the state dict under "model") -> our
NNX state (rass.md section 6).

Key mapping (everything else is mechanical, `lqseg_jax.convert.common.load_torch_state`, into the module
tree of `lqseg_jax.models.rass_backbone.RASS`, which mirrors the checkpoint's names):
- backbone.feature_extractor.sd.unet.*: diffusers names; the adapted layers are peft's
  `<name>.base_layer.{weight,bias}` (the SCR restoration LoRA already merged in: scr.pkl is not released)
  plus `<name>.lora_{A,B}.default_{encoder,decoder,others}_s2.weight`, loaded into the model's own stage-2
  adapters (rank and alpha from the config: 4 and peft's default 8).
- backbone.feature_extractor.sd.vae.{encoder,quant_conv}.*: as they are (pre-0.14 diffusers attention names
  renamed); decoder.* and post_quant_conv.* skipped (never run).
- backbone.feature_extractor.feature_projections.{0..5}.0.*: as they are.
- sem_seg_head.*: as they are; criterion.empty_weight is checked against the config.
- backbone.feature_extractor.sd.text_encoder.text_model.*: a separate CLIPTextModel (the system's frozen
  prompt encoder; not in the model tree).
- skipped and reported: backbone.feature_extractor.ram.*, backbone.feature_extractor.dape.* (the taggers),
  backbone.jpeger.* (the degradation's JPEG tables).
Any other key, any missing leaf or any shape mismatch is a CheckpointError naming it.

Output: OUT/model (save_converted; meta format "rass") and OUT/text_encoder (the `convert.py sd` component
format, so `load_sd_component` reads it). With --tag-list and --thresholds (RAM's ram_tag_list.txt and
ram_tag_list_threshold.txt, in no checkpoint) also OUT/ram: the RAM tagger from the ram.* keys, with the tag
files (lqseg_jax/convert/ram.py; config.prompt.ram.model sizes it), for prompt mode "ram". The checkpoint
holds no tokenizer: evaluation takes the SD 2.1 tokenizer folder from `config.model.tokenizer`.

CLI: python scripts/convert.py rass --src rass.pth --out DIR [--config configs/rass.py]
         [--tag-list ram_tag_list.txt --thresholds ram_tag_list_threshold.txt]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from lqseg_jax.convert.common import load_torch_state, rename_keys, save_converted, to_numpy
from lqseg_jax.convert.diffusers_sd import convert_text_encoder, save_component
from lqseg_jax.convert.mask2former import _check_empty_weight, _load_checkpoint
from lqseg_jax.models.rass_backbone import RASS
from lqseg_jax.models.tracing import abstract_model
from lqseg_jax.systems.rass import model_config

FE = r"^backbone\.feature_extractor\."
TEXT_PREFIX = "backbone.feature_extractor.sd.text_encoder."
SKIPPED_GROUPS: dict[str, str] = {
    "ram (RAM tagger)": FE + r"ram\.",
    "dape (DAPE tagger)": FE + r"dape\.",
    "jpeger (degradation JPEG)": r"^backbone\.jpeger\.",
    "sd.vae.decoder": FE + r"sd\.vae\.decoder\.",
    "sd.vae.post_quant_conv": FE + r"sd\.vae\.post_quant_conv\.",
}
VAE_RULES = tuple(
    (FE + r"(sd\.vae\..*attentions\.\d+)\." + old + r"\.", r"backbone.feature_extractor.\1." + new + ".")
    for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))
)


def convert_rass(
    state_dict: Mapping[str, Any], config, *, source: str = "rass.pth", progress: bool = False
) -> tuple[Any, Any, dict[str, int]]:
    """A RASS state dict (the checkpoint's "model") -> (abstract-built RASS model filled with it, CLIP text
    encoder, {skipped group: number of keys}). `config` is an experiment config (configs/rass.py)."""
    sd = to_numpy(state_dict)
    mc = model_config(config)
    _check_empty_weight(sd, mc.head.num_classes, mc.head.no_object_weight, source)
    text_sd = {k[len(TEXT_PREFIX) :]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    if not text_sd:
        raise ValueError(
            f"{source}: no '{TEXT_PREFIX}*' keys: not a RASS checkpoint (first keys {sorted(sd)[:5]})"
        )
    rest = {k: v for k, v in sd.items() if not k.startswith(TEXT_PREFIX) and k != "criterion.empty_weight"}
    renamed, skipped = rename_keys(rest, VAE_RULES, skip=tuple(SKIPPED_GROUPS.values()))
    report = {
        group: sum(1 for k in skipped if re.search(pattern, k)) for group, pattern in SKIPPED_GROUPS.items()
    }
    model = abstract_model(lambda: RASS(mc, rngs=nnx.Rngs(0)))
    load_torch_state(model, renamed, source=source, progress=progress)
    text_encoder = convert_text_encoder(
        text_sd, config.model.text_encoder.to_dict(), source=f"{source} [{TEXT_PREFIX}*]", progress=progress
    )
    return model, text_encoder, report


def convert_file(
    src: str | Path,
    out: str | Path,
    config,
    *,
    trust_pickle: bool = False,
    tag_list: str | Path | None = None,
    thresholds: str | Path | None = None,
) -> dict[str, int]:
    """rass.pth -> OUT/model + OUT/text_encoder (+ OUT/ram with the tag files); returns the skipped-key
    report (with the tagger's, under "ram: ...", when converted)."""
    from lqseg_jax.convert import ram as ram_convert
    from lqseg_jax.models.ram import RAMConfig

    if (tag_list is None) != (thresholds is None):
        raise ValueError(
            "give both --tag-list and --thresholds (RAM's tag files) to convert the tagger, or neither"
        )
    if tag_list is not None:  # the tag files are checked before the long conversion
        ram_config = RAMConfig(**config.prompt.ram.model.to_dict())
        ram_convert.read_tag_list(tag_list, ram_config.num_classes)
        ram_convert.read_thresholds(thresholds, ram_config.num_classes)
    sd = _load_checkpoint(Path(src), trust_pickle)
    model, text_encoder, report = convert_rass(sd, config, source=str(src), progress=True)
    out = Path(out)
    if tag_list is not None:  # the tagger's own groups; DAPE is already counted above
        ram_report = ram_convert.convert_file(
            src, out / "ram", tag_list, thresholds, ram_config, state_dict=sd
        )
        report.update({f"ram: {group}": n for group, n in ram_report.items() if not group.startswith("dape")})
    save_converted(
        out / "model",
        model,
        {"format": "rass", "source": str(src), "config": config.model.to_dict(), "skipped": report},
    )
    save_component(
        out / "text_encoder", "text_encoder", text_encoder, config.model.text_encoder.to_dict(), str(src)
    )
    return report


def _run(args: argparse.Namespace) -> None:
    from lqseg_jax.train.config import load_config

    config = load_config(args.config)
    report = convert_file(
        args.src,
        args.out,
        config,
        trust_pickle=args.trust_pickle,
        tag_list=args.tag_list,
        thresholds=args.thresholds,
    )
    tagger = f" and {args.out}/ram" if args.tag_list else ""
    print(f"converted {args.src} -> {args.out}/model and {args.out}/text_encoder{tagger}")
    for group, n in report.items():
        print(f"  skipped {n:6d} keys of {group}")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "rass",
        help="the released RASS checkpoint (rass.pth) -> model + text encoder (orbax)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--src", required=True, help="rass.pth (detectron2 checkpoint)")
    p.add_argument("--out", required=True, help="output folder (OUT/model, OUT/text_encoder)")
    p.add_argument("--config", default="configs/rass.py", help="experiment config[:variant] the weights fit")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of the checkpoint")
    p.add_argument(
        "--tag-list", help="RAM's ram_tag_list.txt (4,585 tags): also convert the tagger to OUT/ram"
    )
    p.add_argument(
        "--thresholds", help="RAM's ram_tag_list_threshold.txt (4,585 floats in (0, 1]), with --tag-list"
    )
    p.set_defaults(run=_run)
