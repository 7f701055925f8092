"""RAM tagger checkpoints -> our NNX tagging path (`lqseg_jax.models.ram.RAM`), with the tag list and thresholds.

Sources (ram.md sections 2.7 and 5):
- rass.pth: the keys under `backbone.feature_extractor.ram.` (RASS's RAMLora, fp16, post-load: already
  interpolated and renamed). The keys under `backbone.feature_extractor.dape.` are recognised and skipped:
  RASS overwrites DAPE's prompt with RAM's (ram.md 1.2), so DAPE never reaches the network.
- ram_swin_large_14m.pth: upstream RAM's state dict under "model"; the head may be named `vision_multi`
  (RAM's loader renames it to `tagging_head`).

Per key of one tagger (ram_ckpt_keys.txt tags):
- USE: loaded by name (the model mirrors them; Linear/Conv layouts are transposed by `load_torch_state`);
- TIED: `tag_encoder.encoder.layer.{0,1}.{crossattention,intermediate,output}.*` are the same tensors as the
  tagging head's: checked equal, skipped;
- SKIP: every other `tag_encoder.*` and `text_decoder.*` key (Tag2Text captioning, unused by tagging);
  `tagging_head.embeddings.*` / `tagging_head.encoder.layer.N.attention.*` if present (deleted by RAM);
- BUF: `relative_position_index`, `attn_mask`, `position_ids`: recomputed, skipped;
- LORA: loralib factors on the tagging path; RAM's `lora_B` must be all zero (never trained), then dropped.
A relative_position_bias_table whose size is not (2*window-1)^2 is an error (RAM's loader interpolates it;
not implemented). Any other key, missing leaf or shape mismatch is a CheckpointError.

The tag list (`ram_tag_list.txt`, 4,585 lines) and thresholds (`ram_tag_list_threshold.txt`, 4,585 floats in
(0, 1]) are in no checkpoint: the user gives them, they are checked and copied into the output folder
(tag_list.txt, thresholds.txt) beside the weights, so a converted tagger is self-contained.

CLI: python scripts/convert.py ram --src {rass.pth | ram_swin_large_14m.pth} --tag-list ram_tag_list.txt
         --thresholds ram_tag_list_threshold.txt --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lqseg_jax.convert.common import (
    CheckpointError,
    load_converted,
    load_torch_state,
    save_converted,
    to_numpy,
)
from lqseg_jax.models.ram import RAM, RAMConfig, empty_ram, fill_abstract
from lqseg_jax.models.tracing import abstract_model

RAM_PREFIX = "backbone.feature_extractor.ram."
DAPE_PREFIX = "backbone.feature_extractor.dape."
DAPE_REASON = (
    "DAPE tagger: RASS overwrites its prompt with RAM's (ram.md 1.2), so it never reaches the network"
)
TAG_LIST_FILE = "tag_list.txt"
THRESHOLDS_FILE = "thresholds.txt"

_TIED = re.compile(r"^tag_encoder\.(encoder\.layer\.\d+\.(crossattention|intermediate|output)\..*)$")
_CAPTIONING = re.compile(r"^(tag_encoder|text_decoder)\.")
_HEAD_SELF_ATTENTION = re.compile(r"^tagging_head\.(embeddings\.|encoder\.layer\.\d+\.attention\.)")
_BUFFER = re.compile(r"(relative_position_index|attn_mask|position_ids)$")
_LORA = re.compile(r"\.lora_[AB]$")
_BIAS_TABLE = re.compile(r"^visual_encoder\.layers\.(\d+)\..*relative_position_bias_table$")


def _np(x: Any) -> np.ndarray:
    """A torch tensor (any dtype; fp16/bf16 widened to fp32, exactly) or array as numpy."""
    return to_numpy({"x": x})["x"]


def split_ram_state(
    state_dict: Mapping[str, Any], config: RAMConfig, *, source: str
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One tagger's state dict (no prefix) -> (the keys the tagging path loads, {skipped group: count}).

    Checks the tied copies, RAM's zero lora_B and the bias-table sizes (module docstring)."""
    sd = {re.sub(r"^vision_multi\.", "tagging_head.", k): v for k, v in state_dict.items()}
    report = {
        "tied tag_encoder copies (checked equal)": 0,
        "Tag2Text captioning (tag_encoder, text_decoder)": 0,
    }
    report.update({"tagging_head self-attention (deleted by RAM)": 0, "buffers (recomputed)": 0})
    report["LoRA factors (lora_B == 0)"] = 0
    keep: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        tied = _TIED.match(key)
        if tied and f"tagging_head.{tied.group(1)}" in sd and not _LORA.search(key):
            other = f"tagging_head.{tied.group(1)}"
            if not np.array_equal(_np(value), _np(sd[other])):
                raise CheckpointError(
                    f"{source}: '{key}' differs from '{other}' (RAM ties them: the same tensor expected)"
                )
            report["tied tag_encoder copies (checked equal)"] += 1
        elif _CAPTIONING.match(key):
            report["Tag2Text captioning (tag_encoder, text_decoder)"] += 1
        elif _HEAD_SELF_ATTENTION.match(key):
            report["tagging_head self-attention (deleted by RAM)"] += 1
        elif _BUFFER.search(key):
            report["buffers (recomputed)"] += 1
        elif _LORA.search(key):
            if key.endswith("lora_B") and np.any(_np(value) != 0):
                raise CheckpointError(
                    f"{source}: '{key}' is not zero: RAM's LoRA factors are never trained (lora_B == 0 "
                    "expected); a merged DAPE cannot be read as RAM"
                )
            report["LoRA factors (lora_B == 0)"] += 1
        else:
            table = _BIAS_TABLE.match(key)
            if table:
                win = config.windows[int(table.group(1))]
                if np.shape(value)[0] != (2 * win - 1) ** 2:
                    raise CheckpointError(
                        f"{source}: '{key}' has {np.shape(value)[0]} rows, expected (2*{win}-1)^2 = "
                        f"{(2 * win - 1) ** 2} (window {win}); interpolating bias tables is not implemented"
                    )
            keep[key] = value
    return keep, report


