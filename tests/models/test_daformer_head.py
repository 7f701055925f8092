"""DAFormer head against a PyTorch head built here from torch.nn layers (refign.md section 2), the
bilinear resize against torch F.interpolate, and the refign checkpoint converter / CLI."""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn
from transformers import SegformerConfig, SegformerModel

from lqseg_jax.convert.common import CheckpointError, load_converted
from lqseg_jax.convert.mit import blank_model, load_daformer_head, mit_state_from_transformers
from lqseg_jax.convert.refign import register_cli
from lqseg_jax.models.daformer_head import DAFormerHead
from lqseg_jax.models.layers import resize_bilinear
from lqseg_jax.models.mit import MIT_PRESETS, MixVisionTransformer
from lqseg_jax.models.segmentor import EncoderDecoder

IN_CHANNELS = (16, 32, 48, 64)
SIZES = [(19, 25), (10, 13), (5, 7), (3, 4)]  # MiT stages of a 75x97 image
SMALL = dict(channels=24, embed_dims=32)
NUM_CLASSES = 5


# ---- the PyTorch reference, written from the description (not from our JAX code) ----
class TorchConvModule(nn.Module):
    def __init__(self, cin, cout, k, padding=0, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class TorchSepConvModule(nn.Module):
    def __init__(self, cin, cout, dilation):
        super().__init__()
        self.depthwise_conv = TorchConvModule(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin)
        self.pointwise_conv = TorchConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class TorchEmbed(nn.Module):
    def __init__(self, cin, embed):
        super().__init__()
        self.proj = nn.Linear(cin, embed)

    def forward(self, x):  # NCHW -> tokens -> NCHW
        n, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)


class TorchFuse(nn.Module):
    def __init__(self, cin, channels):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            [TorchConvModule(cin, channels, 1)] + [TorchSepConvModule(cin, channels, d) for d in (6, 12, 18)]
        )
        self.bottleneck = TorchConvModule(4 * channels, channels, 3, padding=1)

    def forward(self, x):
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class TorchDAFormerHead(nn.Module):
    def __init__(self, in_channels, num_classes, channels=256, embed_dims=256, dropout=0.1):
        super().__init__()
        self.embed_layers = nn.ModuleDict(
            {str(i): TorchEmbed(c, embed_dims) for i, c in enumerate(in_channels)}
        )
        self.fuse_layer = TorchFuse(embed_dims * len(in_channels), channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        embedded = [
            F.interpolate(self.embed_layers[str(i)](f), size=size, mode="bilinear", align_corners=False)
            for i, f in enumerate(feats)
        ]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(embedded, dim=1))))


def torch_head(seed=0, **kwargs):
    """Random O(1)-scale weights and random BN statistics."""
    torch.manual_seed(seed)
    head = TorchDAFormerHead(IN_CHANNELS, NUM_CLASSES, **SMALL, **kwargs)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif ".bn." in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return head


def loaded_head(state_dict, **kwargs):
    """Our head holding the converted torch weights (initialisers skipped: every weight is loaded)."""
    head = blank_model(lambda: DAFormerHead(IN_CHANNELS, NUM_CLASSES, **SMALL, **kwargs, rngs=nnx.Rngs(0)))
    load_daformer_head(head, {"head." + k: v for k, v in state_dict.items()}, prefix="head.")
    return head


@nnx.jit
def decode(head, feats):
    return head(feats)


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(2, c, h, w)).astype(np.float32) for c, (h, w) in zip(IN_CHANNELS, SIZES)]


def nhwc(feats):
    return [jnp.asarray(f.transpose(0, 2, 3, 1)) for f in feats]


def test_parity_eval(feats):
    ref_head = torch_head().eval()
    with torch.no_grad():
        ref = ref_head([torch.from_numpy(f) for f in feats]).numpy().transpose(0, 2, 3, 1)
    head = loaded_head(ref_head.state_dict())
    head.eval()
    out = decode(head, nhwc(feats))
    assert out.shape == (2, 19, 25, NUM_CLASSES) and out.dtype == jnp.float32
    diff = float(np.max(np.abs(np.asarray(out) - ref)))
    print(f"DAFormer head eval: max |diff| = {diff:.2e} (logits std {ref.std():.2f})")
    assert diff <= 1e-4


