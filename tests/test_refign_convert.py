"""`scripts/convert.py refign`: a whole Refign Lightning checkpoint -> one UDAModel folder, restored by
`load_refign_converted`.

The full-size checkpoint is built here with exactly the names and shapes of refign_ckpt_keys.txt (refign.md
section 11): the DAFormer head and scale attention keys are enumerated from their layout and checked against
the file's lines (sha256), the MiT-B5 keys (described, not listed, in the file) are enumerated from the
mit_b5.pth layout and checked against the file's counts (1052 tensors, 81,443,008 values), the alignment keys
come from the torch reference of test_uawarpc_convert (itself checked against the file). Values are random."""

import hashlib
import importlib.util
import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from lqseg_jax.convert.common import CheckpointError, load_converted
from lqseg_jax.convert.refign import abstract_module, is_refign_converted, load_refign_converted
from lqseg_jax.models.daformer_head import DAFormerHead
from lqseg_jax.models.hrda import SegFormerHead
from lqseg_jax.models.mit import MixVisionTransformer
from lqseg_jax.models.segmentor import EncoderDecoder
from lqseg_jax.models.uawarpc import UAWarpC
from lqseg_jax.models.vgg import VGG16_WIDTHS
from lqseg_jax.systems.uda import UDAModel
from tests.models.test_uawarpc_convert import TINY_VGG, Evil, reference_state

# sha256 of the sorted "key<TAB>shape" lines of refign_ckpt_keys.txt that start with head. or
# hrda_scale_attention. (58 + 16 lines)
REFIGN_HEAD_AND_SCALE_ATTENTION_SHA256 = "014b4f05f3917b032d51c94f01884905583f8e728e0898ef3ff333fdf733ea1f"
# refign_ckpt_keys.txt's header
DAFORMER_COUNTS = dict(
    backbone=1052,
    head=58,
    alignment_backbone=26,
    alignment_head=390,
    m_backbone=1052,
    m_head=58,
    imnet_backbone=1052,
)
HRDA_COUNTS = dict(DAFORMER_COUNTS, hrda_scale_attention=16, m_hrda_scale_attention=16)
MIT_B5_VALUES = 81_443_008
BOOKKEEPING = [
    "callbacks",
    "epoch",
    "global_step",
    "loops",
    "lr_schedulers",
    "optimizer_states",
    "pytorch-lightning_version",
]

# the SegFormer MiT layout (mit_b5.pth): stage widths, depths, sr ratios; patch embeddings 7x7 then 3x3
MIT = dict(
    b0=((32, 64, 160, 256), (2, 2, 2, 2)),
    b5=((64, 128, 320, 512), (3, 6, 40, 3)),
)
SR_RATIOS = (8, 4, 2, 1)


def mit_keys(preset: str) -> dict[str, tuple]:
    """mmseg MiT keys of mit_b*.pth without the ImageNet `head.*`, with their torch shapes."""
    dims, depths = MIT[preset]
    keys, cin = {}, 3
    for s, (c, depth, sr) in enumerate(zip(dims, depths, SR_RATIOS), start=1):
        k = 7 if s == 1 else 3
        keys |= {
            f"patch_embed{s}.proj.weight": (c, cin, k, k),
            f"patch_embed{s}.proj.bias": (c,),
            f"patch_embed{s}.norm.weight": (c,),
            f"patch_embed{s}.norm.bias": (c,),
            f"norm{s}.weight": (c,),
            f"norm{s}.bias": (c,),
        }
        for j in range(depth):
            b = f"block{s}.{j}."
            block = {
                "norm1": [(c,), (c,)],
                "attn.q": [(c, c), (c,)],
                "attn.kv": [(2 * c, c), (2 * c,)],
                "attn.proj": [(c, c), (c,)],
                "norm2": [(c,), (c,)],
                "mlp.fc1": [(4 * c, c), (4 * c,)],
                "mlp.dwconv.dwconv": [(4 * c, 1, 3, 3), (4 * c,)],
                "mlp.fc2": [(c, 4 * c), (c,)],
            }
            if sr > 1:
                block |= {"attn.sr": [(c, c, sr, sr), (c,)], "attn.norm": [(c,), (c,)]}
            for name, (w, bias) in block.items():
                keys[f"{b}{name}.weight"], keys[f"{b}{name}.bias"] = w, bias
        cin = c
    return keys


def bn_keys(prefix: str, c: int) -> dict[str, tuple]:
    leaves = ("weight", "bias", "running_mean", "running_var")
    return {f"{prefix}.{leaf}": (c,) for leaf in leaves} | {f"{prefix}.num_batches_tracked": ()}


