"""mmseg SegFormer checkpoint -> MiT encoder: the Cityscapes-trained SegFormer that starts HRDA*
(refign.md section 1 O6, section 11): `segformer.b5.1024x1024.city.160k.pth`, an mmseg dict with `meta` and
`state_dict` = `backbone.*` (mmseg MiT names, our module paths) + `decode_head.*` (the SegFormer MLP head).

Only the encoder is converted: Refign's HRDA* loads `backbone.*` alone (mix_transformer.py:463-479; its
DAFormer head and scale attention start from their own init), so every `decode_head.*` key is skipped and
listed in meta.json. The file is read through the restricted unpickler of `convert/lightning.py` (mmcv
objects in `meta` become inert placeholders, listed as `skipped_globals`). Output: a save_converted folder
of a MixVisionTransformer (preset read from the weights), loaded by the UDA system with
`config.model.pretrained = {path: OUT, prefix: "backbone"}` (configs/hrda.py).

    python scripts/convert.py segformer-mmseg --src segformer.b5.1024x1024.city.160k.pth --out DIR
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from lqseg_jax.convert.common import CheckpointError, load_torch_state, save_converted
from lqseg_jax.convert.lightning import lightning_state_dict, load_lightning_checkpoint, skipped_globals
from lqseg_jax.convert.mit import blank_model, infer_mit_preset, mit_state
from lqseg_jax.models.mit import MixVisionTransformer

PREFIX = "backbone."
HEAD_PREFIX = "decode_head."


def convert_segformer_mmseg(src: str | Path, out: str | Path) -> Path:
    """mmseg SegFormer checkpoint `src` -> `out` (MiT encoder state + meta.json: backbone preset, skipped
    decode_head keys, any keys outside backbone/decode_head, skipped pickle globals)."""
    src = Path(src)
    ckpt = load_lightning_checkpoint(src)
    sd = lightning_state_dict(ckpt, str(src))
    if not any(k.startswith(PREFIX) for k in sd):
        found = sorted({k.split(".")[0] for k in sd})
        raise CheckpointError(f"{src}: no key starts with '{PREFIX}' (top-level names: {found})")
    state, skipped = mit_state(sd, naming="mmseg", prefix=PREFIX)
    preset = infer_mit_preset(state)
    model = blank_model(lambda: MixVisionTransformer.from_preset(preset, rngs=nnx.Rngs(0)))
    load_torch_state(model, state, source=f"{src} [{PREFIX}*]")
    head_keys = sorted(k for k in skipped if k.startswith(HEAD_PREFIX))
    other_keys = sorted(k for k in skipped if not k.startswith(HEAD_PREFIX))
    meta = dict(
        format="segformer_mmseg",
        source=str(src),
        naming="mmseg",
        backbone=f"mit_{preset}",
        layer_norm_eps=1e-6,
        skipped_decode_head=head_keys,
        skipped_other=other_keys,
        skipped_globals=skipped_globals(ckpt),
    )
    return save_converted(out, model, meta)


def _run(args) -> None:
    path = convert_segformer_mmseg(args.src, args.out)
    print(f"wrote {path}")


def register_cli(subparsers) -> None:
    """`scripts/convert.py segformer-mmseg --src segformer.b5.1024x1024.city.160k.pth --out DIR`."""
    p = subparsers.add_parser(
        "segformer-mmseg",
        help="mmseg SegFormer checkpoint (state_dict: backbone.* + decode_head.*) -> MiT encoder (HRDA*)",
        description="Converts the backbone.* keys of an mmseg SegFormer checkpoint (e.g. the Cityscapes "
        "segformer.b5.1024x1024.city.160k.pth that starts Refign-HRDA*) into a MixVisionTransformer; the "
        "SegFormer decode_head.* is not used by Refign: its keys are skipped and listed in meta.json.",
    )
    p.add_argument("--src", required=True, help="mmseg .pth checkpoint")
    p.add_argument("--out", required=True, help="output folder (orbax state + meta.json)")
    p.set_defaults(run=_run)