def test_parity_train_batch_norm(feats):
    """Train mode (no dropout): BN normalises with batch statistics and updates the running ones as torch
    does (momentum 0.1; the running variance takes the unbiased batch variance)."""
    ref_head = torch_head(dropout=0.0).train()
    ours = loaded_head(ref_head.state_dict(), dropout_ratio=0.0)
    with torch.no_grad():
        ref = ref_head([torch.from_numpy(f) for f in feats]).numpy().transpose(0, 2, 3, 1)
    ours.train()
    out = decode(ours, nhwc(feats))
    diff = float(np.max(np.abs(np.asarray(out) - ref)))
    print(f"DAFormer head train: max |diff| = {diff:.2e}")
    assert diff <= 1e-4
    new = ref_head.state_dict()
    keys = [k for k in new if k.endswith(("running_mean", "running_var"))]
    assert keys
    for key in keys:
        module = ours
        for part in key.split(".")[:-1]:
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        stat = module.mean if key.endswith("running_mean") else module.var
        np.testing.assert_allclose(np.asarray(stat[...]), new[key].numpy(), rtol=1e-5, atol=1e-5, err_msg=key)


def test_parameter_count_full_size():
    in_channels = MIT_PRESETS["b5"]["embed_dims"]
    with torch.device("meta"):
        ref = TorchDAFormerHead(in_channels, 19)
    ref_count = sum(p.numel() for p in ref.parameters())
    abstract = nnx.eval_shape(lambda: DAFormerHead(in_channels, 19, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    stats = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.BatchStat)))
    print(
        f"DAFormer head (19 classes, 256 ch) parameters: ours {count:,}, torch {ref_count:,}; BN stats {stats:,}"
    )
    assert count == ref_count