def conv_module_keys(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> dict[str, tuple]:
    return {f"{prefix}.conv.weight": (cout, cin // groups, k, k)} | bn_keys(f"{prefix}.bn", cout)


def daformer_head_keys(in_channels, num_classes: int, channels: int, embed: int) -> dict[str, tuple]:
    """refign's DAFormerHead: embed_layers.i.proj, ASPP (1x1 branch, three depthwise-separable 3x3 branches),
    bottleneck 3x3, conv_seg."""
    keys = {}
    for i, c in enumerate(in_channels):
        keys |= {f"embed_layers.{i}.proj.weight": (embed, c), f"embed_layers.{i}.proj.bias": (embed,)}
    cin = 4 * embed
    keys |= conv_module_keys("fuse_layer.aspp_modules.0", cin, channels, 1)
    for i in (1, 2, 3):
        keys |= conv_module_keys(f"fuse_layer.aspp_modules.{i}.depthwise_conv", cin, cin, 3, groups=cin)
        keys |= conv_module_keys(f"fuse_layer.aspp_modules.{i}.pointwise_conv", cin, channels, 1)
    keys |= conv_module_keys("fuse_layer.bottleneck", 4 * channels, channels, 3)
    return keys | {"conv_seg.weight": (num_classes, channels, 1, 1), "conv_seg.bias": (num_classes,)}


def scale_attention_keys(in_channels, num_classes: int, channels: int) -> dict[str, tuple]:
    """refign's SegFormerHead: linear_c{i}.proj, linear_fuse 1x1 ConvModule, linear_pred."""
    keys = {}
    for i, c in enumerate(in_channels, start=1):
        keys |= {f"linear_c{i}.proj.weight": (channels, c), f"linear_c{i}.proj.bias": (channels,)}
    keys |= conv_module_keys("linear_fuse", 4 * channels, channels, 1)
    return keys | {"linear_pred.weight": (num_classes, channels, 1, 1), "linear_pred.bias": (num_classes,)}


def refign_shapes(preset: str, num_classes: int, channels: int, hrda: bool) -> dict[str, tuple]:
    """The segmentation keys of a refign state_dict (alignment keys come from the torch reference)."""
    dims = MIT[preset][0]
    shapes = {}
    for prefix in ("backbone", "m_backbone", "imnet_backbone"):
        shapes |= {f"{prefix}.{k}": v for k, v in mit_keys(preset).items()}
    for prefix in ("head", "m_head"):
        head = daformer_head_keys(dims, num_classes, channels, channels)
        shapes |= {f"{prefix}.{k}": v for k, v in head.items()}
    if hrda:
        for prefix in ("hrda_scale_attention", "m_hrda_scale_attention"):
            sa = scale_attention_keys(dims, num_classes, channels)
            shapes |= {f"{prefix}.{k}": v for k, v in sa.items()}
    return shapes


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(40000)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(shape, generator=gen)
    return out


def lightning_checkpoint(state_dict, marker) -> dict:
    """A Lightning .ckpt's top level: state_dict beside the bookkeeping entries; a callback state holds an
    object that would run a command if unpickled by a plain unpickler."""
    return {
        "epoch": 9,
        "global_step": 40000,
        "pytorch-lightning_version": "1.6.5",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 9}}}},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5), "evil": Evil(marker)}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 6e-5}]}],
        "lr_schedulers": [{"last_epoch": 40000}],
    }


def lines_digest(shapes) -> str:
    return hashlib.sha256(
        "\n".join(sorted(f"{k}\t{tuple(v)}" for k, v in shapes.items())).encode()
    ).hexdigest()


