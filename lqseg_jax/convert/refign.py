"""Refign's released Lightning checkpoints (refign.md section 11; every key and shape in
refign_ckpt_keys.txt) -> one save_converted folder of a `UDAModel`.

`ckpt["state_dict"]` of `refign_daformer_*.ckpt` holds 3688 tensors in seven groups, the attribute names of
refign's DomainAdaptationSegmentationModel and so of our UDAModel: the student `backbone.*` (MiT) and
`head.*` (DAFormer head), the EMA teacher `m_backbone.*` / `m_head.*`, the frozen ImageNet encoder
`imnet_backbone.*`, and the frozen alignment network `alignment_backbone.*` (VGG-16) / `alignment_head.*`
(UAWarpC head). HRDA* checkpoints add the scale attention `hrda_scale_attention.*` and its EMA copy
`m_hrda_scale_attention.*` (3720 tensors). Our module paths are the original names, so the tables are
identities plus the layout transposes of convert/common.py.

The MiT preset, the class count, the head widths, the scale attention's width, the VGG-16 widths and which
optional groups exist are read from the weights and written in meta.json (format "refign-uda"), with what
was skipped: the Lightning bookkeeping entries beside `state_dict` (epoch, global_step, loops, callbacks,
optimizer_states, lr_schedulers, ...), every `num_batches_tracked` buffer, and any state_dict key outside
the groups. The file is read with the restricted unpickler of convert/lightning.py (no pickled code runs;
`--trust-pickle` uses torch.load(weights_only=False) instead).

`load_refign_converted(model, path)` restores such a folder into a UDAModel built from a config, after
checking meta.json against the model (one line naming the config field that differs). Groups the model does
not have (the ImageNet encoder without the feature distance, the alignment network without Refign's
alignment) are not restored and listed in the returned meta's `not_restored`.

    python scripts/convert.py refign --src refign_daformer_acdc.ckpt --out DIR
    python scripts/convert.py refign --src CKPT --out DIR --student-only   # EncoderDecoder (backbone, head)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval

from lqseg_jax.convert.common import (
    IGNORED_TORCH_LEAVES,
    SAVED,
    CheckpointError,
    _check_converted_shapes,
    load_torch_state,
    save_converted,
    strip_prefix,
    to_numpy,
    torch_load,
)
from lqseg_jax.convert.lightning import load_lightning_checkpoint, skipped_globals
from lqseg_jax.convert.mit import infer_mit_preset, load_daformer_head, load_mit
from lqseg_jax.convert.uawarpc import STAGE_FIRST_CONVS, infer_vgg_widths, load_uawarpc
from lqseg_jax.models.daformer_head import DAFormerHead
from lqseg_jax.models.hrda import SegFormerHead
from lqseg_jax.models.mit import MIT_PRESETS, MixVisionTransformer
from lqseg_jax.models.segmentor import EncoderDecoder
from lqseg_jax.models.uawarpc import UAWarpC
from lqseg_jax.systems.uda import UDAModel

FORMAT = "refign-uda"
STUDENT = ("backbone", "head")
TEACHER = ("m_backbone", "m_head")
IMNET = "imnet_backbone"
SCALE_ATTENTION = ("hrda_scale_attention", "m_hrda_scale_attention")
ALIGNMENT = ("alignment_backbone", "alignment_head")
GROUPS = (*STUDENT, *TEACHER, IMNET, *SCALE_ATTENTION, *ALIGNMENT)  # UDAModel's attributes, refign's names
M = TypeVar("M", bound=nnx.Module)


@contextlib.contextmanager
def _no_tracer_origin_messages() -> Iterator[None]:
    """nnx.eval_shape of a large module is quadratic in its number of variables (jax 0.10, flax 0.12): each
    Rngs draw updates a traced count, flax's Variable.set_value reads the tracer's `sharding` for that, and jax
    builds the AttributeError's message by scanning the whole trace for the tracer's origin. The message is
    never shown (getattr's default swallows the error), so it is skipped here: MiT-B5 takes 5 s instead of
    ~250 s on a loaded 2-core CPU."""
    original = partial_eval.DynamicJaxprTracer._origin_msg
    partial_eval.DynamicJaxprTracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        partial_eval.DynamicJaxprTracer._origin_msg = original


def abstract_module(make: Callable[[], M]) -> M:
    """nnx.eval_shape(make): the module with ShapeDtypeStruct leaves, nothing initialised (a checkpoint fills
    them), built in time linear in its size."""
    with _no_tracer_origin_messages():
        return nnx.eval_shape(make)


# --------------------------------------------------------------------------------------------- reading
def read_refign_checkpoint(src: Path, trust_pickle: bool) -> tuple[Mapping, Mapping[str, Any]]:
    """(checkpoint dict, its `state_dict`), through the restricted unpickler unless `trust_pickle`."""
    if trust_pickle:
        if not src.is_file():
            raise FileNotFoundError(f"checkpoint not found: {src.absolute()}")
        ckpt = torch_load(src, trust_pickle=True)
    else:
        ckpt = load_lightning_checkpoint(src)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        found = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{src}: expected a Lightning checkpoint with 'state_dict', found {found}")
    return ckpt, ckpt["state_dict"]


def _groups(state_dict: Mapping[str, Any]) -> set[str]:
    return {k.split(".")[0] for k in state_dict}


def _require(state_dict: Mapping[str, Any], groups: tuple[str, ...], source: str) -> None:
    found = _groups(state_dict)
    for group in groups:
        if group not in found:
            raise CheckpointError(
                f"{source}: no key starts with '{group}.' (top-level names: {sorted(found)})"
            )


def _pair(state_dict: Mapping[str, Any], pair: tuple[str, str], source: str) -> bool:
    """Whether the optional pair of groups is present; one without the other is an error."""
    present = [g in _groups(state_dict) for g in pair]
    if present[0] != present[1]:
        have, lack = (pair[0], pair[1]) if present[0] else (pair[1], pair[0])
        raise CheckpointError(f"{source}: '{have}.*' is present but '{lack}.*' is missing")
    return present[0]


def _shape(state_dict: Mapping[str, Any], key: str, source: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"{source}: '{key}' is missing (cannot read {what})")
    return tuple(int(n) for n in np.shape(state_dict[key]))


def network_layout(state_dict: Mapping[str, Any], prefixes: tuple[str, str], source: str) -> dict[str, Any]:
    """MiT preset, class count and head widths of the MiT + DAFormer head under (backbone, head) prefixes."""
    bb, head = prefixes
    preset = infer_mit_preset(state_dict, f"{bb}.")
    num_classes, channels = _shape(state_dict, f"{head}.conv_seg.weight", source, "the number of classes")[:2]
    bias = _shape(state_dict, f"{head}.conv_seg.bias", source, "the number of classes")
    if bias != (num_classes,):
        raise CheckpointError(
            f"{source}: '{head}.conv_seg.weight' has {num_classes} classes but '{head}.conv_seg.bias' has "
            f"shape {bias}; expected ({num_classes},)"
        )
    embed_dims = _shape(
        state_dict, f"{head}.embed_layers.0.proj.weight", source, "the head's embedding width"
    )[0]
    return dict(
        backbone=f"mit_{preset}", num_classes=num_classes, head_channels=channels, head_embed_dims=embed_dims
    )


def refign_layout(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Everything the UDAModel needs, read from the weights: the student's layout (the teacher's and the
    ImageNet encoder's must agree), hrda / scale_attention_channels, imnet, alignment / vgg_widths."""
    _require(state_dict, (*STUDENT, *TEACHER), source)
    layout = network_layout(state_dict, STUDENT, source)
    teacher = network_layout(state_dict, TEACHER, source)
    if teacher != layout:
        raise CheckpointError(
            f"{source}: the EMA teacher (m_backbone, m_head) is {teacher}, the student {layout}"
        )
    layout["imnet"] = IMNET in _groups(state_dict)
    if layout["imnet"] and f"mit_{infer_mit_preset(state_dict, f'{IMNET}.')}" != layout["backbone"]:
        raise CheckpointError(
            f"{source}: imnet_backbone is mit_{infer_mit_preset(state_dict, f'{IMNET}.')}, the student's "
            f"backbone {layout['backbone']}"
        )
    layout["hrda"] = _pair(state_dict, SCALE_ATTENTION, source)
    layout["scale_attention_channels"] = None
    if layout["hrda"]:
        key = f"{SCALE_ATTENTION[0]}.linear_pred.weight"
        classes, channels = _shape(state_dict, key, source, "the scale attention's width")[:2]
        if classes != layout["num_classes"]:
            raise CheckpointError(
                f"{source}: '{key}' has {classes} classes, the head {layout['num_classes']}"
            )
        layout["scale_attention_channels"] = channels
    layout["alignment"] = _pair(state_dict, ALIGNMENT, source)
    layout["vgg_widths"] = (
        list(infer_vgg_widths(state_dict, f"{ALIGNMENT[0]}.", source)) if layout["alignment"] else None
    )
    return layout


def skipped_report(ckpt: Mapping, state_dict: Mapping[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    """What a conversion that used the groups `used` leaves out: the Lightning bookkeeping entries, the
    pickled globals not rebuilt, the `num_batches_tracked` buffers of the used groups, and every other key."""
    unused = sorted(k for k in state_dict if k.split(".")[0] not in used)
    tracked = sorted(
        k for k in state_dict if k.split(".")[0] in used and k.rsplit(".", 1)[-1] in IGNORED_TORCH_LEAVES
    )
    return dict(
        bookkeeping=sorted(str(k) for k in ckpt if k != "state_dict"),
        pickled_globals_not_rebuilt=skipped_globals({k: v for k, v in ckpt.items() if k != "state_dict"}),
        num_batches_tracked=tracked,
        unused_keys=unused,
    )


def _print_skipped(skipped: Mapping[str, Any]) -> None:
    unused = skipped["unused_keys"]
    groups = sorted({k.split(".")[0] for k in unused})
    print(f"skipped Lightning bookkeeping: {', '.join(skipped['bookkeeping']) or 'none'}")
    print(f"skipped {len(skipped['num_batches_tracked'])} num_batches_tracked buffers")
    print(
        f"skipped {len(unused)} unused state_dict keys"
        + (f" (groups: {', '.join(groups)})" if groups else "")
    )
    if skipped["pickled_globals_not_rebuilt"]:
        print(f"pickled objects not rebuilt: {', '.join(skipped['pickled_globals_not_rebuilt'])}")


# -------------------------------------------------------------------------------------------- building
def _network(layout: Mapping[str, Any]) -> EncoderDecoder:
    """An abstract (nnx.eval_shape) MiT + DAFormer head of `layout`: the checkpoint fills every leaf."""
    embed = MIT_PRESETS[layout["backbone"].removeprefix("mit_")]["embed_dims"]
    return abstract_module(
        lambda: EncoderDecoder(
            MixVisionTransformer.from_preset(layout["backbone"], rngs=nnx.Rngs(0)),
            DAFormerHead(
                embed,
                layout["num_classes"],
                channels=layout["head_channels"],
                embed_dims=layout["head_embed_dims"],
                rngs=nnx.Rngs(0),
            ),
        )
    )


def _numpy_copy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """to_numpy with copies (a later in-place torch update must not reach our arrays)."""
    return {k: np.array(v, copy=True) for k, v in to_numpy(state_dict).items()}


def load_refign_network(
    net: EncoderDecoder, state_dict: Mapping[str, Any], prefixes: tuple[str, str], source: str
) -> list[str]:
    """Loads the MiT + DAFormer head under (backbone, head) prefixes into `net`; returns the MiT keys skipped
    (an ImageNet classifier `<backbone>.head.*`, if any)."""
    bb, head = prefixes
    skipped = load_mit(net.backbone, strip_prefix(state_dict, f"{bb}."), source=f"{source} [{bb}.*]")
    load_daformer_head(net.head, state_dict, prefix=f"{head}.", source=f"{source} [{head}.*]")
    return [f"{bb}.{k}" for k in skipped]


def refign_model(
    state_dict: Mapping[str, Any], layout: Mapping[str, Any], source: str
) -> tuple[UDAModel, list]:
    """The UDAModel holding every group of a refign state dict (abstract modules filled from the checkpoint,
    so nothing is initialised); returns it and the MiT keys skipped inside the groups."""
    student, teacher = _network(layout), _network(layout)
    skipped = load_refign_network(student, state_dict, STUDENT, source)
    skipped += load_refign_network(teacher, state_dict, TEACHER, source)
    imnet = None
    if layout["imnet"]:
        imnet = abstract_module(
            lambda: MixVisionTransformer.from_preset(layout["backbone"], rngs=nnx.Rngs(0))
        )
        skipped += [
            f"{IMNET}.{k}"
            for k in load_mit(imnet, strip_prefix(state_dict, f"{IMNET}."), source=f"{source} [{IMNET}.*]")
        ]
    attention = None
    if layout["hrda"]:
        embed = MIT_PRESETS[layout["backbone"].removeprefix("mit_")]["embed_dims"]
        attention = tuple(
            abstract_module(
                lambda: SegFormerHead(
                    embed,
                    layout["num_classes"],
                    channels=layout["scale_attention_channels"],
                    rngs=nnx.Rngs(0),
                )
            )
            for _ in SCALE_ATTENTION
        )
        for module, group in zip(attention, SCALE_ATTENTION):
            load_torch_state(
                module, _numpy_copy(strip_prefix(state_dict, f"{group}.")), source=f"{source} [{group}.*]"
            )
    alignment = None
    if layout["alignment"]:
        widths = tuple(layout["vgg_widths"])
        alignment = abstract_module(lambda: UAWarpC(False, vgg_widths=widths, rngs=nnx.Rngs(0)))
        load_uawarpc(alignment, state_dict, source=f"{source} [alignment_*]")
    return UDAModel(student, teacher, imnet, attention, alignment), skipped


# ------------------------------------------------------------------------------------------ converting
def convert_refign(src: str | Path, out: str | Path, *, trust_pickle: bool = False) -> Path:
    """A whole refign Lightning checkpoint -> `out`: save_converted of a UDAModel (every group present in
    the file) + meta.json (format "refign-uda", the layout read from the weights, what was skipped).
    Restore with `load_refign_converted`."""
    src = Path(src)
    ckpt, sd = read_refign_checkpoint(src, trust_pickle)
    layout = refign_layout(sd, str(src))
    model, skipped_mit = refign_model(sd, layout, str(src))
    groups = [g for g in GROUPS if getattr(model, g) is not None]
    skipped = skipped_report(ckpt, sd, tuple(groups))
    skipped["unused_keys"] = sorted(skipped["unused_keys"] + skipped_mit)
    counts = {g: sum(1 for k in sd if k.split(".")[0] == g) for g in groups}
    meta = dict(
        format=FORMAT,
        source=str(src),
        layout="UDAModel(backbone, head, m_backbone, m_head[, imnet_backbone][, hrda_scale_attention, "
        "m_hrda_scale_attention][, alignment_backbone, alignment_head])",
        **layout,
        in_channels=list(MIT_PRESETS[layout["backbone"].removeprefix("mit_")]["embed_dims"]),
        iterative_refinement=False,
        groups=groups,
        num_tensors=counts,
        skipped=skipped,
    )
    return save_converted(out, model, meta)


def convert_refign_network(
    src: str | Path, out: str | Path, *, teacher: bool = False, trust_pickle: bool = False
) -> Path:
    """The student (or, with `teacher`, the EMA teacher) of a refign Lightning checkpoint alone -> `out`:
    save_converted of EncoderDecoder(MiT, DAFormerHead) (state {"backbone", "head"}; restore with
    load_converted into the same network, e.g. DAFormerSystem's model). Meta format "refign"."""
    src = Path(src)
    ckpt, sd = read_refign_checkpoint(src, trust_pickle)
    prefixes = TEACHER if teacher else STUDENT
    _require(sd, prefixes, str(src))
    layout = network_layout(sd, prefixes, str(src))
    net = _network(layout)
    skipped_mit = load_refign_network(net, sd, prefixes, str(src))
    skipped = skipped_report(ckpt, sd, prefixes)
    skipped["unused_keys"] = sorted(skipped["unused_keys"] + skipped_mit)
    meta = dict(
        format="refign",
        source=str(src),
        teacher=teacher,
        **layout,
        in_channels=list(MIT_PRESETS[layout["backbone"].removeprefix("mit_")]["embed_dims"]),
        layout="EncoderDecoder(backbone=MixVisionTransformer, head=DAFormerHead)",
        not_converted=sorted({k.split(".")[0] for k in skipped["unused_keys"]}),
        skipped=skipped,
    )
    return save_converted(out, net, meta)


# ------------------------------------------------------------------------------------------- restoring
def _mit_preset(backbone: MixVisionTransformer) -> str:
    for name, preset in MIT_PRESETS.items():
        if tuple(preset["embed_dims"]) == backbone.embed_dims and tuple(preset["depths"]) == backbone.depths:
            return f"mit_{name}"
    return f"MiT with widths {backbone.embed_dims} and depths {backbone.depths}"


def model_layout(model: UDAModel) -> dict[str, Any]:
    """The fields of a refign-uda meta.json, read from a UDAModel built from a config."""
    head = model.head
    sa = model.hrda_scale_attention
    vgg = model.alignment_backbone
    return dict(
        backbone=_mit_preset(model.backbone),
        num_classes=int(head.num_classes),
        head_channels=int(head.conv_seg.kernel.shape[-2]),
        head_embed_dims=int(head.embed_layers[0].proj.kernel.shape[-1]),
        hrda=sa is not None,
        scale_attention_channels=None if sa is None else int(sa.linear_pred.kernel.shape[-2]),
        imnet=model.imnet_backbone is not None,
        alignment=vgg is not None,
        vgg_widths=None
        if vgg is None
        else [int(vgg.features[i].kernel.shape[-1]) for i in STAGE_FIRST_CONVS],
    )


def check_refign_meta(model: UDAModel, meta: Mapping[str, Any], path: Path) -> None:
    """Raises CheckpointError with one line naming the first config field the folder does not fit. The
    checkpoint may hold the ImageNet encoder and the alignment network when the model lacks them."""
    have = model_layout(model)

    def fail(what: str, field: str, config: Any) -> None:
        raise CheckpointError(f"{path}: checkpoint has {what}, {field} is {config}")

    if meta["backbone"] != have["backbone"]:
        fail(f"backbone {meta['backbone']}", "config.model.backbone", have["backbone"])
    if meta["num_classes"] != have["num_classes"]:
        fail(f"{meta['num_classes']} classes", "config.model.num_classes", have["num_classes"])
    if meta["head_channels"] != have["head_channels"]:
        fail(f"head channels {meta['head_channels']}", "config.model.head.channels", have["head_channels"])
    if meta["head_embed_dims"] != have["head_embed_dims"]:
        fail(
            f"head embed_dims {meta['head_embed_dims']}",
            "config.model.head.embed_dims",
            have["head_embed_dims"],
        )
    if meta["hrda"] != have["hrda"]:
        what = "HRDA scale attention" if meta["hrda"] else "no HRDA scale attention"
        fail(what, "config.model.hrda.enabled", have["hrda"])
    if meta["scale_attention_channels"] != have["scale_attention_channels"]:
        fail(
            f"scale attention channels {meta['scale_attention_channels']}",
            "config.model.hrda.scale_attention.channels",
            have["scale_attention_channels"],
        )
    if have["imnet"] and not meta["imnet"]:
        fail("no imnet_backbone", "config.uda.fdist.enabled", True)
    if have["alignment"] and not meta["alignment"]:
        fail("no alignment network", "config.uda.refign.use_align", True)
    if have["alignment"] and meta["vgg_widths"] != have["vgg_widths"]:
        fail(
            f"VGG-16 widths {meta['vgg_widths']}",
            "config.uda.refign.alignment.vgg_widths",
            have["vgg_widths"],
        )


def is_refign_converted(path: str | Path) -> bool:
    """Whether `path` is a `convert_refign` folder (meta.json format "refign-uda"): the whole UDAModel."""
    meta = Path(path) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("format") == FORMAT


def load_refign_converted(model: UDAModel, path: str | Path) -> dict[str, Any]:
    """Restores a `convert_refign` folder into `model` (a UDAModel built from a config) in place, after
    `check_refign_meta`. Returns meta.json plus `not_restored`: the folder's groups the model lacks."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "meta.json").is_file() or not (path / "state").exists():
        raise FileNotFoundError(f"no converted checkpoint at {path} (expected meta.json and state/)")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: meta.json has format {meta.get('format')!r}, not {FORMAT!r} (a whole refign checkpoint "
            "converted by `scripts/convert.py refign` without --student-only/--teacher-only)"
        )
    check_refign_meta(model, meta, path)
    state = nnx.state(model, SAVED)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    with ocp.PyTreeCheckpointer() as ckptr:
        stored = ckptr.metadata(path / "state")
        stored = getattr(stored, "item_metadata", stored)
        _check_converted_shapes(path, {g: stored[g] for g in abstract if g in stored}, abstract)
        restored = ckptr.restore(
            path / "state",
            args=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True,
            ),
        )
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return {**meta, "not_restored": [g for g in meta["groups"] if g not in abstract]}


# ------------------------------------------------------------------------------------------------- CLI
def _run(args) -> None:
    if args.student_only or args.teacher_only:
        path = convert_refign_network(
            args.src, args.out, teacher=args.teacher_only, trust_pickle=args.trust_pickle
        )
    else:
        path = convert_refign(args.src, args.out, trust_pickle=args.trust_pickle)
    _print_skipped(json.loads((path / "meta.json").read_text())["skipped"])
    print(f"wrote {path}")


def register_cli(subparsers) -> None:
    """`scripts/convert.py refign --src CKPT --out DIR [--student-only | --teacher-only] [--trust-pickle]`."""
    p = subparsers.add_parser(
        "refign",
        help="refign Lightning checkpoint -> UDAModel (student, EMA teacher, scale attention, ImageNet "
        "encoder, UAWarpC)",
        description="Converts the whole state_dict of a released Refign checkpoint (read with a restricted "
        "unpickler: no code from the file runs) into one UDAModel folder; the MiT preset, class count, head "
        "widths and optional groups are read from the weights and written in meta.json with what was "
        "skipped. --student-only / --teacher-only: that network alone as MiT + DAFormer head.",
    )
    p.add_argument("--src", required=True, help="Lightning .ckpt file")
    p.add_argument("--out", required=True, help="output folder (orbax state + meta.json)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--student-only", action="store_true", help="only backbone.*/head.* (EncoderDecoder)")
    only.add_argument(
        "--teacher-only", action="store_true", help="only m_backbone.*/m_head.* (EncoderDecoder)"
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load with torch.load(weights_only=False); only for files you trust",
    )
    p.set_defaults(run=_run)
