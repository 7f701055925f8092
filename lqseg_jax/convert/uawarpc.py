"""UAWarpC (VGG-16 + UAWarpC head) and torchvision VGG-16: PyTorch state dicts -> our NNX modules.

Our module paths are the original names, so the tables are identities:
- refign's `alignment_backbone.features.N.{weight,bias}` and `alignment_head.*` (in `uawarpc_megadepth.ckpt`,
  an AlignmentModel Lightning checkpoint, and in every released Refign checkpoint) -> `UAWarpC`
  (`alignment_backbone`, `alignment_head`). BatchNorm running statistics are converted,
  `num_batches_tracked` is dropped; every other top-level group (the segmentation networks of a Refign
  checkpoint) is skipped and listed.
- torchvision `vgg16-397923af.pth`: `features.N.*` -> `VGG16Features` (`classifier.*` skipped).
Lightning files are read with the restricted unpickler of `lqseg_jax.convert.lightning` (no
`weights_only=False`); torchvision's plain state dict with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from lqseg_jax.convert.common import (
    CheckpointError,
    load_torch_state,
    rename_keys,
    save_converted,
    strip_prefix,
    to_numpy,
)
from lqseg_jax.convert.lightning import lightning_state_dict, load_lightning_checkpoint, skipped_globals
from lqseg_jax.convert.mit import blank_model
from lqseg_jax.models.uawarpc import UAWarpC, UAWarpCHead
from lqseg_jax.models.vgg import VGG16_WIDTHS, VGG16Features

PREFIXES = ("alignment_backbone.", "alignment_head.")
STAGE_FIRST_CONVS = (0, 5, 10, 17, 24)  # features index of each stage's first conv


def _numpy_copy(state_dict: Mapping[str, object]) -> dict[str, np.ndarray]:
    """to_numpy with copies (a later in-place torch update must not reach our arrays)."""
    return {k: np.array(v, copy=True) for k, v in to_numpy(state_dict).items()}


def _require_prefix(state_dict: Mapping[str, object], prefix: str, source: str) -> None:
    if not any(k.startswith(prefix) for k in state_dict):
        found = sorted({k.split(".")[0] for k in state_dict})
        raise CheckpointError(f"{source}: no key starts with '{prefix}' (top-level names: {found})")


def uawarpc_state(
    state_dict: Mapping[str, object], source: str = "UAWarpC checkpoint"
) -> tuple[dict, list[str]]:
    """The `alignment_backbone.*` + `alignment_head.*` keys of a refign state dict as numpy arrays (our paths
    in `UAWarpC`), and the other keys (skipped)."""
    for prefix in PREFIXES:
        _require_prefix(state_dict, prefix, source)
    kept = {k: v for k, v in state_dict.items() if k.startswith(PREFIXES)}
    skipped = sorted(k for k in state_dict if not k.startswith(PREFIXES))
    return _numpy_copy(kept), skipped


def load_uawarpc(
    model: UAWarpC, state_dict: Mapping[str, object], *, source: str = "UAWarpC checkpoint"
) -> list[str]:
    """Loads `alignment_backbone.*` and `alignment_head.*` into `model` in place; returns the skipped keys.
    Raises CheckpointError naming any missing, unexpected or mis-shaped key."""
    state, skipped = uawarpc_state(state_dict, source)
    load_torch_state(model, state, source=source)
    return skipped


def load_uawarpc_head(
    head: UAWarpCHead,
    state_dict: Mapping[str, object],
    *,
    prefix: str = "alignment_head.",
    source: str = "UAWarpC head",
) -> None:
    """Loads the head keys under `prefix` into `head` in place (strictly, as refign's `load_weights`)."""
    _require_prefix(state_dict, prefix, source)
    load_torch_state(head, _numpy_copy(strip_prefix(state_dict, prefix)), source=source)


def load_vgg16(
    vgg: VGG16Features,
    state_dict: Mapping[str, object],
    *,
    prefix: str = "",
    source: str = "VGG-16 checkpoint",
) -> list[str]:
    """Loads torchvision-named `features.N.*` keys under `prefix` (e.g. "" for vgg16-397923af.pth,
    "alignment_backbone." for refign) into `vgg`; `classifier.*` and keys outside `prefix` are skipped and
    returned."""
    _require_prefix(state_dict, prefix + "features.", source)
    outside = sorted(k for k in state_dict if not k.startswith(prefix))
    state, skipped = rename_keys(_numpy_copy(strip_prefix(state_dict, prefix)), [], skip=[r"^classifier\."])
    load_torch_state(vgg, state, source=source)
    return outside + [prefix + k for k in skipped]


def infer_vgg_widths(
    state_dict: Mapping[str, object], prefix: str = "", source: str = "VGG-16 checkpoint"
) -> tuple:
    """The five stage widths (output channels of features.{0,5,10,17,24}); VGG16_WIDTHS for the published
    network."""
    widths = []
    for idx in STAGE_FIRST_CONVS:
        key = f"{prefix}features.{idx}.weight"
        if key not in state_dict:
            raise CheckpointError(f"{source}: '{key}' is missing (cannot read the VGG-16 stage widths)")
        widths.append(int(np.shape(state_dict[key])[0]))
    return tuple(widths)


def convert_uawarpc(src: str | Path, out: str | Path, *, iterative_refinement: bool = False) -> Path:
    """`uawarpc_megadepth.ckpt` (or the alignment part of a Refign checkpoint) -> `out`: save_converted of a
    `UAWarpC` (restore with load_converted into `UAWarpC(vgg_widths=meta["vgg_widths"])`; the published
    widths are the default). Meta lists the skipped key groups and the pickled globals not rebuilt."""
    src = Path(src)
    ckpt = load_lightning_checkpoint(src)
    sd = lightning_state_dict(ckpt, str(src))
    widths = infer_vgg_widths(sd, "alignment_backbone.", str(src))
    model = blank_model(lambda: UAWarpC(iterative_refinement, vgg_widths=widths, rngs=nnx.Rngs(0)))
    skipped = load_uawarpc(model, sd, source=str(src))
    groups = sorted({k.split(".")[0] for k in skipped})
    meta = dict(
        format="uawarpc",
        source=str(src),
        layout="UAWarpC(alignment_backbone=VGG16Features, alignment_head=UAWarpCHead)",
        iterative_refinement=iterative_refinement,
        vgg_widths=list(widths),
        published_size=widths == VGG16_WIDTHS,
        not_converted=groups,
        num_skipped=len(skipped),
        pickled_globals_not_rebuilt=skipped_globals({k: v for k, v in ckpt.items() if k != "state_dict"}),
    )
    return save_converted(out, model, meta)


def convert_vgg16(src: str | Path, out: str | Path) -> Path:
    """torchvision `vgg16-397923af.pth` -> `out`: save_converted of a `VGG16Features` (widths read from the
    weights, recorded in meta)."""
    import torch

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    sd = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    widths = infer_vgg_widths(sd, "", str(src))
    model = blank_model(lambda: VGG16Features(widths, rngs=nnx.Rngs(0)))
    skipped = load_vgg16(model, sd, source=str(src))
    meta = dict(
        format="vgg16",
        source=str(src),
        layout="VGG16Features",
        widths=list(widths),
        published_size=widths == VGG16_WIDTHS,
        skipped=skipped,
    )
    return save_converted(out, model, meta)


def _run_uawarpc(args) -> None:
    print(f"wrote {convert_uawarpc(args.src, args.out, iterative_refinement=args.iterative_refinement)}")


def _run_vgg16(args) -> None:
    print(f"wrote {convert_vgg16(args.src, args.out)}")


def register_cli(subparsers) -> None:
    """`scripts/convert.py uawarpc --src CKPT --out DIR` and `scripts/convert.py vgg16 --src PTH --out DIR`."""
    p = subparsers.add_parser(
        "uawarpc",
        help="UAWarpC alignment network (uawarpc_megadepth.ckpt or a Refign checkpoint) -> UAWarpC",
        description="Converts alignment_backbone.* and alignment_head.* of a Lightning checkpoint, read with a "
        "restricted unpickler (no code from the file runs); other keys are skipped and listed in meta.json.",
    )
    p.add_argument("--src", required=True, help="Lightning .ckpt file")
    p.add_argument("--out", required=True, help="output folder (orbax state + meta.json)")
    p.add_argument(
        "--iterative-refinement",
        action="store_true",
        help="record the eval-only iterative refinement option (on in the MegaDepth configs) in meta.json",
    )
    p.set_defaults(run=_run_uawarpc)

    p = subparsers.add_parser(
        "vgg16",
        help="torchvision vgg16-397923af.pth -> VGG16Features",
        description="Converts torchvision's VGG-16 features.N.* (classifier.* skipped).",
    )
    p.add_argument("--src", required=True, help="vgg16-397923af.pth")
    p.add_argument("--out", required=True, help="output folder (orbax state + meta.json)")
    p.set_defaults(run=_run_vgg16)