@pytest.fixture(scope="module")
def convert_main(repo):
    spec = importlib.util.spec_from_file_location("convert_script", repo / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def target_model(preset, num_classes, channels, *, hrda, imnet, vgg_widths):
    """A UDAModel as a config builds it, abstract (nnx.eval_shape): the folder fills every leaf."""
    dims = MIT[preset][0]

    def network():
        return EncoderDecoder(
            MixVisionTransformer.from_preset(preset, rngs=nnx.Rngs(0)),
            DAFormerHead(dims, num_classes, channels=channels, embed_dims=channels, rngs=nnx.Rngs(0)),
        )

    def make():
        sa = None
        if hrda:
            sa = tuple(SegFormerHead(dims, num_classes, channels=channels, rngs=nnx.Rngs(0)) for _ in "ab")
        return UDAModel(
            network(),
            network(),
            MixVisionTransformer.from_preset(preset, rngs=nnx.Rngs(0)) if imnet else None,
            sa,
            None if vgg_widths is None else UAWarpC(False, vgg_widths=vgg_widths, rngs=nnx.Rngs(0)),
        )

    return abstract_module(make)


def value(variable) -> np.ndarray:
    return np.asarray(variable[...])


def conv(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)


def test_full_size_hrda_checkpoint_converts_and_loads_every_key(convert_main, tmp_path, capsys):
    shapes = refign_shapes("b5", 19, 256, hrda=True)
    head_and_sa = {k: v for k, v in shapes.items() if k.startswith(("head.", "hrda_scale_attention."))}
    assert lines_digest(head_and_sa) == REFIGN_HEAD_AND_SCALE_ATTENTION_SHA256
    assert sum(math.prod(s) for s in mit_keys("b5").values()) == MIT_B5_VALUES
    sd = random_state(shapes, seed=0) | dict(reference_state())  # alignment: the file's 416 keys (checked)
    counts = {g: sum(1 for k in sd if k.split(".")[0] == g) for g in HRDA_COUNTS}
    assert counts == HRDA_COUNTS and len(sd) == 3720
    assert len([k for k in sd if "hrda_scale_attention" not in k]) == 3688  # the DAFormer checkpoints
    picks = [
        "backbone.block3.39.attn.kv.weight",
        "head.fuse_layer.bottleneck.conv.weight",
        "m_backbone.patch_embed1.proj.weight",
        "m_head.fuse_layer.aspp_modules.2.depthwise_conv.bn.running_var",
        "imnet_backbone.block2.5.mlp.dwconv.dwconv.weight",
        "imnet_backbone.block1.2.attn.sr.weight",
        "alignment_backbone.features.28.weight",
        "alignment_head.decoder1.conv_0.conv.weight",
        "alignment_head.estimate_uncertainty_components4.pred_conv_1.bn.running_var",
        "hrda_scale_attention.linear_c4.proj.weight",
        "m_hrda_scale_attention.linear_fuse.bn.running_var",
        "m_hrda_scale_attention.linear_pred.weight",
    ]
    kept = {k: sd[k].clone() for k in picks}
    src, out = tmp_path / "refign_hrda_acdc.ckpt", tmp_path / "converted"
    torch.save(lightning_checkpoint(sd, tmp_path / "pwned"), src)
    del sd

    convert_main(["refign", "--src", str(src), "--out", str(out)])
    printed = capsys.readouterr().out
    assert not (tmp_path / "pwned").exists()  # the restricted unpickler ran nothing from the file
    assert f"skipped Lightning bookkeeping: {', '.join(BOOKKEEPING)}" in printed
    assert "skipped 78 num_batches_tracked buffers" in printed  # 8 + 8 heads, 60 UAWarpC, 1 + 1 attention
    assert "skipped 0 unused state_dict keys" in printed
    src.unlink()

    model = target_model("b5", 19, 256, hrda=True, imnet=True, vgg_widths=VGG16_WIDTHS)
    meta = load_refign_converted(model, out)
    assert meta["not_restored"] == []  # every group of the folder has a place in the model: no unexpected key
    abstract = [
        p
        for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
        if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
    assert abstract == []  # every parameter and statistic came from the folder: no missing key
    assert meta["format"] == "refign-uda" and meta["num_tensors"] == HRDA_COUNTS
    layout = {k: meta[k] for k in ("backbone", "num_classes", "head_channels", "head_embed_dims", "hrda")}
    assert layout == dict(
        backbone="mit_b5", num_classes=19, head_channels=256, head_embed_dims=256, hrda=True
    )
    assert (meta["scale_attention_channels"], meta["imnet"], meta["alignment"]) == (256, True, True)
    assert meta["vgg_widths"] == list(VGG16_WIDTHS) and meta["iterative_refinement"] is False
    skipped = meta["skipped"]
    assert skipped["bookkeeping"] == BOOKKEEPING and skipped["unused_keys"] == []
    assert len(skipped["num_batches_tracked"]) == 78
    assert "head.fuse_layer.bottleneck.bn.num_batches_tracked" in skipped["num_batches_tracked"]
    assert any(g.endswith(".system") for g in skipped["pickled_globals_not_rebuilt"])  # Evil's os.system

    np.testing.assert_array_equal(value(model.backbone.block3[39].attn.kv.kernel), kept[picks[0]].numpy().T)
    np.testing.assert_array_equal(value(model.head.fuse_layer.bottleneck.conv.kernel), conv(kept[picks[1]]))
    np.testing.assert_array_equal(value(model.m_backbone.patch_embed1.proj.kernel), conv(kept[picks[2]]))
    bn = model.m_head.fuse_layer.aspp_modules[2].depthwise_conv.bn
    np.testing.assert_array_equal(value(bn.var), kept[picks[3]].numpy())
    dw = model.imnet_backbone.block2[5].mlp.dwconv.dwconv.kernel
    np.testing.assert_array_equal(value(dw), conv(kept[picks[4]]))  # (512, 1, 3, 3) -> (3, 3, 1, 512)
    np.testing.assert_array_equal(value(model.imnet_backbone.block1[2].attn.sr.kernel), conv(kept[picks[5]]))
    np.testing.assert_array_equal(value(model.alignment_backbone.features[28].kernel), conv(kept[picks[6]]))
    np.testing.assert_array_equal(
        value(model.alignment_head.decoder1.conv_0.conv.kernel), conv(kept[picks[7]])
    )
    bn = model.alignment_head.estimate_uncertainty_components4.pred_conv_1.bn
    np.testing.assert_array_equal(value(bn.var), kept[picks[8]].numpy())
    np.testing.assert_array_equal(
        value(model.hrda_scale_attention.linear_c4.proj.kernel), kept[picks[9]].numpy().T
    )
    np.testing.assert_array_equal(
        value(model.m_hrda_scale_attention.linear_fuse.bn.var), kept[picks[10]].numpy()
    )
    np.testing.assert_array_equal(
        value(model.m_hrda_scale_attention.linear_pred.kernel), conv(kept[picks[11]])
    )


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A DAFormer-layout (no HRDA) refign checkpoint at MiT-B0, 7 classes, 16-wide head, tiny VGG, plus a key
    outside every group; converted once."""
    root = tmp_path_factory.mktemp("small")
    sd = random_state(refign_shapes("b0", 7, 16, hrda=False), seed=1) | dict(reference_state(TINY_VGG))
    sd["debug_probe.weight"] = torch.zeros(2)
    src = root / "small.ckpt"
    torch.save(lightning_checkpoint(sd, root / "pwned"), src)
    return root, src, sd


def test_small_checkpoint_config_checks_partial_restore_and_student_only(
    convert_main, small_checkpoint, capsys
):
    root, src, sd = small_checkpoint
    out = root / "uda"
    convert_main(["refign", "--src", str(src), "--out", str(out)])
    assert "skipped 1 unused state_dict keys (groups: debug_probe)" in capsys.readouterr().out

    # a config without the feature distance and without Refign's alignment: those groups are not restored
    model = target_model("b0", 7, 16, hrda=False, imnet=False, vgg_widths=None)
    meta = load_refign_converted(model, out)
    assert meta["not_restored"] == ["imnet_backbone", "alignment_backbone", "alignment_head"]
    assert meta["hrda"] is False and meta["vgg_widths"] == list(TINY_VGG)
    assert meta["skipped"]["unused_keys"] == ["debug_probe.weight"]
    np.testing.assert_array_equal(value(model.m_head.conv_seg.bias), sd["m_head.conv_seg.bias"].numpy())

    mismatches = [
        (dict(num_classes=19), "checkpoint has 7 classes, config.model.num_classes is 19"),
        (dict(hrda=True), "checkpoint has no HRDA scale attention, config.model.hrda.enabled is True"),
        (dict(vgg_widths=VGG16_WIDTHS), r"checkpoint has VGG-16 widths \[4, 4, 8, 8, 8\], config.uda.refign"),
        (dict(preset="b5"), "checkpoint has backbone mit_b0, config.model.backbone is mit_b5"),
        (dict(channels=32), "checkpoint has head channels 16, config.model.head.channels is 32"),
    ]
    for change, message in mismatches:
        kwargs = (
            dict(preset="b0", num_classes=7, channels=16, hrda=False, imnet=False, vgg_widths=None) | change
        )
        with pytest.raises(CheckpointError, match=message):
            load_refign_converted(target_model(**kwargs), out)

    student = root / "student"
    convert_main(["refign", "--src", str(src), "--out", str(student), "--student-only"])
    net = abstract_module(
        lambda: EncoderDecoder(
            MixVisionTransformer.from_preset("b0", rngs=nnx.Rngs(0)),
            DAFormerHead(MIT["b0"][0], 7, channels=16, embed_dims=16, rngs=nnx.Rngs(0)),
        )
    )
    meta = load_converted(student, net)
    assert meta["format"] == "refign" and meta["teacher"] is False and meta["num_classes"] == 7
    np.testing.assert_array_equal(value(net.head.conv_seg.kernel), conv(sd["head.conv_seg.weight"]))
    assert is_refign_converted(out) and not is_refign_converted(student)
    with pytest.raises(CheckpointError, match="has format 'refign', not 'refign-uda'"):
        load_refign_converted(model, student)


def test_missing_head_fails_in_one_line(convert_main, small_checkpoint, capsys):
    root, _, sd = small_checkpoint
    src = root / "no_head.ckpt"
    torch.save(
        lightning_checkpoint({k: v for k, v in sd.items() if not k.startswith("head.")}, root / "x"), src
    )
    with pytest.raises(SystemExit) as done:
        convert_main(["refign", "--src", str(src), "--out", str(root / "no_head")])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "no key starts with 'head.' (top-level names: ['alignment_backbone', 'alignment_head', 'backbone', "
        in err
    )
