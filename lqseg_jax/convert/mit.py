"""MiT (SegFormer encoder) and DAFormer head: PyTorch state dicts -> our NNX modules.

Two namings of the MiT weights:
- mmseg / refign / DAFormer / the official SegFormer release (`mit_b5.pth`): `patch_embed1.proj`,
  `block3.7.attn.kv`, ... These are our module paths already (only a prefix to strip; the ImageNet
  classifier `head.*` of the official MiT release is skipped).
- transformers `SegformerModel` (also inside `SegformerFor*` under `segformer.`): the transformers 5
  module names (`stages.{i}.patch_embeddings.proj`, `stages.{i}.blocks.{j}.attention.q_proj`, ...) and the
  names of the checkpoints on the Hub (`encoder.patch_embeddings.{i}.proj`,
  `encoder.block.{i}.{j}.attention.self.query`, ...). Keys and values are separate there and fused into
  `kv` (k rows first, as the mmseg reshape reads them). Note that transformers' LayerNorms in blocks and
  stage norms use eps 1e-5, not the original 1e-6: build the model with `layer_norm_eps=1e-5` to reproduce
  a transformers model exactly.

`scripts/convert.py mit` converts such an encoder checkpoint alone (e.g. the ImageNet weights that
start DAFormer training). Refign's Lightning checkpoints (MiT + DAFormer head student and EMA teacher, and
more) are converted by convert/refign.py with `load_mit` / `load_daformer_head` of this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lqseg_jax.convert.common import (
    CheckpointError,
    load_safetensors,
    load_torch_state,
    rename_keys,
    save_converted,
    strip_prefix,
    to_numpy,
    torch_load,
)
from lqseg_jax.models.daformer_head import DAFormerHead
from lqseg_jax.models.mit import MIT_PRESETS, MixVisionTransformer

M = TypeVar("M", bound=nnx.Module)


def _numpy_copy(state_dict: Mapping[str, object]) -> dict[str, np.ndarray]:
    """to_numpy with copies: on CPU, JAX may alias a numpy buffer, and to_numpy's arrays share memory with
    the torch tensors, so a later in-place torch update (BN statistics, an optimizer) would reach ours."""
    return {k: np.array(v, copy=True) for k, v in to_numpy(state_dict).items()}


def _transformers_rules() -> list[tuple[str, str]]:
    rules = [(r"^segformer\.", "")]
    for i in range(4):
        s = i + 1
        rules += [
            # transformers 5 module names
            (rf"^stages\.{i}\.patch_embeddings\.proj\.", f"patch_embed{s}.proj."),
            (rf"^stages\.{i}\.patch_embeddings\.layer_norm\.", f"patch_embed{s}.norm."),
            (rf"^stages\.{i}\.blocks\.(\d+)\.", rf"block{s}.\1."),
            (rf"^stages\.{i}\.layer_norm\.", f"norm{s}."),
            # Hub checkpoint names
            (rf"^encoder\.patch_embeddings\.{i}\.proj\.", f"patch_embed{s}.proj."),
            (rf"^encoder\.patch_embeddings\.{i}\.layer_norm\.", f"patch_embed{s}.norm."),
            (rf"^encoder\.block\.{i}\.(\d+)\.", rf"block{s}.\1."),
            (rf"^encoder\.layer_norm\.{i}\.", f"norm{s}."),
        ]
    rules += [
        (r"\.(layernorm_before|layer_norm_1)\.", ".norm1."),
        (r"\.(layernorm_after|layer_norm_2)\.", ".norm2."),
        (r"\.attention\.(q_proj|self\.query)\.", ".attn.q."),
        (r"\.attention\.(k_proj|self\.key)\.", ".attn.k."),
        (r"\.attention\.(v_proj|self\.value)\.", ".attn.v."),
        (r"\.attention\.(o_proj|output\.dense)\.", ".attn.proj."),
        (r"\.attention\.(sequence_reduction\.sequence_reduction|self\.sr)\.", ".attn.sr."),
        (r"\.attention\.(sequence_reduction\.layer_norm|self\.layer_norm)\.", ".attn.norm."),
        (r"\.mlp\.dense1\.", ".mlp.fc1."),
        (r"\.mlp\.dense2\.", ".mlp.fc2."),
    ]
    return rules


def _fuse_kv(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`*.attn.k.{weight,bias}` + `*.attn.v.{weight,bias}` -> `*.attn.kv.*` (concatenated on the out axis)."""
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(.+\.attn)\.([kv])\.(weight|bias)", key)
        if m is None:
            out[key] = value
            continue
        prefix, which, leaf = m.groups()
        partner = f"{prefix}.{'v' if which == 'k' else 'k'}.{leaf}"
        if partner not in state_dict:
            raise CheckpointError(f"'{key}' has no partner '{partner}' to fuse into '{prefix}.kv.{leaf}'")
        if which == "k":
            k, v = np.asarray(value), np.asarray(state_dict[partner])
            if k.shape != v.shape:
                raise CheckpointError(f"'{key}' has shape {k.shape} but '{partner}' has {v.shape}")
            out[f"{prefix}.kv.{leaf}"] = np.concatenate([k, v], axis=0)
    return out


