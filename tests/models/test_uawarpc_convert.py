"""UAWarpC / VGG-16 converters: the alignment keys of refign's checkpoints (names and shapes as enumerated in
refign_ckpt_keys.txt, built here with random values from the torch reference of test_uawarpc), errors
that name the key, the restricted Lightning unpickler, and the `scripts/convert.py uawarpc` / `vgg16`
subcommands."""

import hashlib
import importlib.util
import os
import sys
import types
from collections import OrderedDict

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from lqseg_jax.convert.common import CheckpointError, load_converted
from lqseg_jax.convert.lightning import AttributeDict, Skipped, load_lightning_checkpoint, skipped_globals
from lqseg_jax.convert.mit import blank_model
from lqseg_jax.convert.uawarpc import load_uawarpc, load_uawarpc_head
from lqseg_jax.models.uawarpc import UAWarpC, UAWarpCHead
from lqseg_jax.models.vgg import VGG16_WIDTHS, VGG16Features
from tests.models.test_uawarpc import THead, torch_vgg

# sha256 of the sorted "key<TAB>shape" lines of refign_ckpt_keys.txt that start with alignment_backbone. or
# alignment_head. (416 lines: 26 VGG tensors + 390 head tensors incl. 60 num_batches_tracked).
REFIGN_ALIGNMENT_KEYS_SHA256 = "e0bd5781c847a1a522fcd79c3d1b1857d0d31b888de4fe6c800a9e73968ea99e"
TINY_VGG = (4, 4, 8, 8, 8)


def reference_state(widths=VGG16_WIDTHS, seed=0) -> "OrderedDict[str, torch.Tensor]":
    """alignment_backbone.* + alignment_head.* of the torch reference, random weights and BN statistics."""
    torch.manual_seed(seed)
    net = torch.nn.Module()
    net.alignment_backbone = torch.nn.Module()
    net.alignment_backbone.features = torch_vgg(widths)
    net.alignment_head = THead()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.num_batches_tracked.fill_(7)
    return net.state_dict()


def keys_digest(state) -> str:
    lines = sorted(f"{k}\t{tuple(v.shape)}" for k, v in state.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_refign_alignment_keys_convert_without_missing_or_unexpected():
    sd = reference_state()
    assert len(sd) == 416
    assert keys_digest(sd) == REFIGN_ALIGNMENT_KEYS_SHA256  # exactly refign_ckpt_keys.txt's names and shapes
    ckpt = {**sd, "backbone.patch_embed1.proj.weight": torch.zeros(1), "m_head.conv_seg.bias": torch.zeros(1)}
    model = nnx.eval_shape(lambda: UAWarpC(rngs=nnx.Rngs(0)))  # abstract: receives the checkpoint arrays
    skipped = load_uawarpc(model, ckpt)
    assert skipped == ["backbone.patch_embed1.proj.weight", "m_head.conv_seg.bias"]
    head, vgg = model.alignment_head, model.alignment_backbone
    w = sd["alignment_head.decoder1.conv_0.conv.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(head.decoder1.conv_0.conv.kernel[...]), w.transpose(2, 3, 1, 0))
    bn = head.estimate_uncertainty_components4.pred_conv_1.bn
    prefix = "alignment_head.estimate_uncertainty_components4.pred_conv_1.bn."
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), sd[prefix + "running_mean"].numpy())
    np.testing.assert_array_equal(np.asarray(bn.var[...]), sd[prefix + "running_var"].numpy())
    np.testing.assert_array_equal(np.asarray(bn.scale[...]), sd[prefix + "weight"].numpy())
    last = head.refinement_module_finest.dc_convs[6]
    np.testing.assert_array_equal(
        np.asarray(last.bias[...]), sd["alignment_head.refinement_module_finest.dc_convs.6.bias"].numpy()
    )
    np.testing.assert_array_equal(
        np.asarray(vgg.features[28].kernel[...]),
        sd["alignment_backbone.features.28.weight"].numpy().transpose(2, 3, 1, 0),
    )


@pytest.fixture(scope="module")
def head_state():
    return {k: v for k, v in reference_state(TINY_VGG).items() if k.startswith("alignment_head.")}


def test_missing_unexpected_and_misshaped_keys_are_named(head_state):
    head = blank_model(lambda: UAWarpCHead(rngs=nnx.Rngs(0)))  # a failed load leaves it untouched
    key = "alignment_head.decoder3.conv2_skip.bn.running_var"
    with pytest.raises(CheckpointError, match=r"missing.*decoder3\.conv2_skip\.bn\.var"):
        load_uawarpc_head(head, {k: v for k, v in head_state.items() if k != key})
    extra = {**head_state, "alignment_head.decoder3.conv_5.conv.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected.*decoder3\.conv_5\.conv\.weight"):
        load_uawarpc_head(head, extra)
    bad = {**head_state, "alignment_head.reduce.weight": torch.zeros(2, 16, 1, 1)}
    with pytest.raises(CheckpointError, match=r"reduce\.weight.*\(2, 16, 1, 1\).*\(1, 1, 32, 2\)"):
        load_uawarpc_head(head, bad)
    with pytest.raises(CheckpointError, match=r"no key starts with 'alignment_backbone\.'"):
        load_uawarpc(None, {"backbone.x": torch.zeros(1)})  # checked before the model is touched


