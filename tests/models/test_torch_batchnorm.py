"""ConvModule's BatchNorm against torch.nn.BatchNorm2d (a re-statement: torch's own module): after train-mode
steps the running mean and the running variance (torch stores the unbiased batch variance) agree, and so do
the train- and eval-mode outputs."""

import numpy as np
import torch
from flax import nnx

from lqseg_jax.models.layers import ConvModule


def test_conv_module_bn_running_stats_match_torch():
    rng = np.random.default_rng(0)
    ours = ConvModule(3, 4, 3, padding=1, rngs=nnx.Rngs(0))
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(4, eps=1e-5, momentum=0.1)
    conv.weight.data = torch.from_numpy(np.asarray(ours.conv.kernel[...]).transpose(3, 2, 0, 1).copy())
    scale, bias = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    ours.bn.scale[...], ours.bn.bias[...] = scale, bias
    bn.weight.data, bn.bias.data = torch.from_numpy(scale), torch.from_numpy(bias)

    ours.train()
    bn.train()
    for step in range(2):
        x = (rng.normal(size=(2, 5, 3, 3)) * (step + 2) + 1).astype(np.float32)  # (b, h, w, c), n = 30
        ref = torch.relu(bn(conv(torch.from_numpy(x).permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(ours(x)), ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.bn.mean[...]), bn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.bn.var[...]), bn.running_var.numpy(), rtol=1e-6, atol=1e-6)

    ours.eval()
    bn.eval()
    x = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
    ref = torch.relu(bn(conv(torch.from_numpy(x).permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours(x)), ref.detach().numpy(), atol=1e-5)