def mit_state_from_transformers(state_dict: Mapping[str, object]) -> tuple[dict[str, np.ndarray], list[str]]:
    """transformers Segformer keys -> our MiT keys (numpy), k/v fused. Returns (state, skipped keys):
    the decode head and classifier of `SegformerFor*` are skipped."""
    renamed, skipped = rename_keys(
        _numpy_copy(state_dict), _transformers_rules(), skip=[r"^(decode_head|classifier)\."]
    )
    return _fuse_kv(renamed), skipped


def mit_state_from_mmseg(
    state_dict: Mapping[str, object], prefix: str = ""
) -> tuple[dict[str, np.ndarray], list[str]]:
    """mmseg/refign MiT keys under `prefix` -> our keys (numpy). Returns (state, skipped keys): keys
    outside `prefix`, and the ImageNet classifier `head.*` of the official MiT release."""
    selected = strip_prefix(state_dict, prefix)
    skipped = [k for k in state_dict if not k.startswith(prefix)]
    renamed, skipped_head = rename_keys(_numpy_copy(selected), [], skip=[r"^head\."])
    return renamed, skipped + [prefix + k for k in skipped_head]


def detect_mit_naming(state_dict: Mapping[str, object], prefix: str = "") -> str:
    """ "transformers" when the keys under `prefix` are Segformer-named, else "mmseg"."""
    pattern = re.compile(
        rf"^{re.escape(prefix)}(segformer\.)?(stages\.0\.patch_embeddings|encoder\.patch_embeddings)\."
    )
    return "transformers" if any(pattern.match(k) for k in state_dict) else "mmseg"


def mit_state(
    state_dict: Mapping[str, object], *, naming: str = "mmseg", prefix: str = ""
) -> tuple[dict[str, np.ndarray], list[str]]:
    """A torch MiT state dict (keys under `prefix`) in our names; `naming` "mmseg", "transformers" or
    "auto". Returns (state, skipped keys)."""
    if naming == "auto":
        naming = detect_mit_naming(state_dict, prefix)
    if naming == "mmseg":
        return mit_state_from_mmseg(state_dict, prefix)
    if naming == "transformers":
        return mit_state_from_transformers(strip_prefix(state_dict, prefix))
    raise ValueError(f"MiT checkpoint naming must be 'mmseg', 'transformers' or 'auto', got '{naming}'")


def load_mit(
    model: MixVisionTransformer,
    state_dict: Mapping[str, object],
    *,
    naming: str = "mmseg",
    prefix: str = "",
    source: str = "MiT checkpoint",
) -> list[str]:
    """Loads a torch MiT state dict into `model` in place (`naming` as in `mit_state`).

    Returns the skipped keys; raises CheckpointError naming any missing, unexpected or mis-shaped key.
    """
    state, skipped = mit_state(state_dict, naming=naming, prefix=prefix)
    load_torch_state(model, state, source=source)
    return skipped


def load_daformer_head(
    head: DAFormerHead, state_dict: Mapping[str, object], *, prefix: str = "", source: str = "DAFormer head"
) -> None:
    """Loads the refign/DAFormer head keys under `prefix` (e.g. "head.", "decode_head.") into `head`."""
    load_torch_state(head, _numpy_copy(strip_prefix(state_dict, prefix)), source=source)