class Evil:
    """Would run a shell command when unpickled by a plain unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def lightning_like_checkpoint(tmp_path, monkeypatch, state) -> tuple:
    """A torch.save'd dict shaped like a Lightning .ckpt: state_dict plus bookkeeping, hyper-parameters in a
    `pytorch_lightning.utilities.parsing.AttributeDict`, a numpy scalar, and an object whose unpickling
    would run a command."""
    fake = types.ModuleType("pytorch_lightning.utilities.parsing")

    class LightningAttributeDict(dict):
        pass

    LightningAttributeDict.__name__ = LightningAttributeDict.__qualname__ = "AttributeDict"
    LightningAttributeDict.__module__ = fake.__name__
    fake.AttributeDict = LightningAttributeDict
    for name in ("pytorch_lightning", "pytorch_lightning.utilities"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    marker = tmp_path / "pwned"
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.6.5",
        "state_dict": OrderedDict(state),
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5), "score": np.float64(0.5)}},
        "hyper_parameters": LightningAttributeDict(lr=1e-4, stages=[1, 2]),
        "evil": Evil(marker),
    }
    path = tmp_path / "uawarpc.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_restricted_unpickler_loads_tensors_and_runs_no_code(tmp_path, monkeypatch):
    state = {"a.weight": torch.randn(3, 2), "a.bn.num_batches_tracked": torch.tensor(5)}
    path, marker = lightning_like_checkpoint(tmp_path, monkeypatch, state)
    ckpt = load_lightning_checkpoint(path)
    assert not marker.exists()
    assert isinstance(ckpt["evil"], Skipped) and ckpt["evil"]._global in ("posix.system", "nt.system")
    assert type(ckpt["hyper_parameters"]) is AttributeDict and ckpt["hyper_parameters"]["lr"] == 1e-4
    assert ckpt["epoch"] == 3 and list(ckpt["state_dict"]) == list(state)
    torch.testing.assert_close(ckpt["state_dict"]["a.weight"], state["a.weight"])
    assert ckpt["callbacks"]["ModelCheckpoint"]["best_model_score"].item() == 0.5
    found = skipped_globals(ckpt)
    assert any(g.endswith(".system") for g in found) and any("numpy" in g for g in found), found
    with pytest.raises(FileNotFoundError):
        load_lightning_checkpoint(tmp_path / "nope.ckpt")


def run_convert_script(repo, argv):
    spec = importlib.util.spec_from_file_location("convert_script", repo / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def test_convert_script_uawarpc_and_vgg16(tmp_path, monkeypatch, repo):
    state = reference_state(TINY_VGG, seed=1)
    path, marker = lightning_like_checkpoint(tmp_path, monkeypatch, state)
    out = tmp_path / "converted"
    run_convert_script(repo, ["uawarpc", "--src", str(path), "--out", str(out)])
    assert not marker.exists()
    model = blank_model(lambda: UAWarpC(vgg_widths=TINY_VGG, rngs=nnx.Rngs(0)))
    meta = load_converted(out, model)
    assert meta["format"] == "uawarpc" and meta["vgg_widths"] == list(TINY_VGG) and not meta["published_size"]
    assert any(g.endswith(".system") for g in meta["pickled_globals_not_rebuilt"])
    key = "alignment_head.estimate_uncertainty_components2.conv_0.bn.running_mean"
    np.testing.assert_array_equal(
        np.asarray(model.alignment_head.estimate_uncertainty_components2.conv_0.bn.mean[...]),
        state[key].numpy(),
    )

    # torchvision's file: features.N.* plus classifier.* (skipped)
    vgg_sd = {
        k[len("alignment_backbone.") :]: v for k, v in state.items() if k.startswith("alignment_backbone.")
    }
    vgg_sd["classifier.6.bias"] = torch.zeros(10)
    torch.save(vgg_sd, tmp_path / "vgg16.pth")
    run_convert_script(repo, ["vgg16", "--src", str(tmp_path / "vgg16.pth"), "--out", str(tmp_path / "vgg")])
    vgg = blank_model(lambda: VGG16Features(TINY_VGG, rngs=nnx.Rngs(0)))
    meta = load_converted(tmp_path / "vgg", vgg)
    assert meta["skipped"] == ["classifier.6.bias"] and meta["widths"] == list(TINY_VGG)
    leaves = jax.tree.leaves(nnx.state(vgg, nnx.Param))
    assert len(leaves) == 26
    np.testing.assert_array_equal(np.asarray(vgg.features[0].bias[...]), vgg_sd["features.0.bias"].numpy())
