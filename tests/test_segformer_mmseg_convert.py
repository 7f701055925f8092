"""`scripts/convert.py segformer-mmseg`: a random mmseg SegFormer checkpoint in the real key layout of
`segformer.b*.1024x1024.city.160k.pth` (`meta` with non-tensor objects, `state_dict` = `backbone.*` mmseg MiT
names + `decode_head.*` SegFormer MLP head; refign.md section 11), written here from the layout, not from
our modules, converted into the MiT encoder."""

import argparse

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from lqseg_jax.convert.common import CheckpointError, load_converted
from lqseg_jax.convert.mit import blank_model
from lqseg_jax.convert.segformer_mmseg import convert_segformer_mmseg, register_cli
from lqseg_jax.models.mit import MixVisionTransformer

B0 = dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))


def mmseg_segformer_state(dims, depths, srs, head_channels=256, num_classes=19):
    """OrderedDict of random tensors named as the mmseg SegFormer checkpoint names them."""
    g = torch.Generator().manual_seed(0)
    shapes = {}
    cin = 3
    for s, (c, d, sr) in enumerate(zip(dims, depths, srs), start=1):
        k = 7 if s == 1 else 3
        p = f"backbone.patch_embed{s}."
        shapes |= {p + "proj.weight": (c, cin, k, k), p + "proj.bias": (c,), p + "norm.weight": (c,)}
        shapes[p + "norm.bias"] = (c,)
        for j in range(d):
            b = f"backbone.block{s}.{j}."
            shapes |= {b + "norm1.weight": (c,), b + "norm1.bias": (c,)}
            shapes |= {b + "attn.q.weight": (c, c), b + "attn.q.bias": (c,)}
            shapes |= {b + "attn.kv.weight": (2 * c, c), b + "attn.kv.bias": (2 * c,)}
            shapes |= {b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,)}
            if sr > 1:
                shapes |= {b + "attn.sr.weight": (c, c, sr, sr), b + "attn.sr.bias": (c,)}
                shapes |= {b + "attn.norm.weight": (c,), b + "attn.norm.bias": (c,)}
            shapes |= {b + "norm2.weight": (c,), b + "norm2.bias": (c,)}
            shapes |= {b + "mlp.fc1.weight": (4 * c, c), b + "mlp.fc1.bias": (4 * c,)}
            shapes |= {
                b + "mlp.dwconv.dwconv.weight": (4 * c, 1, 3, 3),
                b + "mlp.dwconv.dwconv.bias": (4 * c,),
            }
            shapes |= {b + "mlp.fc2.weight": (c, 4 * c), b + "mlp.fc2.bias": (c,)}
        shapes |= {f"backbone.norm{s}.weight": (c,), f"backbone.norm{s}.bias": (c,)}
        cin = c
    for i, c in enumerate(dims, start=1):
        shapes[f"decode_head.linear_c{i}.proj.weight"] = (head_channels, c)
        shapes[f"decode_head.linear_c{i}.proj.bias"] = (head_channels,)
    shapes["decode_head.linear_fuse.conv.weight"] = (head_channels, 4 * head_channels, 1, 1)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"decode_head.linear_fuse.bn.{leaf}"] = (head_channels,)
    shapes["decode_head.conv_seg.weight"] = (num_classes, head_channels, 1, 1)
    shapes["decode_head.conv_seg.bias"] = (num_classes,)
    sd = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    sd["decode_head.linear_fuse.bn.num_batches_tracked"] = torch.tensor(160000)
    return sd


def test_convert_cli_backbone_only(tmp_path):
    sd = mmseg_segformer_state(B0["embed_dims"], B0["depths"], B0["sr_ratios"])
    src = tmp_path / "segformer.b0.1024x1024.city.160k.pth"
    meta = dict(CLASSES=("road", "sidewalk"), seed=np.int64(0), config="model = dict(type='EncoderDecoder')")
    torch.save(dict(meta=meta, state_dict=sd), src)
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="format", required=True))
    args = parser.parse_args(["segformer-mmseg", "--src", str(src), "--out", str(tmp_path / "out")])
    args.run(args)

    model = blank_model(lambda: MixVisionTransformer.from_preset("b0", rngs=nnx.Rngs(0)))
    meta = load_converted(tmp_path / "out", model)
    assert meta["backbone"] == "mit_b0"
    head_keys = sorted(k for k in sd if k.startswith("decode_head."))
    assert meta["skipped_decode_head"] == head_keys and len(head_keys) == 16
    assert meta["skipped_other"] == []
    assert any("numpy" in g for g in meta["skipped_globals"])  # the numpy scalar in meta, never imported
    np.testing.assert_array_equal(
        np.asarray(model.block3[1].attn.kv.kernel[...]), sd["backbone.block3.1.attn.kv.weight"].numpy().T
    )
    np.testing.assert_array_equal(
        np.asarray(model.patch_embed1.proj.kernel[...]),
        sd["backbone.patch_embed1.proj.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(model.block2[0].mlp.dwconv.dwconv.kernel[...]),
        sd["backbone.block2.0.mlp.dwconv.dwconv.weight"].numpy().transpose(2, 3, 1, 0),
    )
    n_backbone = sum(v.numel() for k, v in sd.items() if k.startswith("backbone."))
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == n_backbone


def test_errors_name_the_problem(tmp_path):
    src = tmp_path / "bad.pth"
    torch.save(dict(state_dict={"decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1)}), src)
    with pytest.raises(CheckpointError, match=r"no key starts with 'backbone\.'.*decode_head"):
        convert_segformer_mmseg(src, tmp_path / "out")
    sd = mmseg_segformer_state(B0["embed_dims"], B0["depths"], B0["sr_ratios"])
    del sd["backbone.block1.0.attn.q.weight"]
    torch.save(dict(state_dict=sd), src)
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*block1\.0\.attn\.q"):
        convert_segformer_mmseg(src, tmp_path / "out")
