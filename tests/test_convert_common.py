"""The generic torch -> NNX loader against torch modules built here."""

import numpy as np
import pytest
import torch
from flax import nnx

from lqseg_jax.convert.common import CheckpointError, load_torch_state, rename_keys, to_numpy


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 5, rngs=rngs)
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(5, rngs=rngs), nnx.GroupNorm(4, num_groups=2, rngs=rngs)])


def torch_net():
    torch.manual_seed(0)
    net = torch.nn.ModuleDict(
        dict(
            fc=torch.nn.Linear(3, 5),
            conv=torch.nn.Conv2d(2, 4, 3, padding=1),
            bn=torch.nn.BatchNorm2d(4),
            norms=torch.nn.ModuleList([torch.nn.LayerNorm(5), torch.nn.GroupNorm(2, 4)]),
        )
    )
    for p in net.parameters():
        torch.nn.init.normal_(p)
    net["bn"].running_mean.normal_()
    net["bn"].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_layouts_match_torch_outputs():
    tnet = torch_net()
    model = Net(nnx.Rngs(0))
    load_torch_state(model, to_numpy(tnet.state_dict()), source="test")
    model.eval()
    x = np.random.default_rng(0).normal(size=(2, 2, 6, 7)).astype(np.float32)  # NCHW
    with torch.no_grad():
        ref = tnet["bn"](tnet["conv"](torch.from_numpy(x))).numpy().transpose(0, 2, 3, 1)
        ref_gn = tnet["norms"][1](torch.from_numpy(ref.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        v = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
        ref_fc = tnet["norms"][0](tnet["fc"](torch.from_numpy(v))).numpy()
    out = np.asarray(model.bn(model.conv(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.norms[1](out)), ref_gn, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.norms[0](model.fc(v))), ref_fc, atol=1e-5)


def test_errors_name_the_key():
    sd = to_numpy(torch_net().state_dict())
    model = Net(nnx.Rngs(0))
    bad = dict(sd, **{"fc.weight": np.zeros((5, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"'fc\.weight'.*\(5, 4\).*expects \(3, 5\)"):
        load_torch_state(model, bad, source="ckpt")
    missing = {k: v for k, v in sd.items() if k != "conv.bias"}
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*conv\.bias"):
        load_torch_state(model, missing, source="ckpt")
    with pytest.raises(CheckpointError, match=r"(?s)1 unexpected.*extra\.weight"):
        load_torch_state(model, dict(sd, **{"extra.weight": np.zeros(3)}), source="ckpt")


def test_rename_keys_and_skip():
    out, skipped = rename_keys(
        {"backbone.a.weight": 1, "ram.x": 2, "backbone.b.bias": 3},
        [(r"^backbone\.", ""), (r"^a\.", "aa.")],
        skip=[r"^ram\."],
    )
    assert out == {"aa.weight": 1, "b.bias": 3}  # rules apply in order
    assert skipped == ["ram.x"]
    with pytest.raises(CheckpointError, match="two checkpoint keys"):
        rename_keys({"x.w": 1, "y.w": 2}, [(r"^[xy]", "z")])


def test_a_wrong_class_count_names_the_weight_as_well_as_the_bias():
    # A checkpoint for 6 output channels: conv.bias (sorted first) and conv.weight are both off; the error
    # names each, so the weight's shape is not reported as a bias problem only.
    sd = to_numpy(torch_net().state_dict())
    model = Net(nnx.Rngs(0))
    bad = dict(
        sd, **{"conv.weight": np.zeros((6, 2, 3, 3), np.float32), "conv.bias": np.zeros(6, np.float32)}
    )
    with pytest.raises(CheckpointError) as info:
        load_torch_state(model, bad, source="ckpt")
    message = str(info.value)
    assert message.startswith("ckpt: shape mismatch for ")
    assert (
        "'conv.weight' (-> 'conv.kernel'): checkpoint has (6, 2, 3, 3) (mapped (3, 3, 2, 6)), model expects (3, 3, 2, 4)"
        in message
    )
    assert "'conv.bias' (-> 'conv.bias'): checkpoint has (6,) (mapped (6,)), model expects (4,)" in message


def test_a_converted_folder_for_another_class_count_names_each_array(tmp_path):
    from lqseg_jax.convert.common import load_converted, save_converted

    class Head(nnx.Module):
        def __init__(self, num_classes, rngs):
            self.conv_seg = nnx.Conv(8, num_classes, (1, 1), rngs=rngs)

    save_converted(tmp_path, Head(10, nnx.Rngs(0)), {"source": "test"})
    with pytest.raises(CheckpointError) as info:
        load_converted(tmp_path, Head(19, nnx.Rngs(0)))
    assert str(info.value) == (
        f"converted state at {tmp_path} does not fit the model (2 arrays): 'conv_seg.bias': saved (10,), model "
        "expects (19,); 'conv_seg.kernel': saved (1, 1, 8, 10), model expects (1, 1, 8, 19) (was it converted for "
        "another config, e.g. another model.num_classes?)"
    )
    assert load_converted(tmp_path, Head(10, nnx.Rngs(1))) == {"source": "test"}