def test_init_as_original():
    """conv_seg N(0, 0.01), bias 0; ConvModule convs Kaiming normal fan_out (std sqrt(2 / (out*k*k)));
    BN 1 / 0; embedding Linear torch default U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    head = DAFormerHead((8, 8, 8, 8), 7, channels=8, embed_dims=8, rngs=nnx.Rngs(0))
    seg = np.asarray(head.conv_seg.kernel[...])
    assert abs(seg.std() / 0.01 - 1) < 0.3
    np.testing.assert_array_equal(np.asarray(head.conv_seg.bias[...]), 0.0)
    convs, lin_w, lin_b = [], [], []
    for _, m in nnx.iter_modules(head):
        if isinstance(m, nnx.Conv) and m is not head.conv_seg:
            kh, kw, _, out = m.kernel.shape
            convs.append(np.asarray(m.kernel[...]).ravel() / math.sqrt(2.0 / (out * kh * kw)))
            assert m.bias is None
        elif isinstance(m, nnx.BatchNorm):
            np.testing.assert_array_equal(np.asarray(m.scale[...]), 1.0)
            np.testing.assert_array_equal(np.asarray(m.bias[...]), 0.0)
        elif isinstance(m, nnx.Linear):
            lin_w.append(np.asarray(m.kernel[...]).ravel() * math.sqrt(m.in_features))
            lin_b.append(np.asarray(m.bias[...]).ravel() * math.sqrt(m.in_features))
    convs, lin_w, lin_b = map(np.concatenate, (convs, lin_w, lin_b))
    assert abs(convs.std() - 1) < 0.06
    assert np.abs(lin_w).max() <= 1 and abs(lin_w.std() - 1 / math.sqrt(3)) < 0.05
    assert np.abs(lin_b).max() <= 1 and lin_b.std() > 0.3


def test_dropout2d_drops_whole_channels_in_train_only():
    head = blank_model(lambda: DAFormerHead(IN_CHANNELS, NUM_CLASSES, **SMALL, rngs=nnx.Rngs(0)))
    x = jnp.ones((8, 5, 6, 256))
    y = np.asarray(head.dropout(x))  # train mode by default
    assert np.all(y == y[:, :1, :1, :])  # constant over h, w for each (sample, channel)
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.9)}
    assert 0.05 < (y[:, 0, 0, :] == 0).mean() < 0.15  # rate 0.1
    head.eval()
    np.testing.assert_array_equal(np.asarray(head.dropout(x)), np.asarray(x))


@pytest.mark.parametrize(
    "src, dst",
    [
        ((7, 5), (13, 17)),
        ((13, 17), (5, 7)),
        ((9, 20), (14, 6)),
        ((19, 25), (19, 25)),
        ((3, 4), (19, 25)),
        ((64, 48), (7, 30)),
        ((128, 160), (512, 640)),
        ((108, 192), (54, 96)),
    ],
)
def test_resize_bilinear_matches_torch(src, dst):
    x = np.random.default_rng(1).normal(size=(2, 3, *src)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False).numpy()
    out = jax.jit(resize_bilinear, static_argnums=1)(jnp.asarray(x.transpose(0, 2, 3, 1)), dst)
    diff = float(np.max(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref)))
    print(f"resize {src} -> {dst}: max |diff| = {diff:.1e}")
    assert diff <= 1e-5  # torch's own source positions vary by an fp32 ulp with FMA contraction


def test_errors():
    head = blank_model(lambda: DAFormerHead(IN_CHANNELS, NUM_CLASSES, **SMALL, rngs=nnx.Rngs(0)))
    sd = {"head." + k: v for k, v in torch_head().state_dict().items()}
    bad = dict(sd, **{"head.fuse_layer.aspp_modules.2.depthwise_conv.conv.weight": torch.zeros(100, 1, 3, 3)})
    with pytest.raises(
        CheckpointError,
        match=r"'fuse_layer\.aspp_modules\.2\.depthwise_conv\.conv\.weight'.*\(100, 1, 3, 3\)",
    ):
        load_daformer_head(head, bad, prefix="head.")
    missing = {k: v for k, v in sd.items() if k != "head.fuse_layer.bottleneck.bn.running_var"}
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*'fuse_layer\.bottleneck\.bn\.var'"):
        load_daformer_head(head, missing, prefix="head.")
    with pytest.raises(ValueError, match=r"feature 2 must be NHWC with 48 channels.*\(2, 5, 7, 40\)"):
        head(
            [
                jnp.zeros((2, h, w, c if i != 2 else 40))
                for i, (c, (h, w)) in enumerate(zip(IN_CHANNELS, SIZES))
            ]
        )
    with pytest.raises(ValueError, match="resize_bilinear: input must be NHWC"):
        resize_bilinear(jnp.zeros((3, 4, 5)), (2, 2))


def run_cli(argv):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="format", required=True))
    args = parser.parse_args(argv)
    args.run(args)


def test_refign_cli_converts_student_or_teacher(tmp_path):
    b0 = MIT_PRESETS["b0"]
    config = SegformerConfig(
        hidden_sizes=list(b0["embed_dims"]),
        depths=list(b0["depths"]),
        num_attention_heads=list(b0["num_heads"]),
    )
    nets = {}
    for seed, role in [(0, "student"), (1, "teacher")]:
        torch.manual_seed(seed)
        head = TorchDAFormerHead(b0["embed_dims"], 19)
        nets[role] = (SegformerModel(config).state_dict(), head.state_dict())
    sd = {"alignment_head.reduce.weight": torch.zeros(2, 32, 1, 1)}
    for role, (bb_prefix, head_prefix) in [
        ("student", ("backbone.", "head.")),
        ("teacher", ("m_backbone.", "m_head.")),
    ]:
        backbone, _ = mit_state_from_transformers(nets[role][0])  # mmseg naming = ours
        sd.update({bb_prefix + k: torch.from_numpy(v) for k, v in backbone.items()})
        sd.update({head_prefix + k: v for k, v in nets[role][1].items()})
    src = tmp_path / "refign.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, src)

    def restored(out):
        net = blank_model(
            lambda: EncoderDecoder(
                MixVisionTransformer.from_preset("b0", rngs=nnx.Rngs(0)),
                DAFormerHead(b0["embed_dims"], 19, rngs=nnx.Rngs(0)),
            )
        )
        return net, load_converted(out, net)

    for role, flag in [("teacher", ["--teacher-only"]), ("student", ["--student-only"])]:
        out = tmp_path / role
        run_cli(["refign", "--src", str(src), "--out", str(out), *flag])
        net, meta = restored(out)
        assert (
            meta["backbone"] == "mit_b0"
            and meta["num_classes"] == 19
            and meta["teacher"] == (role == "teacher")
        )
        assert (meta["head_channels"], meta["head_embed_dims"]) == (256, 256)
        assert "alignment_head" in meta["not_converted"]
        tb, th = nets[role]
        np.testing.assert_array_equal(
            np.asarray(net.head.conv_seg.kernel[...]), th["conv_seg.weight"].numpy().transpose(2, 3, 1, 0)
        )
        kv = torch.cat(
            [tb["stages.2.blocks.1.attention.k_proj.weight"], tb["stages.2.blocks.1.attention.v_proj.weight"]]
        )
        np.testing.assert_array_equal(np.asarray(net.backbone.block3[1].attn.kv.kernel[...]), kv.numpy().T)
        np.testing.assert_array_equal(
            np.asarray(net.backbone.patch_embed1.proj.kernel[...]),
            tb["stages.0.patch_embeddings.proj.weight"].numpy().transpose(2, 3, 1, 0),
        )

    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("m_head.")}}, src)
    with pytest.raises(CheckpointError, match=r"no key starts with 'm_head\.'"):
        run_cli(["refign", "--src", str(src), "--out", str(tmp_path / "x"), "--teacher-only"])
    torch.save({"model": {}}, src)
    with pytest.raises(
        CheckpointError, match=r"expected a Lightning checkpoint with 'state_dict', found \['model'\]"
    ):
        run_cli(["refign", "--src", str(src), "--out", str(tmp_path / "x")])