def infer_mit_preset(state_dict: Mapping[str, object], prefix: str = "") -> str:
    """The b0..b5 preset whose stage widths and depths the mmseg-named keys under `prefix` have."""
    dims, depths = [], []
    for s in range(1, 5):
        key = f"{prefix}norm{s}.weight"
        if key not in state_dict:
            raise CheckpointError(f"cannot infer the MiT preset: '{key}' is missing")
        dims.append(int(np.shape(state_dict[key])[0]))
        pattern = re.compile(rf"^{re.escape(prefix)}block{s}\.(\d+)\.norm1\.weight$")
        depths.append(len({m.group(1) for k in state_dict if (m := pattern.match(k))}))
    for name, preset in MIT_PRESETS.items():
        if tuple(preset["embed_dims"]) == tuple(dims) and tuple(preset["depths"]) == tuple(depths):
            return name
    raise CheckpointError(
        f"no MiT preset has stage widths {dims} and depths {depths} (keys under '{prefix}'); "
        f"known: { {n: (p['embed_dims'], p['depths']) for n, p in MIT_PRESETS.items()} }"
    )


def blank_model(make: Callable[[], M]) -> M:
    """`make()` without running its initialisers: the module is traced with nnx.eval_shape and its
    parameters and statistics become zero placeholders for a checkpoint to overwrite (load_torch_state
    fails on any it leaves unset). RNG streams get distinct keys, as forking them would."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    root = jax.random.key(0)
    counter = iter(range(1 << 30))

    def fill(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(root, next(counter))
        return jnp.asarray(np.zeros(x.shape, x.dtype))

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def _load_torch_checkpoint(path: Path, trust_pickle: bool) -> Mapping:
    """A torch.load-able file or a .safetensors file, as a mapping."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path.absolute()}")
    if path.suffix == ".safetensors":
        return load_safetensors(path, "torch")
    return torch_load(path, trust_pickle=trust_pickle)


def convert_mit(
    src: str | Path, out: str | Path, *, naming: str = "auto", prefix: str = "", trust_pickle: bool = False
) -> Path:
    """A MiT checkpoint (official SegFormer `mit_b*.pth` in mmseg naming, or a transformers Segformer
    `pytorch_model.bin` / `model.safetensors`) -> `out`: save_converted of a MixVisionTransformer, the
    preset read from the weights. Meta: backbone, naming, layer_norm_eps (1e-5 for transformers weights,
    which were trained with it; our default is the original 1e-6), skipped keys, source.
    """
    src = Path(src)
    ckpt = _load_torch_checkpoint(src, trust_pickle)
    for wrapper in ("state_dict", "model"):
        if wrapper in ckpt and isinstance(ckpt[wrapper], Mapping):
            ckpt = ckpt[wrapper]
            break
    naming = detect_mit_naming(ckpt, prefix) if naming == "auto" else naming
    state, skipped = mit_state(ckpt, naming=naming, prefix=prefix)
    preset = infer_mit_preset(state)
    eps = 1e-5 if naming == "transformers" else 1e-6
    model = blank_model(
        lambda: MixVisionTransformer.from_preset(preset, layer_norm_eps=eps, rngs=nnx.Rngs(0))
    )
    load_torch_state(model, state, source=str(src))
    meta = dict(
        format="mit",
        source=str(src),
        naming=naming,
        backbone=f"mit_{preset}",
        layer_norm_eps=eps,
        skipped=skipped[:50],
        num_skipped=len(skipped),
    )
    return save_converted(out, model, meta)


def _run_mit(args) -> None:
    path = convert_mit(
        args.src, args.out, naming=args.naming, prefix=args.prefix, trust_pickle=args.trust_pickle
    )
    print(f"wrote {path}")


def _trust_pickle_arg(p) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load with torch.load(weights_only=False); only for files you trust",
    )


def register_cli(subparsers) -> None:
    """`scripts/convert.py mit --src mit_b5.pth --out DIR [--naming auto|mmseg|transformers] [--prefix P]`."""
    p = subparsers.add_parser(
        "mit",
        help="MiT encoder weights (official SegFormer mit_b*.pth, or transformers Segformer) -> MiT",
        description="Converts a MiT encoder checkpoint into a MixVisionTransformer state (preset read from "
        "the weights); classifier / decode-head keys are skipped and listed in meta.json.",
    )
    p.add_argument("--src", required=True, help=".pth / .bin / .safetensors file")
    p.add_argument("--out", required=True, help="output folder (orbax state + meta.json)")
    p.add_argument("--naming", default="auto", choices=["auto", "mmseg", "transformers"])
    p.add_argument("--prefix", default="", help="key prefix of the encoder, e.g. 'backbone.'")
    _trust_pickle_arg(p)
    p.set_defaults(run=_run_mit)