def convert_ram(
    state_dict: Mapping[str, Any], config: RAMConfig | None = None, *, source: str, progress: bool = False
) -> tuple[RAM, dict[str, int]]:
    """One tagger's state dict (no prefix) -> (RAM built from shapes and filled with it, {skipped group: count})."""
    config = config or RAMConfig()
    keep, report = split_ram_state(state_dict, config, source=source)
    model = abstract_model(lambda: RAM(config, rngs=nnx.Rngs(0)))
    load_torch_state(model, to_numpy(keep), source=source, progress=progress)
    return fill_abstract(model), report


def tagger_state(state_dict: Mapping[str, Any], *, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """A rass.pth state dict or a plain RAM one -> (RAM's keys without prefix, {skipped group: count}):
    from rass.pth the `...ram.` keys, DAPE's recognised and counted (DAPE_REASON)."""
    if any(k.startswith(RAM_PREFIX) for k in state_dict):
        ram = {k[len(RAM_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(RAM_PREFIX)}
        return ram, {f"dape ({DAPE_REASON})": sum(k.startswith(DAPE_PREFIX) for k in state_dict)}
    if "label_embed" not in state_dict:
        raise CheckpointError(
            f"{source}: neither '{RAM_PREFIX}*' keys (rass.pth) nor RAM's 'label_embed' (ram_swin_large_14m.pth); "
            f"first keys {sorted(state_dict)[:5]}"
        )
    return dict(state_dict), {}


# ----------------------------------------------------------------------------------------------------------
# Tag list and thresholds


def read_tag_list(path: str | Path, num_tags: int) -> list[str]:
    """RAM's tag list: one tag per line (read with splitlines, as RAM does), `num_tags` of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tag list {path} does not exist")
    tags = path.read_text(encoding="utf-8").splitlines()
    if len(tags) != num_tags:
        raise ValueError(f"tag list {path}: {len(tags)} lines, expected {num_tags} (RAM's ram_tag_list.txt)")
    empty = [i for i, t in enumerate(tags) if not t.strip()]
    if empty:
        raise ValueError(f"tag list {path}: empty tag on line {empty[0] + 1}")
    return tags


def read_thresholds(path: str | Path, num_tags: int) -> np.ndarray:
    """RAM's per-class thresholds: `num_tags` floats in (0, 1], one per line; float32 (num_tags,)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file {path} does not exist")
    lines = path.read_text().splitlines()
    if len(lines) != num_tags:
        raise ValueError(
            f"thresholds {path}: {len(lines)} lines, expected {num_tags} (ram_tag_list_threshold.txt)"
        )
    values = []
    for i, line in enumerate(lines):
        try:
            v = float(line)
        except ValueError:
            raise ValueError(f"thresholds {path}: line {i + 1} is {line!r}, not a float") from None
        if not 0.0 < v <= 1.0:
            raise ValueError(f"thresholds {path}: line {i + 1} is {v}, expected a float in (0, 1]")
        values.append(v)
    return np.asarray(values, np.float32)


# ----------------------------------------------------------------------------------------------------------
# Converted folder


def save_ram(
    out: str | Path, model: RAM, tag_list: Sequence[str], thresholds: np.ndarray, meta: Mapping[str, Any]
) -> Path:
    """OUT/state + meta.json (format "ram", the RAMConfig) + tag_list.txt + thresholds.txt."""
    out = Path(out)
    config = dataclasses.asdict(model.config)
    save_converted(out, model, {**meta, "format": "ram", "config": config})
    (out / TAG_LIST_FILE).write_text("\n".join(tag_list), encoding="utf-8")
    (out / THRESHOLDS_FILE).write_text("\n".join(repr(float(t)) for t in thresholds))
    return out


def load_ram(path: str | Path, *, dtype=jnp.float32) -> tuple[RAM, list[str], np.ndarray]:
    """A `save_ram` folder -> (RAM with its weights, tag list, thresholds (K,) float32)."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no meta.json in {path} (expected a folder written by `convert.py ram`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "ram":
        raise CheckpointError(
            f"{path} was not written by the RAM converter (meta format {meta.get('format')!r})"
        )
    config = RAMConfig(**meta["config"])
    model = empty_ram(config, dtype=dtype)
    load_converted(path, model)
    return (
        model,
        read_tag_list(path / TAG_LIST_FILE, config.num_classes),
        read_thresholds(path / THRESHOLDS_FILE, config.num_classes),
    )


def convert_file(
    src: str | Path,
    out: str | Path,
    tag_list: str | Path,
    thresholds: str | Path,
    config: RAMConfig | None = None,
    *,
    trust_pickle: bool = False,
    state_dict: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """A checkpoint holding a RAM tagger -> OUT (save_ram); returns the skipped-key report. `state_dict`, when
    given, is the already-read checkpoint `src` names."""
    from lqseg_jax.convert.mask2former import _load_checkpoint

    config = config or RAMConfig()
    tags = read_tag_list(tag_list, config.num_classes)
    thr = read_thresholds(thresholds, config.num_classes)
    sd = state_dict if state_dict is not None else _load_checkpoint(Path(src), trust_pickle)
    ram_sd, report = tagger_state(sd, source=str(src))
    model, ram_report = convert_ram(ram_sd, config, source=str(src), progress=True)
    report.update(ram_report)
    meta = {"source": str(src), "tag_list": str(tag_list), "thresholds": str(thresholds), "skipped": report}
    save_ram(out, model, tags, thr, meta)
    return report


def add_tag_file_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--tag-list", required=required, help="RAM's ram_tag_list.txt (4,585 tags, one per line)")
    p.add_argument(
        "--thresholds", required=required, help="RAM's ram_tag_list_threshold.txt (4,585 floats in (0, 1])"
    )


def _run(args: argparse.Namespace) -> None:
    report = convert_file(args.src, args.out, args.tag_list, args.thresholds, trust_pickle=args.trust_pickle)
    print(f"converted the RAM tagger of {args.src} -> {args.out} (with {TAG_LIST_FILE}, {THRESHOLDS_FILE})")
    for group, n in report.items():
        print(f"  skipped {n:6d} keys: {group}")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "ram",
        help="the RAM tagger (from rass.pth or ram_swin_large_14m.pth) + tag list + thresholds (orbax)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--src", required=True, help="rass.pth or ram_swin_large_14m.pth")
    p.add_argument("--out", required=True, help="output folder")
    add_tag_file_args(p, required=True)
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of the checkpoint")
    p.set_defaults(run=_run)
